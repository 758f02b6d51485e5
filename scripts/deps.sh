# Sourced by Genie's scripts: installs Debian/Ubuntu packages when they are missing.
# Uses sudo when not root. Idempotent: a machine that has everything runs no apt at all.

_genie_sudo() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_pkgs PKG...: installs the packages not yet installed.
ensure_pkgs() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    _genie_sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive _genie_sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# What building with --all-features needs: sideway's build (cmake, libclang for bindgen) and the
# `etcd` feature's (etcd-client compiles etcd's .proto files with protoc, which needs the well-known
# types from libprotobuf-dev: google/protobuf/descriptor.proto). procps: `kill`, with which
# runtime/tests/processes.rs stops and continues a worker process.
ensure_build_deps() {
  ensure_pkgs build-essential pkg-config cmake libclang-dev clang protobuf-compiler libprotobuf-dev procps
  if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add clippy rustfmt
  fi
}

# What the soft-RoCE harness (scripts/softroce.sh) and the RDMA tests/benchmarks need:
# qemu + busybox + cpio + kmod to build and boot the VM, rdma-core/ibverbs-utils (libibverbs, rxe provider,
# `rdma` tool) and perftest for the baseline, plus sideway's build dependencies.
ensure_rdma_deps() {
  ensure_build_deps
  ensure_pkgs qemu-system-x86 busybox-static cpio kmod rdma-core ibverbs-utils ibverbs-providers perftest iproute2
}

# What the etcd membership tests (runtime/tests/etcd.rs) need: an `etcd` server binary
# (Debian's etcd-server; the tests start their own on loopback, never the system service).
ensure_etcd() {
  if ! command -v etcd >/dev/null 2>&1; then
    ensure_pkgs etcd-server
  fi
}

# What scripts/netns-cluster.sh needs: iproute2 (`ip netns`, veth, bridge, `tc netem`),
# iptables (its packet loss where the kernel has no sch_netem) and curl (etcd's health check).
ensure_netns_deps() {
  ensure_pkgs iproute2 iptables curl
}

# What the Python bindings' tests and benchmark need: python3 with venv and pip (Debian's
# python3-venv; a python3 that already has venv, e.g. pyenv's, is used as it is) and a C compiler.
ensure_python_deps() {
  ensure_build_deps
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    ensure_pkgs python3 python3-venv python3-pip
  fi
}

# ensure_genie_python VENV: creates VENV when missing, installs maturin, pytest and numpy from
# PyPI, then `pip install ./bindings/python` (the README's command; release build, into the
# workspace's target/).
ensure_genie_python() {
  local venv=$1
  # Cargo features for the extension (e.g. `rdma`): ensure_genie_python VENV rdma
  local features=${2:-}
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check 'maturin>=1.5,<2' pytest numpy
  # maturin's build backend runs the `maturin` of PATH: the venv's.
  PATH="$venv/bin:$PATH" MATURIN_PEP517_ARGS="${features:+--features $features}" \
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --force-reinstall --no-deps ./bindings/python
}
