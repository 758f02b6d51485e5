#!/usr/bin/env bash
# The GPU proof of Genie's device regions, on a machine with an NVIDIA GPU (under 5 minutes):
#   1. genie-sys's CUDA tests (scripts/test-gpu.sh: devices, allocation, host<->device and
#      device<->device copies with checksums, streams, events, dma-buf export);
#   2. the transport over TCP loopback (transport/examples/device_perf.rs): device regions
#      allocated with alloc_device_region, writes with notification host->device, device->host,
#      device->device and reads back, 1 B ... 256 MiB, each checked with an FNV-1a checksum;
#      then write bandwidth and the 8-byte write round trip of device regions beside host
#      regions, in the same run;
#   3. the same over soft-RoCE (rxe) when this kernel can load rdma_rxe (directly, never in a VM:
#      a VM has no GPU): there device regions need GPUDirect (dma-buf or nvidia_peermem), so the
#      step reports which one registered, or why none could (rxe usually supports neither);
#   4. the Python package built with `cuda` (bindings/python/tests/test_cuda.py, GENIE_CUDA_REQUIRE=1):
#      torch CUDA tensors registered in place and `alloc_device` regions, moved host->device,
#      device->device and device->host with checksums against torch's own view, and pointers
#      that are not the GPU's memory refused. Needs python3 with torch, numpy and pytest there,
#      and the wheel --prepare built (with maturin, found on PATH or in $GENIE_VENV); without
#      them the step says why and is skipped.
# Last line:
#   gpu device_bw_ratio_vs_host=<r> device_write8_us=<l> gpudirect=<dmabuf|peermem|staged>
# taken from the rxe run when device regions registered there with GPUDirect, else from TCP
# (staged). Exit status 0 when every check passed.
#
#   scripts/gpu-check.sh                 build (cargo, --features cuda,rdma, release) and run
#   scripts/gpu-check.sh --prepare       build only; binaries to target/gpu-check/
#   scripts/gpu-check.sh --bin DIR       run the binaries --prepare made (no cargo)
#
# A GPU lent through the session's `run` tool: here `scripts/gpu-check.sh --prepare`, then `run`
# with command `scripts/gpu-check.sh --bin target/gpu-check`, carry ["target/gpu-check"],
# timeout_s 300.
#
# Without a GPU it says so and exits 0, last line `gpu skipped: <why>` (before building anything
# when no NVIDIA device node or driver is visible), unless GENIE_CUDA_REQUIRE=1: then exit 1.
# GENIE_GPU_CHECK_STAND_IN=1 runs steps 2-3 on host memory standing in for a GPU (HostStandIn):
# a dry run of this script's logic on any machine; its figures mean nothing about GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=run
dir=""
case "${1:-}" in
  --prepare) mode=prepare ;;
  --bin) dir="${2:?--bin needs a directory}" ;;
  "") ;;
  *)
    echo "usage: $0 [--prepare | --bin DIR]" >&2
    exit 2
    ;;
esac

require="${GENIE_CUDA_REQUIRE:-0}"
stand_in="${GENIE_GPU_CHECK_STAND_IN:-0}"

skip() {
  echo "no GPU: $*"
  if [ "$require" = 1 ]; then
    echo "gpu FAILED: GENIE_CUDA_REQUIRE=1 but no GPU: $*"
    exit 1
  fi
  echo "gpu skipped: $*"
  exit 0
}

# Why no GPU can be here (printed), or nothing when one may be: a cheap look before building.
gpu_absent() {
  if ls /dev/nvidia[0-9]* >/dev/null 2>&1 || [ -e /dev/nvidiactl ]; then return 1; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    return 1
  fi
  echo "no NVIDIA device node (/dev/nvidia*) and nvidia-smi lists no GPU"
}

build() {
  echo "==> building (release, --features cuda,rdma)"
  scripts/test-gpu.sh --prepare
  cargo build --release -q -p genie-transport --features cuda,rdma --example device_perf
  mkdir -p target/gpu-check
  cp target/gpu-test/genie-sys-cuda target/gpu-check/genie-sys-cuda
  cp "${CARGO_TARGET_DIR:-target}/release/examples/device_perf" target/gpu-check/device_perf
  # Symbols are not needed there, and a small copy travels fast to a GPU machine.
  if command -v strip >/dev/null 2>&1; then strip target/gpu-check/genie-sys-cuda target/gpu-check/device_perf; fi
  rm -f target/gpu-check/genie-*.whl
  local maturin
  maturin="$(command -v maturin || echo "${GENIE_VENV:-/tmp/genie-venv}/bin/maturin")"
  if [ "$stand_in" = 1 ]; then
    echo "python: a stand-in run builds no wheel (step 4 needs a GPU)"
  elif [ -x "$maturin" ]; then
    echo "==> building the Python package (--features cuda)"
    (cd bindings/python && "$maturin" build --release --strip --features cuda -o ../../target/gpu-check)
  else
    echo "python: no maturin (PATH or \$GENIE_VENV), so no wheel: step 4 will be skipped"
  fi
  echo "prepared target/gpu-check/ ($(du -sh target/gpu-check | cut -f1))"
}

if [ "$mode" = prepare ]; then
  build
  exit 0
fi
if [ -z "$dir" ]; then
  if [ "$stand_in" != 1 ] && why="$(gpu_absent)"; then skip "$why"; fi
  build
  dir=target/gpu-check
fi
for b in genie-sys-cuda device_perf; do
  [ -x "$dir/$b" ] || { echo "error: $dir/$b missing (run $0 --prepare)" >&2; exit 1; }
done
if [ "$stand_in" != 1 ] && why="$(gpu_absent)"; then skip "$why"; fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
perf_args=()
[ "$stand_in" = 1 ] && perf_args+=(--stand-in)

echo "==> 1. genie-sys CUDA tests"
set +e
scripts/test-gpu.sh --bin "$dir/genie-sys-cuda" 2>&1 | tee "$tmp/sys"
sys_rc=${PIPESTATUS[0]}
set -e
sys_line="$(tail -n 1 "$tmp/sys")"
if [ "$stand_in" != 1 ]; then
  case "$sys_line" in
    *result=skipped*) skip "the CUDA tests found no device (${sys_line})" ;;
  esac
fi

echo "==> 2. device regions over TCP loopback (1 B ... 256 MiB, checksums; bandwidth, 8 B latency)"
set +e
timeout 200 "$dir/device_perf" --backend tcp "${perf_args[@]}" 2>&1 | tee "$tmp/tcp"
tcp_rc=${PIPESTATUS[0]}
set -e
case "$tcp_rc" in
  3) skip "$(grep -m1 '^skipped:' "$tmp/tcp" || echo 'device_perf found no GPU')" ;;
esac

echo "==> 3. device regions over soft-RoCE (rxe), when this kernel can load rdma_rxe"
rxe_rc=skipped
can_rxe() {
  command -v rdma >/dev/null 2>&1 || return 1
  rdma link show 2>/dev/null | grep -q ' rxe' && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  $sudo modprobe -n rdma_rxe >/dev/null 2>&1
}
if can_rxe; then
  set +e
  GENIE_SOFTROCE_VM=0 timeout 90 scripts/softroce.sh -- "$dir/device_perf" --backend rdma \
    --max-size $((64 << 20)) --bw-size $((16 << 20)) "${perf_args[@]}" 2>&1 | tee "$tmp/rxe"
  rxe_rc=${PIPESTATUS[0]}
  set -e
  [ "$rxe_rc" = 4 ] && echo "rxe: device regions need GPUDirect, unavailable here (see above)"
else
  echo "rxe: skipped (no rdma tool, or rdma_rxe cannot be loaded here)"
fi

echo "==> 4. the Python package on the GPU (torch tensors, alloc_device)"
py_rc=skipped
wheel="$(ls "$dir"/genie-*.whl 2>/dev/null | tail -n 1 || true)"
if [ "$stand_in" = 1 ]; then
  echo "python: skipped (stand-in run)"
elif [ -z "$wheel" ]; then
  echo "python: skipped (no genie wheel in $dir: --prepare found no maturin)"
elif ! python3 -c 'import torch, numpy, pytest' 2>/dev/null; then
  echo "python: skipped (python3 lacks torch, numpy or pytest)"
else
  set +e
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$wheel" &&
    (cd bindings/python && PYTHONPATH="$tmp/site" GENIE_CUDA_REQUIRE=1 timeout 120 \
      python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py) 2>&1 | tee "$tmp/py"
  py_rc=${PIPESTATUS[0]}
  set -e
fi

final="$(grep -E '^gpu device_bw_ratio_vs_host=' "$tmp/tcp" | tail -n 1 || true)"
if [ "$rxe_rc" = 0 ]; then
  rxe_final="$(grep -E '^gpu device_bw_ratio_vs_host=.* gpudirect=(dmabuf|peermem)$' "$tmp/rxe" | tail -n 1 || true)"
  [ -n "$rxe_final" ] && final="$rxe_final"
fi
echo "summary: sys=${sys_line#gpu-sys } tcp_rc=$tcp_rc rxe_rc=$rxe_rc py_rc=$py_rc"
failed=0
[ "$sys_rc" = 0 ] || failed=1
[ "$tcp_rc" = 0 ] || failed=1
case "$rxe_rc" in 0 | 4 | skipped) ;; *) failed=1 ;; esac
case "$py_rc" in 0 | skipped) ;; *) failed=1 ;; esac
if [ -z "$final" ]; then
  echo "gpu FAILED: no result line from the TCP run"
  exit 1
fi
if [ "$failed" = 1 ]; then
  echo "$final"
  echo "gpu FAILED: sys_rc=$sys_rc tcp_rc=$tcp_rc rxe_rc=$rxe_rc py_rc=$py_rc (see above)"
  exit 1
fi
echo "$final"
