//! Events and counters from successive status snapshots: what changed since the last one.

use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value};

use super::metrics::{role_class, state_class, Metrics};
use crate::fields;
use crate::status::Status;

/// Lag past this is `lagging` (WARN, and an event).
pub const LAGGING: Duration = Duration::from_secs(1);

/// Lag back under [`LAGGING`] for this long is `caught_up` (lag is a saw-tooth: the oldest
/// unverified epoch ages until an ack takes it, so one snapshot under the bound says little).
pub const CAUGHT_UP_AFTER: Duration = Duration::from_secs(5);

/// A `sync_progress` event each time this many more bytes were synced.
pub const SYNC_STEP: u64 = 16 << 20;

/// The last snapshot, and what was reported about it.
#[derive(Default)]
pub(super) struct Watch {
    last: Option<Status>,
    lagging: bool,
    /// While lagging: since when the lag is back under the bound.
    under_since: Option<Instant>,
    /// Sync bytes at the last `sync_progress` event.
    sync_reported: u64,
}

/// How much a count grew; a count that fell belongs to a new protocol core (a switchover
/// started the other role), which counts from 0.
fn grew(prev: Option<u64>, now: u64) -> u64 {
    match prev {
        Some(p) if now >= p => now - p,
        _ => now,
    }
}

impl Watch {
    /// Compares `s` with the last snapshot: advances the counters of `m` and emits events.
    pub(super) fn step(
        &mut self,
        s: &Status,
        m: &Metrics,
        emit: &mut dyn FnMut(&str, Map<String, Value>),
    ) {
        // Counters move after the events that explain them are written: whoever sees a
        // count in a scrape finds its event in the log.
        let mut bumps: Vec<(&Counter, u64)> = Vec::new();
        let prev = self.last.take();
        let p = prev.as_ref();
        let class = state_class(&s.state);
        if p.map(|p| p.role.as_str()) != Some(s.role.as_str()) {
            let from = p.map(|p| p.role.clone());
            emit(
                "role_changed",
                fields!("from" => from.clone(), "to" => s.role.as_str(), "state" => s.state.as_str(), "peer" => s.peer.as_str()),
            );
            if s.role.contains("live after failover") {
                bumps.push((&m.failovers, 1));
                tracing::info!(
                    epoch = s.verified_epoch,
                    "failover: this standby is live ({})",
                    s.state
                );
                emit(
                    "failover",
                    fields!("why" => s.state.as_str(), "verified_epoch" => s.verified_epoch, "exit_seq" => s.exit_seq),
                );
            } else if p.is_some_and(|p| role_class(&p.role) != role_class(&s.role)) {
                bumps.push((&m.switchovers, 1));
                emit(
                    "switchover",
                    fields!("from" => from, "to" => s.role.as_str(), "epoch" => s.epoch),
                );
            }
        }
        let prev_class = p.map(|p| state_class(&p.state));
        if prev_class != Some(class) {
            emit(
                "state_changed",
                fields!("from" => prev_class, "to" => class, "state" => s.state.as_str()),
            );
            match class {
                "syncing" => {
                    bumps.push((&m.syncs_started, 1));
                    self.sync_reported = 0;
                    emit("sync_started", fields!("peer" => s.peer.as_str()));
                }
                "abandoned" => emit("abandoned", fields!("why" => s.state.as_str())),
                "fenced" => {
                    bumps.push((&m.fenced, 1));
                    emit("fenced", fields!("why" => s.state.as_str()));
                }
                "waiting" => emit("waiting", fields!("why" => s.state.as_str())),
                "ended" => emit(
                    "run_ended",
                    fields!("epoch" => s.epoch, "verified_epoch" => s.verified_epoch),
                ),
                _ => {}
            }
        }
        if class == "syncing" && s.sync_bytes >= self.sync_reported + SYNC_STEP {
            self.sync_reported = s.sync_bytes;
            emit(
                "sync_progress",
                fields!("bytes" => s.sync_bytes, "pages_left" => s.sync_pages_left),
            );
        }
        let d = grew(p.map(|p| p.divergences), s.divergences);
        if d > 0 {
            bumps.push((&m.divergences, d));
            let cr = grew(p.map(|p| p.checkpoint_required), s.checkpoint_required);
            bumps.push((&m.checkpoint_required, cr));
            emit(
                "divergence",
                fields!("new" => d, "checkpoint_required" => cr, "total" => s.divergences, "state" => s.state.as_str()),
            );
        }
        bumps.push((
            &m.repair_bytes,
            grew(p.map(|p| p.repair_bytes), s.repair_bytes),
        ));
        let r = grew(p.map(|p| p.repairs), s.repairs);
        if r > 0 {
            bumps.push((&m.repairs, r));
            emit(
                "repair",
                fields!("new" => r, "total" => s.repairs, "repair_bytes" => s.repair_bytes, "verified_epoch" => s.verified_epoch),
            );
        }
        let synced = grew(p.map(|p| p.syncs), s.syncs);
        if synced > 0 {
            bumps.push((&m.syncs, synced));
            emit(
                "sync_finished",
                fields!("total" => s.syncs, "peer" => s.peer.as_str()),
            );
        }
        // After the counts: a sync or a repair that finished comes before the protection it
        // brought back.
        if p.map(|p| p.protected) != Some(s.protected) {
            if s.protected {
                emit(
                    "protected",
                    fields!("state" => s.state.as_str(), "peer" => s.peer.as_str()),
                );
            } else {
                if p.is_some() {
                    bumps.push((&m.protection_lost, 1));
                }
                emit(
                    "unprotected",
                    fields!("why" => s.state.as_str(), "peer" => s.peer.as_str()),
                );
            }
        }
        let reachable = p.and_then(|p| p.arbiter_reachable);
        match (reachable, s.arbiter_reachable) {
            (Some(true) | None, Some(false)) => {
                emit("arbiter_unreachable", fields!("state" => s.state.as_str()));
            }
            (Some(false), Some(true)) => emit("arbiter_reachable", Map::new()),
            _ => {}
        }
        self.lag(s, emit);
        for (counter, n) in bumps {
            counter.inc_by(n);
        }
        self.last = Some(s.clone());
    }

    /// `lagging` as soon as the lag passes [`LAGGING`]; `caught_up` once it stayed under it
    /// for [`CAUGHT_UP_AFTER`].
    fn lag(&mut self, s: &Status, emit: &mut dyn FnMut(&str, Map<String, Value>)) {
        let lag_ms = u64::try_from(s.lag.as_millis()).unwrap_or(u64::MAX);
        if s.lag > LAGGING {
            self.under_since = None;
            if !self.lagging {
                self.lagging = true;
                tracing::warn!(
                    lag_ms,
                    lag_epochs = s.lag_epochs,
                    "lagging: the oldest unverified epoch is {lag_ms} ms old"
                );
                emit(
                    "lagging",
                    fields!("lag_ms" => lag_ms, "lag_epochs" => s.lag_epochs),
                );
            }
            return;
        }
        if !self.lagging {
            return;
        }
        let now = Instant::now();
        let since = *self.under_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= CAUGHT_UP_AFTER {
            self.lagging = false;
            self.under_since = None;
            tracing::info!(
                "caught up: lag under {} ms for {} s",
                LAGGING.as_millis(),
                CAUGHT_UP_AFTER.as_secs()
            );
            emit("caught_up", fields!("lag_ms" => lag_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(snapshots: &[Status]) -> (Vec<String>, Metrics) {
        let m = Metrics::new();
        let mut w = Watch::default();
        let mut names = Vec::new();
        for s in snapshots {
            w.step(s, &m, &mut |name, _| names.push(name.to_string()));
        }
        (names, m)
    }

    fn standby(state: &str, protected: bool) -> Status {
        Status {
            role: "standby".into(),
            protected,
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_failover_tells_its_story() {
        let mut live = standby("unprotected: primary closed", false);
        live.role = "primary (live after failover)".into();
        let mut repaired = standby("lockstep", true);
        repaired.divergences = 1;
        repaired.repairs = 1;
        let (names, m) = run(&[
            standby("lockstep", true),
            standby("repairing: epoch 3", true),
            repaired.clone(),
            Status {
                state: "going live: primary closed".into(),
                protected: false,
                ..repaired.clone()
            },
            Status { ..live },
        ]);
        assert_eq!(
            names,
            [
                "role_changed",
                "state_changed",
                "protected",
                "state_changed",
                "state_changed",
                "divergence",
                "repair",
                "state_changed",
                "unprotected",
                "role_changed",
                "failover",
                "state_changed",
            ]
        );
        let text = m.render();
        assert!(text.contains("ftvm_failovers_total 1\n"), "{text}");
        assert!(text.contains("ftvm_protection_lost_total 1\n"), "{text}");
        // The new status (the live standby) counts from 0 again: nothing is counted twice.
        assert!(text.contains("ftvm_repairs_total 1\n"), "{text}");
    }

    #[test]
    fn a_switchover_counts_once_on_each_role_change() {
        let primary = Status {
            role: "primary".into(),
            protected: true,
            state: "lockstep".into(),
            repairs: 4,
            ..Default::default()
        };
        let (names, m) = run(&[primary, standby("lockstep", true)]);
        assert!(names.contains(&"switchover".to_string()), "{names:?}");
        let text = m.render();
        assert!(text.contains("ftvm_switchovers_total 1\n"), "{text}");
        assert!(text.contains("ftvm_repairs_total 4\n"), "{text}");
    }
}
