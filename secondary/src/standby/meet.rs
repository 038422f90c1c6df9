//! Meeting the primary: listen or join, the handshake, and the primary's `Start`.

use std::time::Duration;

use super::{Rendezvous, StandbyError};
use ftvm_proto::channel::{message::Body, Role, Start};
use ftvm_replication::link::{self, body_name, Handshaken, Me, Security};
use ftvm_replication::ChannelError;

/// Meets the primary: accepts or connects, does the handshake, and reads its Start.
/// Meets the primary again to resume a sync. The primary may not have noticed yet that the
/// old connection is gone, and turns a second standby away while it thinks one is attached:
/// a connection closed during the handshake is tried again for a while.
pub(super) fn meet_again(
    rendezvous: &Rendezvous<'_>,
    heartbeat: ftvm_replication::Heartbeat,
    security: &Security,
) -> Result<(Handshaken, String, Start), StandbyError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut backoff = Duration::from_millis(20);
    loop {
        match meet(rendezvous, heartbeat, security) {
            Err(StandbyError::Channel(
                e @ (ChannelError::Closed { .. }
                | ChannelError::ClosedMidFrame { .. }
                | ChannelError::Auth { .. }),
            )) if std::time::Instant::now() + backoff < deadline => {
                tracing::info!("{e}; trying again in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

pub(super) fn meet(
    rendezvous: &Rendezvous<'_>,
    heartbeat: ftvm_replication::Heartbeat,
    security: &Security,
) -> Result<(Handshaken, String, Start), StandbyError> {
    match rendezvous {
        Rendezvous::Listen(listener) => {
            // Anyone may connect: each connection proves it holds the key (or is dropped)
            // on its own thread while the standby keeps listening.
            let security = security.clone();
            Ok(link::listen::accept_first(
                listener,
                move |stream, peer| {
                    let me = Me {
                        role: Role::Standby,
                        initiator: false,
                        security: &security,
                    };
                    greet(stream, peer, me, heartbeat)
                },
            )?)
        }
        Rendezvous::Join { addr, timeout } => {
            let me = Me {
                role: Role::Standby,
                initiator: true,
                security,
            };
            Ok(greet(
                link::connect(addr, *timeout)?,
                addr.clone(),
                me,
                heartbeat,
            )?)
        }
    }
}

/// The handshake with the primary on `stream`, then its `Start`.
pub(super) fn greet(
    stream: std::net::TcpStream,
    peer: String,
    me: Me<'_>,
    heartbeat: ftvm_replication::Heartbeat,
) -> Result<(Handshaken, String, Start), ChannelError> {
    let mut h = link::handshake(stream, &peer, me, heartbeat)?;
    let msg = link::recv_blocking(&mut h.stream, &peer, &mut h.rx_offset)?;
    let Some(Body::Start(start)) = msg.body else {
        return Err(ChannelError::Unexpected {
            peer,
            expected: "Start",
            got: body_name(&msg).into(),
        });
    };
    Ok((h, peer, start))
}
