#!/usr/bin/env bash
# Where the two cores go during one CPU-bound run of benches/vs_parallel_cli/enrich.yaml:
# the CPU seconds the groupflow client and the server (sim latency 0) each used in every
# 100 ms, then the totals. A client and a server both well under one core in the same
# interval are waiting on each other; a stretch with the server at 0 is the client alone.
# Usage: benches/timeline.sh [ROWS] [BINARY]   (default: 100000, target/release/groupflow)
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-100000}
bin=${2:-target/release/groupflow}
if [[ $# -lt 2 ]]; then cargo build --release --quiet --bin groupflow; fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

awk -v n="$rows" 'BEGIN { print "name,website,country"; split("US,DE,FR,JP,GB,IN,BR,CA", c, ",");
  for (i = 0; i < n; i++) printf "Company %d,https://company-%d.example,%s\n", i, i, c[i % 8 + 1] }' >"$work/companies.csv"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" serve --addr "127.0.0.1:$port" --db "$work/server.db" --api-key bench --concurrency 500 \
  >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done

PARALLEL_BASE_URL="http://127.0.0.1:$port" PARALLEL_API_KEY=bench \
  BENCH_INPUT="$work/companies.csv" BENCH_OUTPUT="$work/out.parquet" \
  "$bin" run --progress quiet --state-dir "$work/state" benches/vs_parallel_cli/enrich.yaml \
  >"$work/run.log" 2>&1 &
client_pid=$!

python3 - "$client_pid" "$server_pid" <<'PY'
import os, sys, time
client, server = sys.argv[1], sys.argv[2]
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":  # exited, not yet reaped
        return None
    return (int(fields[11]) + int(fields[12])) / tick
start = time.time()
last_c, last_s = cpu(client) or 0.0, cpu(server) or 0.0
total_c = total_s = 0.0
print(f"{'t (s)':>6} {'client':>7} {'server':>7}  (CPU seconds in each 100 ms)")
while True:
    time.sleep(0.1)
    c, s = cpu(client), cpu(server)
    if c is None:
        break
    print(f"{time.time() - start:6.1f} {c - last_c:7.2f} {s - last_s:7.2f}")
    total_c, total_s = total_c + c - last_c, total_s + s - last_s
    last_c, last_s = c, s
print(f"{'total':>6} {total_c:7.2f} {total_s:7.2f}  over {time.time() - start:.1f} s")
PY
if ! wait "$client_pid"; then
  echo "the groupflow run failed:" >&2
  cat "$work/run.log" >&2
  exit 1
fi
