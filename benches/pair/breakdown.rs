//! The latency breakdown of released output (issue 15): for each epoch whose output was
//! released after verification, the time each stage took, read from the two audit trails of
//! one protected run (CLOCK_MONOTONIC in ns, comparable between the two processes on one
//! host; `replication/src/audit.rs`):
//!
//! | stage                | from (trail: line)                        | to                                  |
//! |----------------------|-------------------------------------------|-------------------------------------|
//! | output → closing     | last output of the epoch (release − held) | primary `shipped closing_ns=`       |
//! | closing → shipped    | `closing_ns=` (digest, hand-off)          | primary `shipped`                   |
//! | shipped → received   | primary `shipped`                         | standby `received`                  |
//! | received → replayed  | standby `received`                        | standby `verified replayed_ns=`     |
//! | replayed → verified  | `replayed_ns=` (digest)                   | standby `verified`                  |
//! | verified → ack back  | standby `verified`                        | primary `acked` (first covering it) |
//! | ack back → released  | primary `acked`                           | primary `release` (last of epoch)   |
//!
//! Besides, for every shipped epoch: `Received(k)` back at the primary (`received` line) and
//! `Verified(k)` back (`acked` line), each from `shipped`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::common::{ms, percentile};

/// The stages, in order, as printed.
pub const STAGES: [&str; 7] = [
    "output -> closing",
    "closing -> shipped",
    "shipped -> received",
    "received -> replayed",
    "replayed -> verified",
    "verified -> ack back",
    "ack back -> released",
];

/// Samples gathered over the protected runs.
#[derive(Default)]
pub struct Breakdown {
    /// One sample per released epoch for each of [`STAGES`].
    pub stages: [Vec<Duration>; 7],
    /// Last output byte produced to its release, per released epoch (the sum of the stages).
    pub total: Vec<Duration>,
    /// Shipped to `Received(k)` back at the primary, per shipped epoch.
    pub received_ack: Vec<Duration>,
    /// Shipped to `Verified(k)` back at the primary, per shipped epoch.
    pub verified_ack: Vec<Duration>,
}

/// One line of an audit trail: its time, event and `key=value` fields.
struct Line<'a> {
    t: u64,
    event: &'a str,
    fields: Vec<&'a str>,
}

impl<'a> Line<'a> {
    fn parse(line: &'a str) -> Result<Self, String> {
        let mut tokens = line.split_whitespace();
        let (Some(t), Some(event)) = (tokens.next(), tokens.next()) else {
            return Err(format!("malformed audit line {line:?}"));
        };
        let t = t
            .parse()
            .map_err(|e| format!("audit line {line:?}: time: {e}"))?;
        Ok(Self {
            t,
            event,
            fields: tokens.collect(),
        })
    }

    fn field(&self, key: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    }

    fn number(&self, key: &str) -> Result<u64, String> {
        self.field(key)
            .ok_or_else(|| format!("{} line without {key}=", self.event))?
            .parse()
            .map_err(|e| format!("{} line: {key}: {e}", self.event))
    }
}

/// What one epoch's lines say (times in ns).
#[derive(Default, Clone, Copy)]
struct Epoch {
    last_output: Option<u64>,
    closing: Option<u64>,
    shipped: Option<u64>,
    received: Option<u64>,
    replayed: Option<u64>,
    verified: Option<u64>,
    released: Option<u64>,
}

/// The first time at or after which a line covering `epoch` came, from lines
/// `(time, through_epoch)` in time order.
fn first_covering(lines: &[(u64, u64)], epoch: u64) -> Option<u64> {
    lines.iter().find(|(_, e)| *e >= epoch).map(|(t, _)| *t)
}

fn gap(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

impl Breakdown {
    /// Adds the samples of one protected run, from its primary's and standby's audit trails.
    pub fn add_run(&mut self, primary: &str, standby: &str) -> Result<(), String> {
        let mut epochs: BTreeMap<u64, Epoch> = BTreeMap::new();
        let mut received_acks = Vec::new();
        let mut verified_acks = Vec::new();
        for line in primary.lines() {
            let l = Line::parse(line)?;
            match l.event {
                "shipped" => {
                    let e = epochs.entry(l.number("epoch")?).or_default();
                    e.shipped = Some(l.t);
                    // A checkpoint that closes an epoch (a repair) has no closing time.
                    e.closing = l.number("closing_ns").ok().filter(|&c| c > 0);
                }
                "received" => received_acks.push((l.t, l.number("epoch")?)),
                "acked" => verified_acks.push((l.t, l.number("epoch")?)),
                "release" if l.fields.contains(&"verified") => {
                    let produced = l.t.saturating_sub(l.number("held_ns")?);
                    let e = epochs.entry(l.number("epoch")?).or_default();
                    e.last_output = Some(e.last_output.map_or(produced, |p| p.max(produced)));
                    e.released = Some(e.released.map_or(l.t, |r| r.max(l.t)));
                }
                _ => {}
            }
        }
        for line in standby.lines() {
            let l = Line::parse(line)?;
            match l.event {
                "received" => {
                    epochs.entry(l.number("epoch")?).or_default().received = Some(l.t);
                }
                // A repair's `verified ... checkpoint` has no replay to time.
                "verified" if l.field("replayed_ns").is_some() => {
                    let e = epochs.entry(l.number("epoch")?).or_default();
                    e.replayed = Some(l.number("replayed_ns")?);
                    e.verified = Some(l.t);
                }
                _ => {}
            }
        }
        for (&k, e) in &epochs {
            let acked = first_covering(&verified_acks, k);
            if let Some(shipped) = e.shipped {
                if let Some(t) = first_covering(&received_acks, k) {
                    self.received_ack.push(gap(shipped, t));
                }
                if let Some(t) = acked {
                    self.verified_ack.push(gap(shipped, t));
                }
            }
            let (
                Some(output),
                Some(closing),
                Some(shipped),
                Some(received),
                Some(replayed),
                Some(verified),
                Some(acked),
                Some(released),
            ) = (
                e.last_output,
                e.closing,
                e.shipped,
                e.received,
                e.replayed,
                e.verified,
                acked,
                e.released,
            )
            else {
                continue;
            };
            let points = [
                output, closing, shipped, received, replayed, verified, acked, released,
            ];
            for (i, w) in points.windows(2).enumerate() {
                self.stages[i].push(gap(w[0], w[1]));
            }
            self.total.push(gap(output, released));
        }
        Ok(())
    }
}

impl Breakdown {
    /// Prints the table: p50 and p99 of each stage, then of the whole output delay.
    pub fn print_table(&mut self, indent: &str) {
        for (name, samples) in STAGES.iter().zip(self.stages.iter_mut()) {
            if samples.is_empty() {
                continue;
            }
            println!(
                "{indent}{name:<22} p50 {:>9.3} ms   p99 {:>9.3} ms",
                ms(percentile(samples, 50)),
                ms(percentile(samples, 99))
            );
        }
        if !self.total.is_empty() {
            println!(
                "{indent}{:<22} p50 {:>9.3} ms   p99 {:>9.3} ms",
                "last output -> released",
                ms(percentile(&mut self.total, 50)),
                ms(percentile(&mut self.total, 99))
            );
        }
    }
}
