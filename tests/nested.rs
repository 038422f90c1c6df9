//! The end-to-end tests of the built-in guest on standard KVM: each test boots the
//! nested-KVM harness (`scripts/nested.sh`: QEMU TCG with emulated SVM, a Debian kernel with
//! kvm-amd nested=1, this host's root shared read-only) and runs one of the other test
//! binaries of this build inside it, so nothing depends on a PVM quirk.
//!
//! `cargo test --test nested` runs them; the first run installs QEMU, busybox-static and
//! cpio and downloads the kernel package (scripts/nested.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One VM at a time: each takes both cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// The newest test binary named `name-<hash>` beside this one.
fn sibling_test(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current_exe");
    let dir = me.parent().expect("deps dir");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .expect("read deps dir")
        .filter_map(Result::ok)
        .filter(|e| {
            let file = e.file_name();
            let file = file.to_string_lossy();
            file.strip_prefix(&format!("{name}-"))
                .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no {name} test binary in {}", dir.display()))
        .1
}

/// Runs `args` inside the harness; returns (status, stdout, stderr).
fn nested(args: &[&str], timeout_s: u32) -> (Option<i32>, String, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(repo.join("scripts/nested.sh"))
        .args(["--timeout", &timeout_s.to_string(), "--"])
        .args(args)
        .current_dir(repo)
        .output()
        .expect("run scripts/nested.sh");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn run_suite_nested(name: &str, timeout_s: u32) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let suite = sibling_test(name);
    let suite = suite.to_string_lossy().into_owned();
    let (status, out, err) = nested(&[&suite, "--test-threads=1", "--color", "never"], timeout_s);
    assert_eq!(
        status,
        Some(0),
        "{name} on standard KVM failed:\n{out}\n--- harness stderr ---\n{err}"
    );
    assert!(out.contains("test result: ok."), "{out}");
    eprintln!("{name} on standard KVM:\n{out}");
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
    let ftvm = env!("CARGO_BIN_EXE_ftvm");
    let script = format!(
        "timeout 60 {ftvm} run --cmdline 'workload=counter ticks=30' --record /tmp/c.log || exit 99; \
         timeout 60 {ftvm} replay /tmp/c.log"
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
    let summary = lines
        .iter()
        .find(|l| l.starts_with("epochs="))
        .unwrap_or_else(|| panic!("no replay summary:\n{out}\n{err}"));
    let field = |key: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {summary}"))
    };
    assert_eq!(field("diverged"), 0, "{out}");
    let (epochs, verified, stopped) = (
        field("epochs"),
        field("verified"),
        field("checkpoint_required"),
    );
    assert!(
        stopped <= 1 && verified + stopped == epochs && verified > 0,
        "{summary}"
    );
    assert_eq!(status, Some(u8::from(stopped > 0).into()), "{out}\n{err}");
}

/// The workload suite (tests/run.rs) inside the harness.
#[test]
fn nested_workloads_on_standard_kvm() {
    run_suite_nested("run", 300);
}

/// The record/replay suite (tests/replay.rs) inside the harness. Not in CI yet: there the
/// recorder kicks the vCPU now and then (a checkpoint-required epoch) in workloads the suite
/// expects to replay without one; `cargo test --release --test nested -- --ignored`.
#[test]
#[ignore = "recordings made under the harness get checkpoint-required epochs the suite does not expect (issue 6)"]
fn nested_record_replay_on_standard_kvm() {
    run_suite_nested("replay", 300);
}
