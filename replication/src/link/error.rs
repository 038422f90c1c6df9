//! [`ChannelError`]: every way a pair connection fails, each naming the peer.

use std::io;
use std::time::Duration;

use ftvm_proto::frame::FrameError;
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
    /// `--tsc exits` on a primary whose standby's host has no TSC-read exits.
    #[error("refusing the pair with {peer}: --tsc exits, and the standby's host has no TSC-read exits (the ftvm-rdtsc-exits module, kmod/README.md); --tsc auto falls back to repair on both sides")]
    NoTscExits {
        /// The peer.
        peer: String,
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
    /// The standby cannot build the VM the primary described (a missing disk copy, one of
    /// another size or mode, another disk count): it said why and the guest did not start.
    #[error("{peer} refused the guest: {why}")]
    Refused {
        /// The peer.
        peer: String,
        /// The standby's reason.
        why: String,
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
    /// The peer could not prove it holds the pair's key, or wants another kind of channel
    /// (encrypted against `--insecure`): nothing was exchanged.
    #[error("{peer} failed authentication: {why}")]
    Auth {
        /// The peer.
        peer: String,
        /// Why.
        why: String,
    },
    /// A record on an established encrypted connection does not authenticate.
    #[error("{peer} sent {source}")]
    Sealed {
        /// The peer.
        peer: String,
        /// What is wrong with it.
        #[source]
        source: super::secure::BadRecord,
    },
    /// The disk resync before protection cannot go on: the peer asked for blocks the guest
    /// does not have, or this side cannot read its own disk.
    #[error("disk resync with {peer}: {why}")]
    DiskResync {
        /// The peer.
        peer: String,
        /// What went wrong.
        why: String,
    },
    /// The peer did not finish the handshake in time.
    #[error("{peer} did not complete the handshake within {timeout:.1?}")]
    HandshakeTimeout {
        /// The peer.
        peer: String,
        /// The limit.
        timeout: Duration,
    },
    /// After the handshake, the peer sent nothing for this long while the pair was being
    /// set up (building the VM, the disk resync).
    #[error("{peer} sent nothing for {timeout:.0?} while the pair was being set up")]
    SetupTimeout {
        /// The peer.
        peer: String,
        /// The limit.
        timeout: Duration,
    },
}

impl ChannelError {
    /// An I/O error on the connection to `peer` (EOF reads as [`ChannelError::Closed`]).
    pub(crate) fn io(peer: &str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::UnexpectedEof => ChannelError::Closed { peer: peer.into() },
            _ => ChannelError::Io {
                peer: peer.into(),
                source,
            },
        }
    }
}
