# shellcheck shell=bash
# The L1 VM of the nested-KVM harnesses: scripts/nested.sh boots one, scripts/two-hosts.sh
# two ("host A" and "host B"). Sourced, not run: it only defines the functions below.
#
# The VM is QEMU in TCG mode with `-cpu EPYC` (AMD SVM emulated), running the Debian kernel
# (scripts/lib/debian-kernel.sh) with kvm-amd nested=1; the host's root is shared into it
# read-only over virtio-9p, and scripts/nested-init.sh (its PID 1) runs a command file in a
# chroot of it, prints "ftvm-nested: exit status N" on the console and powers off.
#
#   nested_vm_prepare TAG [rdtsc-exits]
#       Installs qemu-system-x86, busybox-static and cpio when missing, gets the kernel, and
#       builds (or finds cached under target/nested/) the initramfs. Sets nested_vm_kernel and
#       nested_vm_initrd. Returns 1 on failure (messages on stderr as "TAG: ...").
#   nested_vm_command_file FILE PROLOGUE COMMAND [ARG...]
#       Writes the command file the VM runs: cd to the current directory, PATH and HOME, the
#       FTVM_LOG, FTVM_DRILLS, FTVM_TSC_MEASURES and RUST_BACKTRACE passed on, PROLOGUE (shell
#       text, may be empty), then exec COMMAND.
#   nested_vm_qemu_args SMP MEM_MIB CMD_FILE [EXTRA_APPEND]
#       Sets the array nested_vm_args: QEMU's options for such a VM (serial on stdio; the
#       caller adds its own devices).
#   nested_vm_output [PREFIX]
#       A filter from the VM's console to the command's output alone (what the VM printed
#       between init's two markers), each line after PREFIX.
#   nested_vm_status CONSOLE_FILE
#       Prints the exit status the VM reported on its console; nothing if none.

# Modules in load order (each after what it depends on): virtio-9p for the host's root, KVM,
# overlayfs for /tmp, and the network pieces of the two-host harness (virtio-net for the link
# between the hosts, the bridge, TAP and veth).
nested_vm_modules=(
    drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci
    fs/netfs/netfs fs/fscache/fscache net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p
    virt/lib/irqbypass arch/x86/kvm/kvm drivers/crypto/ccp/ccp arch/x86/kvm/kvm-amd
    fs/overlayfs/overlay
    net/core/failover drivers/net/net_failover drivers/net/virtio_net
    net/llc/llc net/802/stp net/bridge/bridge drivers/net/tun drivers/net/veth
)

nested_vm_prepare() {
    local tag="$1" rdtsc_exits="${2:-}"
    local repo need sudo cache kver moddir initrd kvm_amd init_src kmod_out staging m src
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

    need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
    command -v cpio >/dev/null || need+=(cpio)
    if [ ${#need[@]} -gt 0 ]; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "$tag: installing ${need[*]}" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null ||
            return 1
    fi

    cache="$repo/target/nested"
    mkdir -p "$cache" || return 1
    # shellcheck source=scripts/lib/debian-kernel.sh
    . "$repo/scripts/lib/debian-kernel.sh"
    debian_kernel "$tag" || return 1
    kver="$debian_kernel_version"
    moddir="$debian_kernel_moddir/kernel"

    initrd="$cache/initramfs-$kver.cpio.gz"
    kvm_amd="$moddir/arch/x86/kvm/kvm-amd.ko"
    if [ -n "$rdtsc_exits" ]; then
        kmod_out=$("$repo/kmod/build.sh" "$kver") || {
            echo "$tag: kmod/build.sh $kver failed" >&2
            return 1
        }
        kvm_amd="$kmod_out/kvm-amd.ko"
        initrd="$cache/initramfs-$kver-rdtsc-exits.cpio.gz"
    fi
    init_src="$repo/scripts/nested-init.sh"
    if [ ! -e "$initrd" ] || [ "$init_src" -nt "$initrd" ] || [ "${BASH_SOURCE[0]}" -nt "$initrd" ] ||
        [ "$kvm_amd" -nt "$initrd" ]; then
        echo "$tag: building the L1 initramfs" >&2
        staging=$(mktemp -d) || return 1
        mkdir -p "$staging"/{bin,dev,proc,sys,host,modules,tmp}
        cp /bin/busybox "$staging/bin/busybox"
        for m in "${nested_vm_modules[@]}"; do
            src="$moddir/$m.ko"
            [ "$m" = arch/x86/kvm/kvm-amd ] && src="$kvm_amd"
            if [ ! -e "$src" ]; then
                echo "$tag: module $m.ko missing from $debian_kernel_pkg" >&2
                rm -rf "$staging"
                return 1
            fi
            cp "$src" "$staging/modules/"
            basename "$m" >>"$staging/modules/order"
        done
        cp "$init_src" "$staging/init"
        chmod +x "$staging/init"
        # A temporary name of this process's own, renamed into place: two harnesses that
        # build at once each leave a whole file.
        (cd "$staging" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.$$"
        mv "$initrd.$$" "$initrd"
        rm -rf "$staging"
    fi
    # For the caller.
    # shellcheck disable=SC2034
    {
        nested_vm_kernel="$debian_kernel_image"
        nested_vm_initrd="$initrd"
    }
}

nested_vm_command_file() {
    local file="$1" prologue="$2" v
    shift 2
    {
        printf 'cd %q || exit 125\n' "$PWD"
        printf 'export PATH=/usr/local/cargo/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n'
        printf 'export HOME=/tmp CARGO_HOME=/tmp/cargo-home\n'
        for v in FTVM_LOG FTVM_DRILLS FTVM_TSC_MEASURES RUST_BACKTRACE; do
            [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}"
        done
        [ -n "$prologue" ] && printf '%s\n' "$prologue"
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$file"
}

nested_vm_qemu_args() {
    local smp="$1" mem="$2" cmd_file="$3" append="${4:-}"
    # For the caller.
    # shellcheck disable=SC2034
    nested_vm_args=(
        -accel tcg,thread=multi -cpu EPYC -smp "$smp" -m "$mem"
        -kernel "$nested_vm_kernel" -initrd "$nested_vm_initrd"
        -append "console=ttyS0 quiet loglevel=3 panic=-1 ftvm.cmd=$cmd_file${append:+ $append}"
        -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"
        -nographic -no-reboot -nodefaults -serial stdio -monitor none
    )
}

nested_vm_output() {
    # The status marker follows a newline of its own, so the line before it is empty unless
    # the command's last line had none.
    tr -d '\r' | awk -v prefix="${1:-}" '
        /ftvm-nested: running$/ { on = 1; next }
        /^ftvm-nested: exit status / { if (held && prev != "") print prefix prev; on = 0; held = 0; next }
        on { if (held) print prefix prev; prev = $0; held = 1; fflush() }'
}

nested_vm_status() {
    { grep -a -o 'ftvm-nested: exit status [0-9]*' "$1" 2>/dev/null || true; } | tail -1 | awk '{print $4}'
}
