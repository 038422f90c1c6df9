//! The guest's network card on /dev/kvm, with the built-in guest's `netecho` workload (it
//! sends every frame back) and a client on the host side of a real TAP that sends one frame
//! and waits for its answer, [`ROUNDS`] times. Prints (never asserts on), each next to its
//! baseline from the same run:
//!
//! 1. Round trips per second and the median round trip: protected (a pair on this host; an
//!    answer leaves only once the standby verified its epoch) next to unprotected.
//! 2. Logged receive bytes per second (the recorded run's log size over its wall time) next to
//!    the guest's network traffic in both directions.
//! 3. Failover as the client sees it after `kill -9` of the primary: from the last answer
//!    before the kill to the first answer from the standby's TAP (the client resends every
//!    [`RESEND`] until one comes back), next to the median protected round trip.
//!
//! Needs root (TAP devices). Run: `cargo bench --bench net`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
use common::net::{ipv4_frame, PacketSocket, TestTap};
use common::{free_addr, key_args, median, ms, Failure, Scratch, FTVM};

/// Round trips per run.
const ROUNDS: usize = 2000;
/// How often the client resends while nobody answers (failover).
const RESEND: Duration = Duration::from_millis(2);

fn main() -> ExitCode {
    common::print_banner("net");
    common::exit_code("net", run())
}

fn spawn(args: &[&str], stdout: Stdio) -> Result<Child, Failure> {
    Command::new(FTVM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn ftvm {args:?}: {e}"))
}

fn wait_ready(child: &mut Child) -> Result<(), Failure> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut out = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("ftvm ended before the guest's card was ready".into());
        }
        if line.starts_with("netecho mac=") {
            // Keep reading the rest so the guest's output never blocks.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return Ok(());
        }
    }
}

/// `n` round trips on `sock`: their durations, and the bytes that crossed the TAP.
fn round_trips(sock: &PacketSocket, from: usize, n: usize) -> (Vec<Duration>, u64) {
    let mut times = Vec::with_capacity(n);
    let mut bytes = 0u64;
    for i in from..from + n {
        let sent = ipv4_frame(i);
        let t = Instant::now();
        sock.send(&sent);
        let got = sock.recv_from_guest();
        times.push(t.elapsed());
        bytes += (sent.len() + got.len()) as u64;
    }
    (times, bytes)
}

fn report(name: &str, times: &mut [Duration], total: Duration) {
    println!(
        "{name}: {:.0} round trips/s, median round trip {:.3} ms ({} frames each way)",
        times.len() as f64 / total.as_secs_f64(),
        ms(median(times)),
        times.len()
    );
}

fn run() -> Result<(), Failure> {
    let scratch = Scratch::try_new("bench-net")?;
    let cmdline = format!("workload=netecho n={}", 2 * ROUNDS + 1000);

    // Unprotected, recorded: the baseline, and the log's size.
    let tap = TestTap::new("bu");
    let sock = PacketSocket::open_for(&tap.0, 0x0800);
    let log = scratch.path("net.log");
    let net = format!("tap={}", tap.0);
    let log_s = log.to_string_lossy().into_owned();
    let mut live = spawn(
        &["run", "--net", &net, "--cmdline", &cmdline],
        Stdio::piped(),
    )?;
    wait_ready(&mut live)?;
    let t = Instant::now();
    let (mut live_times, _) = round_trips(&sock, 0, ROUNDS);
    let live_total = t.elapsed();
    let _ = live.kill();
    let _ = live.wait();

    let mut rec = spawn(
        &[
            "run",
            "--net",
            &net,
            "--record",
            &log_s,
            "--cmdline",
            &cmdline,
        ],
        Stdio::piped(),
    )?;
    wait_ready(&mut rec)?;
    let t = Instant::now();
    let (mut rec_times, rec_bytes) = round_trips(&sock, 0, ROUNDS);
    let rec_total = t.elapsed();
    let _ = rec.kill();
    let _ = rec.wait();
    let log_bytes = std::fs::metadata(&log).map_err(|e| e.to_string())?.len();
    drop(sock);
    drop(tap);

    // Protected: a pair on this host, each side with its own TAP.
    let (tap_a, tap_b) = (TestTap::new("ba"), TestTap::new("bb"));
    let (sock_a, sock_b) = (
        PacketSocket::open_for(&tap_a.0, 0x0800),
        PacketSocket::open_for(&tap_b.0, 0x0800),
    );
    let addr = free_addr();
    let net_b = format!("tap={}", tap_b.0);
    let mut s_args = vec!["standby", "--listen", &addr, "--net", &net_b];
    s_args.extend(key_args(&s_args));
    let mut standby = spawn(&s_args, Stdio::null())?;
    let net_a = format!("tap={}", tap_a.0);
    let mut p_args = vec![
        "run",
        "--peer",
        &addr,
        "--net",
        &net_a,
        "--cmdline",
        &cmdline,
    ];
    p_args.extend(key_args(&p_args));
    let mut primary = spawn(&p_args, Stdio::piped())?;
    wait_ready(&mut primary)?;
    let t = Instant::now();
    let (mut prot_times, _) = round_trips(&sock_a, 0, ROUNDS);
    let prot_total = t.elapsed();
    let last_answer = Instant::now();
    primary
        .kill()
        .map_err(|e| format!("SIGKILL the primary: {e}"))?;
    let _ = primary.wait();
    // Resend until the standby answers on its TAP.
    sock_b.set_timeout(RESEND);
    let mut i = ROUNDS;
    let failover = loop {
        let sent = ipv4_frame(i);
        sock_b.send(&sent);
        if sock_b.try_recv_from_guest().is_some() {
            break last_answer.elapsed();
        }
        if last_answer.elapsed() > Duration::from_secs(60) {
            return Err("the standby never answered after the kill".into());
        }
        i += 1;
    };
    let _ = standby.kill();
    let _ = standby.wait();

    println!("-- round trips ({ROUNDS} each, one frame in flight)");
    report("unprotected", &mut live_times, live_total);
    report("recorded   ", &mut rec_times, rec_total);
    report("protected  ", &mut prot_times, prot_total);
    println!(
        "protected / unprotected round trips per second: {:.3}",
        live_total.as_secs_f64() / prot_total.as_secs_f64()
    );
    println!("-- logged receive bytes");
    println!(
        "recorded run: log {:.1} KiB/s for guest traffic of {:.1} KiB/s both ways ({:.1} KiB/s received)",
        log_bytes as f64 / 1024.0 / rec_total.as_secs_f64(),
        rec_bytes as f64 / 1024.0 / rec_total.as_secs_f64(),
        rec_bytes as f64 / 2.0 / 1024.0 / rec_total.as_secs_f64(),
    );
    println!("-- failover as the client sees it (kill -9 of the primary, this host)");
    println!(
        "last answer before the kill to first answer after go-live: {:.1} ms (median protected round trip {:.3} ms)",
        ms(failover),
        ms(median(&mut prot_times))
    );
    Ok(())
}
