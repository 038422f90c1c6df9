//! `ftvm status`: each pair process answers on its control socket with one report, as
//! `key=value` lines, then closes the connection.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::link::secure::{self, Purpose, SecureStream, Security};

/// What a pair process reports.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// `primary`, `standby`, or `primary (live after failover)`.
    pub role: String,
    /// Whether a verified copy of the guest exists on the other host.
    pub protected: bool,
    /// Free text: `lockstep`, `unprotected: <why>`, ...
    pub state: String,
    /// The peer's address.
    pub peer: String,
    /// The last epoch closed (primary) or received (standby).
    pub epoch: u64,
    /// The last epoch the standby verified.
    pub verified_epoch: u64,
    /// The last exit sequence number of the log shipped (primary) or received (standby).
    pub exit_seq: u64,
    /// Epochs closed but not yet verified.
    pub lag_epochs: u64,
    /// Age of the oldest epoch not yet verified.
    pub lag: Duration,
    /// Log bytes shipped (primary) or received (standby) in epochs not yet verified; the
    /// standby counts the log bytes it received since its last verified epoch.
    pub lag_bytes: u64,
    /// Log bytes per second on the channel over the last second.
    pub log_bytes_per_s: u64,
    /// Every output byte before this sequence number has been released.
    pub released_output_seq: u64,
    /// Output bytes held in the output buffer.
    pub held_output_bytes: u64,
    /// Repair checkpoints installed on the standby.
    pub repairs: u64,
    /// Syncs completed (standbys that joined a running guest).
    pub syncs: u64,
    /// Divergences the standby reported (each asks for a repair).
    pub divergences: u64,
    /// Of those, epochs the primary had to interrupt (checkpoint-required).
    pub checkpoint_required: u64,
    /// Page bytes carried by repair checkpoints (not syncs).
    pub repair_bytes: u64,
    /// While a standby syncs: page bytes it received so far, and pages left in the round
    /// (standby side; 0 otherwise).
    pub sync_bytes: u64,
    /// See `sync_bytes`.
    pub sync_pages_left: u64,
    /// The heartbeat settings agreed with the peer (ours when there is none).
    pub heartbeat: crate::Heartbeat,
    /// The guest's TSC reads are exits, logged and replayed exactly (`tsc=exits`); else the
    /// pair repairs what they make diverge (`tsc=repair`). DESIGN.md §2.
    pub tsc_exits: bool,
    /// With a witness: the pair's term as this side knows it.
    pub term: Option<u64>,
    /// With a witness: false while a claim could not reach it (the pair asks the witness
    /// only when it claims a term, so this is what it last heard).
    pub arbiter_reachable: Option<bool>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "role={}", self.role)?;
        writeln!(f, "protected={}", if self.protected { "yes" } else { "no" })?;
        writeln!(f, "state={}", self.state)?;
        writeln!(f, "peer={}", self.peer)?;
        writeln!(f, "epoch={}", self.epoch)?;
        writeln!(f, "verified_epoch={}", self.verified_epoch)?;
        writeln!(f, "exit_seq={}", self.exit_seq)?;
        writeln!(f, "lag_epochs={}", self.lag_epochs)?;
        writeln!(f, "lag_ms={:.3}", self.lag.as_secs_f64() * 1e3)?;
        writeln!(f, "lag_bytes={}", self.lag_bytes)?;
        writeln!(f, "log_bytes_per_s={}", self.log_bytes_per_s)?;
        writeln!(f, "released_output_seq={}", self.released_output_seq)?;
        writeln!(f, "held_output_bytes={}", self.held_output_bytes)?;
        writeln!(f, "repairs={}", self.repairs)?;
        writeln!(f, "syncs={}", self.syncs)?;
        writeln!(f, "divergences={}", self.divergences)?;
        writeln!(f, "checkpoint_required={}", self.checkpoint_required)?;
        writeln!(f, "repair_bytes={}", self.repair_bytes)?;
        writeln!(f, "sync_bytes={}", self.sync_bytes)?;
        writeln!(f, "sync_pages_left={}", self.sync_pages_left)?;
        writeln!(f, "heartbeat_ms={}", self.heartbeat.interval.as_millis())?;
        writeln!(
            f,
            "heartbeat_timeout_ms={}",
            self.heartbeat.timeout.as_millis()
        )?;
        writeln!(f, "tsc={}", if self.tsc_exits { "exits" } else { "repair" })?;
        if let Some(term) = self.term {
            writeln!(f, "term={term}")?;
        }
        if let Some(reachable) = self.arbiter_reachable {
            let yes = if reachable { "yes" } else { "no" };
            writeln!(f, "arbiter_reachable={yes}")?;
        }
        Ok(())
    }
}

/// Bytes per second over the last second.
#[derive(Debug, Default)]
pub struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    /// Notes the running total `total` at `now`.
    pub fn sample(&mut self, now: Instant, total: u64) {
        self.samples.push_back((now, total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// The rate between the oldest sample and (`now`, `total`).
    pub fn rate(&self, now: Instant, total: u64) -> u64 {
        match self.samples.front() {
            Some((t, first)) if now > *t => {
                ((total - first) as f64 / now.duration_since(*t).as_secs_f64()) as u64
            }
            _ => 0,
        }
    }
}

/// What a control client asks for: one line, sent as soon as it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `status` (or nothing): the [`Status`] report.
    Status,
    /// `switchover`: swap the roles of the pair (primary only).
    Switchover,
    /// `promote`: a standby waiting for a silent primary goes live (an operator's decision:
    /// DESIGN.md §5).
    Promote,
}

/// Errors of `ftvm status`.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the status of {addr}: {source}")]
pub struct QueryError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Asks the pair process whose control socket is `addr` for its status.
pub fn query(addr: &str, security: &Security) -> Result<String, QueryError> {
    let text = ask(addr, "status", security)?;
    if !text.starts_with("role=") {
        return Err(QueryError {
            addr: addr.into(),
            source: std::io::Error::other("the answer is not an ftvm status report"),
        });
    }
    Ok(text)
}

/// Sends `request` to the control socket `addr` (authenticated with the key of `security`)
/// and returns the answer.
pub fn ask(addr: &str, request: &str, security: &Security) -> Result<String, QueryError> {
    let err = |source| QueryError {
        addr: addr.into(),
        source,
    };
    let sockaddr = addr
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("address resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&sockaddr, Duration::from_secs(2)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(err)?;
    let deadline = std::time::Instant::now() + crate::control::CONTROL_DEADLINE;
    let cipher = secure::establish(&mut s, addr, security, Purpose::Control, true, deadline)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let mut s = SecureStream::new(s, cipher);
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(err)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(err)?;
    Ok(text)
}

/// The keys of a status report whose values are text; `protected` and `arbiter_reachable`
/// are yes/no; every other value is a number.
const TEXT_KEYS: [&str; 3] = ["role", "state", "peer"];

/// A status report (`key=value` lines) as one JSON object with the same keys
/// (`ftvm status --json`): `role`, `state` and `peer` as strings, `protected` and
/// `arbiter_reachable` as booleans, the rest as numbers (`lag_ms` with a fraction).
pub fn to_json(text: &str) -> serde_json::Value {
    use serde_json::Value;
    let mut object = serde_json::Map::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let json = if TEXT_KEYS.contains(&key) {
            Value::from(value)
        } else if let Some(yes) = match value {
            "yes" => Some(true),
            "no" => Some(false),
            _ => None,
        } {
            Value::from(yes)
        } else if let Ok(n) = value.parse::<u64>() {
            Value::from(n)
        } else if let Ok(x) = value.parse::<f64>() {
            Value::from(x)
        } else {
            Value::from(value)
        };
        object.insert(key.to_string(), json);
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_has_the_text_form_s_fields() {
        let status = Status {
            role: "standby".into(),
            protected: true,
            state: "lockstep".into(),
            peer: "127.0.0.1:7000".into(),
            epoch: 12,
            lag: Duration::from_micros(1500),
            term: Some(2),
            arbiter_reachable: Some(true),
            ..Default::default()
        };
        let text = status.to_string();
        let json = to_json(&text);
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), text.lines().count());
        assert_eq!(json["role"], "standby");
        assert_eq!(json["protected"], true);
        assert_eq!(json["peer"], "127.0.0.1:7000");
        assert_eq!(json["epoch"], 12);
        assert_eq!(json["lag_ms"], 1.5);
        assert_eq!(json["term"], 2);
        assert_eq!(json["arbiter_reachable"], true);
    }
}
