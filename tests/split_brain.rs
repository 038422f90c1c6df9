//! Never two live primaries (DESIGN.md §5), end to end: `ftvm standby` and `ftvm run --peer`
//! as real processes on loopback, frozen with SIGSTOP (the connection stays open, only the
//! bytes stop: what a partition or a stalled host looks like to the peer) and killed with
//! SIGKILL (the connection closes: evidence that the process is gone).
//!
//! Without an arbiter, silence never makes a standby live: it waits, and follows again when
//! the primary speaks; `ftvm promote` is the operator's way to make it live. A standby the
//! primary dropped is told so (`Abandon`) and never goes live from that pair, even when the
//! primary dies right after.
//!
//! The tests run one at a time, like tests/pair.rs, and assert no timings: each waits for
//! what it needs to see (a status line, a log line) before the next step.

use std::io::{BufRead, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;
use common::{free_addr, FTVM};

/// What `ftvm standby` exits with when its primary abandoned it (src/main.rs).
const STATUS_ABANDONED: i32 = 10;

const LIMIT: Duration = Duration::from_secs(60);

static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An `ftvm` process whose stdout and stderr are collected; stderr lines containing one of
/// the watched needles are announced on `seen`.
struct Proc {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    seen: Receiver<&'static str>,
}

struct Done {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Done {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn spawn(args: &[&str], watch: &[&'static str]) -> Proc {
    spawn_with(args, watch, Stdio::null())
}

fn spawn_with(args: &[&str], watch: &[&'static str], stdin: Stdio) -> Proc {
    let mut child = Command::new(FTVM)
        .args(args)
        .env("FTVM_LOG", "info")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let mut out = child.stdout.take().expect("stdout");
    let stdout = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let (tx, seen) = std::sync::mpsc::channel();
    let watch = watch.to_vec();
    let stderr = std::thread::spawn(move || {
        let mut all = Vec::new();
        loop {
            let start = all.len();
            match err.read_until(b'\n', &mut all) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&all[start..]).into_owned();
                    for needle in &watch {
                        if line.contains(needle) {
                            let _ = tx.send(*needle);
                        }
                    }
                }
            }
        }
    });
    Proc {
        child,
        stdout: Some(stdout),
        stderr: Some(stderr),
        seen,
    }
}

fn joined(h: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
}

impl Proc {
    /// Waits until stderr had a line containing `needle` (a watched one).
    fn expect(&mut self, needle: &'static str) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.seen.recv_timeout(left) {
                Ok(n) if n == needle => return,
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let err = String::from_utf8_lossy(&joined(self.stderr.take())).into_owned();
                    panic!("never saw {needle:?} on stderr:\n{err}");
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.child.id());
    }

    /// Waits for the process to exit (killing it after `limit`).
    fn wait(mut self, limit: Duration) -> Done {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait");
                let err = String::from_utf8_lossy(&joined(self.stderr.take())).into_owned();
                panic!("process did not exit within {limit:?} ({status}); stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Done {
            status,
            stdout: joined(self.stdout.take()),
            stderr: String::from_utf8_lossy(&joined(self.stderr.take())).into_owned(),
        }
    }

    /// SIGKILL, then what it printed.
    fn kill(mut self) -> Done {
        let _ = self.child.kill();
        self.wait(LIMIT)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ftvm status addr`.
fn status_of(addr: &str) -> String {
    let o = Command::new(FTVM)
        .args(["status", addr])
        .output()
        .expect("ftvm status");
    assert!(
        o.status.success(),
        "ftvm status {addr}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn status_field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .to_string()
}

/// Polls `ftvm status` on `control` until `pred` holds.
fn wait_status(control: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = status_of(control);
        if pred(&text) {
            return text;
        }
        assert!(start.elapsed() < LIMIT, "never {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that `text` is exactly ticks 1..=n, in order, then `done`: no line missing, none
/// twice, none from another execution.
fn assert_complete_count(text: &str, n: u64) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len() as u64,
        n + 1,
        "expected {n} ticks and done:\n{text}"
    );
    for (i, line) in lines[..n as usize].iter().enumerate() {
        assert!(
            line.starts_with(&format!("tick {} sum=", i + 1)),
            "line {} is {line:?}:\n{text}",
            i + 1
        );
    }
    assert!(lines[n as usize].starts_with("done sum="), "{text}");
}

/// The number after `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// A standby listening on `addr` with its control socket on `control`.
fn standby(addr: &str, control: &str, extra: &[&str], watch: &[&'static str]) -> Proc {
    let mut args = vec!["standby", "--listen", addr, "--control", control];
    args.extend_from_slice(extra);
    spawn(&args, watch)
}

/// A primary of `workload=counter ticks=N` protected by the standby on `addr`.
fn primary(addr: &str, ticks: u64, extra: &[&str], watch: &[&'static str]) -> Proc {
    let cmdline = format!("workload=counter ticks={ticks}");
    let mut args = vec!["run", "--peer", addr, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    spawn(&args, watch)
}

/// The case the issue was filed for: freeze the primary past the heartbeat timeout, then let
/// it run again. Without an arbiter the standby only waits; the primary continues; exactly
/// one side runs the guest to its end and the output has no line from a second execution.
#[test]
fn stop_and_continue_without_an_arbiter_leaves_one_live_side() {
    let _one = serial();
    let (addr, sc) = (free_addr(), free_addr());
    let s = standby(&addr, &sc, &[], &[]);
    let mut p = primary(&addr, 300, &[], &["standby ready"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    p.signal(libc::SIGSTOP);
    let waiting = wait_status(&sc, "waiting", |t| {
        status_field(t, "state").starts_with("waiting:")
    });
    assert!(
        status_field(&waiting, "state").contains("not going live without an arbiter"),
        "{waiting}"
    );
    assert_eq!(status_field(&waiting, "role"), "standby", "{waiting}");
    p.signal(libc::SIGCONT);
    let p = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", p.stderr);
    assert_complete_count(&p.out(), 300);
    assert!(
        s.stdout.is_empty(),
        "the standby ran the guest too: {:?}",
        s.out()
    );
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
    assert!(
        s.stderr
            .contains("not going live without an arbiter: waiting (ftvm promote"),
        "{}",
        s.stderr
    );
    // The standby followed the primary again to the end, or (if the primary's own failure
    // detector fired first when it woke) was told it is abandoned.
    match s.status.code() {
        Some(0) => assert!(s.stderr.contains("following it again"), "{}", s.stderr),
        Some(STATUS_ABANDONED) => assert!(
            s.stderr
                .contains("ftvm: the primary abandoned this standby: "),
            "{}",
            s.stderr
        ),
        other => panic!("standby exited with {other:?}:\n{}", s.stderr),
    }
}

/// A primary that drops its standby says so first; the standby, frozen while that happened,
/// reads it when it runs again and stops, even though the primary is dead by then (its
/// connection closed: what would otherwise make the standby go live).
#[test]
fn a_standby_told_abandon_never_goes_live_even_when_the_primary_dies_next() {
    let _one = serial();
    let (addr, sc) = (free_addr(), free_addr());
    let s = standby(&addr, &sc, &[], &[]);
    let mut p = primary(&addr, 300, &[], &["standby ready", "running unprotected"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGSTOP);
    p.expect("running unprotected");
    let p = p.kill();
    s.signal(libc::SIGCONT);
    let s = s.wait(LIMIT);
    assert!(p.stderr.contains("silent for"), "{}", p.stderr);
    assert_eq!(
        s.status.code(),
        Some(STATUS_ABANDONED),
        "standby: {}",
        s.stderr
    );
    assert!(
        s.stderr
            .contains("ftvm: the primary abandoned this standby: standby lost: "),
        "{}",
        s.stderr
    );
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
}

/// `ftvm promote`: the operator decides that the silent primary is gone. The standby goes
/// live from its last consistent point and finishes the guest; together with what the
/// primary printed, the output is the workload's, each line once (a line the primary
/// released after the standby last heard of it may appear twice, never a different one).
#[test]
fn promote_makes_a_waiting_standby_live() {
    let _one = serial();
    let (addr, sc) = (free_addr(), free_addr());
    let s = standby(&addr, &sc, &[], &[]);
    let mut p = primary(&addr, 300, &[], &["standby ready"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    // Refused while the standby follows a live primary.
    let o = Command::new(FTVM)
        .args(["promote", &sc])
        .output()
        .expect("ftvm promote");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("follows a live primary"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    p.signal(libc::SIGSTOP);
    wait_status(&sc, "waiting", |t| {
        status_field(t, "state").starts_with("waiting:")
    });
    let o = Command::new(FTVM)
        .args(["promote", &sc])
        .output()
        .expect("ftvm promote");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("promoted"));
    let s = s.wait(LIMIT);
    // The operator's job: the old primary must not run on (here it never wakes).
    let p = p.kill();
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert!(
        s.stderr.contains("promoted by the operator"),
        "{}",
        s.stderr
    );
    let from = number_after(&s.stderr, "re-emitting output from sequence ")
        .unwrap_or_else(|| panic!("no go-live line:\n{}", s.stderr)) as usize;
    assert!(from <= p.stdout.len(), "{}", s.stderr);
    let overlap = &p.stdout[from..];
    assert!(s.stdout.starts_with(overlap), "{}", s.stderr);
    let mut merged = p.stdout[..from].to_vec();
    merged.extend_from_slice(&s.stdout);
    assert_complete_count(&String::from_utf8_lossy(&merged), 300);
}

/// Heartbeat settings are agreed in the handshake: a primary that beats every 200 ms next to
/// a standby left at the defaults (50 ms, lost after 150 ms) must not look silent to it while
/// the guest is idle (`workload=echo` halts with no timer until a line comes). Both report
/// the agreed values: the larger interval and the larger timeout.
#[test]
fn heartbeat_settings_are_agreed_in_the_handshake() {
    use std::io::Write;
    let _one = serial();
    let (addr, sc, pc) = (free_addr(), free_addr(), free_addr());
    let s = standby(&addr, &sc, &[], &[]);
    let mut p = spawn_with(
        &[
            "run",
            "--peer",
            &addr,
            "--control",
            &pc,
            "--heartbeat-ms",
            "200",
            "--cmdline",
            "workload=echo",
        ],
        &[],
        Stdio::piped(),
    );
    let mut stdin = p.child.stdin.take().expect("stdin");
    let agreed = |t: &str| {
        status_field(t, "heartbeat_ms") == "200" && status_field(t, "heartbeat_timeout_ms") == "600"
    };
    let ss = wait_status(&sc, "protecting", |t| {
        status_field(t, "state") == "lockstep"
    });
    assert!(agreed(&ss), "{ss}");
    let ps = status_of(&pc);
    assert!(agreed(&ps), "{ps}");
    // Idle: the guest waits for a line; only heartbeats flow, one every 200 ms.
    std::thread::sleep(Duration::from_millis(1500));
    stdin.write_all(b"hello\n").expect("write a line");
    std::thread::sleep(Duration::from_millis(1500));
    stdin.write_all(b"quit\n").expect("write quit");
    drop(stdin);
    let done = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(done.status.code(), Some(0), "primary: {}", done.stderr);
    assert_eq!(done.out(), "echo olleh\n");
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    for text in [&done.stderr, &s.stderr] {
        assert!(!text.contains("silent for"), "{text}");
        assert!(text.contains("heartbeat agreed"), "{text}");
    }
    assert!(
        !s.stderr.contains("not going live without an arbiter"),
        "{}",
        s.stderr
    );
}
