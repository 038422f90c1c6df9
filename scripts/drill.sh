#!/usr/bin/env bash
# Failover drills: run N times (default 10) a protected pair on loopback (`ftvm standby` +
# `ftvm run --peer`) on each of three guests (counter: timer ticks; rdtsc: every epoch
# repaired; spin: every tick a checkpoint-required kick, repaired), SIGKILL the primary at a
# random moment, and check that the primary's output followed by the standby's holds every
# line once and in order, ends with `done`, and that the standby exits 0. The seed of the
# kill moments is printed. The checks are those of the `failover_drills*` tests
# (tests/pair.rs).
#
#   scripts/drill.sh 500
set -euo pipefail
cd "$(dirname "$0")/.."
drills="${1:-10}"
case "$drills" in
    ''|*[!0-9]*) echo "usage: scripts/drill.sh [N]" >&2; exit 2 ;;
esac
FTVM_DRILLS="$drills" exec cargo test --release --test pair failover_drills -- --nocapture
