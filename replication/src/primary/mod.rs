//! The primary's side of the pair protocol.
//!
//! [`PrimaryCore`] is the protocol as a state machine with no I/O inside: it takes events (a
//! message from the standby, a message from the vCPU thread, a tick of the clock, a control
//! request, a connection that failed) and queues [`Action`]s (send this frame, release this
//! output, hand the connection over, drop the standby). Its parts each own their fields:
//! [`protection`] (unverified epochs and the output buffer: the output rule), [`join`] (a
//! standby that joins the running guest: pre-copy), [`repair`] (the checkpoint on its way)
//! and [`switchover`]. [`PrimaryChannel`] runs it on a thread: a mio event loop
//! ([`crate::event_loop`]) that only moves bytes and time in and out.

mod arbitration;
pub mod backpressure;
mod channel;
mod core;
mod join;
mod protection;
mod repair;
mod status;
mod switchover;
#[cfg(test)]
mod tests;
mod written;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use ftvm_proto::channel::{CheckpointEnd, PageChunk, Start};
use ftvm_proto::log::RecordBatch;
use ftvm_vmm::memory::GuestMemory;
use mio::Waker;

pub use self::channel::{offer_vm, PrimaryChannel};
pub use self::core::{Action, CoreConfig, PrimaryCore};

use crate::link::Link;
use crate::position::Position;

/// How long a sync whose connection dropped is kept for the standby to resume it.
pub const PAUSED_SYNC_KEPT: Duration = Duration::from_secs(30);

/// What the vCPU thread hands the channel thread, in the order it happened.
#[derive(Debug)]
pub enum FromVcpu {
    /// Records (the log streams: an epoch's records go out in several batches).
    Batch(RecordBatch),
    /// The batch that closes an epoch (its `EpochEnd` last), whose closing began at
    /// `closing` (the digest is computed after that).
    Epoch {
        /// The records.
        batch: RecordBatch,
        /// When the vCPU thread began to close the epoch.
        closing: std::time::Instant,
    },
    /// Guest output produced in the epoch now open.
    Output(Vec<u8>),
    /// Pages of the checkpoint being made.
    Pages(PageChunk),
    /// The end of the checkpoint being made.
    CheckpointEnd(CheckpointEnd),
    /// Stopped for a switchover after closing `epoch` at exit `exit_seq`.
    Stopped {
        /// The epoch closed.
        epoch: u64,
        /// Its last exit.
        exit_seq: u64,
    },
    /// The guest run is over (the last batch was sent).
    End,
}

/// The vCPU thread's handle on the channel thread.
#[derive(Clone)]
pub struct Feed {
    tx: Sender<FromVcpu>,
    waker: Arc<Waker>,
    gate: backpressure::Gate,
}

impl Feed {
    /// Hands `event` to the channel thread; while the guest is slowed for a standby that is
    /// behind, waits first.
    pub fn send(&self, event: FromVcpu) -> std::io::Result<()> {
        self.gate.pass();
        self.tx
            .send(event)
            .map_err(|_| std::io::Error::other("the replication channel thread has stopped"))?;
        self.waker.wake()
    }
}

/// Guest output goes through the channel thread (which holds it until it is verified).
impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(FromVcpu::Output(buf.to_vec()))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the primary's channel measured over the run.
#[derive(Debug, Default, Clone)]
pub struct PrimaryReport {
    /// The standby verified every epoch to the end of the run.
    pub protected_to_end: bool,
    /// Why the run was (or became) unprotected, if it was.
    pub lost: Option<String>,
    /// Epochs closed.
    pub epochs: u64,
    /// The last epoch the standby verified.
    pub verified_epoch: u64,
    /// Repairs installed by the standby.
    pub repairs: u64,
    /// Syncs completed (standbys that joined the running guest).
    pub syncs: u64,
    /// Divergences the standbys reported (repair requests).
    pub divergences: u64,
    /// Of those, checkpoint-required epochs.
    pub checkpoint_required: u64,
    /// Page bytes sent in repair checkpoints.
    pub repair_bytes: u64,
}

/// The connection a switchover hands to the vCPU thread, and where the pair stands: the old
/// primary becomes the standby from here.
pub struct Handover {
    /// The connection to the new primary.
    pub link: Link,
    /// Where both VMs stand: the last epoch (verified by both), its last exit, and the
    /// output sequence number before which every byte was released.
    pub at: Position,
}

/// What the channel thread needs to make checkpoints and to let standbys join.
pub struct PrimarySetup {
    /// Guest memory (read by the pre-copy while the guest runs).
    pub memory: GuestMemory,
    /// What a joining standby is sent first: the log header and the kernel.
    pub start: Start,
    /// Accept joining standbys here (`--accept-standby`).
    pub accept: Option<std::net::TcpListener>,
    /// Where the run starts: after `after.epoch` (0 at boot; the switchover's epoch for a
    /// primary born from one), with output sequence numbers from `after.output_seq`.
    pub after: Position,
    /// The guest's disk images, which a joining standby's disk resync reads.
    pub disks: crate::disk_resync::PrimaryDisks,
}
