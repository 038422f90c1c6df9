//! End-to-end benchmark of a protected pair: `ftvm run --peer` (the primary) and
//! `ftvm standby` (its standby) on one host, over loopback TCP.
//!
//! Prints (never asserts on) five figures, each next to a baseline measured in
//! the same run:
//!
//! 1. Log acknowledgement latency, p50/p99: for every epoch the primary shipped,
//!    the time until an Ack covering it arrived (from the primary's
//!    `FTVM_AUDIT` file), over [`PROTECTED_RUNS`] protected runs of
//!    `workload=counter ticks=100`. Baseline: a raw TCP ping-pong round trip on
//!    loopback (two threads of this process, `TCP_NODELAY`) with messages as
//!    large as the average log bytes per epoch (log file size of a recorded run
//!    divided by its epochs).
//! 2. Log throughput: ~100 MiB of framed `RecordBatch`es of [`BATCH_RECORDS`]
//!    records each, packed as the log's writers pack them, sent over loopback
//!    TCP, decoded, every slot of each packed block read in place and counted
//!    (MiB/s and records/s). Baseline: the same volume as raw TCP writes of a
//!    buffer.
//! 3. Failover time, p50/p99 over [`DRILLS`] drills: the primary (running
//!    `workload=counter ticks=300`) is killed with SIGKILL after its 30th tick
//!    line; the figure is the time from the kill to the standby's first byte of
//!    output. Baseline: the cold start of an unprotected
//!    `ftvm run --cmdline "workload=counter ticks=1"` to its first byte of
//!    output, p50/p99 over [`COLD_STARTS`] runs. With it, where the failover
//!    time goes, step by step, from the standby's audit trail
//!    (`benches/pair/failover.rs`). The same again over [`DRILLS`] drills whose
//!    primary runs with `--max-lag-ms` [`TIGHT_LAG_MS`], which bounds the replay
//!    backlog a failover must go through.
//! 4. Output delay added by the output rule, p50/p99: how long released output
//!    was held waiting for the standby's verification (`held_ns` of the
//!    primary's `verified` releases in the runs of figure 1). Baseline: the raw
//!    TCP round trip p50 of figure 1, the least any such protocol must add.
//!    With it, the latency breakdown of released output, stage by stage, from
//!    both audit trails (`benches/pair/breakdown.rs`). The same again over
//!    [`PROTECTED_RUNS`] runs with `--max-lag-ms` [`TIGHT_LAG_MS`] (the guest
//!    slowed whenever the standby's replay falls that far behind), each with the
//!    guest's speed (exits per second of the primary) next to the default's.
//! 5. Echo round trip, p50/p99: a line written to a protected `workload=echo`
//!    primary's stdin until its answer comes out (`benches/pair/echo.rs`).
//!    Baseline: the same with an unprotected `ftvm run`.
//!
//! Percentiles are nearest-rank: the p99 of 20 samples is their maximum.
//!
//! Where the host has two CPUs or more, every primary runs on CPU 0 and every
//! standby on CPU 1 (`pin`), so neither waits for the other's CPU.
//!
//! Correctness failures are reported on stderr and make the benchmark exit
//! non-zero: a process that exits non-zero, hangs or prints something
//! unexpected; a protected run whose audit shows an epoch never acknowledged or
//! output released out of order; a replay that diverges; framed records that do
//! not come back intact; and a drill whose output is not continuous (the
//! primary's output up to where the standby's starts, then the standby's, must
//! be exactly ticks 1..=300 then `done`) or whose standby does not exit 0.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ftvm_proto::frame::{self, FrameReader};
use ftvm_proto::log::{
    log_frame, record, Inputs, Interrupt, LogFrame, PioRead, Record, RecordBatch,
};
use ftvm_proto::packed;

// The helpers the tests use too (tests/common/mod.rs says why they live there).
#[path = "pair/breakdown.rs"]
mod breakdown;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "pair/echo.rs"]
mod echo;
#[path = "pair/failover.rs"]
mod failover;
use breakdown::Breakdown;
use common::{check_counter, mib_per_s, ms, percentile, try_free_addr, Failure, Scratch, FTVM};

/// Protected runs whose audit files give figures 1 and 4 (and as many again with
/// `--max-lag-ms` [`TIGHT_LAG_MS`] for figure 4).
const PROTECTED_RUNS: usize = 3;
/// The lag bound of figure 4's second set of runs.
const TIGHT_LAG_MS: u64 = 2;
/// Timer ticks (at 100 Hz) of the protected runs and of the recorded run.
const PROTECTED_TICKS: u64 = 100;
/// Measured ping-pongs of the raw TCP round-trip baseline.
const PING_PONGS: usize = 2000;
/// Ping-pongs before measuring (connection and cache warm-up).
const PING_WARMUP: usize = 200;
/// Bytes streamed by each throughput measurement.
const STREAM_BYTES: u64 = 100 << 20;
/// Records per framed batch in the log throughput measurement.
const BATCH_RECORDS: usize = 64;
/// Size of the buffer written in a loop by the raw TCP throughput baseline.
const RAW_CHUNK: usize = 64 << 10;
/// Failover drills.
const DRILLS: usize = 20;
/// Timer ticks of the drills' guest.
const DRILL_TICKS: u64 = 300;
/// Tick lines the primary must have printed before it is killed.
const KILL_AFTER_TICKS: usize = 30;
/// Cold starts of the failover baseline.
const COLD_STARTS: usize = 20;
/// Longest a process may take to do what it is waiting for (guests of up to
/// 3 s, on a loaded host).
const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    common::exit_code("pair", run())
}

fn run() -> Result<(), Failure> {
    common::print_banner("pair");
    let total = Instant::now();
    let dir = Scratch::try_new("bench-pair")?;

    // Figure 1: log bytes per epoch, the round-trip baseline, the protected runs.
    let per_epoch = log_bytes_per_epoch(&dir.0)?;
    let rtt = ping_pong(per_epoch.bytes_per_epoch.max(1.0).round() as usize)?;
    let mut acks = Vec::new();
    let mut held = Vec::new();
    let mut unprotected = 0;
    let mut stages = Breakdown::default();
    let mut speed = Vec::new();
    for i in 0..PROTECTED_RUNS {
        let a = protected_run(&dir.0, i, &mut stages, None)?;
        acks.extend(a.ack_latencies);
        held.extend(a.held);
        unprotected += a.unprotected;
        speed.push(a.exits_per_s);
    }
    if acks.is_empty() {
        return Err("the protected runs shipped no epochs".to_string());
    }
    if held.is_empty() {
        return Err("the protected runs released no verified output".to_string());
    }
    // Figure 4, again with a tight lag bound.
    let mut tight = Tight::default();
    for i in 0..PROTECTED_RUNS {
        let a = protected_run(
            &dir.0,
            PROTECTED_RUNS + i,
            &mut tight.stages,
            Some(TIGHT_LAG_MS),
        )?;
        tight.held.extend(a.held);
        unprotected += a.unprotected;
        tight.speed.push(a.exits_per_s);
    }
    if tight.held.is_empty() {
        return Err("the protected runs with a tight lag bound released no verified output".into());
    }

    // Figure 2.
    let raw = raw_throughput()?;
    let log = log_throughput()?;

    // Figure 3.
    let mut cold = Vec::with_capacity(COLD_STARTS);
    for i in 0..COLD_STARTS {
        cold.push(cold_start(&dir.0, i)?);
    }
    let mut failover = Vec::with_capacity(DRILLS);
    let mut steps = Vec::with_capacity(DRILLS);
    let mut reemitted = Vec::with_capacity(DRILLS);
    let mut overlaps = 0;
    let mut ended = 0;
    for i in 0..DRILLS {
        let d = drill(&dir.0, i, None)?;
        failover.push(d.failover);
        steps.push(d.steps);
        reemitted.push(d.reemitted);
        if d.overlap > 0 {
            overlaps += 1;
        }
        if d.ended {
            ended += 1;
        }
    }
    let mut tight_failover = Vec::with_capacity(DRILLS);
    let mut tight_steps = Vec::with_capacity(DRILLS);
    for i in 0..DRILLS {
        let d = drill(&dir.0, DRILLS + i, Some(TIGHT_LAG_MS))?;
        tight_failover.push(d.failover);
        tight_steps.push(d.steps);
    }

    // Figure 5.
    let mut echo = echo::measure(&dir.0)?;

    let rtt_p50 = percentile(&mut rtt.clone(), 50);
    println!();
    println!(
        "1. log acknowledgement latency ({PROTECTED_RUNS} protected runs of workload=counter ticks={PROTECTED_TICKS}, {} epochs):",
        acks.len()
    );
    println!(
        "   ack        p50 {:>9.3} ms   p99 {:>9.3} ms   (first Ack covering the epoch)",
        ms(percentile(&mut acks, 50)),
        ms(percentile(&mut acks, 99))
    );
    for (name, samples) in [
        ("Received", &mut stages.received_ack),
        ("Verified", &mut stages.verified_ack),
    ] {
        if !samples.is_empty() {
            println!(
                "   {name}   p50 {:>9.3} ms   p99 {:>9.3} ms   ({} epochs)",
                ms(percentile(samples, 50)),
                ms(percentile(samples, 99)),
                samples.len()
            );
        }
    }
    println!(
        "   baseline raw TCP round trip of {:.0} B (log bytes per epoch: {} B / {} epochs), {PING_PONGS} ping-pongs:",
        per_epoch.bytes_per_epoch, per_epoch.log_bytes, per_epoch.epochs
    );
    println!(
        "              p50 {:>9.3} ms   p99 {:>9.3} ms",
        ms(rtt_p50),
        ms(percentile(&mut rtt.clone(), 99))
    );

    println!(
        "2. log throughput over loopback TCP ({} MiB each):",
        STREAM_BYTES >> 20
    );
    println!(
        "   log        {:>9.1} MiB/s   {:>11.0} records/s   ({} frames of {BATCH_RECORDS} records, {:.0} B each)",
        mib_per_s(log.bytes, log.elapsed),
        log.records as f64 / log.elapsed.as_secs_f64(),
        log.frames,
        log.bytes as f64 / log.frames as f64
    );
    println!(
        "   baseline raw TCP {:>9.1} MiB/s   (writes of {} KiB)   log/raw {:.2}x",
        mib_per_s(raw.bytes, raw.elapsed),
        RAW_CHUNK >> 10,
        mib_per_s(log.bytes, log.elapsed) / mib_per_s(raw.bytes, raw.elapsed)
    );

    println!(
        "3. failover time, SIGKILL of the primary to the standby's first output byte ({DRILLS} drills, workload=counter ticks={DRILL_TICKS}, kill after {KILL_AFTER_TICKS} ticks):"
    );
    println!(
        "   failover   p50 {:>9.3} ms   p99 {:>9.3} ms",
        ms(percentile(&mut failover, 50)),
        ms(percentile(&mut failover, 99))
    );
    println!(
        "   baseline cold start of unprotected workload=counter ticks=1 to its first byte ({COLD_STARTS} runs):"
    );
    println!(
        "              p50 {:>9.3} ms   p99 {:>9.3} ms",
        ms(percentile(&mut cold, 50)),
        ms(percentile(&mut cold, 99))
    );
    reemitted.sort_unstable();
    println!(
        "   (every drill continuous and the standby exited 0; unreleased bytes re-emitted by the standby: p50 {} B, max {} B;",
        reemitted[reemitted.len() / 2],
        reemitted.last().copied().unwrap_or(0)
    );
    println!(
        "    {overlaps} drills where the primary had printed past the standby's start; {ended} where the standby's replay had already reached the guest's end)"
    );
    failover::print(&steps);
    println!("   with --max-lag-ms {TIGHT_LAG_MS} ({DRILLS} more drills, each as continuous):");
    println!(
        "   failover   p50 {:>9.3} ms   p99 {:>9.3} ms",
        ms(percentile(&mut tight_failover, 50)),
        ms(percentile(&mut tight_failover, 99))
    );
    failover::print(&tight_steps);

    println!(
        "4. output delay added by the output rule (held_ns of {} verified releases in the runs of 1):",
        held.len()
    );
    println!(
        "   held       p50 {:>9.3} ms   p99 {:>9.3} ms   (default --max-lag-ms; guest at {})",
        ms(percentile(&mut held, 50)),
        ms(percentile(&mut held, 99)),
        exits_per_s(&mut speed)
    );
    println!("   baseline raw TCP round trip p50 {:>9.3} ms", ms(rtt_p50));
    print_breakdown(&mut stages);
    println!(
        "   with --max-lag-ms {TIGHT_LAG_MS} ({PROTECTED_RUNS} more runs, {} verified releases):",
        tight.held.len()
    );
    println!(
        "   held       p50 {:>9.3} ms   p99 {:>9.3} ms   (guest at {})",
        ms(percentile(&mut tight.held, 50)),
        ms(percentile(&mut tight.held, 99)),
        exits_per_s(&mut tight.speed)
    );
    print_breakdown(&mut tight.stages);
    if unprotected > 0 {
        println!("   ({unprotected} releases were unprotected)");
    }
    println!(
        "5. echo round trip, a line in to its answer out ({} lines, workload=echo):",
        echo::LINES
    );
    println!(
        "   protected  p50 {:>9.3} ms   p99 {:>9.3} ms",
        ms(percentile(&mut echo.protected, 50)),
        ms(percentile(&mut echo.protected, 99))
    );
    println!(
        "   baseline unprotected ftvm run: p50 {:>9.3} ms   p99 {:>9.3} ms",
        ms(percentile(&mut echo.unprotected, 50)),
        ms(percentile(&mut echo.unprotected, 99))
    );
    print_breakdown(&mut echo.stages);
    println!(
        "(total benchmark time {:.1} s)",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Figure 4's table: where the output delay goes, stage by stage.
fn print_breakdown(b: &mut Breakdown) {
    println!(
        "   breakdown over {} released epochs (p50 / p99 per stage; see benches/pair/breakdown.rs):",
        b.total.len()
    );
    b.print_table("     ");
}

/// Figure 4's second set of runs, with `--max-lag-ms` [`TIGHT_LAG_MS`].
#[derive(Default)]
struct Tight {
    held: Vec<Duration>,
    stages: Breakdown,
    speed: Vec<f64>,
}

/// The guest's speed over a set of runs: the median of each run's exits per second.
fn exits_per_s(runs: &mut [f64]) -> String {
    if runs.is_empty() {
        return "no runs".into();
    }
    let n = runs.len();
    format!(
        "{:.0} exits/s, median of {n} runs",
        common::median_f64(runs)
    )
}

/// Runs the process on CPU `cpu` only, where the host has more than one: the bench
/// puts primaries on CPU 0 and standbys on CPU 1, so that neither side's replay or
/// recording waits for the other's CPU (the targets are measured so).
fn pin(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return;
    }
    let cpu = cpu % cpus;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // sched_setaffinity, which is async-signal-safe, on a set built on its stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------
// Figure 1 and 4: log size, raw round trip, protected runs.

/// Log bytes per epoch of a recorded run.
struct PerEpoch {
    log_bytes: u64,
    epochs: u64,
    bytes_per_epoch: f64,
}

/// Records `workload=counter ticks=100` once and replays it: the log file size
/// divided by the replay's epoch count.
fn log_bytes_per_epoch(dir: &Path) -> Result<PerEpoch, Failure> {
    let log = dir.join("counter.log");
    let cmdline = format!("workload=counter ticks={PROTECTED_TICKS}");
    let mut cmd = ftvm();
    cmd.arg("run")
        .arg("--record")
        .arg(&log)
        .args(["--cmdline", &cmdline]);
    let what = format!("ftvm run --record {} --cmdline {cmdline:?}", log.display());
    let rec = output(cmd, &what, &dir.join("record.stderr"))?;
    let stdout = String::from_utf8_lossy(&rec.stdout);
    if !rec.status.success() {
        return Err(format!(
            "{what}: {}; stderr {:?}",
            rec.status,
            String::from_utf8_lossy(&rec.stderr)
        ));
    }
    check_counter(&stdout, PROTECTED_TICKS)
        .map_err(|e| format!("{what}: {e}; stdout {stdout:?}"))?;
    let log_bytes = std::fs::metadata(&log)
        .map_err(|e| format!("log {}: {e}", log.display()))?
        .len();

    let mut cmd = ftvm();
    cmd.arg("replay").arg(&log);
    let what = format!("ftvm replay {}", log.display());
    let rep = output(cmd, &what, &dir.join("replay.stderr"))?;
    let stderr = String::from_utf8_lossy(&rep.stderr);
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("epochs="))
        .ok_or_else(|| format!("{what}: no \"epochs=...\" summary line; stderr {stderr:?}"))?;
    let field = |key: &str| -> Result<u64, Failure> {
        line.split_whitespace()
            .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
            .ok_or_else(|| format!("{what}: summary line {line:?} has no {key}="))?
            .parse::<u64>()
            .map_err(|e| format!("{what}: summary line {line:?}: {key}: {e}"))
    };
    let epochs = field("epochs")?;
    if !rep.status.success()
        || field("diverged")? != 0
        || field("checkpoint_required")? != 0
        || epochs == 0
    {
        return Err(format!(
            "{what}: {}; replay not faithful: {line}",
            rep.status
        ));
    }
    std::fs::remove_file(&log).map_err(|e| format!("removing {}: {e}", log.display()))?;
    Ok(PerEpoch {
        log_bytes,
        epochs,
        bytes_per_epoch: log_bytes as f64 / epochs as f64,
    })
}

/// A connected loopback pair (client, server side).
fn loopback_pair() -> Result<(TcpStream, TcpStream), Failure> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let client = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let (server, _) = listener
        .accept()
        .map_err(|e| format!("accept on {addr}: {e}"))?;
    Ok((client, server))
}

/// Round trips of `size`-byte messages between two threads over loopback TCP.
fn ping_pong(size: usize) -> Result<Vec<Duration>, Failure> {
    let (mut client, mut server) = loopback_pair()?;
    for s in [&client, &server] {
        s.set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    }
    let rounds = PING_WARMUP + PING_PONGS;
    let echo = thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; size];
        for _ in 0..rounds {
            server
                .read_exact(&mut buf)
                .map_err(|e| format!("echo read: {e}"))?;
            server
                .write_all(&buf)
                .map_err(|e| format!("echo write: {e}"))?;
        }
        Ok(())
    });
    let msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(PING_PONGS);
    let mut result = Ok(());
    for i in 0..rounds {
        let start = Instant::now();
        if let Err(e) = client
            .write_all(&msg)
            .and_then(|()| client.read_exact(&mut back))
        {
            result = Err(format!("ping-pong {i}: {e}"));
            break;
        }
        let rtt = start.elapsed();
        if back != msg {
            result = Err(format!("ping-pong {i}: the echo differs from the message"));
            break;
        }
        if i >= PING_WARMUP {
            samples.push(rtt);
        }
    }
    drop(client);
    let echoed = echo
        .join()
        .map_err(|_| "ping-pong echo thread panicked".to_string())?;
    result?;
    echoed?;
    Ok(samples)
}

/// What the primary's audit file of one protected run shows.
struct PrimaryAudit {
    /// For each shipped epoch: shipped to the first Ack covering it.
    ack_latencies: Vec<Duration>,
    /// `held_ns` of each verified release.
    held: Vec<Duration>,
    /// Releases made unprotected.
    unprotected: usize,
    /// The guest's speed: exits per second between the first and the last shipped epoch.
    exits_per_s: f64,
}

/// One protected run of `workload=counter ticks=100` (the primary with
/// `--max-lag-ms` `lag_ms` where given): both processes must exit 0, the primary
/// print the expected output and the standby nothing; returns the primary's audit.
fn protected_run(
    dir: &Path,
    i: usize,
    stages: &mut Breakdown,
    lag_ms: Option<u64>,
) -> Result<PrimaryAudit, Failure> {
    let addr = try_free_addr()?;
    let cmdline = format!("workload=counter ticks={PROTECTED_TICKS}");
    let primary_audit = dir.join(format!("run{i}-primary.audit"));
    let standby_audit = dir.join(format!("run{i}-standby.audit"));

    let mut cmd = ftvm();
    cmd.env("FTVM_AUDIT", &standby_audit)
        .args(["standby", "--listen", &addr])
        .args(common::key_args(&[]));
    pin(&mut cmd, 1);
    let mut standby = Proc::spawn(
        cmd,
        format!("protected run {i}: ftvm standby --listen {addr}"),
        &dir.join(format!("run{i}-standby.stderr")),
    )?;
    let standby_out = capture(standby.take_stdout()?, None);

    let mut cmd = ftvm();
    cmd.env("FTVM_AUDIT", &primary_audit)
        .args(["run", "--peer", &addr, "--cmdline", &cmdline])
        .args(common::key_args(&[]));
    if let Some(ms) = lag_ms {
        cmd.args(["--max-lag-ms", &ms.to_string()]);
    }
    pin(&mut cmd, 0);
    let mut primary = Proc::spawn(
        cmd,
        format!("protected run {i}: ftvm run --peer {addr} --cmdline {cmdline:?}"),
        &dir.join(format!("run{i}-primary.stderr")),
    )?;
    let primary_out = capture(primary.take_stdout()?, None);

    let p_status = primary.wait(TIMEOUT)?;
    let s_status = standby.wait(TIMEOUT)?;
    let p_out = join(primary_out, &primary.what)?;
    let s_out = join(standby_out, &standby.what)?;
    let p_text = String::from_utf8_lossy(&p_out.bytes);
    if !p_status.success() {
        return Err(primary.failed(&p_status.to_string(), &p_out.bytes));
    }
    if let Err(e) = check_counter(&p_text, PROTECTED_TICKS) {
        return Err(primary.failed(&e, &p_out.bytes));
    }
    if !s_status.success() {
        return Err(standby.failed(&s_status.to_string(), &s_out.bytes));
    }
    if !s_out.bytes.is_empty() {
        return Err(standby.failed(
            "printed output although its primary completed",
            &s_out.bytes,
        ));
    }

    let text = read_text(&primary_audit)?;
    let audit = parse_primary_audit(&text, p_out.bytes.len() as u64).map_err(|e| {
        format!(
            "protected run {i}: primary audit {}: {e}",
            primary_audit.display()
        )
    })?;
    let standby_text = read_text(&standby_audit)?;
    stages
        .add_run(&text, &standby_text)
        .map_err(|e| format!("protected run {i}: latency breakdown: {e}"))?;
    let verified = standby_text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("verified"))
        .count();
    if verified != audit.ack_latencies.len() {
        return Err(format!(
            "protected run {i}: the primary shipped {} epochs but the standby verified {verified}",
            audit.ack_latencies.len()
        ));
    }
    Ok(audit)
}

/// Parses a primary audit file (see `replication/src/audit.rs`); `stdout_len`
/// is how many bytes the primary printed, all of which must have been released
/// in order.
fn parse_primary_audit(text: &str, stdout_len: u64) -> Result<PrimaryAudit, String> {
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut audit = PrimaryAudit {
        ack_latencies: Vec::new(),
        held: Vec::new(),
        unprotected: 0,
        exits_per_s: 0.0,
    };
    // (time, exit) of the first and the last shipped epoch.
    let mut first: Option<(u64, u64)> = None;
    let mut last: Option<(u64, u64)> = None;
    let mut released = 0u64;
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let (Some(t), Some(event)) = (tokens.next(), tokens.next()) else {
            return Err(format!("malformed line {line:?}"));
        };
        let t: u64 = t
            .parse()
            .map_err(|e| format!("line {line:?}: timestamp: {e}"))?;
        let rest: Vec<&str> = tokens.collect();
        let field = |key: &str| -> Result<&str, String> {
            rest.iter()
                .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
                .ok_or_else(|| format!("line {line:?} has no {key}="))
        };
        let number = |key: &str| -> Result<u64, String> {
            field(key)?
                .parse()
                .map_err(|e| format!("line {line:?}: {key}: {e}"))
        };
        match event {
            "shipped" => {
                pending.push((number("epoch")?, t));
                let exit = number("exit_seq")?;
                first.get_or_insert((t, exit));
                last = Some((t, exit));
            }
            "acked" => {
                let through = number("epoch")?;
                let mut err = None;
                pending.retain(|&(epoch, shipped)| {
                    if epoch > through {
                        return true;
                    }
                    match t.checked_sub(shipped) {
                        Some(d) => audit.ack_latencies.push(Duration::from_nanos(d)),
                        None => err = Some(format!("epoch {epoch} acked before it was shipped")),
                    }
                    false
                });
                if let Some(e) = err {
                    return Err(e);
                }
            }
            "release" => {
                let seq = field("seq")?;
                let (a, b) = seq
                    .split_once("..")
                    .ok_or_else(|| format!("line {line:?}: seq is not A..B"))?;
                let parse = |s: &str| {
                    s.parse::<u64>()
                        .map_err(|e| format!("line {line:?}: seq: {e}"))
                };
                let (a, b) = (parse(a)?, parse(b)?);
                if a != released || b < a {
                    return Err(format!(
                        "line {line:?}: release of {a}..{b} but {released} bytes were released before"
                    ));
                }
                released = b;
                if rest.contains(&"verified") {
                    audit.held.push(Duration::from_nanos(number("held_ns")?));
                } else if rest.contains(&"unprotected") {
                    audit.unprotected += 1;
                } else {
                    return Err(format!(
                        "line {line:?}: release neither verified nor unprotected"
                    ));
                }
            }
            _ => {}
        }
    }
    if let Some(&(epoch, _)) = pending.first() {
        return Err(format!(
            "{} shipped epochs were never acknowledged (the first: epoch {epoch})",
            pending.len()
        ));
    }
    if released != stdout_len {
        return Err(format!(
            "{released} bytes released but the primary printed {stdout_len}"
        ));
    }
    if let (Some((t0, e0)), Some((t1, e1))) = (first, last) {
        if t1 > t0 {
            audit.exits_per_s = e1.saturating_sub(e0) as f64 / ((t1 - t0) as f64 / 1e9);
        }
    }
    Ok(audit)
}

// ---------------------------------------------------------------------------
// Figure 2: throughput.

/// Bytes (and, for the log, frames and records) streamed in `elapsed`.
struct Stream {
    bytes: u64,
    frames: u64,
    records: u64,
    elapsed: Duration,
}

/// [`STREAM_BYTES`] written as [`RAW_CHUNK`]-byte buffers, read and discarded.
fn raw_throughput() -> Result<Stream, Failure> {
    let (mut client, mut server) = loopback_pair()?;
    let start = Instant::now();
    let reader = thread::spawn(move || -> Result<u64, String> {
        let mut buf = vec![0u8; RAW_CHUNK];
        let mut total = 0u64;
        loop {
            match server.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("raw TCP reader: {e}")),
            }
        }
    });
    let chunk = vec![0x5au8; RAW_CHUNK];
    let mut sent = 0u64;
    let mut result = Ok(());
    while sent < STREAM_BYTES {
        if let Err(e) = client.write_all(&chunk) {
            result = Err(format!("raw TCP writer: {e}"));
            break;
        }
        sent += RAW_CHUNK as u64;
    }
    drop(client);
    let received = reader
        .join()
        .map_err(|_| "raw TCP reader thread panicked".to_string())?;
    let elapsed = start.elapsed();
    result?;
    let received = received?;
    if received != sent {
        return Err(format!("raw TCP: sent {sent} bytes, received {received}"));
    }
    Ok(Stream {
        bytes: sent,
        frames: 0,
        records: 0,
        elapsed,
    })
}

/// [`STREAM_BYTES`] of framed record batches, encoded by the writer and
/// decoded and checked by the reader.
fn log_throughput() -> Result<Stream, Failure> {
    let (client, server) = loopback_pair()?;
    let start = Instant::now();
    let reader = thread::spawn(move || -> Result<(u64, u64), String> {
        let mut frames = FrameReader::new(BufReader::with_capacity(RAW_CHUNK, server), 0);
        let mut records = 0u64;
        let mut count = 0u64;
        loop {
            match frames.read_frame::<LogFrame>() {
                Ok(None) => return Ok((count, records)),
                Ok(Some((
                    _,
                    LogFrame {
                        body: Some(log_frame::Body::Batch(b)),
                    },
                ))) => {
                    // Read in place, as the standby's channel does: every slot checked.
                    let (first, n) = match first_and_count(&b.packed) {
                        Ok(v) => v,
                        Err(e) => return Err(format!("log reader: batch {count}: {e}")),
                    };
                    if n != BATCH_RECORDS
                        || first != Some(records)
                        || b.complete_through != records + BATCH_RECORDS as u64 - 1
                    {
                        return Err(format!(
                            "log reader: batch {count} at offset {} is not the one sent",
                            frames.offset()
                        ));
                    }
                    records += n as u64;
                    count += 1;
                }
                Ok(Some((offset, _))) => {
                    return Err(format!("log reader: frame at {offset} is not a batch"))
                }
                Err(e) => return Err(format!("log reader: {e}")),
            }
        }
    });

    let mut out = BufWriter::with_capacity(RAW_CHUNK, client);
    let mut batch = RecordBatch {
        complete_through: 0,
        records: (0..BATCH_RECORDS).map(|i| template(i as u64)).collect(),
        packed: Default::default(),
    };
    let mut frames = 0u64;
    let mut sent = 0u64;
    let mut exit_seq = 0u64;
    let mut result = Ok(());
    while sent < STREAM_BYTES {
        for r in &mut batch.records {
            r.exit_seq = exit_seq;
            if let Some(record::Kind::Inputs(inputs)) = &mut r.kind {
                inputs.clock_ns = Some(exit_seq * 10_000);
            }
            exit_seq += 1;
        }
        batch.complete_through = exit_seq - 1;
        // What the log's writers do: the records travel as one packed block.
        let msg = LogFrame {
            body: Some(log_frame::Body::Batch(RecordBatch {
                complete_through: batch.complete_through,
                records: Vec::new(),
                packed: packed::pack(&batch.records),
            })),
        };
        let bytes = frame::encode(&msg);
        if let Err(e) = out.write_all(&bytes) {
            result = Err(format!("log writer: {e}"));
            break;
        }
        sent += bytes.len() as u64;
        frames += 1;
    }
    if result.is_ok() {
        if let Err(e) = out.flush() {
            result = Err(format!("log writer: {e}"));
        }
    }
    drop(out);
    let received = reader
        .join()
        .map_err(|_| "log reader thread panicked".to_string())?;
    let elapsed = start.elapsed();
    result?;
    let (got_frames, records) = received?;
    if got_frames != frames || records != exit_seq {
        return Err(format!(
            "log: sent {frames} frames of {exit_seq} records, received {got_frames} frames of {records} records"
        ));
    }
    Ok(Stream {
        bytes: sent,
        frames,
        records,
        elapsed,
    })
}

/// The first exit sequence number of a packed block and its number of records, every slot
/// checked in one pass ([`packed::check`], as `ftvm bench`'s responder checks a batch).
fn first_and_count(block: &[u8]) -> Result<(Option<u64>, usize), packed::PackedError> {
    let n = packed::check(block, |_, _| Ok(()))?;
    let first = match packed::Slots::new(block)?.next().transpose()? {
        Some(packed::Slot::Fixed(f)) => Some(f.exit_seq),
        Some(escaped) => Some(escaped.to_record()?.exit_seq),
        None => None,
    };
    Ok((first, n as usize))
}

/// Record `i` of a batch: a mix of PIO reads, interrupts and input polls, like
/// the records of a timer-driven guest.
fn template(i: u64) -> Record {
    let kind = match i % 4 {
        0 | 1 => record::Kind::PioRead(PioRead {
            port: 0x40,
            size: 1,
            value: vec![7],
        }),
        2 => record::Kind::Interrupt(Interrupt { vector: 0x20 }),
        _ => record::Kind::Inputs(Inputs {
            halted: false,
            clock_ns: Some(0),
            serial: Vec::new(),
            net_rx: Vec::new(),
        }),
    };
    Record {
        exit_seq: 0,
        at_kick: false,
        kind: Some(kind),
    }
}

// ---------------------------------------------------------------------------
// Figure 3: failover drills and cold starts.

/// Spawn to first output byte of an unprotected `workload=counter ticks=1`.
fn cold_start(dir: &Path, i: usize) -> Result<Duration, Failure> {
    let cmdline = "workload=counter ticks=1";
    let mut cmd = ftvm();
    cmd.args(["run", "--cmdline", cmdline]);
    let start = Instant::now();
    let mut p = Proc::spawn(
        cmd,
        format!("cold start {i}: ftvm run --cmdline {cmdline:?}"),
        &dir.join(format!("cold{i}.stderr")),
    )?;
    let out = capture(p.take_stdout()?, None);
    let status = p.wait(TIMEOUT)?;
    let out = join(out, &p.what)?;
    if !status.success() {
        return Err(p.failed(&status.to_string(), &out.bytes));
    }
    if let Err(e) = check_counter(&String::from_utf8_lossy(&out.bytes), 1) {
        return Err(p.failed(&e, &out.bytes));
    }
    let first = out
        .first_byte
        .ok_or_else(|| p.failed("printed nothing", &out.bytes))?;
    Ok(first.saturating_duration_since(start))
}

/// One failover drill.
struct Drill {
    /// SIGKILL of the primary to the standby's first output byte.
    failover: Duration,
    /// Where that time went, from the standby's audit trail.
    steps: failover::Steps,
    /// Bytes the standby said it re-emits (the primary's unreleased output).
    reemitted: u64,
    /// Bytes the primary printed past where the standby's output starts.
    overlap: u64,
    /// The standby's replay had reached the guest's end before it went live.
    ended: bool,
}

/// Drill `i`, its primary with `--max-lag-ms` `lag_ms` where given.
fn drill(dir: &Path, i: usize, lag_ms: Option<u64>) -> Result<Drill, Failure> {
    let addr = try_free_addr()?;
    let cmdline = format!("workload=counter ticks={DRILL_TICKS}");
    let standby_stderr = dir.join(format!("drill{i}-standby.stderr"));
    let standby_audit = dir.join(format!("drill{i}-standby.audit"));

    let mut cmd = ftvm();
    cmd.args(["standby", "--listen", &addr])
        .args(common::key_args(&[]))
        .env("FTVM_AUDIT", &standby_audit);
    pin(&mut cmd, 1);
    let mut standby = Proc::spawn(
        cmd,
        format!("drill {i}: ftvm standby --listen {addr}"),
        &standby_stderr,
    )?;
    let standby_out = capture(standby.take_stdout()?, None);

    let mut cmd = ftvm();
    cmd.args(["run", "--peer", &addr, "--cmdline", &cmdline])
        .args(common::key_args(&[]));
    if let Some(ms) = lag_ms {
        cmd.args(["--max-lag-ms", &ms.to_string()]);
    }
    pin(&mut cmd, 0);
    let mut primary = Proc::spawn(
        cmd,
        format!("drill {i}: ftvm run --peer {addr} --cmdline {cmdline:?}"),
        &dir.join(format!("drill{i}-primary.stderr")),
    )?;
    let (tx, rx) = mpsc::channel();
    let primary_out = capture(primary.take_stdout()?, Some((KILL_AFTER_TICKS, tx)));

    match rx.recv_timeout(TIMEOUT) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!(
                "{}: fewer than {KILL_AFTER_TICKS} lines of output after {TIMEOUT:?}; stderr {:?}",
                primary.what,
                primary.stderr_text()
            ));
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let out = join(primary_out, &primary.what)?;
            return Err(primary.failed(
                &format!("output ended before {KILL_AFTER_TICKS} lines"),
                &out.bytes,
            ));
        }
    }
    primary
        .child
        .kill()
        .map_err(|e| format!("{}: cannot kill: {e}", primary.what))?;
    let killed = Instant::now();
    let killed_ns = failover::monotonic_ns();
    let p_out = join(primary_out, &primary.what)?;
    primary.wait(TIMEOUT)?;

    let s_status = standby.wait(TIMEOUT)?;
    let s_out = join(standby_out, &standby.what)?;
    if !s_status.success() {
        return Err(standby.failed(&s_status.to_string(), &s_out.bytes));
    }
    let stderr = standby.stderr_text();
    let reemit = parse_reemit(&stderr).ok_or_else(|| {
        standby.failed(
            "no \"re-emitting output from sequence S (N bytes)\" or \"emitting the N output bytes from sequence S\" line on stderr",
            &s_out.bytes,
        )
    })?;
    let first = s_out
        .first_byte
        .ok_or_else(|| standby.failed("went live but printed nothing", &s_out.bytes))?;
    if let Err(e) = check_continuity(&p_out.bytes, &s_out.bytes, reemit.from) {
        return Err(format!(
            "drill {i}: output not continuous: {e}; primary stdout {:?}; standby stdout {:?}; standby stderr {stderr:?}",
            String::from_utf8_lossy(&p_out.bytes),
            String::from_utf8_lossy(&s_out.bytes)
        ));
    }
    let first_ns = killed_ns + first.saturating_duration_since(killed).as_nanos() as u64;
    let steps = failover::steps(&read_text(&standby_audit)?, killed_ns, first_ns)
        .map_err(|e| format!("drill {i}: {e}"))?;
    Ok(Drill {
        failover: first.saturating_duration_since(killed),
        steps,
        reemitted: reemit.bytes,
        overlap: (p_out.bytes.len() as u64).saturating_sub(reemit.from),
        ended: reemit.ended,
    })
}

/// Where the standby's output starts and how many bytes it re-emits, from
/// its stderr: `re-emitting output from sequence S (N bytes)` when it went live
/// mid-run, or `the guest had ended; emitting the N output bytes from sequence
/// S the primary did not release` when its replay had already reached the
/// guest's end (then `ended` is true).
fn parse_reemit(stderr: &str) -> Option<Reemit> {
    const LIVE: &str = "re-emitting output from sequence ";
    const ENDED: &str = "the guest had ended; emitting the ";
    if let Some(at) = stderr.find(LIVE) {
        let (from, rest) = stderr[at + LIVE.len()..].split_once(' ')?;
        let bytes = rest.strip_prefix('(')?.split_once(' ')?.0;
        return Some(Reemit {
            from: from.parse().ok()?,
            bytes: bytes.parse().ok()?,
            ended: false,
        });
    }
    let at = stderr.find(ENDED)?;
    let (bytes, rest) = stderr[at + ENDED.len()..].split_once(' ')?;
    let from = rest
        .strip_prefix("output bytes from sequence ")?
        .split_once(' ')?
        .0;
    Some(Reemit {
        from: from.parse().ok()?,
        bytes: bytes.parse().ok()?,
        ended: true,
    })
}

/// The standby's account of the output it emits on going live.
struct Reemit {
    /// Offset in the guest's output where the standby's output starts.
    from: u64,
    /// Bytes it emits at once (the primary's unreleased output).
    bytes: u64,
    /// Its replay had already reached the guest's end.
    ended: bool,
}

/// The primary's output up to byte `from`, then the standby's, must be one
/// complete counter run; what the primary printed past `from` must be what the
/// standby's output starts with.
fn check_continuity(primary: &[u8], standby: &[u8], from: u64) -> Result<(), String> {
    let from = usize::try_from(from).map_err(|e| format!("sequence {from}: {e}"))?;
    let Some(overlap) = primary.get(from..) else {
        return Err(format!(
            "the standby's output starts at byte {from} but the primary printed only {} bytes: output lost",
            primary.len()
        ));
    };
    if !standby.starts_with(overlap) {
        return Err(format!(
            "the primary's bytes from {from} on ({} bytes) are not the start of the standby's output",
            overlap.len()
        ));
    }
    let mut all = primary[..from].to_vec();
    all.extend_from_slice(standby);
    check_counter(&String::from_utf8_lossy(&all), DRILL_TICKS)
}

// ---------------------------------------------------------------------------
// Processes.

/// A child process, killed and reaped when dropped (so that a failure leaves
/// nothing running); its stderr goes to a file.
struct Proc {
    child: Child,
    what: String,
    stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout piped and stderr into `stderr`.
    fn spawn(mut cmd: Command, what: String, stderr: &Path) -> Result<Self, Failure> {
        let file =
            File::create(stderr).map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("{what}: cannot run {FTVM}: {e}"))?;
        Ok(Proc {
            child,
            what,
            stderr: stderr.to_path_buf(),
        })
    }

    fn take_stdout(&mut self) -> Result<ChildStdout, Failure> {
        self.child
            .stdout
            .take()
            .ok_or_else(|| format!("{}: no stdout pipe", self.what))
    }

    /// Waits up to `limit` for the process to exit; kills it after that.
    fn wait(&mut self, limit: Duration) -> Result<ExitStatus, Failure> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                Ok(None) => {
                    // Killed by Drop too; kill now so that the stderr read below is complete.
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{}: still running after {limit:?}; stderr {:?}",
                        self.what,
                        self.stderr_text()
                    ));
                }
                Err(e) => return Err(format!("{}: wait: {e}", self.what)),
            }
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.stderr.display()))
    }

    /// A failure of this process: `problem`, its stdout and its stderr.
    fn failed(&self, problem: &str, stdout: &[u8]) -> Failure {
        format!(
            "{}: {problem}; stdout {:?}; stderr {:?}",
            self.what,
            String::from_utf8_lossy(stdout),
            self.stderr_text()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Both are no-ops on a process already reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's stdout, read to its end by a thread.
struct Captured {
    bytes: Vec<u8>,
    /// When the first byte arrived.
    first_byte: Option<Instant>,
}

/// Reads `stdout` to its end on a thread, noting when the first byte arrives;
/// with `notify = Some((n, tx))`, sends on `tx` once `n` lines have arrived.
fn capture(
    mut stdout: ChildStdout,
    notify: Option<(usize, mpsc::Sender<()>)>,
) -> JoinHandle<Result<Captured, String>> {
    thread::spawn(move || {
        let mut notify = notify;
        let mut out = Captured {
            bytes: Vec::new(),
            first_byte: None,
        };
        let mut buf = vec![0u8; 64 << 10];
        let mut lines = 0;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => {
                    out.first_byte.get_or_insert_with(Instant::now);
                    out.bytes.extend_from_slice(&buf[..n]);
                    if let Some((want, tx)) = &notify {
                        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
                        if lines >= *want {
                            // The receiver may have given up (timeout); nothing to do then.
                            let _ = tx.send(());
                            notify = None;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading stdout: {e}")),
            }
        }
    })
}

fn join(h: JoinHandle<Result<Captured, String>>, what: &str) -> Result<Captured, Failure> {
    h.join()
        .map_err(|_| format!("{what}: stdout reader panicked"))?
        .map_err(|e| format!("{what}: {e}"))
}

/// Runs `cmd` to completion (with a timeout), capturing stdout, and stderr
/// through the file `stderr_path`.
fn output(cmd: Command, what: &str, stderr_path: &Path) -> Result<std::process::Output, Failure> {
    let mut p = Proc::spawn(cmd, what.to_string(), stderr_path)?;
    let out = capture(p.take_stdout()?, None);
    let status = p.wait(TIMEOUT);
    let stderr = p.stderr_text();
    let status = status?;
    let out = join(out, what)?;
    Ok(std::process::Output {
        status,
        stdout: out.bytes,
        stderr: stderr.into_bytes(),
    })
}

/// `ftvm` with stdin closed (the guests read no input) and only warnings
/// logged (so that logging cannot skew timings).
fn ftvm() -> Command {
    let mut cmd = Command::new(FTVM);
    cmd.env("FTVM_LOG", "warn")
        .env_remove("FTVM_AUDIT")
        .stdin(Stdio::null());
    cmd
}

fn read_text(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}
