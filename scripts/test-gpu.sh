#!/usr/bin/env bash
# The CUDA proof of genie-sys on a machine with an NVIDIA GPU: lists the devices (name, memory, PCI
# bus id, GPUDirect/dma-buf support, nearest RDMA NIC), then runs every CUDA test of genie-sys
# (allocation, host<->device and device<->device copies with checksums, streams and events, dma-buf
# export, foreign memory, peer copies) with GENIE_CUDA_REQUIRE=1, so that on a GPU machine no device
# test can skip: a missing driver or device fails it.
#
#   scripts/test-gpu.sh                 build (cargo, --features cuda) and run, on the GPU machine
#   scripts/test-gpu.sh --prepare       build only; copies the test binary to target/gpu-test/
#   scripts/test-gpu.sh --bin PATH      run a prebuilt test binary (what --prepare made), no cargo
#
# A GPU lent through the session's `run` tool: on the build machine run `scripts/test-gpu.sh --prepare`,
# then `run` with command `scripts/test-gpu.sh --bin target/gpu-test/genie-sys-cuda`, carry
# ["target/gpu-test"], timeout_s 120 (the tests take seconds).
#
# Without a driver or device the script prints why and ends `result=skipped` (exit 0), unless
# GENIE_CUDA_REQUIRE=1 is set, then it exits 1. The last line is always the summary:
#   gpu-sys devices=<n> passed=<p> failed=<f> skipped=<s> dmabuf=<exported|unsupported|unknown> result=<ok|FAIL|skipped>
set -euo pipefail
cd "$(dirname "$0")/.."

mode=run
bin=""
case "${1:-}" in
  --prepare) mode=prepare ;;
  --bin)
    bin="${2:?--bin needs a path}"
    ;;
  "") ;;
  *)
    echo "usage: $0 [--prepare | --bin PATH]" >&2
    exit 2
    ;;
esac

build() {
  local json
  json="$(mktemp)"
  cargo test -p genie-sys --features cuda --lib --no-run --message-format=json >"$json"
  grep -o '"executable":"[^"]*"' "$json" | sed 's/"executable":"\(.*\)"/\1/' |
    grep -E '/deps/genie_sys-[0-9a-f]+$' | tail -n 1
  rm -f "$json"
}

if [ -z "$bin" ]; then
  echo "==> building genie-sys tests (--features cuda)"
  bin="$(build)"
  [ -n "$bin" ] || { echo "error: no genie-sys test binary found" >&2; exit 1; }
fi
if [ "$mode" = prepare ]; then
  mkdir -p target/gpu-test
  cp "$bin" target/gpu-test/genie-sys-cuda
  echo "prepared target/gpu-test/genie-sys-cuda ($(du -h target/gpu-test/genie-sys-cuda | cut -f1))"
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv,noheader || true
fi

echo "==> devices"
listing="$(GENIE_CUDA_REQUIRE=0 "$bin" --exact cuda::tests::device_list_and_nearest_nic --nocapture --test-threads=1 2>&1 || true)"
# libtest prints "test <name> ... " before the test's own output on the same line: match anywhere.
printf '%s\n' "$listing" | grep -oE '(driver [0-9]+|cuda:[0-9]+ .*|skipped: .*)' || printf '%s\n' "$listing"
devices="$(printf '%s\n' "$listing" | { grep -oE 'cuda:[0-9]+ ' || true; } | wc -l)"

if [ "$devices" -eq 0 ]; then
  why="$(printf '%s\n' "$listing" | grep -m1 -oE 'skipped: .*' || echo 'the device listing failed')"
  echo "no CUDA device: ${why#skipped: }"
  if [ "${GENIE_CUDA_REQUIRE:-0}" = 1 ]; then
    echo "gpu-sys devices=0 passed=0 failed=0 skipped=0 dmabuf=unknown result=FAIL"
    exit 1
  fi
  echo "gpu-sys devices=0 passed=0 failed=0 skipped=0 dmabuf=unknown result=skipped"
  exit 0
fi

echo "==> CUDA and PCI tests (GENIE_CUDA_REQUIRE=1)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
set +e
GENIE_CUDA_REQUIRE=1 timeout 300 "$bin" cuda:: pci:: --nocapture --test-threads=1 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e

summary="$(grep -E '^test result:' "$out" | tail -n 1)"
passed="$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$summary")"
failed="$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$summary")"
skipped="$({ grep -oE 'skipped: ' "$out" || true; } | wc -l)"
dmabuf=unknown
if grep -q 'dmabuf: exported' "$out"; then dmabuf=exported; fi
if grep -q 'dmabuf: unsupported' "$out"; then dmabuf=unsupported; fi
result=ok
[ "$rc" -eq 0 ] || result=FAIL
echo "gpu-sys devices=$devices passed=${passed:-0} failed=${failed:-?} skipped=$skipped dmabuf=$dmabuf result=$result"
[ "$result" = ok ]
