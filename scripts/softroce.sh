#!/usr/bin/env bash
# Runs a command on soft-RoCE (rxe), with GENIE_RDMA_DEVICE set to the rxe device's name.
#
#   scripts/softroce.sh [--] COMMAND [ARG...]
#
# Direct mode: when the host already has an rxe device, or can load `rdma_rxe` (root + a kernel with
# CONFIG_RDMA_RXE), it creates `rxe0` on $GENIE_SOFTROCE_NETDEV (default `lo`) if needed and runs the
# command right here.
#
# VM mode (kernels without RDMA, like CI): boots a throwaway qemu VM (software emulation, a few seconds)
# with a Debian 6.1 kernel that has rdma_rxe, shares the host's `/` over 9p, chroots into it, creates
# `rxe0` on the guest's `lo` and runs the command with the caller's working directory and environment.
# Output streams to stdout (stdout and stderr together, through the serial console), and the script
# exits with the command's exit status. The kernel and initramfs are cached under target/softroce/
# (never committed); everything else is thrown away with the VM. Nothing outside the VM changes,
# except what the command itself writes into the shared filesystem.
#
# Environment:
#   GENIE_SOFTROCE_VM=1        force VM mode even when the host could run rxe directly
#   GENIE_SOFTROCE_NETDEV=IF   direct mode: the netdev rxe0 is bound to (default lo)
#   GENIE_SOFTROCE_MEM=MiB     VM memory (default 2048)
#   GENIE_SOFTROCE_SMP=N       VM CPUs (default: host CPUs, at most 4)
#   GENIE_SOFTROCE_TIMEOUT=S   kill the VM after S seconds, exit 124 (default 3600)
#   GENIE_SOFTROCE_KERNEL=VER  kernel package version, e.g. 6.1.0-56-amd64 (default: what
#                              linux-image-amd64 depends on, else the newest linux-image-6.1.0-N-amd64)
#   GENIE_SOFTROCE_CACHE=DIR   cache directory (default <repo>/target/softroce)
#   GENIE_SOFTROCE_KERNEL_ARGS=ARGS  extra guest kernel arguments (default "clocksource=tsc tsc=reliable",
#                              so that clock reads stay in the vDSO as on real machines)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then
  echo "usage: $0 [--] COMMAND [ARG...]" >&2
  exit 2
fi

say() { printf 'softroce: %s\n' "$*" >&2; }
die() { printf 'softroce: error: %s\n' "$*" >&2; exit 125; }

# shellcheck source=scripts/deps.sh
source "$REPO/scripts/deps.sh"

# ---------------------------------------------------------------- direct mode

# Prints the name of an rxe device the host already has, if any.
host_rxe_device() {
  command -v rdma >/dev/null 2>&1 || return 1
  rdma link show 2>/dev/null | awk '/^link / { split($2, a, "/"); if (a[1] ~ /^rxe/) { print a[1]; exit } }' | grep .
}

try_direct() {
  [ "${GENIE_SOFTROCE_VM:-0}" = "1" ] && return 1
  local dev
  if dev="$(host_rxe_device)"; then
    say "using the host's $dev"
  else
    [ "$(id -u)" = 0 ] || return 1
    command -v modprobe >/dev/null 2>&1 || return 1
    [ -d "/lib/modules/$(uname -r)" ] || return 1
    modprobe rdma_rxe 2>/dev/null || return 1
    ensure_pkgs rdma-core ibverbs-providers iproute2
    local netdev="${GENIE_SOFTROCE_NETDEV:-lo}"
    ip link set "$netdev" up
    rdma link add rxe0 type rxe netdev "$netdev" || die "rdma link add rxe0 type rxe netdev $netdev failed"
    dev=rxe0
    say "created rxe0 on $netdev"
  fi
  export GENIE_RDMA_DEVICE="$dev"
  exec "$@"
}

try_direct "$@" || true

# ---------------------------------------------------------------- VM mode

ensure_rdma_deps
CACHE="${GENIE_SOFTROCE_CACHE:-$REPO/target/softroce}"
mkdir -p "$CACHE"

kernel_version() {
  if [ -n "${GENIE_SOFTROCE_KERNEL:-}" ]; then
    echo "$GENIE_SOFTROCE_KERNEL"
    return
  fi
  local v
  # Reuse what is cached, so a later apt index change does not trigger a new download.
  v="$(find "$CACHE" -maxdepth 1 -name 'linux-*-amd64' -printf '%f\n' 2>/dev/null | sed 's/^linux-//' | sort -V | tail -1)"
  if [ -z "$v" ]; then
    v="$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -1)"
  fi
  if [ -z "$v" ]; then
    v="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{ sub("linux-image-", "", $1); print $1 }' | sort -V | tail -1)"
  fi
  [ -n "$v" ] || die "no linux-image-6.1.0-N-amd64 package found by apt-cache (is the Debian bookworm archive configured?)"
  echo "$v"
}

# Downloads one kernel package and extracts it into $KDIR (vmlinuz + modules with modules.dep).
prepare_kernel() {
  [ -f "$KDIR/.complete" ] && return
  say "downloading linux-image-$KVER (once; cached in $KDIR)"
  rm -rf "$KDIR" "$KDIR.tmp"
  mkdir -p "$KDIR.tmp/deb"
  (cd "$KDIR.tmp/deb" && apt-get download "linux-image-$KVER" >/dev/null 2>&1) ||
    (cd "$KDIR.tmp/deb" && apt-get update -qq && apt-get download "linux-image-$KVER") ||
    die "apt-get download linux-image-$KVER failed"
  dpkg-deb -x "$KDIR.tmp"/deb/*.deb "$KDIR.tmp/root"
  rm -rf "$KDIR.tmp/deb"
  depmod -b "$KDIR.tmp/root" "$KVER"
  touch "$KDIR.tmp/.complete"
  mv "$KDIR.tmp" "$KDIR"
}

# The guest's /init (busybox sh). Arguments come from the kernel command line:
# genie.run=<host path of the run directory> holding `cmd.sh`; the status goes to <run dir>/status.
write_init() {
  cat >"$1" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /host
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
run=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in genie.run=*) run="${arg#genie.run=}" ;; esac
done
fail() { echo "softroce-guest: $*" >/dev/console; echo "GENIE_SOFTROCE_EXIT=125"; poweroff -f; }
# crc32_generic first: without it rxe cannot compute ICRCs and `rdma link add` fails with ENOENT.
for m in $(cat /modules/order); do
  insmod "/modules/$m" || fail "insmod $m failed"
done
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose host /host || fail "mounting the host's / over 9p failed"
mount --rbind /proc /host/proc
mount --rbind /sys /host/sys
mount --rbind /dev /host/dev
mount -t tmpfs -o mode=755 run /host/run
ip link set lo up
hostname softroce
chroot /host /usr/bin/rdma link add rxe0 type rxe netdev lo || fail "rdma link add rxe0 failed"
[ -n "$run" ] || fail "no genie.run= on the kernel command line"
echo "GENIE_SOFTROCE_START"
chroot /host /bin/bash "$run/cmd.sh" </dev/console >/dev/console 2>&1
status=$?
echo "$status" >"/host$run/status"
sync
echo "GENIE_SOFTROCE_EXIT=$status"
poweroff -f
INIT
  chmod 755 "$1"
}

# Builds the initramfs: busybox, the modules rxe and 9p need, veth, bridge and the netem and tbf
# qdiscs (for tests that join network namespaces by emulated links), in dependency order, and /init.
prepare_initramfs() {
  if [ -f "$INITRD" ] && [ "$INITRD" -nt "$0" ]; then return; fi
  say "building the initramfs"
  local tmp="$CACHE/initramfs.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp/bin" "$tmp/modules"
  cp /bin/busybox "$tmp/bin/busybox"
  local m f
  : >"$tmp/modules/order"
  for m in crc32_generic virtio_pci 9pnet_virtio 9p rdma_rxe veth bridge sch_netem sch_tbf; do
    modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
  done | awk '!seen[$0]++' | while read -r f; do
    cp "$f" "$tmp/modules/"
    basename "$f" >>"$tmp/modules/order"
  done
  write_init "$tmp/init"
  (cd "$tmp" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  rm -rf "$tmp"
}

KVER="$(kernel_version)"
KDIR="$CACHE/linux-$KVER"
INITRD="$CACHE/initramfs-$KVER.img"
(
  flock 9
  prepare_kernel
  prepare_initramfs
) 9>"$CACHE/.lock"

# The run directory (under the shared filesystem) carries the command in and the status out.
mkdir -p "$CACHE/runs"
RUN="$(mktemp -d "$CACHE/runs/run.XXXXXX")"
trap 'rm -rf "$RUN"' EXIT
{
  echo "# generated by scripts/softroce.sh"
  # The caller's environment, minus what describes this host's session rather than the command's needs.
  export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_|HOSTNAME|SSH_[A-Z_]*|DISPLAY|DBUS_SESSION_BUS_ADDRESS|XDG_RUNTIME_DIR|TERM)='
  echo "export GENIE_RDMA_DEVICE=rxe0"
  echo "export TERM=dumb"
  printf 'cd %q || exit 125\n' "$PWD"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$RUN/cmd.sh"

# The guest's clock: qemu's emulated TSC is steady but the guest kernel, finding the vCPUs' TSCs
# unsynchronised at boot, falls back to the HPET, whose every read traps into the emulator (several
# microseconds under TCG). Every clock_gettime (Rust's Instant::now) would then be a slow syscall,
# unlike on any real machine, where the vDSO reads the TSC; perftest reads the TSC itself.
KERNEL_ARGS="${GENIE_SOFTROCE_KERNEL_ARGS-clocksource=tsc tsc=reliable}"
SMP="${GENIE_SOFTROCE_SMP:-$(nproc)}"
[ "$SMP" -gt 4 ] && SMP=4
set +e
# stdin is not forwarded (the serial console is the command's terminal). Only what the command prints
# (between the start and exit markers) is shown, without the console's escape sequences and carriage
# returns; the whole console goes to console.log, shown when the VM fails before reporting a status.
timeout --kill-after=10 "${GENIE_SOFTROCE_TIMEOUT:-3600}" \
  qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp "$SMP" -m "${GENIE_SOFTROCE_MEM:-2048}" \
  -nographic -no-reboot -nic none \
  -kernel "$KDIR/root/boot/vmlinuz-$KVER" -initrd "$INITRD" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1 $KERNEL_ARGS genie.run=$RUN" \
  -virtfs local,path=/,mount_tag=host,security_model=passthrough,multidevs=remap \
  </dev/null |
  tee "$RUN/console.log" |
  sed -u -e 's/\x1b[c]//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\r$//' \
    -e '0,/GENIE_SOFTROCE_START$/d' -e '/^GENIE_SOFTROCE_EXIT=/,$d'
rc=("${PIPESTATUS[@]}")
set -e
if [ "${rc[0]}" = 124 ] || [ "${rc[0]}" = 137 ]; then
  say "the VM ran past ${GENIE_SOFTROCE_TIMEOUT:-3600} s and was killed"
  exit 124
fi
if [ ! -s "$RUN/status" ]; then
  say "console output of the VM:"
  sed -e 's/\x1b[c]//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\r$//' "$RUN/console.log" | tail -40 >&2
  die "the VM stopped (qemu exit ${rc[0]}) without reporting the command's exit status"
fi
exit "$(cat "$RUN/status")"
