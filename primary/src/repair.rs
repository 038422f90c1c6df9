//! What a repair carries (DESIGN.md §4): every page either side dirtied since the last
//! verified boundary whose hash differs from the standby's, or that only the primary
//! dirtied; and likewise the disk blocks ("Disks"): each host writes its own copy of every
//! disk, and while the standby's replay has diverged (Linux reads the TSC) a block it wrote
//! may differ from the primary's. The checkpoint digest covers the union of both sides'
//! pages and blocks.

use std::collections::{BTreeMap, BTreeSet};

use ftvm_proto::channel::{DiskBlock as ProtoDiskBlock, PageChunk};
use ftvm_replication::checkpoint::PageDigest;
use ftvm_replication::primary::{Feed, FromVcpu};
use ftvm_vmm::devices::virtio::block::{DiskBlock, DISK_BLOCK_SIZE};
use ftvm_vmm::digest::block_hash;
use ftvm_vmm::memory::PAGE_SIZE;
use ftvm_vmm::{Vm, VmState};

use crate::RecordError;

/// Disk blocks per [`PageChunk`] (1 MiB of block data, like a chunk of pages).
const BLOCKS_PER_CHUNK: usize = ((1 << 20) / DISK_BLOCK_SIZE) as usize;

/// The disk blocks of one repair.
#[derive(Debug, Default)]
pub(crate) struct BlockRepair {
    /// The blocks to send: those whose hash differs from the standby's, or that only the
    /// primary wrote.
    pub send: Vec<DiskBlock>,
    /// The blocks the checkpoint covers: `mine` and the standby's, sorted.
    pub covered: Vec<DiskBlock>,
}

/// The pages of a repair, sorted.
pub(crate) struct PagePlan {
    /// To send: their hash differs from the standby's, or only the primary dirtied them.
    pub send: Vec<u64>,
    /// Covered by the checkpoint digest: the union of both sides' dirty pages.
    pub covered: Vec<u64>,
    /// Dirtied by both sides with different contents: where the replays diverged.
    pub differ: Vec<u64>,
    /// Of `differ`, the pages this side did not dirty since the boundary: written only by
    /// the standby, or (when the standby compared every page, `FTVM_REPAIR_FULL_COMPARE`)
    /// different since before the boundary, which dirty tracking missed.
    pub differ_not_mine: Vec<u64>,
    /// The hash of every page the plan read (those the standby reported), for the
    /// checkpoint digest: the vCPU stays stopped until it is computed, so they still hold.
    pub hashes: BTreeMap<u64, PageDigest>,
}

/// Plans the pages of a repair: `mine`, the pages the primary dirtied since the boundary,
/// and `standby`, those the standby dirtied, with their hashes.
pub(crate) fn plan_pages(
    vm: &Vm,
    mine: BTreeSet<u64>,
    standby: &[(u64, PageDigest)],
) -> Result<PagePlan, RecordError> {
    let theirs: BTreeMap<u64, PageDigest> = standby.iter().copied().collect();
    let covered: BTreeSet<u64> = mine.iter().copied().chain(theirs.keys().copied()).collect();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut send = Vec::new();
    let mut differ = Vec::new();
    let mut differ_not_mine = Vec::new();
    let mut hashes = BTreeMap::new();
    for &pfn in &covered {
        if let Some(hash) = theirs.get(&pfn) {
            vm.read_page(pfn, &mut page)?;
            let here = ftvm_vmm::digest::hash(&page);
            hashes.insert(pfn, here);
            if here == *hash {
                continue;
            }
            differ.push(pfn);
            if !mine.contains(&pfn) {
                differ_not_mine.push(pfn);
            }
        }
        send.push(pfn);
    }
    Ok(PagePlan {
        send,
        covered: covered.into_iter().collect(),
        differ,
        differ_not_mine,
        hashes,
    })
}

/// Where the replays diverge (DESIGN.md §2, the TSC): the pages both sides dirtied whose
/// contents differ, at debug level, as page frame numbers in hex (at most 64 a repair),
/// with the guest's per-CPU base (`percpu_base`, see [`percpu_base`]).
/// `scripts/diverging-pages.sh` maps them to kernel symbols.
/// `not_mine`: those of them this side did not dirty (see [`PagePlan::differ_not_mine`]).
pub(crate) fn log_differing(differ: &[u64], not_mine: &[u64], state: &VmState) {
    if differ.is_empty() || !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let hex = |pages: &[u64]| {
        let pfns: Vec<String> = pages.iter().take(64).map(|p| format!("{p:x}")).collect();
        pfns.join(",")
    };
    tracing::debug!(
        differing = differ.len(),
        pfns = hex(differ),
        not_dirtied_here = hex(not_mine),
        percpu_base = format!("{:x}", percpu_base(state).unwrap_or(0)),
        "repair: pages that differ"
    );
}

/// KERNEL_GS_BASE, the MSR that holds the GS base of the mode the vCPU is not in.
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The start of an x86-64 Linux guest's per-CPU area of its (only) CPU: the GS base while
/// the vCPU runs kernel code, else the swapped-out KERNEL_GS_BASE; None when neither is a
/// kernel address (a guest that is not Linux).
fn percpu_base(state: &VmState) -> Option<u64> {
    let kernel = |a: u64| (a >> 63 == 1).then_some(a);
    kernel(state.vcpu.sregs.gs.base).or_else(|| {
        state
            .vcpu
            .msrs
            .iter()
            .find(|(i, _)| *i == MSR_KERNEL_GS_BASE)
            .and_then(|&(_, v)| kernel(v))
    })
}

/// Plans the disk part of a repair: `mine`, the blocks the primary's guest wrote since the
/// boundary, and `standby`, those the standby's guest wrote, with their hashes.
pub(crate) fn plan_blocks(
    vm: &Vm,
    mine: BTreeSet<DiskBlock>,
    standby: &[(DiskBlock, PageDigest)],
) -> Result<BlockRepair, RecordError> {
    let theirs: BTreeMap<DiskBlock, PageDigest> = standby.iter().copied().collect();
    let covered: BTreeSet<DiskBlock> = mine.into_iter().chain(theirs.keys().copied()).collect();
    let mut scratch = Vec::new();
    let mut send = Vec::new();
    for &b in &covered {
        if let Some(hash) = theirs.get(&b) {
            if block_hash(vm, b, &mut scratch)? == *hash {
                continue;
            }
        }
        send.push(b);
    }
    Ok(BlockRepair {
        send,
        covered: covered.into_iter().collect(),
    })
}

/// Sends the blocks `repair` plans for checkpoint `id` through `feed`, before the
/// checkpoint's end; returns the bytes of block data sent.
pub(crate) fn send_blocks(
    vm: &Vm,
    id: u64,
    repair: &BlockRepair,
    feed: &Feed,
) -> Result<u64, RecordError> {
    let mut bytes = 0;
    let mut data = Vec::new();
    for chunk in repair.send.chunks(BLOCKS_PER_CHUNK) {
        let mut blocks = Vec::with_capacity(chunk.len());
        for &b in chunk {
            vm.read_disk_block(b, &mut data)?;
            let data = if data.iter().all(|&x| x == 0) {
                Vec::new()
            } else {
                data.clone()
            };
            bytes += data.len() as u64;
            blocks.push(ProtoDiskBlock {
                disk: b.disk,
                block: b.block,
                data,
            });
        }
        feed.send(FromVcpu::Pages(PageChunk {
            checkpoint: id,
            stopped: true,
            blocks,
            ..Default::default()
        }))
        .map_err(RecordError::Log)?;
    }
    Ok(bytes)
}
