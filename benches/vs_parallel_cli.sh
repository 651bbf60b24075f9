#!/usr/bin/env bash
# groupflow against Parallel's own enrichment tool, `parallel-cli enrich run`
# (PyPI parallel-web-tools==0.9.4), on the same generated company CSV, the same output
# columns, the same machine and the same local Task Group server (`groupflow serve`, sim
# processor, SQLite file), one fresh server per timed run so neither tool inherits the
# other's database.
#
#   cpu      sim latency 0: what each tool costs in CPU and memory (default 10k and 100k rows),
#            and the server's floor: benches/vs_parallel_cli/floor.py sends the same runs
#            pre-built and reads the results to nowhere, so it times the server alone
#   latency  sim latency 1..3 s per run, server concurrency 500 (default 10k rows): against
#            the ideal rows / concurrency x mean latency
#   scale    groupflow at 100k and 1M rows: peak RSS and time per row
#
# Prints wall time, peak RSS (of the tool's process; the server is measured apart: its CPU
# seconds) for each tool, the medians over --repeats runs, and the ratios.
#
# Usage: benches/vs_parallel_cli.sh [--cases cpu,latency,scale] [--repeats R]
#          [--cpu-rows 10000,100000] [--latency-rows 10000] [--scale-rows 100000,1000000]
#          [--latency-ms 1000..3000] [--concurrency 500] [--pc-max-rows N]
#          [--profile dist] [--keep]
#   --pc-max-rows N  run parallel-cli only on inputs of at most N rows (default 1000000)
#   --profile P      the cargo profile groupflow is built with: `dist` (the default: release
#                    with whole-program LTO, ≈ 22 min to build on 2 cores) or `release`
#                    (≈ 2 min; about 5-8% slower at 100k rows)
#   --keep           keep the work directory (outputs, logs) and print its path
# Needs: a Rust toolchain, Python 3 (for the parallel-cli venv, created in .bench-env/).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cases=cpu,latency,scale
repeats=3
cpu_rows=10000,100000
latency_rows=10000
scale_rows=100000,1000000
latency_ms=1000..3000
concurrency=500
pc_max_rows=1000000
profile=dist
keep=
while (($#)); do
  case $1 in
    --cases) cases=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --cpu-rows) cpu_rows=$2; shift 2 ;;
    --latency-rows) latency_rows=$2; shift 2 ;;
    --scale-rows) scale_rows=$2; shift 2 ;;
    --latency-ms) latency_ms=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --pc-max-rows) pc_max_rows=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# --- tools ----------------------------------------------------------------------------
echo "building groupflow (profile $profile)" >&2
cargo build --profile "$profile" --quiet --bin groupflow
gf=${CARGO_TARGET_DIR:-$root/target}/$profile/groupflow

python=${PYTHON:-python3}
venv=$root/.bench-env/parallel-cli
want='parallel-web-tools==0.9.4'
if [[ ! -f $venv/.installed || $(cat "$venv/.installed") != "$want" ]]; then
  rm -rf "$venv"
  mkdir -p "$root/.bench-env"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet "$want"
  echo "$want" >"$venv/.installed"
fi
pc=$venv/bin/parallel-cli

work=$(mktemp -d "${TMPDIR:-/tmp}/vs-parallel-cli.XXXXXX")
server_pid=
stop_server() {
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
cleanup() {
  stop_server
  if [[ -n $keep ]]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- measuring ------------------------------------------------------------------------
# measure OUT_PREFIX CMD...: runs CMD (stdout/stderr to OUT_PREFIX.log) and writes
# "wall_seconds peak_rss_kib exit_code" to OUT_PREFIX.m
if [[ -x /usr/bin/time ]] && /usr/bin/time -v true 2>/dev/null; then
  measure() {
    local out=$1; shift
    local start end rc=0
    start=$(date +%s.%N)
    /usr/bin/time -v -o "$out.time" "$@" >"$out.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    local rss
    rss=$(awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$out.time")
    echo "$(echo "$end - $start" | bc -l) $rss $rc" >"$out.m"
  }
else
  measure() {
    local out=$1; shift
    "$python" - "$out" "$@" <<'PY'
import resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
start = time.monotonic()
with open(out + ".log", "wb") as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
wall = time.monotonic() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
open(out + ".m", "w").write(f"{wall} {rss} {rc}\n")
PY
  }
fi

free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_server NAME SERVE-ARGS...: a fresh server on a free loopback port; sets $port
start_server() {
  local name=$1; shift
  port=$(free_port)
  "$gf" serve --addr "127.0.0.1:$port" --db "$work/$name.server.db" --api-key bench "$@" \
    >"$work/$name.server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
    sleep 0.05
  done
  echo "groupflow serve did not start; see $work/$name.server.log" >&2
  exit 1
}

# CPU seconds (user + system) the server has used so far.
server_cpu() {
  local ticks
  ticks=$(awk '{ print $14 + $15 }' "/proc/$server_pid/stat" 2>/dev/null || echo 0)
  echo "$ticks / $(getconf CLK_TCK)" | bc -l
}

csv_for() { # csv_for N: the generated company CSV of N rows
  local n=$1 csv="$work/companies-$1.csv"
  if [[ ! -f $csv ]]; then
    awk -v n="$n" 'BEGIN { print "name,website,country"; split("US,DE,FR,JP,GB,IN,BR,CA", c, ",");
      for (i = 0; i < n; i++) printf "Company %d,https://company-%d.example,%s\n", i, i, c[i % 8 + 1] }' >"$csv"
  fi
  echo "$csv"
}

source_columns='[{"name":"name","description":"Company name"},{"name":"website","description":"Company website"},{"name":"country","description":"Country"}]'
# The same five columns, types and descriptions as benches/vs_parallel_cli/enrich.yaml.
enriched_columns='[{"name":"ceo_name","description":"Name of the current CEO"},
{"name":"founded_year","description":"Year the company was founded","type":"int"},
{"name":"headquarters","description":"City of the headquarters"},
{"name":"employee_count","description":"Number of employees","type":"int"},
{"name":"key_insights","description":"Key business insights","type":"list[str]"}]'

results=$work/results.tsv
: >"$results"

# run_one CASE TOOL N REPEAT SERVE-ARGS...: one timed run of TOOL on a fresh server
run_one() {
  local case=$1 tool=$2 n=$3 rep=$4; shift 4
  local name="$case-$tool-$n-$rep" csv rows filled
  csv=$(csv_for "$n")
  start_server "$name" "$@"
  local base="http://127.0.0.1:$port"
  if [[ $tool == floor ]]; then
    measure "$work/$name" "$python" "$root/benches/vs_parallel_cli/floor.py" "$base" bench "$csv"
  elif [[ $tool == groupflow ]]; then
    local out="$work/$name.parquet"
    measure "$work/$name" env PARALLEL_BASE_URL="$base" PARALLEL_API_KEY=bench \
      BENCH_INPUT="$csv" BENCH_OUTPUT="$out" \
      "$gf" run --progress lines --state-dir "$work/$name.state" "$root/benches/vs_parallel_cli/enrich.yaml"
  else
    local out="$work/$name.csv"
    measure "$work/$name" env PARALLEL_API_URL="$base" PARALLEL_API_KEY=bench \
      "$pc" enrich run --source-type csv --source "$csv" --target "$out" --processor core \
      --source-columns "$source_columns" --enriched-columns "$enriched_columns"
  fi
  local cpu
  cpu=$(server_cpu)
  stop_server
  read -r wall rss rc <"$work/$name.m"
  if [[ $rc != 0 ]]; then
    echo "$tool failed (exit $rc) on $n rows; its output:" >&2
    tail -n 20 "$work/$name.log" >&2
    exit 1
  fi
  # Both outputs must hold every row, each with all five enriched columns filled; the
  # floor's time is the API's part only (building the bodies is left out).
  if [[ $tool == floor ]]; then
    wall=$(awk '/^floor_seconds/ { print $2 }' "$work/$name.log")
    rows=$n filled=$n
  elif [[ $tool == groupflow ]]; then
    env BENCH_COUNT_INPUT="$out" BENCH_COUNT_OUTPUT="$work/$name.count.csv" \
      "$gf" run --progress quiet --state-dir "$work/$name.state" "$root/benches/vs_parallel_cli/count.yaml" >/dev/null
    IFS=, read -r rows filled < <(tail -n 1 "$work/$name.count.csv")
    rm -f "$out"
  else
    read -r rows filled < <("$python" - "$out" <<'PY'
import csv, sys
rows = filled = 0
cols = ("ceo_name", "founded_year", "headquarters", "employee_count", "key_insights")
with open(sys.argv[1], newline="") as f:
    for row in csv.DictReader(f):
        rows += 1
        filled += all(row.get(c) for c in cols)
print(rows, filled)
PY
)
    rm -f "$out"
  fi
  if [[ $rows != "$n" || $filled != "$n" ]]; then
    echo "$tool on $n rows: $rows rows out, $filled with every enriched column (want $n)" >&2
    exit 1
  fi
  rm -rf "$work/$name.state" "$work/$name.server.db"*
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$tool" "$n" "$wall" "$rss" "$cpu" >>"$results"
  printf '  %-8s %-13s %8d rows  run %d: %7.2f s  %7.1f MiB  (server %.1f CPU s)\n' \
    "$case" "$tool" "$n" "$rep" "$wall" "$(echo "$rss / 1024" | bc -l)" "$cpu" >&2
}

# --- the cases ------------------------------------------------------------------------
echo "groupflow vs parallel-cli: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)," \
  "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; medians of $repeats run(s)" >&2
IFS=, read -ra cases_list <<<"$cases"
for c in "${cases_list[@]}"; do
  case $c in
    cpu)
      IFS=, read -ra ns <<<"$cpu_rows"
      for n in "${ns[@]}"; do
        for ((r = 1; r <= repeats; r++)); do
          run_one cpu groupflow "$n" "$r" --concurrency "$concurrency"
          if ((n <= pc_max_rows)); then run_one cpu parallel-cli "$n" "$r" --concurrency "$concurrency"; fi
          run_one cpu floor "$n" "$r" --concurrency "$concurrency"
        done
      done ;;
    latency)
      IFS=, read -ra ns <<<"$latency_rows"
      for n in "${ns[@]}"; do
        for ((r = 1; r <= repeats; r++)); do
          run_one latency groupflow "$n" "$r" --concurrency "$concurrency" --sim-latency-ms "$latency_ms"
          if ((n <= pc_max_rows)); then
            run_one latency parallel-cli "$n" "$r" --concurrency "$concurrency" --sim-latency-ms "$latency_ms"
          fi
        done
      done ;;
    scale)
      IFS=, read -ra ns <<<"$scale_rows"
      for n in "${ns[@]}"; do
        for ((r = 1; r <= repeats; r++)); do
          run_one scale groupflow "$n" "$r" --concurrency "$concurrency"
        done
      done ;;
    *) echo "unknown case $c (cpu, latency, scale)" >&2; exit 2 ;;
  esac
done

# --- the table ------------------------------------------------------------------------
"$python" - "$results" "$latency_ms" "$concurrency" <<'PY'
import statistics, sys
from collections import defaultdict

path, latency_ms, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
lo, _, hi = latency_ms.partition("..")
mean_latency = (float(lo) + float(hi or lo)) / 2 / 1000
runs = defaultdict(list)
for line in open(path):
    case, tool, n, wall, rss, cpu = line.split("\t")
    runs[case, tool, int(n)].append((float(wall), float(rss) / 1024, float(cpu)))
med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in runs.items()}

print(f"\n{'case':<8} {'rows':>9} {'tool':<13} {'wall s':>8} {'peak RSS MiB':>13} {'server CPU s':>13} {'runs':>5}")
for (case, tool, n), (wall, rss, cpu) in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
    print(f"{case:<8} {n:>9} {tool:<13} {wall:>8.2f} {rss:>13.1f} {cpu:>13.1f} {len(runs[case, tool, n]):>5}")

print()
for (case, tool, n), (wall, rss, _) in sorted(med.items()):
    if tool != "groupflow" or (case, "parallel-cli", n) not in med:
        continue
    pwall, prss, _ = med[case, "parallel-cli", n]
    print(f"{case} {n} rows: wall {wall:.2f} s (groupflow) vs {pwall:.2f} s (parallel-cli): "
          f"parallel-cli / groupflow = {pwall / wall:.2f}x; peak RSS {rss:.1f} vs {prss:.1f} MiB: "
          f"parallel-cli / groupflow = {prss / rss:.2f}x")
for (case, tool, n), (floor, _, _) in sorted(med.items()):
    if tool != "floor":
        continue
    line = f"{case} {n} rows: the server alone (floor.py) takes {floor:.2f} s"
    if (case, "groupflow", n) in med:
        line += f"; groupflow {med[case, 'groupflow', n][0] / floor:.2f}x of it"
    if (case, "parallel-cli", n) in med:
        pwall = med[case, "parallel-cli", n][0]
        line += f"; parallel-cli {pwall / floor:.2f}x of it, so no client can be more than {pwall / floor:.1f}x faster than parallel-cli here"
    print(line)
for (case, tool, n), (wall, _, _) in sorted(med.items()):
    if case != "latency":
        continue
    ideal = n / concurrency * mean_latency
    print(f"latency {n} rows, {tool}: ideal {ideal:.1f} s (rows / {concurrency} x {mean_latency:.1f} s), "
          f"actual {wall:.2f} s, {100 * (wall / ideal - 1):+.1f}% over ideal")
scale = sorted((n, v) for (case, tool, n), v in med.items() if case == "scale")
if len(scale) >= 2:
    (n0, (w0, r0, _)), (n1, (w1, r1, _)) = scale[0], scale[-1]
    print(f"scale {n0} -> {n1} rows ({n1 / n0:.0f}x): peak RSS {r0:.1f} -> {r1:.1f} MiB ({100 * (r1 / r0 - 1):+.1f}%), "
          f"time {w0:.2f} -> {w1:.2f} s ({w1 / w0:.1f}x; {w0 / n0 * 1e6:.1f} -> {w1 / n1 * 1e6:.1f} us/row)")
PY
