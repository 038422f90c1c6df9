//! What the benchmarks share: how a benchmark ends, a temporary directory, the check of the
//! counter workload's output, and milliseconds for printing. Each benchmark includes this
//! module with `mod common;`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// A correctness failure (bad exit status, unexpected output, spawn error, hang).
pub type Failure = String;

/// The benchmark's exit status: success, or the failure on stderr and a non-zero status.
pub fn exit_code(bench: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bench} bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A temporary directory for logs, audit files and stderr; removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `ftvm-bench-<bench>-<pid>` in the system's temporary directory.
    pub fn new(bench: &str) -> Result<Self, Failure> {
        let path = std::env::temp_dir().join(format!("ftvm-bench-{bench}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("bench: warning: cannot remove {}: {e}", self.0.display());
        }
    }
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
