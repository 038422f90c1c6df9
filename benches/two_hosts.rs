//! Failover as the client sees it, across two simulated hosts (scripts/two-hosts.sh; the
//! drills of tests/common/two_hosts.rs): the built-in guest's `netecho` workload with its
//! primary on host A and its standby on host B, a client on host B's network that resends
//! each frame until it is answered, and the primary lost two ways:
//!
//! - process kill: `kill -9` of the primary's ftvm on host A (its kernel closes the pair's
//!   connection, so the standby learns at once);
//! - host loss: host A's QEMU SIGKILLed (the standby hears nothing more and waits out the
//!   heartbeat timeout).
//!
//! Prints (never asserts on) for each: the time from the last answer before the loss was
//! asked for to the first answer after it, and from the moment the loss was done, next to
//! the pair's heartbeat timeout (the baseline: what host loss cannot beat) and the client's
//! resend interval. `FTVM_BENCH_DRILLS` drills of each (default 2), each booting both hosts
//! (about 17 s).
//!
//! `-- redis` instead: the same two losses under Redis in the protected Linux guest
//! (tests/common/redis.rs, scripts/lib/redis-hosts.sh; a redis-cli client in host B's
//! network writing numbered keys over one connection): the client-seen failover, from the
//! last acknowledged write before the loss to the first after it, next to a protected
//! write's round trip measured before the loss in the same drill and the pair's heartbeat
//! timeout there; whether the TCP connection survived. One drill of each (each a protected
//! Linux boot on two TCG hosts: many minutes).
//!
//! Needs root; one harness at a time on a machine (each takes both cores).
//! Run: `cargo bench --bench two_hosts [-- redis]`.

use std::process::ExitCode;
use std::time::Duration;

#[path = "../tests/common/mod.rs"]
mod common;
use common::redis::{hosts_drill, HOSTS_HEARTBEAT_TIMEOUT_MS};
use common::two_hosts::{
    drill, run_as_client_if_asked, Loss, HEARTBEAT_TIMEOUT_MS, RESEND, RESEND_MAX,
};
use common::{median, ms, Failure};

const FRAMES: usize = 16;

fn main() -> ExitCode {
    if let Some(code) = run_as_client_if_asked() {
        return code;
    }
    common::print_banner("two_hosts");
    common::exit_code("two_hosts", run())
}

fn run() -> Result<(), Failure> {
    if std::env::args().skip(1).any(|a| a == "redis") {
        return redis();
    }
    let drills: usize = std::env::var("FTVM_BENCH_DRILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2);
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut rows = Vec::new();
    for loss in [Loss::Process, Loss::Host] {
        let (mut seen, mut after) = (Vec::new(), Vec::new());
        for d in 0..drills {
            let kill_at = 4 + d % (FRAMES - 8);
            let o = drill(loss, &me, FRAMES, kill_at)?;
            eprintln!(
                "{} {}/{drills}: {:.0} ms ({:.0} ms after the loss), drill {:.0?}",
                loss.name(),
                d + 1,
                ms(o.failover),
                ms(o.after_loss),
                o.took
            );
            seen.push(o.failover);
            after.push(o.after_loss);
        }
        rows.push((loss, seen, after));
    }
    println!(
        "-- failover as the client sees it, two hosts ({drills} drills each, median [min, max])"
    );
    for (loss, mut seen, mut after) in rows {
        let range = |v: &mut Vec<Duration>| {
            v.sort();
            format!(
                "{:.0} ms [{:.0}, {:.0}]",
                ms(median(v)),
                ms(v[0]),
                ms(v[v.len() - 1])
            )
        };
        println!(
            "{:12}: last answer before → first answer after {}; from the loss {}",
            loss.name(),
            range(&mut seen),
            range(&mut after)
        );
    }
    println!(
        "baseline: heartbeat timeout {HEARTBEAT_TIMEOUT_MS} ms (a silent host is lost after it); \
         the client resends every {} ms from the loss on (before it: {}-{} ms, doubling)",
        RESEND.as_millis(),
        RESEND.as_millis(),
        RESEND_MAX.as_millis()
    );
    Ok(())
}

/// Writes per Redis drill, and the acknowledged writes before the loss.
const REDIS_WRITES: u32 = 24;
const REDIS_KILL_AFTER: u32 = 8;

fn redis() -> Result<(), Failure> {
    let mut rows = Vec::new();
    for loss in [Loss::Process, Loss::Host] {
        let o = hosts_drill(loss, REDIS_WRITES, REDIS_KILL_AFTER)?;
        eprintln!(
            "{}: Redis ready {} s after the start, the standby following after {} s, drill {:.0?}",
            loss.name(),
            o.ready_s,
            o.protected_s,
            o.took
        );
        rows.push((loss, o));
    }
    println!("-- Redis in the protected Linux guest, two hosts: failover as the client sees it");
    for (loss, o) in rows {
        println!(
            "{:12}: last acknowledged write before → first after {} ms; a protected write's \
             round trip {} ms (median before the loss); TCP connection {}",
            loss.name(),
            o.failover_ms,
            o.median_ack_ms,
            if o.connection_survived {
                "survived"
            } else {
                "reset"
            }
        );
    }
    println!(
        "baseline: heartbeat timeout {HOSTS_HEARTBEAT_TIMEOUT_MS} ms (a silent host is lost after it)"
    );
    Ok(())
}
