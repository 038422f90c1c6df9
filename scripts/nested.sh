#!/usr/bin/env bash
# The nested-KVM harness: runs a command on a standard (hardware-style) /dev/kvm.
#
# /dev/kvm on the development machines is PVM. Standard KVM is had one level down: QEMU in
# TCG mode with `-cpu EPYC` emulates AMD SVM, and inside it a Debian kernel (the package
# linux-image-amd64 depends on) loads kvm-amd with nested=1. The host's root is shared into
# that VM read-only over virtio-9p, so the ftvm binaries built here run there as they are.
# The command runs as root in a chroot of the host root (cwd: the current directory), with
# the VM's own /dev, /proc, /sys and a writable /tmp (an overlay over the host's); its output
# comes back on stdout, and the harness exits with the command's exit status.
#
#   scripts/nested.sh [--timeout SECS] [--mem MIB] [--rdtsc-exits] -- COMMAND [ARG...]
#
# --rdtsc-exits: L1 loads the ftvm-rdtsc-exits kvm-amd.ko (kmod/, built and cached by
# kmod/build.sh) instead of Debian's, so guest RDTSC/RDTSCP exit to userspace under an MSR
# filter that denies reads of MSR 0x10. Its initramfs is cached apart from the stock one.
#
# Exit status: the command's; 124 if the VM ran past the timeout (default 600 s); 125 if the
# harness itself failed (no status line came back from the VM).
#
# First use installs qemu-system-x86, busybox-static and cpio from Debian, downloads the
# kernel package, and builds the VM's initramfs under target/nested/ (kept for later runs).
# NESTED_KEEP=1 keeps the VM's raw console log in /tmp/ftvm-nested.*/console.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

timeout_s=600
mem_mib=4096
rdtsc_exits=""
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout_s="$2"; shift 2 ;;
        --mem) mem_mib="$2"; shift 2 ;;
        --rdtsc-exits) rdtsc_exits=1; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ]; then
    echo "usage: scripts/nested.sh [--timeout SECS] [--mem MIB] [--rdtsc-exits] -- COMMAND [ARG...]" >&2
    exit 125
fi

fail() {
    echo "nested: $*" >&2
    exit 125
}

# --- what the harness needs -----------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "nested: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- the L1 kernel and its modules ------------------------------------------------------
cache="$repo/target/nested"
mkdir -p "$cache"
# The Debian kernel package, downloaded and unpacked on first use (scripts/lib/debian-kernel.sh).
# shellcheck source=scripts/lib/debian-kernel.sh
. "$repo/scripts/lib/debian-kernel.sh"
debian_kernel nested || exit 125
kpkg="$debian_kernel_pkg"
kver="$debian_kernel_version"
kernel="$debian_kernel_image"
moddir="$debian_kernel_moddir/kernel"

# Modules in load order (each after what it depends on).
modules=(
    drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci
    fs/netfs/netfs fs/fscache/fscache net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p
    virt/lib/irqbypass arch/x86/kvm/kvm drivers/crypto/ccp/ccp arch/x86/kvm/kvm-amd
    fs/overlayfs/overlay
    # Guests on a network (tests/linux_redis.rs, scripts/lib/redis-net.sh): TAP devices,
    # a bridge, veth pairs.
    drivers/net/tun net/llc/llc net/802/stp net/bridge/bridge drivers/net/veth
)

# --- the L1 initramfs ---------------------------------------------------------------------
initrd="$cache/initramfs-$kver.cpio.gz"
kvm_amd="$moddir/arch/x86/kvm/kvm-amd.ko"
if [ -n "$rdtsc_exits" ]; then
    kmod_out=$("$repo/kmod/build.sh" "$kver") || fail "kmod/build.sh $kver failed"
    kvm_amd="$kmod_out/kvm-amd.ko"
    initrd="$cache/initramfs-$kver-rdtsc-exits.cpio.gz"
fi
init_src="$repo/scripts/nested-init.sh"
if [ ! -e "$initrd" ] || [ "$init_src" -nt "$initrd" ] || [ "$0" -nt "$initrd" ] ||
    [ "$kvm_amd" -nt "$initrd" ]; then
    echo "nested: building the L1 initramfs" >&2
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    mkdir -p "$staging"/{bin,dev,proc,sys,host,modules,tmp}
    cp /bin/busybox "$staging/bin/busybox"
    for m in "${modules[@]}"; do
        src="$moddir/$m.ko"
        [ "$m" = arch/x86/kvm/kvm-amd ] && src="$kvm_amd"
        [ -e "$src" ] || fail "module $m.ko missing from $kpkg"
        cp "$src" "$staging/modules/"
        basename "$m" >>"$staging/modules/order"
    done
    cp "$init_src" "$staging/init"
    chmod +x "$staging/init"
    (cd "$staging" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$staging"
    trap - EXIT
fi

# --- the command ----------------------------------------------------------------------------
work=$(mktemp -d /tmp/ftvm-nested.XXXXXX)
[ -n "${NESTED_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
{
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'export PATH=/usr/local/cargo/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n'
    printf 'export HOME=/tmp CARGO_HOME=/tmp/cargo-home\n'
    for v in FTVM_LOG FTVM_DRILLS RUST_BACKTRACE; do
        [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$work/cmd.sh"

# TCG, SVM emulated by -cpu EPYC. One vCPU: with two, the VM's kernel soft-locked (both
# CPUs stuck, "watchdog: BUG: soft lockup") in about one run in three while KVM guests ran
# in it; with one, 10 runs of the suites in a row passed, no slower. NESTED_SMP overrides.
smp=${NESTED_SMP:-1}
set +e
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu EPYC -smp "$smp" -m "$mem_mib" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 ftvm.cmd=$work/cmd.sh" \
    -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
    -nographic -no-reboot -nodefaults -serial stdio -monitor none \
    </dev/null 2> >(grep -v "TCG doesn't support requested feature" >&2) |
    tee "$work/console" |
    # Only the command's output: what the VM prints between the two markers.
    # The status marker follows a newline of its own, so the line before it is empty
    # unless the command's last line had none.
    tr -d '\r' | awk '
        /ftvm-nested: running$/ { on = 1; next }
        /^ftvm-nested: exit status / { if (held && prev != "") print prev; on = 0; held = 0; next }
        on { if (held) print prev; prev = $0; held = 1; fflush() }'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "nested: the VM ran past ${timeout_s}s" >&2
    exit 124
fi
status=$(grep -a -o 'ftvm-nested: exit status [0-9]*' "$work/console" | tail -1 | awk '{print $4}')
[ -n "$status" ] || fail "the VM stopped without reporting the command's status (qemu exit $rc)"
exit "$status"
