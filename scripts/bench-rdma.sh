#!/usr/bin/env bash
# Genie's RDMA transport against perftest, in ONE soft-RoCE session (scripts/softroce.sh: rxe on the host,
# or a qemu VM whose CPU is emulated, so only ratios measured in the same session mean anything).
#
#   scripts/bench-rdma.sh
#
# Runs perftest's ib_write_lat, ib_read_lat, ib_send_lat (8 B) and ib_write_bw (64 KiB, tx depth 128)
# and the same measurements through Genie's transport (benches/src/bin/rdma-perf.rs: write latency by
# perftest's ping-pong method, read latency and bandwidth through genie_transport::perf), in both
# completion modes (blocking = completion channel, busy = busy polling). Latencies are t_typical
# (median); bandwidths are converted to MB/s = 10^6 B/s (perftest reports MiB/s).
# The last line is:
#   rdma write_lat_ratio_vs_perftest=<x> read_lat_ratio_vs_perftest=<y> write_bw_ratio_vs_perftest=<z>
# with Genie's better mode per figure (ratios: Genie / perftest; targets: latency <= 1.10, bandwidth >= 0.95).
#
# Environment: GENIE_BENCH_ITERS (latency iterations, default 2000), GENIE_BENCH_BW_ITERS (default 2000),
# CARGO_TARGET_DIR, GENIE_SOFTROCE_*.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_rdma_deps

ITERS="${GENIE_BENCH_ITERS:-2000}"
BW_ITERS="${GENIE_BENCH_BW_ITERS:-2000}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"

echo "==> building rdma-perf (release, --features rdma)"
cargo build --release -p genie-benches --features rdma --bin rdma-perf
BIN="$TARGET/release/rdma-perf"

OUT="$TARGET/bench-rdma/run.$$"
rm -rf "$OUT"
mkdir -p "$OUT"
trap 'rm -rf "$OUT"' EXIT

# The guest part: every tool's client output goes to a file in $OUT (shared with the host).
guest='set -u
out=$1 bin=$2 iters=$3 bw_iters=$4
dev=$GENIE_RDMA_DEVICE
pt() { # name tool args...: server in the background, client against 127.0.0.1
  # On a loaded machine the server may not listen yet after 1 s: then the client cannot connect
  # and the server would wait forever, so stop it and try again (a few times).
  name=$1; shift
  for try in 1 2 3 4 5; do
    "$@" -d "$dev" -x 1 >/dev/null 2>&1 &
    srv=$!
    sleep 1
    if "$@" -d "$dev" -x 1 127.0.0.1 >"$out/$name" 2>&1; then
      wait $srv || true
      return
    fi
    kill $srv 2>/dev/null || true
    wait $srv 2>/dev/null || true
    grep -q "connect to 127.0.0.1" "$out/$name" || break
    echo "(client could not connect, try $try)" >&2
  done
  echo "FAILED" >>"$out/$name"
}
pt perftest_write_lat ib_write_lat -s 8 -n "$iters"
pt perftest_read_lat ib_read_lat -s 8 -n "$iters"
pt perftest_send_lat ib_send_lat -s 8 -n "$iters"
pt perftest_write_bw ib_write_bw -s 65536 -n "$bw_iters" -t 128
for mode in blocking busy; do
  "$bin" write_lat --size 8 --iters "$iters" --mode $mode >"$out/genie_write_lat_$mode" 2>&1 || echo FAILED >>"$out/genie_write_lat_$mode"
  "$bin" read_lat --size 8 --iters "$iters" --mode $mode >"$out/genie_read_lat_$mode" 2>&1 || echo FAILED >>"$out/genie_read_lat_$mode"
  "$bin" write_bw --size 65536 --iters "$bw_iters" --window 128 --mode $mode >"$out/genie_write_bw_$mode" 2>&1 || echo FAILED >>"$out/genie_write_bw_$mode"
done
echo done'

echo "==> measuring on soft-RoCE (perftest, then Genie in both modes)"
GENIE_SOFTROCE_MEM="${GENIE_SOFTROCE_MEM:-3072}" scripts/softroce.sh -- bash -c "$guest" guest "$OUT" "$BIN" "$ITERS" "$BW_ITERS"

fail() { echo "error: $*" >&2; exit 1; }
show() { echo "---- $1"; cat "$OUT/$1"; }
for f in perftest_write_lat perftest_read_lat perftest_send_lat perftest_write_bw \
  genie_write_lat_blocking genie_read_lat_blocking genie_write_bw_blocking \
  genie_write_lat_busy genie_read_lat_busy genie_write_bw_busy; do
  [ -s "$OUT/$f" ] || fail "no output from $f"
  if grep -q FAILED "$OUT/$f"; then show "$f" >&2; fail "$f failed"; fi
done

# perftest result rows start with the message size; latency t_typical is column 5, bw average column 4.
perftest_col() { awk -v s="$2" -v c="$3" '$1 == s && $2 ~ /^[0-9]+$/ { v = $c } END { if (v == "") exit 1; print v }' "$OUT/$1"; }
genie_val() { sed -n "s/^RESULT .* $2=\\([0-9.]*\\)$/\\1/p" "$OUT/$1" | tail -1; }

p_wlat=$(perftest_col perftest_write_lat 8 5) || fail "cannot parse ib_write_lat"
p_rlat=$(perftest_col perftest_read_lat 8 5) || fail "cannot parse ib_read_lat"
p_slat=$(perftest_col perftest_send_lat 8 5) || fail "cannot parse ib_send_lat"
p_bw_mib=$(perftest_col perftest_write_bw 65536 4) || fail "cannot parse ib_write_bw"
p_bw=$(awk -v x="$p_bw_mib" 'BEGIN { printf "%.2f", x * 1.048576 }')

declare -A g
for mode in blocking busy; do
  g[wlat_$mode]=$(genie_val "genie_write_lat_$mode" typical_us)
  g[rlat_$mode]=$(genie_val "genie_read_lat_$mode" typical_us)
  g[bw_$mode]=$(genie_val "genie_write_bw_$mode" bw_mb_s)
  for k in wlat rlat bw; do [ -n "${g[${k}_$mode]}" ] || fail "no $k result for mode $mode"; done
done

echo
for f in perftest_write_lat perftest_read_lat perftest_send_lat perftest_write_bw; do show "$f" | grep -E '^----|#bytes|^ *[0-9]+ +[0-9]+ ' ; done
for mode in blocking busy; do
  for k in write_lat read_lat write_bw; do show "genie_${k}_$mode" | grep -vE '^(# genie perf server|$)'; done
done

echo
printf '%-34s %12s %12s %12s\n' "8 B latency typical [us] / BW" "perftest" "genie-block" "genie-busy"
printf '%-34s %12s %12s %12s\n' "write_lat (one-way, ping-pong)" "$p_wlat" "${g[wlat_blocking]}" "${g[wlat_busy]}"
printf '%-34s %12s %12s %12s\n' "read_lat (post to completion)" "$p_rlat" "${g[rlat_blocking]}" "${g[rlat_busy]}"
printf '%-34s %12s %12s %12s\n' "send_lat (perftest only)" "$p_slat" "-" "-"
printf '%-34s %12s %12s %12s\n' "write_bw 64 KiB [MB/s = 1e6 B/s]" "$p_bw" "${g[bw_blocking]}" "${g[bw_busy]}"

ratios=$(awk -v pw="$p_wlat" -v pr="$p_rlat" -v pb="$p_bw" \
  -v wb="${g[wlat_blocking]}" -v wu="${g[wlat_busy]}" -v rb="${g[rlat_blocking]}" -v ru="${g[rlat_busy]}" \
  -v bb="${g[bw_blocking]}" -v bu="${g[bw_busy]}" 'BEGIN {
    w = (wb < wu ? wb : wu); r = (rb < ru ? rb : ru); b = (bb > bu ? bb : bu);
    printf "rdma write_lat_ratio_vs_perftest=%.3f read_lat_ratio_vs_perftest=%.3f write_bw_ratio_vs_perftest=%.3f", w / pw, r / pr, b / pb }')
echo
echo "$ratios"
