//! Where the time of a failover drill goes (figure 3), from the standby's audit trail
//! (`FTVM_AUDIT`, CLOCK_MONOTONIC ns, comparable with the kill's time in this process):
//! the kill to `lost` (the standby's channel thread saw the connection close or reset), to
//! the last `verified` epoch (the replay backlog: epochs the standby still had to replay
//! when the primary died), to `live` (the replayer ran out of log and went live), to the
//! first byte of the standby's output.

use std::time::Duration;

use crate::common::{ms, percentile};

/// CLOCK_MONOTONIC in nanoseconds (the audit trail's clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One drill's steps, each from the kill.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    /// To `lost`: the primary's death seen.
    pub lost: Duration,
    /// To the last epoch verified after the kill (zero when none was).
    pub replayed: Duration,
    /// Epochs verified after the kill: the replay backlog in epochs.
    pub backlog_epochs: u64,
    /// To `live`.
    pub live: Duration,
    /// To the standby's first output byte.
    pub first_byte: Duration,
}

/// The steps of a drill whose primary was killed at `killed_ns` and whose standby printed
/// its first byte at `first_ns`, from the standby's audit trail `audit`.
pub fn steps(audit: &str, killed_ns: u64, first_ns: u64) -> Result<Steps, String> {
    let since = |t: u64| Duration::from_nanos(t.saturating_sub(killed_ns));
    let (mut lost, mut live) = (None, None);
    let (mut replayed, mut backlog_epochs) = (Duration::ZERO, 0);
    for line in audit.lines() {
        let mut tokens = line.split_whitespace();
        let (Some(t), Some(event)) = (tokens.next(), tokens.next()) else {
            return Err(format!("malformed audit line {line:?}"));
        };
        let t: u64 = t
            .parse()
            .map_err(|e| format!("audit line {line:?}: time: {e}"))?;
        match event {
            "lost" => lost = lost.or(Some(t)),
            "live" => live = live.or(Some(t)),
            "verified" if t > killed_ns && live.is_none() => {
                replayed = since(t);
                backlog_epochs += 1;
            }
            _ => {}
        }
    }
    let lost = lost.ok_or("the standby's audit trail has no `lost` line")?;
    let live = live.ok_or("the standby's audit trail has no `live` line")?;
    Ok(Steps {
        lost: since(lost),
        replayed,
        backlog_epochs,
        live: since(live),
        first_byte: since(first_ns),
    })
}

/// One step's time, out of a drill's [`Steps`].
type Step = fn(&Steps) -> Duration;

/// Prints p50/p99 of each step over the drills.
pub fn print(steps: &[Steps]) {
    println!("   where the failover time goes (from the kill, standby's audit trail):");
    let rows: [(&str, Step); 4] = [
        ("primary's death seen (lost)", |s| s.lost),
        ("replay backlog done (last verified)", |s| s.replayed),
        ("went live (live)", |s| s.live),
        ("first output byte", |s| s.first_byte),
    ];
    for (name, f) in rows {
        let mut v: Vec<Duration> = steps.iter().map(f).collect();
        println!(
            "     {name:<38} p50 {:>9.3} ms   p99 {:>9.3} ms",
            ms(percentile(&mut v, 50)),
            ms(percentile(&mut v, 99))
        );
    }
    let mut epochs: Vec<u64> = steps.iter().map(|s| s.backlog_epochs).collect();
    epochs.sort_unstable();
    println!(
        "     epochs replayed after the kill          p50 {:>5}      max {:>5}",
        epochs[epochs.len() / 2],
        epochs.last().copied().unwrap_or(0)
    );
}
