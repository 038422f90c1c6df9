#!/usr/bin/env bash
# Which kernel code still diverges (issue 13, DESIGN.md §2 "RDTSC"): runs the Linux test guest
# protected in the nested harness and maps the pages its repairs found different on the two
# sides to the running kernel's symbols.
#
#   scripts/diverging-pages.sh [--tsc exits] [--join] [WORKLOAD]
#                                                (default: boot; files, idle, dd as well)
#
# --tsc exits: exact mode (issue 18): the harness loads the ftvm-rdtsc-exits module
# (`nested.sh --rdtsc-exits`) and the primary runs at `--tsc exits`, so every TSC read is
# logged; what still differs is not the TSC. --join: the primary boots the guest alone and
# the standby joins it in a 20 s pause after the mount (`files` only), as the CI drills do,
# so the boot is not protected work.
#
# In one harness run: the guest's `kallsyms` workload writes /proc/kallsyms (the symbols of
# the running kernel, which with `nokaslr` are the System.map of the Debian package: the
# package itself ships only a stub, the full map being in the 850 MB -dbg package) onto a
# scratch disk; then a protected pair runs WORKLOAD with the primary's repair planning at
# debug level, whose `repair: pages that differ` lines name the page frames both sides
# dirtied with different contents, and the guest's per-CPU base (its GS base). Each frame is
# mapped through the kernel's fixed mappings (nokaslr): the kernel image (physical P at
# 0xffffffff80000000 + P), and the direct map (0xffff888000000000 + P), in which the per-CPU
# area starts at the GS base. Printed: for each symbol (or region), the repairs in which a
# page of it differed, most frequent first. FTVM_TSC_MEASURES passes through to both sides,
# FTVM_REPAIR_FULL_COMPARE=N to the standby (its first N repairs compare every page, which
# also finds pages that differ from before the repair's boundary: docs/OPERATIONS.md).
# The harness's output is kept in target/diverging-pages-WORKLOAD.out.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() {
    echo "usage: scripts/diverging-pages.sh [--tsc exits|repair] [--join] [boot|idle|files|dd]" >&2
    exit 2
}
tsc=repair harness=() join=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tsc) [ $# -ge 2 ] || usage; tsc="$2"; shift 2 ;;
        --join) join=1; shift ;;
        -*) usage ;;
        *) break ;;
    esac
done
workload="${1:-boot}"
case "$workload" in
    boot | idle | files | dd) ;;
    *) usage ;;
esac
case "$tsc" in
    exits) harness=(--rdtsc-exits) ;;
    repair) ;;
    *) usage ;;
esac
if [ "$join" = 1 ] && [ "$workload" != files ]; then
    echo "diverging-pages: --join needs the files workload (its pause is where the standby joins)" >&2
    exit 2
fi
command -v python3 >/dev/null || { echo "diverging-pages: python3 is needed" >&2; exit 1; }
cargo build --release --bin ftvm >&2
ftvm="$PWD/target/release/ftvm"
eval "$(scripts/linux-guest.sh)"
dir=$(mktemp -d /tmp/ftvm-diverging.XXXXXX)
trap 'rm -rf "$dir"' EXIT
truncate -s 32M "$dir/syms.img"
scripts/linux-guest.sh disk "$dir/disk.img" 64 >/dev/null
cat >"$dir/run.sh" <<SCRIPT
set -u
busybox ip link set lo up || exit 98
$ftvm run --kernel $kernel --initrd $initrd --disk $dir/syms.img --mem-mib 256 \
    --append 'quiet ftvm.workload=kallsyms' >$dir/k.out 2>&1 || { cat $dir/k.out; exit 97; }
echo '--- kallsyms ---'
# The text ends with a newline and a NUL: the first empty line once NULs are newlines.
tr '\\0' '\\n' <$dir/syms.img | sed -n '/^\$/q;p'
echo '--- end kallsyms ---'
cp $dir/disk.img $dir/copy.img
$ftvm keygen --out $dir/pair.key >/dev/null || exit 98
PAIR="--heartbeat-ms 200 --heartbeat-timeout-ms 3000 --max-lag-epochs 100000000 \
    --max-slowed-ms 86400000 --max-standby-backlog-mib 4096 --key $dir/pair.key"
STANDBY="FTVM_REPAIR_FULL_COMPARE=${FTVM_REPAIR_FULL_COMPARE:-0} \
    FTVM_LOG=warn,ftvm_secondary::standby=info $ftvm standby --disk $dir/copy.img \$PAIR"
PRIMARY="FTVM_LOG=ftvm=info,ftvm_primary::repair=debug $ftvm run --kernel $kernel \
    --initrd $initrd --disk $dir/disk.img --mem-mib 256 --latency-bound-ms 50 --tsc $tsc \$PAIR"
if [ $join = 1 ]; then
    eval "\$PRIMARY --accept-standby 127.0.0.1:7300 \
        --append 'quiet ftvm.workload=$workload ftvm.pause=20'" >$dir/p.out 2>$dir/p.err & pp=\$!
    until grep -q 'pausing 20 s' $dir/p.out; do kill -0 \$pp 2>/dev/null || break; sleep 0.2; done
    eval "\$STANDBY --join 127.0.0.1:7300" >/dev/null 2>$dir/s.err &
    wait \$pp
else
    eval "\$STANDBY --listen 127.0.0.1:7300" >/dev/null 2>$dir/s.err &
    eval "\$PRIMARY --peer 127.0.0.1:7300 --connect-timeout-ms 30000 \
        --append 'quiet ftvm.workload=$workload'" >$dir/p.out 2>$dir/p.err
fi
echo "primary-status=\$?"
wait
grep 'protected run complete' $dir/p.err
grep -h 'TSC reads are exits' $dir/p.err $dir/s.err
grep 'synced: following' $dir/s.err
grep 'asking for a repair\|comparing every page' $dir/s.err
grep 'pages that differ' $dir/p.err
SCRIPT
scripts/nested.sh "${harness[@]}" --timeout 1800 -- bash "$dir/run.sh" >"$dir/out" || {
    cat "$dir/out" >&2
    echo "diverging-pages: the harness run failed" >&2
    exit 1
}
# The harness's output is kept: the symbols, the summary and the repairs' lines.
mkdir -p target && cp "$dir/out" "target/diverging-pages-$workload.out"
python3 - "$dir/out" <<'PY'
import bisect, re, sys
from collections import Counter

text = open(sys.argv[1], errors="replace").read()
syms_text = text.split("--- kallsyms ---\n", 1)[1].split("--- end kallsyms ---", 1)[0]
image, percpu = [], []
for line in syms_text.splitlines():
    f = line.split()
    if len(f) < 3:
        continue
    addr = int(f[0], 16)
    name = f[2] + (" " + f[3] if len(f) > 3 else "")
    (image if addr >> 63 else percpu).append((addr, name))
image.sort()
percpu.sort()
addrs = [a for a, _ in image]
paddrs = [a for a, _ in percpu]
byname = {n: a for a, n in image + percpu}
if not image or "_text" not in byname:
    sys.exit("diverging-pages: no kernel symbols came back (is kptr_restrict in the way?)")
text_start, end = byname["_text"], byname.get("_end", byname["_text"] + (64 << 20))
percpu_size = byname.get("__per_cpu_end", 0) - byname.get("__per_cpu_start", 0)
KERNEL_MAP, DIRECT_MAP = 0xFFFFFFFF80000000, 0xFFFF888000000000

def symbols(table, keys, lo, hi):
    """The symbols covering [lo, hi): the one at or before lo, and every one inside."""
    i = max(bisect.bisect_right(keys, lo) - 1, 0)
    out = []
    while i < len(table) and table[i][0] < hi:
        out.append(table[i][1])
        i += 1
    return out

where = Counter()
repairs = 0
for line in text.splitlines():
    if "pages that differ" not in line:
        continue
    repairs += 1
    pfns = re.search(r"pfns=\"?([0-9a-f,]+)", line)
    base = re.search(r"percpu_base=\"?([0-9a-f]+)", line)
    base = int(base.group(1), 16) if base else 0
    seen = set()
    for pfn in (int(p, 16) for p in (pfns.group(1).split(",") if pfns else [])):
        phys = pfn << 12
        va = KERNEL_MAP + phys
        if text_start <= va < end:
            names = symbols(image, addrs, va, va + 4096)
            label = "kernel image: " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        elif base and base <= DIRECT_MAP + phys < base + percpu_size:
            off = DIRECT_MAP + phys - base
            names = symbols(percpu, paddrs, off, off + 4096)
            label = "per-CPU area: " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        else:
            label = "other memory (heap, page cache, page tables, stacks, user pages)"
        seen.add(label)
    where.update(seen)
summary = [l for l in text.splitlines() if "protected run complete" in l]
print("\n".join(summary))
asked = [l for l in text.splitlines() if "asking for a repair" in l]
print(f"{len(asked)} repairs asked for by the standby; the first reasons:")
for l in asked[:8]:
    print("  " + l.split("asking for a repair: ", 1)[-1][:200])
print(f"{repairs} repairs named pages that differ; each row: repairs in which a page of it differed")
for label, n in where.most_common():
    print(f"  {n:6d}  {label}")
PY
