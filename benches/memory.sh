#!/usr/bin/env bash
# Peak memory of enriching 100k and 1M rows: `examples/enrich` (release) reads a generated
# CSV and streams `enrich(...)` results against `groupflow serve` (SQLite file, sim
# processor) running as its own process, so the figure is the enriching process's alone.
# Usage: benches/memory.sh [ROWS...]   (default: 100000 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
if (($#)); then sizes=("$@"); else sizes=(100000 1000000); fi

cargo build --release --quiet --bin groupflow --example enrich
work=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/groupflow serve --addr "127.0.0.1:$port" --db "$work/server.db" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.1
done

printf '%10s %14s %10s  %s\n' rows peak_rss_mib seconds result
for n in "${sizes[@]}"; do
  csv="$work/rows-$n.csv"
  awk -v n="$n" 'BEGIN { print "name,website,employees";
    for (i = 0; i < n; i++) printf "Company %d,https://company-%d.example,%d\n", i, i, i % 5000 }' >"$csv"
  start=$(date +%s.%N)
  PARALLEL_BASE_URL="http://127.0.0.1:$port" TMPDIR="$work" \
    /usr/bin/time -v target/release/examples/enrich "$csv" >"$work/out-$n.txt" 2>"$work/time-$n.txt"
  end=$(date +%s.%N)
  rss_kib=$(awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$work/time-$n.txt")
  printf '%10d %14.1f %10.1f  %s\n' "$n" "$(echo "$rss_kib / 1024" | bc -l)" \
    "$(echo "$end - $start" | bc -l)" "$(tail -n 1 "$work/out-$n.txt")"
  rm -f "$csv"
done
