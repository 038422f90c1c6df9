#!/usr/bin/env bash
# One Redis failover drill on the two-host harness (issue 17): the protected Linux test guest
# runs `redis-server` (the `redis` workload, appendfsync always on its virtio disk) with its
# primary on host A and its standby on host B of scripts/two-hosts.sh, each on its own copy
# of the disk and its own TAP (`ftvm0` on the host's bridge). The client (Debian's
# redis-cli, scripts/lib/redis-net.sh) and the pair's witness run in host B's `client`
# namespace, a third party on the network. The client writes numbered keys over one
# connection; once K are acknowledged it asks for the loss and goes on writing to the same
# guest address:
#
#   process   host A's command sends SIGKILL to the primary's ftvm process;
#   host      the harness SIGKILLs host A's QEMU (its whole host, kernel and link end, gone).
#
# Then the client reads back every acknowledged key from the guest (now on host B), shuts
# the server down (the guest ends, the standby exits with its status) and host B checks its
# copy of the disk: e2fsck -n and the keys in the AOF.
#
# When protection begins (REDIS_HOSTS_PROTECT):
#   join   (default) the primary starts alone (`--accept-standby`) and the guest boots and
#          starts Redis unprotected; the client connects (redis-cli's start, a PING); then
#          the standby joins the running guest (`--join`: memory pre-copy, disk resync,
#          stop-and-copy) and the writes begin only once it follows in lockstep. This is
#          how a running service is protected, and it keeps the boot, which repairs make
#          slow and uneven under TCG (3 to 7 minutes at stop 26), out of the drill; the
#          writes, the loss and the failover are protected as in `boot`.
#   boot   the pair is protected from the guest's first instruction (`--peer`).
# REDIS_GUEST_EXTRA adds words to the guest's command line (as in redis-net.sh),
# REDIS_RUN_EXTRA options to the primary's `ftvm run` (e.g. --max-epoch-ms 100).
#
#   scripts/lib/redis-hosts.sh process|host FTVM KERNEL INITRD DISK KEY [N [K]]
#
# KERNEL and INITRD are `scripts/linux-guest.sh`'s kernel= and initrd_redis=, DISK a fresh
# ext4 image (`scripts/linux-guest.sh disk`), KEY a pair key (`ftvm keygen`): paths on this
# host, which both hosts see read-only. N writes (default 30), the loss after K (default
# N/3). Output: the two hosts' lines after "A: " and "B: " (two-hosts.sh); host B prints
# the key=value lines of redis-scenario.sh's kill mode (`acked=`, `read-back ...`,
# `failover-ms=`, `connection-survived=`, `standby-status=`, `disk-fsck-clean=`,
# `disk-has-acked=`, ...) and `loss-done-at-ms=`. Exit status: scripts/two-hosts.sh's (0
# when host B's command, and host A's unless lost, ended 0; the checks are the caller's).
# Needs root; takes both cores (run it under the lock other harness runs take).
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 6 ] || ! [[ "$1" =~ ^(process|host)$ ]]; then
    echo "usage: scripts/lib/redis-hosts.sh process|host FTVM KERNEL INITRD DISK KEY [N [K]]" >&2
    exit 2
fi
loss="$1" ftvm="$2" kernel="$3" initrd="$4" disk="$5" key="$6"
n="${7:-30}"
k="${8:-$((n / 3))}"
protect="${REDIS_HOSTS_PROTECT:-join}"
if ! [[ "$protect" =~ ^(join|boot)$ ]]; then
    echo "redis-hosts.sh: REDIS_HOSTS_PROTECT must be join or boot, not $protect" >&2
    exit 2
fi
if [ "$loss" = process ]; then
    request=kill-primary done=primary-killed
else
    request=kill-host-a done=host-a-lost
fi

# The guest's address on the hosts' network (192.168.100.1 and .2 are the hosts' bridges,
# .10 the client).
guest_ip=192.168.100.20
q() { printf '%q' "$1"; }
# Both hosts: the heartbeat and bounds of the one-host scenarios (TCG: a pair process can be
# kept off its CPU for a good part of a second; REDIS_HEARTBEAT_TIMEOUT_MS sets the
# timeout, default 3000), the witness in B's client namespace.
pair="--key $(q "$key") --witness 192.168.100.10:7500 --heartbeat-ms 200 \
--heartbeat-timeout-ms ${REDIS_HEARTBEAT_TIMEOUT_MS:-3000} --max-lag-ms 86400000 --max-slowed-ms 86400000 \
--max-standby-backlog-mib 4096"
guest="--kernel $(q "$kernel") --initrd $(q "$initrd") --mem-mib 256 \
--append 'ftvm.workload=redis ftvm.ip=$guest_ip/24${REDIS_GUEST_EXTRA:+ $REDIS_GUEST_EXTRA}'"
d='"$TWO_HOSTS_DIR"'

# The diagnosis each host keeps in the shared directory (diag-a.txt, diag-b.txt), readable
# from this host while the drill runs: every 5 s its pair process's `ftvm status` and its
# threads (name, state, CPU ticks, kernel wait channel). Creating stacks-request in the
# shared directory (from here, e.g. when the drill looks stuck) makes each host write every
# thread's stack of its pair process to stacks-HOST.txt once (needs gdb).
monitor() {
    local pid="$1" control="$2"
    cat <<M
( while kill -0 $pid 2>/dev/null; do
    redis_diag_sample $(q "$ftvm") $(q "$key") $control $pid >>$d/diag-\$TWO_HOSTS_HOST.txt 2>&1
    if [ -e $d/stacks-request ] && [ ! -e $d/stacks-\$TWO_HOSTS_HOST.txt ] && command -v gdb >/dev/null; then
      timeout 300 gdb -batch -nx -p $pid -ex 'thread apply all bt 20' >$d/stacks-\$TWO_HOSTS_HOST.txt 2>&1
    fi
    sleep 5
  done ) &
M
}

if [ "$protect" = join ]; then
    # Host A listens on its bridge's address for the standby that joins.
    rendezvous_a="--accept-standby 192.168.100.1:7070"
    rendezvous_b="--join 192.168.100.1:7070"
else
    rendezvous_a="--peer 192.168.100.2:7070 --connect-timeout-ms 600000"
    rendezvous_b="--listen 192.168.100.2:7070"
fi

# Host B's standby, started by its command: at once (boot) or once the client is connected
# (join).
standby_b=$(
    cat <<S
FTVM_LOG=ftvm=info,ftvm_secondary::standby=info $(q "$ftvm") standby $rendezvous_b \
    --disk /tmp/copy.img --net tap=ftvm0 $pair --control 127.0.0.1:7100 \
    >$d/standby.out 2>$d/standby.err &
s=\$!
$(monitor '$s' 127.0.0.1:7100)
S
)
if [ "$protect" = join ]; then
    standby_at_start=":"
    standby_to_join="$standby_b"
else
    standby_at_start="$standby_b"
    standby_to_join=":"
fi

host_a=$(
    cat <<A
. scripts/lib/redis-net.sh
cp $(q "$disk") /tmp/disk.img || exit 3
FTVM_LOG=ftvm=info $(q "$ftvm") run $rendezvous_a ${REDIS_RUN_EXTRA:-} \
    $guest --disk /tmp/disk.img --net tap=ftvm0 --latency-bound-ms 50 $pair \
    --control 127.0.0.1:7100 >$d/primary.out 2>$d/primary.err &
p=\$!
$(monitor '$p' 127.0.0.1:7100)
echo "primary started"
if [ $loss = host ]; then
    wait \$p
    echo "primary ended (status \$?) before its host was lost"
    tail -20 $d/primary.err
    exit 3
fi
# Polled at 5 Hz: this host has one CPU, and a tighter loop of forks would slow the primary.
while [ ! -e $d/$request ]; do
    kill -0 \$p 2>/dev/null || { echo "primary ended before the kill"; tail -20 $d/primary.err; exit 3; }
    sleep 0.2
done
kill -9 \$p
: >$d/$done
echo "primary killed"
wait \$p
exit 0
A
)

host_b=$(
    cat <<B
REDIS_GUEST_IP=$guest_ip
. scripts/lib/redis-net.sh
dir=/tmp/redis-drill
mkdir -p \$dir/client
cp $(q "$disk") /tmp/copy.img || exit 3
ip netns exec client $(q "$ftvm") witness --listen 192.168.100.10:7500 --state /tmp/witness.terms \
    >$d/witness.out 2>&1 &
w=\$!
$standby_at_start
# The client's commands run in the namespace of this holder (redis-net.sh's rcli).
ip netns exec client sleep 100000 &
REDIS_CLIENT_PID=\$!
fail() {
    echo "\$1"
    echo "--- primary stderr (tail)"; grep -v 'checkpoint installed\|asking for a repair' $d/primary.err | tail -15
    echo "--- primary stdout (tail)"; tail -5 $d/primary.out
    echo "--- standby stderr (tail)"; grep -v 'checkpoint installed\|asking for a repair' $d/standby.err | tail -15
    kill -9 \$s \$w \$REDIS_CLIENT_PID 2>/dev/null
    exit 3
}
t0=\$(date +%s)
until [ "\$(rcli_within 20 PING 2>/dev/null)" = PONG ]; do
    [ -z "\${s:-}" ] || kill -0 \$s 2>/dev/null || fail "the standby ended before Redis answered"
    [ \$((\$(date +%s) - t0)) -lt 1200 ] || fail "no PONG in 1200 s"
    sleep 1
done
echo "ready-after-s=\$((\$(date +%s) - t0))"
redis_writes \$dir/client 1 $n \$dir/client/go &
wp=\$!
until [ -e \$dir/client/connected ]; do
    kill -0 \$wp 2>/dev/null || fail "the client never connected"
    sleep 0.05
done
$standby_to_join
until grep -q 'synced: following' $d/standby.err 2>/dev/null || [ $protect = boot ]; do
    kill -0 \$s 2>/dev/null || fail "the standby ended before it followed the primary"
    [ \$((\$(date +%s) - t0)) -lt 1500 ] || fail "the standby did not follow in 1500 s"
    sleep 0.5
done
echo "protected-after-s=\$((\$(date +%s) - t0))"
: >\$dir/client/go
# The loops from here on share this host's one CPU with the standby: builtins and a few
# forks a second (a write takes seconds while protected).
progress=0
until [ "\$progress" -ge $k ]; do
    kill -0 \$wp 2>/dev/null || fail "the writes ended before $k were acknowledged"
    sleep 0.25
    read -r progress 2>/dev/null <\$dir/client/progress || progress=0
done
: >$d/$request
asked=\$SECONDS
until [ -e $d/$done ]; do
    [ \$((SECONDS - asked)) -lt 120 ] || fail "the loss was never done"
    sleep 0.02
done
killed=\$(date +%s%3N)
echo "loss-done-at-ms=\$killed"
wait \$wp || echo "writes-failed"
echo "acked=\$(wc -l <\$dir/client/acked)"
redis_failover_report \$dir/client \$killed
redis_read_back \$dir/client
grep -m1 're-emitting output from sequence' $d/standby.err
grep -q 'going live' $d/standby.err && echo "standby: went live"
rcli_within 300 SHUTDOWN >/dev/null 2>&1
wait \$s
echo "standby-status=\$?"
redis_check_disk \$dir /tmp/copy.img
kill \$w \$REDIS_CLIENT_PID 2>/dev/null
wait \$w 2>/dev/null
exit 0
B
)

if [ -n "${REDIS_HOSTS_PRINT:-}" ]; then
    # The two hosts' commands, for a look at what would run.
    printf '%s\n--- host B\n%s\n' "$host_a" "$host_b"
    exit 0
fi
exec scripts/two-hosts.sh --timeout "${REDIS_HOSTS_TIMEOUT:-2400}" --a "$host_a" --b "$host_b"
