//! A minimal virtio driver for the unit tests of the transport and of the devices: it sets
//! a device up the way Linux does, lays out each queue's rings in guest memory, posts
//! descriptor chains and notifies.

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{
    MmioTransport, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_AVAIL_LOW,
    REG_QUEUE_DESC_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_SEL,
    REG_QUEUE_USED_LOW, REG_STATUS, STATUS_READY,
};
use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::devices::IrqLines;
use crate::memory::GuestMemory;

/// The interrupt line the device under test raises.
pub(crate) const IRQ: u8 = 5;
/// Entries of each queue the driver sets up.
pub(crate) const QUEUE_ENTRIES: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Where queue `q`'s rings are: the descriptor table, the available ring and the used ring,
/// one page each, 64 KiB apart per queue from 0x1000 (below 0x4000 for queue 0, which the
/// device tests use for their buffers, and above 64 KiB for the others).
pub(crate) fn rings(q: u16) -> (u64, u64, u64) {
    let base = 0x1000 + u64::from(q) * 0x1_0000;
    (base, base + 0x1000, base + 0x2000)
}

/// A device on its transport, driven by this driver.
pub(crate) struct Driver<D> {
    pub dev: MmioTransport<D>,
    pub mem: GuestMemory,
    pub lines: IrqLines,
    /// Per queue: the next free descriptor and the available ring's index.
    next: Vec<(u16, u16)>,
}

impl<D: VirtioDevice> Driver<D> {
    /// `device` with its queues `0..queues` set up (16 entries each) and DRIVER_OK, as a
    /// virtio 1.x driver accepting no device feature leaves it.
    pub fn new(device: D, queues: u16) -> Self {
        let mem = crate::memory::create(16).unwrap();
        let lines = IrqLines::default();
        let dev = MmioTransport::new(device, mem.clone(), lines.line(IRQ));
        let mut d = Self {
            dev,
            mem,
            lines,
            next: vec![(0, 0); usize::from(queues)],
        };
        d.write_reg(
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        d.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        d.write_reg(REG_DRIVER_FEATURES, 1); // VERSION_1 (bit 32)
        for q in 0..queues {
            let (desc, avail, used) = rings(q);
            d.write_reg(REG_QUEUE_SEL, u32::from(q));
            d.write_reg(REG_QUEUE_NUM, u32::from(QUEUE_ENTRIES));
            d.write_reg(REG_QUEUE_DESC_LOW, desc as u32);
            d.write_reg(REG_QUEUE_AVAIL_LOW, avail as u32);
            d.write_reg(REG_QUEUE_USED_LOW, used as u32);
            d.write_reg(REG_QUEUE_READY, 1);
        }
        d.write_reg(REG_STATUS, STATUS_READY);
        assert_eq!(d.reg(REG_STATUS), STATUS_READY);
        d
    }

    /// Reads a 32-bit register.
    pub fn reg(&mut self, offset: u64) -> u32 {
        let mut v = [0u8; 4];
        self.dev.read(0, offset, &mut v);
        u32::from_le_bytes(v)
    }

    /// Writes a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, v: u32) {
        self.dev.write(0, offset, &v.to_le_bytes());
    }

    /// Posts a chain of (addr, len, device-writable) buffers on queue `q` and notifies.
    pub fn request_on(&mut self, q: u16, bufs: &[(u64, u32, bool)]) {
        let (desc, avail, _) = rings(q);
        let (next_desc, avail_idx) = &mut self.next[usize::from(q)];
        let head = *next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = *next_desc;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            let at = desc + u64::from(idx) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(idx + 1, GuestAddress(at + 14)).unwrap();
            *next_desc += 1;
        }
        let slot = avail + 4 + u64::from(*avail_idx % QUEUE_ENTRIES) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        *avail_idx += 1;
        let idx = *avail_idx;
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
        self.write_reg(REG_QUEUE_NOTIFY, u32::from(q));
    }

    /// Posts a chain on queue 0 and notifies.
    pub fn request(&mut self, bufs: &[(u64, u32, bool)]) {
        self.request_on(0, bufs);
    }

    /// The byte at `at` in guest memory.
    pub fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: u16) -> u16 {
        self.mem.read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// The length the device reported for used ring entry `n` of queue `q`.
    pub fn used_len(&self, q: u16, n: u16) -> u32 {
        let at = rings(q).2 + 4 + u64::from(n % QUEUE_ENTRIES) * 8 + 4;
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}
