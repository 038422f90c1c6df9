//! Virtio devices: the virtio-mmio transport ([`mmio`]) and the devices behind it ([`block`],
//! [`net`]).
//!
//! The split follows the virtio specification's own: the transport is the register file the
//! driver programs (identification, feature negotiation, queue setup, notifications, the
//! interrupt status, the device status and reset) and is the same for every device type;
//! a device is what sits behind it — its feature bits, its configuration space, how many
//! queues it has and what it does with the buffers the driver makes available. A device
//! implements [`VirtioDevice`] and is wrapped in an [`MmioTransport`], which is what goes on
//! the MMIO bus.
//!
//! Determinism (DESIGN.md §2): a device does all its work inside the guest's write to
//! `QueueNotify`, that is at an exit, with the vCPU stopped: it walks the available ring,
//! does its I/O, writes the results into guest memory and completes the requests in the used
//! ring; the transport then pulses the device's interrupt line, which the exit loop injects
//! like any other. Nothing happens on another thread or later, so the guest's view of a
//! device only changes at exits, and a replay of the same exits does the same memory writes.
//! Those writes go through the VM's [`GuestMemory`], so the dirty log sees them.

pub mod block;
pub mod disk;
pub mod disk_read;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_driver;

pub use mmio::{MmioState, MmioTransport, QueueRegs, MMIO_WINDOW};
pub use virtio_queue::Queue;

use crate::memory::GuestMemory;
use crate::state::Persist;

/// Device type of a network card (virtio 1.2, §5).
pub const TYPE_NET: u32 = 1;
/// Device type of a block device (virtio 1.2, §5).
pub const TYPE_BLOCK: u32 = 2;

/// What a device did with one queue at a notification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    /// At least one buffer went to the used ring: the transport interrupts the driver if
    /// the driver wants to hear about it.
    pub used: bool,
    /// The queue is broken (a malformed available ring, a used ring that cannot be written):
    /// the transport sets DEVICE_NEEDS_RESET in the device status.
    pub broken: bool,
}

/// A virtio device type, as the transport sees it. The device's own saved state (beside
/// the transport's registers and queues, which the transport saves) is its [`Persist`]
/// state; a device whose state is all in its queues uses `()`.
pub trait VirtioDevice: Persist + Send {
    /// The device's name in logs and state errors ("virtio-blk").
    const NAME: &'static str;

    /// The device type ID the transport reports (virtio 1.2, §5: [`TYPE_BLOCK`], …).
    fn device_type(&self) -> u32;

    /// The device-specific feature bits offered to the driver. The transport adds its own
    /// (`VIRTIO_F_VERSION_1`); the driver can accept only what is offered.
    fn features(&self) -> u64;

    /// The maximum size of each of the device's queues (a power of two), in queue order: the
    /// length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The driver reads the device's configuration space at `offset`; bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver writes the device's configuration space. The default ignores the write (a
    /// read-only configuration space).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver notified queue `index`: serve what it made available. Called only while
    /// the driver is set up (DRIVER_OK) and the queue is ready and valid in `mem`.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> Processed;

    /// The driver reset the device (the transport resets its registers and queues). The
    /// default has nothing more to reset.
    fn reset(&mut self) {}
}
