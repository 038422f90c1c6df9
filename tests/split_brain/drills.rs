//! What the split-brain drills (tests/stop_drills.rs, tests/partition.rs,
//! scripts/split-brain-drill.sh) share: the two arbiters started for real (an `ftvm
//! witness`, a one-member etcd), drill counts from the environment, random moments, and the
//! verdict of one drill: exactly one live side, and a client-visible output that is one
//! execution's.

// Each suite compiles this file by itself and uses only part of it.
#![allow(dead_code)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::etcd_cluster::{Cluster, Member};
use crate::procs::*;

/// What ftvm exits with when it lost the term and fenced itself.
pub const STATUS_FENCED: i32 = ftvm_replication::arbiter::STATUS_FENCED as i32;

/// Which arbiter a drill runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Witness,
    Etcd,
}

impl Kind {
    /// The flag both sides get.
    pub fn flag(self) -> &'static str {
        match self {
            Kind::Witness => "--witness",
            Kind::Etcd => "--etcd",
        }
    }

    /// How ftvm's messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Witness => "the witness",
            Kind::Etcd => "etcd",
        }
    }
}

/// A running arbiter; stopped when dropped.
pub struct Arbiter {
    pub kind: Kind,
    witness: Option<Proc>,
    etcd: Option<Cluster>,
}

/// Port of the witness and of etcd's clients inside a namespace.
pub const NS_ARBITER_PORT: u16 = 7200;

impl Arbiter {
    /// An arbiter of `kind` on loopback; returns it and the address to give both sides.
    pub fn local(kind: Kind, dir: &str) -> (Self, String) {
        match kind {
            Kind::Witness => {
                let addr = crate::common::free_addr();
                let w = spawn(
                    &[
                        "witness",
                        "--listen",
                        &addr,
                        "--state",
                        &format!("{dir}/witness"),
                    ],
                    &[],
                );
                wait_listening(&addr);
                (
                    Self {
                        kind,
                        witness: Some(w),
                        etcd: None,
                    },
                    addr,
                )
            }
            Kind::Etcd => {
                let c = Cluster::local(dir, 1);
                let e = c.endpoints();
                (
                    Self {
                        kind,
                        witness: None,
                        etcd: Some(c),
                    },
                    e,
                )
            }
        }
    }

    /// An arbiter of `kind` in the namespace `ns`, answering on `addrs` (its addresses
    /// there, one per side that may reach it), port [`NS_ARBITER_PORT`].
    pub fn in_netns(kind: Kind, dir: &str, ns: &str, addrs: &[&str]) -> Self {
        match kind {
            Kind::Witness => {
                let any = format!("0.0.0.0:{NS_ARBITER_PORT}");
                let w = spawn_in(
                    ns,
                    &[
                        "witness",
                        "--listen",
                        &any,
                        "--state",
                        &format!("{dir}/witness"),
                    ],
                    &[],
                );
                let first = format!("{}:{NS_ARBITER_PORT}", addrs[0]);
                crate::netns::run_in(ns, || wait_listening(&first));
                Self {
                    kind,
                    witness: Some(w),
                    etcd: None,
                }
            }
            Kind::Etcd => {
                let client: Vec<String> = addrs
                    .iter()
                    .map(|a| format!("{a}:{NS_ARBITER_PORT}"))
                    .collect();
                let member = Member {
                    client: client.join(","),
                    peer: "127.0.0.1:7280".into(),
                };
                let c = Cluster::start(dir, &[member], Some(ns));
                Self {
                    kind,
                    witness: None,
                    etcd: Some(c),
                }
            }
        }
    }
}

fn wait_listening(addr: &str) {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < LIMIT,
            "the witness never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A drill count from the environment variable `var` (default `default`).
pub fn count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seed for random moments (printed by the caller).
pub fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// A tiny deterministic generator (xorshift).
pub fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Which side ran the guest to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivor {
    /// The primary ran on; the standby never went live.
    Primary,
    /// The standby won the term and went live; the primary fenced itself.
    Standby,
}

/// The verdict of a drill with an arbiter: exactly one side is live at the end, the other
/// stopped without going live (abandoned or fenced, with its message) or followed to the
/// end without output; what a client saw, the old primary's released output joined with
/// the new live side's, is ticks 1..=n once each then `done`.
pub fn one_live_side(kind: Kind, p: &Done, s: &Done, ticks: u64) -> Survivor {
    let fenced = format!("ftvm: fenced: {} gave term ", kind.name());
    let live = s.stderr.contains("going live at exit");
    match (p.status.code(), live) {
        (Some(0), false) => {
            assert_complete_count(&p.out(), ticks);
            assert!(s.stdout.is_empty(), "the standby printed {:?}", s.out());
            match s.status.code() {
                Some(0) => {}
                Some(STATUS_ABANDONED) => assert!(
                    s.stderr.contains("ftvm: the primary abandoned this standby: "),
                    "{}",
                    s.stderr
                ),
                Some(STATUS_FENCED) => assert!(s.stderr.contains(&fenced), "{}", s.stderr),
                other => panic!("standby exited {other:?}:\n{}", s.stderr),
            }
            Survivor::Primary
        }
        (Some(STATUS_FENCED), true) => {
            assert!(p.stderr.contains(&fenced), "{}", p.stderr);
            assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
            assert!(
                s.stderr.contains(&format!("won term 1 at {}", kind.name())),
                "{}",
                s.stderr
            );
            assert_failover_output(&p.stdout, &s.stdout, &s.stderr, ticks);
            Survivor::Standby
        }
        other => panic!(
            "not exactly one live side: primary exited {:?}, standby live={}\nprimary:\n{}\nstandby:\n{}",
            other.0, other.1, p.stderr, s.stderr
        ),
    }
}
