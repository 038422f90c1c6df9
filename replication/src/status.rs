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
    /// The heartbeat settings agreed with the peer (ours when there is none).
    pub heartbeat: crate::Heartbeat,
    /// With a witness: the pair's term as this side knows it.
    pub term: Option<u64>,
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
        writeln!(f, "syncs={}", self.syncs)?;
        writeln!(f, "heartbeat_ms={}", self.heartbeat.interval.as_millis())?;
        writeln!(
            f,
            "heartbeat_timeout_ms={}",
            self.heartbeat.timeout.as_millis()
        )?;
        if let Some(term) = self.term {
            writeln!(f, "term={term}")?;
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

/// How long the control socket waits for a client's request line; a client that sends
/// nothing gets the status.
const REQUEST_WAIT: Duration = Duration::from_millis(5);

/// Answers every pending control connection on `listener` with what `answer` says to its
/// request (best effort: a client that does not read only loses its own answer).
pub fn serve(listener: Option<&mio::net::TcpListener>, mut answer: impl FnMut(Request) -> String) {
    let Some(listener) = listener else { return };
    while let Ok((stream, _)) = listener.accept() {
        let Ok(mut stream) = into_blocking(stream) else {
            continue;
        };
        let mut line = [0u8; 64];
        let n = stream.read(&mut line).unwrap_or(0);
        let request = match std::str::from_utf8(&line[..n]).map(str::trim) {
            Ok("switchover") => Request::Switchover,
            Ok("promote") => Request::Promote,
            _ => Request::Status,
        };
        if let Err(e) = stream.write_all(answer(request).as_bytes()) {
            tracing::debug!("control socket: {e}");
        }
    }
}

fn into_blocking(stream: mio::net::TcpStream) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor comes from a mio stream we own and give up here.
    let stream = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_WAIT))?;
    stream.set_write_timeout(Some(Duration::from_millis(100)))?;
    Ok(stream)
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
    let text = ask(addr, "status")?;
    if !text.starts_with("role=") {
        return Err(QueryError {
            addr: addr.into(),
            source: std::io::Error::other("the answer is not an ftvm status report"),
        });
    }
    Ok(text)
}

/// Sends `request` to the control socket `addr` and returns the answer.
pub fn ask(addr: &str, request: &str) -> Result<String, QueryError> {
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
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(err)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(err)?;
    Ok(text)
}
