//! The virtio-mmio transport (virtio 1.2, §4.2; "version 2" registers, virtio 1.x drivers
//! only): the register window of one device, generic over the [`VirtioDevice`] behind it.
//!
//! The transport owns what is the same for every device type: identification, feature
//! negotiation, the queues' registers and the queues themselves, `QueueNotify`, the interrupt
//! status and the device's interrupt line, the device status and reset, and the saved state
//! of all of these. Everything device-specific is asked of the device.
//!
//! A malformed ring is never fatal: the device reports the queue broken and the transport
//! sets DEVICE_NEEDS_RESET, after which the device serves no more requests until the driver
//! resets it.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};

use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::devices::IrqLine;
use crate::memory::GuestMemory;
use crate::state::{Persist, StateError};

/// The size of one virtio-mmio register window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_5446; // "FTVM"

// Register offsets (virtio 1.2, §4.2.2).
pub(crate) const REG_MAGIC: u64 = 0x000;
pub(crate) const REG_VERSION: u64 = 0x004;
pub(crate) const REG_DEVICE_ID: u64 = 0x008;
pub(crate) const REG_VENDOR_ID: u64 = 0x00c;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: u64 = 0x050;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x060;
pub(crate) const REG_INTERRUPT_ACK: u64 = 0x064;
pub(crate) const REG_STATUS: u64 = 0x070;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
pub(crate) const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub(crate) const REG_QUEUE_USED_LOW: u64 = 0x0a0;
pub(crate) const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
pub(crate) const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub(crate) const REG_CONFIG: u64 = 0x100;

/// InterruptStatus bit: the device used a buffer.
pub(crate) const INT_USED_BUFFER: u32 = 1;
/// Status bit the driver sets when it gives up on the device.
const STATUS_FAILED: u32 = 128;
const STATUS_DEVICE_NEEDS_RESET: u32 = 64;

/// Driver status bits a fully set-up device shows (for tests).
pub const STATUS_READY: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

/// The saved state of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available ring entry the device will take.
    pub next_avail: u16,
    /// Next used ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated (never offered; kept for completeness).
    pub event_idx: bool,
}

/// The saved state of one virtio-mmio device: the transport's registers and queues, and the
/// device's own state `S` (host-side resources, such as a disk image's contents, are not
/// state: each host of a pair has its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState<S> {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// What the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues, in queue order.
    pub queues: Vec<QueueRegs>,
    /// What the device itself keeps.
    pub device: S,
}

/// A virtio device on its virtio-mmio register window: the [`BusDevice`] that goes on the
/// MMIO bus.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    irq: IrqLine,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    queues: Vec<Queue>,
}

/// A fresh queue of `max_size` entries.
fn new_queue<D: VirtioDevice>(max_size: u16) -> Queue {
    // The device's queue sizes are constants; one that is not a power of two is a bug in the
    // device, found by its first test.
    Queue::new(max_size)
        .unwrap_or_else(|e| panic!("{}: queue size {max_size} is invalid: {e}", D::NAME))
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `device` behind a register window, raising `irq`, doing DMA into `mem`.
    pub fn new(device: D, mem: GuestMemory, irq: IrqLine) -> Self {
        let mut t = Self {
            device,
            mem,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            queues: Vec::new(),
        };
        t.queues = t.fresh_queues();
        t
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, to hand it what the host side gives it.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn fresh_queues(&self) -> Vec<Queue> {
        self.device
            .queue_max_sizes()
            .iter()
            .map(|&max| new_queue::<D>(max))
            .collect()
    }

    /// What is offered: the device's features and the transport's.
    fn device_features(&self) -> u64 {
        self.device.features() | 1u64 << VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queues = self.fresh_queues();
        self.device.reset();
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0
    }

    /// The queue QueueSel selects, if it exists.
    fn selected_mut(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// Lets the device serve what the driver made available in queue `index`, then
    /// interrupts if the driver wants to hear about it. `QueueNotify` does this; so can the
    /// machine, at an exit, when the host side gave the device something a queue waits for.
    pub fn process_queue(&mut self, index: usize) {
        self.serve_queue(index, |device, queue, mem| {
            device.process_queue(index, queue, mem)
        });
    }

    /// Whether queue `index` is live and the driver has made at least one buffer available
    /// in it that the device has not taken yet (a receive queue with room).
    pub fn has_available(&self, index: usize) -> bool {
        if !self.driver_ok() {
            return false;
        }
        let Some(queue) = self.queues.get(index) else {
            return false;
        };
        if !queue.ready() || !queue.is_valid(&self.mem) {
            return false;
        }
        queue
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// Runs `f` on the device and queue `index` if the queue is live (the driver is set up,
    /// the queue ready and valid), then interrupts if a buffer was used and the driver wants
    /// to hear about it: what a notification does, and what the machine does at an exit when
    /// the host side hands the device something for a queue (a received frame).
    pub fn serve_queue(
        &mut self,
        index: usize,
        f: impl FnOnce(&mut D, &mut Queue, &GuestMemory) -> super::Processed,
    ) {
        if !self.driver_ok() {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() || !queue.is_valid(&self.mem) {
            return;
        }
        let done = f(&mut self.device, queue, &self.mem);
        if done.broken {
            self.status |= STATUS_DEVICE_NEEDS_RESET;
        }
        if done.used && queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt_status |= INT_USED_BUFFER;
            self.irq.pulse();
        }
    }

    pub(crate) fn read_reg(&self, offset: u64) -> u32 {
        let selected = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|sel| self.queues.get(sel));
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                // Only what was offered can be accepted.
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let accepted = (u64::from(v) << shift) & self.device_features();
                self.driver_features = (self.driver_features & !mask) | accepted;
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => {
                let Some(q) = self.selected_mut() else { return };
                match offset {
                    REG_QUEUE_NUM => q.set_size(v as u16),
                    REG_QUEUE_READY => q.set_ready(v == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                    REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                    REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            REG_QUEUE_NOTIFY => {
                if let Ok(index) = usize::try_from(v) {
                    self.process_queue(index);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => {
                if v == 0 {
                    self.reset();
                } else if v & VIRTIO_CONFIG_S_FEATURES_OK != 0
                    && self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
                {
                    // A legacy driver: refuse FEATURES_OK (virtio 1.x only).
                    self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                } else {
                    self.status = v;
                }
            }
            _ => {}
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        let v = self.read_reg(offset).to_le_bytes();
        // Registers are 32-bit; a narrower read gets the low bytes.
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let mut v = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            v[i] = *b;
        }
        self.write_reg(offset, u32::from_le_bytes(v));
    }
}

fn save_queue(q: &Queue) -> QueueRegs {
    let q = q.state();
    QueueRegs {
        size: q.size,
        ready: q.ready,
        desc: q.desc_table,
        avail: q.avail_ring,
        used: q.used_ring,
        next_avail: q.next_avail,
        next_used: q.next_used,
        event_idx: q.event_idx_enabled,
    }
}

fn restore_queue<D: VirtioDevice>(max_size: u16, s: &QueueRegs) -> Result<Queue, StateError> {
    let mut queue = new_queue::<D>(max_size);
    if s.size != 0 {
        queue
            .try_set_size(s.size)
            .map_err(|e| StateError::Invalid {
                device: D::NAME,
                why: format!("queue size: {e}"),
            })?;
    }
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(s.desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(s.avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(s.used);
    queue.set_used_ring_address(lo, hi);
    queue.set_next_avail(s.next_avail);
    queue.set_next_used(s.next_used);
    queue.set_event_idx(s.event_idx);
    queue.set_ready(s.ready);
    Ok(queue)
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState<D::State>;

    fn save(&self) -> Result<Self::State, StateError> {
        Ok(MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queues: self.queues.iter().map(save_queue).collect(),
            device: self.device.save()?,
        })
    }

    fn restore(&mut self, s: &Self::State) -> Result<(), StateError> {
        let max_sizes = self.device.queue_max_sizes();
        if s.queues.len() != max_sizes.len() {
            return Err(StateError::Invalid {
                device: D::NAME,
                why: format!(
                    "state for {} queues restored into a device with {}",
                    s.queues.len(),
                    max_sizes.len()
                ),
            });
        }
        let queues = max_sizes
            .iter()
            .zip(&s.queues)
            .map(|(&max, q)| restore_queue::<D>(max, q))
            .collect::<Result<Vec<_>, _>>()?;
        self.device.restore(&s.device)?;
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{Driver, IRQ};
    use crate::devices::virtio::{Processed, TYPE_NET};

    /// A device of two queues that completes every chain with nothing written, and records
    /// what the transport asked of it.
    #[derive(Default)]
    struct Probe {
        notified: Vec<usize>,
        resets: u32,
        broken: bool,
        config: [u8; 4],
    }

    const PROBE_FEATURE: u64 = 1 << 5;

    impl Persist for Probe {
        type State = [u8; 4];
        fn save(&self) -> Result<[u8; 4], StateError> {
            Ok(self.config)
        }
        fn restore(&mut self, s: &[u8; 4]) -> Result<(), StateError> {
            self.config = *s;
            Ok(())
        }
    }

    impl VirtioDevice for Probe {
        const NAME: &'static str = "probe";
        fn device_type(&self) -> u32 {
            TYPE_NET
        }
        fn features(&self) -> u64 {
            PROBE_FEATURE
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 32]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn process_queue(
            &mut self,
            index: usize,
            queue: &mut Queue,
            mem: &GuestMemory,
        ) -> Processed {
            self.notified.push(index);
            let mut used = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                queue.add_used(mem, chain.head_index(), 0).unwrap();
                used = true;
            }
            Processed {
                used,
                broken: self.broken,
            }
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    #[test]
    fn identifies_the_device_and_negotiates_only_what_is_offered() {
        let mut d = Driver::new(Probe::default(), 2);
        assert_eq!(d.reg(REG_MAGIC), MAGIC);
        assert_eq!(d.reg(REG_VERSION), 2);
        assert_eq!(d.reg(REG_DEVICE_ID), TYPE_NET);
        assert_eq!(d.reg(REG_VENDOR_ID), VENDOR_ID);
        d.write_reg(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(u64::from(d.reg(REG_DEVICE_FEATURES)), PROBE_FEATURE);
        d.write_reg(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.reg(REG_DEVICE_FEATURES), 1, "VERSION_1 (bit 32)");
        // The driver asks for everything; it gets what was offered.
        d.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        d.write_reg(REG_DRIVER_FEATURES, u32::MAX);
        d.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        d.write_reg(REG_DRIVER_FEATURES, u32::MAX);
        let want = PROBE_FEATURE | 1 << VIRTIO_F_VERSION_1;
        assert_eq!(d.dev.save().unwrap().driver_features, want);
        // The configuration space is the device's.
        d.dev.write(0, REG_CONFIG + 1, &[7, 8]);
        let mut config = [0u8; 4];
        d.dev.read(0, REG_CONFIG, &mut config);
        assert_eq!(config, [0, 7, 8, 0]);

        // A legacy driver (no VERSION_1) does not get FEATURES_OK.
        d.write_reg(REG_STATUS, 0);
        d.write_reg(REG_DRIVER_FEATURES, 0);
        let asked = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        d.write_reg(REG_STATUS, asked | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(d.reg(REG_STATUS), asked);
    }

    #[test]
    fn queues_are_selected_and_notified_by_index() {
        let mut d = Driver::new(Probe::default(), 2);
        for (sel, max) in [(0, 16), (1, 32), (2, 0)] {
            d.write_reg(REG_QUEUE_SEL, sel);
            assert_eq!(d.reg(REG_QUEUE_NUM_MAX), max, "queue {sel}");
            assert_eq!(d.reg(REG_QUEUE_READY), u32::from(max != 0), "queue {sel}");
        }
        // Queue registers of a queue that does not exist are ignored.
        d.write_reg(REG_QUEUE_READY, 1);
        assert_eq!(d.reg(REG_QUEUE_READY), 0);

        d.request_on(1, &[(0x8000, 8, true)]);
        assert_eq!(d.dev.device().notified, [1]);
        assert_eq!(d.used_idx(1), 1);
        assert_eq!(d.used_idx(0), 0);
        assert_eq!(d.lines.take(), 1 << IRQ);
        assert_eq!(d.reg(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        d.write_reg(REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(d.reg(REG_INTERRUPT_STATUS), 0);
        // A notification of a queue that does not exist reaches nobody.
        d.write_reg(REG_QUEUE_NOTIFY, 2);
        assert_eq!(d.dev.device().notified, [1]);
        // Nothing used: no interrupt.
        d.write_reg(REG_QUEUE_NOTIFY, 0);
        assert_eq!(d.dev.device().notified, [1, 0]);
        assert_eq!(d.lines.take(), 0);
    }

    #[test]
    fn a_broken_queue_needs_a_reset_which_clears_everything() {
        let mut d = Driver::new(Probe::default(), 2);
        d.dev.device_mut().broken = true;
        d.request(&[(0x8000, 8, true)]);
        assert_ne!(d.reg(REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        // Until the reset, the device is left alone.
        d.request(&[(0x8000, 8, true)]);
        assert_eq!(d.dev.device().notified, [0]);

        d.write_reg(REG_STATUS, 0);
        assert_eq!(d.dev.device().resets, 1);
        let s = d.dev.save().unwrap();
        assert_eq!((s.status, s.driver_features, s.interrupt_status), (0, 0, 0));
        let fresh = |size| QueueRegs {
            size,
            ..QueueRegs::default()
        };
        assert_eq!(s.queues, [fresh(16), fresh(32)]);
    }

    #[test]
    fn state_round_trips_and_must_fit_the_device() {
        let mut d = Driver::new(Probe::default(), 2);
        d.dev.write(0, REG_CONFIG, &[1, 2, 3, 4]);
        d.request_on(1, &[(0x8000, 8, true)]);
        let saved = d.dev.save().unwrap();
        assert_eq!(
            (saved.queues[1].next_avail, saved.device),
            (1, [1, 2, 3, 4])
        );

        let mut other = Driver::new(Probe::default(), 0);
        other.dev.restore(&saved).unwrap();
        assert_eq!(other.dev.save().unwrap(), saved);
        // The restored queue carries on where the saved one was.
        other.write_reg(REG_QUEUE_NOTIFY, 1);
        assert_eq!(other.dev.device().notified, [1]);

        let mut short = saved.clone();
        short.queues.pop();
        assert!(matches!(
            other.dev.restore(&short),
            Err(StateError::Invalid {
                device: "probe",
                ..
            })
        ));
    }
}
