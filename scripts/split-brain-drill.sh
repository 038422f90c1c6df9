#!/usr/bin/env bash
# Split-brain drills (DESIGN.md §5), with each arbiter: an `ftvm witness` and a real etcd
# (Debian's etcd-server, installed by scripts/setup.sh).
#
#   scripts/split-brain-drill.sh [STOP_N] [PARTITION_M]      (defaults: 20 and 10)
#
# - STOP_N stop-and-continue drills per arbiter (tests/stop_drills.rs): a protected pair on
#   loopback, the primary (three drills in four) or the standby frozen with SIGSTOP at a
#   random moment for 200..1000 ms (the heartbeat timeout is 150 ms), then SIGCONT;
# - PARTITION_M partition drills per arbiter (tests/partition.rs): primary, standby and
#   arbiter in three network namespaces joined by veth pairs; the pair's link and one
#   side's link to the arbiter set down, then up again. Odd drills cut the primary off (the
#   standby wins the term and goes live, the primary fences itself once healed, and a new
#   standby on the old primary's host joins the live side: `ftvm standby --accept-standby`);
#   even drills cut the standby off (the primary wins and runs on, the standby stops once
#   healed, and a new standby re-protects the guest with --join). Needs root.
#
# Each drill must end with exactly one live side, the loser stopped with its message, and
# the output a client saw (the old primary's joined with the new live side's) holding every
# line once, in order, from one execution. The script prints one line per drill and a
# summary with counts and times; it exits non-zero at the first drill that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
stop="${1:-20}"
partition="${2:-10}"
for n in "$stop" "$partition"; do
    case "$n" in
        ''|*[!0-9]*) echo "usage: scripts/split-brain-drill.sh [STOP_N] [PARTITION_M]" >&2; exit 2 ;;
    esac
done
command -v etcd >/dev/null || { echo "split-brain-drill: etcd is missing (scripts/setup.sh installs etcd-server)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "split-brain-drill: the partition drills need root (network namespaces)" >&2; exit 1; }
log="${FTVM_DRILL_LOG:-/tmp/ftvm-split-brain-drill.log}"
cargo test --quiet --test stop_drills --test partition --no-run
start=$(date +%s)
status=0
FTVM_STOP_DRILLS="$stop" FTVM_PARTITION_DRILLS="$partition" \
    cargo test --quiet --test stop_drills --test partition -- --nocapture --test-threads 1 \
    > "$log" 2>&1 || status=$?
grep -E '^(drill |stop-and-continue drills|partition drills)' "$log" || true
echo "split-brain-drill: $stop stop-and-continue + $partition partition drills per arbiter (witness, etcd): $( [ $status -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s; full output in $log"
[ $status -eq 0 ] || grep -E 'panicked|not exactly one live side' -A5 "$log" | head -40 >&2
exit $status
