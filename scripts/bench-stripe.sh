#!/usr/bin/env bash
# Striping benchmark: one connection over several RDMA queue pairs and NICs, and over two TCP streams.
#
#   scripts/bench-stripe.sh
#
# RDMA, in ONE soft-RoCE session (scripts/softroce.sh: a qemu VM where the host has no rdma_rxe):
#   two_nic: where a single link is the bottleneck. Two veth pairs (gsa0-gsa1, gsb0-gsb1), an rxe
#            device on each end (rxegsa0 ... rxegsb1), each pair limited by `tbf` to the same rate
#            (GENIE_STRIPE_RATE, default 40mbit) on the sending side. genie-perf moves one 64 MiB
#            write at a time from a client on rxegsa0 to a server on rxegsa1 (one QP: one link), then
#            with --qps 2 --devices rxegsb0 / rxegsb1 (the second QP on the second link).
#            two_nic_ratio = MB/s over both links / MB/s over one (goal >= 1.8).
#            Both ends sit in one network namespace: rxe routes by the device it sends on (the
#            route lookup names its netdev), so with accept_local the packets cross the veths and
#            their tbf instead of short-cutting through lo.
#   two_qp:  2 QPs against 1 over ONE unlimited device (rxe0 on lo): 64 MiB writes, GENIE_STRIPE_ROUNDS
#            (default 3) interleaved rounds, median of the per-round ratios. On soft-RoCE both QPs
#            share one emulated CPU path, so this shows the cost of striping more than a gain.
# TCP: scripts/bench-tcp.sh as it is (64 KiB x 32 in flight against iperf3, one and two streams);
#   tcp_64k_ratio_vs_iperf3 is its two-stream figure (its one-stream figure is printed beside it).
#
# Every transfer and run is bounded in time (timeout); traffic stays on loopback or inside the VM.
# The last line is:
#   stripe two_nic_ratio=<r> two_qp_ratio=<q> tcp_64k_ratio_vs_iperf3=<t>
#
# Environment: GENIE_STRIPE_RATE (tbf rate, default 40mbit), GENIE_STRIPE_ROUNDS (default 3),
# GENIE_STRIPE_SKIP_TCP=1 (leave the TCP part out: t=skipped), CARGO_TARGET_DIR, GENIE_SOFTROCE_*.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
ensure_rdma_deps

TARGET_DIR=${CARGO_TARGET_DIR:-target}
RATE=${GENIE_STRIPE_RATE:-40mbit}
ROUNDS=${GENIE_STRIPE_ROUNDS:-3}

echo "==> building genie-perf (release, --features rdma)"
cargo build --release -q -p genie-benches --features rdma --bin genie-perf
PERF="$(cd "$TARGET_DIR" && pwd)/release/genie-perf"

out="$(mktemp "${TMPDIR:-/tmp}/genie-stripe.XXXXXX")"
trap 'rm -f "$out"' EXIT

# The guest part: prints lines "RESULT two_nic <one> <two>" and "RESULT two_qp <q1> <q2>" (MB/s).
guest='set -u
PERF=$1 RATE=$2 ROUNDS=$3
log() { echo "stripe: $*"; }
# One run of genie-perf: a server and a client, one 64 MiB write at a time; prints the MB/s of
# its bandwidth phase (one transfer). $1: the server port; the rest: shared flags, then "--" and
# server flags, then "--" and client flags.
pair_run() {
  local port=$1; shift
  local shared=() srv=() cli=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do shared+=("$1"); shift; done; shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do srv+=("$1"); shift; done; shift
  cli=("$@")
  timeout 120 "$PERF" --backend rdma --server --listen "127.0.0.1:$port" --sizes 67108864 "${shared[@]}" "${srv[@]}" >/dev/null 2>&1 &
  local spid=$! res=""
  for _ in $(seq 100); do
    res=$(timeout 100 "$PERF" --backend rdma --client "127.0.0.1:$port" --test write --sizes 67108864 -n 1 --window 1 "${shared[@]}" "${cli[@]}" 2>&1) && break
    res=""
    sleep 0.1
  done
  kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
  echo "$res" | awk "\$1 == 67108864 { v = \$7 } END { print v }"
}

log "2 QPs vs 1 on one unlimited device ($GENIE_RDMA_DEVICE on lo), 64 MiB writes, $ROUNDS rounds"
qp_run() { # qp_run QPS -> MB/s of 64 MiB writes, 2 in flight, both endpoints in one process
  local o
  o=$(timeout 90 "$PERF" --backend rdma -d "$GENIE_RDMA_DEVICE" --test write --sizes 67108864 -n 4 --window 2 --qps "$1" 2>&1)
  echo "$o" | awk "\$1 == 67108864 { v = \$7 } END { print v }" | grep . || { echo "$o" | grep -v "^ *[0-9]*: \|^ *at " | tail -6 >&2; echo 0; }
}
for r in $(seq 1 "$ROUNDS"); do
  q1=$(qp_run 1)
  q2=$(qp_run 2)
  log "round $r: 1 QP $q1 MB/s, 2 QPs $q2 MB/s"
  echo "RESULT two_qp $q1 $q2"
done

log "two links of $RATE each (veth + tbf), rxe on each end"
sysctl -qw net.ipv4.conf.all.accept_local=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 >/dev/null
n=10
for l in a b; do
  ip link add gs${l}0 type veth peer name gs${l}1
  for e in 0 1; do
    sysctl -qw net.ipv4.conf.gs${l}${e}.accept_local=1 net.ipv4.conf.gs${l}${e}.rp_filter=0 >/dev/null
    ip addr add 10.213.$n.$((e + 1))/24 dev gs${l}${e}
    ip link set gs${l}${e} up
    rdma link add rxegs${l}${e} type rxe netdev gs${l}${e}
    # Each direction of a link has its own rate limit (data one way, acknowledgements back).
    tc qdisc add dev gs${l}${e} root tbf rate "$RATE" burst 32kb latency 400ms
  done
  n=$((n + 1))
done
sleep 1
rdma link show | grep rxegs
one=$(pair_run 18515 -- -d rxegsa1 -- -d rxegsa0)
log "one link (1 QP): ${one:-none} MB/s"
two=$(pair_run 18516 --qps 2 -- -d rxegsa1 --devices rxegsb1 -- -d rxegsa0 --devices rxegsb0)
log "two links (2 QPs, one per NIC): ${two:-none} MB/s"
echo "RESULT two_nic ${one:-0} ${two:-0}"'

echo "==> RDMA on soft-RoCE (two tbf-limited links at $RATE; 2 QPs on one device)"
GENIE_SOFTROCE_MEM="${GENIE_SOFTROCE_MEM:-3072}" GENIE_SOFTROCE_TIMEOUT="${GENIE_SOFTROCE_TIMEOUT:-900}" \
  scripts/softroce.sh -- bash -c "$guest" guest "$PERF" "$RATE" "$ROUNDS" | tee "$out"

# Serial-console lines may carry \r; take the numbers only.
two_nic=$(tr -d '\r' <"$out" | awk '$1 == "RESULT" && $2 == "two_nic" && $3 > 0 && $4 > 0 { printf "%.2f", $4 / $3 }')
two_qp=$(tr -d '\r' <"$out" | awk '$1 == "RESULT" && $2 == "two_qp" && $3 > 0 && $4 > 0 { print $4 / $3 }' |
  sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
two_nic=${two_nic:-failed}
two_qp=${two_qp:-failed}

tcp="skipped"
if [ "${GENIE_STRIPE_SKIP_TCP:-0}" != 1 ]; then
  echo "==> TCP: scripts/bench-tcp.sh (64 KiB x 32 in flight vs iperf3)"
  tcp_out="$(mktemp "${TMPDIR:-/tmp}/genie-stripe-tcp.XXXXXX")"
  GENIE_BENCH_ROUNDS="${GENIE_BENCH_ROUNDS:-3}" scripts/bench-tcp.sh | tee "$tcp_out"
  tcp_line=$(tail -1 "$tcp_out")
  rm -f "$tcp_out"
  one_stream=$(echo "$tcp_line" | sed -n 's/.*write_64k_ratio_vs_iperf3=\([0-9.]*\).*/\1/p')
  tcp=$(echo "$tcp_line" | sed -n 's/.*write_64k_2streams_ratio_vs_iperf3=\([0-9.]*\).*/\1/p')
  echo "tcp 64 KiB x 32: one stream ${one_stream:-?}, two streams ${tcp:-?} (vs iperf3, median per-round ratio)"
  tcp=${tcp:-failed}
fi
echo "stripe two_nic_ratio=$two_nic two_qp_ratio=$two_qp tcp_64k_ratio_vs_iperf3=$tcp"
