//! The embedded witness (DESIGN.md §5) end to end: `ftvm witness` as a real process with its
//! state file, and protected pairs that consult it (`--witness`), frozen with SIGSTOP.
//! Whoever wins the term runs on; the loser stops with its fencing message and exits
//! non-zero; a client sees one execution's output. The tests assert no timings.

mod common;
#[path = "split_brain/procs.rs"]
mod procs;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{free_addr, Scratch};
use ftvm_replication::witness::{self, Verdict};
use procs::*;

/// `ftvm witness` on `addr` with its state in `state`, once it answers.
fn start_witness(addr: &str, state: &str) -> Proc {
    let w = spawn(&["witness", "--listen", addr, "--state", state], &[]);
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < LIMIT, "the witness never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    w
}

const T: Duration = witness::REQUEST_TIMEOUT;

#[test]
fn a_restarted_witness_never_grants_a_term_twice() {
    let dir = Scratch::new("witness-restart");
    let (addr, state) = (free_addr(), dir.path_str("state"));
    let w = start_witness(&addr, &state);
    assert_eq!(
        witness::claim(&addr, "vm", 0, "standby", T).expect("claim"),
        Verdict::Granted { term: 1 }
    );
    // SIGKILL: no shutdown path; what was granted must already be on disk.
    let _ = w.kill();
    let w = start_witness(&addr, &state);
    assert_eq!(
        witness::claim(&addr, "vm", 0, "primary", T).expect("claim"),
        Verdict::Refused {
            term: 1,
            holder: "standby".into()
        },
        "term 1 was granted before the restart"
    );
    assert_eq!(
        witness::claim(&addr, "vm", 1, "primary", T).expect("claim"),
        Verdict::Granted { term: 2 }
    );
    let _ = w.kill();
    let w = start_witness(&addr, &state);
    assert_eq!(
        witness::query(&addr, "vm", T).expect("query"),
        (2, "primary".to_string())
    );
    assert_eq!(
        witness::claim(&addr, "vm", 1, "standby", T).expect("claim"),
        Verdict::Refused {
            term: 2,
            holder: "primary".into()
        }
    );
    drop(w);
}

/// The primary freezes; the standby wins the term and goes live; the primary, let run
/// again, loses the term and fences itself. The output a client saw is one execution's.
#[test]
fn stop_and_continue_with_a_witness_the_standby_wins_and_the_primary_fences_itself() {
    let _one = serial();
    let dir = Scratch::new("witness-stop-primary");
    let wa = free_addr();
    let _w = start_witness(&wa, &dir.path_str("state"));
    let args = ["--witness", wa.as_str()];
    stopped_primary_is_fenced(Arbiter {
        args: &args,
        name: "the witness",
    });
}

/// The standby freezes; the primary wins the term and runs on unprotected; the standby,
/// let run again, learns it lost (it was abandoned, or its own claim is refused) and never
/// goes live.
#[test]
fn stop_and_continue_with_a_witness_the_primary_wins_and_the_standby_stops() {
    let _one = serial();
    let dir = Scratch::new("witness-stop-standby");
    let (wa, addr, sc) = (free_addr(), free_addr(), free_addr());
    let _w = start_witness(&wa, &dir.path_str("state"));
    let s = standby(&addr, &sc, &["--witness", &wa], &[]);
    let mut p = primary(
        &addr,
        300,
        &["--witness", &wa],
        &["standby ready", "won term 1"],
    );
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGSTOP);
    p.expect("won term 1");
    s.signal(libc::SIGCONT);
    let p = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", p.stderr);
    assert_complete_count(&p.out(), 300);
    assert!(
        p.stderr
            .contains("holding all output until this primary wins term 1"),
        "{}",
        p.stderr
    );
    assert!(
        s.stdout.is_empty(),
        "the standby ran the guest too: {:?}",
        s.out()
    );
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
    match s.status.code() {
        Some(STATUS_ABANDONED) => assert!(
            s.stderr
                .contains("ftvm: the primary abandoned this standby: "),
            "{}",
            s.stderr
        ),
        Some(STATUS_FENCED) => assert!(
            s.stderr
                .contains("ftvm: fenced: the witness gave term 1 to "),
            "{}",
            s.stderr
        ),
        other => panic!("standby exited with {other:?}:\n{}", s.stderr),
    }
}

/// A witness that cannot be reached means waiting, never guessing: the standby of a frozen
/// primary stays a standby and says so.
#[test]
fn an_unreachable_witness_means_waiting() {
    let _one = serial();
    let (wa, addr, sc) = (free_addr(), free_addr(), free_addr());
    // Nothing listens on `wa`.
    let s = standby(&addr, &sc, &["--witness", &wa], &[]);
    let mut p = primary(&addr, 300, &["--witness", &wa], &["standby ready"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    p.signal(libc::SIGSTOP);
    let waiting = wait_status(&sc, "waiting for the witness", |t| {
        status_field(t, "state").contains("which cannot be reached")
    });
    assert_eq!(status_field(&waiting, "role"), "standby", "{waiting}");
    // The standby goes on waiting while the witness is away; kill both.
    let s = s.kill();
    let p = p.kill();
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
    drop(p);
}

/// A killed primary (its connection closes) still fails over with a witness: the standby
/// wins the term and goes live; a client sees one execution's output.
#[test]
fn a_killed_primary_fails_over_through_the_witness() {
    let _one = serial();
    let dir = Scratch::new("witness-kill-primary");
    let wa = free_addr();
    let _w = start_witness(&wa, &dir.path_str("state"));
    let args = ["--witness", wa.as_str()];
    killed_primary_fails_over(Arbiter {
        args: &args,
        name: "the witness",
    });
}

/// A healthy pair with a witness runs to the end without asking it anything.
#[test]
fn a_pair_with_a_witness_runs_to_completion_without_a_claim() {
    let _one = serial();
    let dir = Scratch::new("witness-healthy");
    let (wa, addr, sc) = (free_addr(), free_addr(), free_addr());
    let _w = start_witness(&wa, &dir.path_str("state"));
    let s = standby(&addr, &sc, &["--witness", &wa], &[]);
    let p = primary(&addr, 40, &["--witness", &wa], &[]);
    let p = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", p.stderr);
    assert_complete_count(&p.out(), 40);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    for text in [&p.stderr, &s.stderr] {
        assert!(!text.contains("claiming term"), "{text}");
        assert!(!text.contains("wins term"), "{text}");
    }
}
