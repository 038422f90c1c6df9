//! Bounded memory with back-pressure (DESIGN.md §6, bounds), with real processes: a standby
//! stopped with SIGSTOP for seconds slows the primary's guest (it waits for the standby, its
//! memory stays bounded: read from /proc) and the guest resumes when the standby does; a
//! standby stopped past the second bound is dropped explicitly and the guest finishes alone.

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod common;
use common::{free_addr, pair_key, status_with_key, wait_for_status_line, FTVM};

static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pair process with the test key and a patient failure detector (a stopped standby must
/// be dropped by the bounds, not taken for dead).
fn spawn(args: &[&str]) -> Proc {
    let child = Command::new(FTVM)
        .args(args)
        .args(["--key", pair_key(), "--heartbeat-timeout-ms", "60000"])
        .env("FTVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    Proc(child)
}

fn signal(p: &Proc, sig: libc::c_int) {
    // SAFETY: kill(2) on a child of ours, which has not been reaped (Proc waits on drop).
    let rc = unsafe { libc::kill(p.0.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
}

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

/// Resident memory of `pid` in KiB.
fn rss_kib(p: &Proc) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{}/status", p.0.id())).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn finish(p: Proc) -> (Option<i32>, String, String) {
    let mut p = p;
    let start = Instant::now();
    while p.0.try_wait().expect("try_wait").is_none() {
        assert!(start.elapsed() < Duration::from_secs(90), "did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut o) = p.0.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = p.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (p.0.wait().ok().and_then(|s| s.code()), out, err)
}

fn check(out: &str, ticks: u64) {
    if let Err(e) = common::check_counter(out, ticks) {
        panic!("{e}:\n{out}");
    }
}

#[test]
fn a_stopped_standby_slows_the_guest_with_bounded_memory_and_it_resumes() {
    let _one = serial();
    let (listen, pc) = (free_addr(), free_addr());
    let s = spawn(&["standby", "--listen", &listen]);
    let p = spawn(&[
        "run",
        "--peer",
        &listen,
        "--control",
        &pc,
        "--cmdline",
        "workload=counter ticks=300",
        "--max-lag-ms",
        "200",
        "--max-slowed-ms",
        "600000",
    ]);
    wait_for_status_line(&pc, "protected=yes");
    signal(&s, libc::SIGSTOP);
    let slowed = wait_for_status_line(&pc, "slowed=yes");
    let rss = rss_kib(&p);
    let epoch = field(&slowed, "epoch");
    // Seconds pass with the standby stopped: the guest waits, nothing piles up.
    std::thread::sleep(Duration::from_secs(3));
    let later = status_with_key(&pc, pair_key()).unwrap_or_else(|e| e);
    assert!(
        later.contains("slowed=yes\n") && later.contains("protected=yes\n"),
        "{later}"
    );
    assert!(
        field(&later, "epoch") <= epoch + 1,
        "the guest ran on with its standby stopped:\n{slowed}\n{later}"
    );
    let grown = rss_kib(&p).saturating_sub(rss);
    assert!(
        grown < 16 << 10,
        "the primary grew {grown} KiB while slowed"
    );
    signal(&s, libc::SIGCONT);
    let (code, out, err) = finish(p);
    assert_eq!(code, Some(0), "{err}");
    check(&out, 300);
    assert!(!err.contains("unprotected"), "{err}");
    assert!(err.contains("the guest is slowed to its pace"), "{err}");
    let (code, _, err) = finish(s);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_standby_stopped_past_the_second_bound_is_dropped_and_the_guest_finishes_alone() {
    let _one = serial();
    let (listen, pc) = (free_addr(), free_addr());
    let s = spawn(&["standby", "--listen", &listen]);
    let p = spawn(&[
        "run",
        "--peer",
        &listen,
        "--control",
        &pc,
        "--cmdline",
        "workload=counter ticks=200",
        // The deprecated epoch bound still works, next to the default --max-lag-ms.
        "--max-lag-epochs",
        "20",
        "--max-slowed-ms",
        "1000",
    ]);
    wait_for_status_line(&pc, "protected=yes");
    signal(&s, libc::SIGSTOP);
    let (code, out, err) = finish(p);
    assert_eq!(code, Some(0), "{err}");
    check(&out, 200);
    assert!(
        err.contains("standby too far behind") && err.contains("running unprotected"),
        "{err}"
    );
    assert!(err.contains("--max-lag-epochs 20 is deprecated"), "{err}");
    signal(&s, libc::SIGCONT);
}
