//! A protected pair with disks, the checks made before the guest starts: the standby's own
//! copy of each disk (`ftvm standby --disk`) must exist, have the primary's disk's size and
//! mode, and there must be as many copies as disks. Otherwise both processes exit 1 with one
//! clear error and no guest starts. These run on PVM with the built-in guest (which ignores
//! its disks): the refusal comes before any guest code runs. The protected Linux guest with
//! its disk, and a failover during its disk writes, are in tests/linux.rs (nested harness).

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

mod common;
use common::{free_addr, Scratch, FTVM};

static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

/// An image of `mib` MiB of zeroes at `dir/name`.
fn image(dir: &Scratch, name: &str, mib: usize) -> String {
    let path = dir.path_str(name);
    std::fs::write(&path, vec![0u8; mib << 20]).expect("write image");
    path
}

/// Runs `ftvm standby --listen ADDR standby_args…` and `ftvm run --peer ADDR primary_args…`
/// (the built-in counter guest); returns (primary, standby).
fn pair(standby_args: &[&str], primary_args: &[&str]) -> (Output, Output) {
    let _one = ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let addr = free_addr();
    let standby = Command::new(FTVM)
        .args(["standby", "--listen", &addr])
        .args(common::key_args(&[]))
        .args(standby_args)
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the standby");
    let primary = Command::new(FTVM)
        .args([
            "run",
            "--peer",
            &addr,
            "--cmdline",
            "workload=counter ticks=5",
        ])
        .args(common::key_args(&[]))
        .args(primary_args)
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    let waiter = std::thread::spawn(move || standby.wait_with_output());
    let start = std::time::Instant::now();
    while !waiter.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the standby did not exit; primary stderr:\n{}",
            String::from_utf8_lossy(&primary.stderr)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let standby = waiter.join().expect("join").expect("wait for the standby");
    (primary, standby)
}

/// Both exit 1, each with one `ftvm: error:` line containing `why`, and no guest output.
fn assert_refused(primary: &Output, standby: &Output, why: &str) {
    for (who, o) in [("primary", primary), ("standby", standby)] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{who}: {err}");
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("ftvm: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{who}: one error line expected:\n{err}");
        assert!(errors[0].contains(why), "{who}: {why:?} not in {err}");
        assert!(!err.contains("panicked"), "{who}: {err}");
        assert!(
            o.stdout.is_empty(),
            "{who} printed guest output: {:?}",
            o.stdout
        );
    }
    let perr = String::from_utf8_lossy(&primary.stderr);
    assert!(perr.contains("refused the guest"), "{perr}");
    assert!(!perr.contains("unprotected"), "{perr}");
}

#[test]
fn a_standby_copy_of_another_size_is_refused_on_both_sides() {
    let dir = Scratch::new("pair-disk-size");
    let disk = image(&dir, "disk.img", 4);
    let copy = image(&dir, "copy.img", 2);
    let (p, s) = pair(&["--disk", &copy], &["--disk", &disk]);
    assert_refused(&p, &s, "the primary's disk is 4 MiB");
    assert!(String::from_utf8_lossy(&s.stderr).contains("is 2 MiB"));
}

#[test]
fn a_missing_standby_copy_is_refused_on_both_sides() {
    let dir = Scratch::new("pair-disk-missing");
    let disk = image(&dir, "disk.img", 1);
    let missing = dir.path_str("no-such-copy.img");
    let (p, s) = pair(&["--disk", &missing], &["--disk", &disk]);
    assert_refused(&p, &s, "no-such-copy.img");
}

#[test]
fn a_disk_count_mismatch_is_refused_on_both_sides() {
    let dir = Scratch::new("pair-disk-count");
    let disk = image(&dir, "disk.img", 1);
    let copy = image(&dir, "copy.img", 1);
    let (p, s) = pair(&[], &["--disk", &disk]);
    assert_refused(&p, &s, "has 1 disk(s), this standby was given 0");
    let (p, s) = pair(&["--disk", &copy], &[]);
    assert_refused(&p, &s, "has 0 disk(s), this standby was given 1");
}

#[test]
fn a_standby_copy_in_another_mode_is_refused_on_both_sides() {
    let dir = Scratch::new("pair-disk-mode");
    let disk = image(&dir, "disk.img", 1);
    let copy = image(&dir, "copy.img", 1);
    let ro = format!("{disk},ro");
    let (p, s) = pair(&["--disk", &copy], &["--disk", &ro]);
    assert_refused(&p, &s, "the primary attaches its disk read-only");
}

#[test]
fn a_pair_with_matching_copies_runs_the_guest_protected() {
    let dir = Scratch::new("pair-disk-ok");
    let disk = image(&dir, "disk.img", 1);
    let copy = image(&dir, "copy.img", 1);
    let (p, s) = pair(&["--disk", &copy], &["--disk", &disk]);
    let perr = String::from_utf8_lossy(&p.stderr);
    assert_eq!(p.status.code(), Some(0), "primary: {perr}");
    assert_eq!(
        s.status.code(),
        Some(0),
        "standby: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    assert!(!perr.contains("unprotected"), "{perr}");
    let out = String::from_utf8_lossy(&p.stdout);
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.starts_with("done sum=")),
        "{out}"
    );
}

/// Runs `ftvm run --accept-standby ADDR primary_args…` (the counter guest, long enough for a
/// standby to join) and, once it runs, `ftvm standby --join ADDR standby_args…`; returns
/// (primary, standby).
fn join(standby_args: &[&str], primary_args: &[&str]) -> (Output, Output) {
    let _one = ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let addr = free_addr();
    let primary = Command::new(FTVM)
        .args(["run", "--accept-standby", &addr])
        .args(common::key_args(&[]))
        .args(["--cmdline", "workload=counter ticks=100"])
        .args(primary_args)
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the primary");
    std::thread::sleep(Duration::from_millis(200));
    let standby = Command::new(FTVM)
        .args(["standby", "--join", &addr])
        .args(common::key_args(&[]))
        .args(standby_args)
        .stdin(Stdio::null())
        .output()
        .expect("run the standby");
    let primary = primary.wait_with_output().expect("wait for the primary");
    (primary, standby)
}

/// A read-only disk cannot have changed: a standby with its copy joins and protects the
/// guest to its end.
#[test]
fn a_standby_joins_a_guest_with_a_read_only_disk() {
    let dir = Scratch::new("pair-disk-join-ro");
    let disk = image(&dir, "disk.img", 1);
    let copy = image(&dir, "copy.img", 1);
    let (p, s) = join(
        &["--disk", &format!("{copy},ro")],
        &["--disk", &format!("{disk},ro")],
    );
    let perr = String::from_utf8_lossy(&p.stderr);
    assert_eq!(
        s.status.code(),
        Some(0),
        "standby: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    assert_eq!(p.status.code(), Some(0), "primary: {perr}");
    assert!(perr.contains("protected_to_end=true"), "{perr}");
    assert!(s.stdout.is_empty(), "the standby printed output");
}
