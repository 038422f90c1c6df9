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
/// logged; the replay diverges nowhere, and verifies every epoch unless the recording needed
/// a checkpoint somewhere (a kick: the vCPU ran exit-free past its latency bound after a
/// timer deadline; a log file carries no checkpoint, so its replay stops there, named).
///
/// The recording's latency bound is 30 s, not the 50 ms the other nested runs use: with
/// 50 ms the guest's exit-free stretches under the harness (unpacking the initramfs, hashing
/// the files in user space) were kicked 142 times in 4105 epochs and the replay stopped at
/// the first, epoch 526, every epoch before it verified (README, "Exact replay with the host
/// module"). With 30 s a pending interrupt waits for the guest's next exit, a TSC read
/// among them, and that replays exactly: 2845 of 2845 epochs verified, no kick (368 s).
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
           --mem-mib 256 --append quiet --record {log} --tsc exits --latency-bound-ms 30000 \
           </dev/null 2>/tmp/record.err; echo \"record-status=$?\"; cat /tmp/record.err; \
         timeout 300 {FTVM} replay {log} --kernel {kernel} --initrd {initrd} \
           --disk /tmp/replay-disk.img; echo \"replay-status=$?\""
    );
    let (status, out, err) = nested_with(&["--rdtsc-exits"], &["sh", "-c", &script], 800);
    // The command's stdout and stderr both come back on the harness's stdout (the
    // recording's log through a file: on the harness's console it would be coloured).
    let ctx = format!("{out}\n--- harness stderr ---\n{err}");
    assert_eq!(status, Some(0), "{ctx}");
    assert!(out.contains("record-status=0"), "{ctx}");
    assert!(ctx.contains("TSC reads are exits"), "{ctx}");
    let recorded = out
        .lines()
        .find(|l| l.contains("recording complete"))
        .unwrap_or_else(|| panic!("no end-of-recording line: {ctx}"));
    let tsc_reads: u64 = common::field(recorded, "tsc_reads")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tsc_reads= in {recorded}: {ctx}"));
    assert!(tsc_reads > 0, "{ctx}");
    let checksums: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("checksum "))
        .map(|l| l.trim_end().to_string())
        .collect();
    assert_eq!(checksums, expected, "{ctx}");
    let s = ReplaySummary::find(&out).unwrap_or_else(|e| panic!("{e}: {ctx}"));
    let divergence = out.lines().find(|l| l.starts_with("diverged epoch="));
    assert_eq!(s.diverged, 0, "{:?}: {ctx}", divergence);
    if s.checkpoint_required == 0 {
        assert_eq!(s.verified, s.epochs, "{ctx}");
        assert!(out.contains("replay-status=0"), "{ctx}");
    } else {
        // Stopped where the recording was kicked: every epoch before it verified.
        assert_eq!(s.verified + 1, s.epochs, "{ctx}");
        assert!(out.contains("replay-status=1"), "{ctx}");
    }
    eprintln!(
        "Linux with TSC-read exits: {}; recorded: {}",
        s.line,
        recorded
            .split_once("recording complete")
            .map_or("", |r| r.1)
            .trim()
    );
}

/// `--tsc exits` on a protected run where this host has no TSC-read exits: refused before
/// anything starts, with the reason.
#[test]
fn tsc_exits_on_a_protected_run_is_refused_on_this_host() {
    let o = Command::new(FTVM)
        .args([
            "run",
            "--peer",
            "127.0.0.1:9",
            "--insecure",
            "--tsc",
            "exits",
        ])
        .output()
        .expect("run ftvm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--tsc exits: this host's KVM has no TSC-read exits"),
        "{err}"
    );
}

/// The pair's TSC mode (issue 18): in one harness boot with the module, the built-in
/// guest's `rdtsc` workload (whose TSC values decide what it computes and prints) runs
/// protected three times (3000 reads, 500 in the fallback, which repairs each):
/// - both sides have TSC-read exits: the pair runs in exact mode (`ftvm status` says
///   `tsc=exits` on both), every epoch verified with no repair;
/// - the standby's host has none (`FTVM_TSC_EXITS=off`, what a host without the module
///   says), the primary left at `--tsc auto`: both sides repair (`tsc=repair`), the TSC
///   reads make epochs diverge and each is repaired, and the guest's output is whole;
/// - the same standby, the primary at `--tsc exits`: refused, one clear error, exit 1.
#[test]
fn a_pair_uses_tsc_exits_only_when_both_hosts_have_them() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    // The fallback repairs every TSC read: fewer of them keep the test short.
    let case = |name: &str, standby_env: &str, tsc: &str, n: u32| {
        format!(
            "{standby_env} FTVM_LOG=ftvm_secondary=info {FTVM} standby --listen 127.0.0.1:7000 \
               --key /tmp/k --control 127.0.0.1:7100 >/tmp/{name}-s.out 2>/tmp/{name}-s.err & sp=$!\n\
             FTVM_LOG=ftvm=info {FTVM} run --peer 127.0.0.1:7000 --key /tmp/k --tsc {tsc} \
               --control 127.0.0.1:7101 --cmdline 'workload=rdtsc n={n}' --latency-bound-ms 50 \
               --connect-timeout-ms 20000 </dev/null >/tmp/{name}-p.out 2>/tmp/{name}-p.err & pp=$!\n\
             until {FTVM} status 127.0.0.1:7101 --key /tmp/k >/tmp/{name}-p.status 2>/dev/null; do \
               kill -0 $pp 2>/dev/null || break; sleep 0.1; done\n\
             {FTVM} status 127.0.0.1:7100 --key /tmp/k >/tmp/{name}-s.status 2>/dev/null\n\
             wait $pp; echo \"{name}-primary-status=$?\"\n\
             kill $sp 2>/dev/null; wait $sp\n\
             echo \"{name}-primary-tsc=$(grep '^tsc=' /tmp/{name}-p.status)\"\n\
             echo \"{name}-standby-tsc=$(grep '^tsc=' /tmp/{name}-s.status)\"\n\
             echo \"{name}-lines=$(grep -c '^rdtsc ' /tmp/{name}-p.out)\"\n\
             echo \"{name}-done=$(grep -c '^done' /tmp/{name}-p.out)\"\n\
             sed 's/^/{name}-p.err: /' /tmp/{name}-p.err | grep -v 'asking for a repair' | tail -8\n\
             sed 's/^/{name}-s.err: /' /tmp/{name}-s.err | grep -v 'checkpoint installed\\|asking for a repair' | tail -8\n"
        )
    };
    let script = format!(
        "busybox ip link set lo up || exit 98\n\
         {FTVM} keygen --out /tmp/k >/dev/null || exit 98\n\
         {}{}{}",
        case("both", "", "auto", 3000),
        case("fallback", "FTVM_TSC_EXITS=off", "auto", 500),
        case("insist", "FTVM_TSC_EXITS=off", "exits", 3000),
    );
    let (status, out, err) = nested_with(&["--rdtsc-exits"], &["sh", "-c", &script], 600);
    let ctx = format!("{out}\n--- harness stderr ---\n{err}");
    assert_eq!(status, Some(0), "{ctx}");
    let repairs = |name: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| {
                l.starts_with(&format!("{name}-p.err:")) && l.contains("protected run complete")
            })
            .unwrap_or_else(|| panic!("{name}: no end-of-run line: {ctx}"));
        common::field(line, "repairs")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no repairs= in {line}"))
    };
    // Both hosts have the module: exact mode, nothing to repair.
    assert!(out.contains("both-primary-status=0"), "{ctx}");
    assert!(out.contains("both-primary-tsc=tsc=exits"), "{ctx}");
    assert!(out.contains("both-standby-tsc=tsc=exits"), "{ctx}");
    assert!(
        out.contains("both-lines=3000") && out.contains("both-done=1"),
        "{ctx}"
    );
    assert!(out.contains("replayed exactly from the log"), "{ctx}");
    assert_eq!(repairs("both"), 0, "{ctx}");
    // The standby's host has none: both repair, and the TSC reads need repairs.
    assert!(out.contains("fallback-primary-status=0"), "{ctx}");
    assert!(out.contains("fallback-primary-tsc=tsc=repair"), "{ctx}");
    assert!(out.contains("fallback-standby-tsc=tsc=repair"), "{ctx}");
    assert!(
        out.contains("the standby's host has no TSC-read exits"),
        "{ctx}"
    );
    assert!(
        out.contains("fallback-lines=500") && out.contains("fallback-done=1"),
        "{ctx}"
    );
    assert!(repairs("fallback") > 0, "{ctx}");
    // --tsc exits insists: refused.
    assert!(out.contains("insist-primary-status=1"), "{ctx}");
    assert!(
        out.contains("--tsc exits, and the standby's host has no TSC-read exits"),
        "{ctx}"
    );
    assert!(out.contains("insist-lines=0"), "{ctx}");
    eprintln!(
        "TSC mode of a pair: exact mode 0 repairs; fallback {} repairs",
        repairs("fallback")
    );
}
