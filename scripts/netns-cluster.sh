#!/usr/bin/env bash
# A Genie cluster of hosts with their own network stacks, on one machine: N network namespaces
# (default 3), each running one `genie worker`, joined by veth pairs to a bridge on a private
# /24 (10.213.7.0/24; the bridge sits in a namespace of its own, so nothing touches the root
# namespace's network), driven from one more namespace by runtime/examples/cluster_client.rs.
# The workers register in etcd (which listens on the bridge, 10.213.7.1:2379) and the client
# finds them there; `--cluster-file` uses a static cluster file instead. Either way the cluster
# secret is a file (mode 600) that never goes into etcd.
#
#   scripts/netns-cluster.sh [--hosts N] [--backend tcp|rdma] [--cluster-file] [--no-faults]
#                            [--no-serve] [--rate-limit MBIT] [--peer-timeout-ms MS]
#
# --backend rdma (in scripts/softroce.sh's VM: `scripts/test-rdma.sh netns-cluster`) gives every
# namespace an rxe device of its own, so RDMA crosses emulated links rather than `lo`. Kernel 6.1's
# rxe is not namespace-aware: its UDP socket and its route lookups live in the root namespace
# whatever namespace its netdev is in, so an rxe on a namespace's own veth never sends or
# receives. Each host's rxe (rxeh<i>, the client's rxecl) is therefore bound to a veth end left in
# the VM's root namespace, on a second /24 (10.213.8.0/24), whose other end is on the same bridge;
# the process in namespace h<i> uses rxeh<i> (RDMA devices are shared between namespaces) and its
# side channel goes over its namespace's TCP link. For the root namespace to send from one local
# address to another over the wire rather than through `lo`, each address gets a routing table of
# its own (chosen by source address for locally sent packets, except to itself), the `local`
# table is looked up after them, and arp_ignore=1, arp_announce=2, accept_local=1 and rp_filter=0
# make each veth answer ARP for its own address only and accept packets from its siblings. This
# rewires the root namespace's routing rules (restored on exit), so it runs only in the VM (whose
# hostname is `softroce`) unless GENIE_NETNS_RDMA_ANYWHERE=1.
#
# Checks, in order, failing on the first that does not hold:
#   1. correct:   2 generations with the layers split across every worker give the tokens and
#                 logits, bitwise, of the same generation on one in-process worker.
#   2. loss:      the same with 2 ms of delay and 1 % of the packets every namespace sends
#                 dropped (tc netem; where the kernel has no sch_netem, an iptables `statistic`
#                 rule drops them, without delay); the drop counters must show drops. On rdma
#                 the rxe links get the same netem.
#   3. partition: w1's links go down for the peer timeout + 2 s while generations run: the run
#                 in flight fails with WorkerFailed naming w1 within the peer timeout + 3 s,
#                 and once the links are back, a new connection's generation matches again.
#   4. serve:     (unless --no-serve) the serving benchmark (benches serve-bench, a short
#                 workload) on four more workers in namespaces of their own: disaggregated on
#                 two (prefill on s0, decode on s1), co-located on the other two; no request may
#                 fail, and its last line is printed.
# --rate-limit MBIT shapes every namespace's link with tbf to MBIT Mbit/s for the whole run.
# The last line is
#   netns-cluster hosts=N backend=tcp|rdma result=ok|FAIL membership=etcd|file ...
# Exits 0 on `result=ok`, 1 otherwise; when this machine cannot create network namespaces (no
# CAP_NET_ADMIN, no root and no passwordless sudo) it says so and exits 0 without a result line.
# Namespaces, veths, the bridge, rxe devices, routing rules and every process it started are
# removed on exit.
#
# Environment: GENIE_NETNS_BUILT=1 uses the binaries already in $CARGO_TARGET_DIR/release (how
# scripts/test-rdma.sh runs it in the VM after building on the host).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

HOSTS=3
FAULTS=1
BACKEND=tcp
MEMBERSHIP=etcd
SERVE=1
RATE_MBIT=""
PEER_TIMEOUT_MS=""
usage="usage: $0 [--hosts N] [--backend tcp|rdma] [--cluster-file] [--no-faults] [--no-serve] [--rate-limit MBIT] [--peer-timeout-ms MS]"
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS=${2:-}; shift 2 ;;
    --backend) BACKEND=${2:-}; shift 2 ;;
    --cluster-file) MEMBERSHIP=file; shift ;;
    --no-faults) FAULTS=0; shift ;;
    --no-serve) SERVE=0; shift ;;
    --rate-limit) RATE_MBIT=${2:-}; shift 2 ;;
    --peer-timeout-ms) PEER_TIMEOUT_MS=${2:-}; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
if ! [[ "$HOSTS" =~ ^[0-9]+$ ]] || [ "$HOSTS" -lt 2 ] || [ "$HOSTS" -gt 8 ]; then
  echo "error: --hosts must be 2..8" >&2
  exit 2
fi
case "$BACKEND" in tcp | rdma) ;; *) echo "error: --backend must be tcp or rdma" >&2; exit 2 ;; esac
if [ -n "$RATE_MBIT" ] && ! [[ "$RATE_MBIT" =~ ^[1-9][0-9]{0,4}$ ]]; then
  echo "error: --rate-limit must be 1..99999 (Mbit/s)" >&2
  exit 2
fi
# The peer timeout every worker and the client use: the transport's default (2 s) on TCP; more on
# rxe, whose emulated links stall for longer under load (a heartbeat late by the whole timeout
# would fail a run that should pass).
if [ -z "$PEER_TIMEOUT_MS" ]; then
  if [ "$BACKEND" = rdma ]; then PEER_TIMEOUT_MS=6000; else PEER_TIMEOUT_MS=2000; fi
fi
if ! [[ "$PEER_TIMEOUT_MS" =~ ^[1-9][0-9]{2,5}$ ]] || [ "$PEER_TIMEOUT_MS" -gt 600000 ]; then
  echo "error: --peer-timeout-ms must be 100..600000" >&2
  exit 2
fi

NET=${GENIE_NETNS_NET:-10.213.7}
RNET=${GENIE_NETNS_RDMA_NET:-10.213.8}
PORT=7000
ETCD_URL="http://$NET.1:2379"
SECONDS=0

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
target_dir="${CARGO_TARGET_DIR:-target}"
features=etcd
[ "$BACKEND" = rdma ] && features=etcd,rdma
if [ "${GENIE_NETNS_BUILT:-0}" != 1 ]; then
  ensure_netns_deps
  ensure_etcd
  [ "$BACKEND" = rdma ] && ensure_rdma_deps
  bins=(--bin genie --example cluster_client)
  [ "$SERVE" = 1 ] && bins+=(-p genie-benches --bin serve-bench)
  cargo build --release -q -p genie-runtime --features "genie-runtime/$features" "${bins[@]}"
fi
build_secs=$SECONDS
SECONDS=0
genie="$(realpath "$target_dir/release/genie")"
client="$(realpath "$target_dir/release/examples/cluster_client")"
serve_bench="$(realpath "$target_dir/release/serve-bench" 2>/dev/null || true)"

# Namespaces need CAP_NET_ADMIN: as root, or through passwordless sudo.
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then
    exec sudo -n GENIE_NETNS_BUILT=1 CARGO_TARGET_DIR="$target_dir" GENIE_NETNS_NET="$NET" \
      GENIE_NETNS_RDMA_NET="$RNET" GENIE_NETNS_RDMA_ANYWHERE="${GENIE_NETNS_RDMA_ANYWHERE:-0}" \
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
rxes=()
rules=()
sysctls=()
local_moved=0
dir="$(mktemp -d)"
etcd_dir=""

cleanup() {
  local p ns r
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  for r in "${rxes[@]}"; do rdma link delete "$r" 2>/dev/null || true; done
  for r in "${rules[@]}"; do
    # shellcheck disable=SC2086
    ip rule del $r 2>/dev/null || true
  done
  if [ "$local_moved" = 1 ]; then
    ip rule add pref 0 lookup local 2>/dev/null || true
    ip rule del pref 500 lookup local 2>/dev/null || true
  fi
  for r in "${sysctls[@]}"; do sysctl -q -w "$r" >/dev/null 2>&1 || true; done
  # Deleting a namespace removes its end of each veth (and so the pair) and the hub's bridge.
  for ns in "${nss[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$dir"
  [ -n "$etcd_dir" ] && rm -rf "$etcd_dir"
  return 0
}
trap cleanup EXIT

fail() {
  local f
  echo "error: $*" >&2
  # What the processes said, for the post-mortem (the directory goes with the cleanup).
  for f in "$dir"/*.log "$dir"/*.err; do
    [ -s "$f" ] || continue
    echo "--- ${f##*/} (last lines)" >&2
    grep -v -E '^ +([0-9]+: | *at )' "$f" | tail -n 6 >&2
  done
  echo "netns-cluster hosts=$HOSTS backend=$BACKEND result=FAIL membership=$MEMBERSHIP secs=$SECONDS reason=\"$*\""
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

[ "$MEMBERSHIP" = file ] || command -v etcd >/dev/null || fail "no etcd binary (Debian: etcd-server)"
if [ "$BACKEND" = rdma ]; then
  [ "$(hostname)" = softroce ] || [ "${GENIE_NETNS_RDMA_ANYWHERE:-0}" = 1 ] ||
    fail "--backend rdma rewires the root namespace's routing: run it in scripts/softroce.sh's VM (scripts/test-rdma.sh netns-cluster)"
  command -v rdma >/dev/null || fail "no rdma tool (iproute2)"
  [ -d /sys/module/rdma_rxe ] || modprobe rdma_rxe 2>/dev/null ||
    fail "--backend rdma needs the rdma_rxe module (run it in scripts/softroce.sh's VM)"
fi
[ "$SERVE" = 0 ] || [ -x "$serve_bench" ] || fail "serve: no serve-bench binary in $target_dir/release"

echo "==> $HOSTS hosts over $BACKEND: namespaces $pre-h0.., bridge in $hub, client in $cl, $NET.0/24"
add_ns() {
  ip netns add "$1"
  nss+=("$1")
  ip -n "$1" link set lo up
}
add_ns "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
ip -n "$hub" addr add "$NET.1/24" dev br0
# join NS VETH IP: NS's eth0 (address IP/24) paired with VETH on the hub's bridge.
join() {
  ip -n "$hub" link add "$2" type veth peer name eth0 netns "$1"
  ip -n "$hub" link set "$2" master br0 up
  ip -n "$1" addr add "$3/24" dev eth0
  ip -n "$1" link set eth0 up
}
# shape NS: tbf on NS's eth0 at RATE_MBIT (with --rate-limit), under any netem added later.
shape() {
  [ -n "$RATE_MBIT" ] || return 0
  ip netns exec "$1" tc qdisc add dev eth0 root handle 1: tbf rate "${RATE_MBIT}mbit" \
    burst 64kb latency 50ms
}
# set_sysctl KEY=VALUE: sets it, restoring the old value on exit.
set_sysctl() {
  local key=${1%%=*}
  sysctls+=("$key=$(sysctl -n "$key")")
  sysctl -q -w "$1" >/dev/null
}
rdma_sysctls_done=0
# rdma_link NAME INDEX IP: an rxe device NAME on a root-namespace veth (address IP in RNET/24)
# whose other end is on the hub's bridge; see the header for the routing.
rdma_link() {
  local name=$1 i=$2 ip=$3 table=$((100 + $2))
  if [ "$rdma_sysctls_done" = 0 ]; then
    set_sysctl net.ipv4.conf.all.arp_ignore=1
    set_sysctl net.ipv4.conf.all.arp_announce=2
    set_sysctl net.ipv4.conf.all.rp_filter=0
    set_sysctl net.ipv4.conf.default.rp_filter=0
    # After the per-address tables: a packet to a sibling's address then leaves by the wire.
    ip rule add pref 500 lookup local
    ip rule del pref 0 lookup local
    local_moved=1
    rdma_sysctls_done=1
  fi
  ip link add "g$pre$i" type veth peer name "r$i" netns "$hub"
  ip -n "$hub" link set "r$i" master br0 up
  ip addr add "$ip/24" dev "g$pre$i"
  sysctl -q -w "net.ipv4.conf.g$pre$i.accept_local=1" "net.ipv4.conf.g$pre$i.rp_filter=0" \
    "net.ipv4.conf.g$pre$i.arp_ignore=1" "net.ipv4.conf.g$pre$i.arp_announce=2" >/dev/null
  ip link set "g$pre$i" up
  ip route add "$RNET.0/24" dev "g$pre$i" src "$ip" table "$table"
  ip rule add pref "$table" from "$ip" iif lo lookup "$table"
  rules+=("pref $table from $ip iif lo lookup $table")
  # Except to itself (a process's QPs talking to each other on one rxe): that stays local.
  ip rule add pref 99 from "$ip" to "$ip" lookup local
  rules+=("pref 99 from $ip to $ip lookup local")
  rdma link add "$name" type rxe netdev "g$pre$i"
  rxes+=("$name")
}

for i in $(seq 0 $((HOSTS - 1))); do
  add_ns "$pre-h$i"
  join "$pre-h$i" "vh$i" "$NET.$((10 + i))"
  shape "$pre-h$i"
done
add_ns "$cl"
join "$cl" vcl "$NET.100"
shape "$cl"
# rxe device of each host (none: the TCP backend).
rxe_of() { if [ "$BACKEND" = rdma ]; then echo "rxe$1"; fi; }
# GENIE_RDMA_DEVICE of each process: on rdma its own rxe device; on tcp a name no device has, so
# that a build with the rdma feature, finding rxe devices (the VM has rxe0 on `lo`), falls back to
# TCP as its automatic choice does when the device asked for is missing.
no_rxe=no-such-rdma-device
cl_env=(env GENIE_RDMA_DEVICE=$no_rxe)
if [ "$BACKEND" = rdma ]; then cl_env=(env GENIE_RDMA_DEVICE=rxecl); fi
if [ "$BACKEND" = rdma ]; then
  for i in $(seq 0 $((HOSTS - 1))); do rdma_link "rxeh$i" "$i" "$RNET.$((10 + i))"; done
  rdma_link rxecl 9 "$RNET.100"
  echo "  rdma: $(rdma link show | awk '$2 ~ /^rxe(h|cl)/ { printf "%s(%s) ", $2, $NF }')"
fi

# The secret, in a file only its owner reads.
(umask 077 && "$genie" secret >"$dir/cluster.secret")
chmod 600 "$dir/cluster.secret"

if [ "$MEMBERSHIP" = etcd ]; then
  # etcd's data on a tmpfs where there is one (the VM's /tmp is the host's, over 9p).
  if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ]; then
    etcd_dir="$(mktemp -d /dev/shm/genie-netns-etcd.XXXXXX)"
  else
    etcd_dir="$dir/etcd"
  fi
  ip netns exec "$hub" etcd --name netns --data-dir "$etcd_dir/data" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster netns=http://127.0.0.1:2380 >"$dir/etcd.log" 2>&1 &
  pids+=("$!")
  etcd_healthy() {
    ip netns exec "$cl" curl -sf -m 2 "$ETCD_URL/health" 2>/dev/null | grep -q '"health":"true"'
  }
  for _ in $(seq 100); do
    if etcd_healthy; then break; fi
    sleep 0.2
  done
  etcd_healthy || fail "etcd did not start: $(tail -n 3 "$dir/etcd.log")"
  echo "  etcd on $ETCD_URL (in $hub)"
else
  {
    echo 'secret_file = "cluster.secret"'
    echo "peer_timeout_ms = $PEER_TIMEOUT_MS"
    for i in $(seq 0 $((HOSTS - 1))); do
      printf '\n[[workers]]\nname = "w%d"\naddress = "%s:%d"\ndevices = ["cpu"]\n' \
        "$i" "$NET.$((10 + i))" "$PORT"
      if [ "$BACKEND" = rdma ]; then printf 'rdma = { device = "rxeh%d" }\n' "$i"; fi
    done
  } >"$dir/cluster.toml"
  # The client's own device: the file's top-level rdma applies to endpoints without their own.
  if [ "$BACKEND" = rdma ]; then sed -i '1i rdma = { device = "rxecl" }' "$dir/cluster.toml"; fi
fi

# start_worker NS NAME IP: `genie worker NAME` in NS, its output in $dir/NAME.log.
start_worker() {
  local ns=$1 name=$2 ip=$3 rxe=$4 file=${5:-$dir/cluster.toml}
  local env=(env "GENIE_RDMA_DEVICE=${rxe:-$no_rxe}")
  if [ "$MEMBERSHIP" = etcd ] && [ -z "${5:-}" ]; then
    ip netns exec "$ns" "${env[@]}" "$genie" worker --etcd "$ETCD_URL" --cluster-name netns \
      --name "$name" --listen "$ip:$PORT" --secret-file "$dir/cluster.secret" \
      --peer-timeout-ms "$PEER_TIMEOUT_MS" >"$dir/$name.log" 2>&1 &
  else
    ip netns exec "$ns" "${env[@]}" "$genie" worker --cluster "$file" --name "$name" \
      >"$dir/$name.log" 2>&1 &
  fi
  pids+=("$!")
}
# wait_workers NAME...: each one says it listens (within 10 s).
wait_workers() {
  local name
  for name in "$@"; do
    for _ in $(seq 100); do grep -q 'listening on' "$dir/$name.log" && break; sleep 0.1; done
    grep -q 'listening on' "$dir/$name.log" || fail "worker $name did not start: $(cat "$dir/$name.log")"
  done
}

names=()
for i in $(seq 0 $((HOSTS - 1))); do
  start_worker "$pre-h$i" "w$i" "$NET.$((10 + i))" "$(rxe_of "h$i")"
  names+=("w$i")
done
wait_workers "${names[@]}"
backend="$(sed -n 's/.*(\([a-z]*\) backend.*/\1/p' "$dir/w0.log" | head -n 1)"
echo "w0: $(head -n 1 "$dir/w0.log")"
[ "$backend" = "$BACKEND" ] || fail "the workers chose backend '$backend', not $BACKEND"

# show NAME: NAME's client output, long token lists cut short.
show() {
  sed -E -e 's/(tokens=\[[^]]{0,40})[^]]*\]/\1 ...]/' -e "s/^/  $1: /" "$dir/$1.out"
}
client_args=()
if [ "$MEMBERSHIP" = etcd ]; then
  client_args=(--etcd "$ETCD_URL" --cluster-name netns --secret-file "$dir/cluster.secret"
    --workers "$HOSTS" --peer-timeout-ms "$PEER_TIMEOUT_MS")
  [ "$BACKEND" = rdma ] && client_args+=(--rdma-device rxecl)
else
  client_args=(--cluster "$dir/cluster.toml")
fi
# client NAME ARGS...: runs the client in its namespace (bounded), its output in $dir/NAME.out.
client() {
  local name=$1
  shift
  local status=0
  timeout 300 ip netns exec "$cl" "${cl_env[@]}" "$client" "${client_args[@]}" "$@" >"$dir/$name.out" 2>"$dir/$name.err" || status=$?
  show "$name"
  [ "$status" = 0 ] || fail "$name: the client exited $status: $(head -n 2 "$dir/$name.err")"
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
summary="membership=$MEMBERSHIP correct_runs=2 peer_timeout_ms=$PEER_TIMEOUT_MS"
[ -n "$RATE_MBIT" ] && summary="$summary tbf_mbit=$RATE_MBIT"

# Every namespace's link to the bridge: each host's, the client's, and on rdma the hosts' rxe links
# (the root namespace's ends).
link_nss=("$cl")
for i in $(seq 0 $((HOSTS - 1))); do link_nss+=("$pre-h$i"); done
# qdisc_parent NS: where netem goes on NS's eth0: under tbf (--rate-limit) or at the root.
qdisc_parent() { if [ -n "$RATE_MBIT" ]; then echo "parent 1:1 handle 10:"; else echo root; fi; }

if [ "$FAULTS" = 1 ]; then
  echo "==> loss: 2 ms delay and 1 % of every namespace's packets dropped"
  # shellcheck disable=SC2046
  if ip netns exec "$cl" tc qdisc add dev eth0 $(qdisc_parent) netem delay 2ms loss 1% 2>/dev/null; then
    loss_tool=netem
    loss_desc="netem:1%+2ms"
    for ns in "${link_nss[@]:1}"; do
      # shellcheck disable=SC2046
      ip netns exec "$ns" tc qdisc add dev eth0 $(qdisc_parent) netem delay 2ms loss 1%
    done
    if [ "$BACKEND" = rdma ]; then
      for i in $(seq 0 $((HOSTS - 1))) 9; do
        tc qdisc add dev "g$pre$i" root netem delay 2ms loss 1%
      done
    fi
  else
    # This kernel has no sch_netem: drop with the same probability in netfilter instead.
    [ "$BACKEND" = tcp ] || fail "loss: no sch_netem in this kernel"
    loss_tool=iptables
    loss_desc="iptables:1%"
    for ns in "${link_nss[@]}"; do
      ip netns exec "$ns" iptables -A OUTPUT -o eth0 -m statistic --mode random \
        --probability 0.01 -j DROP
    done
  fi
  t0=$SECONDS
  client loss --runs 4 --steps 32
  loss_secs=$((SECONDS - t0))
  drops=0
  # netem_drops: the dropped counter of `tc -s qdisc show` output on stdin (the netem line's).
  netem_drops() { awk '/qdisc netem/ { n = 1; next } n && /dropped/ { sub(",", "", $7); print $7; exit }'; }
  for ns in "${link_nss[@]}"; do
    if [ "$loss_tool" = netem ]; then
      d="$(ip netns exec "$ns" tc -s qdisc show dev eth0 | netem_drops)"
      # Not the netem alone: tbf would put noop (drop everything) in its place.
      ip netns exec "$ns" tc qdisc del dev eth0 root
      shape "$ns"
    else
      d="$(ip netns exec "$ns" iptables -L OUTPUT -v -x -n | awk '$3 == "DROP" { s += $1 } END { print s + 0 }')"
      ip netns exec "$ns" iptables -F OUTPUT
    fi
    drops=$((drops + ${d:-0}))
  done
  rdma_drops=0
  if [ "$BACKEND" = rdma ]; then
    for i in $(seq 0 $((HOSTS - 1))) 9; do
      d="$(tc -s qdisc show dev "g$pre$i" | netem_drops)"
      rdma_drops=$((rdma_drops + ${d:-0}))
      tc qdisc del dev "g$pre$i" root
    done
  fi
  echo "  $loss_tool dropped $drops packets on the TCP links, $rdma_drops on the rxe links, in ${loss_secs} s"
  all_match loss 4
  [ "$drops" -gt 0 ] || fail "loss: no packet was dropped ($loss_tool): the test tested nothing"
  summary="$summary loss=$loss_desc loss_runs=4 loss_drops=$drops loss_secs=$loss_secs"
  [ "$BACKEND" = rdma ] && summary="$summary loss_rxe_drops=$rdma_drops"

  down_ms=$((PEER_TIMEOUT_MS + 2000))
  echo "==> partition: w1's links down for $down_ms ms while generations run"
  timeout 300 ip netns exec "$cl" "${cl_env[@]}" "$client" "${client_args[@]}" --until-heal --runs 100 --steps 200 --deadline-secs 120 \
    >"$dir/partition.out" 2>"$dir/partition.err" &
  cpid=$!
  pids+=("$cpid")
  for _ in $(seq 1200); do grep -q '^run=.* ok' "$dir/partition.out" && break; sleep 0.1; done
  grep -q '^run=.* ok' "$dir/partition.out" || fail "partition: no run before the fault"
  w1_links=(vh1)
  [ "$BACKEND" = rdma ] && w1_links+=(r1)
  cut_ms=$(date +%s%3N)
  for l in "${w1_links[@]}"; do ip -n "$hub" link set "$l" down; done
  sleep "$((down_ms / 1000)).$(printf %03d $((down_ms % 1000)))"
  for l in "${w1_links[@]}"; do ip -n "$hub" link set "$l" up; done
  pstatus=0
  wait "$cpid" || pstatus=$?
  show partition
  [ "$pstatus" = 0 ] || fail "partition: the client exited $pstatus: $(head -n 2 "$dir/partition.err")"
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

if [ "$SERVE" = 1 ]; then
  echo "==> serve: serve-bench on four more hosts (disaggregated s0+s1, co-located s2 and s3)"
  # Each mode's engine drives its own cluster file: a worker serves one driver at a time.
  serve_file() {
    local out=$1
    shift
    {
      echo 'secret_file = "cluster.secret"'
      echo "peer_timeout_ms = $PEER_TIMEOUT_MS"
      if [ "$BACKEND" = rdma ]; then echo 'rdma = { device = "rxecl" }'; fi
      local s
      for s in "$@"; do
        printf '\n[[workers]]\nname = "s%d"\naddress = "%s:%d"\n' "$s" "$NET.$((50 + s))" "$PORT"
        if [ "$BACKEND" = rdma ]; then printf 'rdma = { device = "rxes%d" }\n' "$s"; fi
      done
    } >"$dir/$out"
  }
  serve_file serve-disagg.toml 0 1
  serve_file serve-coloc0.toml 2
  serve_file serve-coloc1.toml 3
  files=(serve-disagg.toml serve-disagg.toml serve-coloc0.toml serve-coloc1.toml)
  snames=()
  for s in 0 1 2 3; do
    add_ns "$pre-s$s"
    join "$pre-s$s" "vs$s" "$NET.$((50 + s))"
    shape "$pre-s$s"
    if [ "$BACKEND" = rdma ]; then rdma_link "rxes$s" "$((20 + s))" "$RNET.$((50 + s))"; fi
    start_worker "$pre-s$s" "s$s" "$NET.$((50 + s))" "$(rxe_of "s$s")" "$dir/${files[$s]}"
    snames+=("s$s")
  done
  wait_workers "${snames[@]}"
  t0=$SECONDS
  sstatus=0
  timeout 600 ip netns exec "$cl" "${cl_env[@]}" "$serve_bench" \
    --cluster "$dir/serve-disagg.toml" --colocated "$dir/serve-coloc0.toml,$dir/serve-coloc1.toml" \
    --rates 8 --requests 12 --long 96-128 --output 8-16 --decode-rounds 0 \
    --trace "$dir/serve-trace.json" --plot "$dir/serve-goodput.svg" \
    >"$dir/serve.out" 2>"$dir/serve.err" || sstatus=$?
  serve_secs=$((SECONDS - t0))
  sed 's/^/  serve: /' "$dir/serve.out"
  [ "$sstatus" = 0 ] || fail "serve: serve-bench exited $sstatus: $(head -n 2 "$dir/serve.err")"
  last="$(tail -n 1 "$dir/serve.out")"
  case "$last" in "serve goodput_ratio_vs_colocated="*" failed=0") ;; *) fail "serve: $last" ;; esac
  echo "$last"
  summary="$summary serve_secs=$serve_secs"
fi

echo "netns-cluster hosts=$HOSTS backend=$backend result=ok $summary secs=$SECONDS build_secs=$build_secs"
