//! What the split-brain suites (tests/split_brain.rs, tests/witness.rs) share: `ftvm`
//! processes with collected output and watched stderr, signals, `ftvm status`, the counter
//! guest's expected output.

// Each suite compiles this file by itself and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::FTVM;

/// What `ftvm standby` exits with when its primary abandoned it (src/main.rs).
pub const STATUS_ABANDONED: i32 = 10;

pub const LIMIT: Duration = Duration::from_secs(60);

pub static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An `ftvm` process whose stdout and stderr are collected; stderr lines containing one of
/// the watched needles are announced on `seen`.
pub struct Proc {
    pub child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    seen: Receiver<&'static str>,
}

pub struct Done {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Done {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

pub fn spawn(args: &[&str], watch: &[&'static str]) -> Proc {
    spawn_with(args, watch, Stdio::null())
}

pub fn spawn_with(args: &[&str], watch: &[&'static str], stdin: Stdio) -> Proc {
    spawn_cmd(ftvm(None), args, watch, stdin)
}

/// `ftvm`, run in the network namespace `ns` if there is one (`ip netns exec NS ftvm`:
/// `ip` execs ftvm, so the child's pid is ftvm's).
pub fn ftvm(ns: Option<&str>) -> Command {
    match ns {
        None => Command::new(FTVM),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, FTVM]);
            c
        }
    }
}

/// [`spawn`] in the network namespace `ns`.
pub fn spawn_in(ns: &str, args: &[&str], watch: &[&'static str]) -> Proc {
    spawn_cmd(ftvm(Some(ns)), args, watch, Stdio::null())
}

/// [`spawn_with`] in the network namespace `ns`.
pub fn spawn_cmd_in(ns: &str, args: &[&str], watch: &[&'static str], stdin: Stdio) -> Proc {
    spawn_cmd(ftvm(Some(ns)), args, watch, stdin)
}

fn spawn_cmd(mut cmd: Command, args: &[&str], watch: &[&'static str], stdin: Stdio) -> Proc {
    let pair_process = matches!(args.first(), Some(&("run" | "standby")));
    let mut child = cmd
        .args(args)
        .args(if pair_process {
            crate::common::key_args(args)
        } else {
            Vec::new()
        })
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

pub fn joined(h: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
}

impl Proc {
    /// Waits until stderr had a line containing `needle` (a watched one).
    pub fn expect(&mut self, needle: &'static str) {
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

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.child.id());
    }

    /// Waits for the process to exit (killing it after `limit`).
    pub fn wait(mut self, limit: Duration) -> Done {
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

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// SIGKILL, then what it printed.
    pub fn kill(mut self) -> Done {
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
pub fn status_of(addr: &str) -> String {
    let o = Command::new(FTVM)
        .args(["status", addr])
        .args(crate::common::key_args(&[]))
        .output()
        .expect("ftvm status");
    assert!(
        o.status.success(),
        "ftvm status {addr}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn status_field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .to_string()
}

/// `ftvm status addr`, or what it said on stderr.
pub fn try_status(addr: &str) -> Result<String, String> {
    try_status_in(None, addr)
}

/// `ftvm status addr` from the network namespace `ns`.
pub fn status_of_in(ns: &str, addr: &str) -> String {
    try_status_in(Some(ns), addr).unwrap_or_else(|e| panic!("ftvm status {addr}: {e}"))
}

/// [`try_status`] from the network namespace `ns`.
pub fn try_status_in(ns: Option<&str>, addr: &str) -> Result<String, String> {
    let o = ftvm(ns)
        .args(["status", addr])
        .args(crate::common::key_args(&[]))
        .output()
        .expect("ftvm status");
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

/// Polls `ftvm status` on `control` (which may not answer yet) until `pred` holds.
pub fn wait_status(control: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_status_in(None, control, what, pred)
}

/// [`wait_status`] from the network namespace `ns`.
pub fn wait_status_in(
    ns: Option<&str>,
    control: &str,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = try_status_in(ns, control).unwrap_or_else(|e| e);
        if text.starts_with("role=") && pred(&text) {
            return text;
        }
        assert!(start.elapsed() < LIMIT, "never {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that `text` is exactly ticks 1..=n, in order, then `done`: no line missing, none
/// twice, none from another execution.
pub fn assert_complete_count(text: &str, n: u64) {
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
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// A standby listening on `addr` with its control socket on `control`.
pub fn standby(addr: &str, control: &str, extra: &[&str], watch: &[&'static str]) -> Proc {
    let mut args = vec!["standby", "--listen", addr, "--control", control];
    args.extend_from_slice(extra);
    spawn(&args, watch)
}

/// A primary of `workload=counter ticks=N` protected by the standby on `addr`.
pub fn primary(addr: &str, ticks: u64, extra: &[&str], watch: &[&'static str]) -> Proc {
    let cmdline = format!("workload=counter ticks={ticks}");
    let mut args = vec!["run", "--peer", addr, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    spawn(&args, watch)
}

/// Checks a failover's output as a client saw it: the old primary's stdout up to the
/// sequence number the new live side re-emits from (its stderr names it), then the new live
/// side's stdout, is ticks 1..=n then `done`; bytes both printed are the same bytes.
pub fn assert_failover_output(old: &[u8], new: &[u8], new_stderr: &str, ticks: u64) {
    let from = number_after(new_stderr, "re-emitting output from sequence ")
        .unwrap_or_else(|| panic!("no go-live line:\n{new_stderr}")) as usize;
    assert!(from <= old.len(), "{new_stderr}");
    let overlap = &old[from..];
    assert!(
        new.starts_with(overlap),
        "the old primary's last bytes {:?} are not what the new live side re-emitted first",
        String::from_utf8_lossy(overlap)
    );
    let mut merged = old[..from].to_vec();
    merged.extend_from_slice(new);
    assert_complete_count(&String::from_utf8_lossy(&merged), ticks);
}

/// [`wait_status_in`] while `procs` run: a process that exits meanwhile ends the wait with
/// a panic that shows what every one of them printed.
pub fn wait_status_while(
    procs: &mut [&mut Proc],
    ns: Option<&str>,
    control: &str,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = try_status_in(ns, control).unwrap_or_else(|e| e);
        if text.starts_with("role=") && pred(&text) {
            return text;
        }
        if procs.iter_mut().any(|p| p.exited()) || start.elapsed() > LIMIT {
            let mut all = String::new();
            for p in procs.iter_mut() {
                let _ = p.child.kill();
                let _ = p.child.wait();
                all.push_str(&String::from_utf8_lossy(&joined(p.stderr.take())));
                all.push_str("\n----\n");
            }
            panic!("never {what}:\n{text}\nprocesses:\n{all}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What ftvm exits with when it lost the term and fenced itself.
pub const STATUS_FENCED: i32 = ftvm_replication::arbiter::STATUS_FENCED as i32;

/// A pair's arbiter as the drills see it: the options that give both sides of a pair that
/// arbiter, and how ftvm's messages name it ("the witness", "etcd").
pub struct Arbiter<'a> {
    pub args: &'a [&'a str],
    pub name: &'a str,
}

/// A killed primary (its connection closes) fails over through `arbiter`: the standby wins
/// term 1 and goes live; a client sees one execution's output.
pub fn killed_primary_fails_over(arbiter: Arbiter<'_>) {
    let (addr, sc) = (crate::common::free_addr(), crate::common::free_addr());
    let s = standby(&addr, &sc, arbiter.args, &[]);
    let mut p = primary(&addr, 300, arbiter.args, &["standby ready"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    let p = p.kill();
    let s = s.wait(LIMIT);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    let won = format!("won term 1 at {} (primary lost: ", arbiter.name);
    assert!(s.stderr.contains(&won), "{}", s.stderr);
    assert_failover_output(&p.stdout, &s.stdout, &s.stderr, 300);
}

/// The primary freezes (SIGSTOP: silence, not death): the standby wins term 1 at `arbiter`
/// and goes live; the primary, let run again, learns it lost the term and fences itself; a
/// client sees one execution's output.
pub fn stopped_primary_is_fenced(arbiter: Arbiter<'_>) {
    let (addr, sc) = (crate::common::free_addr(), crate::common::free_addr());
    let s = standby(&addr, &sc, arbiter.args, &[]);
    let mut p = primary(&addr, 300, arbiter.args, &["standby ready"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    p.signal(libc::SIGSTOP);
    let live = wait_status(&sc, "live", |t| {
        status_field(t, "role").starts_with("primary")
    });
    let won = format!("won term 1 at {}", arbiter.name);
    assert!(status_field(&live, "state").contains(&won), "{live}");
    assert_eq!(status_field(&live, "term"), "1", "{live}");
    p.signal(libc::SIGCONT);
    let p = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(
        p.status.code(),
        Some(STATUS_FENCED),
        "primary: {}",
        p.stderr
    );
    let fenced = format!("ftvm: fenced: {} gave term 1 to ", arbiter.name);
    assert!(p.stderr.contains(&fenced), "{}", p.stderr);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert!(s.stderr.contains(&won), "{}", s.stderr);
    assert_failover_output(&p.stdout, &s.stdout, &s.stderr, 300);
}
