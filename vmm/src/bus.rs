//! The PIO and MMIO buses: the one registration point for devices, so the exit hook sees every
//! access the guest makes (DESIGN.md §2).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port or memory-mapped I/O.
///
/// Devices are deterministic state machines: they only ever see guest accesses and inputs the
/// exit loop hands them, never host time or host I/O directly.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the start of the range registered at
    /// `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the start of the range registered at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
    /// Whether an access to this device observes the virtual clock (a timer reads "now"). The
    /// exit loop refreshes the clock, as a logged input, before such an access.
    fn uses_clock(&self) -> bool {
        false
    }
}

/// A device shared between the bus and whoever else drives it (the machine, for timers).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Registration of a range that overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct OverlapError {
    /// Start of the rejected range.
    pub base: u64,
    /// Length of the rejected range.
    pub len: u64,
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices (either the PIO or the MMIO one).
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

/// What a bus lookup found: the device and where its range starts.
pub struct Resolved<'a> {
    /// Start of the device's range.
    pub base: u64,
    /// The device.
    pub device: &'a SharedDevice,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        if len == 0 {
            return Err(OverlapError { base, len });
        }
        let overlaps_before = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_before {
            return Err(OverlapError { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range contains `addr`.
    pub fn resolve(&self, addr: u64) -> Option<Resolved<'_>> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some(Resolved {
            base: *base,
            device: &entry.device,
        })
    }

    /// Reads from the device at `addr`. Returns false (and fills `data` with 0xff, like an
    /// undriven ISA bus) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some(r) => {
                lock(r.device).read(r.base, addr - r.base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`. Returns false when no device is there (the write is
    /// dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some(r) => {
                lock(r.device).write(r.base, addr - r.base, data);
                true
            }
            None => false,
        }
    }

    /// Whether the device at `addr` observes the virtual clock.
    pub fn uses_clock(&self, addr: u64) -> bool {
        self.resolve(addr)
            .is_some_and(|r| lock(r.device).uses_clock())
    }
}

/// Locks a device. Devices are only driven from the vCPU thread; a poisoned lock means a device
/// panicked, after which its state is still the best we have.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn resolves_ranges_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(10))), 0x40, 4).unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(20))), 0x44, 4).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x43, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x3e, 3).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x10, 0).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x42, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.read(0x44, &mut b));
        assert_eq!(b[0], 20);
        assert!(!bus.read(0x48, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x41, &[7]));
        bus.read(0x40, &mut b);
        assert_eq!(b[0], 7);
        assert!(!bus.write(0x100, &[1]));
    }
}
