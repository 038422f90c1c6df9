//! The ACPI PM timer (DESIGN.md §2 "timers and clocks"): a 24-bit counter at 3.579545 MHz
//! at port [`PM_TMR_PORT`], declared in the FADT (`PM_TMR_BLK`), so Linux has a clocksource
//! that reads through an exit (`acpi_pm`) instead of the TSC, which it reads without one.
//!
//! The count is derived from the VM's virtual clock (the PIT's, which advances only through
//! logged clock inputs), never from host time: a read is an exit that observes the clock
//! ([`BusDevice::uses_clock`]), so the exit loop refreshes the clock as a logged input first
//! and the replayed read returns the same value. The device has no state of its own.

use std::sync::{Arc, Mutex};

use super::pit::Pit;
use crate::bus::{lock, BusDevice};

/// PM_TMR_BLK: the counter (4 bytes, read-only).
pub const PM_TMR_PORT: u64 = 0x608;
/// Its length in the FADT (`PM_TMR_LEN`).
pub const PM_TMR_LEN: u64 = 4;
/// The ACPI PM timer's frequency (Hz).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The counter is 24 bits wide (the FADT's `TMR_VAL_EXT` flag is clear).
const MASK: u64 = (1 << 24) - 1;

/// The counter at virtual time `now_ns`.
pub fn count_at(now_ns: u64) -> u32 {
    ((u128::from(now_ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64 & MASK) as u32
}

/// The timer, reading the virtual clock the PIT keeps.
pub struct PmTimer {
    clock: Arc<Mutex<Pit>>,
}

impl PmTimer {
    /// A timer over `clock`.
    pub fn new(clock: Arc<Mutex<Pit>>) -> Self {
        Self { clock }
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = count_at(lock(&self.clock).now_ns()).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// The counter is read-only.
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}

    fn uses_clock(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_virtual_clock_at_3_579545_mhz_in_24_bits() {
        assert_eq!(count_at(0), 0);
        assert_eq!(count_at(1_000_000_000), 3_579_545);
        assert_eq!(count_at(1_000), 3);
        // Wraps at 2^24 ticks (about 4.69 s).
        let wrap_ns = (1u64 << 24) * 1_000_000_000 / PM_TIMER_HZ + 1;
        assert!(count_at(wrap_ns) < 4);
        let pit = Arc::new(Mutex::new(Pit::new(
            crate::devices::IrqLines::default().line(0),
        )));
        let mut t = PmTimer::new(pit.clone());
        assert!(t.uses_clock());
        lock(&pit).advance(2_000_000_000);
        let mut v = [0u8; 4];
        t.read(PM_TMR_PORT, 0, &mut v);
        assert_eq!(u32::from_le_bytes(v), count_at(2_000_000_000));
        let mut hi = [0u8; 1];
        t.read(PM_TMR_PORT, 2, &mut hi);
        assert_eq!(hi[0], v[2]);
    }
}
