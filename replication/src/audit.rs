//! The output-rule audit trail: with `FTVM_AUDIT=FILE` in its environment, a pair process
//! writes one line per event, stamped with CLOCK_MONOTONIC in ns (comparable between
//! processes on one host):
//! - primary: `shipped epoch=K exit_seq=N closing_ns=C` (an epoch's end went to the standby;
//!   its closing, digest first, began on the vCPU thread at C), `received epoch=K` (an Ack
//!   said the log through K is on the standby's host: `Received(K)`), `acked epoch=K` (an
//!   Ack verifying through K arrived: `Verified(K)`),
//!   `release epoch=K seq=A..B verified held_ns=H` (output bytes A..B of epoch K reached
//!   stdout after being held H ns), or `release ... unprotected` (released without
//!   verification);
//! - standby: `received epoch=K` (the log through K arrived; `Received(K)` goes back),
//!   `verified epoch=K exit_seq=N replayed_ns=R` (the replay reached the epoch's end at R and
//!   its digest matched; written before its Ack is sent), `verified ... checkpoint` (a repair
//!   or sync installed), `lost` (the channel thread took the primary for dead: its connection
//!   closed or reset), `live` (the replayer replayed everything received and went live).
//!
//! The output-rule test reads both files and checks that every byte left after the standby
//! verified its epoch; the pair benchmark reads ack latencies, output delay and the latency
//! breakdown from them (`benches/pair/breakdown.rs`), and the failover drills where the
//! time after the kill goes (`benches/pair/failover.rs`).

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

/// CLOCK_MONOTONIC in nanoseconds at `then`, an instant before `now` (which is taken to
/// be the present).
pub fn ns_before(now: std::time::Instant, then: std::time::Instant) -> u64 {
    let ago = now.saturating_duration_since(then).as_nanos();
    monotonic_ns().saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX))
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
