//! `ftvm-replication`: the pair channel (DESIGN.md §3, §5, §6).
//!
//! One TCP connection per pair. Each side opens with the magic `FTVMPAIR` and a `Hello`
//! carrying its protocol version, role and host kind ([`link::handshake`], [`host`]); a
//! mismatch is a clear error (a guest cannot be replayed across host kinds). Then frames `[len][crc32c][prost Message]` flow on a mio event loop in a thread of
//! each process:
//! - [`primary::PrimaryChannel`] ships the replication log (one record batch per epoch,
//!   several batches coalesced into one write when they queue up), holds guest output in the
//!   [`output::OutputBuffer`] until the standby's `Ack` says its epoch is verified (the
//!   **output rule**), then releases it and sends `Released` with the output sequence
//!   number;
//! - [`standby::StandbyChannel`] feeds the batches to the replayer as they arrive and answers
//!   `Ack { received_epoch, verified_epoch }` or `Diverged`.
//!
//! Both send heartbeats (default every 50 ms; both sides use the larger settings of the two
//! `Hello`s). The failure detector: EOF or a reset means the peer process is gone, at once;
//! no bytes for the heartbeat timeout (default 150 ms) means the peer is silent. A primary
//! that drops its standby tells it so (`Abandon`) first, then releases what it holds and runs
//! on unprotected (with a [`witness`]: once it won the pair's next term). A standby goes live
//! only on evidence that its primary is gone (a close or reset without `Abandon`; with a
//! witness, once it won the term); silence makes it wait (DESIGN.md §5).
//!
//! [`log`] is the one home of the replication log's format (file writer and reader, header,
//! run-end records) that the recorder, the replayer and the CLI share.

pub mod arbiter;
pub mod audit;
pub mod bench;
pub mod checkpoint;
pub mod control;
pub mod disk_resync;
pub mod etcd;
pub mod event_loop;
pub mod host;
pub mod link;
pub mod liveness;
pub mod log;
pub mod output;
pub mod position;
pub mod primary;
pub mod standby;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod witness;

pub use link::{ChannelError, Heartbeat, Link};
pub use position::Position;

/// Options of a pair process's channel thread.
#[derive(Default)]
pub struct ChannelOptions {
    /// Heartbeats and failure detection.
    pub heartbeat: Heartbeat,
    /// The control socket answering `ftvm status`.
    pub control: Option<std::net::TcpListener>,
    /// The arbiter (`--witness` or `--etcd`) of role changes decided on silence.
    pub witness: Option<witness::WitnessConfig>,
    /// A standby that goes live becomes a primary that accepts a new standby (`ftvm standby
    /// --accept-standby`), instead of running its guest unprotected to the end.
    pub primary_after_go_live: bool,
    /// The pair key every connection (channel, join port, control socket) is authenticated
    /// and encrypted with, or `--insecure`.
    pub security: link::Security,
    /// Bounds on what a slow standby makes the primary hold (back-pressure).
    pub bounds: primary::backpressure::Bounds,
    /// Metrics and the event log (`--metrics`, `--events`), shared by every role.
    pub telemetry: Option<std::sync::Arc<telemetry::Telemetry>>,
    /// The guest's TSC reads are exits (the primary's log header says so): for `ftvm status`
    /// on a standby, which learns it from the primary's `Start`.
    pub tsc_exits: bool,
}

impl ChannelOptions {
    /// The same options for another channel (the control socket is shared).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            heartbeat: self.heartbeat,
            control: self.control.as_ref().map(|l| l.try_clone()).transpose()?,
            witness: self.witness.clone(),
            primary_after_go_live: self.primary_after_go_live,
            security: self.security.clone(),
            bounds: self.bounds,
            telemetry: self.telemetry.clone(),
            tsc_exits: self.tsc_exits,
        })
    }
}
