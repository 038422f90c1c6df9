#!/usr/bin/env bash
# Failover drills across two simulated hosts (issue 17; scripts/two-hosts.sh): N drills of
# each kind, `kill -9` of the primary's ftvm on host A, and host loss (host A's whole VM
# SIGKILLed), while a client on host B's network keeps sending frames to the protected
# built-in guest (workload=netecho); every frame must get its answer, in order, from the
# standby once it is live. Each drill loses the primary after a different number of answers
# (seeded, printed) and boots both hosts anew (about 17 s each on an idle machine). Needs
# root.
#
#   scripts/drill-hosts.sh [N] [process_kill|host_loss]    N of each (default 5), or of one kind
#
# The two hosts take both cores of a small machine: where other harness runs share it, run
# one at a time (e.g. `flock LOCKFILE scripts/drill-hosts.sh 5`).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-5}"
kind="${2:-}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] ||
    ! [[ "$kind" =~ ^(|process_kill|host_loss)$ ]]; then
    echo "usage: scripts/drill-hosts.sh [N] [process_kill|host_loss]" >&2
    exit 2
fi
FTVM_HOST_DRILLS="$n" exec cargo test --test two_hosts -- ${kind:+"${kind}_drills"}
