//! The pair's Prometheus metrics (`--metrics ADDR`), kept by `prometheus-client`: gauges set
//! from each status snapshot, counters advanced by what the snapshots say happened since the
//! last one, and the primary's ack latency and output delay histograms.
//!
//! Names are stable: `docs/OPERATIONS.md` lists them and `deploy/prometheus/ftvm.rules.yml`
//! alerts on them.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::status::Status;

/// The roles a pair process can play (`ftvm_role{role=…}`).
pub const ROLES: [&str; 2] = ["primary", "standby"];

/// The classes of `state` (`ftvm_state{state=…}`): the words before the first `:` of the
/// status's `state`, spaces as `_`.
pub const STATES: [&str; 13] = [
    "starting",
    "lockstep",
    "repairing",
    "syncing",
    "switching_over",
    "unprotected",
    "arbitrating",
    "waiting",
    "going_live",
    "fenced",
    "abandoned",
    "diverged",
    "ended",
];

/// The label of `ftvm_role`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    role: &'static str,
}

/// The label of `ftvm_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    state: &'static str,
}

/// The class of a status `state` (one of [`STATES`]).
pub fn state_class(state: &str) -> &'static str {
    let head = state.split(':').next().unwrap_or("").trim();
    let head = head.replace(' ', "_");
    STATES
        .iter()
        .find(|s| **s == head)
        .copied()
        .unwrap_or("starting")
}

/// The role label of a status `role` (`primary (live after failover)` is a primary).
pub fn role_class(role: &str) -> &'static str {
    if role.starts_with("primary") {
        "primary"
    } else {
        "standby"
    }
}

type IntGauge = Gauge<i64, std::sync::atomic::AtomicI64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The metrics of one pair process.
pub struct Metrics {
    registry: Registry,
    role: Family<RoleLabel, IntGauge>,
    state: Family<StateLabel, IntGauge>,
    protected: IntGauge,
    term: IntGauge,
    arbiter_reachable: IntGauge,
    epoch: IntGauge,
    verified_epoch: IntGauge,
    exit_seq: IntGauge,
    lag_epochs: IntGauge,
    lag_seconds: FloatGauge,
    lag_bytes: IntGauge,
    held_output_bytes: IntGauge,
    released_output_bytes: IntGauge,
    log_bytes_per_second: IntGauge,
    sync_bytes: IntGauge,
    sync_pages_left: IntGauge,
    heartbeat_timeout_seconds: FloatGauge,
    pub(super) divergences: Counter,
    pub(super) checkpoint_required: Counter,
    pub(super) repairs: Counter,
    pub(super) repair_bytes: Counter,
    pub(super) syncs_started: Counter,
    pub(super) syncs: Counter,
    pub(super) failovers: Counter,
    pub(super) switchovers: Counter,
    pub(super) protection_lost: Counter,
    pub(super) fenced: Counter,
    ack_latency: Histogram,
    output_delay: Histogram,
}

fn seconds_buckets() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(1e-4, 2.0, 16))
}

impl Metrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ftvm");
        let m = Self {
            role: Family::default(),
            state: Family::default(),
            protected: IntGauge::default(),
            term: IntGauge::default(),
            arbiter_reachable: IntGauge::default(),
            epoch: IntGauge::default(),
            verified_epoch: IntGauge::default(),
            exit_seq: IntGauge::default(),
            lag_epochs: IntGauge::default(),
            lag_seconds: FloatGauge::default(),
            lag_bytes: IntGauge::default(),
            held_output_bytes: IntGauge::default(),
            released_output_bytes: IntGauge::default(),
            log_bytes_per_second: IntGauge::default(),
            sync_bytes: IntGauge::default(),
            sync_pages_left: IntGauge::default(),
            heartbeat_timeout_seconds: FloatGauge::default(),
            divergences: Counter::default(),
            checkpoint_required: Counter::default(),
            repairs: Counter::default(),
            repair_bytes: Counter::default(),
            syncs_started: Counter::default(),
            syncs: Counter::default(),
            failovers: Counter::default(),
            switchovers: Counter::default(),
            protection_lost: Counter::default(),
            fenced: Counter::default(),
            ack_latency: seconds_buckets(),
            output_delay: seconds_buckets(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "role",
            "1 for the role this process plays now (primary or standby), 0 for the other",
            m.role.clone(),
        );
        r.register(
            "state",
            "1 for the class of the pair's state now (lockstep, repairing, syncing, unprotected, arbitrating, waiting, ...)",
            m.state.clone(),
        );
        r.register(
            "protected",
            "1 while a verified copy of the guest exists on the other host",
            m.protected.clone(),
        );
        r.register(
            "term",
            "the pair's term at the witness, as this process knows it (0 without a witness)",
            m.term.clone(),
        );
        r.register(
            "arbiter_reachable",
            "with a witness: 0 while the last claim could not reach it; -1 without a witness",
            m.arbiter_reachable.clone(),
        );
        r.register(
            "epoch",
            "the last epoch closed (primary) or received (standby)",
            m.epoch.clone(),
        );
        r.register(
            "verified_epoch",
            "the last epoch the standby verified",
            m.verified_epoch.clone(),
        );
        r.register(
            "exit_seq",
            "the last exit the log covers",
            m.exit_seq.clone(),
        );
        r.register(
            "lag_epochs",
            "epochs shipped and not yet verified",
            m.lag_epochs.clone(),
        );
        r.register(
            "lag_seconds",
            "age of the oldest epoch not yet verified",
            m.lag_seconds.clone(),
        );
        r.register(
            "lag_bytes",
            "log bytes shipped (received) in epochs not yet verified",
            m.lag_bytes.clone(),
        );
        r.register(
            "held_output_bytes",
            "guest output held until its epoch is verified",
            m.held_output_bytes.clone(),
        );
        r.register(
            "released_output_bytes",
            "output sequence number: every output byte before it was released",
            m.released_output_bytes.clone(),
        );
        r.register(
            "log_bytes_per_second",
            "log bytes per second on the pair channel over the last second",
            m.log_bytes_per_second.clone(),
        );
        r.register(
            "sync_bytes",
            "while a standby syncs: page bytes sent (primary) or received (standby)",
            m.sync_bytes.clone(),
        );
        r.register(
            "sync_pages_left",
            "while a standby syncs: pages left in the current round",
            m.sync_pages_left.clone(),
        );
        r.register(
            "heartbeat_timeout_seconds",
            "the heartbeat timeout agreed with the peer",
            m.heartbeat_timeout_seconds.clone(),
        );
        r.register(
            "divergences",
            "divergences the standby reported (each asks for a repair)",
            m.divergences.clone(),
        );
        r.register(
            "checkpoint_required_epochs",
            "divergences that were checkpoint-required epochs",
            m.checkpoint_required.clone(),
        );
        r.register("repairs", "repair checkpoints installed", m.repairs.clone());
        r.register(
            "repair_bytes",
            "page bytes carried by repair checkpoints",
            m.repair_bytes.clone(),
        );
        r.register(
            "syncs_started",
            "syncs of a joining standby started",
            m.syncs_started.clone(),
        );
        r.register(
            "syncs",
            "syncs completed (a standby joined)",
            m.syncs.clone(),
        );
        r.register(
            "failovers",
            "times this process went live after its primary was lost",
            m.failovers.clone(),
        );
        r.register(
            "switchovers",
            "planned role swaps this process took part in",
            m.switchovers.clone(),
        );
        r.register(
            "protection_lost",
            "times the guest became unprotected",
            m.protection_lost.clone(),
        );
        r.register(
            "fenced",
            "times this process lost the term and stopped its guest",
            m.fenced.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "primary: from shipping an epoch's end to the standby's ack that verified it",
            m.ack_latency.clone(),
        );
        r.register(
            "output_delay_seconds",
            "primary: how long guest output was held before its release",
            m.output_delay.clone(),
        );
        for role in ROLES {
            m.role.get_or_create(&RoleLabel { role }).set(0);
        }
        for state in STATES {
            m.state.get_or_create(&StateLabel { state }).set(0);
        }
        m.state
            .get_or_create(&StateLabel { state: "starting" })
            .set(1);
        m.arbiter_reachable.set(-1);
        Self { registry, ..m }
    }

    /// Sets the gauges from a status snapshot.
    pub fn set(&self, s: &Status) {
        let role = role_class(&s.role);
        for r in ROLES {
            self.role
                .get_or_create(&RoleLabel { role: r })
                .set(i64::from(r == role));
        }
        let state = state_class(&s.state);
        for c in STATES {
            self.state
                .get_or_create(&StateLabel { state: c })
                .set(i64::from(c == state));
        }
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.protected.set(i64::from(s.protected));
        self.term.set(int(s.term.unwrap_or(0)));
        self.arbiter_reachable
            .set(s.arbiter_reachable.map_or(-1, i64::from));
        self.epoch.set(int(s.epoch));
        self.verified_epoch.set(int(s.verified_epoch));
        self.exit_seq.set(int(s.exit_seq));
        self.lag_epochs.set(int(s.lag_epochs));
        self.lag_seconds.set(s.lag.as_secs_f64());
        self.lag_bytes.set(int(s.lag_bytes));
        self.held_output_bytes.set(int(s.held_output_bytes));
        self.released_output_bytes.set(int(s.released_output_seq));
        self.log_bytes_per_second.set(int(s.log_bytes_per_s));
        self.sync_bytes.set(int(s.sync_bytes));
        self.sync_pages_left.set(int(s.sync_pages_left));
        self.heartbeat_timeout_seconds
            .set(s.heartbeat.timeout.as_secs_f64());
    }

    /// One ack latency.
    pub fn ack_latency(&self, d: Duration) {
        self.ack_latency.observe(d.as_secs_f64());
    }

    /// One output delay.
    pub fn output_delay(&self, d: Duration) {
        self.output_delay.observe(d.as_secs_f64());
    }

    /// The exposition (OpenMetrics text).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_roles_have_classes() {
        assert_eq!(state_class("lockstep"), "lockstep");
        assert_eq!(state_class("unprotected: standby lost"), "unprotected");
        assert_eq!(state_class("going live: primary closed"), "going_live");
        assert_eq!(state_class("switching over"), "switching_over");
        assert_eq!(state_class("something new"), "starting");
        assert_eq!(role_class("primary (live after failover)"), "primary");
        assert_eq!(role_class("standby"), "standby");
    }

    #[test]
    fn a_snapshot_shows_in_the_exposition() {
        let m = Metrics::new();
        m.set(&Status {
            role: "standby".into(),
            protected: true,
            state: "lockstep".into(),
            epoch: 42,
            term: Some(3),
            arbiter_reachable: Some(false),
            ..Default::default()
        });
        m.ack_latency(Duration::from_millis(2));
        let text = m.render();
        for line in [
            "ftvm_protected 1",
            "ftvm_epoch 42",
            "ftvm_term 3",
            "ftvm_arbiter_reachable 0",
            "ftvm_role{role=\"standby\"} 1",
            "ftvm_role{role=\"primary\"} 0",
            "ftvm_state{state=\"lockstep\"} 1",
            "ftvm_failovers_total 0",
            "ftvm_ack_latency_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
