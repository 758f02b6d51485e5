#!/usr/bin/env bash
# A Genie cluster of hosts with their own network stacks, on one machine: N network namespaces
# (default 3), each running one `genie worker`, joined by veth pairs to a bridge on a private
# /24 (10.213.7.0/24; the bridge sits in a namespace of its own, so nothing touches the root
# namespace's network), driven over TCP from one more namespace by
# runtime/examples/cluster_client.rs. The cluster file names a secret file (mode 600), as
# workers off loopback require.
#
#   scripts/netns-cluster.sh [--hosts N] [--no-faults]
#
# Checks, in order, failing on the first that does not hold:
#   1. correct:   2 generations with the layers split across every worker give the tokens and
#                 logits, bitwise, of the same generation on one in-process worker.
#   2. loss:      the same with 1 % of the packets every namespace sends dropped (tc netem;
#                 where the kernel has no sch_netem, an iptables `statistic` rule on the same
#                 interfaces); the drop counters must show drops.
#   3. partition: w1's link goes down for the peer timeout + 2 s while generations run: the run
#                 in flight fails with WorkerFailed naming w1 within the peer timeout + 3 s,
#                 and once the link is back, a new connection's generation matches again.
# The last line is
#   netns-cluster hosts=N backend=tcp result=ok|FAIL ...
# Exits 0 on `result=ok`, 1 otherwise; when this machine cannot create network namespaces (no
# CAP_NET_ADMIN, no root and no passwordless sudo) it says so and exits 0 without a result line.
# Namespaces, veths, the bridge and every process it started are removed on exit.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

HOSTS=3
FAULTS=1
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    --no-faults) FAULTS=0; shift ;;
    *) echo "usage: $0 [--hosts N] [--no-faults]" >&2; exit 2 ;;
  esac
done
if ! [[ "$HOSTS" =~ ^[0-9]+$ ]] || [ "$HOSTS" -lt 2 ] || [ "$HOSTS" -gt 8 ]; then
  echo "error: --hosts must be 2..8" >&2
  exit 2
fi

NET=${GENIE_NETNS_NET:-10.213.7}
PORT=7000
# The transport's default peer timeout (transport/src/config.rs).
PEER_TIMEOUT_MS=2000
SECONDS=0

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
target_dir="${CARGO_TARGET_DIR:-target}"
if [ "${GENIE_NETNS_BUILT:-0}" != 1 ]; then
  ensure_netns_deps
  cargo build --release -q -p genie-runtime --bin genie --example cluster_client
fi
genie="$(realpath "$target_dir/release/genie")"
client="$(realpath "$target_dir/release/examples/cluster_client")"

# Namespaces need CAP_NET_ADMIN: as root, or through passwordless sudo.
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then
    exec sudo -n GENIE_NETNS_BUILT=1 CARGO_TARGET_DIR="$target_dir" GENIE_NETNS_NET="$NET" \
      "$0" "${args[@]}"
  fi
  echo "netns-cluster: SKIPPED: cannot create network namespaces (not root, no passwordless sudo)"
  exit 0
fi

pre="gn$$"
hub="$pre-hub"
cl="$pre-cl"
nss=()
pids=()
dir="$(mktemp -d)"

cleanup() {
  local p ns
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  # Deleting a namespace removes its end of each veth (and so the pair) and the hub's bridge.
  for ns in "${nss[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

fail() {
  echo "error: $*" >&2
  echo "netns-cluster hosts=$HOSTS backend=${backend:-tcp} result=FAIL secs=$SECONDS reason=\"$*\""
  exit 1
}

# Can this machine make a namespace and configure links in it? Only this may skip; every
# later error fails.
probe() {
  ip netns add "$pre-probe" &&
    ip -n "$pre-probe" link set lo up &&
    ip -n "$pre-probe" link add p0 type veth peer name p1
}
if ! err="$(probe 2>&1)"; then
  ip netns del "$pre-probe" 2>/dev/null || true
  echo "netns-cluster: SKIPPED: cannot create network namespaces (needs CAP_NET_ADMIN): $err"
  exit 0
fi
ip netns del "$pre-probe"
trap 'fail "line $LINENO: a command failed"' ERR

echo "==> $HOSTS hosts: namespaces $pre-h0.., bridge in $hub, client in $cl, $NET.0/24"
add_ns() {
  ip netns add "$1"
  nss+=("$1")
  ip -n "$1" link set lo up
}
add_ns "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
# join NS VETH IP: NS's eth0 (address IP/24) paired with VETH on the hub's bridge.
join() {
  ip -n "$hub" link add "$2" type veth peer name eth0 netns "$1"
  ip -n "$hub" link set "$2" master br0 up
  ip -n "$1" addr add "$3/24" dev eth0
  ip -n "$1" link set eth0 up
}
for i in $(seq 0 $((HOSTS - 1))); do
  add_ns "$pre-h$i"
  join "$pre-h$i" "vh$i" "$NET.$((10 + i))"
done
add_ns "$cl"
join "$cl" vcl "$NET.100"

# The cluster file, with its secret in a file only its owner reads.
(umask 077 && "$genie" secret >"$dir/cluster.secret")
chmod 600 "$dir/cluster.secret"
{
  echo 'secret_file = "cluster.secret"'
  for i in $(seq 0 $((HOSTS - 1))); do
    printf '\n[[workers]]\nname = "w%d"\naddress = "%s:%d"\ndevices = ["cpu"]\n' \
      "$i" "$NET.$((10 + i))" "$PORT"
  done
} >"$dir/cluster.toml"

for i in $(seq 0 $((HOSTS - 1))); do
  ip netns exec "$pre-h$i" "$genie" worker --cluster "$dir/cluster.toml" --name "w$i" \
    >"$dir/w$i.log" 2>&1 &
  pids+=("$!")
done
for i in $(seq 0 $((HOSTS - 1))); do
  for _ in $(seq 100); do grep -q 'listening on' "$dir/w$i.log" && break; sleep 0.1; done
  grep -q 'listening on' "$dir/w$i.log" || fail "worker w$i did not start: $(cat "$dir/w$i.log")"
done
backend="$(sed -n 's/.*(\([a-z]*\) backend.*/\1/p' "$dir/w0.log" | head -n 1)"
echo "w0: $(head -n 1 "$dir/w0.log")"
[ "$backend" = tcp ] || fail "the workers chose backend '$backend', not tcp"

# show NAME: NAME's client output, long token lists cut short.
show() {
  sed -E -e 's/(tokens=\[[^]]{0,40})[^]]*\]/\1 ...]/' -e "s/^/  $1: /" "$dir/$1.out"
}
# client NAME ARGS...: runs the client in its namespace (bounded), its output in $dir/NAME.out.
client() {
  local name=$1
  shift
  local status=0
  timeout 300 ip netns exec "$cl" "$client" --cluster "$dir/cluster.toml" "$@" \
    >"$dir/$name.out" 2>"$dir/$name.err" || status=$?
  show "$name"
  [ "$status" = 0 ] || fail "$name: the client exited $status: $(tail -n 3 "$dir/$name.err")"
}
# field NAME KEY: KEY's value in NAME's summary line.
field() {
  tail -n 1 "$dir/$1.out" | tr ' ' '\n' | sed -n "s/^$2=//p"
}

# all_match NAME N: NAME's client ran N generations, each equal to the reference.
all_match() {
  if [ "$(field "$1" ok)" != "$2" ] || [ "$(field "$1" mismatched)" != 0 ]; then
    fail "$1: $(tail -n 1 "$dir/$1.out")"
  fi
}

echo "==> correct: generations across $HOSTS hosts against one in-process worker"
client correct --runs 2
all_match correct 2
summary="correct_runs=2"

if [ "$FAULTS" = 1 ]; then
  echo "==> loss: 1 % of every namespace's packets dropped"
  loss_nss=("$cl")
  for i in $(seq 0 $((HOSTS - 1))); do loss_nss+=("$pre-h$i"); done
  if ip netns exec "$cl" tc qdisc add dev eth0 root netem loss 1% 2>/dev/null; then
    loss_tool=netem
    for ns in "${loss_nss[@]:1}"; do ip netns exec "$ns" tc qdisc add dev eth0 root netem loss 1%; done
  else
    # This kernel has no sch_netem: drop with the same probability in netfilter instead.
    loss_tool=iptables
    for ns in "${loss_nss[@]}"; do
      ip netns exec "$ns" iptables -A OUTPUT -o eth0 -m statistic --mode random \
        --probability 0.01 -j DROP
    done
  fi
  t0=$SECONDS
  client loss --runs 4 --steps 32
  loss_secs=$((SECONDS - t0))
  drops=0
  for ns in "${loss_nss[@]}"; do
    if [ "$loss_tool" = netem ]; then
      d="$(ip netns exec "$ns" tc -s qdisc show dev eth0 | sed -n 's/.*dropped \([0-9]*\).*/\1/p' | head -n 1)"
      ip netns exec "$ns" tc qdisc del dev eth0 root
    else
      d="$(ip netns exec "$ns" iptables -L OUTPUT -v -x -n | awk '$3 == "DROP" { s += $1 } END { print s + 0 }')"
      ip netns exec "$ns" iptables -F OUTPUT
    fi
    drops=$((drops + ${d:-0}))
  done
  echo "  $loss_tool dropped $drops packets in ${loss_secs} s"
  all_match loss 4
  [ "$drops" -gt 0 ] || fail "loss: no packet was dropped ($loss_tool): the test tested nothing"
  summary="$summary loss=${loss_tool}:1% loss_runs=4 loss_drops=$drops loss_secs=$loss_secs"

  down_ms=$((PEER_TIMEOUT_MS + 2000))
  echo "==> partition: w1's link down for $down_ms ms while generations run"
  timeout 300 ip netns exec "$cl" "$client" --cluster "$dir/cluster.toml" --until-heal \
    --runs 100 --steps 200 --deadline-secs 120 >"$dir/partition.out" 2>"$dir/partition.err" &
  cpid=$!
  pids+=("$cpid")
  for _ in $(seq 600); do grep -q '^run=.* ok' "$dir/partition.out" && break; sleep 0.1; done
  grep -q '^run=.* ok' "$dir/partition.out" || fail "partition: no run before the fault"
  cut_ms=$(date +%s%3N)
  ip -n "$hub" link set vh1 down
  sleep "$((down_ms / 1000)).$((down_ms % 1000))"
  ip -n "$hub" link set vh1 up
  pstatus=0
  wait "$cpid" || pstatus=$?
  show partition
  [ "$pstatus" = 0 ] || fail "partition: the client exited $pstatus: $(tail -n 3 "$dir/partition.err")"
  first_fail="$(grep -m 1 '^run=.* failed' "$dir/partition.out" || true)"
  [ -n "$first_fail" ] || fail "partition: no run failed while w1 was cut off"
  case "$first_fail" in
    *"typed=WorkerFailed worker=w1 "*) ;;
    *) fail "partition: the run failed without a WorkerFailed naming w1: $first_fail" ;;
  esac
  failed_ms=$(($(echo "$first_fail" | sed -n 's/.* at_ms=\([0-9]*\).*/\1/p') - cut_ms))
  [ "$failed_ms" -ge 0 ] || fail "partition: a run failed before the cut: $first_fail"
  [ "$failed_ms" -le $((PEER_TIMEOUT_MS + 3000)) ] ||
    fail "partition: the run failed only ${failed_ms} ms after the cut (peer timeout ${PEER_TIMEOUT_MS} ms)"
  if [ "$(field partition healed)" != 1 ] || [ "$(field partition mismatched)" != 0 ]; then
    fail "partition: not healed: $(tail -n 1 "$dir/partition.out")"
  fi
  summary="$summary partition_ms=$down_ms failed_after_ms=$failed_ms healed=1"
fi

echo "netns-cluster hosts=$HOSTS backend=$backend result=ok $summary secs=$SECONDS"
