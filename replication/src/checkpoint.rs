//! What the primary's vCPU thread and its channel thread share (DESIGN.md §4): the channel
//! thread asks the vCPU thread for something only it can do at an exit ([`VcpuRequest`]: a
//! repair checkpoint after `Diverged`, the stop-and-copy that ends a sync, or the stop for a
//! switchover); the vCPU thread does it at its next exit, sending the pages and the state
//! back through the [`Feed`](crate::primary::Feed) in log order.
//!
//! The vCPU thread also reports the pages each closed epoch dirtied ([`DirtyTracking`]): a
//! sync's pre-copy resends them, and a repair needs those of every epoch the standby has not
//! verified.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use ftvm_proto::channel::Start;
use ftvm_vmm::devices::virtio::block::{DiskBlock, DISK_BLOCK_SIZE, SECTOR_SIZE};

use crate::primary::Feed;

/// Pages per [`PageChunk`](ftvm_proto::channel::PageChunk) message (1 MiB of page data).
pub const PAGES_PER_CHUNK: usize = 256;

/// BLAKE3 of a page.
pub type PageDigest = [u8; 32];

/// What the channel thread asks of the vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuRequest {
    /// Repair the standby, which cannot follow past `from_epoch`: send every page that
    /// differs among those either side dirtied since the last verified boundary.
    Repair {
        /// Checkpoint id.
        id: u64,
        /// The first epoch the standby did not verify.
        from_epoch: u64,
        /// The pages the standby dirtied since that boundary, with their hashes.
        standby_dirty: Vec<(u64, PageDigest)>,
        /// The disk blocks the standby's guest wrote since that boundary, with their hashes.
        standby_blocks: Vec<(DiskBlock, PageDigest)>,
    },
    /// End a sync: stop, send the pages dirtied since the pre-copy read them, and the state.
    StopAndCopy {
        /// Checkpoint id.
        id: u64,
    },
    /// `ftvm switchover`: stop at the next exit, close the epoch there, and wait for the
    /// channel's [`Handover`](crate::primary::Handover) (or for word that it failed).
    Switchover,
}

impl VcpuRequest {
    /// The checkpoint id (0 for a switchover, which makes none).
    pub fn id(&self) -> u64 {
        match self {
            VcpuRequest::Repair { id, .. } | VcpuRequest::StopAndCopy { id } => *id,
            VcpuRequest::Switchover => 0,
        }
    }
}

/// The channel thread's end of the vCPU control channel (Firecracker's `VcpuEvent` idea):
/// a request goes in and the doorbell rings, so a vCPU halted in its wait for input sees the
/// request at once instead of at the guest's next exit. A vCPU running guest code takes it at
/// its next exit (a kick there would be a nondeterministic point; the latency bound keeps
/// that wait short whenever an interrupt is due).
#[derive(Debug, Clone)]
pub struct VcpuControl {
    requests: Sender<VcpuRequest>,
    doorbell: Sender<()>,
}

impl VcpuControl {
    /// A control channel: this end, the requests and the doorbell for the vCPU thread.
    pub fn new() -> (Self, Receiver<VcpuRequest>, Receiver<()>) {
        let (requests, requests_rx) = crossbeam_channel::unbounded();
        let (doorbell, doorbell_rx) = crossbeam_channel::bounded(1);
        (Self { requests, doorbell }, requests_rx, doorbell_rx)
    }

    /// Hands `request` to the vCPU thread and rings; false if the vCPU thread is gone.
    pub fn ask(&self, request: VcpuRequest) -> bool {
        if self.requests.send(request).is_err() {
            return false;
        }
        // A full doorbell already rings; a closed one has no halted vCPU behind it.
        match self.doorbell.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => true,
        }
    }
}

/// The number of disk blocks of each disk of the guest `start` describes.
pub fn disk_blocks(start: &Start) -> Vec<u64> {
    let disks = start
        .header
        .as_ref()
        .and_then(|h| h.config.as_ref())
        .map_or(&[][..], |c| &c.disks[..]);
    disks
        .iter()
        .map(|d| {
            d.sectors
                .saturating_mul(SECTOR_SIZE)
                .div_ceil(DISK_BLOCK_SIZE)
        })
        .collect()
}

/// Dirty-page bookkeeping shared by the vCPU thread (which reads the dirty logs at every
/// epoch end) and the channel thread (which runs syncs and knows what the standby verified).
#[derive(Debug, Clone, Default)]
pub struct DirtyTracking {
    /// Pages dirtied since a running sync's pre-copy last took them; None: no sync.
    sync: Arc<Mutex<Option<BTreeSet<u64>>>>,
    /// A standby is attached (syncing or in lockstep): keep unverified epochs' dirty sets.
    protected: Arc<AtomicBool>,
    /// The last epoch the standby verified.
    verified: Arc<AtomicU64>,
}

impl DirtyTracking {
    fn lock(&self) -> MutexGuard<'_, Option<BTreeSet<u64>>> {
        // A panic while holding this lock leaves a set of page numbers, still usable.
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vCPU thread: `pages` were dirtied in the epoch just closed.
    pub fn note(&self, pages: &[u64]) {
        if let Some(set) = self.lock().as_mut() {
            set.extend(pages.iter().copied());
        }
    }

    /// The channel thread: a sync starts; track dirty pages from now on.
    pub fn start_sync(&self) {
        *self.lock() = Some(BTreeSet::new());
    }

    /// Takes the pages dirtied since the last call (empty if no sync runs); tracking goes on.
    pub fn take_sync(&self) -> BTreeSet<u64> {
        self.lock().as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The sync is over (done or abandoned): stop tracking.
    pub fn stop_sync(&self) {
        *self.lock() = None;
    }

    /// Whether a standby is attached.
    pub fn protected(&self) -> bool {
        self.protected.load(Ordering::SeqCst)
    }

    /// The channel thread: a standby attached or was lost.
    pub fn set_protected(&self, on: bool) {
        self.protected.store(on, Ordering::SeqCst);
    }

    /// The last epoch the standby verified.
    pub fn verified(&self) -> u64 {
        self.verified.load(Ordering::SeqCst)
    }

    /// The channel thread: the standby verified `epoch`.
    pub fn set_verified(&self, epoch: u64) {
        self.verified.fetch_max(epoch, Ordering::SeqCst);
    }
}

/// The vCPU thread's end of the vCPU control channel and of the checkpoint machinery.
#[derive(Clone)]
pub struct VcpuPort {
    /// Requests from the channel thread.
    pub requests: Receiver<VcpuRequest>,
    /// Rings when a request was sent: a halted vCPU waits on it as well as on its input.
    pub doorbell: Receiver<()>,
    /// Where the checkpoint's pages and end go.
    pub feed: Feed,
    /// Dirty pages.
    pub tracking: DirtyTracking,
    /// The answer to a [`VcpuRequest::Switchover`]: the connection to hand over, or
    /// why the switchover was abandoned.
    pub handover: Receiver<Result<crate::primary::Handover, String>>,
}
