//! Guest memory layout and boot: a kernel loaded with linux-loader (an ELF64 `vmlinux`, such as
//! the built-in test guest, or a Linux `bzImage`) and entered directly in 64-bit long mode as
//! Linux's 64-bit boot protocol prescribes: flat GDT with `__BOOT_CS` = 0x10 and `__BOOT_DS` =
//! 0x18, identity-mapped page tables, interrupts off, RSI pointing at a `boot_params` zero page
//! that holds the command line, an e820 map, the initrd's place and the ACPI RSDP address.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::{GuestMemory, MMIO_GAP_END, MMIO_GAP_START};

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// (Empty) IDT location: the guest installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-map level 4; the PDPT and four page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The setup_data entry holding the boot randomness (after the command line's 2 KiB).
pub const SETUP_DATA_ADDR: u64 = 0x21000;
/// setup_data type of boot randomness (Linux `SETUP_RNG_SEED`).
const SETUP_RNG_SEED: u32 = 9;
/// Bytes of boot randomness ftvm hands a Linux guest: 256 bits, what Linux's RNG needs to
/// be ready.
pub const RNG_SEED_LEN: usize = 32;
/// The longest seed accepted (a log header's field is outside input).
const RNG_SEED_MAX: usize = 256;
/// Longest command line accepted (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Kernels must load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory (the EBDA starts here).
const EBDA_START: u64 = 0x9fc00;

/// Boot selectors of the Linux 64-bit boot protocol.
pub const BOOT_CS: u16 = 0x10;
/// Data selector.
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// A kernel that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Not an ELF64 x86_64 kernel (linux-loader's reason).
    #[error("not an ELF64 x86_64 kernel: {0}")]
    NotElf64(linux_loader::loader::Error),
    /// Looked like a bzImage but could not be loaded (truncated, too old, wrong address).
    #[error("invalid bzImage: {0}")]
    BzImage(linux_loader::loader::Error),
    /// The bzImage is shorter than its header says.
    #[error("truncated bzImage: {size} bytes, its boot header says {needed}")]
    Truncated {
        /// The image's size.
        size: u64,
        /// What its header says it should be.
        needed: u64,
    },
    /// Neither an ELF64 image nor a bzImage.
    #[error("not a kernel image: neither ELF64 (vmlinux) nor bzImage (no \"HdrS\" boot header)")]
    UnknownFormat,
    /// The initrd does not fit below the kernel's initrd limit next to the kernel.
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the guest more memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The highest address the kernel accepts, or the end of low memory.
        limit: u64,
        /// Where the kernel image ends.
        kernel_end: u64,
    },
    /// The command line is too long or holds characters Linux cannot take.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Boot randomness longer than a boot loader passes.
    #[error("boot randomness of {0} bytes (at most {RNG_SEED_MAX})")]
    Seed(usize),
    /// A boot structure did not fit in guest memory.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(String),
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The entry point (RIP at boot).
    pub entry: u64,
    /// First byte past the loaded image.
    pub end: u64,
}

/// The images and options a boot takes.
#[derive(Debug, Clone, Copy)]
pub struct BootImages<'a> {
    /// An ELF64 `vmlinux`-style kernel or a Linux bzImage.
    pub kernel: &'a [u8],
    /// An initial ramdisk, if any.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Where the ACPI RSDP is (written by [`crate::acpi`]), if there are ACPI tables.
    pub acpi_rsdp: Option<u64>,
    /// Boot randomness for a bzImage (Linux) kernel, passed as a `SETUP_RNG_SEED`
    /// setup_data entry (boot protocol 2.09+); empty: none. An ELF kernel gets none.
    pub rng_seed: &'a [u8],
}

/// Draws [`RNG_SEED_LEN`] bytes of boot randomness from the host (/dev/urandom).
pub fn new_rng_seed() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut seed = vec![0u8; RNG_SEED_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(seed)
}

/// Writes `seed` as the one setup_data entry (struct setup_data: next, type, len, data) and
/// points the header at it; a kernel older than boot protocol 2.09 has no setup_data and
/// gets none.
fn write_rng_seed(
    mem: &GuestMemory,
    params: &mut boot_params,
    seed: &[u8],
) -> Result<(), BootError> {
    if seed.is_empty() || params.hdr.version < 0x0209 {
        return Ok(());
    }
    if seed.len() > RNG_SEED_MAX {
        return Err(BootError::Seed(seed.len()));
    }
    let mut entry = Vec::with_capacity(16 + seed.len());
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    entry.extend_from_slice(&(seed.len() as u32).to_le_bytes());
    entry.extend_from_slice(seed);
    mem.write_slice(&entry, GuestAddress(SETUP_DATA_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    params.hdr.setup_data = SETUP_DATA_ADDR;
    Ok(())
}

/// The bzImage boot header magic "HdrS" and where it is.
const HDRS_MAGIC: u32 = 0x5372_6448;
const HDRS_OFFSET: usize = 0x202;
/// A bzImage's 64-bit entry point is this far into its protected-mode code.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// The highest initrd address kernels that do not say otherwise accept.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Whether `image` is a bzImage (rather than an ELF).
fn is_bzimage(image: &[u8]) -> bool {
    image
        .get(HDRS_OFFSET..HDRS_OFFSET + 4)
        .is_some_and(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]) == HDRS_MAGIC)
}

/// A bzImage's setup sectors plus its protected-mode code (`syssize`, in 16-byte units) must
/// all be there: a truncated image would load and then fail to decompress inside the guest.
fn check_bzimage_size(image: &[u8]) -> Result<(), BootError> {
    let setup_sects = match image.get(0x1f1) {
        Some(0) | None => 4,
        Some(&n) => u64::from(n),
    };
    let syssize = image
        .get(0x1f4..0x1f8)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let needed = (setup_sects + 1) * 512 + u64::from(syssize) * 16;
    if (image.len() as u64) < needed {
        return Err(BootError::Truncated {
            size: image.len() as u64,
            needed,
        });
    }
    Ok(())
}

/// Loads the kernel, the initrd and the boot structures into `mem`.
pub fn load_kernel(mem: &GuestMemory, boot: &BootImages<'_>) -> Result<LoadedKernel, BootError> {
    let image = boot.kernel;
    let mut params = boot_params::default();
    let loaded = if image.starts_with(b"\x7fELF") {
        let result = Elf::load(
            mem,
            None,
            &mut Cursor::new(image),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(BootError::NotElf64)?;
        // linux-loader reports the entry point as kernel_load for ELF images.
        params.hdr.kernel_alignment = 0x0100_0000;
        LoadedKernel {
            entry: result.kernel_load.raw_value(),
            end: result.kernel_end,
        }
    } else if is_bzimage(image) {
        check_bzimage_size(image)?;
        let result = BzImage::load(
            mem,
            None,
            &mut Cursor::new(image),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(BootError::BzImage)?;
        // The kernel's own setup header, as the boot protocol asks a loader to pass it on.
        if let Some(hdr) = result.setup_header {
            params.hdr = hdr;
        }
        write_rng_seed(mem, &mut params, boot.rng_seed)?;
        LoadedKernel {
            entry: result.kernel_load.raw_value() + BZIMAGE_ENTRY_64,
            end: result.kernel_end,
        }
    } else {
        return Err(BootError::UnknownFormat);
    };

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(boot.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = boot.cmdline.len() as u32;
    let mem_end = crate::memory::end_of_memory(mem);
    let low_end = mem_end.min(MMIO_GAP_START);
    if let Some(initrd) = boot.initrd {
        let addr_max = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            max => u64::from(max),
        };
        let (addr, size) = place_initrd(initrd.len() as u64, loaded.end, low_end, addr_max)?;
        mem.write_slice(initrd, GuestAddress(addr))
            .map_err(|e| BootError::Memory(e.to_string()))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = boot.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    e820.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_end > MMIO_GAP_END {
        e820.push((MMIO_GAP_END, mem_end - MMIO_GAP_END, E820_RAM));
    }
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::Memory(e.to_string()))?;

    write_gdt(mem)?;
    write_page_tables(mem)?;
    Ok(loaded)
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as the kernel accepts
/// (`addr_max` is the highest address it may touch) and low memory allows, above the kernel
/// image so the kernel's decompressor, which works upwards from the image, meets it last.
fn place_initrd(
    size: u64,
    kernel_end: u64,
    low_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let limit = low_end.min(addr_max.saturating_add(1));
    let too_big = BootError::InitrdTooBig {
        size,
        limit,
        kernel_end,
    };
    match limit.checked_sub(size).map(|a| a & !0xfff) {
        Some(addr) if addr >= kernel_end.max(HIMEM_START) => Ok((addr, size)),
        _ => Err(too_big),
    }
}

/// A GDT descriptor from (flags, base, limit), the layout the CPU reads.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base) & 0xff00_0000) << 32
        | (u64::from(flags) & 0xf0ff) << 40
        | (u64::from(limit) & 0x000f_0000) << 32
        | (u64::from(base) & 0x00ff_ffff) << 16
        | u64::from(limit) & 0xffff
}

/// The GDT: null, null, code64 (0x10), data (0x18), TSS (0x20).
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

fn segment(selector: u16) -> kvm_segment {
    let (flags, base, limit) = GDT[usize::from(selector >> 3)];
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: u8::from((flags >> 7) & 1 == 0),
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, (flags, base, limit)) in GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(*flags, *base, *limit),
            GuestAddress(GDT_ADDR + i as u64 * 8),
        )
        .map_err(|e| BootError::Memory(e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// Identity-maps the first 4 GiB with 2 MiB pages: PML4 → one PDPT → four page directories.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let pdpt = PML4_ADDR + 0x1000;
    let pd = pdpt + 0x1000;
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| BootError::Memory(e.to_string()))
    };
    w(pdpt | 0x3, PML4_ADDR)?;
    for dir in 0..4u64 {
        w((pd + dir * 0x1000) | 0x3, pdpt + dir * 8)?;
        for i in 0..512u64 {
            let page = (dir * 512 + i) << 21;
            w(page | 0x83, pd + dir * 0x1000 + i * 8)?;
        }
    }
    Ok(())
}

/// Registers at kernel entry.
pub fn boot_regs(kernel: &LoadedKernel) -> kvm_regs {
    kvm_regs {
        rip: kernel.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Long mode with paging on, flat segments from the boot GDT.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(BOOT_CS);
    let data = segment(BOOT_DS);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(BOOT_TSS);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_linux_boot_gdt() {
        // The values Linux's own boot GDT uses for __BOOT_CS and __BOOT_DS.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_), (1, 0, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_never_over_the_kernel() {
        let mib = 1 << 20;
        assert_eq!(
            place_initrd(5000, 20 * mib, 256 * mib, DEFAULT_INITRD_ADDR_MAX).unwrap(),
            ((256 * mib - 5000) & !0xfff, 5000)
        );
        // The kernel's limit wins over the end of memory.
        let (addr, _) = place_initrd(4096, 20 * mib, 2048 * mib, 0x37ff_ffff).unwrap();
        assert_eq!(addr, 0x3800_0000 - 4096);
        assert!(matches!(
            place_initrd(250 * mib, 20 * mib, 256 * mib, u64::MAX),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn boot_randomness_is_one_setup_data_entry_for_a_kernel_that_reads_them() {
        let mem = crate::memory::create(32).unwrap();
        let seed: Vec<u8> = (1..=RNG_SEED_LEN as u8).collect();
        let mut params = boot_params::default();
        params.hdr.version = 0x020f;
        write_rng_seed(&mem, &mut params, &seed).unwrap();
        assert_eq!({ params.hdr.setup_data }, SETUP_DATA_ADDR);
        let mut entry = vec![0u8; 16 + seed.len()];
        mem.read_slice(&mut entry, GuestAddress(SETUP_DATA_ADDR))
            .unwrap();
        assert_eq!(entry[..8], [0; 8], "the only entry: no next");
        assert_eq!(entry[8..12], SETUP_RNG_SEED.to_le_bytes());
        assert_eq!(entry[12..16], (seed.len() as u32).to_le_bytes());
        assert_eq!(entry[16..], seed[..]);

        // A kernel before boot protocol 2.09 has no setup_data; no seed, no entry.
        for (version, seed) in [(0x0208, &seed[..]), (0x020f, &[][..])] {
            let mut params = boot_params::default();
            params.hdr.version = version;
            write_rng_seed(&mem, &mut params, seed).unwrap();
            assert_eq!({ params.hdr.setup_data }, 0);
        }
        assert!(matches!(
            write_rng_seed(&mem, &mut params, &[7; RNG_SEED_MAX + 1]),
            Err(BootError::Seed(257))
        ));
        let fresh = new_rng_seed().unwrap();
        assert_eq!(fresh.len(), RNG_SEED_LEN);
        assert_ne!(fresh, new_rng_seed().unwrap(), "drawn afresh each time");
    }

    #[test]
    fn tells_bzimage_from_elf_and_rejects_anything_else() {
        let mem = crate::memory::create(32).unwrap();
        let mut fake = vec![0u8; 0x400];
        fake[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&fake));
        // A truncated bzImage: the header claims more setup sectors than there are bytes.
        fake[0x1f1] = 60;
        fake[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        fake[0x211] = 1;
        let boot = |kernel| BootImages {
            kernel,
            initrd: None,
            cmdline: "",
            acpi_rsdp: None,
            rng_seed: &[],
        };
        assert!(matches!(
            load_kernel(&mem, &boot(&fake)),
            Err(BootError::Truncated {
                size: 0x400,
                needed: 31232
            })
        ));
        assert!(matches!(
            load_kernel(&mem, &boot(b"MZ not a kernel")),
            Err(BootError::UnknownFormat)
        ));
    }
}
