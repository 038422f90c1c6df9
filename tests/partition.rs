//! Partition drills (DESIGN.md §5): the primary, the standby and the arbiter (an `ftvm
//! witness` or a one-member etcd) on three "hosts", network namespaces joined by veth pairs
//! (`split_brain/netns.rs`; needs root, as CI runs). A partition cuts the pair's link and
//! one side's link to the arbiter, so the arbiter is reachable from one side only:
//!
//! - the primary cut off: the standby wins the term and goes live; the primary holds its
//!   output (it cannot reach the arbiter: `ftvm status` says so) and, once the links heal,
//!   hears that it lost and fences itself; a new standby on its host then re-protects the
//!   guest with `--join` (the old standby, live, was started with `--accept-standby`);
//! - the standby cut off: the primary wins the term and runs on unprotected; the standby
//!   waits (it cannot reach the arbiter) and, once the links heal, stops without going
//!   live; a new standby then re-protects the guest with `--join` and the pair runs on.
//!
//! Each drill must end with exactly one live side and a client-visible output that is one
//! execution's. `FTVM_PARTITION_DRILLS=N` drills per arbiter (default 2: one of each);
//! scripts/split-brain-drill.sh runs many. Nothing asserts a timing.

mod common;
#[path = "split_brain/drills.rs"]
mod drills;
#[path = "split_brain/etcd.rs"]
mod etcd_cluster;
#[path = "split_brain/netns.rs"]
mod netns;
#[path = "split_brain/procs.rs"]
mod procs;

use std::io::Write;
use std::process::Stdio;
use std::time::Instant;

use common::Scratch;
use drills::{Arbiter, Kind, Survivor, NS_ARBITER_PORT};
use netns::{Host, Net, Wire};
use procs::*;

/// Both sides' heartbeat timeout: a partition is detected after it; a machine whose two
/// cores are busy with other work may delay a process by more than the default 150 ms,
/// which would lose the standby before the drill's own partition.
const HEARTBEAT_TIMEOUT_MS: &str = "1000";

/// The addresses the sides use in drill `i` (fresh ports each drill).
struct Ports {
    pair: String,
    accept: String,
    pc: String,
    sc: String,
    joined_sc: String,
    standby_accept: String,
}

fn ports(i: u64) -> Ports {
    let base = 7000 + (i % 100) * 10;
    Ports {
        pair: format!("{}:{base}", netns::STANDBY_PAIR),
        accept: format!("{}:{}", netns::PRIMARY_PAIR, base + 1),
        pc: format!("127.0.0.1:{}", base + 2),
        sc: format!("127.0.0.1:{}", base + 3),
        joined_sc: format!("127.0.0.1:{}", base + 4),
        standby_accept: format!("{}:{}", netns::STANDBY_PAIR, base + 5),
    }
}

/// The arbiter's address as `host` reaches it.
fn arbiter_for(host: Host) -> String {
    let ip = match host {
        Host::Standby => netns::ARBITER_FOR_STANDBY,
        _ => netns::ARBITER_FOR_PRIMARY,
    };
    format!("{ip}:{NS_ARBITER_PORT}")
}

/// The primary cut off from the standby and the arbiter; healed, the old primary fences
/// itself, and a new standby on its host re-protects the guest, now run by the old standby
/// (`--accept-standby`).
fn primary_cut_off(net: &Net, kind: Kind, i: u64) -> Survivor {
    let (pns, sns) = (net.ns(Host::Primary), net.ns(Host::Standby));
    let ports = ports(i);
    let (ap, as_) = (arbiter_for(Host::Primary), arbiter_for(Host::Standby));
    // The echo guest waits for lines: the drill, not a clock, decides when it ends.
    let mut s = spawn_cmd_in(
        &sns,
        &[
            "standby",
            "--listen",
            &ports.pair,
            "--accept-standby",
            &ports.standby_accept,
            "--control",
            &ports.sc,
            kind.flag(),
            &as_,
            "--heartbeat-timeout-ms",
            HEARTBEAT_TIMEOUT_MS,
        ],
        &[],
        Stdio::piped(),
    );
    let mut s_in = s.child.stdin.take().expect("stdin");
    let mut p = spawn_cmd_in(
        &pns,
        &[
            "run",
            "--peer",
            &ports.pair,
            "--control",
            &ports.pc,
            kind.flag(),
            &ap,
            "--heartbeat-timeout-ms",
            HEARTBEAT_TIMEOUT_MS,
            "--cmdline",
            "workload=echo",
        ],
        &["standby ready"],
        Stdio::piped(),
    );
    let mut p_in = p.child.stdin.take().expect("stdin");
    p.expect("standby ready");
    p_in.write_all(b"one\n").expect("write");
    // "echo eno\n" verified and released by the primary.
    wait_status_while(
        &mut [&mut p, &mut s],
        Some(&pns),
        &ports.pc,
        "released",
        |t| status_field(t, "released_output_seq") == "9",
    );
    net.cut(Wire::Pair);
    net.cut(Wire::PrimaryArbiter);
    let live = wait_status_while(&mut [&mut p, &mut s], Some(&sns), &ports.sc, "live", |t| {
        status_field(t, "role").starts_with("primary")
    });
    assert!(
        status_field(&live, "state").contains(&format!("won term 1 at {}", kind.name())),
        "{live}"
    );
    s_in.write_all(b"two\n").expect("write");
    let held = wait_status_while(
        &mut [&mut p, &mut s],
        Some(&pns),
        &ports.pc,
        "arbitrating",
        |t| status_field(t, "state").contains("which cannot be reached"),
    );
    assert!(
        status_field(&held, "state").starts_with("arbitrating: "),
        "{held}"
    );
    // Written to the old primary while it cannot reach the arbiter: its answer never leaves.
    p_in.write_all(b"lost\n").expect("write");
    net.heal(Wire::Pair);
    net.heal(Wire::PrimaryArbiter);
    let p = p.wait(LIMIT);
    assert_eq!(
        p.status.code(),
        Some(drills::STATUS_FENCED),
        "primary: {}",
        p.stderr
    );
    let fenced = format!("ftvm: fenced: {} gave term 1 to ", kind.name());
    assert!(p.stderr.contains(&fenced), "{}", p.stderr);
    assert_eq!(p.out(), "echo eno\n", "{}", p.stderr);
    // Re-protection: a new standby on the old primary's host joins the live side.
    let mut joined = spawn_in(
        &pns,
        &[
            "standby",
            "--join",
            &ports.standby_accept,
            "--control",
            &ports.joined_sc,
            kind.flag(),
            &ap,
            "--heartbeat-timeout-ms",
            HEARTBEAT_TIMEOUT_MS,
        ],
        &[],
    );
    let protected = wait_status_while(
        &mut [&mut s, &mut joined],
        Some(&sns),
        &ports.sc,
        "protected again",
        |t| status_field(t, "state") == "lockstep",
    );
    assert_eq!(status_field(&protected, "term"), "1", "{protected}");
    s_in.write_all(b"three\nquit\n").expect("write");
    drop(s_in);
    let s = s.wait(LIMIT);
    let joined = joined.wait(LIMIT);
    assert_eq!(s.status.code(), Some(0), "live side: {}", s.stderr);
    assert_eq!(joined.status.code(), Some(0), "joined: {}", joined.stderr);
    assert!(joined.stdout.is_empty(), "{:?}", joined.out());
    // What a client saw: the old primary's output up to where the live side re-emits from,
    // then the live side's: one execution, each line once.
    let from = number_after(&s.stderr, "re-emitting output from sequence ")
        .unwrap_or_else(|| panic!("no go-live line:\n{}", s.stderr)) as usize;
    let mut seen = p.stdout[..from.min(p.stdout.len())].to_vec();
    seen.extend_from_slice(&s.stdout);
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "echo eno\necho owt\necho eerht\n",
        "{}",
        s.stderr
    );
    Survivor::Standby
}

/// The standby cut off from the primary and the arbiter; healed, a new standby joins.
fn standby_cut_off(net: &Net, kind: Kind, i: u64) -> Survivor {
    let (pns, sns) = (net.ns(Host::Primary), net.ns(Host::Standby));
    let ports = ports(i);
    let (ap, as_) = (arbiter_for(Host::Primary), arbiter_for(Host::Standby));
    let mut s = spawn_in(
        &sns,
        &[
            "standby",
            "--listen",
            &ports.pair,
            "--control",
            &ports.sc,
            kind.flag(),
            &as_,
            "--heartbeat-timeout-ms",
            HEARTBEAT_TIMEOUT_MS,
        ],
        &[],
    );
    // The echo guest waits for lines: the drill, not a clock, decides when it ends.
    let mut p = spawn_cmd_in(
        &pns,
        &[
            "run",
            "--peer",
            &ports.pair,
            "--accept-standby",
            &ports.accept,
            "--control",
            &ports.pc,
            kind.flag(),
            &ap,
            "--heartbeat-timeout-ms",
            HEARTBEAT_TIMEOUT_MS,
            "--cmdline",
            "workload=echo",
        ],
        &["standby ready", "won term 1"],
        Stdio::piped(),
    );
    let mut stdin = p.child.stdin.take().expect("stdin");
    p.expect("standby ready");
    wait_status_while(
        &mut [&mut p, &mut s],
        Some(&sns),
        &ports.sc,
        "lockstep",
        |t| status_field(t, "state") == "lockstep",
    );
    stdin.write_all(b"one\n").expect("write");
    net.cut(Wire::Pair);
    net.cut(Wire::StandbyArbiter);
    p.expect("won term 1");
    stdin.write_all(b"two\n").expect("write");
    let waiting = wait_status_while(
        &mut [&mut p, &mut s],
        Some(&sns),
        &ports.sc,
        "waiting",
        |t| status_field(t, "state").contains("which cannot be reached"),
    );
    assert_eq!(status_field(&waiting, "role"), "standby", "{waiting}");
    net.heal(Wire::Pair);
    net.heal(Wire::StandbyArbiter);
    let s = s.wait(LIMIT);
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
    assert!(
        matches!(
            s.status.code(),
            Some(STATUS_ABANDONED | drills::STATUS_FENCED)
        ),
        "standby: {:?} {}",
        s.status,
        s.stderr
    );
    // Re-protection: a new standby joins the primary, which holds term 1.
    let mut joined = spawn_in(
        &sns,
        &[
            "standby",
            "--join",
            &ports.accept,
            "--control",
            &ports.joined_sc,
            kind.flag(),
            &as_,
            "--heartbeat-timeout-ms",
            HEARTBEAT_TIMEOUT_MS,
        ],
        &[],
    );
    // The primary says when the sync is over (a joining standby's own status shows no
    // sync before its first pages arrive).
    let protected = wait_status_while(
        &mut [&mut p, &mut joined],
        Some(&pns),
        &ports.pc,
        "protected again",
        |t| status_field(t, "state") == "lockstep",
    );
    assert_eq!(status_field(&protected, "term"), "1", "{protected}");
    let follows = status_of_in(&sns, &ports.joined_sc);
    assert_eq!(status_field(&follows, "term"), "1", "{follows}");
    stdin.write_all(b"three\n").expect("write");
    stdin.write_all(b"quit\n").expect("write");
    drop(stdin);
    let p = p.wait(LIMIT);
    let joined = joined.wait(LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", p.stderr);
    assert_eq!(p.out(), "echo eno\necho owt\necho eerht\n");
    assert_eq!(joined.status.code(), Some(0), "joined: {}", joined.stderr);
    assert!(joined.stdout.is_empty(), "{:?}", joined.out());
    Survivor::Primary
}

fn partition_drills(kind: Kind) {
    let _one = serial();
    let dir = Scratch::new(&format!("partition-{kind:?}"));
    let net = Net::new(match kind {
        Kind::Witness => "pw",
        Kind::Etcd => "pe",
    });
    let _arbiter = Arbiter::in_netns(
        kind,
        &dir.path_str(""),
        &net.ns(Host::Arbiter),
        &[netns::ARBITER_FOR_PRIMARY, netns::ARBITER_FOR_STANDBY],
    );
    let n = drills::count("FTVM_PARTITION_DRILLS", 2);
    eprintln!("partition drills with {kind:?}: {n}");
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let (what, survivor) = if i % 2 == 0 {
            ("primary cut off", primary_cut_off(&net, kind, i))
        } else {
            (
                "standby cut off, then re-protected",
                standby_cut_off(&net, kind, i),
            )
        };
        eprintln!(
            "drill {}/{n} ({kind:?}): {what}: {survivor:?} live, one execution's output ({:.1} s)",
            i + 1,
            t.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "partition drills with {kind:?}: {n} passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn partition_drills_with_the_witness() {
    partition_drills(Kind::Witness);
}

#[test]
fn partition_drills_with_etcd() {
    partition_drills(Kind::Etcd);
}
