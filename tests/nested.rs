//! The end-to-end tests of the built-in guest on standard KVM: each test boots the
//! nested-KVM harness (`scripts/nested.sh`: QEMU TCG with emulated SVM, a Debian kernel with
//! kvm-amd nested=1, this host's root shared read-only) and runs one of the other test
//! binaries of this build inside it, so nothing depends on a PVM quirk.
//!
//! `cargo test --test nested` runs them; the first run installs QEMU, busybox-static and
//! cpio and downloads the kernel package (scripts/nested.sh).
//!
//! The VMM itself runs under TCG emulation there, so the suites are told where they run
//! (`FTVM_TEST_HOST=nested`) and size what depends on the host's speed accordingly (see
//! each suite). Each suite runs once, one test at a time; with an idle host: workloads
//! about 25 s, record/replay about 40 s, the pair's tests about 55 s, each with the
//! harness's boot of about 10 s.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

mod common;
use common::{nested, ReplaySummary, FTVM};

/// One VM at a time: each takes both cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// The newest test binary of `tests/<name>.rs` beside this one (`name-<hash>`). Its dep-info
/// file (`name-<hash>.d`) must name `tests/<name>.rs` as the crate root: a bench of the same
/// name (`benches/<name>.rs`, harness = false) lies beside it too, and running that instead
/// would run a benchmark.
fn sibling_test(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current_exe");
    let dir = me.parent().expect("deps dir");
    let root = format!("tests/{name}.rs");
    let is_test_of = |binary: &Path| -> bool {
        let Ok(depinfo) = std::fs::read_to_string(binary.with_extension("d")) else {
            return false;
        };
        // `<binary>: <crate root> <other sources>...` on the first line.
        depinfo
            .lines()
            .next()
            .and_then(|l| l.split_once(": "))
            .and_then(|(_, deps)| deps.split_whitespace().next())
            .is_some_and(|first| first == root || first.ends_with(&format!("/{root}")))
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .expect("read deps dir")
        .filter_map(Result::ok)
        .filter(|e| {
            let file = e.file_name();
            let file = file.to_string_lossy();
            file.strip_prefix(&format!("{name}-"))
                .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .filter(|e| is_test_of(&e.path()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no test binary of {root} in {}", dir.display()))
        .1
}

/// Runs the test binary of tests/<name>.rs inside the harness, one test at a time, with
/// `env` set: the tests named in `tests` (each must run and pass), or all of them if it is
/// empty. Loopback comes up first: the harness's VM starts with `lo` down, and the pair
/// suite talks TCP on 127.0.0.1.
fn run_suite_nested(name: &str, env: &[(&str, &str)], tests: &[&str], timeout_s: u32) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let suite = sibling_test(name).to_string_lossy().into_owned();
    let mut cmd: Vec<String> = [
        "sh",
        "-c",
        "busybox ip link set lo up && exec env \"$@\"",
        "sh",
    ]
    .map(String::from)
    .to_vec();
    cmd.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    cmd.extend([
        suite,
        "--test-threads=1".into(),
        "--color".into(),
        "never".into(),
    ]);
    if !tests.is_empty() {
        cmd.push("--exact".into());
        cmd.extend(tests.iter().map(|t| t.to_string()));
    }
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (status, out, err) = nested(&args, timeout_s);
    let took = started.elapsed();
    assert_eq!(
        status,
        Some(0),
        "{name} on standard KVM failed after {took:.0?}:\n{out}\n--- harness stderr ---\n{err}"
    );
    assert!(out.contains("test result: ok."), "{out}");
    for t in tests {
        assert!(
            out.lines().any(|l| l == format!("test {t} ... ok")),
            "{t} did not run in the {name} suite:\n{out}"
        );
    }
    eprintln!("{name} on standard KVM, {took:.0?} with the harness's boot:\n{out}");
}

#[test]
fn nested_harness_reports_the_command_status_and_offers_kvm() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (status, out, err) = nested(
        &[
            "sh",
            "-c",
            "test -c /dev/kvm && cat /sys/module/kvm_amd/parameters/nested && echo ok; exit 7",
        ],
        300,
    );
    assert_eq!(status, Some(7), "{out}\n{err}");
    assert_eq!(out.trim(), "1\nok", "{err}");
}

/// The counter guest runs, is recorded and replays on standard KVM (one VM boot): every
/// epoch verified, or, where the recorder had to kick the vCPU (the VMM runs under TCG here,
/// slowly), stopped at the first checkpoint-required epoch; never a divergence.
#[test]
fn nested_counter_records_and_replays_on_standard_kvm() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let script = format!(
        "timeout 60 {FTVM} run --cmdline 'workload=counter ticks=30' --record /tmp/c.log || exit 99; \
         timeout 60 {FTVM} replay /tmp/c.log"
    );
    let (status, out, err) = nested(&["sh", "-c", &script], 300);
    let lines: Vec<&str> = out.lines().collect();
    for n in 1..=30 {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("tick {n} sum="))),
            "tick {n} missing:\n{out}\n--- harness stderr ---\n{err}"
        );
    }
    assert!(lines.iter().any(|l| l.starts_with("done sum=")), "{out}");
    let s = ReplaySummary::find(&out).unwrap_or_else(|e| panic!("{e}:\n{out}\n{err}"));
    assert_eq!(s.diverged, 0, "{out}");
    let (epochs, verified, stopped) = (s.epochs, s.verified, s.checkpoint_required);
    assert!(
        stopped <= 1 && verified + stopped == epochs && verified > 0,
        "{}",
        s.line
    );
    assert_eq!(status, Some(u8::from(stopped > 0).into()), "{out}\n{err}");
}

/// The workload suite (tests/run.rs) inside the harness.
#[test]
fn nested_workloads_on_standard_kvm() {
    run_suite_nested("run", &[], &[], 300);
}

/// The record/replay suite (tests/replay.rs) inside the harness. `FTVM_TEST_HOST=nested`
/// raises the recorder's latency bound there to 50 ms: the VMM runs under TCG emulation, and
/// a KVM_RUN of a few guest instructions sometimes takes 5 ms of the vCPU thread's CPU time
/// (the emulated CPU stalls, and the stall is charged to whatever thread runs), which the
/// default 4 ms bound takes for an exit-free stretch (docs/ARCHITECTURE.md, "Kicks").
#[test]
fn nested_record_replay_on_standard_kvm() {
    run_suite_nested("replay", &[("FTVM_TEST_HOST", "nested")], &[], 300);
}

/// The protected pair (tests/pair.rs) inside the harness: a run to completion, failover
/// drills on each workload (two each), repairs, and re-protection by a standby that joins.
/// `FTVM_TEST_HOST=nested` sizes the guests and the kill windows for the harness, where a
/// protected guest advances about fifty times slower than on PVM, and gives the pair a
/// heartbeat timeout of a second. The rest of the suite is about the protocol (fake peers,
/// status, switchover) rather than the host, and stays on PVM.
#[test]
fn nested_pair_on_standard_kvm() {
    run_suite_nested(
        "pair",
        &[("FTVM_TEST_HOST", "nested"), ("FTVM_DRILLS", "2")],
        &[
            "the_pair_runs_counter_to_completion",
            "failover_drills",
            "failover_drills_rdtsc",
            "failover_drills_spin",
            "spin_stays_protected_every_kick_repaired",
            "a_primary_started_alone_accepts_a_standby_that_joins",
        ],
        400,
    );
}

/// The save/restore suite (vmm/tests/state.rs) inside the harness. On standard KVM (nested
/// paging) a guest's first access to a page, a read too, counts as dirty; on PVM the
/// dirty-set test (a VM and its copy made at a checkpoint count the same pages dirty,
/// DESIGN.md §2 "Dirty sets") passes even without the fix it tests, so it is run here.
#[test]
fn nested_save_restore_on_standard_kvm() {
    run_suite_nested(
        "state",
        &[],
        &[
            "a_vm_moved_mid_run_into_a_new_vm_ends_identical",
            "a_vm_and_its_copy_count_the_same_dirty_pages_after_a_checkpoint",
        ],
        300,
    );
}
