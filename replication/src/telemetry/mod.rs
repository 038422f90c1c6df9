//! What a pair process tells its operators besides stderr (issue 19): Prometheus metrics
//! (`--metrics ADDR`, [`metrics`], served by [`http`]) and a structured event log
//! (`--events FILE`, [`events`]).
//!
//! One [`Telemetry`] per process, shared (`Arc`) by every role it plays through
//! [`crate::ChannelOptions`]. Its only input is what the drivers already have: after every
//! turn of the event loop, the role's status snapshot ([`Telemetry::observe`]) and the
//! durations its core measured ([`Timings`]). Gauges are set from the snapshot; counters and
//! events come from how it differs from the previous one, so no protocol core knows about
//! metrics, and nothing here can stall the channel thread (a short lock, atomics, one
//! appended line).

pub mod events;
pub mod http;
pub mod metrics;
mod watch;
pub mod witness;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::status::Status;

pub use metrics::Metrics;

/// At most this many durations wait in a core between two turns of its loop.
const MAX_TIMINGS: usize = 4096;

/// Durations a protocol core measured, until its driver hands them to [`Telemetry`].
#[derive(Debug, Default)]
pub struct Timings {
    /// From shipping an epoch's end to the ack that verified it.
    pub ack_latency: Vec<Duration>,
    /// How long released output was held.
    pub output_delay: Vec<Duration>,
}

impl Timings {
    /// Notes an ack latency (dropped past [`MAX_TIMINGS`]).
    pub fn ack_latency(&mut self, d: Duration) {
        if self.ack_latency.len() < MAX_TIMINGS {
            self.ack_latency.push(d);
        }
    }

    /// Notes an output delay (dropped past [`MAX_TIMINGS`]).
    pub fn output_delay(&mut self, d: Duration) {
        if self.output_delay.len() < MAX_TIMINGS {
            self.output_delay.push(d);
        }
    }
}

/// The metrics and the event log of one process.
pub struct Telemetry {
    metrics: Metrics,
    events: Option<events::EventLog>,
    watch: Mutex<watch::Watch>,
}

impl Telemetry {
    /// Metrics, and an event log appended to `events` if given.
    pub fn new(events: Option<&Path>) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            metrics: Metrics::new(),
            events: events.map(events::EventLog::open).transpose()?,
            watch: Mutex::new(watch::Watch::default()),
        }))
    }

    /// Serves the metrics at `GET /metrics` on `listener` (its own thread).
    pub fn serve(self: &Arc<Self>, listener: std::net::TcpListener) -> std::io::Result<()> {
        let me = self.clone();
        http::spawn(listener, move || me.metrics.render())
    }

    /// The exposition now.
    pub fn render(&self) -> String {
        self.metrics.render()
    }

    /// Writes event `name` with `fields` to the event log, if there is one.
    pub fn event(&self, name: &str, fields: Map<String, Value>) {
        if let Some(log) = &self.events {
            log.write(name, fields);
        }
    }

    /// This process lost the term and stops its guest now (it exits right after).
    pub fn fenced(&self, why: &str) {
        self.event("fenced", crate::fields!("why" => why));
        self.metrics.fenced.inc();
    }

    /// A role's status after a turn of its loop, and what its core measured.
    pub fn observe(&self, status: &Status, timings: Timings) {
        for d in timings.ack_latency {
            self.metrics.ack_latency(d);
        }
        for d in timings.output_delay {
            self.metrics.output_delay(d);
        }
        let mut watch = match self.watch.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        watch.step(status, &self.metrics, &mut |name, fields| {
            self.event(name, fields)
        });
        // The gauges last too: a scrape that sees a new state finds its events written.
        self.metrics.set(status);
    }
}
