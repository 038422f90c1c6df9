//! Before a [`Link`](super::Link): connecting with backoff, and the pair handshake on a
//! blocking socket (magic, `Hello` with protocol version, role and host kind).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ftvm_proto::channel::{message::Body, Hello, Message, Role};
use ftvm_proto::frame::{self, FrameError, FrameReader};
use ftvm_proto::{CHANNEL_MAGIC, PROTOCOL_VERSION};

use super::secure::{self, Purpose, SecureStream, Security};
use super::ChannelError;
use crate::host::HostKind;

/// The largest `Hello` frame accepted: it arrives before the pair protocol is agreed on.
pub const MAX_HELLO: u32 = 4 << 10;

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

/// The longest heartbeat interval or timeout a peer may ask for (a peer asking for more
/// gets this): the failure detector must keep working whatever the peer says.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

impl Heartbeat {
    /// What both sides of a pair use (DESIGN.md §6): the larger interval and the larger
    /// timeout of ours and the peer's `Hello` (a value it left at 0 counts as ours; one above
    /// [`MAX_HEARTBEAT`] counts as that).
    pub fn agree(self, theirs: &Hello) -> Heartbeat {
        let peer = |ms: u32, ours: Duration| match ms {
            0 => ours,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_HEARTBEAT),
        };
        Heartbeat {
            interval: self
                .interval
                .max(peer(theirs.heartbeat_interval_ms, self.interval)),
            timeout: self
                .timeout
                .max(peer(theirs.heartbeat_timeout_ms, self.timeout)),
        }
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

/// How long the whole handshake (key, magic, `Hello`) may take: until it is done the peer
/// has proved nothing, so it gets little time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// After the handshake, how long each read of the pair's set-up (`Start`, the disk resync's
/// runs, `Ready`) may wait. The peer holds the pair's key by then, and a standby answers
/// `Start` only once it has built the VM and read its disks, which a slow or loaded host
/// (the nested harness under TCG, a busy hypervisor) can take well past the handshake's
/// bound.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The connection (still blocking; encrypted unless `--insecure`).
    pub stream: SecureStream,
    /// The peer, for messages.
    pub peer: String,
    /// The peer's hello.
    pub hello: Hello,
    /// Stream offset of the next frame from the peer.
    pub rx_offset: u64,
    /// The heartbeat settings both sides agreed on.
    pub heartbeat: Heartbeat,
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
        Some(Body::HeldOutput(_)) => "HeldOutput",
        Some(Body::Abandon(_)) => "Abandon",
        Some(Body::DiskHashes(_)) => "DiskHashes",
        Some(Body::DiskBlocks(_)) => "DiskBlocks",
        None => "an empty message",
    }
}

/// Sends `msg` as one frame on a blocking socket.
pub fn send_blocking(
    stream: &mut SecureStream,
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

/// Reads one message of the pair's set-up from a blocking socket whose read timeout is
/// [`SETUP_TIMEOUT`] (as [`handshake`] leaves it); `offset` is the stream offset of the
/// frame and advances past it.
pub fn recv_blocking(
    stream: &mut SecureStream,
    peer: &str,
    offset: &mut u64,
) -> Result<Message, ChannelError> {
    recv_limited(stream, peer, offset, frame::MAX_FRAME_LEN).map_err(|e| match e {
        ChannelError::HandshakeTimeout { peer, .. } => ChannelError::SetupTimeout {
            peer,
            timeout: SETUP_TIMEOUT,
        },
        e => e,
    })
}

/// [`recv_blocking`] of a frame of at most `limit` bytes.
fn recv_limited(
    stream: &mut SecureStream,
    peer: &str,
    offset: &mut u64,
    limit: u32,
) -> Result<Message, ChannelError> {
    let mut frames = FrameReader::new(&mut *stream, *offset).with_limit(limit);
    let result = frames.read_frame::<Message>();
    *offset = frames.offset();
    match result {
        Ok(Some((_, m))) => Ok(m),
        Ok(None) => Err(ChannelError::Closed { peer: peer.into() }),
        Err(FrameError::Io { source, .. }) if source.kind() == io::ErrorKind::InvalidData => {
            Err(ChannelError::Auth {
                peer: peer.into(),
                why: source.to_string(),
            })
        }
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
        // Any other read failure (a reset connection above all) is the connection's, not a
        // malformed frame: a resync cut that way reconnects like one cut by a close.
        Err(FrameError::Io { source, .. }) => Err(ChannelError::io(peer, source)),
        Err(source) => Err(ChannelError::Frame {
            peer: peer.into(),
            source,
        }),
    }
}

/// The pair handshake, the same on both sides: send the magic and a Hello naming our role,
/// this host's kind ([`HostKind::local`]) and our `heartbeat` settings, then read the peer's
/// and check its magic, protocol version, role (it must be the other one) and host kind (it
/// must be ours). Both sides send before reading, so each learns the other's version and
/// host even when they differ, and both refuse a mismatch. Both agree on the heartbeat
/// ([`Heartbeat::agree`]).
///
/// Before all that, with a key, the Noise handshake ([`secure::establish`]) proves that the
/// peer holds the pair's key; the side that connected (`initiator`) starts it. The whole
/// handshake must finish within [`HANDSHAKE_TIMEOUT`], and the `Hello` frame is capped at
/// [`MAX_HELLO`] bytes.
pub fn handshake(
    stream: TcpStream,
    peer: &str,
    me: Me<'_>,
    heartbeat: Heartbeat,
) -> Result<Handshaken, ChannelError> {
    handshake_on(stream, peer, me, HostKind::local(), heartbeat)
}

/// Who this side of a handshake is.
#[derive(Clone, Copy)]
pub struct Me<'a> {
    /// Its role in the pair.
    pub role: Role,
    /// Whether it connected (it starts the key exchange).
    pub initiator: bool,
    /// Its key, or `--insecure`.
    pub security: &'a Security,
}

/// [`handshake`] as a host of kind `host`.
pub fn handshake_on(
    mut tcp: TcpStream,
    peer: &str,
    me: Me<'_>,
    host: &HostKind,
    heartbeat: Heartbeat,
) -> Result<Handshaken, ChannelError> {
    let role = me.role;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io_err = |e| ChannelError::io(peer, e);
    tcp.set_nodelay(true).map_err(io_err)?;
    let cipher = secure::establish(
        &mut tcp,
        peer,
        me.security,
        Purpose::Pair,
        me.initiator,
        deadline,
    )?;
    exchange_hellos(
        SecureStream::new(tcp, cipher),
        peer,
        role,
        host,
        heartbeat,
        deadline,
    )
}

/// The pair handshake's `Hello` exchange on a connection whose keys are settled (or that
/// runs `--insecure`), finishing by `deadline`.
pub fn exchange_hellos(
    mut stream: SecureStream,
    peer: &str,
    role: Role,
    host: &HostKind,
    heartbeat: Heartbeat,
    deadline: Instant,
) -> Result<Handshaken, ChannelError> {
    let io_err = |e| ChannelError::io(peer, e);
    stream.set_deadline(Some(deadline));
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: role as i32,
        software: format!("ftvm {}", env!("CARGO_PKG_VERSION")),
        host: Some(host.to_proto()),
        heartbeat_interval_ms: millis(heartbeat.interval),
        heartbeat_timeout_ms: millis(heartbeat.timeout),
        tsc_exits: *ftvm_vmm::tsc_exits::this_host() == ftvm_vmm::tsc_exits::Probe::Present,
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
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(ChannelError::Auth {
                    peer: peer.into(),
                    why: e.to_string(),
                })
            }
            Err(e) if timed_out(&e) && got == 0 => {
                return Err(ChannelError::HandshakeTimeout {
                    peer: peer.into(),
                    timeout: HANDSHAKE_TIMEOUT,
                })
            }
            Err(e) if timed_out(&e) => break,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got == 0 => break,
            Err(e) => return Err(io_err(e)),
        }
    }
    if got == 0 && !stream.encrypted() {
        // An encrypted peer refuses an unencrypted one this way: before a word.
        return Err(ChannelError::Auth {
            peer: peer.into(),
            why: "it closed the connection before its Hello (does it require the pair key, --key?)"
                .into(),
        });
    }
    if got == 0 {
        return Err(ChannelError::Closed { peer: peer.into() });
    }
    if !stream.encrypted() && magic[..got].starts_with(&[0, 48]) {
        return Err(ChannelError::Auth {
            peer: peer.into(),
            why: "it wants an encrypted channel; give both sides the same --key".into(),
        });
    }
    if &magic[..got] != CHANNEL_MAGIC {
        return Err(ChannelError::BadMagic {
            peer: peer.into(),
            got: String::from_utf8_lossy(&magic[..got]).into_owned(),
        });
    }
    let mut offset = magic.len() as u64;
    let msg = recv_limited(&mut stream, peer, &mut offset, MAX_HELLO)?;
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
    let agreed = heartbeat.agree(&theirs);
    if agreed.timeout <= agreed.interval {
        return Err(ChannelError::Unexpected {
            peer: peer.into(),
            expected: "a heartbeat timeout longer than the heartbeat interval",
            got: format!(
                "interval {} ms, timeout {} ms",
                theirs.heartbeat_interval_ms, theirs.heartbeat_timeout_ms
            ),
        });
    }
    stream.set_deadline(None);
    stream
        .tcp()
        .set_read_timeout(Some(SETUP_TIMEOUT))
        .map_err(io_err)?;
    tracing::debug!(peer, host = %their_host, "pair handshake done");
    tracing::info!(
        peer,
        heartbeat_ms = agreed.interval.as_millis() as u64,
        heartbeat_timeout_ms = agreed.timeout.as_millis() as u64,
        "heartbeat agreed with the peer (the larger interval and timeout of both sides)"
    );
    Ok(Handshaken {
        stream,
        peer: peer.into(),
        hello: theirs,
        rx_offset: offset,
        heartbeat: agreed,
    })
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
        pair_with(
            (primary_host, Heartbeat::default()),
            (standby_host, Heartbeat::default()),
        )
    }

    /// [`pair`] with each side's heartbeat settings.
    fn pair_with(
        (primary_host, primary_hb): (HostKind, Heartbeat),
        (standby_host, standby_hb): (HostKind, Heartbeat),
    ) -> (
        Result<Handshaken, ChannelError>,
        Result<Handshaken, ChannelError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let key = Security::key(secure::PairKey::generate().expect("random"));
        let standby_key = key.clone();
        let standby = std::thread::spawn(move || {
            let (stream, peer) = listener.accept().expect("accept");
            let me = Me {
                role: Role::Standby,
                initiator: false,
                security: &standby_key,
            };
            handshake_on(stream, &peer.to_string(), me, &standby_host, standby_hb)
        });
        let stream = TcpStream::connect(&addr).expect("connect");
        let me = Me {
            role: Role::Primary,
            initiator: true,
            security: &key,
        };
        let primary = handshake_on(stream, &addr, me, &primary_host, primary_hb);
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

    fn ms(interval: u64, timeout: u64) -> Heartbeat {
        Heartbeat {
            interval: Duration::from_millis(interval),
            timeout: Duration::from_millis(timeout),
        }
    }

    #[test]
    fn both_sides_agree_on_the_larger_heartbeat_interval_and_timeout() {
        let h = host(KvmFlavour::Pvm, "AuthenticAMD");
        let (p, s) = pair_with((h.clone(), ms(200, 600)), (h, ms(50, 900)));
        let (p, s) = (p.expect("primary"), s.expect("standby"));
        for agreed in [p.heartbeat, s.heartbeat] {
            assert_eq!(agreed.interval, Duration::from_millis(200));
            assert_eq!(agreed.timeout, Duration::from_millis(900));
        }
    }

    #[test]
    fn a_peer_cannot_switch_the_failure_detector_off() {
        let ours = ms(50, 150);
        let mut theirs = Hello {
            heartbeat_interval_ms: u32::MAX,
            heartbeat_timeout_ms: u32::MAX,
            ..Default::default()
        };
        let agreed = ours.agree(&theirs);
        assert_eq!(
            (agreed.interval, agreed.timeout),
            (MAX_HEARTBEAT, MAX_HEARTBEAT)
        );
        // A peer that says nothing (0) leaves ours.
        theirs.heartbeat_interval_ms = 0;
        theirs.heartbeat_timeout_ms = 0;
        let agreed = ours.agree(&theirs);
        assert_eq!(
            (agreed.interval, agreed.timeout),
            (ours.interval, ours.timeout)
        );
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

    /// A peer that sends faster than this side reads cannot keep `receive` from returning:
    /// it stops at its budget and says more is waiting, so the event loop gets to its timers.
    #[test]
    fn receive_returns_at_its_budget_and_says_more_is_waiting() {
        let h = HostKind::local().clone();
        let (p, s) = pair(h.clone(), h);
        let mut primary = super::super::Link::new(p.expect("primary")).expect("link");
        let mut standby = super::super::Link::new(s.expect("standby")).expect("link");
        standby.set_receive_budget(64 << 10);
        let chunk = Message {
            body: Some(Body::Pages(ftvm_proto::channel::PageChunk {
                pages: vec![
                    ftvm_proto::channel::Page {
                        pfn: 1,
                        data: vec![7; 4096],
                    };
                    256
                ],
                ..Default::default()
            })),
        };
        // 12 MiB queued on the primary's side.
        for _ in 0..12 {
            primary.send(&chunk).expect("send");
        }
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut stopped_early = false;
        while got.len() < 12 && std::time::Instant::now() < deadline {
            primary.flush().expect("flush");
            standby.receive(&mut got).expect("receive");
            stopped_early |= standby.unread();
        }
        assert_eq!(got.len(), 12, "every chunk arrives");
        assert!(
            stopped_early,
            "a 12 MiB backlog takes more than one 64 KiB receive"
        );
    }

    /// A write that fails (the peer reset the connection) does not hide what the peer sent
    /// before: the `Abandon` of a primary that then died is read before the failure is
    /// reported, so the standby knows it was abandoned (DESIGN.md §5).
    #[test]
    fn a_failed_write_is_reported_after_the_messages_that_came_before_it() {
        let (got, result) = abandoned_then_reset(0, usize::MAX);
        assert!(
            matches!(
                got.as_slice(),
                [Message {
                    body: Some(Body::Abandon(_))
                }]
            ),
            "{got:?}"
        );
        assert!(result.is_err(), "then the failure");
    }

    /// The same behind a backlog longer than one receive: each receive returns what it
    /// read, and the failure comes only after the last of it.
    #[test]
    fn a_failed_write_waits_for_a_backlog_longer_than_one_receive() {
        let (got, result) = abandoned_then_reset(64, 4096);
        assert_eq!(got.len(), 65, "the backlog and Abandon");
        assert!(
            matches!(
                got.last(),
                Some(Message {
                    body: Some(Body::Abandon(_))
                })
            ),
            "{got:?}"
        );
        assert!(result.is_err(), "then the failure");
    }

    /// A primary sends `backlog` 1 KiB messages and `Abandon`, then closes with a reset (as
    /// a killed process with unread data does); the standby, reading at most `budget` bytes
    /// a receive, writes until a write fails, then receives until an error: what it got and
    /// that error.
    fn abandoned_then_reset(
        backlog: usize,
        budget: usize,
    ) -> (Vec<Message>, Result<(), ChannelError>) {
        use std::os::fd::AsRawFd;
        let h = HostKind::local().clone();
        let (p, s) = pair(h.clone(), h);
        let mut primary = super::super::Link::new(p.expect("primary")).expect("link");
        let mut standby = super::super::Link::new(s.expect("standby")).expect("link");
        standby.set_receive_budget(budget);
        let filler = Message {
            body: Some(Body::Abandon(ftvm_proto::channel::Abandon {
                reason: "x".repeat(1024),
            })),
        };
        for _ in 0..backlog {
            primary.send(&filler).expect("send");
        }
        let abandon = Message {
            body: Some(Body::Abandon(ftvm_proto::channel::Abandon {
                reason: "test".into(),
            })),
        };
        primary.send(&abandon).expect("send");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while primary.unacknowledged() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Close with a reset (SO_LINGER 0), as a killed process with unread data does.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger`, which lives for the call, on an open socket.
        let rc = unsafe {
            libc::setsockopt(
                primary.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER");
        drop(primary);
        let heartbeat = Message {
            body: Some(Body::Heartbeat(Default::default())),
        };
        while !standby.unread() && std::time::Instant::now() < deadline {
            standby
                .send(&heartbeat)
                .expect("a failed write is not reported by send");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(standby.unread(), "writing to a reset connection fails");
        let mut got = Vec::new();
        loop {
            let result = standby.receive(&mut got);
            if result.is_err() || std::time::Instant::now() > deadline {
                return (got, result);
            }
        }
    }
}
