//! What logging disk reads costs (DESIGN.md §2: every read is logged as disk, sector, length
//! and a BLAKE3 hash of the data; the replayer hashes its own read and compares).
//!
//! Prints (never asserts on), from one run of this binary:
//!
//! 1. the built-in guest's disk read rate (`workload=diskread sum=0`: 64 KiB requests over a
//!    64 MiB image in the host's page cache) unprotected (no hashing), recorded (`--record`:
//!    each read hashed and logged) and replayed (`ftvm replay`: each read hashed and
//!    checked);
//! 2. next to them, on this machine, BLAKE3 over 64 KiB buffers (the hash the device
//!    computes) and `pread` of the same image in 64 KiB reads (the device's own copy);
//! 3. the log bytes per MiB read.
//!
//! The guest rates come from two runs each, of 1 and of [`PASSES`] passes over the disk:
//! the difference in wall time is the time of `PASSES - 1` passes, without the VM's start
//! and end. Each figure is the median of [`REPEATS`] such pairs, interleaved.

use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{median_f64, Failure, Scratch, FTVM};

/// Size of the disk image.
const DISK_MIB: usize = 64;
/// Passes of the long runs.
const PASSES: u64 = 11;
/// Repetitions (medians are reported).
const REPEATS: usize = 3;
/// The guest's request size.
const REQUEST: usize = 64 << 10;

fn main() -> ExitCode {
    common::exit_code("disk_reads", run())
}

/// Runs `ftvm` with `args` and the diskread workload of `passes` passes; its wall time.
fn timed(args: &[&str], passes: u64) -> Result<Duration, Failure> {
    let cmdline = format!("workload=diskread sum=0 n={passes}");
    let start = Instant::now();
    let o = Command::new(FTVM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ftvm: {e}"))?;
    let wall = start.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() || (args[0] == "run" && !out.contains("diskread done")) {
        return Err(format!("ftvm {args:?} ({cmdline}) failed: {out}{err}"));
    }
    if args[0] == "replay" && !err.contains("diverged=0 checkpoint_required=0") {
        return Err(format!("the replay of {args:?} was not clean: {err}"));
    }
    Ok(wall)
}

/// MiB/s of the `PASSES - 1` passes between a run of 1 pass and one of `PASSES`.
fn rate(short: Duration, long: Duration) -> f64 {
    let mib = ((PASSES - 1) as usize * DISK_MIB) as f64;
    mib / long.saturating_sub(short).as_secs_f64().max(1e-9)
}

fn run() -> Result<(), Failure> {
    common::print_banner("disk reads");
    let dir = Scratch::try_new("bench-disk-reads")?;
    let image = dir.path_str("disk.img");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..DISK_MIB << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&image, &data).map_err(|e| format!("write {image}: {e}"))?;

    let (mut live, mut record, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    let mut log_bytes_per_mib = Vec::new();
    for _ in 0..REPEATS {
        let mut walls = [[Duration::ZERO; 2]; 3];
        for (i, passes) in [1, PASSES].into_iter().enumerate() {
            let cmdline = format!("workload=diskread sum=0 n={passes}");
            let log = dir.path_str(&format!("reads-{passes}.log"));
            let run = ["run", "--disk", &image, "--cmdline", &cmdline];
            walls[0][i] = timed(&run, passes)?;
            let rec = [
                "run",
                "--record",
                &log,
                "--disk",
                &image,
                "--cmdline",
                &cmdline,
            ];
            walls[1][i] = timed(&rec, passes)?;
            walls[2][i] = timed(&["replay", &log, "--disk", &image], passes)?;
            if passes == PASSES {
                let bytes = std::fs::metadata(&log)
                    .map_err(|e| format!("{log}: {e}"))?
                    .len();
                log_bytes_per_mib.push(bytes as f64 / (PASSES as usize * DISK_MIB) as f64);
            }
        }
        live.push(rate(walls[0][0], walls[0][1]));
        record.push(rate(walls[1][0], walls[1][1]));
        replay.push(rate(walls[2][0], walls[2][1]));
    }

    // The host side of each request: pread 64 KiB of the image, and BLAKE3 over it.
    let file = std::fs::File::open(&image).map_err(|e| format!("{image}: {e}"))?;
    let mut buf = vec![0u8; REQUEST];
    let (mut pread, mut hash) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let start = Instant::now();
        for off in (0..data.len()).step_by(REQUEST) {
            file.read_exact_at(&mut buf, off as u64)
                .map_err(|e| format!("pread {image}: {e}"))?;
        }
        pread.push(DISK_MIB as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let mut acc = 0u8;
        for chunk in data.chunks(REQUEST) {
            acc ^= ftvm_vmm::digest::hash(chunk)[0];
        }
        std::hint::black_box(acc);
        hash.push(DISK_MIB as f64 / start.elapsed().as_secs_f64());
    }

    println!(
        "guest disk reads, {DISK_MIB} MiB image, 64 KiB requests (median of {REPEATS}, MiB/s):"
    );
    println!(
        "  unprotected (no hashing)        {:>8.0}",
        median_f64(&mut live)
    );
    println!(
        "  recorded (hash + DiskRead)      {:>8.0}",
        median_f64(&mut record)
    );
    println!(
        "  replayed (hash + check)         {:>8.0}",
        median_f64(&mut replay)
    );
    println!("this machine, one thread (MiB/s):");
    println!(
        "  pread of the image, 64 KiB      {:>8.0}",
        median_f64(&mut pread)
    );
    println!(
        "  BLAKE3 over 64 KiB buffers      {:>8.0}",
        median_f64(&mut hash)
    );
    println!(
        "log bytes per MiB read (recorded): {:.0} (one DiskRead per 64 KiB request)",
        median_f64(&mut log_bytes_per_mib)
    );
    Ok(())
}
