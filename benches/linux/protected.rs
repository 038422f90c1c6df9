//! What protection costs the Linux test guest (issue 13), in one harness run: the `files`
//! workload's time (ftvm started → ftvm exited) and the `dd` workload's throughput, each
//! protected next to unprotected; and the output delay of the guest's serial output in the
//! protected `files` run (last byte of an epoch's output → released), stage by stage from
//! the two audit trails (`benches/pair/breakdown.rs`).

use super::breakdown::Breakdown;
use super::common::field;

/// The harness script: `files_ms mode=unprotected|protected ms=N status=S`, the two `dd`
/// lines prefixed by `unprotected_`/`protected_`, and the protected `files` run's audit
/// trails between `--- primary audit ---` / `--- standby audit ---` / `--- end audit ---`.
pub fn script(ftvm: &str, kernel: &str, initrd: &str, disk: &str) -> String {
    format!(
        r#"
set -u
busybox ip link set lo up || exit 98
K={kernel}; I={initrd}; D={disk}
{ftvm} keygen --out /tmp/pc.key >/dev/null || exit 98
PAIR="--heartbeat-ms 200 --heartbeat-timeout-ms 3000 --max-lag-epochs 100000000 \
    --max-slowed-ms 86400000 --max-standby-backlog-mib 4096 --key /tmp/pc.key"
now() {{ date +%s%3N; }}
unprotected() {{ # workload
    cp $D /tmp/pc-p.img
    t0=$(now)
    {ftvm} run --kernel $K --initrd $I --disk /tmp/pc-p.img --mem-mib 256 \
        --append "quiet ftvm.workload=$1" >/tmp/pc-p.out 2>/tmp/pc-p.err
    echo "$1_ms mode=unprotected ms=$(( $(now) - t0 )) status=$?"
}}
protected() {{ # workload
    cp $D /tmp/pc-p.img; cp $D /tmp/pc-s.img; rm -f /tmp/pc-p.audit /tmp/pc-s.audit
    FTVM_AUDIT=/tmp/pc-s.audit {ftvm} standby --listen 127.0.0.1:7200 --disk /tmp/pc-s.img \
        $PAIR >/dev/null 2>/tmp/pc-s.err &
    sp=$!
    t0=$(now)
    FTVM_AUDIT=/tmp/pc-p.audit {ftvm} run --peer 127.0.0.1:7200 --connect-timeout-ms 30000 \
        --kernel $K --initrd $I --disk /tmp/pc-p.img --mem-mib 256 --latency-bound-ms 50 \
        $PAIR --append "quiet ftvm.workload=$1" >/tmp/pc-p.out 2>/tmp/pc-p.err
    st=$?
    echo "$1_ms mode=protected ms=$(( $(now) - t0 )) status=$st"
    wait $sp
    echo "$1_summary $(grep 'protected run complete' /tmp/pc-p.err)"
}}
unprotected files
protected files
echo "--- primary audit ---"; cat /tmp/pc-p.audit
echo "--- standby audit ---"; cat /tmp/pc-s.audit
echo "--- end audit ---"
unprotected dd; echo "unprotected_$(grep '^dd ' /tmp/pc-p.out)"
protected dd; echo "protected_$(grep '^dd ' /tmp/pc-p.out)"
"#
    )
}

/// The text between `from` and `to` in `out`.
fn between<'a>(out: &'a str, from: &str, to: &str) -> &'a str {
    out.split(from)
        .nth(1)
        .and_then(|s| s.split(to).next())
        .unwrap_or_default()
}

/// Prints the figures from the harness's output.
pub fn report(out: &str) {
    println!("\nwhat protection costs (one run each, the standby on the same harness VM):");
    let files = |mode: &str| {
        out.lines()
            .filter(|l| l.starts_with("files_ms "))
            .find(|l| field(l, "mode") == Some(mode))
            .map(|l| {
                (
                    field(l, "ms").and_then(|v| v.parse::<f64>().ok()),
                    field(l, "status") == Some("0"),
                )
            })
    };
    for mode in ["unprotected", "protected"] {
        match files(mode) {
            Some((Some(ms), ok)) => println!(
                "  files workload, {mode:<11} {:>8.1} s{}{}",
                ms / 1000.0,
                if mode == "unprotected" {
                    "   (baseline)"
                } else {
                    ""
                },
                if ok { "" } else { "  (run FAILED)" }
            ),
            _ => println!("  files workload, {mode:<11} no result"),
        }
    }
    for wl in ["files", "dd"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{wl}_summary ")));
        let n = |k: &str| line.and_then(|l| field(l, k)).unwrap_or("?");
        println!(
            "  {wl}, protected: {} epochs, {} repairs",
            n("epochs"),
            n("repairs")
        );
    }
    for mode in ["unprotected", "protected"] {
        match super::dd_rates(out, &format!("{mode}_dd ")) {
            Some((w, r)) => println!(
                "  dd 32 MiB, {mode:<11} write {w:>6.1} MiB/s, read {r:>6.1} MiB/s{}",
                if mode == "unprotected" {
                    "   (baseline)"
                } else {
                    ""
                }
            ),
            None => println!("  dd 32 MiB, {mode:<11} no result"),
        }
    }
    let primary = between(out, "--- primary audit ---\n", "--- standby audit ---");
    let standby = between(out, "--- standby audit ---\n", "--- end audit ---");
    let mut b = Breakdown::default();
    match b.add_run(primary, standby) {
        Ok(()) if !b.total.is_empty() => {
            println!(
                "  output delay of the guest's serial output, protected files run, over {} released epochs:",
                b.total.len()
            );
            b.print_table("    ");
        }
        Ok(()) => println!("  output delay: no epoch released after verification"),
        Err(e) => println!("  output delay: the audit trails do not parse: {e}"),
    }
}
