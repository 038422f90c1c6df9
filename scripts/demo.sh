#!/usr/bin/env bash
# The main job on one machine: a protected pair on loopback running the built-in test guest.
# Starts `ftvm standby` in the background, runs `ftvm run --peer` in the foreground (its
# stdout is the guest's console), then prints both processes' verdicts. Pass a command line
# for the guest as the first argument (default: workload=counter ticks=200).
#
# To watch a failover instead, run the two commands of the README in two terminals and
# `kill -9` the primary.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="${1:-workload=counter ticks=200}"
cargo build --release --quiet
ftvm=target/release/ftvm
port=$(( 20000 + RANDOM % 20000 ))
# The pair's key: every connection between the two (and `ftvm status`) is authenticated
# and encrypted with it.
keydir=$(mktemp -d)
key="$keydir/pair.key"
$ftvm keygen --out "$key" >&2
$ftvm standby --listen "127.0.0.1:$port" --control "127.0.0.1:$((port + 1))" --key "$key" > /tmp/ftvm-demo-standby.out &
standby=$!
trap 'kill $standby 2>/dev/null || true; rm -rf "$keydir"' EXIT
echo "demo: standby listening on 127.0.0.1:$port (pid $standby); starting the primary" >&2
status=0
$ftvm run --peer "127.0.0.1:$port" --cmdline "$cmdline" --key "$key" || status=$?
wait $standby && sstatus=0 || sstatus=$?
echo "demo: primary exited $status, standby exited $sstatus (the standby printed $(wc -c < /tmp/ftvm-demo-standby.out) bytes: it only prints after a failover)" >&2
exit $status
