//! A standby that joins a running guest: receive the pre-copy rounds and the stop-and-copy
//! checkpoint, with a progress bar, across reconnects.

use std::time::Duration;

use ftvm_proto::channel::{CheckpointEnd, Diverged, HeldOutput};
use ftvm_replication::standby::{FromReplayer, StandbyChannel, ToReplayer};
use ftvm_vmm::devices::virtio::block::DiskBlock;
use ftvm_vmm::memory::PAGE_SIZE;
use ftvm_vmm::Vm;

use super::{StandbyError, StandbyUi};
use crate::install::install;

/// How far a sync got, kept across reconnects.
pub(super) struct SyncProgress {
    pub(super) bar: indicatif::ProgressBar,
    /// The sync's checkpoint id (0 until the first chunk).
    pub(super) id: u64,
    /// Page chunks applied, over all connections.
    pub(super) chunks: u64,
    /// Page bytes received.
    pub(super) received: u64,
    /// Pages of the stop-and-copy received on this connection: the digest covers them.
    pub(super) stopped: Vec<u64>,
    /// Disk blocks of the stop-and-copy received on this connection (written already),
    /// which the digest covers too.
    pub(super) stopped_blocks: Vec<DiskBlock>,
    pub(super) last_status: std::time::Instant,
}

impl SyncProgress {
    pub(super) fn new(ui: StandbyUi, mem_mib: u64) -> Self {
        let bar = if ui.progress {
            indicatif::ProgressBar::new(mem_mib << 20)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "syncing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self {
            bar,
            id: 0,
            chunks: 0,
            received: 0,
            stopped: Vec::new(),
            stopped_blocks: Vec::new(),
            last_status: std::time::Instant::now(),
        }
    }
}

/// Receives a sync: pre-copy rounds written as they come, then the stop-and-copy checkpoint,
/// installed and checked.
pub(super) fn receive_sync(
    vm: &mut Vm,
    channel: &StandbyChannel,
    progress: &mut SyncProgress,
) -> Result<(CheckpointEnd, HeldOutput), StandbyError> {
    // Syncing: a primary lost in any way (silence included) is lost; nothing can go live.
    channel.tell(FromReplayer::Syncing {
        bytes: progress.received,
        remaining_pages: 0,
    });
    let inbox = channel.inbox();
    loop {
        match inbox.recv() {
            Ok(ToReplayer::Pages(chunk)) => {
                if progress.id != chunk.checkpoint {
                    progress.id = chunk.checkpoint;
                    progress.chunks = 0;
                }
                for p in &chunk.pages {
                    vm.write_page(p.pfn, &p.data).map_err(StandbyError::Vm)?;
                    progress.received += PAGE_SIZE;
                }
                for b in &chunk.blocks {
                    let block = DiskBlock {
                        disk: b.disk,
                        block: b.block,
                    };
                    vm.write_disk_block(block, &b.data)?;
                    progress.stopped_blocks.push(block);
                }
                progress.chunks += 1;
                if chunk.stopped {
                    progress.stopped.extend(chunk.pages.iter().map(|p| p.pfn));
                } else {
                    // Pre-copy goes on: stopped pages seen so far belonged to a
                    // stop-and-copy that was abandoned.
                    progress.stopped.clear();
                    progress.stopped_blocks.clear();
                    progress.bar.set_message(format!("round {}", chunk.round));
                }
                let bar = &progress.bar;
                bar.set_length(progress.received + chunk.remaining_pages * PAGE_SIZE);
                bar.set_position(progress.received);
                if progress.last_status.elapsed() >= Duration::from_millis(100) {
                    progress.last_status = std::time::Instant::now();
                    channel.tell(FromReplayer::Syncing {
                        bytes: progress.received,
                        remaining_pages: chunk.remaining_pages,
                    });
                }
            }
            Ok(ToReplayer::CheckpointEnd { end, held }) => {
                progress.bar.finish_and_clear();
                // The stopped pages are in memory already: only the state is installed; the
                // digest covers the stopped pages.
                let stopped = std::mem::take(&mut progress.stopped);
                let blocks = std::mem::take(&mut progress.stopped_blocks);
                if let Err(why) = install(vm, (&[], &[]), &end, (&stopped, &blocks)) {
                    channel.tell(FromReplayer::Diverged(Diverged {
                        epoch: end.epoch,
                        exit_seq: end.exit_seq,
                        reason: why.clone(),
                        checkpoint_failed: true,
                        ..Default::default()
                    }));
                    return Err(StandbyError::Diverged(why));
                }
                tracing::warn!(
                    mib = progress.received >> 20,
                    epoch = end.epoch,
                    exit_seq = end.exit_seq,
                    "synced: following the primary in lockstep"
                );
                return Ok((end, held));
            }
            Ok(ToReplayer::Batch(_)) => {}
            Ok(ToReplayer::Switchover(_)) => {
                return Err(StandbyError::SyncLost(
                    "the primary handed over its role during the sync".into(),
                ))
            }
            Ok(ToReplayer::PrimaryLost(why)) => return Err(StandbyError::SyncLost(why)),
            // A standby with no complete copy cannot go live anyway: a joining one reconnects.
            Ok(ToReplayer::Abandoned(why)) => {
                return Err(StandbyError::SyncLost(format!(
                    "the primary abandoned this standby: {why}"
                )))
            }
            Ok(ToReplayer::Fenced(why)) => return Err(StandbyError::Fenced(why)),
            Err(_) => return Err(StandbyError::SyncLost("the channel closed".into())),
        }
    }
}
