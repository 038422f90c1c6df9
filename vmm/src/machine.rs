//! The platform: every device on the PIO/MMIO buses, the interrupt lines into the PIC, and the
//! inputs that reach devices from the host side. The exit loop drives it; nothing in here
//! touches host time or host I/O.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::acpi::VirtioMmioSlot;
use crate::bus::{lock, Bus, OverlapError};
use crate::devices::acpi_pm::{AcpiPm, AcpiPmState, PM1A_EVT_PORT, PM_PORTS};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use crate::devices::i8042::{I8042State, COMMAND_PORT, DATA_PORT, I8042};
use crate::devices::pic::{Pic, PicState, MASTER_PORT, SLAVE_PORT};
use crate::devices::pit::{Pit, PitState, PIT_PORT, PORT_61};
use crate::devices::pm_timer::{PmTimer, PM_TMR_LEN, PM_TMR_PORT};
use crate::devices::post::{PostCode, PostState, POST_PORT};
use crate::devices::rtc::{Rtc, RtcState, RTC_PORT, RTC_PORTS};
use crate::devices::serial::{Serial, SerialState, TxQueue, COM1_IRQ, COM1_PORT};
use crate::devices::virtio::block::{
    Block, DiskBlock, DiskImage, DiskInfo, DiskRead, DiskReadLog, VirtioBlk, VirtioBlkState,
};
use crate::devices::virtio::net::{MacAddr, Net, NetTxQueue, VirtioNet, VirtioNetState, RX_QUEUE};
use crate::devices::virtio::MMIO_WINDOW;
use crate::devices::{IrqLines, StopLine, StopRequest};
use crate::memory::GuestMemory;
use crate::state::{Persist, StateError};

/// Where the virtio-mmio windows start (in the MMIO gap below 4 GiB), one page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The ISA interrupt lines of the virtio-mmio slots, in slot order: lines no legacy device
/// of this platform uses.
pub const VIRTIO_IRQS: [u8; 4] = [5, 10, 11, 9];

/// A nondeterministic input from the host side, delivered to the devices at an exit. The exit
/// hook decides what the inputs are (live: the host; secondary: the replication log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The virtual clock advances to this many nanoseconds since the VM started.
    Clock(u64),
    /// Bytes arrive on COM1's receive line. Never more than [`HostView::rx_capacity`].
    SerialRx(Vec<u8>),
    /// An Ethernet frame arrives at the network card. Offered only while
    /// [`HostView::net_rx_ready`](crate::exit::HostView::net_rx_ready) says a receive buffer
    /// is there for it.
    NetRx(Vec<u8>),
}

/// An input the machine could not take.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// More serial bytes than the receive FIFO had room for.
    #[error("serial input of {given} bytes offered where only {taken} fit in the receive FIFO")]
    SerialOverrun {
        /// Bytes offered.
        given: usize,
        /// Bytes that fit.
        taken: usize,
    },
    /// A frame for a VM without a network card.
    #[error("a received network frame was offered to a VM without a network card")]
    NoNetworkCard,
}

/// Where virtio-mmio slot `i` (< `VIRTIO_IRQS.len()`) lives and which line it raises: the
/// one layout both the MMIO bus and the ACPI tables use.
fn virtio_slot(i: usize) -> VirtioMmioSlot {
    VirtioMmioSlot {
        base: VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
        len: MMIO_WINDOW,
        irq: VIRTIO_IRQS[i],
    }
}

/// The platform could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Two devices claim one address range.
    #[error(transparent)]
    Overlap(#[from] OverlapError),
    /// More disks than virtio-mmio slots.
    #[error("{0} disks given; at most {n} virtio devices (disks and the network card) can be attached", n = VIRTIO_IRQS.len())]
    TooManyDisks(usize),
}

/// The saved state of every device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The PIC pair.
    pub pic: PicState,
    /// The PIT (including the virtual clock).
    pub pit: PitState,
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The POST-code latch.
    pub post: PostState,
    /// The ACPI PM1 registers.
    pub acpi_pm: AcpiPmState,
    /// The virtio block devices, in slot order.
    pub virtio_blk: Vec<VirtioBlkState>,
    /// The CMOS clock's register index and RAM (states saved before it existed have none).
    #[serde(default)]
    pub rtc: RtcState,
    /// The network card, if the VM has one.
    #[serde(default)]
    pub virtio_net: Option<VirtioNetState>,
}

/// The devices and the buses that reach them.
pub struct Machine {
    /// Port I/O space.
    pub pio: Bus,
    /// Memory-mapped I/O space.
    pub mmio: Bus,
    pic: Arc<Mutex<Pic>>,
    pit: Arc<Mutex<Pit>>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    post: Arc<Mutex<PostCode>>,
    rtc: Arc<Mutex<Rtc>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    virtio_blk: Vec<Arc<Mutex<VirtioBlk>>>,
    disk_reads: DiskReadLog,
    virtio_net: Option<Arc<Mutex<VirtioNet>>>,
    net_tx: NetTxQueue,
    irq_lines: IrqLines,
    stop: StopLine,
    tx: TxQueue,
}

impl Machine {
    /// The PC platform ftvm offers: dual PIC, PIT, COM1, i8042, debug-exit and POST ports,
    /// a virtio-mmio block device for each of `disks` and, with `net`, a virtio-mmio network
    /// card with that MAC address in the slot after the disks, doing DMA into `memory`.
    pub fn new(
        memory: &GuestMemory,
        disks: Vec<DiskImage>,
        net: Option<MacAddr>,
    ) -> Result<Self, MachineError> {
        if disks.len() + usize::from(net.is_some()) > VIRTIO_IRQS.len() {
            return Err(MachineError::TooManyDisks(disks.len()));
        }
        let irq_lines = IrqLines::default();
        let stop = StopLine::default();
        let tx = TxQueue::default();
        let pic = Arc::new(Mutex::new(Pic::new()));
        let pit = Arc::new(Mutex::new(Pit::new(irq_lines.line(0))));
        let serial = Arc::new(Mutex::new(Serial::new(
            irq_lines.line(COM1_IRQ),
            tx.clone(),
        )));
        let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone())));
        let post = Arc::new(Mutex::new(PostCode::default()));
        let mut pio = Bus::new();
        pio.insert(pic.clone(), MASTER_PORT, 2)?;
        pio.insert(pic.clone(), SLAVE_PORT, 2)?;
        pio.insert(pit.clone(), PIT_PORT, 4)?;
        pio.insert(pit.clone(), PORT_61, 1)?;
        pio.insert(serial.clone(), COM1_PORT, 8)?;
        pio.insert(i8042.clone(), DATA_PORT, 1)?;
        pio.insert(i8042.clone(), COMMAND_PORT, 1)?;
        pio.insert(post.clone(), POST_PORT, 1)?;
        let rtc = Arc::new(Mutex::new(Rtc::new(pit.clone())));
        pio.insert(rtc.clone(), RTC_PORT, RTC_PORTS)?;
        pio.insert(
            Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
            DEBUG_EXIT_PORT,
            1,
        )?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(stop.clone())));
        pio.insert(acpi_pm.clone(), PM1A_EVT_PORT, PM_PORTS)?;
        pio.insert(
            Arc::new(Mutex::new(PmTimer::new(pit.clone()))),
            PM_TMR_PORT,
            PM_TMR_LEN,
        )?;
        let mut mmio = Bus::new();
        let mut virtio_blk = Vec::new();
        let disk_reads = DiskReadLog::default();
        let net_slot = disks.len();
        for (i, disk) in disks.into_iter().enumerate() {
            let slot = virtio_slot(i);
            let dev = Arc::new(Mutex::new(VirtioBlk::new(
                Block::new(disk).logging_reads(i as u32, disk_reads.clone()),
                memory.clone(),
                irq_lines.line(slot.irq),
            )));
            mmio.insert(dev.clone(), slot.base, slot.len)?;
            virtio_blk.push(dev);
        }
        let net_tx = NetTxQueue::default();
        let virtio_net = match net {
            Some(mac) => {
                let slot = virtio_slot(net_slot);
                let dev = Arc::new(Mutex::new(VirtioNet::new(
                    Net::new(mac, net_tx.clone()),
                    memory.clone(),
                    irq_lines.line(slot.irq),
                )));
                mmio.insert(dev.clone(), slot.base, slot.len)?;
                Some(dev)
            }
            None => None,
        };
        Ok(Self {
            virtio_net,
            net_tx,
            pio,
            mmio,
            acpi_pm,
            virtio_blk,
            disk_reads,
            pic,
            pit,
            serial,
            i8042,
            post,
            rtc,
            irq_lines,
            stop,
            tx,
        })
    }

    /// The CMOS clock's wall-clock time at virtual time 0, in Unix seconds (part of the VM's
    /// configuration: both sides of a pair set the same).
    pub fn set_rtc_base(&self, unix_s: u64) {
        lock(&self.rtc).set_base(unix_s);
    }

    /// The attached disks, in slot order.
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.virtio_blk
            .iter()
            .map(|d| lock(d).device().disk().info())
            .collect()
    }

    /// The attached disks' image paths, in slot order.
    pub fn disk_paths(&self) -> Vec<std::path::PathBuf> {
        self.virtio_blk
            .iter()
            .map(|d| lock(d).device().disk().path().to_path_buf())
            .collect()
    }

    /// The disk blocks the guest wrote since the last call, every disk, ascending
    /// (DESIGN.md §4 "Disks").
    pub fn take_dirty_blocks(&self) -> Vec<DiskBlock> {
        let mut all = Vec::new();
        for (disk, d) in self.virtio_blk.iter().enumerate() {
            let blocks = lock(d).device_mut().disk_mut().take_dirty_blocks();
            all.extend(blocks.into_iter().map(|block| DiskBlock {
                disk: disk as u32,
                block,
            }));
        }
        all
    }

    /// Whether the block devices hash and queue the reads they serve (DESIGN.md §2: the
    /// replication log names every disk read); off until a hook asks.
    pub fn set_disk_read_logging(&self, on: bool) {
        self.disk_reads.set_enabled(on);
    }

    /// The disk reads served since the last call, in order (none while logging is off).
    pub fn take_disk_reads(&self) -> Vec<DiskRead> {
        if self.virtio_blk.is_empty() || !self.disk_reads.enabled() {
            return Vec::new();
        }
        self.disk_reads.take()
    }

    /// Runs `f` on the image of disk `b.disk`.
    fn with_disk<T>(
        &self,
        b: DiskBlock,
        f: impl FnOnce(&DiskImage) -> std::io::Result<T>,
    ) -> Result<T, crate::Error> {
        let err = |source| crate::Error::DiskBlock {
            disk: b.disk,
            block: b.block,
            source,
        };
        let d = self
            .virtio_blk
            .get(b.disk as usize)
            .ok_or_else(|| err(std::io::Error::other("no such disk")))?;
        let dev = lock(d);
        f(dev.device().disk()).map_err(err)
    }

    /// Reads disk block `b` into `buf` (resized to the block's length).
    pub fn read_disk_block(&self, b: DiskBlock, buf: &mut Vec<u8>) -> Result<(), crate::Error> {
        self.with_disk(b, |d| d.read_block(b.block, buf))
    }

    /// Writes disk block `b` (a repair): the whole block, or empty for zeroes. Not marked
    /// dirty.
    pub fn write_disk_block(&self, b: DiskBlock, data: &[u8]) -> Result<(), crate::Error> {
        self.with_disk(b, |d| d.write_block(b.block, data))
    }

    /// The virtio-mmio devices as the ACPI tables announce them.
    pub fn virtio_slots(&self) -> Vec<VirtioMmioSlot> {
        let n = self.virtio_blk.len() + usize::from(self.virtio_net.is_some());
        (0..n).map(virtio_slot).collect()
    }

    /// The network card's MAC address, if the VM has a card.
    pub fn net_mac(&self) -> Option<MacAddr> {
        self.virtio_net.as_ref().map(|n| lock(n).device().mac())
    }

    /// Whether the network card has a receive buffer for a frame now.
    pub fn net_rx_ready(&self) -> bool {
        self.virtio_net
            .as_ref()
            .is_some_and(|n| lock(n).has_available(RX_QUEUE))
    }

    /// Frames the guest transmitted since the last call, in order.
    pub fn take_net_output(&self) -> Vec<Vec<u8>> {
        self.net_tx.drain()
    }

    /// Applies one input.
    pub fn apply(&mut self, input: &Input) -> Result<(), InputError> {
        match input {
            Input::Clock(ns) => lock(&self.pit).advance(*ns),
            Input::SerialRx(bytes) => {
                let taken = lock(&self.serial).receive(bytes);
                if taken != bytes.len() {
                    return Err(InputError::SerialOverrun {
                        given: bytes.len(),
                        taken,
                    });
                }
            }
            Input::NetRx(frame) => {
                let net = self.virtio_net.as_ref().ok_or(InputError::NoNetworkCard)?;
                lock(net).serve_queue(RX_QUEUE, |n, q, m| n.receive(q, m, frame));
            }
        }
        Ok(())
    }

    /// The virtual clock.
    pub fn now_ns(&self) -> u64 {
        lock(&self.pit).now_ns()
    }

    /// Virtual time of the next timer interrupt, if one is armed.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        lock(&self.pit).next_deadline()
    }

    /// Room in COM1's receive FIFO.
    pub fn serial_rx_capacity(&self) -> usize {
        lock(&self.serial).rx_capacity()
    }

    fn fold_irq_lines(&self) -> std::sync::MutexGuard<'_, Pic> {
        let mut pic = lock(&self.pic);
        let edges = self.irq_lines.take();
        if edges != 0 {
            pic.pulse_lines(edges);
        }
        pic
    }

    /// The vector the PIC would deliver now.
    pub fn pending_vector(&self) -> Option<u8> {
        self.fold_irq_lines().pending_vector()
    }

    /// The interrupt-acknowledge cycle: the vector to inject.
    pub fn acknowledge_interrupt(&self) -> Option<u8> {
        self.fold_irq_lines().acknowledge()
    }

    /// Output the guest transmitted since the last call.
    pub fn take_output(&self) -> Vec<u8> {
        self.tx.drain()
    }

    /// A stop the guest requested during the last exit.
    pub fn take_stop(&self) -> Option<StopRequest> {
        self.stop.take()
    }

    /// Saves every device.
    pub fn save(&self) -> Result<DeviceStates, StateError> {
        let pic = self.fold_irq_lines().save()?;
        Ok(DeviceStates {
            pic,
            pit: lock(&self.pit).save()?,
            serial: lock(&self.serial).save()?,
            i8042: lock(&self.i8042).save()?,
            post: lock(&self.post).save()?,
            acpi_pm: lock(&self.acpi_pm).save()?,
            rtc: lock(&self.rtc).save()?,
            virtio_blk: self
                .virtio_blk
                .iter()
                .map(|d| lock(d).save())
                .collect::<Result<_, _>>()?,
            virtio_net: self
                .virtio_net
                .as_ref()
                .map(|n| lock(n).save())
                .transpose()?,
        })
    }

    /// Restores every device.
    pub fn restore(&mut self, s: &DeviceStates) -> Result<(), StateError> {
        lock(&self.pic).restore(&s.pic)?;
        lock(&self.pit).restore(&s.pit)?;
        lock(&self.serial).restore(&s.serial)?;
        lock(&self.i8042).restore(&s.i8042)?;
        lock(&self.post).restore(&s.post)?;
        lock(&self.acpi_pm).restore(&s.acpi_pm)?;
        lock(&self.rtc).restore(&s.rtc)?;
        if s.virtio_blk.len() != self.virtio_blk.len() {
            return Err(StateError::Invalid {
                device: "virtio-blk",
                why: format!(
                    "state for {} disks restored into a VM with {}",
                    s.virtio_blk.len(),
                    self.virtio_blk.len()
                ),
            });
        }
        for (d, state) in self.virtio_blk.iter().zip(&s.virtio_blk) {
            lock(d).restore(state)?;
        }
        match (&self.virtio_net, &s.virtio_net) {
            (Some(n), Some(state)) => lock(n).restore(state)?,
            (None, None) => {}
            (n, state) => {
                return Err(StateError::Invalid {
                    device: "virtio-net",
                    why: format!(
                        "state {} a network card restored into a VM {} one",
                        if state.is_some() { "with" } else { "without" },
                        if n.is_some() { "with" } else { "without" }
                    ),
                })
            }
        }
        // Drop the edges pulsed before and *during* the restore: the restored PIC already
        // holds every line as it was when the state was saved (`save` folds pending edges
        // into it). The serial device pulses its line again when it is restored with an
        // interrupt condition set (vm-superio's `from_state`), and that edge, folded into
        // the PIC at the next save or exit, made a restored VM differ from the saved one: a
        // repair checkpoint failed its digest whenever Linux was transmitting on COM1.
        self.irq_lines.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_gives_back_the_saved_state_with_a_serial_interrupt_condition_set() {
        let memory = crate::memory::create(16).unwrap();
        let mut m = Machine::new(&memory, Vec::new(), None).unwrap();
        // The master PIC: vectors from 0x20, every line unmasked.
        for (port, value) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0),
        ] {
            m.pio.write(port, &[value]);
        }
        // COM1 raises its line for "transmitter empty" (IER bit 1); the CPU takes the
        // interrupt, so the PIC's request bit is clear while the UART's condition stays set.
        m.pio.write(0x3f9, &[0x02]);
        assert_eq!(m.acknowledge_interrupt(), Some(0x24));
        let saved = m.save().unwrap();
        m.restore(&saved).unwrap();
        assert_eq!(m.save().unwrap(), saved);
        assert_eq!(
            m.pending_vector(),
            None,
            "no interrupt made up by the restore"
        );
    }
}
