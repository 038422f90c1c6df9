//! End-to-end benchmark of recording (`ftvm run --record`) and replaying
//! (`ftvm replay`) the built-in test guest.
//!
//! Prints (never asserts on) four figures, each next to a baseline measured in
//! the same run, for an exit-heavy workload (`workload=pio count=100000`) and a
//! timer-driven one (`workload=counter ticks=100`):
//!
//! 1. Record overhead on an exit-heavy guest: recorded wall time / live wall time.
//! 2. Record overhead on a guest paced by its 100 Hz timer (expected ~1x).
//! 3. Log bytes and epochs per second of guest time (the recorded run's wall
//!    time), next to the guest's serial output bytes per second.
//! 4. Replay wall time relative to the recorded run's wall time.
//!
//! Every figure is the median of [`REPEATS`] runs; live, recorded and replayed
//! runs are interleaved so that drift affects them alike.
//!
//! A run that exits non-zero or prints something unexpected, a replay whose
//! summary reports a divergence or a required checkpoint, or a replayed output
//! that differs from the recorded one is a correctness failure: it is reported
//! on stderr and the benchmark exits non-zero.

use std::path::Path;
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

// The helpers the tests use too (tests/common/mod.rs says why they live there).
#[path = "../tests/common/mod.rs"]
mod common;
use common::{check_counter, median, median_f64, ms, Failure, ReplaySummary, Scratch, FTVM};

/// Repetitions of each run (the median is reported).
const REPEATS: usize = 3;
/// Number of `outb(0x80)` exits of the exit-heavy workload.
const PIO_COUNT: u64 = 100_000;
/// Timer ticks (at 100 Hz) of the timer-driven workload.
const COUNTER_TICKS: u64 = 100;

/// A guest workload and how to check its output.
struct Workload {
    /// Short name used in the printed figures.
    name: &'static str,
    /// The guest command line.
    cmdline: String,
    /// Checks the guest's serial output of a live or recorded run.
    check: fn(&str) -> Result<(), String>,
}

/// The medians of one workload's live, recorded and replayed runs.
struct Figures {
    live: Duration,
    record: Duration,
    replay: Duration,
    /// Log file size in bytes.
    log_bytes: u64,
    /// Log bytes per second of recorded wall time.
    log_bytes_per_s: f64,
    /// Epochs (from the replay summary) per second of recorded wall time.
    epochs_per_s: f64,
    /// Epochs reported by the replay summary.
    epochs: u64,
    /// Serial output bytes of the recorded run.
    output_bytes: u64,
    /// Serial output bytes per second of recorded wall time.
    output_bytes_per_s: f64,
}

fn main() -> ExitCode {
    common::exit_code("record_replay", run())
}

fn run() -> Result<(), Failure> {
    common::print_banner("record/replay");

    let dir = Scratch::try_new("bench-record-replay")?;
    let pio = Workload {
        name: "pio",
        cmdline: format!("workload=pio count={PIO_COUNT}"),
        check: check_pio,
    };
    let counter = Workload {
        name: "counter",
        cmdline: format!("workload=counter ticks={COUNTER_TICKS}"),
        check: |stdout| check_counter(stdout, COUNTER_TICKS),
    };
    let p = measure(&pio, &dir.0)?;
    let c = measure(&counter, &dir.0)?;

    println!();
    println!("1. record overhead, exit-heavy ({}):", pio.cmdline);
    print_overhead(&p);
    println!(
        "2. record overhead, timer-driven ({}; paced by the guest timer, expect ~1x):",
        counter.cmdline
    );
    print_overhead(&c);

    println!("3. log volume per second of guest time (recorded wall time):");
    for (w, f) in [(&pio, &p), (&counter, &c)] {
        println!(
            "   {:<8} log {:>9.1} KiB/s ({} B), {:>7.1} epochs/s ({} epochs)   baseline serial output: {:.1} B/s ({} B), log/output {}",
            w.name,
            f.log_bytes_per_s / 1024.0,
            f.log_bytes,
            f.epochs_per_s,
            f.epochs,
            f.output_bytes_per_s,
            f.output_bytes,
            if f.output_bytes_per_s > 0.0 {
                format!("{:.0}x", f.log_bytes_per_s / f.output_bytes_per_s)
            } else {
                "n/a".to_string()
            }
        );
    }

    println!("4. replay speed relative to the recorded run (replay does not wait for timers):");
    for (w, f) in [(&pio, &p), (&counter, &c)] {
        println!(
            "   {:<8} replay {:>7.1} ms   baseline recorded {:>7.1} ms   ratio {:.3}x",
            w.name,
            ms(f.replay),
            ms(f.record),
            ratio(f.replay, f.record)
        );
    }
    println!(
        "   (every replay: diverged=0 checkpoint_required=0, output identical to the recording)"
    );
    println!("(medians of {REPEATS} runs each)");
    Ok(())
}

fn print_overhead(f: &Figures) {
    println!(
        "   recorded {:>7.1} ms   baseline live {:>7.1} ms   ratio {:.3}x",
        ms(f.record),
        ms(f.live),
        ratio(f.record, f.live)
    );
}

/// Runs `w` live, recorded and replayed [`REPEATS`] times (interleaved) and
/// returns the medians.
fn measure(w: &Workload, dir: &Path) -> Result<Figures, Failure> {
    let mut live = Vec::with_capacity(REPEATS);
    let mut record = Vec::with_capacity(REPEATS);
    let mut replay = Vec::with_capacity(REPEATS);
    let mut log_bytes = Vec::with_capacity(REPEATS);
    let mut log_rate = Vec::with_capacity(REPEATS);
    let mut epochs = Vec::with_capacity(REPEATS);
    let mut epoch_rate = Vec::with_capacity(REPEATS);
    let mut out_bytes = Vec::with_capacity(REPEATS);
    let mut out_rate = Vec::with_capacity(REPEATS);

    for i in 0..REPEATS {
        let log = dir.join(format!("{}-{i}.log", w.name));

        // Live run.
        let (t_live, _) = run_guest(w, None)?;
        live.push(t_live);

        // Recorded run.
        let (t_rec, rec_out) = run_guest(w, Some(&log))?;
        record.push(t_rec);
        let size = std::fs::metadata(&log)
            .map_err(|e| format!("log {}: {e}", log.display()))?
            .len();
        let secs = t_rec.as_secs_f64();
        log_bytes.push(size);
        log_rate.push(size as f64 / secs);
        out_bytes.push(rec_out.stdout.len() as u64);
        out_rate.push(rec_out.stdout.len() as f64 / secs);

        // Replay of that log.
        let (t_replay, summary) = run_replay(&log, &rec_out.stdout)?;
        replay.push(t_replay);
        epochs.push(summary.epochs);
        epoch_rate.push(summary.epochs as f64 / secs);

        // Keep the temp dir small.
        std::fs::remove_file(&log).map_err(|e| format!("removing {}: {e}", log.display()))?;
    }

    Ok(Figures {
        live: median(&mut live),
        record: median(&mut record),
        replay: median(&mut replay),
        log_bytes: median(&mut log_bytes),
        log_bytes_per_s: median_f64(&mut log_rate),
        epochs_per_s: median_f64(&mut epoch_rate),
        epochs: median(&mut epochs),
        output_bytes: median(&mut out_bytes),
        output_bytes_per_s: median_f64(&mut out_rate),
    })
}

/// Runs `ftvm run` (with `--record LOG` when given) to completion, checks its
/// status and output, and returns its wall time and output.
fn run_guest(w: &Workload, log: Option<&Path>) -> Result<(Duration, Output), Failure> {
    let mut cmd = ftvm();
    cmd.arg("run");
    if let Some(log) = log {
        cmd.arg("--record").arg(log);
    }
    cmd.args(["--cmdline", &w.cmdline]);
    let what = match log {
        Some(log) => format!(
            "ftvm run --record {} --cmdline {:?}",
            log.display(),
            w.cmdline
        ),
        None => format!("ftvm run --cmdline {:?}", w.cmdline),
    };

    let start = Instant::now();
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {FTVM}: {e}"))?;
    let elapsed = start.elapsed();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let problem = if !output.status.success() {
        Some(format!("{}", output.status))
    } else {
        (w.check)(&stdout).err()
    };
    if let Some(problem) = problem {
        return Err(format!(
            "{what}: {problem}; stdout {:?}; stderr {:?}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok((elapsed, output))
}

/// Runs `ftvm replay --show-output LOG`, checks that it exits 0, that its
/// summary reports no divergence and no required checkpoint, and that the
/// replayed output equals `recorded`; returns its wall time and summary.
fn run_replay(log: &Path, recorded: &[u8]) -> Result<(Duration, ReplaySummary), Failure> {
    let what = format!("ftvm replay --show-output {}", log.display());
    let start = Instant::now();
    let output = ftvm()
        .args(["replay", "--show-output"])
        .arg(log)
        .output()
        .map_err(|e| format!("cannot run {FTVM}: {e}"))?;
    let elapsed = start.elapsed();

    let stderr = String::from_utf8_lossy(&output.stderr);
    let fail = |problem: String| {
        Err(format!(
            "{what}: {problem}; {}; stderr {:?}",
            output.status, stderr
        ))
    };
    let summary = match ReplaySummary::find(&stderr) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if summary.diverged != 0 || summary.checkpoint_required != 0 {
        return fail(format!("replay not faithful: {}", summary.line));
    }
    if summary.epochs == 0 {
        return fail(format!("no epochs replayed: {}", summary.line));
    }
    if !output.status.success() {
        return fail("non-zero exit".to_string());
    }
    if output.stdout != recorded {
        return fail(format!(
            "replayed output {:?} differs from the recorded output {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(recorded)
        ));
    }
    Ok((elapsed, summary))
}

/// `workload=pio`: exactly `pio done count=N`.
fn check_pio(stdout: &str) -> Result<(), String> {
    let expected = format!("pio done count={PIO_COUNT}\n");
    if stdout == expected {
        Ok(())
    } else {
        Err(format!("expected stdout {expected:?}"))
    }
}

/// `ftvm` with stdin closed (the guests read no input), stdout and stderr
/// captured, and only warnings logged (so that logging cannot skew timings).
fn ftvm() -> Command {
    let mut cmd = Command::new(FTVM);
    cmd.env("FTVM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
