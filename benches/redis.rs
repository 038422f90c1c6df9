//! Debian's redis-server in the protected Linux test guest (issue 17), on one host: the
//! nested harness (standard KVM under QEMU TCG) runs scripts/lib/redis-scenario.sh, the
//! client (Debian's redis-benchmark and redis-cli) in a network namespace on the bridge
//! that holds the guests' TAPs (scripts/lib/redis-net.sh). Prints (never asserts on), each
//! next to its baseline from the same run:
//!
//! 1. `redis-benchmark -n N -c 4 -t set,get` requests per second against the guest,
//!    protected (every reply leaves only once the standby verified its epoch; SETs are
//!    fsynced to the AOF on the virtio disk first, `appendfsync always`) next to
//!    unprotected; and the bytes of received frames logged per second next to the guest's
//!    network traffic (received and sent) in that run;
//! 2. failover as the client sees it: `kill -9` of the primary ftvm during writes over one
//!    long-lived redis-cli connection, from the last reply before the kill to the first
//!    reply after the standby went live, next to the median protected write round trip of
//!    the same run, and whether the connection survived.
//!
//! The harness runs the VMMs themselves under TCG, so the absolute numbers are far below
//! hardware; the comparisons are what this is for.
//!
//! `cargo bench --bench redis [-- bench|failover]` (both by default); `FTVM_REDIS_BENCH_N`
//! sets N (default 200). Needs root.

use std::process::ExitCode;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{field, linux_guest, linux_guest_redis_images, nested, Failure, Scratch, FTVM};

fn main() -> ExitCode {
    common::print_banner("redis");
    common::exit_code("redis", run())
}

/// scripts/lib/redis-scenario.sh MODE in the harness on a fresh disk; its output.
fn scenario(mode: &str, n: u32, timeout_s: u32) -> Result<String, Failure> {
    let (kernel, initrd) = linux_guest_redis_images();
    let dir = Scratch::new(&format!("redis-bench-{mode}"));
    let disk = dir.path_str("disk.img");
    linux_guest(&["disk", &disk]);
    let script = common::repo().join("scripts/lib/redis-scenario.sh");
    let script = script.to_string_lossy();
    let run_dir = dir.path_str("run");
    let n = n.to_string();
    let args = [
        script.as_ref(),
        mode,
        FTVM,
        &kernel,
        &initrd,
        &disk,
        &run_dir,
        &n,
    ];
    let (status, out, err) = nested(&args, timeout_s);
    if status != Some(0) {
        return Err(format!(
            "redis-scenario.sh {mode}: status {status:?}\n{out}\n{err}"
        ));
    }
    Ok(out)
}

/// Logged RX next to the guest's traffic, per second of the protected benchmark: the
/// recorder's frame counts (the whole run; the boot adds a few frames) over the time
/// redis-benchmark ran.
fn print_logged_rx(out: &str) -> Result<(), Failure> {
    let count = |key: &str| -> Result<f64, Failure> {
        out.lines()
            .filter_map(|l| l.strip_prefix("bench-traffic "))
            .find_map(|l| field(l, key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no bench-traffic {key}= in the protected run:\n{out}"))
    };
    let secs = out
        .lines()
        .find_map(|l| l.strip_prefix("bench-ms protected "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| ms / 1000.0)
        .filter(|s| *s > 0.0)
        .ok_or_else(|| format!("no bench-ms protected in the run:\n{out}"))?;
    let (rx, rx_frames) = (count("net_rx_bytes")?, count("net_rx_frames")?);
    let tx = count("net_tx_bytes")?;
    println!(
        "logged RX while redis-benchmark ran protected ({secs:.1} s): {:.0} bytes/s in \
         {:.1} frames/s, next to the guest's network traffic: {:.0} bytes/s received + {:.0} \
         bytes/s sent (sent frames are output, not logged)",
        rx / secs,
        rx_frames / secs,
        rx / secs,
        tx / secs
    );
    Ok(())
}

/// The value of `key=` in the first line that has it.
fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| field(l, key))
}

fn run() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let want = |what: &str| args.is_empty() || args.iter().any(|a| a == what);
    let n: u32 = std::env::var("FTVM_REDIS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    if want("bench") {
        let out = scenario("bench", n, 2400)?;
        // "bench RUN TEST RPS" lines.
        let rps = |run: &str, test: &str| -> Result<f64, Failure> {
            out.lines()
                .find_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    (w.len() == 4 && w[0] == "bench" && w[1] == run && w[2] == test)
                        .then(|| w[3].parse::<f64>().ok())
                        .flatten()
                })
                .ok_or_else(|| format!("no {run} {test} figure:\n{out}"))
        };
        println!(
            "redis-benchmark -n {n} -c 4 against the guest in the nested harness (requests/s):"
        );
        println!("  test   unprotected   protected   protected/unprotected");
        for test in ["SET", "GET"] {
            let (u, p) = (rps("unprotected", test)?, rps("protected", test)?);
            println!(
                "  {test:<5} {u:>12.1} {p:>11.1} {:>15.3}",
                if u > 0.0 { p / u } else { 0.0 }
            );
        }
        print_logged_rx(&out)?;
    }
    if want("failover") {
        let writes = 45;
        let out = scenario("kill", writes, 2400)?;
        let failover = value(&out, "failover-ms")
            .ok_or_else(|| format!("no failover-ms= in the kill run:\n{out}"))?;
        let round_trip = value(&out, "median-ack-ms").unwrap_or("?");
        println!(
            "failover as the client sees it (kill -9 of the primary after {} of {writes} \
             writes, one redis-cli connection):",
            writes / 3
        );
        println!(
            "  last reply before the kill -> first reply after go-live: {failover} ms \
             (median protected write round trip in the same run: {round_trip} ms); \
             connection survived: {}; read back: {}",
            value(&out, "connection-survived").unwrap_or("?"),
            out.lines()
                .find(|l| l.starts_with("read-back "))
                .unwrap_or("?")
        );
    }
    Ok(())
}
