//! Back-pressure from a slow standby (DESIGN.md §6, "Bounds"): what the primary holds for it
//! is bounded. The vCPU thread feeds the channel thread through a bounded queue
//! ([`FEED_QUEUE`] messages); while the standby is behind a first bound (bytes waiting in the
//! socket plus output held for it, or unverified epochs) the channel thread stops taking from
//! that queue, so the vCPU thread blocks on its next send: the guest is slowed to the
//! standby's pace, as VMware FT slows a primary whose backup lags. Slowed for longer than a
//! second bound, the standby is dropped explicitly (`Abandon`, the `standby lost` event, and
//! `ftvm status` says so), and the guest runs on unprotected; memory never grows without
//! limit.

use std::time::{Duration, Instant};

/// Messages the vCPU thread may queue for the channel thread before it blocks.
pub const FEED_QUEUE: usize = 64;

/// The bounds (`--max-standby-backlog-mib`, `--max-lag-epochs`, `--max-slowed-ms`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Bytes waiting in the socket for the standby plus guest output held for its acks:
    /// past this, the guest is slowed.
    pub backlog_bytes: u64,
    /// Epochs shipped but not yet verified: past this, the guest is slowed.
    pub lag_epochs: u64,
    /// Slowed this long without the standby catching up: it is dropped.
    pub slowed_for: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            backlog_bytes: 64 << 20,
            lag_epochs: 1000,
            slowed_for: Duration::from_secs(10),
        }
    }
}

/// What the channel thread does about the standby now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Take what the vCPU thread sends.
    Run,
    /// Leave the vCPU thread's queue alone: the guest waits for the standby.
    Slow,
    /// Drop the standby, for this reason.
    Drop(String),
}

/// The state of the bounds: since when the guest has been slowed.
#[derive(Debug, Default)]
pub struct Throttle {
    bounds: Bounds,
    since: Option<Instant>,
}

impl Throttle {
    /// A throttle with `bounds`.
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            since: None,
        }
    }

    /// Whether the guest is slowed now.
    pub fn slowed(&self) -> bool {
        self.since.is_some()
    }

    /// The verdict for a standby that has `backlog` bytes waiting for it (in the socket and
    /// held output) and `lag` unverified epochs, at `now`. With no standby, call
    /// [`Throttle::clear`].
    pub fn check(&mut self, backlog: u64, lag: u64, now: Instant) -> Verdict {
        let b = self.bounds;
        if backlog <= b.backlog_bytes && lag <= b.lag_epochs {
            if self.since.take().is_some() {
                tracing::info!("the standby caught up: the guest runs at full speed again");
            }
            return Verdict::Run;
        }
        let since = *self.since.get_or_insert_with(|| {
            tracing::warn!(
                backlog_bytes = backlog,
                lag_epochs = lag,
                "the standby is behind: slowing the guest to its pace"
            );
            now
        });
        if now.saturating_duration_since(since) < b.slowed_for {
            return Verdict::Slow;
        }
        self.since = None;
        Verdict::Drop(format!(
            "standby too far behind: {backlog} bytes waiting for it, {lag} epochs unverified, \
             the guest slowed for {:.1?} (bounds {} bytes, {} epochs, {:.1?})",
            b.slowed_for, b.backlog_bytes, b.lag_epochs, b.slowed_for
        ))
    }

    /// No standby: nothing to wait for.
    pub fn clear(&mut self) {
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(Bounds {
            backlog_bytes: 100,
            lag_epochs: 10,
            slowed_for: Duration::from_secs(2),
        })
    }

    #[test]
    fn within_the_bounds_the_guest_runs() {
        let mut t = throttle();
        assert_eq!(t.check(100, 10, Instant::now()), Verdict::Run);
        assert!(!t.slowed());
    }

    #[test]
    fn past_the_first_bound_the_guest_slows_and_runs_again_when_the_standby_catches_up() {
        let mut t = throttle();
        let t0 = Instant::now();
        assert_eq!(t.check(101, 0, t0), Verdict::Slow);
        assert_eq!(t.check(0, 11, t0 + Duration::from_secs(1)), Verdict::Slow);
        assert!(t.slowed());
        assert_eq!(
            t.check(0, 0, t0 + Duration::from_millis(1500)),
            Verdict::Run
        );
        // The clock starts again at the next slow-down.
        assert_eq!(t.check(101, 0, t0 + Duration::from_secs(3)), Verdict::Slow);
        assert_eq!(
            t.check(101, 0, t0 + Duration::from_millis(4900)),
            Verdict::Slow
        );
    }

    #[test]
    fn slowed_past_the_second_bound_the_standby_is_dropped() {
        let mut t = throttle();
        let t0 = Instant::now();
        assert_eq!(t.check(500, 0, t0), Verdict::Slow);
        let Verdict::Drop(why) = t.check(500, 0, t0 + Duration::from_secs(2)) else {
            panic!("the standby must be dropped");
        };
        assert!(
            why.starts_with("standby too far behind: 500 bytes"),
            "{why}"
        );
        assert!(!t.slowed());
    }
}
