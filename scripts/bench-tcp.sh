#!/usr/bin/env bash
# TCP transport benchmark against baselines measured in the same run, on loopback.
#
#   write bandwidth at 1 MiB messages: genie-perf (16 in flight) vs iperf3, one stream, 1 MiB writes
#   write latency at 64 B: genie-perf write round trip (post -> completion) vs qperf tcp_lat x 2
#                          (qperf reports one-way latency = half its ping-pong round trip)
#
#   64 KiB writes, 32 in flight, two processes (genie-perf --server / --client), with one TCP
#                          stream and with --streams 2, vs iperf3 one stream, 64 KiB writes:
#                          GENIE_BENCH_ROUNDS (default 5) interleaved rounds, median per-round ratio
#
# Both poll modes of genie are measured and printed at 1 MiB; the last line uses the default
# (blocking) mode:
#   tcp write_bw_ratio_vs_iperf3=<x> write_lat_ratio_vs_qperf=<y> write_64k_ratio_vs_iperf3=<s1> write_64k_2streams_ratio_vs_iperf3=<s2>
# Installs iperf3 and qperf (Debian packages) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_pkgs iperf3 qperf

ITER=${GENIE_BENCH_ITERATIONS:-3000}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p genie-benches --bin genie-perf
PERF="$TARGET_DIR/release/genie-perf"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

port() { # a free TCP port on loopback
  local p
  for p in $(seq 20000 20100); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no free port" >&2; exit 1
}

echo "== iperf3: one stream, 1 MiB writes, 5 s"
IPORT=$(port)
iperf3 -s -p "$IPORT" >/dev/null 2>&1 & pids+=($!)
# Retry until the server listens (probing with a connection would disturb iperf3).
iperf_out=""
for _ in $(seq 50); do
  iperf_out=$(iperf3 -c 127.0.0.1 -p "$IPORT" -l 1M -t 5 -f m 2>/dev/null) && break
  sleep 0.1
done
echo "$iperf_out" | tail -4
iperf_mbits=$(echo "$iperf_out" | awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }')
iperf_mb_s=$(awk -v m="$iperf_mbits" 'BEGIN { printf "%.1f", m / 8 }')
echo "iperf3 single stream: ${iperf_mb_s} MB/s"

echo "== qperf tcp_lat, 64 B"
qperf >/dev/null 2>&1 & pids+=($!)
qperf_out=""
for _ in $(seq 50); do
  qperf_out=$(qperf 127.0.0.1 -m 64 -t 5 tcp_lat 2>/dev/null) && [ -n "$qperf_out" ] && break
  sleep 0.1
done
echo "$qperf_out"
qperf_us=$(echo "$qperf_out" | awk '/latency/ { v = $3; u = $4 } END {
  if (u == "ns") v /= 1000; else if (u == "ms") v *= 1000; else if (u == "sec") v *= 1e6; print v }')
echo "qperf tcp_lat one-way: ${qperf_us} us (round trip ${qperf_us} x 2)"

genie() { # genie() MODE_FLAG -> prints the table, sets lat_us and bw_mb_s
  local out
  out=$("$PERF" --test write --sizes 64,1048576 -n "$ITER" "$@")
  echo "$out"
  lat_us=$(echo "$out" | awk '$1 == 64 { print $4 }')
  bw_mb_s=$(echo "$out" | awk '$1 == 1048576 { print $7 }')
}

ratios() {
  awk -v bw="$bw_mb_s" -v ib="$iperf_mb_s" -v lat="$lat_us" -v q="$qperf_us" \
    'BEGIN { printf "write_bw_ratio_vs_iperf3=%.2f write_lat_ratio_vs_qperf=%.2f", bw / ib, lat / (2 * q) }'
}

echo "== genie-perf, busy-poll mode"
genie --busy-poll
busy=$(ratios)
echo "== genie-perf, blocking mode (default)"
genie
blocking=$(ratios)

# 64 KiB x 32 in flight, interleaved rounds: iperf3, genie one stream, genie two streams. A round's
# ratios compare runs seconds apart; the median of them is the figure (the machine is noisy).
ROUNDS=${GENIE_BENCH_ROUNDS:-5}
ITER64=${GENIE_BENCH_ITERATIONS_64K:-60000}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
genie64() { # genie64 STREAMS -> prints MB/s of 64 KiB writes, 32 in flight, two processes
  local gport out
  gport=$(port)
  "$PERF" --server --listen "127.0.0.1:$gport" --sizes 65536 --window 32 --streams "$1" >/dev/null 2>&1 &
  local spid=$!
  for _ in $(seq 50); do
    out=$("$PERF" --client "127.0.0.1:$gport" --test write --sizes 65536 --window 32 -n "$ITER64" --streams "$1" 2>/dev/null) && break
    sleep 0.1
  done
  kill "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  echo "$out" | awk '$1 == 65536 { v = $7 } END { print v }'
}
echo "== 64 KiB writes, 32 in flight: iperf3 (-l 64K, 3 s) vs genie-perf 1 and 2 streams, $ROUNDS rounds"
printf '%-5s %12s %12s %12s %8s %8s\n' round iperf3_MB/s genie1_MB/s genie2_MB/s ratio1 ratio2
r64=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
  i_out=$(iperf3 -c 127.0.0.1 -p "$IPORT" -l 64K -t 3 -f m 2>/dev/null) || { echo "iperf3 failed" >&2; exit 1; }
  i_mb=$(echo "$i_out" | awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { printf "%.1f", v / 8 }')
  g1=$(genie64 1)
  g2=$(genie64 2)
  [ -n "$g1" ] && [ -n "$g2" ] || { echo "no genie-perf result in round $r" >&2; exit 1; }
  awk -v r="$r" -v i="$i_mb" -v a="$g1" -v b="$g2" -v f="$r64" 'BEGIN {
    printf "%-5s %12.1f %12.1f %12.1f %8.3f %8.3f\n", r, i, a, b, a / i, b / i
    printf "%.4f %.4f\n", a / i, b / i >> f }'
done
m1=$(awk '{ print $1 }' "$r64" | median)
m2=$(awk '{ print $2 }' "$r64" | median)
rm -f "$r64"
printf '64 KiB x 32 in flight, median per-round ratio vs iperf3: one stream %.3f, two streams %.3f (%s cores)\n' "$m1" "$m2" "$(nproc)"

echo "tcp(busy_poll) $busy"
echo "tcp $blocking write_64k_ratio_vs_iperf3=$m1 write_64k_2streams_ratio_vs_iperf3=$m2"
