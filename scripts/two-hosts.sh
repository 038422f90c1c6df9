#!/usr/bin/env bash
# The two-host harness (issue 17): two L1 VMs, "host A" and "host B", each the nested-KVM
# harness's VM (scripts/lib/nested-vm.sh: QEMU TCG with emulated SVM, the Debian kernel with
# kvm-amd nested=1, this host's root read-only over 9p, a writable /tmp overlay) with one
# vCPU, its own kernel and its own /dev/kvm, joined by a virtual link, each running a command.
#
#   scripts/two-hosts.sh [--timeout SECS] [--mem MIB] --a COMMAND_A --b COMMAND_B
#
# COMMAND_A and COMMAND_B are shell command lines, run by bash as root in the repository's
# directory on host A and host B. Their output comes back on stdout, each line after "A: "
# or "B: ", as it is printed; the harness's own lines go to stderr after "two-hosts: ".
#
# The network, set up on each host before its command runs:
#   - the link: a second NIC (virtio-net, eth0) in each VM, joined to the other's by QEMU's
#     UDP socket netdev on 127.0.0.1 (a cable: when one host dies the other just hears
#     nothing more, as after a power cut);
#   - br0, a bridge with eth0 on it, addressed 192.168.100.1/24 on A and .2 on B: the
#     replication channel runs between these addresses, across the link;
#   - ftvm0, a TAP on br0 for ftvm's `--net tap=ftvm0`;
#   - on host B only, the client's network namespace `client` (`ip netns exec client ...`):
#     its eth0 (192.168.100.10/24) is one end of a veth pair whose other end is a port of
#     B's br0. The client thus reaches the guest on A across the link, and on B on B's own
#     bridge once the guest moves there, without knowing which; it survives host A's loss.
#   IPv6 is off on all of them (no chatter through the guests' logs).
#
# Shared directory: $TWO_HOSTS_DIR, the same path on this host and on both VMs (a writable
# virtio-9p share of a scratch directory here), for requests, markers and results between
# the two commands and the harness. $TWO_HOSTS_HOST is `a` or `b`.
#
# Host loss: creating the file $TWO_HOSTS_DIR/kill-host-a (from either command, or from
# here) makes the harness SIGKILL host A's QEMU process at once (it looks every 20 ms): the
# whole host is gone, its kernel, its processes and its end of the link, and nobody on host B
# is told. (kill-host-b does the same to host B.) When it has done so, the harness creates
# $TWO_HOSTS_DIR/host-a-lost and prints "two-hosts: host A lost ..." on stderr.
#
# Exit status: 0 when every host that was not killed on request reported status 0; else
# the first non-zero status of host A's, then host B's command; 124 if a VM ran past the
# timeout (default 900 s); 125 if the harness itself failed (a VM reported no status).
# NESTED_KEEP=1 keeps the scratch directory (consoles, shared directory) under
# /tmp/ftvm-two-hosts.*.
#
# Two TCG VMs take both cores of a small machine: where other harness runs share it, run
# one at a time (e.g. each under `flock` of one lock file).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

usage() {
    echo "usage: scripts/two-hosts.sh [--timeout SECS] [--mem MIB] --a COMMAND_A --b COMMAND_B" >&2
    exit 125
}
timeout_s=900
mem_mib=2048
cmd_a=""
cmd_b=""
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case "$1" in
        --timeout) timeout_s="${2:-}"; shift 2 ;;
        --mem) mem_mib="${2:-}"; shift 2 ;;
        --a) cmd_a="${2:-}"; shift 2 ;;
        --b) cmd_b="${2:-}"; shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$cmd_a" ] && [ -n "$cmd_b" ] || usage
[[ "$timeout_s" =~ ^[0-9]+$ ]] && [[ "$mem_mib" =~ ^[0-9]+$ ]] || usage

# shellcheck source=scripts/lib/nested-vm.sh
. "$repo/scripts/lib/nested-vm.sh"
nested_vm_prepare two-hosts || exit 125

work=$(mktemp -d /tmp/ftvm-two-hosts.XXXXXX)
shared="$work/shared"
mkdir -p "$shared"
cleanup() {
    local h pid
    for h in a b; do
        pid=$(cat "$work/$h.pid" 2>/dev/null) || continue
        kill -9 "$pid" 2>/dev/null || true
    done
    [ -n "${NESTED_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The network of host $1 (a or b), its last address byte $2: shell text run before the
# command (scripts/nested-init.sh has loaded virtio-net, bridge, tun and veth).
network_prologue() {
    local host="$1" n="$2"
    cat <<PROLOGUE
export TWO_HOSTS_DIR=$(printf %q "$shared") TWO_HOSTS_HOST=$host
# The setup runs in a bash of its own with -e: it stops at the first step that fails.
if ! bash -eu <<'SETUP'
# ip netns keeps its namespaces under /run, read-only here (the host's root).
mount -t tmpfs tmpfs /run
mkdir -p "\$TWO_HOSTS_DIR"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 shared "\$TWO_HOSTS_DIR"
echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6
echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6
ip link set lo up
ip link add br0 type bridge
ip link set eth0 master br0
ip tuntap add dev ftvm0 mode tap
ip link set ftvm0 master br0
ip addr add 192.168.100.$n/24 dev br0
ip link set eth0 up
ip link set ftvm0 up
ip link set br0 up
if [ "\$TWO_HOSTS_HOST" = b ]; then
    ip netns add client
    ip link add cl0 type veth peer name cl1
    ip link set cl1 netns client
    ip -n client link set cl1 name eth0
    ip link set cl0 master br0
    ip link set cl0 up
    ip -n client link set lo up
    ip -n client addr add 192.168.100.10/24 dev eth0
    ip -n client link set eth0 up
fi
SETUP
then
    echo "two-hosts: host $host: network setup failed" >&2
    exit 125
fi
PROLOGUE
}

nested_vm_command_file "$work/a.sh" "$(network_prologue a 1)" bash -c "$cmd_a"
nested_vm_command_file "$work/b.sh" "$(network_prologue b 2)" bash -c "$cmd_b"

# The link's two UDP ports on 127.0.0.1, apart for runs of other processes.
port_a=$((20000 + ($$ % 20000) * 2))
port_b=$((port_a + 1))

# Host $1 (a or b): its QEMU in the background of a pipeline that prefixes its output; the
# QEMU's own pid goes to $work/$1.pid (for host loss), its exit code to $work/$1.rc.
start_host() {
    local h="$1" name="$2" mac="$3" local_port="$4" remote_port="$5"
    nested_vm_qemu_args 1 "$mem_mib" "$work/$h.sh"
    set +e
    timeout -k 10 "$timeout_s" qemu-system-x86_64 "${nested_vm_args[@]}" \
        -pidfile "$work/$h.pid" \
        -virtfs "local,path=$shared,mount_tag=shared,security_model=none" \
        -netdev "socket,id=link,udp=127.0.0.1:$remote_port,localaddr=127.0.0.1:$local_port" \
        -device "virtio-net-pci,netdev=link,mac=$mac" \
        </dev/null 2> >(grep --line-buffered -v "TCG doesn't support requested feature" |
            sed -u "s/^/$name: /" >&3) |
        tee "$work/$h.console" | nested_vm_output "$name: "
    echo "${PIPESTATUS[0]}" >"$work/$h.rc.tmp"
    mv "$work/$h.rc.tmp" "$work/$h.rc"
}
# The QEMUs' stderr goes to fd 3; the subshells' own (bash's "Killed" note on a lost host)
# nowhere.
exec 3>&2
start_host a A 52:54:00:fe:00:0a "$port_a" "$port_b" 2>/dev/null &
start_host b B 52:54:00:fe:00:0b "$port_b" "$port_a" 2>/dev/null &

# Host loss on request; the loop ends when both VMs have.
declare -A lost=()
while [ ! -e "$work/a.rc" ] || [ ! -e "$work/b.rc" ]; do
    for h in a b; do
        [ -e "$shared/kill-host-$h" ] && [ -z "${lost[$h]:-}" ] || continue
        pid=$(cat "$work/$h.pid" 2>/dev/null) || continue
        [ -e "$work/$h.rc" ] && continue
        kill -9 "$pid" 2>/dev/null || true
        lost[$h]=1
        : >"$shared/host-$h-lost"
        echo "two-hosts: host ${h^^} lost: its QEMU (pid $pid) SIGKILLed on request" >&2
    done
    # 50 Hz: this machine's cores run the hosts' QEMUs.
    sleep 0.02
done
wait

status=0
timed_out=""
for h in a b; do
    rc=$(cat "$work/$h.rc")
    st=$(nested_vm_status "$work/$h.console")
    if [ -n "${lost[$h]:-}" ]; then
        continue
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "two-hosts: host ${h^^} ran past ${timeout_s}s" >&2
        timed_out=1
    elif [ -z "$st" ]; then
        echo "two-hosts: host ${h^^} stopped without reporting its command's status (qemu exit $rc)" >&2
        [ "$status" -ne 0 ] || status=125
    else
        echo "two-hosts: host ${h^^}: exit status $st" >&2
        [ "$status" -ne 0 ] || status="$st"
    fi
done
[ -z "$timed_out" ] || exit 124
exit "$status"
