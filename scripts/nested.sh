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

# --- the L1 VM: packages, kernel, initramfs (scripts/lib/nested-vm.sh) ---------------------
# shellcheck source=scripts/lib/nested-vm.sh
. "$repo/scripts/lib/nested-vm.sh"
nested_vm_prepare nested ${rdtsc_exits:+rdtsc-exits} || exit 125

# --- the command ----------------------------------------------------------------------------
work=$(mktemp -d /tmp/ftvm-nested.XXXXXX)
[ -n "${NESTED_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
nested_vm_command_file "$work/cmd.sh" "" "$@"

# TCG, SVM emulated by -cpu EPYC. One vCPU: with two, the VM's kernel soft-locked (both
# CPUs stuck, "watchdog: BUG: soft lockup") in about one run in three while KVM guests ran
# in it; with one, 10 runs of the suites in a row passed, no slower. NESTED_SMP overrides.
smp=${NESTED_SMP:-1}
set +e
nested_vm_qemu_args "$smp" "$mem_mib" "$work/cmd.sh"
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 "${nested_vm_args[@]}" \
    </dev/null 2> >(grep -v "TCG doesn't support requested feature" >&2) |
    tee "$work/console" | nested_vm_output
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "nested: the VM ran past ${timeout_s}s" >&2
    exit 124
fi
status=$(nested_vm_status "$work/console")
[ -n "$status" ] || fail "the VM stopped without reporting the command's status (qemu exit $rc)"
exit "$status"
