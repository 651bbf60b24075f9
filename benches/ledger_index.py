#!/usr/bin/env python3
"""The ledger's key index on its own, without groupflow: why 1M rows cost more per row.

Claims N random-looking 32-hex-digit keys into a table shaped like the ledger's `runs`
(same columns, same PRIMARY KEY (task_id, input_key), 1 KB pages, WAL, 16 MiB cache,
32 MB between checkpoints), 1,000 per transaction as groupflow does, then records each
claim's run by key, 1,000 per transaction. Prints the seconds of each part and the claim
time of every tenth of the rows, so the growth per row shows.

    python3 benches/ledger_index.py --rows 100000
    python3 benches/ledger_index.py --rows 1000000 --cache-mib 256    # cache or not?
    python3 benches/ledger_index.py --rows 1000000 --key blob         # 16-byte keys
    python3 benches/ledger_index.py --rows 1000000 --key int          # 64-bit keys
    python3 benches/ledger_index.py --rows 1000000 --sorted           # key order per batch

Uses Python's own sqlite3 module; the database goes to a temporary folder.
"""

import argparse
import hashlib
import os
import sqlite3
import tempfile
import time

BATCH = 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cache-mib", type=int, default=16)
    p.add_argument("--journal", default="WAL", help="WAL (as groupflow) or OFF")
    p.add_argument("--key", choices=["text", "blob", "int"], default="text",
                   help="text: the 32 hex digits (as groupflow); blob: their 16 bytes; "
                   "int: their first 64 bits")
    p.add_argument("--sorted", action="store_true", help="sort each batch's keys first")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ledger.sqlite")
        c = sqlite3.connect(path, isolation_level=None)
        c.executescript(f"""
            PRAGMA page_size = 1024; PRAGMA journal_mode = {a.journal};
            PRAGMA synchronous = NORMAL; PRAGMA cache_size = -{a.cache_mib * 1024};
            PRAGMA wal_autocheckpoint = 32768;
            CREATE TABLE runs (task_id INTEGER NOT NULL, input_key NOT NULL,
              attempt INTEGER NOT NULL, session TEXT NOT NULL, group_id TEXT, run_id TEXT,
              -- input_key has no declared type, so that a --key int or blob stays one
              status TEXT NOT NULL, result_id INTEGER, PRIMARY KEY (task_id, input_key));
        """)
        claim = """INSERT INTO runs (task_id, input_key, attempt, session, status)
                   VALUES (1, ?, 1, 'session', 'queued')
                   ON CONFLICT (task_id, input_key) DO NOTHING"""
        record = """UPDATE runs SET status = 'submitted', group_id = 'tgrp_0123456789abcdef',
                      run_id = ? WHERE task_id = 1 AND input_key = ? AND attempt = 1
                      AND status = 'queued'"""
        hexes = [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()
                 for i in range(a.rows)]
        if a.key == "text":
            keys = hexes
        elif a.key == "blob":
            keys = [bytes.fromhex(h) for h in hexes]
        else:
            keys = [int.from_bytes(bytes.fromhex(h[:16]), "big", signed=True) for h in hexes]

        claim_s = record_s = 0.0
        tenth = max(a.rows // 10, BATCH)
        marks = []
        for start in range(0, a.rows, BATCH):
            batch = keys[start:start + BATCH]
            if a.sorted:
                batch = sorted(batch)
            t = time.perf_counter()
            c.execute("BEGIN")
            for k in batch:
                c.execute(claim, (k,))
            c.execute("COMMIT")
            claim_s += time.perf_counter() - t
            t = time.perf_counter()
            c.execute("BEGIN")
            for i, k in enumerate(batch, start):
                c.execute(record, (f"trun_{i}", k))
            c.execute("COMMIT")
            record_s += time.perf_counter() - t
            if (start + BATCH) % tenth == 0:
                marks.append(claim_s)
        steps = [f"{b - a_:.2f}" for a_, b in zip([0.0] + marks, marks)]
        size = os.path.getsize(path) + os.path.getsize(path + "-wal") \
            if os.path.exists(path + "-wal") else os.path.getsize(path)
        print(f"rows {a.rows}  key {a.key}  cache {a.cache_mib} MiB  journal {a.journal}"
              f"{'  sorted' if a.sorted else ''}")
        print(f"claim {claim_s:.2f} s ({claim_s / a.rows * 1e6:.1f} us/row)  "
              f"record {record_s:.2f} s ({record_s / a.rows * 1e6:.1f} us/row)  "
              f"files {size / 1e6:.0f} MB")
        print("claim seconds per tenth of the rows: " + " ".join(steps))


if __name__ == "__main__":
    main()
