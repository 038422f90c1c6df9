//! The epoch digest (DESIGN.md §2): BLAKE3 over the vCPU registers and special registers, the
//! state of every device, the sorted (page number, page hash) list of pages dirtied in the
//! epoch, and the sorted (disk, block, block hash) list of disk blocks the guest wrote in it.
//! Primary and secondary compute it with this one function at the same exit.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::block::DiskBlock;
use crate::memory::PAGE_SIZE;
use crate::state::encode;
use crate::vm::Vm;
use crate::Error;

/// A digest.
pub type Digest = [u8; 32];

/// What an epoch digest covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochDigest {
    /// The digest.
    pub digest: Digest,
    /// Pages dirtied in the epoch (guest and VMM writes), sorted.
    pub dirty_pages: Vec<u64>,
    /// Disk blocks the guest wrote in the epoch, sorted.
    pub dirty_blocks: Vec<DiskBlock>,
}

/// Computes the digest of the epoch that ends now, and starts the next one (the dirty logs are
/// reset). Call only while [`Vm::run`] has returned.
pub fn epoch_digest(vm: &mut Vm) -> Result<EpochDigest, Error> {
    let dirty_pages = vm.take_dirty_pages()?;
    let dirty_blocks = vm.take_dirty_blocks();
    Ok(EpochDigest {
        digest: state_digest(vm, &dirty_pages, &dirty_blocks)?,
        dirty_pages,
        dirty_blocks,
    })
}

/// The same digest over the current state and the given sorted `pages` and disk `blocks`,
/// without touching the dirty logs: a checkpoint's digest covers the pages and blocks it
/// carried plus those the standby reported dirty.
pub fn state_digest(vm: &Vm, pages: &[u64], blocks: &[DiskBlock]) -> Result<Digest, Error> {
    state_digest_with(vm, pages, blocks, &BTreeMap::new())
}

/// [`state_digest`], taking the hash of each page in `known` from there instead of hashing
/// the page again: the caller hashed those pages, unchanged since (a repair's hash filter
/// ran with the vCPU stopped).
pub fn state_digest_with(
    vm: &Vm,
    pages: &[u64],
    blocks: &[DiskBlock],
    known: &BTreeMap<u64, Digest>,
) -> Result<Digest, Error> {
    let (regs, sregs) = vm.registers()?;
    let devices = vm.machine().save()?;
    let mut h = blake3::Hasher::new();
    h.update(&encode(&regs));
    h.update(&encode(&sregs));
    h.update(&encode(&devices));
    if tracing::enabled!(tracing::Level::TRACE) {
        let short = |b: &[u8]| -> String {
            blake3::hash(b).as_bytes()[..6]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect()
        };
        tracing::trace!(
            exit_seq = vm.exit_seq().0,
            rip = regs.rip,
            rax = regs.rax,
            rdx = regs.rdx,
            gs_base = sregs.gs.base,
            regs = %short(&encode(&regs)),
            sregs = %short(&encode(&sregs)),
            devices = %short(&encode(&devices)),
            pages = pages.len(),
            state = ?devices,
            "digest parts"
        );
    }
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let trace = tracing::enabled!(tracing::Level::TRACE);
    for &pfn in pages {
        let ph = match known.get(&pfn) {
            Some(ph) => *ph,
            None => {
                vm.memory()
                    .read_slice(&mut page, GuestAddress(pfn * PAGE_SIZE))
                    .map_err(|e| Error::Device(format!("reading dirty page {pfn:#x}: {e}")))?;
                hash(&page)
            }
        };
        h.update(&pfn.to_le_bytes());
        h.update(&ph);
        if trace {
            let short: String = ph[..6].iter().map(|b| format!("{b:02x}")).collect();
            tracing::trace!(pfn, hash = %short, "dirty page");
        }
    }
    // Nothing is added for a VM without disk writes: its digest is what it was before disks
    // were covered.
    let mut data = Vec::new();
    for &b in blocks {
        h.update(&b.disk.to_le_bytes());
        h.update(&b.block.to_le_bytes());
        h.update(&block_hash(vm, b, &mut data)?);
    }
    Ok(*h.finalize().as_bytes())
}

/// BLAKE3 of disk block `b` (`scratch` holds its bytes afterwards).
pub fn block_hash(vm: &Vm, b: DiskBlock, scratch: &mut Vec<u8>) -> Result<Digest, Error> {
    vm.read_disk_block(b, scratch)?;
    Ok(hash(scratch))
}

/// BLAKE3 of guest page `pfn`.
pub fn page_hash(vm: &Vm, pfn: u64, scratch: &mut [u8]) -> Result<Digest, Error> {
    vm.read_page(pfn, scratch)?;
    Ok(hash(scratch))
}

/// BLAKE3 of a byte string (kernel images, CPUID tables).
pub fn hash(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}
