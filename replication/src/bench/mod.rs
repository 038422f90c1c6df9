//! `ftvm bench`: the logging channel between two real hosts, measured over the channel's own
//! code (the pair handshake, CRC-checked frames, record batches answered by acks, the mio
//! event loop), each figure next to its baseline, raw TCP, measured between the same two
//! hosts in the same run.
//!
//! One host runs the responder ([`serve`], `ftvm bench --listen ADDR`); the other runs
//! [`run`] (`ftvm bench --peer ADDR`). A connection starts with 8 bytes that say what it is:
//! the pair magic (`FTVMPAIR`: a pair handshake as a standby follows, then every record batch
//! that closes an epoch is acknowledged at once, as a standby's channel would acknowledge it
//! received) or [`RAW_MAGIC`] followed by a mode byte (`e`: echo 64-byte messages; `s`: sink
//! a length-prefixed stream and answer with its length) or [`SEALED_MAGIC`] followed by
//! a cipher byte (`c`: ChaChaPoly, `a`: AES-GCM), the Noise handshake with the pair key
//! ([`link::secure`]) and then the same as after `FTVMPAIR`, encrypted: so one run prints the
//! channel's figures with and without encryption, next to raw TCP.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_proto::channel::{message::Body, Ack, Message, Role};
use ftvm_proto::log::{record::Kind, EpochEnd, Record, RecordBatch};
use ftvm_proto::packed::{self, PackedWriter};
use mio::{Events, Poll, Token};
use prost::Message as _;

use crate::host::HostKind;
use crate::link::secure::{self, Purpose, SecureStream, Security};
use crate::link::{self, ChannelError, Link};

mod report;

/// First bytes of a raw-TCP baseline connection.
pub const RAW_MAGIC: &[u8; 8] = b"FTVMRAW\0";
/// First bytes of an encrypted channel connection.
pub const SEALED_MAGIC: &[u8; 8] = b"FTVMSEC\0";

/// The ciphers measured: the byte that names each, its Noise protocol, its name.
const CIPHERS: [(u8, &str, &str); 2] = [
    (b'a', secure::NOISE_PARAMS, "AES-GCM"),
    (b'c', secure::NOISE_PARAMS_CHACHA, "ChaChaPoly"),
];

/// Connections the responder serves at once; more are closed at once.
const MAX_CONNECTIONS: usize = 8;

/// Bytes of batches the throughput figure queues before it writes them (the raw baseline
/// writes 1 MiB at a time).
const WRITE_AT_LEAST: usize = 256 << 10;

/// Size of a raw round-trip message (about an ack frame).
const RAW_MESSAGE: usize = 64;

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The channel failed (no listener, a refused handshake, a closed connection).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A raw baseline connection failed.
    #[error("raw TCP baseline with {peer}: {source}")]
    Raw {
        /// The responder.
        peer: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The responder answered something that is not the benchmark's answer.
    #[error("{peer} is not an ftvm bench responder: {what}")]
    Protocol {
        /// The responder.
        peer: String,
        /// What was wrong.
        what: String,
    },
}

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Round trips per latency figure.
    pub samples: usize,
    /// Records in a large batch.
    pub large_records: usize,
    /// How long each throughput figure is measured.
    pub duration: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            samples: 2000,
            large_records: 1000,
            duration: Duration::from_secs(2),
        }
    }
}

pub use self::report::{BenchReport, Latency, Sealed};

/// Serves benchmark connections on `listener` until it fails; encrypted ones with the key
/// of `security`.
pub fn serve(listener: TcpListener, security: Security) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, addr) = listener.accept()?;
        let peer = addr.to_string();
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!(peer, "bench: too many connections; closing this one");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let active = active.clone();
        let security = security.clone();
        let spawned = std::thread::Builder::new()
            .name("ftvm-bench".into())
            .spawn(move || {
                if let Err(e) = respond(stream, &peer, &security) {
                    tracing::info!(peer, "bench connection ended: {e}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("bench: cannot start a thread: {e}");
        }
    }
}

fn respond(stream: TcpStream, peer: &str, security: &Security) -> Result<(), BenchError> {
    let raw = raw_error(peer);
    stream
        .set_read_timeout(Some(link::HANDSHAKE_TIMEOUT))
        .map_err(raw)?;
    let mut magic = [0u8; 8];
    let mut got = 0;
    while got < magic.len() {
        match stream.peek(&mut magic[got..]).map_err(raw)? {
            0 => return Ok(()),
            n if n == magic.len() => got = n,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    if &magic == ftvm_proto::CHANNEL_MAGIC {
        let h = link::handshake(
            stream,
            peer,
            link::Me {
                role: Role::Standby,
                initiator: false,
                security: &Security::Insecure,
            },
            link::Heartbeat::default(),
        )?;
        return respond_channel(h, peer);
    }
    if &magic == SEALED_MAGIC {
        let mut stream = stream;
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).map_err(raw)?;
        let Some((_, params, _)) = CIPHERS.iter().find(|(b, _, _)| *b == head[8]) else {
            return Err(BenchError::Protocol {
                peer: peer.into(),
                what: format!("unknown cipher {:#x}", head[8]),
            });
        };
        let h = sealed_handshake(stream, peer, security, params, false)?;
        return respond_channel(h, peer);
    }
    if &magic != RAW_MAGIC {
        return Err(BenchError::Protocol {
            peer: peer.into(),
            what: "unknown first bytes".into(),
        });
    }
    let mut stream = stream;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).map_err(raw)?;
    stream.set_read_timeout(None).map_err(raw)?;
    stream.set_nodelay(true).map_err(raw)?;
    match head[8] {
        b'e' => {
            let mut msg = [0u8; RAW_MESSAGE];
            loop {
                match stream.read_exact(&mut msg) {
                    Ok(()) => stream.write_all(&msg).map_err(raw)?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(raw(e)),
                }
            }
        }
        b's' => {
            let mut len = [0u8; 8];
            stream.read_exact(&mut len).map_err(raw)?;
            let want = u64::from_le_bytes(len);
            let copied = io::copy(&mut (&mut stream).take(want), &mut io::sink()).map_err(raw)?;
            stream.write_all(&copied.to_le_bytes()).map_err(raw)
        }
        other => Err(BenchError::Protocol {
            peer: peer.into(),
            what: format!("unknown raw mode {other:#x}"),
        }),
    }
}

/// The channel side of the responder: a standby's handshake, then an `Ack` for every batch
/// that closes an epoch, the moment it has arrived.
fn respond_channel(h: link::Handshaken, peer: &str) -> Result<(), BenchError> {
    let mut link = Link::new(h)?;
    let mut poll = Poll::new().map_err(|source| ChannelError::Io {
        peer: peer.into(),
        source,
    })?;
    link.register(poll.registry(), Token(0))
        .map_err(|source| ChannelError::Io {
            peer: peer.into(),
            source,
        })?;
    let mut events = Events::with_capacity(8);
    let mut inbox = Vec::new();
    loop {
        // Bounded, so a send that could not finish is retried; at once when the last
        // receive stopped at its budget (readiness is edge-triggered: no new event comes).
        let wait = if link.unread() {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        let _ = poll.poll(&mut events, Some(wait));
        link.flush()?;
        let result = link.receive(&mut inbox);
        for msg in inbox.drain(..) {
            let Some(Body::Batch(batch)) = msg.body else {
                continue;
            };
            let Some(epoch) = epoch_end(peer, &batch)? else {
                continue;
            };
            link.send(&ack(epoch, batch.complete_through))?;
        }
        match result {
            Ok(()) => {}
            Err(ChannelError::Closed { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn ack(epoch: u64, exit_seq: u64) -> Message {
    Message {
        body: Some(Body::Ack(Ack {
            received_epoch: epoch,
            verified_epoch: epoch,
            exit_seq,
        })),
    }
}

/// A batch of `records` port reads closed by the end of `epoch`.
fn batch(epoch: u64, records: usize) -> Message {
    let exit_seq = epoch * (records as u64 + 1);
    let first = exit_seq - records as u64;
    // Written straight into the packed block, as a recorder on the hot path would.
    let mut block = PackedWriter::new(first, records + 1);
    for i in 0..records as u64 {
        block.pio_read(first + i, false, 0x3fd, &[0x60]);
    }
    block.push(&Record {
        exit_seq,
        at_kick: false,
        kind: Some(Kind::EpochEnd(EpochEnd {
            epoch,
            exit_seq,
            digest: vec![0xd1; 32],
            checkpoint_required: false,
        })),
    });
    Message {
        body: Some(Body::Batch(RecordBatch {
            complete_through: exit_seq,
            records: Vec::new(),
            packed: block.finish(),
        })),
    }
}

/// The epoch a batch's block ends: every slot checked in place in one pass, only the
/// escaped records decoded (as a standby's channel checks what arrives).
fn epoch_end(peer: &str, batch: &RecordBatch) -> Result<Option<u64>, BenchError> {
    let mut epoch = None;
    packed::check(&batch.packed, |at, encoded| {
        let record =
            Record::decode(encoded).map_err(|source| packed::PackedError::Escape { at, source })?;
        if let Some(Kind::EpochEnd(e)) = record.kind {
            epoch = Some(e.epoch);
        }
        Ok(())
    })
    .map_err(|e| BenchError::Protocol {
        peer: peer.into(),
        what: format!("it sent a damaged record batch: {e}"),
    })?;
    Ok(epoch)
}

/// The Noise handshake with `params` (pair key of `security`), then the pair's `Hello`s.
fn sealed_handshake(
    mut tcp: TcpStream,
    peer: &str,
    security: &Security,
    params: &str,
    initiator: bool,
) -> Result<link::Handshaken, BenchError> {
    if matches!(security, Security::Insecure) {
        return Err(BenchError::Protocol {
            peer: peer.into(),
            what: "an encrypted channel needs --key on both sides".into(),
        });
    }
    let deadline = Instant::now() + link::HANDSHAKE_TIMEOUT;
    let cipher = secure::establish_with(
        &mut tcp,
        peer,
        security,
        Purpose::Bench,
        initiator,
        deadline,
        params,
    )?;
    let role = if initiator {
        Role::Primary
    } else {
        Role::Standby
    };
    Ok(link::exchange_hellos(
        SecureStream::new(tcp, cipher),
        peer,
        role,
        HostKind::local(),
        link::Heartbeat::default(),
        deadline,
    )?)
}

/// Measures the channel to the responder at `peer`: with `security`'s key, encrypted too.
pub fn run(
    peer: &str,
    options: BenchOptions,
    security: &Security,
) -> Result<BenchReport, BenchError> {
    let raw_rtt = raw_round_trips(peer, options.samples)?;
    let raw_mib_per_s = raw_throughput(peer, options.duration)?;
    let plain = measure(Channel::open(peer, None)?, options)?;
    let mut encrypted = Vec::new();
    if let Security::Key(_) = security {
        for (byte, params, name) in CIPHERS {
            let channel = Channel::open(peer, Some((security, byte, params)))?;
            let m = measure(channel, options)?;
            encrypted.push(Sealed {
                cipher: name.into(),
                ack_small: m.0,
                ack_large: m.1,
                log_mib_per_s: m.2,
            });
        }
    }
    Ok(BenchReport {
        peer: peer.into(),
        raw_rtt,
        raw_mib_per_s,
        ack_small: plain.0,
        ack_large: plain.1,
        large_records: options.large_records,
        log_mib_per_s: plain.2,
        encrypted,
    })
}

/// Ack latency (1-record and large batches) and log throughput over `channel`.
fn measure(
    mut channel: Channel,
    options: BenchOptions,
) -> Result<(Latency, Latency, f64), BenchError> {
    let ack_small = channel.round_trips(1, options.samples, 0)?;
    let large_samples = (options.samples / 4).max(1);
    let ack_large = channel.round_trips(
        options.samples as u64 + 1,
        large_samples,
        options.large_records,
    )?;
    let log_mib_per_s = channel.throughput(
        (options.samples + large_samples) as u64 + 1,
        options.large_records,
        options.duration,
    )?;
    Ok((ack_small, ack_large, log_mib_per_s))
}

/// Turns an I/O error on a raw baseline connection to `peer` into a [`BenchError`].
fn raw_error(peer: &str) -> impl Fn(io::Error) -> BenchError + Copy + '_ {
    move |source| BenchError::Raw {
        peer: peer.into(),
        source,
    }
}

fn raw_connect(peer: &str, mode: u8) -> Result<TcpStream, BenchError> {
    let mut s = link::connect(peer, Duration::from_secs(2))?;
    let raw = raw_error(peer);
    s.set_nodelay(true).map_err(raw)?;
    let mut head = RAW_MAGIC.to_vec();
    head.push(mode);
    s.write_all(&head).map_err(raw)?;
    Ok(s)
}

fn raw_round_trips(peer: &str, samples: usize) -> Result<Latency, BenchError> {
    let mut s = raw_connect(peer, b'e')?;
    let raw = raw_error(peer);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(raw)?;
    let msg = [0x5a; RAW_MESSAGE];
    let mut back = [0u8; RAW_MESSAGE];
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        s.write_all(&msg).map_err(raw)?;
        s.read_exact(&mut back).map_err(raw)?;
        times.push(t.elapsed());
    }
    Ok(Latency::of(times))
}

fn raw_throughput(peer: &str, duration: Duration) -> Result<f64, BenchError> {
    let raw = raw_error(peer);
    let chunk = vec![0xa5u8; 1 << 20];
    // Measure how much one second-slice takes, then send a fixed amount sized for the
    // duration (the sink needs the length up front).
    let probe = Instant::now();
    let mut probe_s = raw_connect(peer, b's')?;
    probe_s
        .write_all(&(64u64 << 20).to_le_bytes())
        .map_err(raw)?;
    for _ in 0..64 {
        probe_s.write_all(&chunk).map_err(raw)?;
    }
    let mut done = [0u8; 8];
    probe_s.read_exact(&mut done).map_err(raw)?;
    let per_mib = probe.elapsed().as_secs_f64() / 64.0;
    let mib = ((duration.as_secs_f64() / per_mib.max(1e-9)) as u64).clamp(16, 64 << 10);
    let mut s = raw_connect(peer, b's')?;
    let start = Instant::now();
    s.write_all(&(mib << 20).to_le_bytes()).map_err(raw)?;
    for _ in 0..mib {
        s.write_all(&chunk).map_err(raw)?;
    }
    s.read_exact(&mut done).map_err(raw)?;
    if u64::from_le_bytes(done) != mib << 20 {
        return Err(BenchError::Protocol {
            peer: peer.into(),
            what: "the raw sink counted another length".into(),
        });
    }
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

/// The benchmark's end of a pair connection: the real handshake and `Link`, on a mio poll.
struct Channel {
    peer: String,
    link: Link,
    poll: Poll,
    events: Events,
    inbox: Vec<Message>,
}

impl Channel {
    /// A plain channel, or one encrypted with (key, cipher byte, Noise protocol).
    fn open(peer: &str, sealed: Option<(&Security, u8, &str)>) -> Result<Self, BenchError> {
        let mut stream = link::connect(peer, Duration::from_secs(2))?;
        let h = match sealed {
            None => link::handshake(
                stream,
                peer,
                link::Me {
                    role: Role::Primary,
                    initiator: true,
                    security: &Security::Insecure,
                },
                link::Heartbeat::default(),
            )?,
            Some((security, byte, params)) => {
                let mut head = SEALED_MAGIC.to_vec();
                head.push(byte);
                stream.write_all(&head).map_err(raw_error(peer))?;
                sealed_handshake(stream, peer, security, params, true)?
            }
        };
        let mut link = Link::new(h)?;
        let io = |source| ChannelError::Io {
            peer: peer.into(),
            source,
        };
        let poll = Poll::new().map_err(io)?;
        link.register(poll.registry(), Token(0)).map_err(io)?;
        Ok(Self {
            peer: peer.into(),
            link,
            poll,
            events: Events::with_capacity(8),
            inbox: Vec::new(),
        })
    }

    /// Waits for the ack of `epoch`, sending what is queued meanwhile.
    fn await_ack(&mut self, epoch: u64) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.link.flush()?;
            self.link.receive(&mut self.inbox)?;
            for msg in self.inbox.drain(..) {
                match msg.body {
                    Some(Body::Ack(a)) if a.verified_epoch >= epoch => return Ok(()),
                    Some(Body::Ack(_) | Body::Heartbeat(_)) => {}
                    _ => {
                        return Err(BenchError::Protocol {
                            peer: self.peer.clone(),
                            what: format!("it sent {}", link::body_name(&msg)),
                        })
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::Protocol {
                    peer: self.peer.clone(),
                    what: format!("no ack for epoch {epoch} within 10 s"),
                });
            }
            let _ = self
                .poll
                .poll(&mut self.events, Some(Duration::from_millis(50)));
        }
    }

    fn round_trips(
        &mut self,
        first_epoch: u64,
        samples: usize,
        records: usize,
    ) -> Result<Latency, BenchError> {
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples as u64 {
            let msg = batch(first_epoch + i, records);
            let t = Instant::now();
            self.link.send(&msg)?;
            self.await_ack(first_epoch + i)?;
            times.push(t.elapsed());
        }
        Ok(Latency::of(times))
    }

    /// Streams batches for `duration`, keeping at most 4 MiB in flight; MiB/s of frames.
    fn throughput(
        &mut self,
        first_epoch: u64,
        records: usize,
        duration: Duration,
    ) -> Result<f64, BenchError> {
        let start = Instant::now();
        let sent_before = self.link.bytes_sent;
        let mut epoch = first_epoch;
        while start.elapsed() < duration {
            if self.link.pending() < 4 << 20 {
                // As a primary's event loop does with the batches of one turn: queued, then
                // written together.
                self.link.queue(&batch(epoch, records))?;
                epoch += 1;
                if self.link.pending() >= WRITE_AT_LEAST {
                    self.link.flush()?;
                }
            } else {
                let _ = self
                    .poll
                    .poll(&mut self.events, Some(Duration::from_millis(1)));
                self.link.flush()?;
                self.link.receive(&mut self.inbox)?;
                self.inbox.clear();
            }
        }
        self.link.flush()?;
        self.await_ack(epoch - 1)?;
        let bytes = self.link.bytes_sent - sent_before;
        Ok(bytes as f64 / f64::from(1 << 20) / start.elapsed().as_secs_f64())
    }
}
