#!/usr/bin/env bash
# The main job on one machine: a protected pair on loopback running the built-in test guest,
# with a witness. Starts `ftvm witness` and `ftvm standby` in the background, runs `ftvm
# run --peer` in the foreground (its stdout is the guest's console), then prints the
# processes' verdicts. Pass a command line for the guest as the first argument (default:
# workload=counter ticks=200).
#
# With the witness both sides arbitrate role changes decided on silence (DESIGN.md §5): a
# killed primary fails over (its connection closes), and so does a primary whose host is
# lost or stopped (silence: the standby goes live only after winning the pair's next term
# at the witness; the old primary, should it run again, loses the term and stops). Try
# `kill -STOP` on the primary's pid while the demo runs: the standby takes over and
# finishes the count; `kill -CONT` it and it exits with `ftvm: fenced: …`, status 11.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="${1:-workload=counter ticks=200}"
cargo build --release --quiet
ftvm=target/release/ftvm
port=$(( 20000 + RANDOM % 20000 ))
# The pair's key: every connection between the two (and `ftvm status`) is authenticated
# and encrypted with it.
state=$(mktemp -d /tmp/ftvm-demo.XXXXXX)
key="$state/pair.key"
$ftvm keygen --out "$key" >&2
witness_addr="127.0.0.1:$((port + 2))"
$ftvm witness --listen "$witness_addr" --state "$state/state" 2> "$state/witness.log" &
witness=$!
standby=""
trap 'kill $witness $standby 2>/dev/null || true; rm -rf "$state"' EXIT
$ftvm standby --listen "127.0.0.1:$port" --control "127.0.0.1:$((port + 1))" \
    --witness "$witness_addr" --key "$key" > /tmp/ftvm-demo-standby.out &
standby=$!
echo "demo: witness on $witness_addr (pid $witness), standby listening on 127.0.0.1:$port (pid $standby); starting the primary" >&2
status=0
$ftvm run --peer "127.0.0.1:$port" --witness "$witness_addr" --key "$key" --cmdline "$cmdline" || status=$?
wait $standby && sstatus=0 || sstatus=$?
echo "demo: primary exited $status, standby exited $sstatus (the standby printed $(wc -c < /tmp/ftvm-demo-standby.out) bytes: it only prints after a failover)" >&2
exit $status
