//! TSC reads as exits (kmod/, DESIGN.md §2): the ftvm-rdtsc-exits KVM module in the
//! nested-KVM harness (`scripts/nested.sh --rdtsc-exits`, which builds it with kmod/build.sh
//! on first use and caches it under target/kmod/), and the probe where it is absent (the
//! stock harness, and this host's /dev/kvm).
//!
//! `cargo test --test rdtsc_exits` runs them. Each nested test is one harness boot (about
//! 10 s) plus its work; the first run also downloads Debian's kernel sources and headers
//! and builds the module (about two minutes).
//!
//! The stock counterpart, `workload=rdtsc` diverging where TSC reads are not exits, is
//! tests/replay.rs `rdtsc_is_reported_diverged` (on PVM, and in the stock harness through
//! tests/nested.rs).

use std::process::Command;
use std::sync::Mutex;

mod common;
use common::{nested_with, ReplaySummary, FTVM};

/// One VM at a time: each takes both cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// The values `workload=rdtsc` printed, in order (`rdtsc <i> value=<hex>` lines).
fn rdtsc_values(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("rdtsc "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// With the module: the probe says present; the built-in guest's `rdtsc` workload, recorded
/// with TSC-read exits, replays with every epoch verified and no divergence, and the replayed
/// guest prints exactly the TSC values the recorded one printed.
#[test]
fn rdtsc_workload_replays_exactly_with_the_module() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let script = format!(
        "{FTVM} tsc-probe || exit 97; \
         echo '--- record'; \
         timeout 120 {FTVM} run --cmdline 'workload=rdtsc n=8' --record /tmp/rdtsc-exits.log \
           --tsc exits --latency-bound-ms 50 </dev/null || exit 98; \
         echo '--- replay'; \
         timeout 120 {FTVM} replay --show-output /tmp/rdtsc-exits.log 2>&1"
    );
    let (status, out, err) = nested_with(&["--rdtsc-exits"], &["sh", "-c", &script], 400);
    let ctx = format!("{out}\n--- harness stderr ---\n{err}");
    assert!(
        out.lines().next() == Some("tsc-exits: present"),
        "the probe did not find the module: {ctx}"
    );
    let (record, replay) = out
        .split_once("--- replay")
        .unwrap_or_else(|| panic!("no replay ran: {ctx}"));
    let recorded = rdtsc_values(record);
    assert_eq!(recorded.len(), 8, "{ctx}");
    let s = ReplaySummary::find(replay).unwrap_or_else(|e| panic!("{e}: {ctx}"));
    assert_eq!(s.diverged, 0, "{ctx}");
    assert_eq!(s.checkpoint_required, 0, "{ctx}");
    assert!(s.epochs > 0 && s.verified == s.epochs, "{}: {ctx}", s.line);
    assert_eq!(rdtsc_values(replay), recorded, "{ctx}");
    assert_eq!(status, Some(0), "{ctx}");
}

/// Without the module (the stock harness): the probe, which installs the filter and runs
/// RDTSC under it, says absent because the guest read the TSC natively and reached its HLT
/// (the filter alone changes nothing), and `--tsc exits` is refused with that reason.
#[test]
fn probe_says_absent_on_stock_kvm_and_the_filter_changes_nothing() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let script = format!(
        "{FTVM} tsc-probe; \
         {FTVM} run --cmdline 'workload=rdtsc n=1' --record /tmp/rdtsc-stock.log --tsc exits \
           </dev/null; echo \"status=$?\""
    );
    let (status, out, err) = nested_with(&[], &["sh", "-c", &script], 300);
    let ctx = format!("{out}\n--- harness stderr ---\n{err}");
    assert_eq!(status, Some(0), "{ctx}");
    assert!(
        out.lines().next()
            == Some("tsc-exits: absent: RDTSC ran natively under the MSR filter: no ftvm-rdtsc-exits module"),
        "{ctx}"
    );
    assert!(out.contains("status=1"), "{ctx}");
    assert!(
        ctx.contains("--tsc exits: this host's KVM has no TSC-read exits"),
        "{ctx}"
    );
}

/// On this host's /dev/kvm (PVM on the development machines, or stock KVM): absent.
#[test]
fn probe_says_absent_on_this_host() {
    let o = Command::new(FTVM)
        .arg("tsc-probe")
        .output()
        .expect("run ftvm");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.starts_with("tsc-exits: absent: "), "{out}");
}

/// The Linux test guest (Debian kernel, `files` disk workload) recorded with TSC-read exits
/// and replayed: the recording completes with the right checksums and every TSC read
/// logged; the replay verifies every epoch, or reports the first divergence with its epoch
/// and exit (printed, and named in the README), never passing one silently.
#[test]
fn a_linux_guest_recorded_with_tsc_exits_replays_or_names_its_divergence() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initrd) = common::linux_guest_images();
    let expected: Vec<String> = common::linux_guest(&["expected"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(expected.len(), 3, "{expected:?}");
    let dir = common::Scratch::new("rdtsc-exits-linux");
    let disk = dir.path_str("disk.img");
    common::linux_guest(&["disk", &disk]);
    let log = dir.path_str("linux.log");
    let script = format!(
        "cp {disk} /tmp/replay-disk.img || exit 98; \
         timeout 400 {FTVM} run --kernel {kernel} --initrd {initrd} --disk {disk} \
           --mem-mib 256 --append quiet --record {log} --tsc exits --latency-bound-ms 50 \
           </dev/null; echo \"record-status=$?\"; \
         timeout 300 {FTVM} replay {log} --kernel {kernel} --initrd {initrd} \
           --disk /tmp/replay-disk.img; echo \"replay-status=$?\""
    );
    let (status, out, err) = nested_with(&["--rdtsc-exits"], &["sh", "-c", &script], 800);
    // The command's stdout and stderr both come back on the harness's stdout.
    let ctx = format!("{out}\n--- harness stderr ---\n{err}");
    assert_eq!(status, Some(0), "{ctx}");
    assert!(out.contains("record-status=0"), "{ctx}");
    assert!(ctx.contains("TSC reads are exits"), "{ctx}");
    let checksums: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("checksum "))
        .map(|l| l.trim_end().to_string())
        .collect();
    assert_eq!(checksums, expected, "{ctx}");
    let s = ReplaySummary::find(&out).unwrap_or_else(|e| panic!("{e}: {ctx}"));
    let divergence = out.lines().find(|l| l.starts_with("diverged epoch="));
    if s.diverged + s.checkpoint_required == 0 {
        assert_eq!(s.verified, s.epochs, "{ctx}");
        assert!(out.contains("replay-status=0"), "{ctx}");
    } else {
        assert!(out.contains("replay-status=1"), "{ctx}");
        if s.diverged > 0 {
            let d = divergence.unwrap_or_else(|| panic!("a divergence not named: {ctx}"));
            assert!(d.contains(" exit_seq="), "{ctx}");
        }
    }
    eprintln!(
        "Linux with TSC-read exits: {}; {}",
        s.line,
        divergence.unwrap_or("no divergence")
    );
}
