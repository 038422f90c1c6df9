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
    /// Disk blocks the guest wrote since a joining standby's disk resync began; None: no
    /// resync or sync runs. The sync's stop-and-copy sends them all.
    sync_blocks: Arc<Mutex<Option<BTreeSet<DiskBlock>>>>,
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

    /// The sync is over (done or abandoned): stop tracking pages and disk blocks.
    pub fn stop_sync(&self) {
        *self.lock() = None;
        *self.lock_blocks() = None;
    }

    /// A paused sync expired: stop tracking pages. The disk blocks stay tracked: a joining
    /// standby's resync may be under way on a helper thread, and its stop-and-copy needs
    /// every block written since that resync began (a superset costs only bytes).
    pub fn stop_page_sync(&self) {
        *self.lock() = None;
    }

    fn lock_blocks(&self) -> MutexGuard<'_, Option<BTreeSet<DiskBlock>>> {
        // Like `lock`: a set of block numbers stays usable after a panic.
        self.sync_blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A joining standby's disk resync begins (before the primary reads any block): track
    /// the blocks the guest writes from now on, keeping those tracked for a sync already
    /// under way (a standby that reconnects, or one replacing a standby whose sync is paused).
    pub fn begin_disk_resync(&self) {
        self.lock_blocks().get_or_insert_with(BTreeSet::new);
    }

    /// The vCPU thread: the guest wrote `blocks` in the epoch just closed.
    pub fn note_blocks(&self, blocks: &[DiskBlock]) {
        if let Some(set) = self.lock_blocks().as_mut() {
            set.extend(blocks.iter().copied());
        }
    }

    /// The blocks written since the disk resync began (empty if none runs); tracking goes
    /// on until [`Self::stop_sync`].
    pub fn take_sync_blocks(&self) -> BTreeSet<DiskBlock> {
        self.lock_blocks()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn b(block: u64) -> DiskBlock {
        DiskBlock { disk: 0, block }
    }

    /// The blocks a joining standby's stop-and-copy sends: every block written since its
    /// resync began, kept through a page sync's end or expiry, dropped when the sync ends.
    #[test]
    fn disk_blocks_are_tracked_from_the_resync_to_the_sync_end() {
        let t = DirtyTracking::default();
        t.note_blocks(&[b(1)]);
        assert!(
            t.take_sync_blocks().is_empty(),
            "no resync: nothing tracked"
        );
        t.begin_disk_resync();
        t.note_blocks(&[b(2), b(3)]);
        // A reconnecting standby's resync keeps what was tracked.
        t.begin_disk_resync();
        t.start_sync();
        t.note_blocks(&[b(3), b(4)]);
        // A paused sync that expires stops page tracking only.
        t.stop_page_sync();
        t.note_blocks(&[b(5)]);
        let want: BTreeSet<DiskBlock> = [2, 3, 4, 5].into_iter().map(b).collect();
        assert_eq!(t.take_sync_blocks(), want);
        t.note_blocks(&[b(6)]);
        t.stop_sync();
        t.note_blocks(&[b(7)]);
        assert!(t.take_sync_blocks().is_empty(), "the sync is over");
    }
}
