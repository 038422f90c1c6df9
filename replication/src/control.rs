//! The control socket (`--control`, DESIGN.md §6): `ftvm status`, `switchover`, `promote`.
//!
//! A client must hold the pair key (unless the process runs `--insecure`): each connection
//! first runs the Noise handshake ([`Purpose::Control`]) and its request and answer travel
//! encrypted. The handshake and the request are read on a helper thread (at most
//! [`MAX_CONCURRENT_HANDSHAKES`](crate::link::MAX_CONCURRENT_HANDSHAKES) at once, each within
//! [`CONTROL_DEADLINE`]), so a client that connects and says nothing never stalls the
//! channel thread; the request reaches the event loop as a [`Call`] and only then is the
//! process's state read. A client without the key gets nothing at all.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::link::secure::{self, Purpose, SecureStream, Security};
use crate::link::HandshakeSlots;
use crate::status::Request;

/// How long a control client has for the handshake and its request line.
pub const CONTROL_DEADLINE: Duration = Duration::from_secs(2);

/// How long an unencrypted control socket waits for a request line; a client that sends
/// nothing gets the status (an encrypted client always sends one).
const REQUEST_WAIT: Duration = Duration::from_millis(5);

/// A control request on its way to the event loop, with where its answer goes.
pub struct Call {
    /// What the client asked.
    pub request: Request,
    reply: Sender<String>,
}

impl Call {
    /// Sends the answer back to the client's thread.
    pub fn answer(self, text: String) {
        let _ = self.reply.send(text);
    }
}

/// The control socket of one event loop.
pub struct ControlServer {
    listener: mio::net::TcpListener,
    security: Security,
    slots: HandshakeSlots,
    calls: (Sender<Call>, Receiver<Call>),
    waker: Arc<Waker>,
}

impl ControlServer {
    /// Serves `listener` (registered with the loop) with `security`; helper threads ring
    /// `waker` when a request is ready.
    pub fn new(listener: mio::net::TcpListener, security: Security, waker: Arc<Waker>) -> Self {
        Self {
            listener,
            security,
            slots: HandshakeSlots::default(),
            calls: crossbeam_channel::bounded(crate::link::MAX_CONCURRENT_HANDSHAKES),
            waker,
        }
    }

    /// Takes every pending connection; each one's handshake and request run on a helper
    /// thread. Connections beyond the cap are closed at once.
    pub fn accept(&self) {
        loop {
            let (stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => return tracing::debug!("control socket: {e}"),
            };
            let peer = addr.to_string();
            let Some(slot) = self.slots.take() else {
                tracing::warn!(peer, "control socket: too many clients at once; closing");
                continue;
            };
            let stream = TcpStream::from(OwnedFd::from(stream));
            let security = self.security.clone();
            let calls = self.calls.0.clone();
            let waker = self.waker.clone();
            let spawned = std::thread::Builder::new()
                .name("ftvm-control".into())
                .spawn(move || {
                    serve_client(stream, &peer, &security, &calls, &waker);
                    drop(slot);
                });
            if let Err(e) = spawned {
                tracing::warn!("control socket: cannot start a thread: {e}");
            }
        }
    }

    /// The requests waiting for an answer.
    pub fn calls(&self) -> impl Iterator<Item = Call> + '_ {
        self.calls.1.try_iter()
    }
}

fn serve_client(
    mut tcp: TcpStream,
    peer: &str,
    security: &Security,
    calls: &Sender<Call>,
    waker: &Waker,
) {
    let deadline = Instant::now() + CONTROL_DEADLINE;
    let setup = tcp
        .set_nonblocking(false)
        .and_then(|()| tcp.set_write_timeout(Some(CONTROL_DEADLINE)));
    if let Err(e) = setup {
        return tracing::debug!(peer, "control socket: {e}");
    }
    let cipher =
        match secure::establish(&mut tcp, peer, security, Purpose::Control, false, deadline) {
            Ok(c) => c,
            Err(e) => return tracing::warn!("control socket: refusing {peer}: {e}"),
        };
    let wait = match cipher {
        Some(_) => deadline,
        None => Instant::now() + REQUEST_WAIT,
    };
    let mut s = SecureStream::new(tcp, cipher);
    s.set_deadline(Some(wait));
    let mut line = [0u8; 64];
    let mut n = 0;
    while n < line.len() && !line[..n].contains(&b'\n') {
        match s.read(&mut line[n..]) {
            Ok(0) | Err(_) => break,
            Ok(got) => n += got,
        }
    }
    let request = match std::str::from_utf8(&line[..n]).map(str::trim) {
        Ok("switchover") => Request::Switchover,
        Ok("promote") => Request::Promote,
        _ => Request::Status,
    };
    let (reply, answer) = crossbeam_channel::bounded(1);
    if calls.try_send(Call { request, reply }).is_err() {
        return;
    }
    let _ = waker.wake();
    let Ok(mut text) = answer.recv_timeout(Duration::from_secs(5)) else {
        return;
    };
    if request == Request::Status {
        // How this process's connections are protected (`insecure` says so plainly).
        text.push_str(&format!("channel={}\n", security.describe()));
    }
    if let Err(e) = s.write_all(text.as_bytes()) {
        tracing::debug!(peer, "control socket: {e}");
    }
}
