#!/usr/bin/env bash
# Installs what building and testing ftvm needs on a fresh Debian 12 machine.
# Idempotent: installs only what is missing. Run as root (or with sudo available).
set -euo pipefail

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v ld >/dev/null || need+=(binutils)
command -v unshare >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
# The nested-KVM harness (scripts/nested.sh): standard KVM inside QEMU TCG.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
# The Linux test guest (scripts/linux-guest.sh): ext4 disk images, module dependencies.
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v objcopy >/dev/null || need+=(binutils)
# tests/linux.rs unpacks the bzImage's XZ payload into an ELF vmlinux.
command -v xz >/dev/null || need+=(xz-utils)
# kmod/build.sh (the ftvm-rdtsc-exits KVM module, scripts/nested.sh --rdtsc-exits): an
# out-of-tree kernel module build (the kernel's headers and sources it downloads itself).
command -v make >/dev/null || need+=(make)
command -v patch >/dev/null || need+=(patch)
command -v python3 >/dev/null || need+=(python3)
command -v flock >/dev/null || need+=(util-linux)
# etcd as the pair's arbiter (tests/etcd.rs, tests/partition.rs, scripts/split-brain-drill.sh).
command -v etcd >/dev/null || need+=(etcd-server)
# Partition drills: network namespaces, veth pairs, netem (tests/partition.rs).
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
# Redis in the Linux test guest (tests/linux_redis.rs, scripts/lib/redis-net.sh): the client
# (redis-cli, redis-benchmark) and the server the guest image copies (redis-check-rdb, which
# is Debian's redis-server by another name); namespaces for the client (unshare, nsenter).
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v nsenter >/dev/null || need+=(util-linux)
command -v cargo >/dev/null || { echo "setup: cargo (Rust stable) is required" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    # The tests start their own etcd members on free ports; the package's system service
    # (on a machine with systemd) is not needed: stop what this script just installed.
    if [[ " ${need[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null \
        && [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi

# promtool checks and unit-tests the alert rules (deploy/prometheus/, tests/ops.rs). It comes
# from Debian's prometheus package, unpacked rather than installed: installing would also
# set up and start a Prometheus server on this machine.
if ! command -v promtool >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing promtool (from Debian's prometheus package)"
    [ ${#need[@]} -gt 0 ] || $sudo apt-get update -qq
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null) || {
        echo "setup: cannot download Debian's prometheus package (for promtool)" >&2
        exit 1
    }
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    $sudo install -m 755 "$tmp/root/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$tmp"
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true

# Fuzzing (scripts/fuzz.sh, run by CI): cargo-fuzz on the nightly toolchain. Without nightly
# ftvm builds and runs; scripts/fuzz.sh then fails and says why.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    command -v cargo-fuzz >/dev/null || {
        echo "setup: installing cargo-fuzz"
        cargo install cargo-fuzz --locked --quiet
    }
else
    echo "setup: no nightly Rust toolchain: scripts/fuzz.sh cannot run (rustup toolchain install nightly)" >&2
fi

if [ ! -e /dev/kvm ]; then
    echo "setup: /dev/kvm is missing: ftvm needs KVM (tests will fail)" >&2
    exit 1
fi
echo "setup: ok"
