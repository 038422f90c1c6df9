#!/usr/bin/env bash
# Failover drills of a protected Linux guest (issue 13, DESIGN.md §4–§5) on standard KVM (the
# nested harness, scripts/nested.sh): the Linux test guest's `files` workload runs protected,
# and the primary is SIGKILLed once during the disk writes (the standby having joined the
# running guest before them: `ftvm run --accept-standby`, `ftvm standby --join --disk COPY`),
# then N times (default 5) at a random moment in the first WINDOW_MS (default 30000) after
# the guest's init line (protected from the boot: `ftvm standby --disk COPY` + `ftvm run
# --peer --kernel --initrd --disk`). Each drill checks that the
# standby finishes the workload on its own copy and exits 0, that the output a client saw
# (the primary's released bytes joined with the standby's re-emitted ones) is one execution's
# with no gap and the right checksums, and that the standby's copy holds the files with the
# checksums `scripts/linux-guest.sh expected` prints and passes `e2fsck -n`. The checks are
# those of `tests/linux.rs::failovers_during_the_files_workload_finish_it_on_the_standbys_copy`;
# the seed of the kill moments is printed (FTVM_DRILL_SEED=S repeats a run).
#
#   scripts/linux-drill.sh [N [WINDOW_MS]]
#
# Each drill boots the harness once: about 2–3 minutes a drill on the development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
drills="${1:-5}"
window="${2:-30000}"
for n in "$drills" "$window"; do
    case "$n" in
        ''|*[!0-9]*) echo "usage: scripts/linux-drill.sh [N [WINDOW_MS]]" >&2; exit 2 ;;
    esac
done
FTVM_LINUX_DRILLS="$drills" FTVM_LINUX_DRILL_WINDOW_MS="$window" exec cargo test --release \
    --test linux failovers_during_the_files_workload -- --nocapture
