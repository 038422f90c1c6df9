//! A repair on the standby: wait for the checkpoint the primary sends, install it, and go
//! on after it (DESIGN.md §4).

use ftvm_proto::channel::{CheckpointEnd, HeldOutput, Page, PageHash};
use ftvm_replication::log::from_run_end;
use ftvm_replication::standby::{FromReplayer, StandbyChannel, ToReplayer};
use ftvm_replication::Position;
use ftvm_vmm::devices::virtio::block::DiskBlock;
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::digest::page_hash;
use ftvm_vmm::memory::{all_pages, PAGE_SIZE};
use ftvm_vmm::Vm;

use super::{ChannelSource, ReplayedOutput, StandbyError};
use crate::install::install;
use crate::Replayer;

/// How many of the first repairs compare every page of guest memory instead of the pages
/// this VM dirtied since the last verified boundary: `FTVM_REPAIR_FULL_COMPARE=N`, a
/// diagnostic (docs/OPERATIONS.md). The primary's `repair: pages that differ` lines then
/// also name pages that differed from before the boundary, which dirty tracking (or a
/// checkpoint) missed; each such repair hashes and sends a hash of every page.
pub(super) fn full_compares() -> u32 {
    std::env::var("FTVM_REPAIR_FULL_COMPARE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The pages a repair request names, with their hashes, so the primary sends only those
/// that differ: those this VM dirtied since the last verified boundary, or every page while
/// `full_compares` lasts (see [`full_compares`]). The first are what the checkpoint covers.
pub(super) fn pages_to_compare(
    vm: &mut Vm,
    replayer: &mut Replayer<ChannelSource, ReplayedOutput>,
    full_compares: &mut u32,
) -> Result<(Vec<u64>, Vec<PageHash>), StandbyError> {
    let mut pages = replayer.dirty_since_boundary(vm)?;
    if *full_compares > 0 {
        *full_compares -= 1;
        let dirtied: Vec<String> = pages.iter().map(|p| format!("{p:x}")).collect();
        tracing::info!(
            dirtied = dirtied.join(","),
            "repair: comparing every page (FTVM_REPAIR_FULL_COMPARE)"
        );
        pages = all_pages(vm.memory()).collect();
    }
    let mut scratch = vec![0u8; PAGE_SIZE as usize];
    let hashes = pages
        .iter()
        .map(|&pfn| {
            Ok(PageHash {
                pfn,
                hash: page_hash(vm, pfn, &mut scratch)?.to_vec(),
            })
        })
        .collect::<Result<Vec<_>, ftvm_vmm::Error>>()?;
    Ok((pages, hashes))
}

/// How waiting for a repair ended.
pub(super) enum Repair {
    /// The checkpoint is installed and its digest matched.
    Installed(CheckpointEnd, HeldOutput),
    /// The primary was lost first.
    PrimaryLost(String),
    /// The pair's rules stopped this standby (abandoned, fenced).
    Stopped(StandbyError),
    /// The checkpoint could not be installed.
    Failed(String),
}

/// Waits for the repair checkpoint, discarding the log that comes before it (the checkpoint
/// supersedes it). Its pages are kept aside until its end arrives, so a primary lost in the
/// middle leaves this VM as it was: able to go live.
pub(super) fn await_repair(
    vm: &mut Vm,
    replayer: &mut Replayer<ChannelSource, ReplayedOutput>,
    standby_dirty: &[u64],
    standby_blocks: &[DiskBlock],
) -> Repair {
    let mut pages: Vec<Page> = Vec::new();
    let mut blocks = Vec::new();
    loop {
        match replayer.source.rx.recv() {
            Ok(ToReplayer::Batch(_)) => {}
            Ok(ToReplayer::Pages(chunk)) => {
                pages.extend(chunk.pages);
                blocks.extend(chunk.blocks);
            }
            Ok(ToReplayer::CheckpointEnd { end, held }) => {
                let received = (&pages[..], &blocks[..]);
                return match install(vm, received, &end, (standby_dirty, standby_blocks)) {
                    Ok(()) => Repair::Installed(end, held),
                    Err(why) => Repair::Failed(why),
                };
            }
            Ok(ToReplayer::PrimaryLost(why)) => return Repair::PrimaryLost(why),
            Ok(ToReplayer::Abandoned(why)) => return Repair::Stopped(StandbyError::Abandoned(why)),
            Ok(ToReplayer::Fenced(why)) => return Repair::Stopped(StandbyError::Fenced(why)),
            Ok(ToReplayer::Switchover(_)) => {
                return Repair::Failed("the primary handed over its role during a repair".into())
            }
            Err(_) => return Repair::PrimaryLost("the channel closed".into()),
        }
    }
}

/// A checkpoint is installed: the log goes on after it, the replayed output is the primary's
/// up to it, and the primary hears that its epoch is verified. Returns how the guest stopped
/// if the checkpoint was taken after the end of the run.
pub(super) fn installed(
    vm: &mut Vm,
    replayer: &mut Replayer<ChannelSource, ReplayedOutput>,
    channel: &StandbyChannel,
    (end, held): &(CheckpointEnd, HeldOutput),
    sync: bool,
) -> Option<StopRequest> {
    replayer.restart_after_checkpoint(Position::after_checkpoint(end, held));
    // The checkpoint set the clock: no logged clock is the VM's now.
    replayer.source.clock_anchor = None;
    let output = replayer.output_mut();
    output.base = held.released_seq;
    output.pending = held.data.clone();
    output.trim();
    tracing::info!(
        checkpoint = end.checkpoint,
        epoch = end.epoch,
        exit_seq = end.exit_seq,
        pages = end.pages,
        sync,
        "checkpoint installed"
    );
    channel.tell(FromReplayer::Installed {
        epoch: end.epoch,
        exit_seq: end.exit_seq,
        sync,
    });
    debug_assert_eq!(vm.exit_seq().0, end.exit_seq);
    end.run_end.as_ref().and_then(from_run_end)
}
