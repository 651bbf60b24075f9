//! Finding a run's row by its input key, with the key index written in sorted runs.
//!
//! Input keys are hashes. While the run table carried its key's index, every claim of
//! 1,000 keys landed on about as many random pages of it, and each of those pages was
//! written to the write-ahead log at the claim's commit: ≈ 0.9 page of 1 KB per row at
//! 100k rows, the most of the client's `pwrite` calls, and more per row as the ledger
//! grows. Now a claim appends its rows to `runs`, which has no index but its row number,
//! and the keys of rows that recent claims added are held in memory ([`FreshKeys`]). They
//! reach the index, the table `run_keys`, in sorted runs: once [`FOLD_ROWS`] rows wait,
//! and whenever a ledger is opened. A sorted run writes each page of the index once.
//!
//! What keeps this right when pipelines share the ledger (each process has its own memory):
//! - a task's input key has at most one row in `runs`;
//! - rows are numbered from `settings.runs_next`, never reused, so a row above every row a
//!   process has read is new to it;
//! - every row up to `settings.runs_folded` has its key in `run_keys`; a process reads the
//!   rows above it into its [`FreshKeys`] before it looks a key up;
//! - deleting a row deletes its key from `run_keys` (a trigger); a key held in memory whose
//!   row is gone is found absent, because its row is read by number *and* key.

use std::collections::HashMap;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};

use super::DbKey;

/// Rows whose keys are held in memory before a claim writes them to the index: about
/// 40 bytes each, 5 MB in all. (At 100k rows one run of the index; at 1M rows eight, each
/// rewriting most of the index's pages, against a rewrite of most of them by every claim
/// of 1,000 rows before.)
pub const FOLD_ROWS: usize = 1 << 17;

/// Converts a format-4 ledger: `runs` loses its key index (rebuilt without its primary key,
/// rows keeping their numbers), and the keys go to `run_keys`, sorted.
pub const TO_FORMAT_5: &str = "
CREATE TABLE runs_v5 (
  task_id INTEGER NOT NULL,
  input_key NOT NULL,
  attempt INTEGER NOT NULL,
  session TEXT NOT NULL,
  group_id TEXT,
  run_id TEXT,
  status TEXT NOT NULL,
  result_id INTEGER,
  result_at INTEGER,
  result_len INTEGER
);
INSERT INTO runs_v5 (rowid, task_id, input_key, attempt, session, group_id, run_id, status,
                     result_id, result_at, result_len)
  SELECT rowid, task_id, input_key, attempt, session, group_id, run_id, status,
         result_id, result_at, result_len
  FROM runs ORDER BY rowid;
DROP TABLE runs;
ALTER TABLE runs_v5 RENAME TO runs;
INSERT INTO run_keys (task_id, input_key, row)
  SELECT task_id, input_key, rowid FROM runs ORDER BY task_id, input_key;
CREATE TRIGGER run_deleted AFTER DELETE ON runs BEGIN
  DELETE FROM run_keys
   WHERE task_id = old.task_id AND input_key = old.input_key AND row = old.rowid;
END;
INSERT OR REPLACE INTO settings (name, value)
  VALUES ('runs_folded', (SELECT coalesce(max(rowid), 0) FROM runs)),
         ('runs_next', (SELECT coalesce(max(rowid), 0) + 1 FROM runs));
";

/// An input key as held in memory (see [`DbKey`]).
#[derive(Clone, PartialEq, Eq, Hash)]
enum HeldKey {
    Fingerprint([u8; 16]),
    Text(Box<str>),
    /// A key of a type no claim writes, read from the ledger: held, so that a lookup of it
    /// is not mistaken for one that misses.
    Other(Box<[u8]>),
}

impl HeldKey {
    fn of(key: &DbKey<'_>) -> HeldKey {
        match key {
            DbKey::Bytes(b) => HeldKey::Fingerprint(*b),
            DbKey::Text(t) => HeldKey::Text((*t).into()),
        }
    }

    fn read(v: ValueRef<'_>) -> HeldKey {
        match v {
            ValueRef::Blob(b) => match <[u8; 16]>::try_from(b) {
                Ok(fp) => HeldKey::Fingerprint(fp),
                Err(_) => HeldKey::Other(b.into()),
            },
            ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(t) => HeldKey::Text(t.into()),
                Err(_) => HeldKey::Other(t.into()),
            },
            other => HeldKey::Other(format!("{other:?}").into_bytes().into()),
        }
    }
}

/// The keys of the rows not yet in `run_keys`, as this process last read them.
pub struct FreshKeys {
    /// `settings.runs_folded` as last read: rows up to it are in `run_keys`.
    folded: i64,
    /// The highest row read or written (at least `folded`).
    seen: i64,
    rows: HashMap<(i64, HeldKey), i64>,
    /// How many keys make a claim fold them first: [`FOLD_ROWS`], fewer in tests.
    pub fold_at: usize,
}

impl Default for FreshKeys {
    fn default() -> Self {
        FreshKeys {
            folded: 0,
            seen: 0,
            rows: HashMap::new(),
            fold_at: FOLD_ROWS,
        }
    }
}

impl FreshKeys {
    /// Reads what other processes sharing the ledger folded or added since the last look:
    /// a read of one setting and of the rows past `seen` (none, when no one else claims).
    pub fn sync(&mut self, c: &Connection) -> rusqlite::Result<()> {
        let folded = setting(c, "runs_folded")?;
        self.folded_to(folded);
        let mut added = c.prepare_cached(
            "SELECT rowid, task_id, input_key FROM runs WHERE rowid > ?1 ORDER BY rowid",
        )?;
        let mut rows = added.query([self.seen])?;
        while let Some(r) = rows.next()? {
            let row: i64 = r.get(0)?;
            self.rows
                .insert((r.get(1)?, HeldKey::read(r.get_ref(2)?)), row);
            self.seen = self.seen.max(row);
        }
        Ok(())
    }

    /// Rows up to `folded` are in `run_keys` now: their keys leave memory.
    pub fn folded_to(&mut self, folded: i64) {
        if folded > self.folded {
            self.rows.retain(|_, row| *row > folded);
            self.folded = folded;
            self.seen = self.seen.max(folded);
        }
    }

    /// How many keys are held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.rows.len()
    }

    /// True when enough keys are held that a claim should fold them first.
    pub fn full(&self) -> bool {
        self.rows.len() >= self.fold_at
    }

    /// Holds `row` as the row of `key`, written by this process's open transaction.
    pub fn add(&mut self, task: i64, key: &DbKey<'_>, row: i64) {
        self.rows.insert((task, HeldKey::of(key)), row);
    }

    /// Forgets rows added by a transaction that did not commit.
    pub fn forget(&mut self, task: i64, added: &[(DbKey<'_>, i64)]) {
        for (key, row) in added {
            let held = (task, HeldKey::of(key));
            if self.rows.get(&held) == Some(row) {
                self.rows.remove(&held);
            }
        }
    }

    /// Rows up to `row` were written by a transaction that committed.
    pub fn committed(&mut self, row: i64) {
        self.seen = self.seen.max(row);
    }

    /// The row of `key` (of task `task`): from memory when it is a row not yet folded,
    /// else from `run_keys`. A row from memory may be gone (see the module's notes): read it
    /// by number and key. Only after [`FreshKeys::sync`] in the same transaction.
    pub fn row_of(
        &self,
        c: &Connection,
        task: i64,
        key: &DbKey<'_>,
    ) -> rusqlite::Result<Option<i64>> {
        if let Some(row) = self.rows.get(&(task, HeldKey::of(key))) {
            return Ok(Some(*row));
        }
        // Nothing was ever folded (every fold moves `runs_folded` past 0): the index is
        // empty, and a new ledger's claims spare a lookup each.
        if self.folded == 0 {
            return Ok(None);
        }
        c.prepare_cached("SELECT row FROM run_keys WHERE task_id = ?1 AND input_key = ?2")?
            .query_row(params![task, key], |r| r.get(0))
            .optional()
    }
}

/// Writes the keys of the rows above `settings.runs_folded` to `run_keys`, sorted, and
/// moves the setting up past them; returns its new value, for [`FreshKeys::folded_to`]
/// once the transaction commits. Needs the write lock.
pub fn fold(c: &Connection) -> rusqlite::Result<i64> {
    let folded = setting(c, "runs_folded")?;
    let top = last_row(c)?;
    if top <= folded {
        return Ok(folded);
    }
    c.prepare_cached(
        "INSERT INTO run_keys (task_id, input_key, row)
         SELECT task_id, input_key, rowid FROM runs WHERE rowid > ?1
         ORDER BY task_id, input_key",
    )?
    .execute([folded])?;
    set_setting(c, "runs_folded", top)?;
    Ok(top)
}

/// The number the next new row takes: past every row there is and ever was.
pub fn next_row(c: &Connection) -> rusqlite::Result<i64> {
    let next = setting(c, "runs_next")?;
    Ok(next.max(last_row(c)? + 1))
}

/// The highest row number in `runs`; 0 when it is empty.
fn last_row(c: &Connection) -> rusqlite::Result<i64> {
    c.prepare_cached("SELECT coalesce(max(rowid), 0) FROM runs")?
        .query_row([], |r| r.get(0))
}

/// Records that new rows start at `next` from now on.
pub fn set_next_row(c: &Connection, next: i64) -> rusqlite::Result<()> {
    set_setting(c, "runs_next", next)
}

/// An integer setting; 0 when it is not set.
fn setting(c: &Connection, name: &str) -> rusqlite::Result<i64> {
    c.prepare_cached("SELECT CAST(value AS INTEGER) FROM settings WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()
        .map(Option::unwrap_or_default)
}

fn set_setting(c: &Connection, name: &str, value: i64) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT OR REPLACE INTO settings (name, value) VALUES (?1, ?2)")?
        .execute(params![name, value.to_string()])
        .map(|_| ())
}
