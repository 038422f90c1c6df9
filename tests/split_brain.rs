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

mod common;
#[path = "split_brain/procs.rs"]
mod procs;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_addr, FTVM};
use procs::*;

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
    let mut p = primary(
        &addr,
        300,
        &[],
        &["standby ready", "told the standby it is abandoned"],
    );
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGSTOP);
    // Killed once Abandon is on its way (killed before that, the primary's process is gone
    // without a word: the standby rightly goes live).
    p.expect("told the standby it is abandoned");
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
        .args(common::key_args(&[]))
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
        .args(common::key_args(&[]))
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
    assert_failover_output(&p.stdout, &s.stdout, &s.stderr, 300);
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
