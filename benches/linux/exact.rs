//! Exact replay against repair (issue 18, DESIGN.md §2): in one boot of the harness with the
//! ftvm-rdtsc-exits module (`scripts/nested.sh --rdtsc-exits`), protected runs of the Linux
//! test guest for boot, idle and files, each twice: `--tsc repair` (no MSR filter, so the
//! module is stock KVM: TSC reads run natively, TSC visible to the guest, what the stock
//! harness runs) and `--tsc exits` (every TSC read an exit, logged and replayed; the TSC
//! hidden in CPUID with the command-line words, `ftvm_vmm::tsc::TscMeasures::for_run`).
//! Reported per workload: the share of epochs the standby verified without a repair (and the
//! repairs split into diverged and checkpoint-required epochs), the run's wall time, and in
//! exact mode the TSC reads per second of guest time (the primary's `recorder stats`). Before
//! them, `ftvm tsc-probe --measure` times a TSC-read exit next to a port-I/O exit in the same
//! VM (three runs, as `cargo bench --bench tsc_exits` does with five).

use super::common::{field, median_f64};

/// The TSC modes compared: the `--tsc` value and its name in the table.
pub const MODES: &[(&str, &str)] = &[
    ("repair", "TSC native, repairs (stock)"),
    ("exits", "TSC-read exits (exact)"),
];

/// The workloads (`ftvm.workload=`).
pub const WORKLOADS: &[&str] = &["boot", "idle", "files"];

/// TSC-read exits per probe measurement.
const EXITS: u32 = 2000;

/// The harness script: the exit costs (`n=… tsc_exit_ns=…` lines), then one protected run per
/// (workload, mode), each ending in an `exact mode=M wl=W …` line.
pub fn script(ftvm: &str, kernel: &str, initrd: &str, disk: &str, workloads: &[&str]) -> String {
    let mut s = format!(
        r#"
set -u
busybox ip link set lo up || exit 98
{ftvm} tsc-probe | grep -q 'tsc-exits: present' || {{ {ftvm} tsc-probe; exit 97; }}
for i in 1 2 3; do {ftvm} tsc-probe --measure {EXITS} | grep '^n='; done
K={kernel}; I={initrd}; D={disk}
{ftvm} keygen --out /tmp/x.key >/dev/null || exit 98
# A 30 s heartbeat timeout: a pair that loses its standby to a starved heartbeat (two cores
# shared with other nested VMs) measures nothing.
PAIR="--heartbeat-ms 500 --heartbeat-timeout-ms 30000 --max-lag-epochs 100000000 \
    --max-slowed-ms 86400000 --max-standby-backlog-mib 4096 --key /tmp/x.key"
run() {{ # mode workload
    cp $D /tmp/xp.img; cp $D /tmp/xs.img
    start=$(date +%s)
    FTVM_LOG=ftvm=info timeout 1500 {ftvm} standby \
        --listen 127.0.0.1:7100 --disk /tmp/xs.img $PAIR >/dev/null 2>/tmp/xs.err &
    sp=$!
    FTVM_LOG=ftvm=info timeout 1500 {ftvm} run --tsc $1 \
        --peer 127.0.0.1:7100 --connect-timeout-ms 30000 --kernel $K --initrd $I \
        --disk /tmp/xp.img --mem-mib 256 --latency-bound-ms 50 $PAIR \
        --append "quiet ftvm.workload=$2" >/tmp/xp.out 2>/tmp/xp.err
    ps=$?; wait $sp; ss=$?
    line=$(grep 'protected run complete' /tmp/xp.err)
    stats=$(grep 'recorder stats' /tmp/xp.err | sed 's/epochs=/rec_epochs=/; s/checkpoint_required=/rec_cr=/')
    echo "exact mode=$1 wl=$2 primary_status=$ps standby_status=$ss took_s=$(( $(date +%s) - start )) $line $stats"
    [ "$ps" = 0 ] || tail -5 /tmp/xp.err
    [ "$ss" = 0 ] || tail -5 /tmp/xs.err
}}
"#
    );
    for wl in workloads {
        for (mode, _) in MODES {
            s.push_str(&format!("run {mode} {wl}\n"));
        }
    }
    s
}

/// One run's figures.
struct Run {
    epochs: u64,
    repairs: u64,
    /// Repair requests from the standby, checkpoint-required ones included.
    divergences: u64,
    /// Of those, checkpoint-required epochs.
    checkpoint_required: u64,
    took_s: u64,
    tsc_reads: u64,
    guest_ms: u64,
    ok: bool,
}

fn parse(line: &str) -> Option<Run> {
    let n = |k: &str| -> Option<u64> { field(line, k)?.parse().ok() };
    Some(Run {
        epochs: n("epochs")?,
        repairs: n("repairs")?,
        divergences: n("divergences")?,
        checkpoint_required: n("checkpoint_required")?,
        took_s: n("took_s")?,
        tsc_reads: n("tsc_reads")?,
        guest_ms: n("guest_ms")?,
        ok: super::protected_run_ok(line),
    })
}

/// Prints the exit costs and the table from the harness's output.
pub fn report(out: &str, workloads: &[&str]) {
    let (mut tsc, mut pio, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for line in out.lines().filter(|l| l.starts_with("n=")) {
        let num = |k: &str| -> Option<f64> { field(line, k)?.parse().ok() };
        if let (Some(t), Some(p), Some(r)) = (num("tsc_exit_ns"), num("pio_exit_ns"), num("ratio"))
        {
            tsc.push(t);
            pio.push(p);
            ratio.push(r);
        }
    }
    println!("\nexact replay (harness with the ftvm-rdtsc-exits module)");
    if tsc.is_empty() {
        println!("  exit costs: no measurement");
    } else {
        println!(
            "  TSC-read exit {:.0} ns next to a port-I/O exit {:.0} ns in the same VM: ratio {:.2} (median of {}, {EXITS} exits each)",
            median_f64(&mut tsc),
            median_f64(&mut pio),
            median_f64(&mut ratio),
            tsc.len()
        );
    }
    println!("  protected runs: epochs verified without a repair (repairs: diverged + checkpoint-required)");
    for wl in workloads {
        println!("  workload {wl}:");
        for (mode, name) in MODES {
            let line = out.lines().find(|l| {
                l.starts_with("exact ")
                    && field(l, "mode") == Some(mode)
                    && field(l, "wl") == Some(wl)
            });
            match line.and_then(parse) {
                Some(r) if r.epochs > 0 => {
                    let reads = if *mode == "exits" {
                        format!(
                            ", {} TSC reads in {:.1} s of guest time: {:.0}/s",
                            r.tsc_reads,
                            r.guest_ms as f64 / 1000.0,
                            r.tsc_reads as f64 * 1000.0 / r.guest_ms.max(1) as f64
                        )
                    } else {
                        String::new()
                    };
                    println!(
                        "    {name:<29} {:>5.1}% of {:>5} epochs, {:>4} repairs ({} + {}), {:>4} s{reads}{}",
                        100.0 * r.epochs.saturating_sub(r.repairs) as f64 / r.epochs as f64,
                        r.epochs,
                        r.repairs,
                        // The standby's repair requests count both kinds.
                        r.divergences.saturating_sub(r.checkpoint_required),
                        r.checkpoint_required,
                        r.took_s,
                        if r.ok { "" } else { "  (run FAILED or lost its standby)" }
                    )
                }
                _ => println!(
                    "    {name:<29} no result: {}",
                    line.unwrap_or("the run printed nothing")
                ),
            }
        }
    }
}
