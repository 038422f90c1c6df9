//! Checkpoint benchmarks (DESIGN.md §4), for a 256 MiB and a 1 GiB guest, protected pairs on
//! loopback, figures and baselines measured in the same run:
//!
//! 1. Repairs: `workload=rdtsc` diverges in (nearly) every epoch and each divergence is
//!    repaired. Printed: page bytes a repair sent, next to the bytes a Remus-style
//!    checkpoint would send for the same stretch (every page either side dirtied since the
//!    last verified boundary, i.e. the pages the repair covered), and how long the primary's
//!    vCPU was stopped per repair.
//! 2. Sync: a primary started alone with `fill=32` (32 MiB of non-zero pages) and a standby
//!    that joins. Printed: pre-copy throughput of the pages sent, next to raw loopback TCP
//!    throughput; how long the pre-copy took to cover all of guest memory (zero pages are
//!    read, not sent); and the stop-and-copy pause.
//! 3. Disk resync (issue 13): a 256 MiB disk whose standby copy differs in every block (all
//!    of it crosses), and one whose copy is identical (only the block hashes cross). Printed:
//!    the throughput of the blocks sent next to raw loopback TCP, and how fast the pair
//!    compares an identical disk.
//!
//! `cargo bench --bench checkpoint [-- resync]` (`resync`: figure 3 only). Both VMs share this machine's cores: see README.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

// The helpers the tests use too (tests/common/mod.rs says why they live there).
#[path = "../tests/common/mod.rs"]
mod common;
use common::{exit_code, mib_per_s, ms, try_free_addr, Failure, FTVM};

const RAW_BYTES: u64 = 512 << 20;
const FILL_MIB: u64 = 32;
const LIMIT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    exit_code("checkpoint", run())
}

fn run() -> Result<(), Failure> {
    let (raw_bytes, raw_time) = raw_tcp()?;
    let raw = mib_per_s(raw_bytes, raw_time);
    println!("checkpoint benchmark (both VMs on this machine)");
    println!(
        "baseline: raw loopback TCP {raw:.0} MiB/s ({} MiB)",
        raw_bytes >> 20
    );
    // `cargo bench` passes --bench; a word after `--` chooses a part.
    let only_resync = std::env::args().skip(1).any(|a| a == "resync");
    for mem in [256u64, 1024].into_iter().filter(|_| !only_resync) {
        let repairs = repair_run(mem)?;
        let sync = sync_run(mem)?;
        print_figures(mem, &repairs, &sync, raw);
    }
    println!();
    println!("disk resync, a {RESYNC_MIB} MiB disk (the built-in guest, 256 MiB of memory)");
    for differ in [true, false] {
        let r = resync_run(differ)?;
        let what = if differ {
            "copy differs in every block"
        } else {
            "copy identical            "
        };
        println!(
            "  3. {what}: {} blocks differed, {:.1} MiB of blocks sent in {:.0} ms: {:.0} MiB/s of blocks, {:.0} MiB/s of disk compared (raw TCP {raw:.0} MiB/s)",
            r.differed,
            r.bytes as f64 / f64::from(1 << 20),
            ms(r.elapsed),
            mib_per_s(r.bytes, r.elapsed),
            mib_per_s(r.disk_bytes, r.elapsed),
        );
    }
    Ok(())
}

/// One `checkpoint made` line of the primary.
#[derive(Debug, Default, Clone)]
struct Made {
    sent: u64,
    page_bytes: u64,
    covered: u64,
    sync: bool,
    pause: Duration,
}

/// The pre-copy's summary line.
#[derive(Debug, Default)]
struct PreCopy {
    rounds: u64,
    pages: u64,
    bytes: u64,
    memory_bytes: u64,
    elapsed: Duration,
}

struct Sync {
    precopy: PreCopy,
    stop_and_copy: Made,
}

fn print_figures(mem: u64, repairs: &[Made], sync: &Sync, raw: f64) {
    println!();
    println!("{mem} MiB guest");
    let n = repairs.len() as u64;
    let sent: u64 = repairs.iter().map(|m| m.page_bytes).sum();
    let covered: u64 = repairs.iter().map(|m| m.covered * 4096).sum();
    let mut pauses: Vec<Duration> = repairs.iter().map(|m| m.pause).collect();
    pauses.sort_unstable();
    let p50 = pauses.get(pauses.len() / 2).copied().unwrap_or_default();
    let max = pauses.last().copied().unwrap_or_default();
    println!(
        "  1. repairs: {n}; page bytes sent per repair {:.0} B, Remus-style (every page dirtied since the boundary) {:.0} B ({:.1}% of it); vCPU stopped p50 {:.3} ms, max {:.3} ms",
        sent as f64 / n.max(1) as f64,
        covered as f64 / n.max(1) as f64,
        100.0 * sent as f64 / covered.max(1) as f64,
        ms(p50),
        ms(max)
    );
    let p = &sync.precopy;
    println!(
        "  2. sync: pre-copy {} round(s) sent {} non-zero pages ({:.1} MiB): {:.0} MiB/s sent over the whole pre-copy (raw TCP {raw:.0} MiB/s); it read all {} MiB of guest memory (zero pages are not sent) in {:.0} ms ({:.0} MiB/s read)",
        p.rounds,
        p.pages,
        p.bytes as f64 / f64::from(1 << 20),
        mib_per_s(p.bytes, p.elapsed),
        p.memory_bytes >> 20,
        ms(p.elapsed),
        mib_per_s(p.memory_bytes, p.elapsed)
    );
    println!(
        "     stop-and-copy: {} pages, vCPU stopped {:.3} ms",
        sync.stop_and_copy.sent,
        ms(sync.stop_and_copy.pause)
    );
}

/// A protected `rdtsc` run: every repair the primary made.
fn repair_run(mem: u64) -> Result<Vec<Made>, Failure> {
    let addr = try_free_addr()?;
    let mem_arg = mem.to_string();
    let standby = spawn(&["standby", "--listen", &addr], "warn")?;
    let primary = spawn(
        &[
            "run",
            "--peer",
            &addr,
            "--mem-mib",
            &mem_arg,
            "--cmdline",
            "workload=rdtsc n=150",
        ],
        "warn,ftvm_primary=debug",
    )?;
    let (p_out, p_err) = finish(primary, "rdtsc primary")?;
    finish(standby, "rdtsc standby")?;
    if !p_out.ends_with("done\n") {
        return Err(format!("rdtsc primary output ends with {:?}", tail(&p_out)));
    }
    let made: Vec<Made> = p_err
        .lines()
        .filter(|l| l.contains("checkpoint made"))
        .map(parse_made)
        .collect::<Result<_, _>>()?;
    let repairs: Vec<Made> = made.into_iter().filter(|m| !m.sync).collect();
    if repairs.is_empty() {
        return Err(format!("no repair in the rdtsc run:\n{p_err}"));
    }
    Ok(repairs)
}

/// A primary started alone with [`FILL_MIB`] of non-zero memory, and a standby that joins.
fn sync_run(mem: u64) -> Result<Sync, Failure> {
    let accept = try_free_addr()?;
    let mem_arg = mem.to_string();
    let cmdline = format!("workload=counter ticks=200 fill={FILL_MIB}");
    let primary = spawn(
        &[
            "run",
            "--accept-standby",
            &accept,
            "--mem-mib",
            &mem_arg,
            "--cmdline",
            &cmdline,
        ],
        "warn,ftvm_primary=debug,ftvm_replication=info",
    )?;
    // Join once the guest has filled its memory (REP STOSQ is emulated: ~9 MiB/s here).
    thread::sleep(Duration::from_millis(FILL_MIB * 1000 / 8 + 500));
    let standby = spawn(&["standby", "--join", &accept], "warn")?;
    let (p_out, p_err) = finish(primary, "sync primary")?;
    finish(standby, "sync standby")?;
    common::check_counter(&p_out, 200).map_err(|e| format!("sync primary: {e}"))?;
    let line = p_err
        .lines()
        .find(|l| l.contains("pre-copy done"))
        .ok_or_else(|| format!("no pre-copy summary:\n{p_err}"))?;
    let precopy = PreCopy {
        rounds: field(line, "round")?,
        pages: field(line, "pages")?,
        bytes: field(line, "bytes")?,
        memory_bytes: field(line, "memory_bytes")?,
        elapsed: Duration::from_micros(field(line, "elapsed_us")?),
    };
    let stop_and_copy = p_err
        .lines()
        .filter(|l| l.contains("checkpoint made"))
        .map(parse_made)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|m| m.sync)
        .ok_or_else(|| format!("no stop-and-copy checkpoint:\n{p_err}"))?;
    if precopy.pages < FILL_MIB * 256 {
        return Err(format!(
            "the pre-copy sent {} pages, fewer than the {} the guest filled",
            precopy.pages,
            FILL_MIB * 256
        ));
    }
    Ok(Sync {
        precopy,
        stop_and_copy,
    })
}

/// Size of the disk the resync figure uses.
const RESYNC_MIB: u64 = 256;

/// The standby's `disk resync done` line.
struct Resync {
    differed: u64,
    bytes: u64,
    disk_bytes: u64,
    elapsed: Duration,
}

/// A pair started with a [`RESYNC_MIB`] disk of pseudo-random bytes (no block of zeroes)
/// and a standby copy of zeroes (`differ`: every block crosses) or identical to it.
fn resync_run(differ: bool) -> Result<Resync, Failure> {
    let dir = common::Scratch::new("bench-resync");
    let disk = dir.path_str("disk.img");
    let copy = dir.path_str("copy.img");
    let mut data = vec![0u8; (RESYNC_MIB << 20) as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&disk, &data).map_err(|e| format!("{disk}: {e}"))?;
    if differ {
        data.fill(0);
    }
    std::fs::write(&copy, &data).map_err(|e| format!("{copy}: {e}"))?;
    drop(data);
    let addr = try_free_addr()?;
    let standby = spawn(
        &["standby", "--listen", &addr, "--disk", &copy],
        "warn,ftvm_secondary=info",
    )?;
    let primary = spawn(
        &[
            "run",
            "--peer",
            &addr,
            "--disk",
            &disk,
            "--cmdline",
            "workload=counter ticks=5",
        ],
        "warn",
    )?;
    finish(primary, "resync primary")?;
    let (_, s_err) = finish(standby, "resync standby")?;
    let line = s_err
        .lines()
        .find(|l| l.contains("disk resync done"))
        .ok_or_else(|| format!("no disk resync summary:\n{s_err}"))?;
    Ok(Resync {
        differed: field(line, "differed")?,
        bytes: field(line, "received_bytes")?,
        disk_bytes: field(line, "disk_bytes")?,
        elapsed: Duration::from_millis(field(line, "elapsed_ms")?),
    })
}

fn parse_made(line: &str) -> Result<Made, Failure> {
    Ok(Made {
        sent: field(line, "sent")?,
        page_bytes: field(line, "page_bytes")?,
        covered: field(line, "covered")?,
        sync: line.contains("sync=true"),
        pause: Duration::from_micros(field(line, "pause_us")?),
    })
}

/// The number after ` key=` in a tracing line.
fn field(line: &str, key: &str) -> Result<u64, Failure> {
    let pat = format!(" {key}=");
    let rest = line
        .find(&pat)
        .map(|i| &line[i + pat.len()..])
        .ok_or_else(|| format!("no {key} in {line:?}"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .map_err(|_| format!("{key} is not a number in {line:?}"))
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(80)..]
}

struct Running {
    child: std::process::Child,
    out: thread::JoinHandle<Vec<u8>>,
    err: thread::JoinHandle<Vec<u8>>,
}

fn spawn(args: &[&str], log: &str) -> Result<Running, Failure> {
    let mut child = Command::new(FTVM)
        .args(args)
        .args(common::key_args(args))
        .env("FTVM_LOG", log)
        .env_remove("FTVM_AUDIT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start ftvm {args:?}: {e}"))?;
    let collect = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = collect(Box::new(child.stdout.take().ok_or("no stdout")?));
    let err = collect(Box::new(child.stderr.take().ok_or("no stderr")?));
    Ok(Running { child, out, err })
}

/// Waits for the process (at most [`LIMIT`]); it must exit 0. Its stdout and stderr.
fn finish(mut r: Running, what: &str) -> Result<(String, String), Failure> {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = r.child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = r.child.kill();
            let _ = r.child.wait();
            return Err(format!("{what} did not exit within {LIMIT:?}"));
        }
        thread::sleep(Duration::from_millis(10));
    };
    let out = String::from_utf8_lossy(&r.out.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&r.err.join().unwrap_or_default()).into_owned();
    if !status.success() {
        return Err(format!("{what} exited with {status}:\n{err}"));
    }
    Ok((out, err))
}

/// [`RAW_BYTES`] through a loopback TCP connection in 1 MiB writes.
fn raw_tcp() -> Result<(u64, Duration), Failure> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    let reader = thread::spawn(move || -> Result<u64, String> {
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) => return Err(format!("raw TCP reader: {e}")),
            }
        }
    });
    let mut c = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0;
    while sent < RAW_BYTES {
        c.write_all(&chunk)
            .map_err(|e| format!("raw TCP writer: {e}"))?;
        sent += chunk.len() as u64;
    }
    drop(c);
    let got = reader.join().map_err(|_| "reader panicked".to_string())??;
    let elapsed = start.elapsed();
    if got != sent {
        return Err(format!("raw TCP: sent {sent}, received {got}"));
    }
    Ok((sent, elapsed))
}
