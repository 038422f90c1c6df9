//! End-to-end benchmark of the `ftvm` binary on the built-in test guest.
//!
//! Prints (never asserts on) two figures, each next to a host baseline measured
//! in the same run:
//!
//! 1. PIO exits per second (`workload=pio`), next to host syscalls per second.
//! 2. Time from spawn to the first output line (`workload=counter ticks=1`),
//!    next to spawning and waiting for `/bin/true`.
//!
//! A run that exits non-zero or prints something unexpected is a correctness
//! failure: it is reported on stderr and the benchmark exits non-zero.
//!
//! `FTVM_BENCH_PIO_COUNT` overrides the number of port writes of the long PIO
//! run (default 200000).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

// The helpers the tests use too (tests/common/mod.rs says why they live there).
#[path = "../tests/common/mod.rs"]
mod common;
use common::{median, ms, Failure, FTVM};

/// Default number of `outb(0x80)` exits of the long PIO run.
const DEFAULT_PIO_COUNT: u64 = 200_000;
/// Number of exits of the short PIO run, which measures boot + teardown.
const PIO_FIXED_COUNT: u64 = 1_000;
/// Repetitions of each PIO run (the median is reported).
const PIO_REPEATS: usize = 3;
/// Iterations of the host syscall baseline loop.
const SYSCALL_ITERS: u32 = 1_000_000;
/// Runs of the first-output-line measurement and of its baseline.
const FIRST_LINE_RUNS: usize = 10;

fn main() -> ExitCode {
    common::exit_code("vmm", run())
}

fn run() -> Result<(), Failure> {
    let pio_count = pio_count()?;
    common::print_banner("vmm");

    bench_pio(pio_count)?;
    bench_first_line()?;
    Ok(())
}

/// The long PIO run's count: `FTVM_BENCH_PIO_COUNT` or the default.
fn pio_count() -> Result<u64, Failure> {
    match std::env::var("FTVM_BENCH_PIO_COUNT") {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(n) if n > PIO_FIXED_COUNT => Ok(n),
            _ => Err(format!(
                "FTVM_BENCH_PIO_COUNT={s:?}: expected an integer greater than {PIO_FIXED_COUNT}"
            )),
        },
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_PIO_COUNT),
        Err(e) => Err(format!("FTVM_BENCH_PIO_COUNT: {e}")),
    }
}

/// Figure 1: PIO exits per second, next to host syscalls per second.
fn bench_pio(count: u64) -> Result<(), Failure> {
    let mut fixed = Vec::with_capacity(PIO_REPEATS);
    let mut long = Vec::with_capacity(PIO_REPEATS);
    // Interleave the short and long runs so that drift affects both alike.
    for _ in 0..PIO_REPEATS {
        fixed.push(run_pio(PIO_FIXED_COUNT)?);
        long.push(run_pio(count)?);
    }
    let t_fixed = median(&mut fixed);
    let t_long = median(&mut long);
    let exits = (count - PIO_FIXED_COUNT) as f64;
    let delta = t_long.saturating_sub(t_fixed).as_secs_f64();

    let syscalls_per_s = host_syscalls_per_s();
    let syscall_line = format!(
        "baseline host syscalls/s: {:.0} ({:.2} us/syscall)",
        syscalls_per_s,
        1e6 / syscalls_per_s
    );
    if delta > 0.0 {
        let exits_per_s = exits / delta;
        println!(
            "pio exits/s: {:.0} ({:.2} us/exit)   {syscall_line}",
            exits_per_s,
            1e6 / exits_per_s
        );
    } else {
        println!("pio exits/s: n/a (count={count} not slower than count={PIO_FIXED_COUNT})   {syscall_line}");
    }
    println!(
        "  (median of {PIO_REPEATS}: count={count} {:.1} ms, count={PIO_FIXED_COUNT} {:.1} ms = boot + teardown)",
        ms(t_long),
        ms(t_fixed)
    );
    Ok(())
}

/// Runs `workload=pio count=N` to completion and returns its wall time.
fn run_pio(count: u64) -> Result<Duration, Failure> {
    let cmdline = format!("workload=pio count={count}");
    let start = Instant::now();
    let output = ftvm_command(&cmdline)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {FTVM}: {e}"))?;
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = format!("pio done count={count}");
    if !output.status.success() || stdout.trim_end() != expected {
        return Err(format!(
            "ftvm run --cmdline {cmdline:?}: {}; expected stdout {expected:?}, got {:?}; stderr {:?}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(elapsed)
}

/// Host syscalls per second: a tight loop of `getppid`.
fn host_syscalls_per_s() -> f64 {
    let start = Instant::now();
    for _ in 0..SYSCALL_ITERS {
        // SAFETY: getppid takes no arguments, touches no memory and cannot fail.
        let ppid = unsafe { libc::getppid() };
        std::hint::black_box(ppid);
    }
    f64::from(SYSCALL_ITERS) / start.elapsed().as_secs_f64()
}

/// Figure 2: time from spawn to the first stdout line, next to spawning `/bin/true`.
fn bench_first_line() -> Result<(), Failure> {
    let mut firsts = Vec::with_capacity(FIRST_LINE_RUNS);
    for _ in 0..FIRST_LINE_RUNS {
        firsts.push(first_line_once()?);
    }
    let max = firsts.iter().copied().max().unwrap_or_default();
    let p50 = median(&mut firsts);

    let mut trues = Vec::with_capacity(FIRST_LINE_RUNS);
    for _ in 0..FIRST_LINE_RUNS {
        let start = Instant::now();
        let status = Command::new("/bin/true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run /bin/true: {e}"))?;
        trues.push(start.elapsed());
        if !status.success() {
            return Err(format!("/bin/true: {status}"));
        }
    }
    let true_p50 = median(&mut trues);

    println!(
        "first output line: p50 {:.1} ms max {:.1} ms   baseline spawn+exit of /bin/true: p50 {:.1} ms",
        ms(p50),
        ms(max),
        ms(true_p50)
    );
    Ok(())
}

/// Spawns `workload=counter ticks=1`, returns the time until its first stdout
/// line, then checks the rest of the run.
fn first_line_once() -> Result<Duration, Failure> {
    let cmdline = "workload=counter ticks=1";
    let start = Instant::now();
    // stderr is inherited (not piped) so that it can never fill up and block the child.
    let mut child = ftvm_command(cmdline)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {FTVM}: {e}"))?;
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut first = String::new();
    let read = stdout.read_line(&mut first);
    let elapsed = start.elapsed();

    // Drain the rest of stdout before waiting, so the child never blocks on the pipe.
    let mut rest = String::new();
    let rest_read = stdout.read_to_string(&mut rest);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {FTVM}: {e}"))?;

    let fail = |what: String| {
        Err(format!(
            "ftvm run --cmdline {cmdline:?}: {what}; {status}; stdout {:?}",
            format!("{first}{rest}")
        ))
    };
    if let Err(e) = read.and(rest_read) {
        return fail(format!("reading stdout: {e}"));
    }
    if !first.ends_with('\n') || !first.starts_with("tick 1 ") {
        return fail("first line does not start with \"tick 1\"".to_string());
    }
    if !rest.starts_with("done sum=") {
        return fail("no \"done sum=\" line after \"tick 1\"".to_string());
    }
    if !status.success() {
        return fail("non-zero exit".to_string());
    }
    Ok(elapsed)
}

/// `ftvm run --cmdline CMDLINE` with stdin closed (the guest reads no input).
fn ftvm_command(cmdline: &str) -> Command {
    let mut cmd = Command::new(FTVM);
    cmd.args(["run", "--cmdline", cmdline]).stdin(Stdio::null());
    cmd
}
