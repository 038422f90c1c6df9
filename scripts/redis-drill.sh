#!/usr/bin/env bash
# Failover drills of Redis in the protected Linux guest on one host (issue 17), in the nested
# harness: `kill -9` of the primary ftvm while a redis-cli client writes numbered keys over
# one connection from a network namespace on the guests' bridge (scripts/lib/redis-net.sh,
# scripts/lib/redis-scenario.sh). Each drill checks that every write the client saw
# acknowledged reads back with its value from the standby's guest, that the guest ends
# cleanly on SHUTDOWN, and that the standby's copy of the disk passes `e2fsck -n` and holds
# those keys in its AOF; it prints the client-seen failover time and whether the TCP
# connection survived. The first drill kills after a third of the writes, the others after a
# number drawn from a printed seed (FTVM_DRILL_SEED=S repeats a run). Needs root.
#
#   scripts/redis-drill.sh [N]      N drills (default 3); a few minutes each here
#
# The checks are those of tests/linux_redis.rs::kill_drills_every_acknowledged_write_reads_back_from_the_standby.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-3}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
    echo "usage: scripts/redis-drill.sh [N]" >&2
    exit 2
fi
FTVM_REDIS_DRILLS="$n" exec cargo test --test linux_redis kill_drills -- --include-ignored --nocapture
