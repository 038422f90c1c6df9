//! One pair connection: the handshake on a blocking socket ([`handshake`]), then a
//! non-blocking [`Link`] driven by the event loop. Nothing a peer sends is trusted: a wrong
//! magic, another protocol version, another host kind, a damaged frame or a connection
//! closed in the middle of a frame is a [`ChannelError`] that names the peer and the byte
//! offset, never a panic.

mod error;
mod handshake;
mod key;
pub mod listen;
pub mod secure;

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ftvm_proto::channel::Message;
use ftvm_proto::frame;
use prost::bytes::BytesMut;

pub use self::error::ChannelError;
pub use self::handshake::{
    body_name, connect, exchange_hellos, handshake, handshake_on, recv_blocking, send_blocking,
    Handshaken, Heartbeat, Me, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,
    HANDSHAKE_TIMEOUT, MAX_HEARTBEAT, MAX_HELLO, SETUP_TIMEOUT,
};
pub use self::secure::{Cipher, PairKey, Purpose, SecureStream, Security};

/// A connection after its handshake, non-blocking, on a mio event loop.
pub struct Link {
    stream: mio::net::TcpStream,
    /// Seals what is sent and opens what arrives (None: `--insecure`).
    cipher: Option<Cipher>,
    /// Ciphertext received and not yet opened.
    sealed: Vec<u8>,
    peer: String,
    heartbeat: Heartbeat,
    /// Frames received and not yet decoded; a decoded batch's packed records stay in it.
    rx: BytesMut,
    rx_offset: u64,
    tx: Vec<u8>,
    /// A frame being sealed (reused: no allocation per message).
    frame: Vec<u8>,
    tx_done: usize,
    /// Bytes sent so far (frames).
    pub bytes_sent: u64,
    /// Bytes received so far (frames).
    pub bytes_received: u64,
    /// The last [`Link::receive`] stopped before the socket was empty.
    unread: bool,
    /// What one [`Link::receive`] reads at most.
    receive_budget: usize,
    /// A write failed: reported by the next [`Link::receive`], after what the peer sent
    /// before it (its last words, e.g. `Abandon`, must not be lost to our failed write).
    broken: Option<Box<ChannelError>>,
}

/// What one [`Link::receive`] reads at most, so a peer that sends faster than this side
/// decodes cannot keep the event loop from its timers (heartbeats, the failure detector).
const RECEIVE_BUDGET: usize = 4 << 20;

impl Link {
    /// Takes over a handshaken connection.
    pub fn new(h: Handshaken) -> Result<Self, ChannelError> {
        let (tcp, cipher, plain, sealed) = h.stream.into_parts();
        tcp.set_nonblocking(true)
            .map_err(|e| ChannelError::io(&h.peer, e))?;
        Ok(Self {
            stream: mio::net::TcpStream::from_std(tcp),
            cipher,
            sealed,
            peer: h.peer,
            heartbeat: h.heartbeat,
            rx: BytesMut::from(&plain[..]),
            rx_offset: h.rx_offset,
            tx: Vec::new(),
            frame: Vec::new(),
            tx_done: 0,
            bytes_sent: 0,
            bytes_received: 0,
            unread: false,
            receive_budget: RECEIVE_BUDGET,
            broken: None,
        })
    }

    /// The peer.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The heartbeat settings both sides agreed on in the handshake.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
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
        self.queue(msg)?;
        self.flush()
    }

    /// Queues `msg` without writing it: a sender with several messages at hand queues them
    /// all and calls [`Link::flush`] once, so they leave in one write (a write per 24 KiB
    /// batch cost the loopback channel about half its throughput in system calls).
    pub fn queue(&mut self, msg: &Message) -> Result<(), ChannelError> {
        match &mut self.cipher {
            Some(cipher) => {
                self.frame.clear();
                self.bytes_sent += frame::encode_into(&mut self.frame, msg) as u64;
                cipher
                    .seal(&self.frame, &mut self.tx)
                    .map_err(|source| ChannelError::Sealed {
                        peer: self.peer.clone(),
                        source,
                    })?
            }
            // Encoded straight into the send buffer.
            None => self.bytes_sent += frame::encode_into(&mut self.tx, msg) as u64,
        }
        Ok(())
    }

    /// Reads at most `bytes` per [`Link::receive`] (tests).
    #[cfg(test)]
    pub(crate) fn set_receive_budget(&mut self, bytes: usize) {
        self.receive_budget = bytes;
    }

    /// The last [`Link::receive`] stopped at its budget, or a write failed: call it again
    /// without waiting.
    pub fn unread(&self) -> bool {
        self.unread || self.broken.is_some()
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.tx.len() - self.tx_done
    }

    /// Bytes handed to the socket that the peer's host has not acknowledged yet (written but
    /// perhaps not delivered: a process that dies with them unacknowledged may lose them,
    /// since its host answers the peer's next bytes with a reset). 0 when it cannot tell.
    pub fn unacknowledged(&self) -> usize {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int, `queued`, which outlives the call;
        // the socket is open for as long as `self`.
        let rc = unsafe {
            libc::ioctl(
                self.stream.as_raw_fd(),
                libc::TIOCOUTQ,
                &mut queued as *mut libc::c_int,
            )
        };
        if rc == 0 {
            usize::try_from(queued).unwrap_or(0)
        } else {
            0
        }
    }

    /// Writes queued bytes until the socket would block. A write that fails is not
    /// reported here: the connection is broken, nothing more is written, and the next
    /// [`Link::receive`] returns the failure after the messages the peer sent before it.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        while self.tx_done < self.tx.len() && self.broken.is_none() {
            match self.stream.write(&self.tx[self.tx_done..]) {
                Ok(0) => {
                    self.broken = Some(Box::new(ChannelError::Closed {
                        peer: self.peer.clone(),
                    }))
                }
                Ok(n) => self.tx_done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.broken = Some(Box::new(ChannelError::io(&self.peer, e))),
            }
        }
        if self.broken.is_some() {
            self.tx.clear();
            self.tx_done = 0;
            return Ok(());
        }
        if self.tx_done == self.tx.len() {
            self.tx.clear();
            self.tx_done = 0;
        } else if self.tx_done > (1 << 20) && self.tx_done * 2 > self.tx.len() {
            // Compacted only once most of the buffer is sent, so the bytes moved are never
            // more than the bytes written (a full buffer moved per MiB sent tripled them).
            self.tx.drain(..self.tx_done);
            self.tx_done = 0;
        }
        Ok(())
    }

    /// Reads everything available and appends the complete messages to `out`. Messages that
    /// arrived before a failure (for example before the peer closed) are in `out` even when
    /// an error is returned.
    pub fn receive(&mut self, out: &mut Vec<Message>) -> Result<(), ChannelError> {
        let mut end = None;
        let mut budget = self.receive_budget;
        self.unread = false;
        loop {
            if budget == 0 {
                // More may be waiting; the event loop comes back at once (the socket's
                // readiness is edge-triggered: no new event would say so).
                self.unread = true;
                break;
            }
            // Read straight into the buffer the frames are decoded from (no copy).
            let read = match self.cipher {
                Some(_) => read_appending(&self.stream, &mut self.sealed, budget),
                None => read_appending(&self.stream, &mut self.rx, budget),
            };
            match read {
                Ok(0) => {
                    end = Some(None);
                    break;
                }
                Ok(n) => {
                    self.bytes_received += n as u64;
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    end = Some(Some(e));
                    break;
                }
            }
        }
        if let Some(cipher) = &mut self.cipher {
            let opened =
                cipher
                    .open(&self.sealed, &mut self.rx)
                    .map_err(|source| ChannelError::Sealed {
                        peer: self.peer.clone(),
                        source,
                    })?;
            self.sealed.drain(..opened);
        }
        loop {
            let before = self.rx.len();
            let decoded =
                frame::decode_split::<Message>(&mut self.rx, self.rx_offset).map_err(|source| {
                    ChannelError::Frame {
                        peer: self.peer.clone(),
                        source,
                    }
                })?;
            let Some(msg) = decoded else { break };
            out.push(msg);
            self.rx_offset += (before - self.rx.len()) as u64;
        }
        match end {
            // A failed write is reported once what the peer sent before it is read: a
            // backlog can hold the primary's `Abandon` (DESIGN.md §5).
            None if self.unread => Ok(()),
            None => match self.broken.take() {
                None => Ok(()),
                Some(e) => Err(*e),
            },
            Some(Some(e)) => Err(ChannelError::io(&self.peer, e)),
            Some(None) if self.rx.is_empty() && self.sealed.is_empty() => {
                Err(ChannelError::Closed {
                    peer: self.peer.clone(),
                })
            }
            Some(None) => Err(ChannelError::ClosedMidFrame {
                peer: self.peer.clone(),
                source: frame::truncated(&self.rx, self.rx_offset),
            }),
        }
    }

    /// Ends our direction of the connection (the peer reads EOF after what was queued);
    /// the socket stays open, so what the peer still sends is not answered with a reset.
    pub fn shutdown_write(&mut self) {
        if let Err(e) = self.stream.shutdown(std::net::Shutdown::Write) {
            tracing::debug!(peer = self.peer, "shutdown: {e}");
        }
    }

    /// Writes what is still queued (a last `Released`, `Ack`, `Diverged` or `Abandon`)
    /// before the connection closes, and waits until the peer's host acknowledged it, for at
    /// most `limit`: bytes still unacknowledged when a process exits are lost if the peer
    /// writes meanwhile (its host answers that with a reset).
    pub fn drain(&mut self, poll: &mut mio::Poll, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut events = mio::Events::with_capacity(8);
        while self.pending() > 0 && Instant::now() < deadline {
            if self.flush().is_err() {
                break;
            }
            let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        }
        while self.broken.is_none()
            && !matches!(self.stream.take_error(), Ok(Some(_)) | Err(_))
            && self.unacknowledged() > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Bytes one read from the socket asks for.
const READ_CHUNK: usize = 256 << 10;

/// A buffer that received bytes are appended to.
trait Appendable {
    /// Room for `additional` more bytes past the length.
    fn reserve(&mut self, additional: usize);
    /// The room past the length.
    fn spare(&mut self) -> &mut [MaybeUninit<u8>];
    /// Counts `n` more bytes, written into the room past the length.
    ///
    /// # Safety
    /// The first `n` bytes of [`Appendable::spare`] are initialised.
    unsafe fn grow(&mut self, n: usize);
}

impl Appendable for Vec<u8> {
    fn reserve(&mut self, additional: usize) {
        Vec::reserve(self, additional);
    }
    fn spare(&mut self) -> &mut [MaybeUninit<u8>] {
        self.spare_capacity_mut()
    }
    unsafe fn grow(&mut self, n: usize) {
        // SAFETY: the caller says the n bytes past the length are initialised; `spare`
        // held at least n bytes, so the new length is within the capacity.
        unsafe { self.set_len(self.len() + n) }
    }
}

impl Appendable for BytesMut {
    fn reserve(&mut self, additional: usize) {
        BytesMut::reserve(self, additional);
    }
    fn spare(&mut self) -> &mut [MaybeUninit<u8>] {
        self.spare_capacity_mut()
    }
    unsafe fn grow(&mut self, n: usize) {
        // SAFETY: as for `Vec<u8>` above.
        unsafe { self.set_len(self.len() + n) }
    }
}

/// One read from `stream` appended to `buf`: up to `max` bytes (at most [`READ_CHUNK`]), straight into the
/// buffer's spare room (neither copied from a bounce buffer nor zero-filled first: the
/// zeroing of a 256 KiB chunk cost more than a small message's whole round trip).
fn read_appending(
    stream: &impl AsRawFd,
    buf: &mut impl Appendable,
    max: usize,
) -> io::Result<usize> {
    let max = max.min(READ_CHUNK);
    buf.reserve(max);
    let spare = buf.spare();
    let len = spare.len().min(max);
    loop {
        // SAFETY: recv(2) writes at most `len` bytes into the spare room, which is valid
        // for writes of `len` bytes and borrowed mutably for the call; nothing reads it
        // before the kernel has written it.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                len,
                0,
            )
        };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: the kernel initialised the n bytes it reported.
            unsafe { buf.grow(n) };
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How many handshakes with unknown peers run at once on one listening socket; a connection
/// beyond that is closed at once, so a flood of connections costs no more than this many
/// threads, each for at most [`HANDSHAKE_TIMEOUT`].
pub const MAX_CONCURRENT_HANDSHAKES: usize = 8;

/// Counts the handshakes running on one listening socket.
#[derive(Clone, Default)]
pub struct HandshakeSlots(std::sync::Arc<std::sync::atomic::AtomicUsize>);

/// One handshake's place, given back when dropped.
pub struct HandshakeSlot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl HandshakeSlots {
    /// A place for one more handshake, or None when [`MAX_CONCURRENT_HANDSHAKES`] run.
    pub fn take(&self) -> Option<HandshakeSlot> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONCURRENT_HANDSHAKES).then_some(n + 1)
            })
            .ok()
            .map(|_| HandshakeSlot(self.0.clone()))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
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
