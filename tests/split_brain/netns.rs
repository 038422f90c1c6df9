//! Three hosts on one machine for the partition drills: network namespaces for the primary,
//! the standby and the arbiter, joined by veth pairs (needs root, as CI runs):
//!
//! ```text
//!   primary 10.77.0.1 ──pair── 10.77.0.2 standby
//!   10.77.1.1                          10.77.2.1
//!       └──arb── 10.77.1.2  arbiter  10.77.2.2 ──arb──┘
//! ```
//!
//! A partition sets both ends of a link down (no RST, no FIN: the peer just stops hearing,
//! as when a cable or a switch fails); healing sets them up again. The addresses exist only
//! inside these namespaces, which have no route anywhere else.

// Each suite compiles this file by itself and uses only part of it.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::process::Command;

/// The three hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Primary,
    Standby,
    Arbiter,
}

/// The three links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Primary ↔ standby: the pair's channel.
    Pair,
    /// Primary ↔ arbiter.
    PrimaryArbiter,
    /// Standby ↔ arbiter.
    StandbyArbiter,
}

/// The standby's pair address, as the primary dials it.
pub const STANDBY_PAIR: &str = "10.77.0.2";
/// The primary's pair address (its `--accept-standby`).
pub const PRIMARY_PAIR: &str = "10.77.0.1";
/// The arbiter as the primary reaches it.
pub const ARBITER_FOR_PRIMARY: &str = "10.77.1.2";
/// The arbiter as the standby reaches it.
pub const ARBITER_FOR_STANDBY: &str = "10.77.2.2";

/// The namespaces and links; removed (with every interface in them) when dropped.
pub struct Net {
    tag: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {}: {} (the partition drills need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

impl Net {
    /// Creates the three namespaces and links, named after `name` and this process.
    pub fn new(name: &str) -> Self {
        let net = Self {
            tag: format!("ftvm-{name}-{}", std::process::id()),
        };
        for h in [Host::Primary, Host::Standby, Host::Arbiter] {
            let ns = net.ns(h);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        for w in [Wire::Pair, Wire::PrimaryArbiter, Wire::StandbyArbiter] {
            let [(h1, if1, a1), (h2, if2, a2)] = ends(w);
            let (ns1, ns2) = (net.ns(h1), net.ns(h2));
            ip(&[
                "link", "add", if1, "netns", &ns1, "type", "veth", "peer", "name", if2, "netns",
                &ns2,
            ]);
            ip(&["-n", &ns1, "addr", "add", a1, "dev", if1]);
            ip(&["-n", &ns2, "addr", "add", a2, "dev", if2]);
        }
        for w in [Wire::Pair, Wire::PrimaryArbiter, Wire::StandbyArbiter] {
            net.heal(w);
        }
        net
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: Host) -> String {
        let h = match host {
            Host::Primary => "p",
            Host::Standby => "s",
            Host::Arbiter => "a",
        };
        format!("{}-{h}", self.tag)
    }

    fn set(&self, w: Wire, state: &str) {
        for (h, iface, _) in ends(w) {
            ip(&["-n", &self.ns(h), "link", "set", "dev", iface, state]);
        }
    }

    /// Cuts `w`: both ends down.
    pub fn cut(&self, w: Wire) {
        self.set(w, "down");
    }

    /// Heals `w`: both ends up.
    pub fn heal(&self, w: Wire) {
        self.set(w, "up");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in [Host::Primary, Host::Standby, Host::Arbiter] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
        }
    }
}

/// The two ends of `w`: (host, interface, address/prefix).
fn ends(w: Wire) -> [(Host, &'static str, &'static str); 2] {
    match w {
        Wire::Pair => [
            (Host::Primary, "pair", "10.77.0.1/30"),
            (Host::Standby, "pair", "10.77.0.2/30"),
        ],
        Wire::PrimaryArbiter => [
            (Host::Primary, "arb", "10.77.1.1/30"),
            (Host::Arbiter, "primary", "10.77.1.2/30"),
        ],
        Wire::StandbyArbiter => [
            (Host::Standby, "arb", "10.77.2.1/30"),
            (Host::Arbiter, "standby", "10.77.2.2/30"),
        ],
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns` (a thread's namespace
/// is its own: the test's other threads stay where they are).
pub fn run_in<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on an open namespace file, for this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace")
    })
}
