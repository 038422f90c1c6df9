//! The ACPI PM1a event and control registers (ports 0x600–0x605), the least a FADT that
//! keeps the 8259 PIC may describe: Linux treats a "hardware-reduced" ACPI platform as one
//! without legacy PIC and PIT, so ftvm's FADT is a full one and needs these blocks.
//!
//! There are no fixed events (the PM timer, `pm_timer.rs`, raises no overflow event; there
//! is no power button), so the status register always
//! reads 0 and the SCI never fires. The control register reads with SCI_EN set (the platform
//! is always in ACPI mode: there is no SMI_CMD port). Writing SLP_EN with the sleep type the
//! DSDT's `\_S5` names powers the VM off, as `poweroff` does on real hardware.

use serde::{Deserialize, Serialize};

use super::{StopLine, StopRequest};
use crate::bus::BusDevice;
use crate::state::{Persist, StateError};

/// PM1a_EVT_BLK: status (2 bytes) then enable (2 bytes).
pub const PM1A_EVT_PORT: u64 = 0x600;
/// PM1a_CNT_BLK (2 bytes).
pub const PM1A_CNT_PORT: u64 = 0x604;
/// The whole range.
pub const PM_PORTS: u64 = 6;
/// The SLP_TYP value of S5 (soft off), as `\_S5` in the DSDT says.
pub const SLP_TYP_S5: u16 = 5;
/// The SCI's ISA line (never raised).
pub const SCI_IRQ: u16 = 9;

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

/// Saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1 enable register.
    pub enable: u16,
    /// PM1 control register (SLP_EN excluded: it is write-only).
    pub control: u16,
}

/// The device.
pub struct AcpiPm {
    state: AcpiPmState,
    stop: StopLine,
}

impl AcpiPm {
    /// The registers, raising `stop` on a soft-off request.
    pub fn new(stop: StopLine) -> Self {
        Self {
            state: AcpiPmState::default(),
            stop,
        }
    }

    fn register(&self, offset: u64) -> u16 {
        match offset {
            2 => self.state.enable,
            4 => self.state.control | SCI_EN,
            _ => 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Byte or word accesses; a byte read of the odd half returns the high byte.
        let reg = self.register(offset & !1).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = (offset & 1) as usize + i;
            *b = reg.get(at).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut reg = self.register(offset & !1).to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(r) = reg.get_mut((offset & 1) as usize + i) {
                *r = *b;
            }
        }
        let value = u16::from_le_bytes(reg);
        match offset & !1 {
            2 => self.state.enable = value,
            4 => {
                self.state.control = value & !SLP_EN;
                if value & SLP_EN != 0 && (value >> 10) & 7 == SLP_TYP_S5 {
                    self.stop.raise(StopRequest::Reset);
                }
            }
            // Status bits are write-one-to-clear, and none is ever set.
            _ => {}
        }
    }
}

impl Persist for AcpiPm {
    type State = AcpiPmState;

    fn save(&self) -> Result<AcpiPmState, StateError> {
        Ok(self.state.clone())
    }

    fn restore(&mut self, state: &AcpiPmState) -> Result<(), StateError> {
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_in_acpi_mode_and_s5_powers_off() {
        let stop = StopLine::default();
        let mut pm = AcpiPm::new(stop.clone());
        let mut w = [0u8; 2];
        pm.read(PM1A_EVT_PORT, 4, &mut w);
        assert_eq!(u16::from_le_bytes(w), SCI_EN);
        pm.write(PM1A_EVT_PORT, 2, &0x0120u16.to_le_bytes());
        pm.read(PM1A_EVT_PORT, 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0120);
        // Sleep type 0 with SLP_EN is not S5: nothing happens.
        pm.write(PM1A_EVT_PORT, 4, &(SLP_EN | SCI_EN).to_le_bytes());
        assert_eq!(stop.take(), None);
        pm.write(PM1A_EVT_PORT, 4, &(SLP_EN | SLP_TYP_S5 << 10).to_le_bytes());
        assert_eq!(stop.take(), Some(StopRequest::Reset));
    }
}
