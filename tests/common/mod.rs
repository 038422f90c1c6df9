//! What the integration tests (tests/*.rs) and the benchmarks (benches/*.rs) share: the
//! `ftvm` binary and the repository, the Linux test guest and the nested-KVM harness,
//! scratch directories, free loopback addresses, the `key=value` fields of ftvm's output
//! and the replay's summary line, a TCP proxy that cuts a connection, and what the
//! benchmarks need to report.
//!
//! Tests include it with `mod common;`, benchmarks with
//! `#[path = "../tests/common/mod.rs"] mod common;`. Cargo builds neither this file nor
//! its folder as a test of its own.
//!
//! Failures: helpers for tests panic; the benchmarks report a [`Failure`] and exit non-zero,
//! so the fallible forms (`try_…`) return one.

// Every test and benchmark is a crate of its own that compiles this module by itself and
// uses only part of it: what one of them leaves unused is not dead code.
#![allow(dead_code)]

pub mod net;
pub mod redis;
pub mod two_hosts;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// The `ftvm` binary cargo built for this test or benchmark.
pub const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");

/// A pair key made once per test binary with `ftvm keygen` (in a scratch directory left
/// for the process's lifetime): every pair process of the tests runs with it, so the
/// default, encrypted path is what the tests exercise.
pub fn pair_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ftvm-test-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("key directory");
        let path = dir.join("pair.key");
        let o = Command::new(FTVM)
            .args(["keygen", "--out"])
            .arg(&path)
            .output()
            .expect("run ftvm keygen");
        assert!(o.status.success(), "ftvm keygen: {o:?}");
        path.to_string_lossy().into_owned()
    })
}

/// A fresh pair key in `dir` (`ftvm keygen`), for a drill whose hosts read it from there;
/// its path.
pub fn try_keygen(dir: &Scratch) -> Result<String, Failure> {
    let key = dir.path_str("pair.key");
    let o = Command::new(FTVM)
        .args(["keygen", "--out", &key])
        .output()
        .map_err(|e| format!("run ftvm keygen: {e}"))?;
    if !o.status.success() {
        return Err(format!("ftvm keygen: {o:?}"));
    }
    Ok(key)
}

/// `["--key", pair_key()]`, unless `args` already say how to protect the connections.
pub fn key_args(args: &[&str]) -> Vec<&'static str> {
    if args.iter().any(|a| *a == "--key" || *a == "--insecure") {
        Vec::new()
    } else {
        vec!["--key", pair_key()]
    }
}

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs scripts/linux-guest.sh with `args` (it builds the Linux test guest, or finds it
/// cached, and makes disk images); its stdout.
pub fn linux_guest(args: &[&str]) -> String {
    let o = Command::new(repo().join("scripts/linux-guest.sh"))
        .args(args)
        .output()
        .expect("run scripts/linux-guest.sh");
    assert!(
        o.status.success(),
        "scripts/linux-guest.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The Linux test guest's kernel and initramfs: (kernel, initrd).
pub fn linux_guest_images() -> (String, String) {
    linux_guest_images_with("initrd")
}

/// [`linux_guest_images`] with the initramfs that also holds Redis (the `redis` workload).
pub fn linux_guest_redis_images() -> (String, String) {
    linux_guest_images_with("initrd_redis")
}

fn linux_guest_images_with(initrd: &str) -> (String, String) {
    let out = linux_guest(&[]);
    let path = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= from scripts/linux-guest.sh in {out}"))
            .to_string()
    };
    (path("kernel"), path(initrd))
}

/// Runs `args` inside the nested-KVM harness (scripts/nested.sh), killed after `timeout_s`;
/// returns (status, stdout, stderr).
pub fn nested(args: &[&str], timeout_s: u32) -> (Option<i32>, String, String) {
    nested_with(&[], args, timeout_s)
}

/// [`nested`] with harness options before `--` (e.g. `--rdtsc-exits`).
pub fn nested_with(
    options: &[&str],
    args: &[&str],
    timeout_s: u32,
) -> (Option<i32>, String, String) {
    let o = Command::new(repo().join("scripts/nested.sh"))
        .args(["--timeout", &timeout_s.to_string()])
        .args(options)
        .arg("--")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run scripts/nested.sh");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A scratch directory, `ftvm-<name>-<pid>` in the system's temporary directory (/tmp: the
/// nested-KVM harness's /tmp is an overlay over this one, so files made here are seen
/// there); removed with what is in it when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates the directory; panics if it cannot.
    pub fn new(name: &str) -> Self {
        Self::try_new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates the directory.
    pub fn try_new(name: &str) -> Result<Self, Failure> {
        let path = std::env::temp_dir().join(format!("ftvm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self(path))
    }

    /// The path of `file` in the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// The path of `file` in the directory, as a string (for command lines and scripts).
    pub fn path_str(&self, file: &str) -> String {
        self.path(file).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A free loopback address: bind port 0, read the port, release it.
pub fn try_free_addr() -> Result<String, Failure> {
    try_free_addr_on("127.0.0.1")
}

/// A port on the local address `ip` that is free now, as `ip:port`: bind port 0, read the
/// port, release it.
pub fn try_free_addr_on(ip: &str) -> Result<String, Failure> {
    let listener = TcpListener::bind(format!("{ip}:0")).map_err(|e| format!("bind {ip}:0: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?
        .port();
    Ok(format!("{ip}:{port}"))
}

/// A free loopback address; panics if there is none.
pub fn free_addr() -> String {
    try_free_addr().unwrap_or_else(|e| panic!("{e}"))
}

/// The value of the `key=value` field among the whitespace-separated fields of `line`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The guest's output as a client saw it across a failover: the primary's output up to byte
/// `from` (where the standby said it re-emits from: `re-emitting output from sequence N`),
/// then the standby's. The primary's bytes past `from` (the duplicate window: released
/// after the last `Released` the standby heard) must be what the standby printed first.
pub fn merge_failover_output(
    primary: &[u8],
    standby: &[u8],
    from: usize,
) -> Result<Vec<u8>, String> {
    if from > primary.len() {
        return Err(format!(
            "the standby re-emits from byte {from}, but the primary printed only {} bytes",
            primary.len()
        ));
    }
    let overlap = &primary[from..];
    if !standby.starts_with(overlap) {
        return Err(format!(
            "the primary's last {} bytes {:?} are not what the standby re-emitted first {:?}",
            overlap.len(),
            String::from_utf8_lossy(overlap),
            String::from_utf8_lossy(&standby[..overlap.len().min(standby.len())])
        ));
    }
    let mut merged = primary[..from].to_vec();
    merged.extend_from_slice(standby);
    Ok(merged)
}

/// The summary line `ftvm replay` ends with:
/// `epochs=N verified=N diverged=N checkpoint_required=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Epochs replayed.
    pub epochs: u64,
    /// Epochs whose digest matched the log's.
    pub verified: u64,
    /// Epochs that diverged.
    pub diverged: u64,
    /// Epochs the replay stopped at because the recording needed a checkpoint there.
    pub checkpoint_required: u64,
    /// The line itself, for messages.
    pub line: String,
}

impl ReplaySummary {
    /// Parses a summary line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let number = |key: &str| -> Result<u64, String> {
            field(line, key)
                .ok_or_else(|| format!("summary line {line:?} has no {key}="))?
                .parse()
                .map_err(|e| format!("summary line {line:?}: {key}: {e}"))
        };
        Ok(Self {
            epochs: number("epochs")?,
            verified: number("verified")?,
            diverged: number("diverged")?,
            checkpoint_required: number("checkpoint_required")?,
            line: line.trim_end().to_string(),
        })
    }

    /// Parses the last summary line (the last line that starts with `epochs=`) in `text`.
    pub fn find(text: &str) -> Result<Self, String> {
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with("epochs="))
            .ok_or_else(|| "no \"epochs=... diverged=...\" summary line".to_string())?;
        Self::parse(line)
    }
}

/// A benchmark's correctness failure (bad exit status, unexpected output, spawn error, hang).
pub type Failure = String;

/// A benchmark's exit status: success, or the failure on stderr and a non-zero status.
pub fn exit_code(bench: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bench} bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the line a benchmark's report starts with: what runs, on which host.
pub fn print_banner(bench: &str) {
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ftvm {bench} benchmark: {FTVM} on Linux {osrelease} {}, {cpus} CPUs",
        std::env::consts::ARCH
    );
}

/// `workload=counter`: `tick 1 sum=X` .. `tick N sum=X`, then `done sum=X` with the sum of
/// the last tick.
pub fn check_counter(stdout: &str, ticks: u64) -> Result<(), String> {
    if !stdout.ends_with('\n') {
        return Err("output does not end with a newline".to_string());
    }
    let lines: Vec<&str> = stdout.lines().collect();
    let want = ticks as usize + 1;
    if lines.len() != want {
        return Err(format!("expected {want} lines, got {}", lines.len()));
    }
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut last = "";
    for (n, line) in (1..=ticks).zip(&lines) {
        match line
            .strip_prefix(&format!("tick {n} sum="))
            .filter(|s| hex(s))
        {
            Some(sum) => last = sum,
            None => {
                return Err(format!(
                    "line {n} is {line:?}, expected \"tick {n} sum=<hex>\""
                ))
            }
        }
    }
    let done = lines[want - 1];
    if done.strip_prefix("done sum=") != Some(last) {
        return Err(format!(
            "last line is {done:?}, expected \"done sum={last}\""
        ));
    }
    Ok(())
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// MiB per second for `bytes` moved in `d`.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / f64::from(1 << 20) / d.as_secs_f64().max(1e-9)
}

/// Nearest-rank percentile `p` (1..=100) of a non-empty sample (sorts it in place).
pub fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    let rank = (samples.len() * p).div_ceil(100).max(1);
    samples[rank.min(samples.len()) - 1]
}

/// Median of a non-empty sample (sorts it in place).
pub fn median<T: Ord + Copy>(samples: &mut [T]) -> T {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Median of a non-empty sample of finite floats (sorts it in place).
pub fn median_f64(samples: &mut [f64]) -> f64 {
    samples.sort_unstable_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A fake standby's side of a pair's start on `listener`: takes the primary's connection,
/// does the handshake with `security`, reads its `Start` and answers `Ready`; returns the
/// connection and the primary's address, for the test to speak the protocol on.
pub fn fake_standby_ready(
    listener: &TcpListener,
    security: &ftvm_replication::link::Security,
) -> (ftvm_replication::link::Handshaken, String) {
    use ftvm_proto::channel::{message::Body, Message, Ready, Role};
    use ftvm_replication::link;
    let (stream, peer) = listener.accept().expect("the primary connects");
    let peer = peer.to_string();
    let me = link::Me {
        role: Role::Standby,
        initiator: false,
        security,
    };
    let mut h = link::handshake(stream, &peer, me, link::Heartbeat::default())
        .expect("the fake standby's handshake");
    let start = link::recv_blocking(&mut h.stream, &peer, &mut h.rx_offset).expect("Start");
    assert!(matches!(start.body, Some(Body::Start(_))), "{start:?}");
    let ready = Message {
        body: Some(Body::Ready(Ready::default())),
    };
    link::send_blocking(&mut h.stream, &peer, &ready).expect("Ready");
    (h, peer)
}

/// A TCP proxy on loopback to `target`: the first connection is cut (both directions shut
/// down) once `cut_after` bytes went from `target` to the client; later ones pass intact.
pub fn cutting_proxy(target: String, cut_after: u64) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("127.0.0.1:{}", l.local_addr().expect("addr").port());
    std::thread::spawn(move || {
        for (n, client) in l.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                return;
            };
            let limit = if n == 0 { cut_after } else { u64::MAX };
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut from, mut to) = (server, client);
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent = 0u64;
                while sent < limit {
                    let n = match std::io::Read::read(&mut from, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min((limit - sent) as usize),
                    };
                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

/// `ftvm status ADDR --key KEY`: the report, or what ftvm said on stderr.
pub fn status_with_key(addr: &str, key: &str) -> Result<String, String> {
    let o = std::process::Command::new(FTVM)
        .args(["status", addr, "--key", key])
        .output()
        .expect("ftvm status");
    match o.status.success() {
        true => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
    }
}

/// Polls `ftvm status ADDR` (the pair key) until the process reports the line `line`
/// (`protected=yes`); panics with the last report after 30 s.
pub fn wait_for_status_line(addr: &str, line: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = status_with_key(addr, pair_key()).unwrap_or_else(|e| e);
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} never said {line}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
