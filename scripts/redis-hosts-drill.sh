#!/usr/bin/env bash
# Redis failover drills on the two simulated hosts (issue 17; scripts/two-hosts.sh,
# scripts/lib/redis-hosts.sh): the protected Linux test guest runs Debian's redis-server
# (appendfsync always) with its primary on host A and its standby on host B; a redis-cli
# client in host B's network writes numbered keys over one connection, and after a sixth
# of them (the first drill) the primary is lost: `kill -9` of its ftvm process, or host A
# itself (its QEMU SIGKILLed, a power cut). Every write the client saw acknowledged must read back with its
# value from the guest on host B, the guest must end cleanly on SHUTDOWN, and the standby's
# copy of the disk must pass `e2fsck -n` and hold exactly the keys written. Prints the
# client-seen failover and whether the TCP connection survived. Needs root. The standby
# joins the running guest once Redis answers (about 3 minutes a drill here, dev build);
# REDIS_HOSTS_PROTECT=boot protects the guest from its first instruction instead (a
# protected Linux boot on two TCG hosts: 4 to 15 minutes at stop 26).
#
#   scripts/redis-hosts-drill.sh [N] [process|host]   N drills of each loss (default 1), or of one
#
# While a drill runs, the hosts write their diagnosis (each pair process's `ftvm status` and
# threads, every 5 s) to diag-a.txt and diag-b.txt of the harness's shared directory
# (/tmp/ftvm-two-hosts.*/shared with NESTED_KEEP=1); creating `stacks-request` there makes
# each dump its pair process's thread stacks (gdb) once.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1}"
kind="${2:-}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || ! [[ "$kind" =~ ^(|process|host)$ ]]; then
    echo "usage: scripts/redis-hosts-drill.sh [N] [process|host]" >&2
    exit 2
fi
case "$kind" in
    process) filter=redis_after_process_kill ;;
    host) filter=redis_after_host_loss ;;
    *) filter=redis_after ;;
esac
FTVM_REDIS_HOST_DRILLS="$n" exec cargo test --test two_hosts -- "$filter"
