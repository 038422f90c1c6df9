//! The failure detector and the heartbeat clock of one pair connection (DESIGN.md §5, §6),
//! with no socket and no clock inside: the caller says when bytes arrived and when a frame
//! was queued, and asks, at a time it names, whether a heartbeat is due or the peer is lost.

use std::time::{Duration, Instant};

use crate::link::Heartbeat;

/// When the peer was last heard and when we last spoke.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    heartbeat: Heartbeat,
    last_rx: Instant,
    last_tx: Instant,
}

/// What a [`Liveness::tick`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing to do.
    Quiet,
    /// Nothing was sent for an interval: send a heartbeat.
    SendHeartbeat,
    /// The peer has been silent past the timeout, for this long.
    Silent(Duration),
}

impl Liveness {
    /// A connection that just came up at `now`.
    pub fn new(heartbeat: Heartbeat, now: Instant) -> Self {
        Self {
            heartbeat,
            last_rx: now,
            last_tx: now,
        }
    }

    /// Bytes from the peer arrived at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.last_rx = self.last_rx.max(now);
    }

    /// A frame was queued for the peer at `now`.
    pub fn spoke(&mut self, now: Instant) {
        self.last_tx = self.last_tx.max(now);
    }

    /// One look at the clock: the failure detector first, then the heartbeat.
    pub fn tick(&self, now: Instant) -> Beat {
        let silent = now.saturating_duration_since(self.last_rx);
        if silent > self.heartbeat.timeout {
            return Beat::Silent(silent);
        }
        if now.saturating_duration_since(self.last_tx) >= self.heartbeat.interval {
            return Beat::SendHeartbeat;
        }
        Beat::Quiet
    }

    /// Nothing was sent for an interval (whether or not the peer is silent): a heartbeat is
    /// due. A side that waits for a silent peer keeps sending them, so a peer that was only
    /// paused finds it alive when it runs again.
    pub fn heartbeat_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_tx) >= self.heartbeat.interval
    }

    /// How long the event loop may sleep from `now`: until the next heartbeat is due.
    pub fn until_next_heartbeat(&self, now: Instant) -> Duration {
        (self.last_tx + self.heartbeat.interval).saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Heartbeat = Heartbeat {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(150),
    };

    #[test]
    fn a_heartbeat_is_due_after_an_interval_without_sending() {
        let t0 = Instant::now();
        let mut l = Liveness::new(HB, t0);
        assert_eq!(l.tick(t0 + Duration::from_millis(49)), Beat::Quiet);
        assert_eq!(l.tick(t0 + Duration::from_millis(50)), Beat::SendHeartbeat);
        l.spoke(t0 + Duration::from_millis(50));
        assert_eq!(l.tick(t0 + Duration::from_millis(60)), Beat::Quiet);
        assert_eq!(
            l.until_next_heartbeat(t0 + Duration::from_millis(60)),
            Duration::from_millis(40)
        );
    }

    #[test]
    fn a_peer_silent_past_the_timeout_is_lost_and_hearing_it_resets_the_clock() {
        let t0 = Instant::now();
        let mut l = Liveness::new(HB, t0);
        l.spoke(t0 + Duration::from_millis(140));
        l.heard(t0 + Duration::from_millis(100));
        assert_eq!(l.tick(t0 + Duration::from_millis(250)), Beat::SendHeartbeat);
        assert_eq!(
            l.tick(t0 + Duration::from_millis(251)),
            Beat::Silent(Duration::from_millis(151))
        );
    }
}
