#!/usr/bin/env bash
# Hostile drivers, accept starvation and healing against real `genie worker` processes
# (issue 15). Loopback only; every case is bounded in count and time.
#
# Runs runtime/examples/hostile.rs, which:
#   - sends an authenticated worker (under `prlimit --as`) requests no honest driver sends:
#     a huge parameter, a KV cache of layer u32::MAX, shape products that overflow, checkpoints
#     that are /dev/zero, a FIFO or outside the model directory, a placement on worker
#     usize::MAX, inputs of the wrong shape, a 3-million-input Concat; each must be refused
#     with a typed Failed reply within 5 s and the worker must go on serving;
#   - opens 50 idle or dripping sockets and 100 connections that never say hello on a worker's
#     port; a real driver must still be served within 5 s;
#   - SIGKILLs (then restarts) and SIGSTOPs (then resumes) a worker of three: the run in flight
#     fails naming it within the peer timeout + 1 s, the next generation succeeds.
#   - a transport flood (tests/src/bin/genie-flood.rs): a peer sends 64 KiB messages, notifying
#     writes and reads for GENIE_FLOOD_SECS (default 60) to an endpoint that never takes
#     anything; the target's peak RSS must stay under FLOOD_RSS_MB (the flooder is held by
#     back-pressure: max_inbound_queue / max_inbound_bytes) and the target must stay up.
# More runtime cases belong in runtime/tests/hostile_cases/mod.rs and the example's list; the
# summary counts them.
#
# The last line printed is the summary:
#   hostile cases=<n> refused_typed=<n> crashed=<n> hung=<n> max_rss_mb=<x> heal_ok=<1|0>
# and the script fails unless cases == refused_typed, crashed=0, hung=0, heal_ok=1.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p genie-runtime --bin genie --example hostile
cargo build --release -p genie-tests --bin genie-flood
target_dir="${CARGO_TARGET_DIR:-target}"
out="$(mktemp)"
flood_out="$(mktemp)"
target_pid=""
cleanup() {
  [ -n "$target_pid" ] && kill "$target_pid" 2>/dev/null || true
  rm -f "$out" "$flood_out"
}
trap cleanup EXIT

# The runtime cases; their summary line is the example's last line.
status=0
timeout 600 "$target_dir/release/examples/hostile" "$target_dir/release/genie" | tee "$out" || status=$?
summary="$(tail -n 1 "$out")"
if [ "$status" -ne 0 ] || ! echo "$summary" | grep -q '^hostile cases='; then
  echo "error: the runtime cases failed (exit $status)" >&2
  exit 1
fi

# The transport flood: a target that never reads, a flooder held by back-pressure.
FLOOD_SECS="${GENIE_FLOOD_SECS:-60}"
FLOOD_RSS_MB=256
echo "==> flood: ${FLOOD_SECS} s of messages, notifying writes and reads to an endpoint that takes nothing"
"$target_dir/release/genie-flood" target '{"backend":"tcp"}' >"$flood_out" &
target_pid=$!
for _ in $(seq 100); do grep -q '^READY' "$flood_out" && break; sleep 0.1; done
read -r _ flood_addr flood_desc <"$flood_out"
flood_ok=1
flood_hung=0
fstatus=0
timeout $((FLOOD_SECS + 30)) "$target_dir/release/genie-flood" flood "$flood_addr" "$flood_desc" "$FLOOD_SECS" || fstatus=$?
if [ "$fstatus" -ne 0 ]; then
  flood_ok=0
  [ "$fstatus" -eq 124 ] && flood_hung=1
fi
flood_rss_mb=0
if kill -0 "$target_pid" 2>/dev/null; then
  flood_rss_mb=$(awk '/^VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$target_pid/status")
else
  flood_ok=0
fi
echo "flood target peak RSS ${flood_rss_mb} MB (bound ${FLOOD_RSS_MB} MB)"
[ "$flood_rss_mb" -le "$FLOOD_RSS_MB" ] || flood_ok=0
flood_crashed=$((1 - flood_ok - flood_hung))
[ "$flood_crashed" -lt 0 ] && flood_crashed=0

# One summary line over every case.
echo "$summary" | awk -v ok="$flood_ok" -v hung="$flood_hung" -v crashed="$flood_crashed" -v rss="$flood_rss_mb" '{
  for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  cases = v["cases"] + 1; refused = v["refused_typed"] + ok
  c = v["crashed"] + crashed; h = v["hung"] + hung
  m = v["max_rss_mb"] + 0; if (rss + 0 > m) m = rss + 0
  printf "hostile cases=%d refused_typed=%d crashed=%d hung=%d max_rss_mb=%d heal_ok=%s\n", cases, refused, c, h, m, v["heal_ok"]
  exit !(cases == refused && c == 0 && h == 0 && v["heal_ok"] == 1)
}'
