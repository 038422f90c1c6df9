//! The checkpoint on its way to the standby (DESIGN.md §4): a repair after `Diverged` (or a
//! checkpoint-required epoch), or the stop-and-copy that ends a sync. The vCPU thread makes
//! it; this part numbers it, checks the standby's repair request, and knows when the standby
//! installed it.

use std::time::Instant;

use ftvm_proto::channel::{message::Body, CheckpointEnd, Diverged, HeldOutput, PageChunk};

use super::core::PrimaryCore;
use crate::checkpoint::{disk_blocks, PageDigest, VcpuRequest};
use ftvm_vmm::devices::virtio::block::DiskBlock;

/// A checkpoint asked of the vCPU thread and not yet installed by the standby.
#[derive(Debug)]
pub(super) struct PendingCheckpoint {
    pub id: u64,
    /// The epoch it closes, once its end went out.
    pub epoch: Option<u64>,
    /// It ends a sync (else it is a repair).
    pub sync: bool,
    pub asked: Instant,
    /// What it repairs, for the log and `ftvm status`.
    pub why: String,
}

/// Checkpoint ids and the checkpoint on its way.
#[derive(Debug)]
pub(super) struct Checkpoints {
    next_id: u64,
    pub pending: Option<PendingCheckpoint>,
}

impl Checkpoints {
    pub fn new() -> Self {
        Self {
            next_id: 1,
            pending: None,
        }
    }

    /// A fresh checkpoint id (never reused, so pages of an abandoned checkpoint are told
    /// apart from those of the next one).
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// `id` is the checkpoint on its way.
    pub fn is_pending(&self, id: u64) -> bool {
        self.pending.as_ref().is_some_and(|c| c.id == id)
    }

    /// The standby verified `epoch`: the pending checkpoint, if it closes `epoch` or an
    /// earlier epoch, is installed.
    pub fn installed(&mut self, epoch: u64) -> Option<PendingCheckpoint> {
        let c = self.pending.as_ref()?;
        if c.epoch.is_none_or(|e| e > epoch) {
            return None;
        }
        self.pending.take()
    }
}

/// Why the standby asks for a repair, in words.
pub(super) fn describe(d: &Diverged) -> String {
    let what = if d.checkpoint_required {
        "needs a checkpoint"
    } else {
        "diverged"
    };
    format!(
        "epoch {} {what} at exit {}: {}",
        d.epoch, d.exit_seq, d.reason
    )
}

/// The repair request for the standby's report `d`: its dirty pages and disk blocks with
/// their hashes, each checked (a page that is not guest RAM, a block past the end of its
/// disk (`disk_blocks`: blocks per disk) or a hash of the wrong size is refused).
pub(super) fn request(
    d: &Diverged,
    id: u64,
    is_ram: impl Fn(u64) -> bool,
    disk_blocks: &[u64],
) -> Result<VcpuRequest, String> {
    let mut standby_dirty = Vec::with_capacity(d.dirty.len());
    for p in &d.dirty {
        if !is_ram(p.pfn) {
            return Err(format!(
                "the standby reported dirty page {:#x}, which is not guest RAM",
                p.pfn
            ));
        }
        let Ok(hash) = PageDigest::try_from(p.hash.as_slice()) else {
            return Err("the standby sent a page hash that is not 32 bytes long".into());
        };
        standby_dirty.push((p.pfn, hash));
    }
    let mut standby_blocks = Vec::with_capacity(d.dirty_blocks.len());
    for b in &d.dirty_blocks {
        if disk_blocks
            .get(b.disk as usize)
            .is_none_or(|&n| b.block >= n)
        {
            return Err(format!(
                "the standby reported dirty block {} of disk {}, which the guest does not have",
                b.block, b.disk
            ));
        }
        let Ok(hash) = PageDigest::try_from(b.hash.as_slice()) else {
            return Err("the standby sent a block hash that is not 32 bytes long".into());
        };
        let block = DiskBlock {
            disk: b.disk,
            block: b.block,
        };
        standby_blocks.push((block, hash));
    }
    Ok(VcpuRequest::Repair {
        id,
        from_epoch: d.epoch,
        standby_dirty,
        standby_blocks,
    })
}

/// Repairs and checkpoints, as the core runs them.
impl PrimaryCore {
    /// Pages of the checkpoint the vCPU thread is making.
    pub(super) fn pages(&mut self, chunk: PageChunk, now: Instant) {
        // Pages of a checkpoint abandoned with its standby go nowhere: a new standby must
        // never see them.
        if !self.checkpoints.is_pending(chunk.checkpoint) {
            tracing::debug!(
                checkpoint = chunk.checkpoint,
                "pages of an abandoned checkpoint dropped"
            );
            return;
        }
        // Stop-and-copy pages count as chunks of the sync, for a resume.
        if let Some(s) = self.join.sync.as_mut().filter(|s| s.id == chunk.checkpoint) {
            s.note_chunk(&chunk.pages);
        }
        if self.standby.is_some() {
            self.protection
                .log_bytes(prost::Message::encoded_len(&chunk));
        }
        self.send(Body::Pages(chunk), now);
    }

    /// The vCPU thread finished a checkpoint: send the output held so far, then its end;
    /// its epoch is verified once the standby installed it.
    pub(super) fn checkpoint_end(&mut self, end: CheckpointEnd, now: Instant) {
        let Some(pending) = self
            .checkpoints
            .pending
            .as_mut()
            .filter(|c| c.id == end.checkpoint)
        else {
            tracing::debug!(
                checkpoint = end.checkpoint,
                "end of an abandoned checkpoint dropped"
            );
            return;
        };
        pending.epoch = Some(end.epoch);
        if !pending.sync {
            self.report.repair_bytes += end.page_bytes;
        }
        if pending.sync {
            if let Some(s) = &mut self.join.sync {
                // From here on the standby follows the log.
                s.end_sent = true;
            }
        }
        self.epoch = end.epoch + 1;
        self.report.epochs = end.epoch;
        self.exit_seq = end.exit_seq;
        if self.standby.is_some() {
            self.protection.shipped(end.epoch, now);
            let (epoch, exit_seq, id) = (end.epoch, end.exit_seq, end.checkpoint);
            self.audit(|| format!("shipped epoch={epoch} exit_seq={exit_seq} checkpoint={id}"));
        }
        tracing::debug!(
            checkpoint = end.checkpoint,
            epoch = end.epoch,
            pages = end.pages,
            bytes = end.page_bytes,
            "checkpoint forwarded"
        );
        let (released_seq, data) = self.protection.buffer.held();
        self.send(
            Body::HeldOutput(HeldOutput {
                checkpoint: end.checkpoint,
                released_seq,
                data,
            }),
            now,
        );
        self.send(Body::CheckpointEnd(end), now);
    }

    /// The standby cannot follow: ask the vCPU thread for a repair checkpoint.
    pub(super) fn repair(&mut self, d: Diverged, now: Instant) {
        let why = describe(&d);
        self.report.divergences += 1;
        self.report.checkpoint_required += u64::from(d.checkpoint_required);
        if d.checkpoint_failed {
            return self.lose(
                format!("the standby could not install a checkpoint: {why}"),
                now,
            );
        }
        if self.switchover.phase.is_some() {
            // The vCPU must run again to make the repair; the switchover is asked again
            // once the repair is installed.
            if self.switchover.abandon_for_repair() {
                self.refuse_handover(format!("the standby diverged: {why}"));
            }
        }
        if self.join.sync.is_some() || self.checkpoints.pending.is_some() {
            return self.lose(
                format!("the standby reports a divergence while a checkpoint is on its way: {why}"),
                now,
            );
        }
        let id = self.checkpoints.next_id();
        let disks = disk_blocks(self.start_message());
        let request = match request(&d, id, |pfn| self.join.is_ram(pfn), &disks) {
            Ok(r) => r,
            Err(e) => {
                return self.lose(
                    format!("standby lost: it broke the pair protocol: {e} ({why})"),
                    now,
                )
            }
        };
        if !self.ask_vcpu(request, now) {
            return;
        }
        tracing::info!(
            checkpoint = id,
            standby_dirty = d.dirty.len(),
            "repair: {why}"
        );
        let epoch = d.epoch;
        self.audit(|| format!("repair checkpoint={id} epoch={epoch}"));
        self.checkpoints.pending = Some(PendingCheckpoint {
            id,
            epoch: None,
            sync: false,
            asked: now,
            why,
        });
    }

    /// The standby installed checkpoint `c`.
    pub(super) fn checkpoint_installed(&mut self, c: PendingCheckpoint, now: Instant) {
        let took = now.saturating_duration_since(c.asked);
        if c.sync {
            self.join.finished(&self.tracking);
            self.report.syncs += 1;
            self.report.lost = None;
            tracing::info!(
                peer = self.peer,
                ?took,
                "standby synced: the guest is protected again"
            );
        } else {
            self.report.repairs += 1;
            tracing::info!(checkpoint = c.id, ?took, "repair installed");
        }
        if std::mem::take(&mut self.switchover.after_repair) {
            if let Err(why) = self.start_switchover(now) {
                tracing::warn!("switchover not retried: {why}");
            }
        }
    }
}
