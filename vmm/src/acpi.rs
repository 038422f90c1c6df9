//! The ACPI tables ftvm offers a Linux guest: how its virtio-mmio devices are announced.
//!
//! Debian's kernel (and most distribution kernels) is built without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so `virtio_mmio.device=` on the command line finds
//! nothing there; the virtio-mmio driver binds to ACPI devices with `_HID` "LNRO0005" instead.
//! The tables are the smallest set that says so: an RSDP, an XSDT, a FADT with a FACS and a
//! DSDT holding one device per virtio-mmio slot with its MMIO window and its (edge-triggered,
//! ISA) interrupt line, and `\_S5` for soft-off. The FADT is a full one, not
//! "hardware-reduced": Linux takes a hardware-reduced platform to have no 8259 PIC and no PIT.
//! So it names the PM1a event and control blocks ([`crate::devices::acpi_pm`]), an SCI line
//! that never fires, no SMI_CMD port (always in ACPI mode) and the PM timer
//! ([`crate::devices::pm_timer`], counting the PIT's virtual clock: the clocksource that
//! keeps Linux off the TSC). There is no MADT: the guest has no local APIC or I/O APIC and stays on the PIC.
//!
//! The tables live in the BIOS area below 1 MiB, which the e820 map reserves. Firmware would
//! put them there; Linux finds the RSDP through `boot_params.acpi_rsdp_addr`.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::BootError;
use crate::devices::acpi_pm::{PM1A_CNT_PORT, PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5};
use crate::devices::pm_timer::{PM_TMR_LEN, PM_TMR_PORT};
use crate::memory::GuestMemory;

/// Where the tables start (the RSDP first).
pub const ACPI_START: u64 = 0xe_0000;
/// Where they must end (the top of the BIOS area).
const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"FTVM  ";
const OEM_TABLE_ID: [u8; 8] = *b"FTVMPLAT";
const OEM_REVISION: u32 = 1;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// The MMIO window's guest physical address.
    pub base: u64,
    /// Its length.
    pub len: u64,
    /// The ISA interrupt line (PIC input) it raises.
    pub irq: u8,
}

/// Tables are placed on 16-byte boundaries, one after another.
fn align16(v: u64) -> u64 {
    (v + 15) & !15
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, slots: &[VirtioMmioSlot]) -> Result<u64, BootError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // The XSDT has one entry: the FADT.
    let fadt_addr = align16(xsdt_addr + 36 + 8);
    // The FACS must be 64-byte aligned.
    let facs_addr = (fadt_addr + acpi_tables::fadt::FADT::len() as u64 + 63) & !63;
    let dsdt_addr = align16(facs_addr + FACS::len() as u64);

    let dsdt = dsdt(slots);
    if dsdt_addr + dsdt.len() as u64 > ACPI_END {
        return Err(BootError::Memory(format!(
            "ACPI tables for {} devices do not fit below 1 MiB",
            slots.len()
        )));
    }
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = (PM1A_EVT_PORT as u32).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1a_cnt_blk = (PM1A_CNT_PORT as u32).into();
    fadt.pm1_cnt_len = 2;
    // The PM timer (24-bit: TMR_VAL_EXT clear), the clocksource that reads through an exit.
    fadt.pm_tmr_blk = (PM_TMR_PORT as u32).into();
    fadt.pm_tmr_len = PM_TMR_LEN as u8;
    // IA-PC boot architecture: an 8042 is present (bit 1), no CMOS RTC (bit 5).
    fadt.iapc_boot_arch = (1u16 << 1 | 1 << 5).into();
    let fadt = fadt.finalize();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let write = |what: &dyn Aml, at: u64| -> Result<(), BootError> {
        let mut bytes = Vec::new();
        what.to_aml_bytes(&mut bytes);
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(|e| BootError::Memory(format!("ACPI table at {at:#x}: {e}")))
    };
    write(&rsdp, rsdp_addr)?;
    write(&xsdt, xsdt_addr)?;
    write(&fadt, fadt_addr)?;
    write(&FACS::new(), facs_addr)?;
    mem.write_slice(dsdt.as_slice(), GuestAddress(dsdt_addr))
        .map_err(|e| BootError::Memory(format!("DSDT: {e}")))?;
    Ok(rsdp_addr)
}

/// The DSDT: `\_SB.VRnn` for each virtio-mmio slot.
fn dsdt(slots: &[VirtioMmioSlot]) -> Sdt {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u16, &0u16]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    for (i, slot) in slots.iter().enumerate() {
        let path = format!("_SB_.VR{i:02X}");
        let uid = i as u32;
        let mmio = aml::Memory32Fixed::new(true, slot.base as u32, slot.len as u32);
        // Edge-triggered, active-high, exclusive: an ISA line on the 8259.
        let irq = aml::Interrupt::new(true, true, false, false, u32::from(slot.irq));
        let crs = aml::ResourceTemplate::new(vec![&mmio, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &uid);
        let crs = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }
    table.append_slice(&body);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = crate::memory::create(32).unwrap();
        let slot = VirtioMmioSlot {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        };
        let rsdp = write_tables(&mem, &[slot]).unwrap();
        let read = |at: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            b
        };
        let r = read(rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let len_of = |at: u64| u32::from_le_bytes(read(at + 4, 4).try_into().unwrap()) as usize;
        let xsdt = read(xsdt_addr, len_of(xsdt_addr));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let fadt = read(fadt_addr, len_of(fadt_addr));
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        // X_DSDT at offset 140; not hardware-reduced (flag bit 20 at offset 112), or Linux
        // would drop the PIC; PM1a blocks at 56 and 64; the SCI line at 46.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 20), 0);
        assert_eq!(u32::from_le_bytes(fadt[56..60].try_into().unwrap()), 0x600);
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), 0x604);
        assert_eq!(u16::from_le_bytes(fadt[46..48].try_into().unwrap()), 9);
        let facs_addr = u64::from_le_bytes(fadt[132..140].try_into().unwrap());
        assert_eq!(&read(facs_addr, 4), b"FACS");
        assert_eq!(facs_addr % 64, 0);
        let dsdt = read(dsdt_addr, len_of(dsdt_addr));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005\0"));
        assert!(has(b"VR00"));
        assert!(has(b"_S5_"));
        assert!(has(&0xd000_0000u32.to_le_bytes()));
    }
}
