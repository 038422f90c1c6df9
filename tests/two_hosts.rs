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
//! A test binary without libtest (`harness = false`): run again with
//! [`common::two_hosts::CLIENT_ARG`] inside host B, it is the drill's client. Arguments
//! that do not start with `-` select drills by name, as libtest's filters do. Needs root.

use std::process::ExitCode;

mod common;
use common::two_hosts::{drill, run_as_client_if_asked, Loss, HEARTBEAT_TIMEOUT_MS};

/// Frames per drill.
const FRAMES: usize = 16;

fn main() -> ExitCode {
    if let Some(code) = run_as_client_if_asked() {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tests = [
        ("process_kill_drills", Loss::Process),
        ("host_loss_drills", Loss::Host),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
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
    // None of these is an ignored test.
    let only_ignored = args.iter().any(|a| a == "--ignored");
    let selected: Vec<_> = tests
        .into_iter()
        .filter(|(name, _)| {
            !only_ignored
                && (filters.is_empty()
                    || filters
                        .iter()
                        .any(|f| if exact { name == f } else { name.contains(f) }))
        })
        .collect();
    let drills: u64 = std::env::var("FTVM_HOST_DRILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
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
    for (name, loss) in &selected {
        let mut result = Ok(());
        for d in 0..drills {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let kill_at = 3 + (seed >> 33) as usize % (FRAMES - 6);
            eprintln!(
                "{name} {}/{drills}: {} after {kill_at} of {FRAMES} answers",
                d + 1,
                loss.name()
            );
            match drill(*loss, &me, FRAMES, kill_at) {
                Ok(o) => eprintln!(
                    "  every frame answered in order ({} sent, resends included; {} gratuitous \
                     ARP seen); failover as the client saw it {:.0} ms ({:.0} ms after the loss; \
                     heartbeat timeout {HEARTBEAT_TIMEOUT_MS} ms); drill {:.0?} with the hosts' boot",
                    o.sent,
                    o.garps,
                    o.failover.as_secs_f64() * 1000.0,
                    o.after_loss.as_secs_f64() * 1000.0,
                    o.took
                ),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
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
