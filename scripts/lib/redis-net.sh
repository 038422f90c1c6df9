# shellcheck shell=bash
# The network around a protected Redis guest (issue 17), for the scripts and tests that run
# one: the guest's address, MAC and command line, the bridge its ftvm TAPs join, the client
# in a network namespace of its own on a veth port of that bridge, and the client's writes
# and read-back with Debian's redis-cli. Sourced, not run; needs root, iproute2, util-linux
# (unshare, nsenter) and redis-tools (scripts/setup.sh installs them). Used by
# tests/linux_redis.rs, scripts/redis-drill.sh and benches/redis.rs inside the nested
# harness (whose L1 kernel loads tun, bridge and veth), and meant for the two-host harness:
# there each host calls redis_net_bridge with its own TAP, and the client's namespace hangs
# off one host's bridge.
#
# Why a namespace and not the L1 itself: the client then has a network stack of its own
# whose only way to the guest is the bridge port, as a client on another machine; the host
# that runs ftvm keeps no address on the guest's network (as a hypervisor host would not),
# so nothing of the host's own stack answers for the guest or caches its neighbour entry.
#
# Functions (each prints what went wrong on stderr and returns non-zero on failure):
#   redis_net_bridge BRIDGE TAP...   the bridge, up, with the TAPs (made here, persistent) on
#                                    it; no IPv6 on any of them (no host chatter on the TAPs)
#   redis_net_client BRIDGE          a veth pair, one end on BRIDGE, the other in a new
#                                    network namespace with REDIS_CLIENT_IP; sets
#                                    REDIS_CLIENT_PID (the namespace's holder process)
#   redis_net_down                   ends the namespace holder (the veth pair goes with it)
#   rcli ARG...                      redis-cli to the guest, run in the client's namespace
#   rcli_within SECONDS ARG...       rcli, killed after SECONDS (a reply held for good
#                                    must not hang the caller)
#   redis_wait_ready SECONDS         until the guest's server answers PING
#   redis_writes DIR FIRST LAST [GATE]
#                                    SET key:I to redis_value I for I in FIRST..LAST over one
#                                    long-lived connection (see below)
#   redis_read_back DIR              GETs every key DIR/acked holds; prints "read-back acked=N
#                                    missing=M wrong=W"; fails unless M = W = 0
#   redis_disk_keys IMAGE            prints "key:I VALUE" for every key of the guest's AOF
#                                    on the ext4 IMAGE (copied out with debugfs, loaded by
#                                    a redis-server on a Unix socket), sorted
#   redis_value I                    the value key:I gets (distinct, the same in every run)
#   redis_check_disk DIR IMAGE       e2fsck -fn and the AOF's keys of IMAGE against DIR/acked:
#                                    prints disk-fsck-clean=, disk-keys=, disk-keys-sha256=,
#                                    a "disk-key KEY VALUE" line per key, disk-has-acked=
#   redis_diag_sample FTVM KEY CONTROL PID
#                                    one diagnosis sample of a pair process: its `ftvm status`
#                                    (on its --control address) on one line, then a line per
#                                    thread (name, state, CPU ticks, kernel wait channel)
#   redis_failover_report DIR MS     from DIR/events, with the loss done at wall-clock MS:
#                                    last-ack-before-kill-ms=, first-ack-after-kill-ms=,
#                                    failover-ms=, median-ack-ms=, connection-survived=

# The one-host scenarios' addresses; the two-host drills set REDIS_GUEST_IP (and the prefix)
# before sourcing, to put the guest on the hosts' link network.
REDIS_GUEST_IP="${REDIS_GUEST_IP:-10.0.0.2}"
REDIS_CLIENT_IP="${REDIS_CLIENT_IP:-10.0.0.1}"
REDIS_PREFIX="${REDIS_PREFIX:-24}"
REDIS_PORT=6379
# ftvm's default MAC (MacAddr::DEFAULT), named on both sides so the two-host harness's TAPs
# and the ARP checks agree with it.
REDIS_GUEST_MAC=52:54:00:46:54:01
# The guest's kernel command-line words: the Linux test guest's redis workload on that address.
# REDIS_GUEST_EXTRA adds words (for experiments with the guest's kernel options).
REDIS_GUEST_APPEND="ftvm.workload=redis ftvm.ip=$REDIS_GUEST_IP/$REDIS_PREFIX${REDIS_GUEST_EXTRA:+ $REDIS_GUEST_EXTRA}"

# no_ipv6 IFNAME: the interface sends no router solicitations or DAD probes.
_redis_no_ipv6() {
    local f="/proc/sys/net/ipv6/conf/$1/disable_ipv6"
    [ ! -e "$f" ] || echo 1 >"$f"
}

redis_net_bridge() {
    local br="$1" tap
    shift
    ip link add "$br" type bridge || return 1
    _redis_no_ipv6 "$br"
    # Forward at once: a port joining the bridge would otherwise sit in the listening and
    # learning states first (STP is off on a new bridge, but the forward delay still runs).
    ip link set "$br" type bridge forward_delay 0 || return 1
    for tap in "$@"; do
        ip tuntap add dev "$tap" mode tap || return 1
        _redis_no_ipv6 "$tap"
        ip link set "$tap" master "$br" || return 1
        ip link set "$tap" up || return 1
    done
    ip link set "$br" up
}

redis_net_client() {
    local br="$1" outer="${1}-c" inner="${1}-n"
    ip link add "$outer" type veth peer name "$inner" || return 1
    _redis_no_ipv6 "$outer"
    ip link set "$outer" master "$br" || return 1
    ip link set "$outer" up || return 1
    # A namespace held by a sleeping process (no `ip netns`: /run may be read-only, as in
    # the nested harness's chroot); the veth end moves into it.
    unshare -n sleep 100000 &
    REDIS_CLIENT_PID=$!
    local tries=0
    while [ "$(readlink "/proc/$REDIS_CLIENT_PID/ns/net")" = "$(readlink /proc/self/ns/net)" ]; do
        tries=$((tries + 1))
        [ "$tries" -le 100 ] || { echo "redis-net: no client namespace" >&2; return 1; }
        sleep 0.05
    done
    ip link set "$inner" netns "$REDIS_CLIENT_PID" || return 1
    nsenter -t "$REDIS_CLIENT_PID" -n sh -c "
        [ ! -e /proc/sys/net/ipv6/conf/$inner/disable_ipv6 ] ||
            echo 1 >/proc/sys/net/ipv6/conf/$inner/disable_ipv6
        ip link set lo up && ip addr add $REDIS_CLIENT_IP/$REDIS_PREFIX dev $inner &&
            ip link set $inner up" || return 1
}

redis_net_down() {
    [ -z "${REDIS_CLIENT_PID:-}" ] || kill "$REDIS_CLIENT_PID" 2>/dev/null || true
}

rcli() {
    nsenter -t "$REDIS_CLIENT_PID" -n redis-cli -h "$REDIS_GUEST_IP" -p "$REDIS_PORT" "$@"
}

rcli_within() {
    timeout "$1" nsenter -t "$REDIS_CLIENT_PID" -n redis-cli -h "$REDIS_GUEST_IP" -p "$REDIS_PORT" "${@:2}"
}

redis_wait_ready() {
    local deadline=$(($(date +%s) + $1))
    until [ "$(rcli_within 20 PING 2>/dev/null)" = PONG ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "redis-net: no PONG in $1 s" >&2; return 1; }
        sleep 0.5
    done
}

redis_value() {
    # Distinct for every I (an odd multiplier modulo 2^32 is a bijection), fixed across runs.
    printf 'value-%d-%08x' "$1" $((($1 * 2654435761) % 4294967296))
}

# now_ms: wall-clock milliseconds.
_redis_now_ms() {
    date +%s%3N
}

# redis_writes DIR FIRST LAST: one redis-cli, started once, reads the commands from a FIFO
# and answers each on its own line on another (it reconnects by itself after a lost
# connection; if it ends, e.g. on a receive timeout, a new one is started and that counts as
# an error). Each SET is sent only after the previous one's answer. A key is acknowledged
# when its answer is OK (with appendfsync always the server answers after the AOF write is
# on the disk); it then goes to DIR/acked as "key:I VALUE", and "ack I MS" to DIR/events.
# Any other answer (the connection was reset or refused) goes to DIR/events as
# "error I MS TEXT" and the same SET is sent again after 0.2 s. An answer that does not
# come in 600 s fails. While it runs, DIR/progress holds the number of the last
# acknowledged key, for drills to watch.
# With GATE (a file name), the connection is made first: a PING, answered, and DIR/connected
# created; the SETs begin once GATE exists. A drill that protects a running guest connects
# before the standby joins, so redis-cli's start (Debian's 7.0 fetches COMMAND DOCS, 172 KB)
# is not part of the protected run, and the connection is one the join must carry over.
redis_writes() {
    local dir="$1" first="$2" last="$3" gate="${4:-}" i reply cli="" to from
    mkdir -p "$dir"
    : >>"$dir/acked"
    : >>"$dir/events"
    rm -f "$dir/to-cli" "$dir/from-cli"
    mkfifo "$dir/to-cli" "$dir/from-cli" || return 1
    i="$first"
    while [ "$i" -le "$last" ]; do
        if [ -n "$cli" ] && ! kill -0 "$cli" 2>/dev/null; then
            exec {to}>&- {from}<&-
            wait "$cli" 2>/dev/null
            cli=""
        fi
        if [ -z "$cli" ]; then
            rcli <"$dir/to-cli" >"$dir/from-cli" 2>&1 &
            cli=$!
            exec {to}>"$dir/to-cli" {from}<"$dir/from-cli"
        fi
        if [ -n "$gate" ]; then
            if ! (echo PING >&"$to") 2>/dev/null || ! IFS= read -r -t 600 reply <&"$from" ||
                [ "$reply" != PONG ]; then
                echo "redis-net: the first PING got ${reply:-no answer}" >&2
                kill "$cli" 2>/dev/null
                return 1
            fi
            : >"$dir/connected"
            until [ -e "$gate" ]; do sleep 0.2; done
            gate=""
        fi
        reply=""
        # In a subshell: a redis-cli that just ended would make the write kill this shell
        # (SIGPIPE).
        if ! (echo "SET key:$i $(redis_value "$i")" >&"$to") 2>/dev/null ||
            ! IFS= read -r -t 600 reply <&"$from"; then
            if kill -0 "$cli" 2>/dev/null; then
                echo "redis-net: no answer to SET key:$i in 600 s" >&2
                kill "$cli" 2>/dev/null
                return 1
            fi
            # redis-cli ended (its last words, if any, were the answer): start another.
            echo "error $i $(_redis_now_ms) redis-cli ended ${reply}" >>"$dir/events"
            exec {to}>&- {from}<&-
            wait "$cli" 2>/dev/null
            cli=""
            sleep 0.2
            continue
        fi
        if [ "$reply" = OK ]; then
            echo "key:$i $(redis_value "$i")" >>"$dir/acked"
            echo "ack $i $(_redis_now_ms)" >>"$dir/events"
            echo "$i" >"$dir/progress"
            i=$((i + 1))
        else
            echo "error $i $(_redis_now_ms) $reply" >>"$dir/events"
            sleep 0.2
        fi
    done
    exec {to}>&- {from}<&-
    wait "$cli" 2>/dev/null || true
}

redis_read_back() {
    local dir="$1" key want got got_fd n=0 missing=0 wrong=0
    # One connection: a GET per acknowledged key, answered one line each ("" for a key that
    # is not there).
    awk '{print "GET " $1}' "$dir/acked" | rcli_within 600 >"$dir/got" 2>&1 || true
    exec {got_fd}<"$dir/got"
    while read -r key want; do
        n=$((n + 1))
        IFS= read -r got <&"$got_fd" || got=""
        if [ -z "$got" ]; then
            missing=$((missing + 1))
            echo "read-back: $key missing" >&2
        elif [ "$got" != "$want" ]; then
            wrong=$((wrong + 1))
            echo "read-back: $key is '$got', not '$want'" >&2
        fi
    done <"$dir/acked"
    exec {got_fd}<&-
    echo "read-back acked=$n missing=$missing wrong=$wrong"
    [ "$n" -gt 0 ] && [ "$missing" -eq 0 ] && [ "$wrong" -eq 0 ]
}

redis_disk_keys() {
    local image="$1" tmp rc=0 key
    tmp=$(mktemp -d) || return 1
    if ! debugfs -R "rdump /appendonlydir $tmp" "$image" >/dev/null 2>&1 ||
        [ ! -e "$tmp/appendonlydir" ]; then
        echo "redis-net: no /appendonlydir on $image" >&2
        rm -rf "$tmp"
        return 1
    fi
    # Debian's redis-server is redis-check-rdb run by that name.
    ln -s /usr/bin/redis-check-rdb "$tmp/redis-server"
    "$tmp/redis-server" --port 0 --unixsocket "$tmp/sock" --dir "$tmp" --appendonly yes \
        --save "" --daemonize no --logfile "$tmp/log" &
    local pid=$! tries=0
    until [ "$(redis-cli -s "$tmp/sock" PING 2>/dev/null)" = PONG ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 200 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "redis-net: the AOF of $image does not load:" >&2
            cat "$tmp/log" >&2
            kill "$pid" 2>/dev/null
            rm -rf "$tmp"
            return 1
        fi
        sleep 0.05
    done
    redis-cli -s "$tmp/sock" --scan | LC_ALL=C sort >"$tmp/keys"
    while read -r key; do
        echo "$key $(redis-cli -s "$tmp/sock" GET "$key")"
    done <"$tmp/keys" >"$tmp/out" || rc=1
    redis-cli -s "$tmp/sock" SHUTDOWN NOSAVE >/dev/null 2>&1
    wait "$pid" 2>/dev/null
    # Printed once the server is gone (a reader that stops early must not leave it running).
    cat "$tmp/out"
    rm -rf "$tmp"
    return "$rc"
}

redis_check_disk() {
    local dir="$1" image="$2"
    if e2fsck -fn "$image" >"$dir/fsck.log" 2>&1; then
        echo "disk-fsck-clean=yes"
    else
        echo "disk-fsck-clean=no"
        cat "$dir/fsck.log"
    fi
    redis_disk_keys "$image" >"$dir/disk-keys"
    echo "disk-keys=$(wc -l <"$dir/disk-keys")"
    echo "disk-keys-sha256=$(sha256sum <"$dir/disk-keys" | cut -d' ' -f1)"
    sed 's/^/disk-key /' "$dir/disk-keys"
    if [ -s "$dir/client/acked" ] && LC_ALL=C sort "$dir/client/acked" |
        LC_ALL=C comm -23 - "$dir/disk-keys" | grep -q .; then
        echo "disk-has-acked=no"
    else
        echo "disk-has-acked=yes"
    fi
}

redis_failover_report() {
    local events="$1/events" killed="$2" before after
    before=$(awk -v t="$killed" '$1 == "ack" && $3 <= t {x = $3} END {print x}' "$events")
    after=$(awk -v t="$killed" '$1 == "ack" && $3 > t {print $3; exit}' "$events")
    echo "last-ack-before-kill-ms=$before"
    echo "first-ack-after-kill-ms=$after"
    [ -z "$before" ] || [ -z "$after" ] || echo "failover-ms=$((after - before))"
    # The writes are sequential: the gap between two acks before the kill is a round trip.
    echo "median-ack-ms=$(awk -v t="$killed" '$1 == "ack" && $3 <= t {if (p) print $3 - p; p = $3}' \
        "$events" | sort -n | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}')"
    if awk -v t="$killed" '$1 == "error" && $3 > t {bad = 1} END {exit !bad}' "$events"; then
        echo "connection-survived=no"
        grep '^error' "$events" | head -5
    else
        echo "connection-survived=yes"
    fi
}

redis_diag_sample() {
    local ftvm="$1" key="$2" control="$3" pid="$4" t
    echo "--- $(date +%T) pid $pid"
    "$ftvm" status "$control" --key "$key" 2>&1 |
        grep -E '^(role|state|epoch|verified_epoch|exit_seq|lag_epochs|held_output_bytes|repairs|divergences)=' |
        tr '\n' ' '
    echo
    for t in /proc/"$pid"/task/*; do
        [ -e "$t/stat" ] || continue
        echo "$(cat "$t/comm") $(awk '{print $3, $14 + $15}' "$t/stat") $(cat "$t/wchan" 2>/dev/null)"
    done
}
