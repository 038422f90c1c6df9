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
    /// A page outside guest RAM, or page data of the wrong size.
    #[error("guest page {pfn:#x}: {why}")]
    Page {
        /// The page frame number.
        pfn: u64,
        /// What is wrong.
        why: String,
    },
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

/// Allocates guest memory of `mib` MiB, without transparent huge pages (see
/// [`no_huge_pages`]).
pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(mib)?;
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        mib,
        why: e.to_string(),
    })?;
    no_huge_pages(&mem)?;
    Ok(mem)
}

/// Keeps the host from backing guest memory with transparent huge pages
/// (`MADV_NOHUGEPAGE`), so that the dirty log says only what the guest did.
///
/// KVM maps a guest page writable at its first access, read or write, when the host's own
/// mapping of it is writable, and a writable mapping in a dirty-logged slot counts as dirty
/// at once. A page nobody wrote is mapped read-only from the host's zero page, so a guest
/// read leaves it clean; but a huge page that the host allocated for a neighbour's write
/// (or that khugepaged collapsed, when it had the time) makes all 512 of its pages writable,
/// and the guest's first read of any of them marks it dirty. Whether that happened depends
/// on host timing and fragmentation, so the same guest showed different dirty sets (zero
/// pages between 512 KiB and 1 MiB that Linux's BIOS-area scans read) in a recording and
/// its replay, and the first epoch's digests differed (README, "Exact replay with the host
/// module"). The guest's own mappings in KVM never use huge pages here anyway: dirty
/// logging splits them.
fn no_huge_pages(mem: &GuestMemory) -> Result<(), MemoryError> {
    for region in mem.iter() {
        // A kernel without THP support refuses the advice (EINVAL): then there are none.
        advise(region, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
    }
    Ok(())
}

/// `madvise(advice)` over all of `region`, which changes no contents for the advice given
/// here. Ok(false) where the kernel does not know the advice (EINVAL).
fn advise(
    region: &vm_memory::GuestRegionMmap<AtomicBitmap>,
    advice: libc::c_int,
    name: &str,
) -> Result<bool, MemoryError> {
    let host = host_address(region)?;
    // SAFETY: advice on a mapping the region owns, of exactly its length; the callers'
    // advice (MADV_NOHUGEPAGE, MADV_POPULATE_WRITE) changes no contents.
    let rc = unsafe { libc::madvise(host.cast::<libc::c_void>(), region.len() as usize, advice) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        return Ok(false);
    }
    Err(MemoryError::Map {
        mib: region.len() >> 20,
        why: format!("madvise({name}): {e}"),
    })
}

/// Backs every page of guest memory in the host now, writable (`MADV_POPULATE_WRITE`, or a
/// write to each page where the kernel predates it), so that whether KVM counts a guest's
/// first access to a page as a write no longer depends on which pages this host happened to
/// have written before.
///
/// KVM maps a page writable at the guest's first access to it (read or write, see
/// [`no_huge_pages`]) when the host's own mapping of it is writable, and counts it dirty
/// then; a page the host never wrote is mapped read-only from the zero page and stays
/// clean. On two hosts of a pair that history differs: a standby that joined wrote only the
/// pages the primary sent (not its zero pages, written or not), and a repair writes pages on
/// one side only. With every page populated on both, a first access counts the same on
/// each (DESIGN.md §2, "Dirty sets"). Costs all of guest RAM resident from the start.
pub fn populate(mem: &GuestMemory) -> Result<(), MemoryError> {
    for region in mem.iter() {
        if advise(region, libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")? {
            continue;
        }
        let host = host_address(region)?;
        let len = region.len() as usize;
        // Before Linux 5.14: write each page's first byte back to it.
        for offset in (0..len).step_by(PAGE_SIZE as usize) {
            // SAFETY: `offset` is inside the mapping; a volatile read then write of the same
            // byte leaves the contents as they are. No vCPU runs yet (callers populate
            // before the guest starts), so nothing writes the byte in between.
            unsafe {
                let byte = host.add(offset);
                byte.write_volatile(byte.read_volatile());
            }
        }
    }
    Ok(())
}

/// Drops every mapping KVM built of guest memory (its second-level page tables) by deleting
/// each memory slot and registering it again, so the guest's next access to any page takes
/// a fault and is counted as KVM counts a first access. Both sides of a pair do this at the
/// same point, a checkpoint, after taking the dirty pages (the slots' dirty logs start empty
/// again): then KVM counts the same accesses as dirty on both, whatever each side's guest
/// touched before (DESIGN.md §2, "Dirty sets"). No vCPU may be running.
pub fn remap(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = host_address(region)?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: 0,
            userspace_addr: host as u64,
        };
        // SAFETY: a memory size of 0 deletes the slot; no vCPU runs, and the mapping stays
        // owned by `mem`.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Register)?;
    }
    register(vm, mem)
}

/// Where `region` is mapped in this process.
fn host_address(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> Result<*mut u8, MemoryError> {
    region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| MemoryError::Map {
            mib: region.len() >> 20,
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
        let host = host_address(region)?;
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

/// Page frame numbers of every page of guest RAM, in order.
pub fn all_pages(mem: &GuestMemory) -> impl Iterator<Item = u64> + '_ {
    mem.iter().flat_map(|region| {
        let first = region.start_addr().raw_value() / PAGE_SIZE;
        first..first + region.len() / PAGE_SIZE
    })
}

/// Whether page `pfn` is guest RAM (page numbers from a peer are checked with this).
pub fn holds_page(mem: &GuestMemory, pfn: u64) -> bool {
    pfn.checked_mul(PAGE_SIZE)
        .is_some_and(|gpa| mem.address_in_range(GuestAddress(gpa)))
}

/// Number of pages of guest RAM.
pub fn page_count(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len() / PAGE_SIZE).sum()
}

/// Reads page `pfn` into `page` (exactly [`PAGE_SIZE`] bytes).
pub fn read_page(mem: &GuestMemory, pfn: u64, page: &mut [u8]) -> Result<(), MemoryError> {
    use vm_memory::Bytes;
    if page.len() as u64 != PAGE_SIZE {
        return Err(MemoryError::Page {
            pfn,
            why: format!("buffer of {} bytes", page.len()),
        });
    }
    mem.read_slice(page, GuestAddress(pfn.saturating_mul(PAGE_SIZE)))
        .map_err(|e| MemoryError::Page {
            pfn,
            why: e.to_string(),
        })
}

/// Writes page `pfn`: `data` is [`PAGE_SIZE`] bytes, or empty for a page of zeroes.
pub fn write_page(mem: &GuestMemory, pfn: u64, data: &[u8]) -> Result<(), MemoryError> {
    use vm_memory::Bytes;
    static ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    let data = match data.len() as u64 {
        0 => &ZERO[..],
        PAGE_SIZE => data,
        n => {
            return Err(MemoryError::Page {
                pfn,
                why: format!("page data of {n} bytes (expected {PAGE_SIZE} or 0)"),
            })
        }
    };
    mem.write_slice(data, GuestAddress(pfn.saturating_mul(PAGE_SIZE)))
        .map_err(|e| MemoryError::Page {
            pfn,
            why: e.to_string(),
        })
}

/// Whether a page holds only zeroes (such pages are not sent: a new VM's memory is zero).
pub fn is_zero_page(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
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
