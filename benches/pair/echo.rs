//! Figure 5: the echo round trip a client sees, protected next to unprotected. The guest runs
//! `workload=echo` (a line in on COM1, its reversal out, then it halts waiting for the next
//! line); the benchmark writes one line to the VMM's stdin and times until the answer's line
//! comes back on its stdout, [`LINES`] times. Unprotected: `ftvm run`. Protected: `ftvm run
//! --peer` with an `ftvm standby` on loopback, where each answer leaves only once the standby
//! verified the epoch that closed at the guest's halt (DESIGN.md §3). The protected run's
//! audit trails give the latency breakdown of its answers (`breakdown.rs`).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::breakdown::Breakdown;
use super::common::{try_free_addr, Failure, FTVM};

/// Lines sent (and answers timed) per configuration.
pub const LINES: usize = 200;
/// Lines sent before timing (boot, first exits).
const WARMUP: usize = 10;
/// Longest wait for one answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(20);

/// Kills the child when dropped (a failed measurement leaves no process behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ftvm(args: &[&str]) -> Command {
    let mut cmd = Command::new(FTVM);
    cmd.args(args)
        .env_remove("FTVM_AUDIT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Round trips of `workload=echo` run by `ftvm` with `args` (after which the guest's
/// command line is given), its audit trail written to `audit` where given.
fn round_trips(
    args: &[&str],
    stderr: &Path,
    audit: Option<&Path>,
) -> Result<Vec<Duration>, Failure> {
    let mut cmd = ftvm(args);
    if let Some(audit) = audit {
        cmd.env("FTVM_AUDIT", audit);
    }
    super::pin(&mut cmd, 0);
    let log = File::create(stderr).map_err(|e| format!("create {}: {e}", stderr.display()))?;
    cmd.args(["--cmdline", "workload=echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut child = Killed(
        cmd.spawn()
            .map_err(|e| format!("spawn {FTVM} {args:?}: {e}"))?,
    );
    let mut stdin = child.0.stdin.take().ok_or("no stdin")?;
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send((line, Instant::now())).is_err() {
                return;
            }
        }
    });
    let mut samples = Vec::with_capacity(LINES);
    for i in 0..WARMUP + LINES {
        let said = format!("line{i}");
        let expected = format!("echo {}", said.chars().rev().collect::<String>());
        let sent = Instant::now();
        writeln!(stdin, "{said}").map_err(|e| format!("write to the guest: {e}"))?;
        let (got, at) = rx
            .recv_timeout(ANSWER_LIMIT)
            .map_err(|_| format!("{args:?}: no answer to {said:?}"))?;
        if got != expected {
            return Err(format!("{args:?}: answered {got:?} to {said:?}"));
        }
        if i >= WARMUP {
            samples.push(at.saturating_duration_since(sent));
        }
    }
    writeln!(stdin, "quit").map_err(|e| format!("write to the guest: {e}"))?;
    drop(stdin);
    let status = child
        .0
        .wait()
        .map_err(|e| format!("wait for {args:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{args:?} exited with {status}"));
    }
    Ok(samples)
}

/// What figure 5 measured.
pub struct Echo {
    /// Round trips of the unprotected run (the baseline).
    pub unprotected: Vec<Duration>,
    /// Round trips of the protected run.
    pub protected: Vec<Duration>,
    /// Where the protected answers' output delay went.
    pub stages: Breakdown,
}

/// The round trips; the VMMs' stderr and audit trails go to files in `dir`.
pub fn measure(dir: &Path) -> Result<Echo, Failure> {
    let unprotected = round_trips(&["run"], &dir.join("echo-unprotected.stderr"), None)?;
    let addr = try_free_addr()?;
    let mut cmd = ftvm(&[
        "standby",
        "--listen",
        &addr,
        "--key",
        super::common::pair_key(),
    ]);
    let standby_audit = dir.join("echo-standby.audit");
    cmd.env("FTVM_AUDIT", &standby_audit);
    super::pin(&mut cmd, 1);
    let standby = Killed(
        cmd.spawn()
            .map_err(|e| format!("spawn ftvm standby: {e}"))?,
    );
    let primary_log = dir.join("echo-primary.stderr");
    let key = super::common::pair_key();
    let primary_audit = dir.join("echo-primary.audit");
    let protected = round_trips(
        &["run", "--peer", &addr, "--key", key],
        &primary_log,
        Some(&primary_audit),
    );
    let mut standby = standby;
    let status = standby.0.wait();
    let protected = protected?;
    let log = std::fs::read_to_string(&primary_log)
        .map_err(|e| format!("read {}: {e}", primary_log.display()))?;
    if log.contains("unprotected") {
        return Err(format!(
            "the protected echo lost its standby (see {})",
            primary_log.display()
        ));
    }
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(format!("the standby exited with {s}")),
        Err(e) => return Err(format!("wait for the standby: {e}")),
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()));
    let mut stages = Breakdown::default();
    stages
        .add_run(&read(&primary_audit)?, &read(&standby_audit)?)
        .map_err(|e| format!("the protected echo's latency breakdown: {e}"))?;
    Ok(Echo {
        unprotected,
        protected,
        stages,
    })
}
