//! Failover drills across two simulated hosts (issue 17; tests/common/two_hosts.rs): the
//! built-in guest's `netecho` workload protected by a primary on host A and a standby on
//! host B of `scripts/two-hosts.sh`, a client on host B's network sending it frames, and
//!
//! - `process_kill_drills`: `kill -9` of the primary's ftvm process on host A;
//! - `host_loss_drills`: host A itself lost (its QEMU SIGKILLed).
//!
//! In both the standby goes live (with the pair's witness), announces the guest on its TAP,
//! and every frame of the client is answered, in order. `FTVM_HOST_DRILLS` drills of each
//! (default 1; `scripts/drill-hosts.sh N`), each with the loss after a different number of
//! answers (seeded, printed). Each drill boots the two hosts: about 17 s with an idle
//! machine.
//!
//! And the same two losses under a real service (tests/common/redis.rs,
//! scripts/lib/redis-hosts.sh): the protected Linux test guest running Debian's
//! redis-server with `appendfsync always`, a redis-cli client in host B's namespace writing
//! numbered keys over one connection:
//!
//! - `redis_after_process_kill`, `redis_after_host_loss`: every write the client saw
//!   acknowledged reads back with its value from the guest on host B, the guest ends on
//!   SHUTDOWN with status 0, and the standby's copy of the disk passes `e2fsck -n` and holds
//!   exactly the keys written. `FTVM_REDIS_HOST_DRILLS` drills of each (default 1). The
//!   guest boots on host A's primary alone and the standby joins it once Redis answers
//!   and the client is connected (`--accept-standby`, `--join`): the writes, the loss and
//!   the failover are protected, the boot is not (about 3 minutes a drill here, against 4
//!   to 11 protected from the first instruction, `REDIS_HOSTS_PROTECT=boot`).
//!
//! A test binary without libtest (`harness = false`): run again with
//! [`common::two_hosts::CLIENT_ARG`] inside host B, it is the drill's client. Arguments
//! that do not start with `-` select drills by name, as libtest's filters do. Needs root.

use std::process::ExitCode;

mod common;
use common::redis::hosts_drill;
use common::two_hosts::{drill, run_as_client_if_asked, Loss, HEARTBEAT_TIMEOUT_MS};

/// Frames per drill.
const FRAMES: usize = 16;

/// Writes per Redis drill: each is a round trip held by the output rule (about a second
/// under TCG), so few.
const WRITES: u32 = 24;

/// What a test drills: the netecho guest's frames, or Redis in the Linux guest.
#[derive(Clone, Copy)]
enum Service {
    Frames,
    Redis,
}

fn main() -> ExitCode {
    if let Some(code) = run_as_client_if_asked() {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tests = [
        ("process_kill_drills", Service::Frames, Loss::Process),
        ("host_loss_drills", Service::Frames, Loss::Host),
        ("redis_after_process_kill", Service::Redis, Loss::Process),
        ("redis_after_host_loss", Service::Redis, Loss::Host),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, ..) in tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let exact = args.iter().any(|a| a == "--exact");
    // No drill is ignored: `--ignored` selects none, as libtest's would.
    let only_ignored = args.iter().any(|a| a == "--ignored");
    let selected: Vec<_> = tests
        .into_iter()
        .filter(|(name, ..)| {
            !only_ignored
                && (filters.is_empty()
                    || filters
                        .iter()
                        .any(|f| if exact { name == f } else { name.contains(f) }))
        })
        .collect();
    let count = |var: &str| -> u64 {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    };
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("current_exe: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("\nrunning {} tests", selected.len());
    let mut seed = 0x2b05_u64 ^ u64::from(std::process::id());
    let mut failed = Vec::new();
    for (name, service, loss) in &selected {
        let result = match service {
            Service::Frames => frame_drills(name, *loss, count("FTVM_HOST_DRILLS"), &me, &mut seed),
            Service::Redis => redis_drills(name, *loss, count("FTVM_REDIS_HOST_DRILLS"), &mut seed),
        };
        match result {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                println!("test {name} ... FAILED");
                failed.push((*name, e));
            }
        }
    }
    for (name, e) in &failed {
        println!("\n---- {name} ----\n{e}");
    }
    println!(
        "\ntest result: {}. {} passed; {} failed\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The next number of the drills' seeded sequence, in 0..n.
fn draw(seed: &mut u64, n: u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) % n
}

/// `drills` netecho drills losing the primary as `loss` says.
fn frame_drills(
    name: &str,
    loss: Loss,
    drills: u64,
    me: &std::path::Path,
    seed: &mut u64,
) -> Result<(), String> {
    for d in 0..drills {
        let kill_at = 3 + draw(seed, (FRAMES - 6) as u64) as usize;
        eprintln!(
            "{name} {}/{drills}: {} after {kill_at} of {FRAMES} answers",
            d + 1,
            loss.name()
        );
        let o = drill(loss, me, FRAMES, kill_at)?;
        eprintln!(
            "  every frame answered in order ({} sent, resends included; {} gratuitous \
             ARP seen); failover as the client saw it {:.0} ms ({:.0} ms after the loss; \
             heartbeat timeout {HEARTBEAT_TIMEOUT_MS} ms); drill {:.0?} with the hosts' boot",
            o.sent,
            o.garps,
            o.failover.as_secs_f64() * 1000.0,
            o.after_loss.as_secs_f64() * 1000.0,
            o.took
        );
    }
    Ok(())
}

/// `drills` Redis drills losing the primary as `loss` says; the first after a sixth of
/// the writes (each write before the loss is a protected round trip of several seconds
/// under TCG), the others after a seeded number.
fn redis_drills(name: &str, loss: Loss, drills: u64, seed: &mut u64) -> Result<(), String> {
    for d in 0..drills {
        let k = if d == 0 {
            WRITES / 6
        } else {
            1 + draw(seed, u64::from(WRITES - 2)) as u32
        };
        eprintln!(
            "{name} {}/{drills}: {} after {k} of {WRITES} acknowledged writes",
            d + 1,
            loss.name()
        );
        let o = hosts_drill(loss, WRITES, k)?;
        eprintln!(
            "  every acknowledged write read back, disk copy clean; Redis ready {} s after \
             the start, protected after {} s; failover as the client saw it {} ms (a write's \
             round trip {} ms); the TCP connection {}; drill {:.0?} with the hosts' boot",
            o.ready_s,
            o.protected_s,
            o.failover_ms,
            o.median_ack_ms,
            if o.connection_survived {
                "survived"
            } else {
                "was reset (redis-cli reconnected)"
            },
            o.took
        );
    }
    Ok(())
}
