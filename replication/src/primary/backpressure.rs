//! Back-pressure from a slow standby (DESIGN.md §6, "Bounds"): what the primary holds for it
//! is bounded. The vCPU thread feeds the channel thread through a bounded queue
//! ([`FEED_QUEUE`] messages); while the standby is behind a first bound (bytes waiting in the
//! socket plus output held for it, or the age of the oldest epoch it has not verified) the
//! channel thread closes the [`Gate`] the vCPU thread passes at each hand-off and stops
//! taking from that queue, so the vCPU thread waits at its next send (within a stream
//! interval, about a millisecond, not 64 messages later): the guest is slowed to the
//! standby's pace, as VMware FT slows a primary whose backup lags.
//! Slowed for longer than a second bound, the standby is dropped explicitly (`Abandon`, the
//! `standby lost` event, and `ftvm status` says so), and the guest runs on unprotected; memory
//! never grows without limit.
//!
//! The lag is measured in time, not in epochs: the age of the oldest unverified epoch is how
//! much guest time the standby would have to replay if the primary died now, so bounding it
//! bounds the failover's replay on a host that starves the standby of CPU, whatever the
//! length of an epoch. A repair counts as progress: the checkpoint verifies every epoch it
//! covers once installed, and while the vCPU thread is making it (the guest stopped) the lag
//! bound never holds the queue the checkpoint's pages travel through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Messages the vCPU thread may queue for the channel thread before it blocks.
pub const FEED_QUEUE: usize = 64;

/// The bounds (`--max-standby-backlog-mib`, `--max-lag-ms`, `--max-slowed-ms`, and the
/// deprecated `--max-lag-epochs`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Bytes waiting in the socket for the standby plus guest output held for its acks:
    /// past this, the guest is slowed.
    pub backlog_bytes: u64,
    /// Age of the oldest epoch shipped and not yet verified: past this, the guest is slowed.
    pub lag: Duration,
    /// Epochs shipped but not yet verified (deprecated bound, none by default): past this,
    /// the guest is slowed.
    pub lag_epochs: Option<u64>,
    /// Slowed this long without the standby catching up: it is dropped.
    pub slowed_for: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            backlog_bytes: 64 << 20,
            lag: Duration::from_millis(DEFAULT_MAX_LAG_MS),
            lag_epochs: None,
            slowed_for: Duration::from_secs(10),
        }
    }
}

/// The default `--max-lag-ms`: a failover replays at most about half a second of guest time,
/// while the verification latency this bound must leave alone (tens of milliseconds at p99
/// on a loaded host, a few hundred for a repaired Linux guest under TCG) stays well below it.
pub const DEFAULT_MAX_LAG_MS: u64 = 500;

/// What the standby is behind by now, as the core and the channel see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Bytes waiting in the socket for the standby plus guest output held for its acks.
    pub bytes: u64,
    /// Age of the oldest epoch shipped and not yet verified (zero: none).
    pub lag: Duration,
    /// Epochs shipped and not yet verified.
    pub lag_epochs: u64,
    /// The vCPU thread is making a checkpoint (a repair or a sync's stop-and-copy) the
    /// standby waits for: its pages must get through, whatever the lag.
    pub making_checkpoint: bool,
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

/// Where the vCPU thread waits while the guest is slowed: the throttle closes it, the vCPU
/// thread [`Gate::pass`]es it before each hand-off to the channel thread.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    closed: AtomicBool,
    lock: Mutex<()>,
    opened: Condvar,
}

impl Gate {
    fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        if self.0.closed.swap(false, Ordering::SeqCst) {
            let _held = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.0.opened.notify_all();
        }
    }

    /// Returns at once while the guest runs at full speed; waits while it is slowed.
    pub fn pass(&self) {
        if !self.0.closed.load(Ordering::Acquire) {
            return;
        }
        let mut held = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.0.closed.load(Ordering::Acquire) {
            // The timeout is a safety net only: opening notifies.
            held = match self.0.opened.wait_timeout(held, GATE_RECHECK) {
                Ok((held, _)) => held,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// How often a vCPU thread waiting at a closed gate looks again without being told.
const GATE_RECHECK: Duration = Duration::from_millis(10);

/// Slowed this long in one go, the guest's slowing is worth a warning (shorter slowdowns are
/// the bound doing its work: a tight `--max-lag-ms` holds the guest for a millisecond often).
const SLOWED_WARNING: Duration = Duration::from_secs(1);

/// The state of the bounds: since when the guest has been slowed.
#[derive(Debug, Default)]
pub struct Throttle {
    bounds: Bounds,
    since: Option<Instant>,
    warned: bool,
    gate: Gate,
}

impl Throttle {
    /// A throttle with `bounds`.
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            since: None,
            warned: false,
            gate: Gate::default(),
        }
    }

    /// The gate the vCPU thread passes before each hand-off: closed while the guest is slowed.
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// Whether the guest is slowed now.
    pub fn slowed(&self) -> bool {
        self.since.is_some()
    }

    /// Whether `b` is past the lag bounds (time, and epochs where that deprecated bound is
    /// set). A checkpoint in the making is never held back by the lag: it is what verifies
    /// the lagging epochs.
    fn lagging(&self, b: &Backlog) -> bool {
        !b.making_checkpoint
            && (b.lag > self.bounds.lag
                || self.bounds.lag_epochs.is_some_and(|max| b.lag_epochs > max))
    }

    /// The verdict for a standby that is behind by `backlog` at `now`. With no standby,
    /// call [`Throttle::clear`].
    pub fn check(&mut self, backlog: &Backlog, now: Instant) -> Verdict {
        let b = self.bounds;
        if backlog.bytes <= b.backlog_bytes && !self.lagging(backlog) {
            if let Some(since) = self.since.take() {
                let slowed_ms = now.saturating_duration_since(since).as_millis() as u64;
                if std::mem::take(&mut self.warned) {
                    tracing::info!(
                        slowed_ms,
                        "the standby caught up: the guest runs at full speed again"
                    );
                } else {
                    tracing::debug!(slowed_ms, "the standby caught up");
                }
            }
            self.gate.open();
            return Verdict::Run;
        }
        self.gate.close();
        let since = *self.since.get_or_insert_with(|| {
            tracing::debug!(
                backlog_bytes = backlog.bytes,
                lag_ms = backlog.lag.as_millis() as u64,
                lag_epochs = backlog.lag_epochs,
                "the standby is behind: slowing the guest to its pace"
            );
            now
        });
        let slowed = now.saturating_duration_since(since);
        if slowed >= SLOWED_WARNING && !self.warned {
            self.warned = true;
            tracing::warn!(
                backlog_bytes = backlog.bytes,
                lag_ms = backlog.lag.as_millis() as u64,
                lag_epochs = backlog.lag_epochs,
                slowed_ms = slowed.as_millis() as u64,
                "the standby is behind: the guest is slowed to its pace"
            );
        }
        if slowed < b.slowed_for {
            return Verdict::Slow;
        }
        self.since = None;
        self.warned = false;
        self.gate.open();
        Verdict::Drop(format!(
            "standby too far behind: {} bytes waiting for it, the oldest unverified epoch \
             {:.1?} old ({} epochs unverified), the guest slowed for {:.1?} (bounds {} bytes, \
             {:.1?}{}, {:.1?})",
            backlog.bytes,
            backlog.lag,
            backlog.lag_epochs,
            b.slowed_for,
            b.backlog_bytes,
            b.lag,
            b.lag_epochs
                .map_or(String::new(), |e| format!(", {e} epochs")),
            b.slowed_for
        ))
    }

    /// No standby: nothing to wait for.
    pub fn clear(&mut self) {
        self.since = None;
        self.warned = false;
        self.gate.open();
    }
}

/// A throttle that goes away (the channel thread ended) never leaves the guest waiting.
impl Drop for Throttle {
    fn drop(&mut self) {
        self.gate.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(Bounds {
            backlog_bytes: 100,
            lag: Duration::from_millis(500),
            lag_epochs: None,
            slowed_for: Duration::from_secs(2),
        })
    }

    fn behind(bytes: u64, lag_ms: u64, lag_epochs: u64) -> Backlog {
        Backlog {
            bytes,
            lag: Duration::from_millis(lag_ms),
            lag_epochs,
            making_checkpoint: false,
        }
    }

    /// A thread that passes `gate`: the receiver hears once it got through.
    fn passer(gate: &Gate) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gate.clone();
        std::thread::spawn(move || {
            g.pass();
            let _ = tx.send(());
        });
        rx
    }

    /// Whether a thread passing `gate` gets through within `wait`.
    fn passes(gate: &Gate, wait: Duration) -> bool {
        passer(gate).recv_timeout(wait).is_ok()
    }

    #[test]
    fn the_gate_holds_the_vcpu_thread_while_the_guest_is_slowed() {
        let mut t = throttle();
        let gate = t.gate();
        let t0 = Instant::now();
        assert!(passes(&gate, Duration::from_secs(5)), "open while running");
        assert_eq!(t.check(&behind(101, 0, 0), t0), Verdict::Slow);
        let waiter = passer(&gate);
        assert!(
            waiter.recv_timeout(Duration::from_millis(100)).is_err(),
            "passed a closed gate"
        );
        assert_eq!(t.check(&behind(0, 0, 0), t0), Verdict::Run);
        waiter
            .recv_timeout(Duration::from_secs(5))
            .expect("the waiting thread goes on once the standby caught up");
    }

    #[test]
    fn no_standby_or_no_throttle_never_leaves_the_guest_waiting() {
        let mut t = throttle();
        let gate = t.gate();
        let t0 = Instant::now();
        assert_eq!(t.check(&behind(101, 0, 0), t0), Verdict::Slow);
        t.clear();
        assert!(passes(&gate, Duration::from_secs(5)), "the standby is gone");
        assert_eq!(t.check(&behind(101, 0, 0), t0), Verdict::Slow);
        assert!(matches!(
            t.check(&behind(101, 0, 0), t0 + Duration::from_secs(3)),
            Verdict::Drop(_)
        ));
        assert!(
            passes(&gate, Duration::from_secs(5)),
            "the standby was dropped"
        );
        assert_eq!(t.check(&behind(101, 0, 0), t0), Verdict::Slow);
        drop(t);
        assert!(
            passes(&gate, Duration::from_secs(5)),
            "the channel thread ended"
        );
    }

    #[test]
    fn within_the_bounds_the_guest_runs_however_many_epochs_are_unverified() {
        let mut t = throttle();
        assert_eq!(
            t.check(&behind(100, 500, 1_000_000), Instant::now()),
            Verdict::Run
        );
        assert!(!t.slowed());
    }

    #[test]
    fn past_the_first_bound_the_guest_slows_and_runs_again_when_the_standby_catches_up() {
        let mut t = throttle();
        let t0 = Instant::now();
        assert_eq!(t.check(&behind(101, 0, 0), t0), Verdict::Slow);
        assert_eq!(
            t.check(&behind(0, 501, 1), t0 + Duration::from_secs(1)),
            Verdict::Slow
        );
        assert!(t.slowed());
        assert_eq!(
            t.check(&behind(0, 0, 0), t0 + Duration::from_millis(1500)),
            Verdict::Run
        );
        // The clock starts again at the next slow-down.
        assert_eq!(
            t.check(&behind(101, 0, 0), t0 + Duration::from_secs(3)),
            Verdict::Slow
        );
        assert_eq!(
            t.check(&behind(101, 0, 0), t0 + Duration::from_millis(4900)),
            Verdict::Slow
        );
    }

    #[test]
    fn a_checkpoint_in_the_making_is_never_held_back_by_the_lag() {
        let mut t = throttle();
        let t0 = Instant::now();
        let making = Backlog {
            making_checkpoint: true,
            ..behind(0, 5000, 10_000)
        };
        assert_eq!(t.check(&making, t0), Verdict::Run);
        // Bytes still bound it: the socket drains to the standby without the vCPU thread.
        let big = Backlog {
            bytes: 101,
            ..making
        };
        assert_eq!(t.check(&big, t0), Verdict::Slow);
        // Its end went out: the guest waits until the standby installs it.
        assert_eq!(
            t.check(&behind(0, 5000, 10_000), t0 + Duration::from_secs(1)),
            Verdict::Slow
        );
        // Installed: every epoch it covers is verified.
        assert_eq!(
            t.check(&behind(0, 0, 0), t0 + Duration::from_millis(1500)),
            Verdict::Run
        );
    }

    #[test]
    fn the_deprecated_epoch_bound_still_slows_where_it_is_set() {
        let mut t = Throttle::new(Bounds {
            lag_epochs: Some(10),
            ..throttle().bounds
        });
        let t0 = Instant::now();
        assert_eq!(t.check(&behind(0, 1, 10), t0), Verdict::Run);
        assert_eq!(t.check(&behind(0, 1, 11), t0), Verdict::Slow);
    }

    #[test]
    fn slowed_past_the_second_bound_the_standby_is_dropped() {
        let mut t = throttle();
        let t0 = Instant::now();
        assert_eq!(t.check(&behind(0, 600, 3), t0), Verdict::Slow);
        let Verdict::Drop(why) = t.check(&behind(0, 2600, 3), t0 + Duration::from_secs(2)) else {
            panic!("the standby must be dropped");
        };
        assert!(
            why.starts_with("standby too far behind: 0 bytes waiting for it, the oldest unverified epoch 2.6s old (3 epochs unverified)"),
            "{why}"
        );
        assert!(!t.slowed());
    }
}
