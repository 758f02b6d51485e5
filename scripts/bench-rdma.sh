#!/usr/bin/env bash
# Genie's RDMA transport against perftest, in ONE soft-RoCE session (scripts/softroce.sh: rxe on the host,
# or a qemu VM whose CPU is emulated, so only ratios measured in the same session mean anything).
#
#   scripts/bench-rdma.sh
#
# Runs perftest's ib_write_lat, ib_read_lat, ib_send_lat (8 B) and ib_write_bw (64 KiB, tx depth 128)
# and the same measurements through Genie's transport (benches/src/bin/rdma-perf.rs: write latency by
# perftest's ping-pong method, read latency and bandwidth through genie_benches::perf), in both
# completion modes (blocking = completion channel, busy = busy polling). Latencies are t_typical
# (median); bandwidths are converted to MB/s = 10^6 B/s (perftest reports MiB/s).
# The last line is:
#   rdma write_lat_ratio_vs_perftest=<x> read_lat_ratio_vs_perftest=<y> write_bw_ratio_vs_perftest=<z>
# with Genie's better mode per figure (ratios: Genie / perftest; targets: latency <= 1.10, bandwidth >= 0.95).
#
# The soft-RoCE VM's CPUs are emulated and share the host with whatever else runs there. Each
# process, perftest's as much as Genie's, lands in one of two modes that it keeps for its whole run:
# a fast one whose latency repeats to within a few percent (ib_write_lat 18.2-18.7 us in one VM)
# and a slow one that wanders over 2-3x (30-57 us), whichever binary runs. Which mode a run gets is
# chance (pinning processes or qemu's vCPU threads does not change it), so a ratio of two runs mixes
# the two tools' cost with two coin flips. The script therefore runs ROUNDS interleaved rounds
# (each: perftest, then Genie in both modes, for every figure) and compares each tool's BEST round:
# latency ratio = (Genie's lowest t_typical over rounds) / (perftest's lowest), bandwidth ratio =
# highest / highest. With 16 rounds, both tools reach the fast mode in most sessions (with 11, on a
# slow host day, perftest's own write had no fast round in one session of 2026-11-30). The
# per-round table and the median of per-round ratios (the coin flips included) are printed above
# the last line. On a busy machine, run it under real-time priority (chrt -r 10
# scripts/bench-rdma.sh) or on a quiet one.
#
# Environment: GENIE_BENCH_ROUNDS (default 16), GENIE_BENCH_ITERS (latency iterations per run,
# default 1000), GENIE_BENCH_BW_ITERS (default 2000), CARGO_TARGET_DIR, GENIE_SOFTROCE_*.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_rdma_deps

ROUNDS="${GENIE_BENCH_ROUNDS:-16}"
ITERS="${GENIE_BENCH_ITERS:-1000}"
BW_ITERS="${GENIE_BENCH_BW_ITERS:-2000}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
case "$ROUNDS$ITERS$BW_ITERS" in *[!0-9]*) echo "error: GENIE_BENCH_* must be numbers" >&2; exit 2 ;; esac
[ "$ROUNDS" -ge 1 ] || { echo "error: GENIE_BENCH_ROUNDS must be at least 1" >&2; exit 2; }

echo "==> building rdma-perf (release, --features rdma)"
cargo build --release -p genie-benches --features rdma --bin rdma-perf --bin rdma-floor
BIN="$TARGET/release/rdma-perf"
FLOOR="$TARGET/release/rdma-floor"

OUT="$TARGET/bench-rdma/run.$$"
rm -rf "$OUT"
mkdir -p "$OUT"
trap 'rm -rf "$OUT"' EXIT

# The guest part: every tool's client output goes to a file in $OUT (shared with the host).
guest='set -u
out=$1 bin=$2 iters=$3 bw_iters=$4 rounds=$5 floor=$6
dev=$GENIE_RDMA_DEVICE
pt() { # file tool args...: server in the background, client against 127.0.0.1
  # On a loaded machine the server may not listen yet after 1 s: then the client cannot connect
  # and the server would wait forever, so stop it and try again (a few times).
  f=$1; shift
  for try in 1 2 3 4 5; do
    "$@" -d "$dev" -x 1 >/dev/null 2>&1 &
    srv=$!
    sleep 1
    if "$@" -d "$dev" -x 1 127.0.0.1 >"$f" 2>&1; then
      wait $srv || true
      return
    fi
    kill $srv 2>/dev/null || true
    wait $srv 2>/dev/null || true
    grep -q "connect to 127.0.0.1" "$f" || break
    echo "(client could not connect, try $try)" >&2
  done
  echo "FAILED" >>"$f"
}
g() { # file args...
  f=$1; shift
  "$bin" "$@" >"$f" 2>&1 || echo FAILED >>"$f"
}
for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds"
  pt "$out/perftest_write_lat.$r" ib_write_lat -s 8 -n "$iters"
  for mode in blocking busy; do g "$out/genie_write_lat_$mode.$r" write_lat --size 8 --iters "$iters" --mode $mode; done
  pt "$out/perftest_read_lat.$r" ib_read_lat -s 8 -n "$iters"
  for mode in blocking busy; do g "$out/genie_read_lat_$mode.$r" read_lat --size 8 --iters "$iters" --mode $mode; done
  "$floor" --size 8 --iters "$iters" >"$out/floor_read_lat.$r" 2>&1 || echo FAILED >>"$out/floor_read_lat.$r"
  "$floor" --size 8 --iters "$iters" --transport >"$out/floor_transport.$r" 2>&1 || echo FAILED >>"$out/floor_transport.$r"
  "$floor" --size 8 --iters "$iters" --test write >"$out/floor_write.$r" 2>&1 || echo FAILED >>"$out/floor_write.$r"
  pt "$out/perftest_write_bw.$r" ib_write_bw -s 65536 -n "$bw_iters" -t 128
  for mode in blocking busy; do g "$out/genie_write_bw_$mode.$r" write_bw --size 65536 --iters "$bw_iters" --window 128 --mode $mode; done
done
pt "$out/perftest_send_lat.1" ib_send_lat -s 8 -n "$iters"
echo done'

echo "==> measuring on soft-RoCE: $ROUNDS rounds of perftest, then Genie in both modes"
GENIE_SOFTROCE_MEM="${GENIE_SOFTROCE_MEM:-3072}" scripts/softroce.sh -- bash -c "$guest" guest "$OUT" "$BIN" "$ITERS" "$BW_ITERS" "$ROUNDS" "$FLOOR"

fail() { echo "error: $*" >&2; exit 1; }
show() { echo "---- $1"; cat "$OUT/$1"; }
check() {
  [ -s "$OUT/$1" ] || fail "no output from $1"
  if grep -q FAILED "$OUT/$1"; then show "$1" >&2; fail "$1 failed"; fi
}
# perftest result rows start with the message size; latency t_typical is column 5, bw average column 4.
perftest_col() { awk -v s="$2" -v c="$3" '$1 == s && $2 ~ /^[0-9]+$/ { v = $c } END { if (v == "") exit 1; print v }' "$OUT/$1"; }
genie_val() { sed -n "s/^RESULT .* $2=\\([0-9.]*\\).*$/\\1/p" "$OUT/$1" | tail -1; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

check perftest_send_lat.1
p_slat=$(perftest_col perftest_send_lat.1 8 5) || fail "cannot parse ib_send_lat"
echo
echo "8 B latency: typical (median) us, one-way for write (ping-pong RTT/2), post-to-completion for read;"
echo "bandwidth: 64 KiB writes, 128 in flight, MB/s = 10^6 B/s (perftest's MiB/s converted)."
printf '%-5s | %9s %9s %9s %7s | %9s %9s %9s %7s | %9s %9s %9s %7s\n' round \
  pt_wlat g_block g_busy ratio pt_rlat g_block g_busy ratio pt_bw g_block g_busy ratio
: >"$OUT/ratios"
for r in $(seq 1 "$ROUNDS"); do
  for f in perftest_write_lat perftest_read_lat perftest_write_bw \
    genie_write_lat_blocking genie_read_lat_blocking genie_write_bw_blocking \
    genie_write_lat_busy genie_read_lat_busy genie_write_bw_busy; do
    check "$f.$r"
  done
  pw=$(perftest_col "perftest_write_lat.$r" 8 5) || fail "cannot parse ib_write_lat (round $r)"
  pr=$(perftest_col "perftest_read_lat.$r" 8 5) || fail "cannot parse ib_read_lat (round $r)"
  pb_mib=$(perftest_col "perftest_write_bw.$r" 65536 4) || fail "cannot parse ib_write_bw (round $r)"
  pb=$(awk -v x="$pb_mib" 'BEGIN { printf "%.2f", x * 1.048576 }')
  declare -A gv=()
  for mode in blocking busy; do
    gv[wlat_$mode]=$(genie_val "genie_write_lat_$mode.$r" typical_us)
    gv[rlat_$mode]=$(genie_val "genie_read_lat_$mode.$r" typical_us)
    gv[bw_$mode]=$(genie_val "genie_write_bw_$mode.$r" bw_mb_s)
    for k in wlat rlat bw; do [ -n "${gv[${k}_$mode]}" ] || fail "no $k result for mode $mode (round $r)"; done
  done
  awk -v r="$r" -v pw="$pw" -v pr="$pr" -v pb="$pb" \
    -v wb="${gv[wlat_blocking]}" -v wu="${gv[wlat_busy]}" -v rb="${gv[rlat_blocking]}" -v ru="${gv[rlat_busy]}" \
    -v bb="${gv[bw_blocking]}" -v bu="${gv[bw_busy]}" -v ratios="$OUT/ratios" 'BEGIN {
      gw = (wb < wu ? wb : wu); gr = (rb < ru ? rb : ru); gb = (bb > bu ? bb : bu);
      w = gw / pw; rr = gr / pr; b = gb / pb;
      printf "%-5s | %9.2f %9.2f %9.2f %7.3f | %9.2f %9.2f %9.2f %7.3f | %9.2f %9.2f %9.2f %7.3f\n",
        r, pw, wb, wu, w, pr, rb, ru, rr, pb, bb, bu, b
      printf "%.4f %.4f %.4f\n", w, rr, b >> ratios
      printf "%s %s %s %s %s %s\n", pw, gw, pr, gr, pb, gb >> (ratios ".best") }'
done
echo "send_lat (perftest only, round 1): $p_slat us"
# The floors: the read loop and the write ping-pong on genie-sys verbs without the transport layer
# (rdma-floor), in each round; each one's best round against the two tools' best rounds.
floor_best() { # file-prefix key: the lowest value over rounds
  for r in $(seq 1 "$ROUNDS"); do check "$1.$r"; genie_val "$1.$r" "$2"; done | sort -g | head -1
}
floor_line() { # figure what floor perftest genie
  awk -v n="$1" -v w="$2" -v f="$3" -v p="$4" -v g="$5" 'BEGIN {
    printf "%s floor (%s), best round: %.2f us = %.3f x perftest; Genie = %.3f x floor\n", n, w, f, f / p, g / f }'
}
rf=$(floor_best floor_read_lat typical_us)
[ -n "$rf" ] || fail "no rdma-floor result"
wf=$(floor_best floor_write floor_us)
[ -n "$wf" ] || fail "no rdma-floor --test write result"
# The transport layer's own cost: rdma-floor --transport (reads) and --test write (ping-pong)
# interleave raw verbs and Genie's transport in one process, so each round's ratio compares like
# with like. Prints the median over rounds.
in_process() { # file-prefix figure command
  for r in $(seq 1 "$ROUNDS"); do
    check "$1.$r"
    t=$(genie_val "$1.$r" transport_us)
    f=$(genie_val "$1.$r" floor_us)
    [ -n "$t" ] && [ -n "$f" ] || fail "cannot parse $1.$r"
    awk -v t="$t" -v f="$f" 'BEGIN { printf "%.4f\n", t / f }'
  done >"$OUT/$1.ratios"
  m=$(median <"$OUT/$1.ratios") || fail "no $3 result"
  printf '%s through the transport / raw verbs, same process (%s): median %.3f over %s rounds (%s)\n' \
    "$2" "$3" "$m" "$ROUNDS" "$(sort -g "$OUT/$1.ratios" | awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%.3f-%.3f", a, b }')"
}
echo "Genie's better mode per figure; ratio = Genie / perftest of the same round."
mw=$(awk '{ print $1 }' "$OUT/ratios" | median)
mr=$(awk '{ print $2 }' "$OUT/ratios" | median)
mb=$(awk '{ print $3 }' "$OUT/ratios" | median)
printf 'median of per-round ratios (each a pair of coin flips): write_lat %.3f read_lat %.3f write_bw %.3f\n' "$mw" "$mr" "$mb"
# Best round of each tool: the lowest latencies, the highest bandwidths.
read -r bpw bgw bpr bgr bpb bgb < <(awk 'NR == 1 { for (i = 1; i <= 6; i++) v[i] = $i; next }
  { for (i = 1; i <= 4; i++) if ($i < v[i]) v[i] = $i; for (i = 5; i <= 6; i++) if ($i > v[i]) v[i] = $i }
  END { print v[1], v[2], v[3], v[4], v[5], v[6] }' "$OUT/ratios.best")
printf 'best round of each tool: write_lat perftest %.2f us genie %.2f us; read_lat perftest %.2f us genie %.2f us; write_bw perftest %.2f MB/s genie %.2f MB/s\n' \
  "$bpw" "$bgw" "$bpr" "$bgr" "$bpb" "$bgb"
floor_line read_lat "rdma-floor: the loop on genie-sys verbs, no transport layer" "$rf" "$bpr" "$bgr"
floor_line write_lat "rdma-floor --test write: the ping-pong on genie-sys verbs" "$wf" "$bpw" "$bgw"
in_process floor_write write_lat "rdma-floor --test write"
in_process floor_transport read_lat "rdma-floor --transport"
echo
awk -v a="$bpw" -v b="$bgw" -v c="$bpr" -v d="$bgr" -v e="$bpb" -v f="$bgb" 'BEGIN {
  printf "rdma write_lat_ratio_vs_perftest=%.3f read_lat_ratio_vs_perftest=%.3f write_bw_ratio_vs_perftest=%.3f\n", b / a, d / c, f / e }'
