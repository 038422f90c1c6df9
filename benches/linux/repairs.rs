//! What the TSC costs a protected Linux guest, and what each measure that keeps Linux off it
//! gains (DESIGN.md §2, `ftvm_vmm::tsc`): protected runs of the Linux test guest in the
//! nested harness, one per (measures, workload), each printing the primary's epochs and
//! repairs and the bytes its repairs carried (pages and disk blocks, from its debug
//! `checkpoint made` lines). Reported per workload: the share of epochs the standby verified
//! without a repair and the repair bytes per epoch, for the default (no measures: Linux on the
//! TSC), each measure on, and all on.

use super::common::field;

/// The measure sets: name and the `FTVM_TSC_MEASURES` value.
pub const CONFIGS: &[(&str, &str)] = &[
    ("default: no measures (baseline)", ""),
    ("cpuid on (TSC hidden)", "cpuid"),
    ("cmdline words on", "cmdline"),
    ("all measures", "cpuid,cmdline"),
];

/// The workloads (`ftvm.workload=`).
pub const WORKLOADS: &[&str] = &["boot", "idle", "files"];

/// The harness script: one protected run per (config, workload), each ending in a
/// `repairs cfg=N wl=W …` line.
pub fn script(ftvm: &str, kernel: &str, initrd: &str, disk: &str, workloads: &[&str]) -> String {
    let mut s = format!(
        r#"
set -u
busybox ip link set lo up || exit 98
K={kernel}; I={initrd}; D={disk}
{ftvm} keygen --out /tmp/rp.key >/dev/null || exit 98
PAIR="--heartbeat-ms 200 --heartbeat-timeout-ms 3000 --max-lag-epochs 100000000 \
    --max-slowed-ms 86400000 --max-standby-backlog-mib 4096 --key /tmp/rp.key"
run() {{ # config-index measures workload
    cp $D /tmp/rp.img; cp $D /tmp/rs.img
    start=$(date +%s)
    FTVM_TSC_MEASURES=$2 FTVM_LOG=ftvm=info,ftvm_primary=debug timeout 900 {ftvm} standby \
        --listen 127.0.0.1:7100 --disk /tmp/rs.img $PAIR >/dev/null 2>/tmp/rs.err &
    sp=$!
    FTVM_TSC_MEASURES=$2 FTVM_LOG=ftvm=info,ftvm_primary=debug timeout 900 {ftvm} run \
        --peer 127.0.0.1:7100 --connect-timeout-ms 30000 --kernel $K --initrd $I \
        --disk /tmp/rp.img --mem-mib 256 --latency-bound-ms 50 $PAIR \
        --append "quiet ftvm.workload=$3" >/tmp/rp.out 2>/tmp/rp.err
    ps=$?; wait $sp; ss=$?
    line=$(grep 'protected run complete' /tmp/rp.err)
    bytes=$(grep 'checkpoint made' /tmp/rp.err | grep 'sync=false' | tr ' ' '\n' |
        awk -F= '$1=="page_bytes" || $1=="block_bytes" {{ s += $2 }} END {{ print s + 0 }}')
    echo "repairs cfg=$1 wl=$3 primary_status=$ps standby_status=$ss took_s=$(( $(date +%s) - start )) repair_bytes=$bytes $line"
}}
"#
    );
    for wl in workloads {
        for (i, (_, on)) in CONFIGS.iter().enumerate() {
            s.push_str(&format!("run {i} '{on}' {wl}\n"));
        }
    }
    s
}

/// One run's figures.
struct Run {
    epochs: u64,
    repairs: u64,
    bytes: u64,
    took_s: u64,
    ok: bool,
}

fn parse(line: &str) -> Option<Run> {
    let n = |k: &str| -> Option<u64> { field(line, k)?.parse().ok() };
    Some(Run {
        epochs: n("epochs")?,
        repairs: n("repairs")?,
        bytes: n("repair_bytes")?,
        took_s: n("took_s")?,
        ok: super::protected_run_ok(line),
    })
}

/// Prints the table from the harness's output.
pub fn report(out: &str, workloads: &[&str]) {
    println!(
        "\nprotected runs: epochs verified without a repair, and repair bytes per epoch (pages + disk blocks)"
    );
    for wl in workloads {
        println!("  workload {wl}:");
        for (i, (name, _)) in CONFIGS.iter().enumerate() {
            let line = out.lines().find(|l| {
                l.starts_with("repairs ")
                    && field(l, "cfg") == Some(&i.to_string())
                    && field(l, "wl") == Some(wl)
            });
            match line.and_then(parse) {
                Some(r) if r.epochs > 0 => println!(
                    "    {name:<26} {:>5.1}% of {:>5} epochs, {:>4} repairs, {:>9.0} bytes/epoch, {:>4} s{}",
                    100.0 * r.epochs.saturating_sub(r.repairs) as f64 / r.epochs as f64,
                    r.epochs,
                    r.repairs,
                    r.bytes as f64 / r.epochs as f64,
                    r.took_s,
                    if r.ok { "" } else { "  (run FAILED or lost its standby)" }
                ),
                _ => println!(
                    "    {name:<26} no result: {}",
                    line.unwrap_or("the run printed nothing")
                ),
            }
        }
    }
}
