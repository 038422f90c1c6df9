#!/usr/bin/env bash
# Network failover drills on this host (issue 17): N drills of `kill -9` of the primary ftvm
# while a client on a bridge keeps sending frames to the protected built-in guest
# (workload=netecho); every frame must get its answer, in order, from the standby once it is
# live. Each drill kills at a different moment (seeded, printed). Needs root and /dev/kvm.
#
#   scripts/drill-net.sh [N]      N drills (default 10)
#
# Host loss (the whole L1 VM of host A killed) needs two hosts: scripts/drill-hosts.sh runs
# it, and process kills too, on the two-host harness (scripts/two-hosts.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10}"
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
    echo "usage: scripts/drill-net.sh [N]" >&2
    exit 2
fi
FTVM_NET_DRILLS="$n" exec cargo test --test net kill_drills -- --nocapture
