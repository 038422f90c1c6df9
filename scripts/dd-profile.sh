#!/usr/bin/env bash
# Where a protected `dd` of the Linux test guest spends its time (issue 13): runs the guest's
# `dd` workload (32 MiB written, then read, O_DIRECT, 1 MiB blocks) protected in the nested
# harness, the primary under `perf record -e cpu-clock` (the harness has no PMU), both sides
# at FTVM_LOG=debug, and prints the guest's dd line, the pair's summary, the repairs (count,
# total pause, pages sent and covered), how often the guest was slowed to the standby's pace,
# the standby's repair reasons (numbers as N), and the primary's profile by thread and by
# symbol. The harness's output is kept in target/dd-profile.out.
#
#   scripts/dd-profile.sh
#
# perf comes from Debian's linux-perf, installed here when missing (the harness runs this
# host's binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v perf >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq linux-perf >/dev/null
fi
cargo build --release --bin ftvm >&2
ftvm="$PWD/target/release/ftvm"
eval "$(scripts/linux-guest.sh)"
dir=$(mktemp -d /tmp/ftvm-dd-profile.XXXXXX)
trap 'rm -rf "$dir"' EXIT
scripts/linux-guest.sh disk "$dir/disk.img" 64 >/dev/null
cat >"$dir/run.sh" <<SCRIPT
set -u
busybox ip link set lo up || exit 98
$ftvm keygen --out /tmp/dp.key >/dev/null || exit 98
PAIR="--heartbeat-ms 200 --heartbeat-timeout-ms 3000 --max-lag-epochs 100000000 \
    --max-slowed-ms 86400000 --max-standby-backlog-mib 4096 --key /tmp/dp.key"
cp $dir/disk.img /tmp/dp-p.img; cp $dir/disk.img /tmp/dp-s.img
FTVM_LOG=debug $ftvm standby --listen 127.0.0.1:7200 --disk /tmp/dp-s.img \$PAIR \
    >/dev/null 2>/tmp/dp-s.err &
FTVM_LOG=debug perf record -q -e cpu-clock -g -o /tmp/dp.perf $ftvm run --peer 127.0.0.1:7200 \
    --connect-timeout-ms 30000 --kernel $kernel --initrd $initrd --disk /tmp/dp-p.img \
    --mem-mib 256 --latency-bound-ms 50 \$PAIR --append 'quiet ftvm.workload=dd' \
    >/tmp/dp-p.out 2>/tmp/dp-p.err
echo "primary-status=\$?"
wait
grep '^dd ' /tmp/dp-p.out
grep 'protected run complete' /tmp/dp-p.err
grep 'checkpoint made' /tmp/dp-p.err | sed 's/.*checkpoint made//' | awk '
    { for (i = 1; i <= NF; i++) { split(\$i, kv, "="); v[kv[1]] += kv[2] } n++ }
    END { printf "repairs %d pause_s %.1f pages_sent %d pages_covered %d blocks_sent %d\n",
          n, v["pause_us"] / 1e6, v["sent"], v["covered"], v["blocks"] }'
echo "slowed \$(grep -c 'slowing the guest' /tmp/dp-p.err)"
echo "--- repair reasons (numbers as N)"
grep 'asking for a repair' /tmp/dp-s.err | sed 's/.*asking for a repair: //; s/ epoch=.*//;
    s/0x[0-9a-f]*/X/g; s/[0-9][0-9]*/N/g' | sort | uniq -c | sort -rn | head -20
echo "--- profile by thread"
perf report -i /tmp/dp.perf --no-children --sort comm --stdio -g none 2>/dev/null |
    grep -v '^#' | grep -v '^\$' | head -8
echo "--- profile by symbol"
perf report -i /tmp/dp.perf --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null |
    grep -v '^#' | grep -v '^\$' | head -30
SCRIPT
scripts/nested.sh --timeout 1800 -- bash "$dir/run.sh" >"$dir/out" || {
    cat "$dir/out" >&2
    echo "dd-profile: the harness run failed" >&2
    exit 1
}
mkdir -p target && cp "$dir/out" target/dd-profile.out
cat "$dir/out"
