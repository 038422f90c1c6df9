//! etcd as the arbiter (DESIGN.md §5) end to end: a real etcd cluster (Debian's
//! `etcd-server`, started by the tests; missing, the tests fail) and protected pairs that
//! consult it (`--etcd`). The term of each protected VM is one transaction; whoever wins it
//! runs on, the loser fences itself; an etcd that cannot be reached means waiting. The
//! tests assert no timings.

mod common;
#[path = "split_brain/etcd.rs"]
mod etcd_cluster;
#[path = "split_brain/netns.rs"]
mod netns;
#[path = "split_brain/procs.rs"]
mod procs;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{free_addr, Scratch};
use etcd_cluster::Cluster;
use ftvm_replication::etcd::{self, EtcdConfig};
use ftvm_replication::witness::{Verdict, WitnessError};
use procs::*;

const T: Duration = Duration::from_secs(2);

/// The compare-and-swap itself: two clients, each through another member of a three-member
/// cluster, claim the same term of the same VM at the same moment, many times: exactly one
/// wins each time, the other hears who. A winner whose answer was lost hears again that it
/// won; a cluster that lost one member still decides; a stale claim is refused.
#[test]
fn two_contending_clients_one_wins() {
    let dir = Scratch::new("etcd-cas");
    let mut cluster = Cluster::local(&dir.path_str(""), 3);
    let a = EtcdConfig::parse(&cluster.members[0].client).expect("a");
    let b = EtcdConfig::parse(&cluster.members[1].client).expect("b");
    for round in 0..20u64 {
        let vm = format!("vm-{round}");
        let barrier = Arc::new(Barrier::new(2));
        let contend = |config: EtcdConfig, who: &'static str| {
            let (vm, barrier) = (vm.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (who, etcd::claim(&config, &vm, 0, who, T).expect("claim"))
            })
        };
        let one = contend(a.clone(), "standby");
        let two = contend(b.clone(), "primary");
        let results = [one.join().expect("a"), two.join().expect("b")];
        let winners: Vec<&str> = results
            .iter()
            .filter(|(_, v)| *v == Verdict::Granted { term: 1 })
            .map(|(who, _)| *who)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let winner = winners[0];
        for (who, v) in &results {
            if *who != winner {
                assert_eq!(
                    *v,
                    Verdict::Refused {
                        term: 1,
                        holder: winner.into()
                    },
                    "round {round}"
                );
            }
        }
        assert_eq!(
            etcd::query(&a, &vm, T).expect("query"),
            (1, winner.to_string())
        );
        // The winner asking again (its answer lost) hears it won.
        assert_eq!(
            etcd::claim(&b, &vm, 0, winner, T).expect("claim"),
            Verdict::Granted { term: 1 }
        );
    }
    // One member gone: the other two are a quorum, and a client that lists the dead member
    // first goes on to the next.
    cluster.kill(0);
    let rest = EtcdConfig::parse(&cluster.endpoints()).expect("all");
    assert_eq!(
        etcd::claim(&rest, "vm-0", 1, "primary", T).expect("claim"),
        Verdict::Granted { term: 2 }
    );
    assert_eq!(
        etcd::claim(&rest, "vm-0", 1, "standby", T).expect("claim"),
        Verdict::Refused {
            term: 2,
            holder: "primary".into()
        }
    );
    // No member left that answers: unreachable, never a verdict.
    cluster.kill(1);
    cluster.kill(2);
    match etcd::claim(&rest, "vm-0", 2, "standby", T) {
        Err(WitnessError::Unreachable { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A killed primary (its connection closes) fails over through etcd: the standby wins
/// term 1 and goes live; a client sees one execution's output.
#[test]
fn a_killed_primary_fails_over_through_etcd() {
    let _one = serial();
    let dir = Scratch::new("etcd-kill-primary");
    let cluster = Cluster::local(&dir.path_str(""), 1);
    let e = cluster.endpoints();
    let args = ["--etcd", e.as_str()];
    killed_primary_fails_over(Arbiter {
        args: &args,
        name: "etcd",
    });
}

/// The primary freezes (silence, not death): the standby wins the term in etcd and goes
/// live; the primary, let run again, loses the term and fences itself.
#[test]
fn stop_and_continue_with_etcd_the_standby_wins_and_the_primary_fences_itself() {
    let _one = serial();
    let dir = Scratch::new("etcd-stop-primary");
    let cluster = Cluster::local(&dir.path_str(""), 1);
    let e = cluster.endpoints();
    let args = ["--etcd", e.as_str()];
    stopped_primary_is_fenced(Arbiter {
        args: &args,
        name: "etcd",
    });
}

/// etcd that cannot be reached means waiting, on both sides: the standby of a frozen
/// primary stays a standby, and a primary whose standby froze holds its output, each saying
/// so in `ftvm status`; once etcd answers again the term decides.
#[test]
fn an_unreachable_etcd_means_waiting() {
    let _one = serial();
    let dir = Scratch::new("etcd-unreachable");
    let cluster = Cluster::local(&dir.path_str(""), 1);
    let e = cluster.endpoints();
    let (addr, sc, pc) = (free_addr(), free_addr(), free_addr());
    let s = standby(&addr, &sc, &["--etcd", &e], &[]);
    let mut p = primary(
        &addr,
        300,
        &["--etcd", &e, "--control", &pc],
        &["standby ready", "won term 1"],
    );
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    // etcd frozen: its port takes connections, nothing answers (a stalled or partitioned
    // cluster looks like this).
    cluster.signal(0, libc::SIGSTOP);
    s.signal(libc::SIGSTOP);
    let arbitrating = wait_status(&pc, "arbitrating", |t| {
        status_field(t, "state").contains("which cannot be reached")
    });
    assert!(
        status_field(&arbitrating, "state").starts_with("arbitrating: "),
        "{arbitrating}"
    );
    assert!(
        status_field(&arbitrating, "state").contains("claiming term 1 at etcd"),
        "{arbitrating}"
    );
    assert_eq!(
        status_field(&arbitrating, "protected"),
        "no",
        "{arbitrating}"
    );
    // Held, not released: the primary's output stays where it was while etcd is away.
    let held = wait_status(&pc, "holding output", |t| {
        status_field(t, "held_output_bytes") != "0"
    });
    let released = status_field(&held, "released_output_seq");
    std::thread::sleep(Duration::from_millis(500));
    let later = status_of(&pc);
    assert_eq!(
        status_field(&later, "released_output_seq"),
        released,
        "{later}"
    );
    // The frozen standby, run again while etcd is still away, waits too.
    s.signal(libc::SIGCONT);
    // etcd back: the primary wins (the standby's claim, if any, comes second).
    cluster.signal(0, libc::SIGCONT);
    p.expect("won term 1");
    let p = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", p.stderr);
    assert_complete_count(&p.out(), 300);
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
    assert!(
        matches!(s.status.code(), Some(STATUS_ABANDONED | STATUS_FENCED)),
        "standby: {:?} {}",
        s.status,
        s.stderr
    );
}

/// The standby side of an unreachable etcd: a frozen primary's standby claims, cannot
/// reach etcd, and waits as a standby (`ftvm status` says why); it never goes live.
#[test]
fn a_standby_waits_while_etcd_cannot_be_reached() {
    let _one = serial();
    let dir = Scratch::new("etcd-unreachable-standby");
    let mut cluster = Cluster::local(&dir.path_str(""), 1);
    let e = cluster.endpoints();
    let (addr, sc) = (free_addr(), free_addr());
    let s = standby(&addr, &sc, &["--etcd", &e], &[]);
    let mut p = primary(&addr, 300, &["--etcd", &e], &["standby ready"]);
    p.expect("standby ready");
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill(0);
    p.signal(libc::SIGSTOP);
    let waiting = wait_status(&sc, "waiting for etcd", |t| {
        status_field(t, "state").contains("claiming term 1 at etcd, which cannot be reached")
    });
    assert_eq!(status_field(&waiting, "role"), "standby", "{waiting}");
    assert!(
        status_field(&waiting, "state").starts_with("waiting: "),
        "{waiting}"
    );
    let s = s.kill();
    drop(p.kill());
    assert!(s.stdout.is_empty(), "{:?}", s.out());
    assert!(!s.stderr.contains("going live at exit"), "{}", s.stderr);
}

/// A pair whose sides name different kinds of arbiter is refused before the guest starts:
/// a witness and an etcd cluster would each grant the same term once.
#[test]
fn a_witness_and_etcd_in_one_pair_are_refused() {
    let _one = serial();
    let dir = Scratch::new("etcd-mixed");
    let cluster = Cluster::local(&dir.path_str(""), 1);
    let (addr, sc, wa) = (free_addr(), free_addr(), free_addr());
    let s = standby(&addr, &sc, &["--etcd", &cluster.endpoints()], &[]);
    let p = primary(&addr, 20, &["--witness", &wa], &[]);
    let p = p.wait(LIMIT);
    let s = s.wait(LIMIT);
    assert_eq!(s.status.code(), Some(1), "standby: {}", s.stderr);
    assert!(
        s.stderr.contains(
            "the primary arbitrates role changes with --witness, this standby with --etcd"
        ),
        "{}",
        s.stderr
    );
    assert_eq!(p.status.code(), Some(1), "primary: {}", p.stderr);
    assert!(p.stdout.is_empty(), "{:?}", p.out());
}
