//! `ftvm status`: each pair process answers on its control socket with one report, as
//! `key=value` lines, then closes the connection.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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
        writeln!(f, "log_bytes_per_s={}", self.log_bytes_per_s)?;
        writeln!(f, "released_output_seq={}", self.released_output_seq)?;
        writeln!(f, "held_output_bytes={}", self.held_output_bytes)?;
        writeln!(f, "repairs={}", self.repairs)?;
        writeln!(f, "syncs={}", self.syncs)
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

/// Answers every pending control connection on `listener` with `status` (best effort: a
/// client that does not read only loses its own answer).
pub fn serve(listener: Option<&mio::net::TcpListener>, status: impl FnOnce() -> Status) {
    let Some(listener) = listener else { return };
    let text = status().to_string();
    while let Ok((mut stream, _)) = listener.accept() {
        if let Err(e) = stream.write_all(text.as_bytes()) {
            tracing::debug!("control socket: {e}");
        }
    }
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
pub fn query(addr: &str) -> Result<String, QueryError> {
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
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(err)?;
    if !text.starts_with("role=") {
        return Err(err(std::io::Error::other(
            "the answer is not an ftvm status report",
        )));
    }
    Ok(text)
}
