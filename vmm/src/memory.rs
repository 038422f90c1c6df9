//! Guest memory: vm-memory `GuestMemoryMmap` with a page bitmap, registered with KVM with
//! dirty-page logging enabled.
//!
//! Two sources of dirty pages must be unioned (DESIGN.md §4, trap 1): KVM's dirty log sees only
//! writes the guest makes; writes the VMM makes through vm-memory (boot structures, device data)
//! are tracked by vm-memory's `AtomicBitmap`.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// Guest memory with VMM-write tracking.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// Smallest guest accepted, in MiB.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest accepted, in MiB.
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size outside [`MIN_MEM_MIB`]..=[`MAX_MEM_MIB`].
    #[error("memory size {0} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB} MiB)")]
    Size(u64),
    /// mmap failed.
    #[error("cannot map {mib} MiB of guest memory: {why}")]
    Map {
        /// Requested size.
        mib: u64,
        /// The reason.
        why: String,
    },
    /// KVM refused the region.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Register(#[source] kvm_ioctls::Error),
    /// KVM refused the dirty log.
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    DirtyLog(#[source] kvm_ioctls::Error),
}

/// The guest-physical ranges for `mib` MiB of RAM: below the MMIO hole, the rest above 4 GiB.
pub fn ram_ranges(mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let size = mib << 20;
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    Ok(ranges)
}

/// Allocates guest memory of `mib` MiB.
pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(mib)?;
    GuestMemory::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        mib,
        why: e.to_string(),
    })
}

/// First address past the highest RAM byte.
pub fn end_of_memory(mem: &GuestMemory) -> u64 {
    mem.last_addr().raw_value() + 1
}

/// Registers every region with KVM as slots 0.., with dirty-page logging on.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map {
                mib: region.len() >> 20,
                why: e.to_string(),
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping described is owned by `mem`, which the Vm keeps alive for as
        // long as the VM fd exists (the Vm drops the VmFd first).
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Page frame numbers written since the last call, by the guest (KVM dirty log) or by the VMM
/// (vm-memory bitmap), sorted; both logs are reset.
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestMemory) -> Result<Vec<u64>, MemoryError> {
    let mut pages = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let kvm_log = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(MemoryError::DirtyLog)?;
        let vmm_log = region.deref_bitmap().get_and_reset();
        let first = region.start_addr().raw_value() / PAGE_SIZE;
        let npages = region.len() / PAGE_SIZE;
        for (word, (k, v)) in kvm_log
            .iter()
            .zip(vmm_log.iter().chain(std::iter::repeat(&0)))
            .enumerate()
        {
            let mut bits = k | v;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = word as u64 * 64 + bit;
                if page < npages {
                    pages.push(first + page);
                }
            }
        }
    }
    Ok(pages)
}

trait DerefBitmap {
    fn deref_bitmap(&self) -> &AtomicBitmap;
}

impl DerefBitmap for vm_memory::GuestRegionMmap<AtomicBitmap> {
    fn deref_bitmap(&self) -> &AtomicBitmap {
        std::ops::Deref::deref(self).bitmap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_mmio_hole() {
        assert!(matches!(ram_ranges(4), Err(MemoryError::Size(4))));
        assert_eq!(ram_ranges(64).unwrap(), vec![(GuestAddress(0), 64 << 20)]);
        let big = ram_ranges(4096).unwrap();
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1], (GuestAddress(MMIO_GAP_END), (1 << 30)));
    }
}
