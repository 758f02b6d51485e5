#!/usr/bin/env bash
# The bindings' overhead over Rust, on loopback TCP with busy polling, in one run:
#
#   8 B write, post -> completion (median):  genie-perf (Rust, TSC timestamps) vs
#       bindings/python/benchmarks/perf.py (conn.write(...).wait(), perf_counter_ns) and
#       bindings/c/bench/perf.c (genie_write + genie_op_wait + genie_op_free, CLOCK_MONOTONIC)
#   64 KiB writes, batches of 32, up to 128 in flight (MB/s): the same three.
#   Python also times the same 8 B loop natively in Rust in its own process, in blocks that
#   alternate with its own: their paired difference is printed as the binding's own cost.
#
# Each of the three runs GENIE_BENCH_ROUNDS times (default 5), taking turns so that all see the
# same machine load. On a shared 2-core machine, with two busy-polling progress threads beside
# the measuring one, a round's figures move by tens of percent with the load, so the last line
# compares each tool's best round (lowest latency, highest bandwidth), as bench-rdma.sh does; the
# medians over the rounds are printed above it. Last line:
#   bindings py_write8_overhead_us=<x> py_bw64k_ratio_vs_rust=<y> c_write8_overhead_us=<z>
# (goals: x <= 3, y >= 0.95, z <= 0.5). Creates a venv (GENIE_VENV, default /tmp/genie-venv) and
# installs the Python package into it.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${GENIE_BENCH_ROUNDS:-5}
N_LAT=${GENIE_BENCH_LAT_ITERATIONS:-20000}
N_BW=${GENIE_BENCH_BW_ITERATIONS:-4096}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
VENV=${GENIE_VENV:-/tmp/genie-venv}

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_python_deps
ensure_genie_python "$VENV"

cargo build --release -q -p genie-benches --bin genie-perf
cargo build --release -q -p genie-c
PERF="$TARGET_DIR/release/genie-perf"
CPERF=$(mktemp /tmp/genie-c-perf.XXXXXX)
trap 'rm -f "$CPERF"' EXIT
cc -O2 -Wall -Wextra -I bindings/c/include bindings/c/bench/perf.c \
  "$TARGET_DIR/release/libgenie.a" -lpthread -ldl -lm -o "$CPERF"

field() { # field NAME LINE -> the value of NAME=<v> in LINE
  echo "$2" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

rust_lat=() rust_bw=() py_lat=() py_bw=() py_paired=() c_lat=() c_bw=()
for r in $(seq "$ROUNDS"); do
  echo "== round $r of $ROUNDS"
  lat_table=$("$PERF" --test write --sizes 8 --window 128 --busy-poll -n "$N_LAT")
  bw_table=$("$PERF" --test write --sizes 65536 --window 128 --busy-poll -n "$N_BW")
  rust_lat+=("$(echo "$lat_table" | awk '$1 == 8 { print $4 }')")
  rust_bw+=("$(echo "$bw_table" | awk '$1 == 65536 { print $7 }')")
  echo "rust write8_median_us=${rust_lat[-1]} bw64k_mb_s=${rust_bw[-1]}"
  line=$("$VENV/bin/python" bindings/python/benchmarks/perf.py "$N_LAT" "$N_BW")
  echo "$line"
  py_lat+=("$(field write8_median_us "$line")") py_bw+=("$(field bw64k_mb_s "$line")")
  py_paired+=("$(field paired_overhead_us "$line")")
  line=$("$CPERF" "$N_LAT" "$N_BW")
  echo "$line"
  c_lat+=("$(field write8_median_us "$line")") c_bw+=("$(field bw64k_mb_s "$line")")
done

m() { printf '%s\n' "$@" | median; }
lo() { printf '%s\n' "$@" | sort -g | head -1; }
hi() { printf '%s\n' "$@" | sort -g | tail -1; }
echo
echo "over $ROUNDS rounds (loopback TCP, busy polling; write8 in us, bw64k in MB/s):"
printf '  %-7s write8 median %8s best %8s   bw64k median %8s best %8s\n' \
  rust "$(m "${rust_lat[@]}")" "$(lo "${rust_lat[@]}")" "$(m "${rust_bw[@]}")" "$(hi "${rust_bw[@]}")" \
  python "$(m "${py_lat[@]}")" "$(lo "${py_lat[@]}")" "$(m "${py_bw[@]}")" "$(hi "${py_bw[@]}")" \
  c "$(m "${c_lat[@]}")" "$(lo "${c_lat[@]}")" "$(m "${c_bw[@]}")" "$(hi "${c_bw[@]}")"
echo "python's own cost, paired with the same loop in Rust in the same process (alternating blocks):"
echo "  py_write8_paired_overhead_us median $(m "${py_paired[@]}") over $ROUNDS rounds"
RL=$(lo "${rust_lat[@]}") RB=$(hi "${rust_bw[@]}") PL=$(lo "${py_lat[@]}") PB=$(hi "${py_bw[@]}")
CL=$(lo "${c_lat[@]}")
awk -v rl="$RL" -v rb="$RB" -v pl="$PL" -v pb="$PB" -v cl="$CL" 'BEGIN {
  printf "bindings py_write8_overhead_us=%.2f py_bw64k_ratio_vs_rust=%.3f c_write8_overhead_us=%.2f\n",
    pl - rl, pb / rb, cl - rl }'
