//! One pair connection: the handshake on a blocking socket, then a non-blocking [`Link`]
//! driven by a mio event loop. Nothing a peer sends is trusted: a wrong magic, another
//! protocol version, another host kind, a damaged frame or a connection closed in the middle
//! of a frame is a [`ChannelError`] that names the peer and the byte offset, never a panic.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ftvm_proto::channel::{message::Body, Hello, Message, Role};
use ftvm_proto::frame::{self, FrameError, FrameReader};
use ftvm_proto::{CHANNEL_MAGIC, PROTOCOL_VERSION};

use crate::host::HostKind;

/// The channel failed. Every variant names the peer.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// No connection could be made before the deadline.
    #[error("cannot connect to {peer}: {source} (gave up after {waited:.1?})")]
    Connect {
        /// The address.
        peer: String,
        /// The last reason.
        #[source]
        source: io::Error,
        /// How long it tried.
        waited: Duration,
    },
    /// The peer does not speak the pair protocol at all.
    #[error(
        "{peer} is not an ftvm pair endpoint: it sent {got:?} where {:?} belongs",
        String::from_utf8_lossy(CHANNEL_MAGIC)
    )]
    BadMagic {
        /// The peer.
        peer: String,
        /// What it sent instead (lossy text).
        got: String,
    },
    /// The peer speaks another protocol version.
    #[error("{peer} ({software}) speaks pair protocol version {theirs}, this ftvm speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The peer.
        peer: String,
        /// Its version.
        theirs: u32,
        /// Its software string.
        software: String,
    },
    /// The peer runs on another kind of host: a guest cannot be replayed across host kinds
    /// (KVM flavour, CPU vendor), so the pair is refused. Both sides see both hellos, so
    /// both refuse.
    #[error("refusing the pair with {peer}: the {their_role} runs on {theirs}, this {our_role} on {ours}; a guest cannot replay across host kinds")]
    HostMismatch {
        /// The peer.
        peer: String,
        /// The peer's role ("primary", "standby").
        their_role: &'static str,
        /// The peer's host kind.
        theirs: Box<HostKind>,
        /// This side's role.
        our_role: &'static str,
        /// This host's kind.
        ours: Box<HostKind>,
    },
    /// The peer sent a message that does not belong here.
    #[error("{peer} broke the pair protocol: expected {expected}, got {got}")]
    Unexpected {
        /// The peer.
        peer: String,
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// The peer closed the connection (its process is gone) at a frame boundary.
    #[error("{peer} closed the connection")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("{peer} closed the connection in the middle of a frame: {source}")]
    ClosedMidFrame {
        /// The peer.
        peer: String,
        /// Where.
        #[source]
        source: FrameError,
    },
    /// A frame is damaged.
    #[error("{peer} sent a malformed frame: {source}")]
    Frame {
        /// The peer.
        peer: String,
        /// What is wrong with it.
        #[source]
        source: FrameError,
    },
    /// The socket failed (reset, broken pipe).
    #[error("connection to {peer} failed: {source}")]
    Io {
        /// The peer.
        peer: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Nothing arrived for longer than the heartbeat timeout.
    #[error("{peer} silent for {silent:.0?} (heartbeat timeout {timeout:.0?})")]
    Silent {
        /// The peer.
        peer: String,
        /// How long nothing came.
        silent: Duration,
        /// The timeout.
        timeout: Duration,
    },
    /// The peer did not finish the handshake in time.
    #[error("{peer} did not complete the pair handshake within {timeout:.1?}")]
    HandshakeTimeout {
        /// The peer.
        peer: String,
        /// The limit.
        timeout: Duration,
    },
}

impl ChannelError {
    fn io(peer: &str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::UnexpectedEof => ChannelError::Closed { peer: peer.into() },
            _ => ChannelError::Io {
                peer: peer.into(),
                source,
            },
        }
    }
}

/// Heartbeats and the failure detector.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// Each side sends a heartbeat this often.
    pub interval: Duration,
    /// A peer silent for this long is lost.
    pub timeout: Duration,
}

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
/// Default heartbeat timeout: three intervals.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(150);

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

/// How long each handshake read may wait.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `peer`, retrying with exponential backoff (50 ms doubling to 1 s) until
/// `timeout` has passed.
pub fn connect(peer: &str, timeout: Duration) -> Result<TcpStream, ChannelError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = peer.to_socket_addrs().and_then(|addrs| {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing");
            for addr in addrs {
                let left = timeout.saturating_sub(start.elapsed()).max(backoff);
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(source) => {
                let waited = start.elapsed();
                if waited + backoff > timeout {
                    return Err(ChannelError::Connect {
                        peer: peer.into(),
                        source,
                        waited,
                    });
                }
                tracing::debug!(peer, "connect failed ({source}); retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A connection whose handshake is done: what [`Link::new`] takes over.
pub struct Handshaken {
    /// The socket (still blocking).
    pub stream: TcpStream,
    /// The peer, for messages.
    pub peer: String,
    /// The peer's hello.
    pub hello: Hello,
    /// Stream offset of the next frame from the peer.
    pub rx_offset: u64,
}

fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Primary) => "a primary",
        Ok(Role::Standby) => "a standby",
        _ => "an endpoint of unknown role",
    }
}

/// The `Body` name of a message, for errors.
pub fn body_name(m: &Message) -> &'static str {
    match &m.body {
        Some(Body::Hello(_)) => "Hello",
        Some(Body::Start(_)) => "Start",
        Some(Body::Batch(_)) => "a record batch",
        Some(Body::Released(_)) => "Released",
        Some(Body::Heartbeat(_)) => "Heartbeat",
        Some(Body::Ack(_)) => "Ack",
        Some(Body::Diverged(_)) => "Diverged",
        Some(Body::Pages(_)) => "a page chunk",
        Some(Body::CheckpointEnd(_)) => "CheckpointEnd",
        Some(Body::Ready(_)) => "Ready",
        Some(Body::Switchover(_)) => "Switchover",
        None => "an empty message",
    }
}

/// Sends `msg` as one frame on a blocking socket.
pub fn send_blocking(
    stream: &mut TcpStream,
    peer: &str,
    msg: &Message,
) -> Result<(), ChannelError> {
    stream
        .write_all(&frame::encode(msg))
        .map_err(|e| ChannelError::io(peer, e))
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one message from a blocking socket whose read timeout is set; `offset` is the
/// stream offset of the frame and advances past it.
pub fn recv_blocking(
    stream: &mut TcpStream,
    peer: &str,
    offset: &mut u64,
) -> Result<Message, ChannelError> {
    let mut frames = FrameReader::new(&mut *stream, *offset);
    let result = frames.read_frame::<Message>();
    *offset = frames.offset();
    match result {
        Ok(Some((_, m))) => Ok(m),
        Ok(None) => Err(ChannelError::Closed { peer: peer.into() }),
        Err(FrameError::Io { source, .. }) if timed_out(&source) => {
            Err(ChannelError::HandshakeTimeout {
                peer: peer.into(),
                timeout: HANDSHAKE_TIMEOUT,
            })
        }
        Err(source @ FrameError::Truncated { .. }) => Err(ChannelError::ClosedMidFrame {
            peer: peer.into(),
            source,
        }),
        Err(source) => Err(ChannelError::Frame {
            peer: peer.into(),
            source,
        }),
    }
}

/// The pair handshake, the same on both sides: send the magic and a Hello naming our role
/// and this host's kind ([`HostKind::local`]), then read the peer's and check its magic,
/// protocol version, role (it must be the other one) and host kind (it must be ours). Both
/// sides send before reading, so each learns the other's version and host even when they
/// differ, and both refuse a mismatch.
pub fn handshake(stream: TcpStream, peer: &str, role: Role) -> Result<Handshaken, ChannelError> {
    handshake_on(stream, peer, role, HostKind::local())
}

/// [`handshake`] as a host of kind `host`.
pub fn handshake_on(
    mut stream: TcpStream,
    peer: &str,
    role: Role,
    host: &HostKind,
) -> Result<Handshaken, ChannelError> {
    let io_err = |e| ChannelError::io(peer, e);
    stream.set_nodelay(true).map_err(io_err)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io_err)?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: role as i32,
        software: format!("ftvm {}", env!("CARGO_PKG_VERSION")),
        host: Some(host.to_proto()),
    };
    let mut first = CHANNEL_MAGIC.to_vec();
    first.extend_from_slice(&frame::encode(&Message {
        body: Some(Body::Hello(hello)),
    }));
    stream.write_all(&first).map_err(io_err)?;

    let mut magic = [0u8; 8];
    let mut got = 0;
    while got < magic.len() {
        match stream.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) && got == 0 => {
                return Err(ChannelError::HandshakeTimeout {
                    peer: peer.into(),
                    timeout: HANDSHAKE_TIMEOUT,
                })
            }
            Err(e) if timed_out(&e) => break,
            Err(e) => return Err(io_err(e)),
        }
    }
    if got == 0 {
        return Err(ChannelError::Closed { peer: peer.into() });
    }
    if &magic[..got] != CHANNEL_MAGIC {
        return Err(ChannelError::BadMagic {
            peer: peer.into(),
            got: String::from_utf8_lossy(&magic[..got]).into_owned(),
        });
    }
    let mut offset = magic.len() as u64;
    let msg = recv_blocking(&mut stream, peer, &mut offset)?;
    let Some(Body::Hello(theirs)) = msg.body else {
        return Err(ChannelError::Unexpected {
            peer: peer.into(),
            expected: "Hello",
            got: body_name(&msg).into(),
        });
    };
    if theirs.protocol_version != PROTOCOL_VERSION {
        return Err(ChannelError::Version {
            peer: peer.into(),
            theirs: theirs.protocol_version,
            software: theirs.software,
        });
    }
    let wanted = match role {
        Role::Primary => Role::Standby,
        _ => Role::Primary,
    };
    if theirs.role != wanted as i32 {
        return Err(ChannelError::Unexpected {
            peer: peer.into(),
            expected: role_name(wanted as i32),
            got: role_name(theirs.role).into(),
        });
    }
    let their_host = HostKind::from_proto(theirs.host.as_ref());
    if !their_host.compatible(host) {
        let name = |role: Role| match role {
            Role::Primary => "primary",
            _ => "standby",
        };
        return Err(ChannelError::HostMismatch {
            peer: peer.into(),
            their_role: name(wanted),
            theirs: Box::new(their_host),
            our_role: name(role),
            ours: Box::new(host.clone()),
        });
    }
    tracing::debug!(peer, host = %their_host, "pair handshake done");
    Ok(Handshaken {
        stream,
        peer: peer.into(),
        hello: theirs,
        rx_offset: offset,
    })
}

/// A connection after its handshake, non-blocking, on a mio event loop.
pub struct Link {
    stream: mio::net::TcpStream,
    peer: String,
    rx: Vec<u8>,
    rx_offset: u64,
    tx: Vec<u8>,
    tx_done: usize,
    /// When the last bytes arrived.
    pub last_rx: Instant,
    /// When the last message was queued.
    pub last_tx: Instant,
    /// Bytes sent so far (frames).
    pub bytes_sent: u64,
    /// Bytes received so far (frames).
    pub bytes_received: u64,
}

impl Link {
    /// Takes over a handshaken connection.
    pub fn new(h: Handshaken) -> Result<Self, ChannelError> {
        h.stream
            .set_nonblocking(true)
            .map_err(|e| ChannelError::io(&h.peer, e))?;
        let now = Instant::now();
        Ok(Self {
            stream: mio::net::TcpStream::from_std(h.stream),
            peer: h.peer,
            rx: Vec::new(),
            rx_offset: h.rx_offset,
            tx: Vec::new(),
            tx_done: 0,
            last_rx: now,
            last_tx: now,
            bytes_sent: 0,
            bytes_received: 0,
        })
    }

    /// The peer.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Registers the socket for readable and writable events under `token`.
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        registry.register(
            &mut self.stream,
            token,
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        )
    }

    /// Removes the socket from `registry` (before the link moves to another event loop).
    pub fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        registry.deregister(&mut self.stream)
    }

    /// Queues `msg` and writes as much as the socket takes now.
    pub fn send(&mut self, msg: &Message) -> Result<(), ChannelError> {
        let frame = frame::encode(msg);
        self.bytes_sent += frame.len() as u64;
        self.tx.extend_from_slice(&frame);
        self.last_tx = Instant::now();
        self.flush()
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.tx.len() - self.tx_done
    }

    /// Writes queued bytes until the socket would block.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        while self.tx_done < self.tx.len() {
            match self.stream.write(&self.tx[self.tx_done..]) {
                Ok(0) => {
                    return Err(ChannelError::Closed {
                        peer: self.peer.clone(),
                    })
                }
                Ok(n) => self.tx_done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ChannelError::io(&self.peer, e)),
            }
        }
        if self.tx_done == self.tx.len() {
            self.tx.clear();
            self.tx_done = 0;
        } else if self.tx_done > (1 << 20) {
            self.tx.drain(..self.tx_done);
            self.tx_done = 0;
        }
        Ok(())
    }

    /// Reads everything available and appends the complete messages to `out`. Messages that
    /// arrived before a failure (for example before the peer closed) are in `out` even when
    /// an error is returned.
    pub fn receive(&mut self, out: &mut Vec<Message>) -> Result<(), ChannelError> {
        let mut buf = [0u8; 64 * 1024];
        let mut end = None;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    end = Some(None);
                    break;
                }
                Ok(n) => {
                    self.rx.extend_from_slice(&buf[..n]);
                    self.bytes_received += n as u64;
                    self.last_rx = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    end = Some(Some(e));
                    break;
                }
            }
        }
        let mut used = 0;
        while let Some((msg, len)) = frame::decode_from::<Message>(&self.rx[used..], self.rx_offset)
            .map_err(|source| ChannelError::Frame {
                peer: self.peer.clone(),
                source,
            })?
        {
            out.push(msg);
            used += len;
            self.rx_offset += len as u64;
        }
        self.rx.drain(..used);
        match end {
            None => Ok(()),
            Some(Some(e)) => Err(ChannelError::io(&self.peer, e)),
            Some(None) if self.rx.is_empty() => Err(ChannelError::Closed {
                peer: self.peer.clone(),
            }),
            Some(None) => Err(ChannelError::ClosedMidFrame {
                peer: self.peer.clone(),
                source: frame::truncated(&self.rx, self.rx_offset),
            }),
        }
    }

    /// The failure detector: an error once the peer has been silent past `timeout`.
    pub fn check_alive(&self, now: Instant, timeout: Duration) -> Result<(), ChannelError> {
        let silent = now.saturating_duration_since(self.last_rx);
        if silent > timeout {
            return Err(ChannelError::Silent {
                peer: self.peer.clone(),
                silent,
                timeout,
            });
        }
        Ok(())
    }

    /// One heartbeat period's work: the failure detector, then a heartbeat if nothing was
    /// sent for an interval.
    pub fn tick(&mut self, now: Instant, heartbeat: &Heartbeat) -> Result<(), ChannelError> {
        self.check_alive(now, heartbeat.timeout)?;
        if now.duration_since(self.last_tx) >= heartbeat.interval {
            self.send(&Message {
                body: Some(Body::Heartbeat(Default::default())),
            })?;
        }
        Ok(())
    }

    /// How long the event loop may wait: until the next heartbeat is due.
    pub fn until_next_heartbeat(&self, heartbeat: &Heartbeat) -> Duration {
        (self.last_tx + heartbeat.interval).saturating_duration_since(Instant::now())
    }

    /// Writes what is still queued (a last `Released`, `Ack` or `Diverged`) before the
    /// connection closes, for at most `limit`.
    pub fn drain(&mut self, poll: &mut mio::Poll, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut events = mio::Events::with_capacity(8);
        while self.pending() > 0 && Instant::now() < deadline {
            if self.flush().is_err() {
                break;
            }
            let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        }
    }
}

/// Registers the control socket of `options` (if any) on `poll` under `token`.
pub fn register_control(
    listener: Option<&std::net::TcpListener>,
    poll: &mio::Poll,
    token: mio::Token,
) -> io::Result<Option<mio::net::TcpListener>> {
    let Some(l) = listener else { return Ok(None) };
    let l = l.try_clone()?;
    l.set_nonblocking(true)?;
    let mut l = mio::net::TcpListener::from_std(l);
    poll.registry()
        .register(&mut l, token, mio::Interest::READABLE)?;
    Ok(Some(l))
}

/// The event loop's wait: until the link's next heartbeat, or one heartbeat interval with no
/// link. Never unbounded: on this machine's kernel (6.18) a waker write was seen not to end
/// an unbounded `epoll_wait` about once in five runs under load (docs/ARCHITECTURE.md).
pub fn poll_timeout(link: Option<&Link>, heartbeat: &Heartbeat) -> Duration {
    link.map_or(heartbeat.interval, |l| l.until_next_heartbeat(heartbeat))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::KvmFlavour;
    use std::net::TcpListener;

    fn host(kvm: KvmFlavour, vendor: &str) -> HostKind {
        HostKind {
            kvm,
            vendor: vendor.into(),
        }
    }

    /// A primary on `primary_host` and a standby on `standby_host` meet over loopback.
    fn pair(
        primary_host: HostKind,
        standby_host: HostKind,
    ) -> (
        Result<Handshaken, ChannelError>,
        Result<Handshaken, ChannelError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let standby = std::thread::spawn(move || {
            let (stream, peer) = listener.accept().expect("accept");
            handshake_on(stream, &peer.to_string(), Role::Standby, &standby_host)
        });
        let stream = TcpStream::connect(&addr).expect("connect");
        let primary = handshake_on(stream, &addr, Role::Primary, &primary_host);
        (primary, standby.join().expect("standby thread"))
    }

    #[test]
    fn hosts_of_the_same_kind_pair() {
        let h = host(KvmFlavour::Svm, "AuthenticAMD");
        let (p, s) = pair(h.clone(), h.clone());
        let p = p.expect("primary handshake");
        let s = s.expect("standby handshake");
        assert_eq!(HostKind::from_proto(p.hello.host.as_ref()), h);
        assert_eq!(HostKind::from_proto(s.hello.host.as_ref()), h);
    }

    #[test]
    fn both_sides_refuse_hosts_of_another_kind() {
        let (p, s) = pair(
            host(KvmFlavour::Svm, "AuthenticAMD"),
            host(KvmFlavour::Pvm, "AuthenticAMD"),
        );
        let p = p.err().expect("the primary must refuse").to_string();
        let s = s.err().expect("the standby must refuse").to_string();
        assert!(
            p.starts_with("refusing the pair with 127.0.0.1:")
                && p.ends_with(": the standby runs on PVM on AuthenticAMD, this primary on KVM (SVM) on AuthenticAMD; a guest cannot replay across host kinds"),
            "{p}"
        );
        assert!(
            s.starts_with("refusing the pair with 127.0.0.1:")
                && s.ends_with(": the primary runs on KVM (SVM) on AuthenticAMD, this standby on PVM on AuthenticAMD; a guest cannot replay across host kinds"),
            "{s}"
        );
    }

    #[test]
    fn another_cpu_vendor_is_refused() {
        let (p, s) = pair(
            host(KvmFlavour::Pvm, "GenuineIntel"),
            host(KvmFlavour::Pvm, "AuthenticAMD"),
        );
        assert!(matches!(p, Err(ChannelError::HostMismatch { .. })));
        let s = s.err().expect("the standby must refuse").to_string();
        assert!(
            s.contains(
                "the primary runs on PVM on GenuineIntel, this standby on PVM on AuthenticAMD"
            ),
            "{s}"
        );
    }
}
