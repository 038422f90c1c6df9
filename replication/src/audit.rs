//! The output-rule audit trail: with `FTVM_AUDIT=FILE` in its environment, a pair process
//! writes one line per event, stamped with CLOCK_MONOTONIC in ns (comparable between
//! processes on one host):
//! - primary: `shipped epoch=K exit_seq=N` (an epoch's end went to the standby),
//!   `acked epoch=K` (an Ack verifying through K arrived),
//!   `release epoch=K seq=A..B verified held_ns=H` (output bytes A..B of epoch K reached
//!   stdout after being held H ns), or `release ... unprotected` (released without
//!   verification);
//! - standby: `verified epoch=K exit_seq=N` (written before its Ack is sent).
//!
//! The output-rule test reads both files and checks that every byte left after the standby
//! verified its epoch; the pair benchmark reads ack latency and output delay from them.

use std::fs::File;
use std::io::Write;

/// Environment variable naming the audit file.
pub const AUDIT_ENV: &str = "FTVM_AUDIT";

/// The audit file.
pub struct Audit {
    file: File,
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Audit {
    /// The audit file named by `FTVM_AUDIT`, if set (a file that cannot be created is
    /// reported and auditing is off).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os(AUDIT_ENV)?;
        match File::create(&path) {
            Ok(file) => Some(Self { file }),
            Err(e) => {
                tracing::warn!("cannot create audit file {}: {e}", path.to_string_lossy());
                None
            }
        }
    }

    /// Appends `<monotonic ns> <what>`.
    pub fn line(&mut self, what: std::fmt::Arguments<'_>) {
        let line = format!("{} {what}\n", monotonic_ns());
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            tracing::warn!("audit file: {e}");
        }
    }
}
