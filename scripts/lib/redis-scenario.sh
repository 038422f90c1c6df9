#!/usr/bin/env bash
# One scripted Redis run of the Linux test guest (issue 17) on standard KVM, run inside the
# nested harness by tests/linux_redis.rs, scripts/redis-drill.sh and benches/redis.rs:
#
#   scripts/nested.sh -- scripts/lib/redis-scenario.sh MODE FTVM KERNEL INITRD DISK DIR [N [K]]
#
# KERNEL and INITRD are `scripts/linux-guest.sh`'s kernel= and initrd_redis= (the initramfs
# that holds Redis). The guest runs the `redis` workload (ftvm.ip=, redis-server on /dev/vda, see
# guest/linux/README.md) behind `--net tap=`, its TAPs on a bridge, the client in a network
# namespace on a veth port of it (scripts/lib/redis-net.sh). DISK is a fresh ext4 image
# (scripts/linux-guest.sh disk), DIR a directory for the logs and the client's records.
# MODE:
#   plain      unprotected: `ftvm run`; N writes (default 30) over one connection, read back,
#              SHUTDOWN
#   protected  the same under a protected pair (the standby on its own copy DIR/copy.img)
#   kill       protected; `kill -9` of the primary once K writes (default N/3) are
#              acknowledged; the writes go on to N over the same connection, every
#              acknowledged key is read back, SHUTDOWN ends the guest on the standby
#   bench      unprotected, then protected: redis-benchmark -n N (default 200) -t set,get
#              against the guest, then SHUTDOWN
# It prints key=value lines: `acked=`, `read-back acked= missing= wrong=`, `*-status=`,
# `disk-fsck-clean=yes|no` (DISK, or the standby's copy), `disk-keys=` (keys in its AOF),
# `disk-keys-sha256=` (of its sorted "KEY VALUE" lines), each as `disk-key KEY VALUE`, and
# `disk-has-acked=yes|no`; kill adds `killed-at-ms=`, `last-ack-before-kill-ms=`,
# `first-ack-after-kill-ms=`, `failover-ms=`, `median-ack-ms=` (the median gap between
# acknowledgements before the kill: a write's round trip) and `connection-survived=yes|no` (no error
# answer, i.e. no reset or refused connection, after the kill); bench prints
# `bench MODE TEST RPS` lines, `bench-ms MODE MS` (how long redis-benchmark ran) and, for the
# protected run, `bench-traffic net_rx_bytes=N` (and net_rx_frames, net_tx_bytes, net_tx_frames:
# the recorder's counts of the guest's frames). It exits 0 when the run went through (the checks are the
# caller's), non-zero when the setup failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/redis-net.sh

if [ $# -lt 6 ]; then
    echo "usage: scripts/lib/redis-scenario.sh plain|protected|kill|bench FTVM KERNEL INITRD DISK DIR [N [K]]" >&2
    exit 2
fi
mode="$1" ftvm="$2" kernel="$3" initrd="$4" disk="$5" dir="$6"
case "$mode" in
    bench) n="${7:-200}" ;;
    *) n="${7:-30}" ;;
esac
k="${8:-$((n / 3))}"
mkdir -p "$dir" || exit 2

# The harness's VM runs the VMM under TCG on one emulated CPU (see tests/linux.rs's
# PAIR_OPTIONS for why these bounds).
pair_options=(--heartbeat-ms 200 --heartbeat-timeout-ms 3000 --max-lag-ms 86400000
    --max-slowed-ms 86400000 --max-standby-backlog-mib 4096)
guest=(--kernel "$kernel" --initrd "$initrd" --mem-mib 256 --append "$REDIS_GUEST_APPEND")

ip link set lo up
br=fbr$$
redis_net_bridge "$br" "${br}a" "${br}b" || exit 3
redis_net_client "$br" || exit 3
cleanup() {
    redis_net_down
    ip link del "${br}-c" 2>/dev/null
    for t in "${br}a" "${br}b" "$br"; do ip link del "$t" 2>/dev/null; done
}
trap cleanup EXIT

# start_plain DISK: the unprotected guest on DISK, `$pp`.
start_plain() {
    FTVM_LOG=ftvm=info "$ftvm" run "${guest[@]}" --disk "$1" --net "tap=${br}a" \
        >"$dir/p.out" 2>"$dir/p.err" &
    pp=$!
}

# start_pair DISK: the standby (`$sp`, on DIR/copy.img, a copy of DISK) and the primary (`$pp`).
start_pair() {
    cp "$1" "$dir/copy.img" || exit 3
    "$ftvm" keygen --out "$dir/pair.key" >/dev/null || exit 3
    FTVM_LOG="${STANDBY_LOG:-ftvm_secondary::standby=info}" "$ftvm" standby --listen 127.0.0.1:7000 \
        --disk "$dir/copy.img" --net "tap=${br}b" "${pair_options[@]}" --key "$dir/pair.key" \
        --control 127.0.0.1:7101 >"$dir/s.out" 2>"$dir/s.err" &
    sp=$!
    FTVM_LOG=ftvm=info "$ftvm" run --peer 127.0.0.1:7000 --connect-timeout-ms 30000 \
        "${guest[@]}" --disk "$1" --net "tap=${br}a" --latency-bound-ms 50 \
        "${pair_options[@]}" --key "$dir/pair.key" --control 127.0.0.1:7100 \
        >"$dir/p.out" 2>"$dir/p.err" &
    pp=$!
    [ -z "${REDIS_DIAG:-}" ] || { monitor >"$dir/diag.log" 2>&1 & }
}

# monitor: with REDIS_DIAG=1, every 5 s each VMM's `ftvm status` and its threads' CPU ticks
# (utime+stime) into DIR/diag.log, so a stall shows whether the guest runs, halts or waits.
monitor() {
    while kill -0 "$pp" 2>/dev/null; do
        redis_diag_sample "$ftvm" "$dir/pair.key" 127.0.0.1:7100 "$pp"
        [ -z "${sp:-}" ] || redis_diag_sample "$ftvm" "$dir/pair.key" 127.0.0.1:7101 "$sp"
        sleep 5
    done
}

# ready: until the guest's server answers (or the VMM ended, or READY_S seconds passed);
# every 60 s a line on how far the guest got.
ready() {
    local t0 last=0
    t0=$(date +%s)
    until [ "$(rcli_within 20 PING 2>/dev/null)" = PONG ]; do
        if ! kill -0 "$pp" 2>/dev/null; then
            echo "the primary ended before Redis answered"
            tails
            return 1
        fi
        if [ $(($(date +%s) - t0)) -ge "${READY_S:-600}" ]; then
            echo "no PONG in ${READY_S:-600} s"
            tails
            stacks
            return 1
        fi
        if [ $(($(date +%s) - last)) -ge 60 ]; then
            last=$(date +%s)
            echo "waiting for Redis, $((last - t0)) s: the guest's last line: $(grep -v '^\[' "$dir/p.out" | tail -1)"
            [ -z "${REDIS_DIAG_TRACE:-}" ] || kvm_exits_sample 2>&1
        fi
        sleep 1
    done
    echo "ready-after-s=$(($(date +%s) - t0))"
}

# kvm_exits_sample: with REDIS_DIAG_TRACE=1, the primary's threads' CPU ticks and 2 s of this
# kernel's kvm_exit/kvm_inj_virq/kvm_pio events (the guest's RIP at each exit), to tell a guest
# that spins without exits from one that halts or waits on a device.
kvm_exits_sample() {
    local t=/sys/kernel/tracing e
    [ -d "$t/events/kvm" ] || mount -t tracefs nodev "$t" || return 0
    echo "--- $(date +%T) threads of pid $pp (comm wchan state utime stime) ---"
    for e in /proc/"$pp"/task/*; do
        echo "$(cat "$e/comm") $(cat "$e/wchan" 2>/dev/null) $(awk '{print $3, $14, $15}' "$e/stat")"
    done
    : >"$t/trace"
    for e in kvm_exit kvm_inj_virq kvm_pio kvm_userspace_exit; do
        echo 1 >"$t/events/kvm/$e/enable" || echo "cannot trace kvm:$e"
    done
    sleep 2
    for e in kvm_exit kvm_inj_virq kvm_pio kvm_userspace_exit; do
        echo 0 >"$t/events/kvm/$e/enable" 2>/dev/null
    done
    echo "events: $(grep -vc '^#' "$t/trace")"
    grep -v '^#' "$t/trace" | awk '{print $5}' | sort | uniq -c
    grep -v '^#' "$t/trace" | grep kvm_exit | awk '{for (i = 6; i <= NF; i++) if ($i == "rip") print $(i + 1)}' |
        sort | uniq -c | sort -rn | head -20
    grep -v '^#' "$t/trace" | tail -40
}

# stacks: with REDIS_DIAG_STACKS=1 (and gdb installed), every thread's stack of both VMMs.
stacks() {
    [ -n "${REDIS_DIAG_STACKS:-}" ] && command -v gdb >/dev/null || return 0
    local p
    for p in "$pp" "${sp:-}"; do
        [ -n "$p" ] || continue
        echo "--- threads of pid $p ---"
        for t in /proc/"$p"/task/*; do
            echo "$(cat "$t/comm") $(cat "$t/wchan" 2>/dev/null) $(awk '{print $3}' "$t/stat")"
        done
        timeout 300 gdb -batch -nx -p "$p" -ex 'thread apply all bt 12' 2>/dev/null |
            grep -E '^(Thread|#)' | cut -c1-200 | head -150
    done
}

# REDIS_DIAG_PCAP=FILE: the client's packets during the writes go to FILE (tcpdump), and are
# printed after the writes with the client's events, the primary's repairs and the guest's
# console.

# tails: the ends of the VMMs' logs.
tails() {
    echo "--- primary stdout (tail) ---"
    tail -15 "$dir/p.out"
    echo "--- primary stderr (tail) ---"
    grep -v 'checkpoint installed\|asking for a repair' "$dir/p.err" | tail -12
    if [ -e "$dir/s.err" ]; then
        echo "--- standby stderr (tail; repairs installed: $(grep -c 'checkpoint installed' "$dir/s.err")) ---"
        grep -v 'checkpoint installed\|asking for a repair' "$dir/s.err" | tail -12
    fi
    [ ! -e "$dir/diag.log" ] || { echo "--- diag (tail) ---"; tail -"${REDIS_DIAG_LINES:-400}" "$dir/diag.log"; }
}

# shutdown_and_wait: SHUTDOWN (the guest's init then unmounts and exits 0) and the VMMs' end.
shutdown_and_wait() {
    rcli_within 300 SHUTDOWN >/dev/null 2>&1
    if [ -n "${pp:-}" ]; then
        wait "$pp"
        echo "primary-status=$?"
    fi
    if [ -n "${sp:-}" ]; then
        wait "$sp"
        echo "standby-status=$?"
    fi
}

# writes_and_read_back: the N writes, then the read-back.
writes_and_read_back() {
    local cap=""
    if [ -n "${REDIS_DIAG_PCAP:-}" ]; then
        command -v tcpdump >/dev/null || echo "REDIS_DIAG_PCAP: tcpdump is not installed (apt-get install tcpdump)"
        nsenter -t "$REDIS_CLIENT_PID" -n tcpdump -i any -U -w "$REDIS_DIAG_PCAP" 2>/dev/null &
        cap=$!
        sleep 1
    fi
    redis_writes "$dir/client" 1 "$n" || echo "writes-failed"
    if [ -n "$cap" ]; then
        kill "$cap"
        wait "$cap" 2>/dev/null
        echo "--- the client's packets during the writes ---"
        tcpdump -nn -tt -r "$REDIS_DIAG_PCAP" 2>/dev/null | head -3000
        echo "--- the client's events ---"
        cat "$dir/client/events"
        echo "--- the primary's repairs (times) ---"
        grep -E 'repair' "$dir/p.err" | tail -1500 | cut -c1-220
        echo "--- the guest's console (head) ---"
        head -400 "$dir/p.out"
    fi
    echo "acked=$(wc -l <"$dir/client/acked")"
    redis_read_back "$dir/client"
}

case "$mode" in
    plain | protected)
        if [ "$mode" = plain ]; then start_plain "$disk"; else start_pair "$disk"; fi
        ready || exit 4
        writes_and_read_back
        shutdown_and_wait
        if [ "$mode" = plain ]; then redis_check_disk "$dir" "$disk"; else redis_check_disk "$dir" "$dir/copy.img"; fi
        grep 'protected run complete' "$dir/p.err"
        ;;
    kill)
        start_pair "$disk"
        ready || exit 4
        redis_writes "$dir/client" 1 "$n" &
        wp=$!
        until [ "$(cat "$dir/client/progress" 2>/dev/null || echo 0)" -ge "$k" ]; do
            kill -0 "$wp" 2>/dev/null || break
            sleep 0.05
        done
        kill -9 "$pp" && echo "killed-primary"
        killed=$(date +%s%3N)
        echo "killed-at-ms=$killed"
        wait "$pp"
        echo "primary-status=$?"
        pp=""
        wait "$wp" || echo "writes-failed"
        echo "acked=$(wc -l <"$dir/client/acked")"
        redis_failover_report "$dir/client" "$killed"
        redis_read_back "$dir/client"
        grep -m1 're-emitting output from sequence' "$dir/s.err"
        shutdown_and_wait
        redis_check_disk "$dir" "$dir/copy.img"
        ;;
    bench)
        for run in unprotected protected; do
            if [ "$run" = unprotected ]; then
                cp "$disk" "$dir/bench-disk.img" || exit 3
                start_plain "$dir/bench-disk.img"
                sp=""
            else
                start_pair "$disk"
            fi
            ready || exit 4
            b0=$(date +%s%3N)
            nsenter -t "$REDIS_CLIENT_PID" -n redis-benchmark -h "$REDIS_GUEST_IP" \
                -p "$REDIS_PORT" -n "$n" -c 4 -t set,get --csv >"$dir/bench-$run.csv" 2>&1
            echo "bench-ms $run $(($(date +%s%3N) - b0))"
            # "test","rps",...: one line per test after the header.
            awk -F'"' -v run="$run" 'NR > 1 && $2 != "" {print "bench " run " " $2 " " $4}' \
                "$dir/bench-$run.csv"
            shutdown_and_wait
            # The recorder's counters of the guest's frames (all of the run, the boot's few
            # included): every received byte is logged, sent ones are output.
            [ "$run" = unprotected ] ||
                grep -m1 'recorder stats' "$dir/p.err" | grep -o 'net_[a-z_]*=[0-9]*' |
                sed 's/^/bench-traffic /'
        done
        ;;
    *)
        echo "unknown mode $mode" >&2
        exit 2
        ;;
esac
tails
exit 0
