//! Waiting on a listening socket for the one peer that holds the pair key, while anyone else
//! may connect too (DESIGN.md §6): every connection's handshake runs on its own thread, at
//! most [`MAX_CONCURRENT_HANDSHAKES`] at once, each bounded by its own deadline, so a port
//! scan, a slow sender or a flood of connections neither ends the wait nor holds it up.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::{ChannelError, HandshakeSlots, MAX_CONCURRENT_HANDSHAKES};

/// Whether a failed meeting ends the wait: a peer that proved it holds the key but cannot
/// pair with this side (another protocol version, another kind of host) is a configuration
/// error to report; anything else (no key, garbage, a timeout, a close) is only logged.
pub fn is_fatal(e: &ChannelError) -> bool {
    matches!(
        e,
        ChannelError::HostMismatch { .. } | ChannelError::Version { .. }
    )
}

/// Accepts connections on `listener` and runs `meet` on each (on a helper thread) until one
/// succeeds, or fails in a way [`is_fatal`] says ends the wait. Other failures are logged
/// with the peer's address and the listener keeps listening.
pub fn accept_first<T: Send + 'static>(
    listener: &TcpListener,
    meet: impl Fn(TcpStream, String) -> Result<T, ChannelError> + Send + Sync + 'static,
) -> Result<T, ChannelError> {
    let io = |source| ChannelError::Io {
        peer: "the listening socket".into(),
        source,
    };
    listener.set_nonblocking(true).map_err(io)?;
    let slots = HandshakeSlots::default();
    let (tx, rx) = crossbeam_channel::unbounded();
    let meet = Arc::new(meet);
    let result = loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                let peer = addr.to_string();
                let Some(slot) = slots.take() else {
                    tracing::warn!(
                        peer,
                        "{MAX_CONCURRENT_HANDSHAKES} handshakes already running: closing this connection"
                    );
                    continue;
                };
                let (tx, meet) = (tx.clone(), meet.clone());
                let spawned = std::thread::Builder::new()
                    .name("ftvm-handshake".into())
                    .spawn(move || {
                        let result = stream
                            .set_nonblocking(false)
                            .map_err(|e| ChannelError::io(&peer, e))
                            .and_then(|()| meet(stream, peer));
                        drop(slot);
                        let _ = tx.send(result);
                    });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a handshake thread: {e}");
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // A connection reset before it was accepted, or out of descriptors for a
                // moment: not a reason to stop listening.
                tracing::warn!("accept: {e}");
            }
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Ok(t)) => break Ok(t),
            Ok(Err(e)) if is_fatal(&e) => break Err(e),
            Ok(Err(e)) => tracing::warn!("refused a connection: {e}; still listening"),
            Err(_) => {}
        }
    };
    listener.set_nonblocking(false).map_err(io)?;
    result
}
