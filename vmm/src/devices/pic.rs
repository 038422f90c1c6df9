//! Dual 8259A programmable interrupt controller (master at 0x20, slave at 0xa0, cascaded on
//! master IRQ 2), emulated in userspace: the exit loop asks it for the vector to inject and
//! acknowledges it at an exit (DESIGN.md §2).
//!
//! Modelled: the ICW1–ICW4 initialisation sequence, IMR, IRR/ISR reads through OCW3, fixed
//! priority, specific and non-specific EOI, auto-EOI, edge-triggered inputs. Not modelled
//! (no guest we run uses them): rotating priority, special mask mode, poll mode, level mode.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state::{Persist, StateError};

/// I/O port of the master's command register.
pub const MASTER_PORT: u64 = 0x20;
/// I/O port of the slave's command register.
pub const SLAVE_PORT: u64 = 0xa0;

/// One 8259A chip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// Line levels last seen, for edge detection.
    pub last_level: u8,
    /// Vector of IRQ 0 on this chip (ICW2).
    pub vector_base: u8,
    /// Next initialisation word expected (0 when initialised).
    pub init_step: u8,
    /// ICW1 said ICW4 follows.
    pub icw4_needed: bool,
    /// ICW1 single mode (no ICW3).
    pub single: bool,
    /// ICW4 auto-EOI.
    pub auto_eoi: bool,
    /// OCW3 selects ISR (true) or IRR (false) for command-port reads.
    pub read_isr: bool,
}

fn lowest_bit(v: u8) -> Option<u8> {
    (v != 0).then(|| v.trailing_zeros() as u8)
}

impl ChipState {
    fn set_level(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if level {
            if self.last_level & bit == 0 {
                self.irr |= bit;
            }
            self.last_level |= bit;
        } else {
            self.last_level &= !bit;
        }
    }

    /// The highest-priority request that would interrupt what is in service.
    fn pending(&self) -> Option<u8> {
        let irq = lowest_bit(self.irr & !self.imr)?;
        match lowest_bit(self.isr) {
            Some(in_service) if in_service <= irq => None,
            _ => Some(irq),
        }
    }

    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        self.irr &= !bit;
        if !self.auto_eoi {
            self.isr |= bit;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: starts initialisation.
            *self = ChipState {
                icw4_needed: value & 0x01 != 0,
                single: value & 0x02 != 0,
                init_step: 2,
                ..ChipState::default()
            };
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
        } else {
            // OCW2: end of interrupt.
            match value >> 5 {
                0b001 => {
                    if let Some(irq) = lowest_bit(self.isr) {
                        self.isr &= !(1 << irq);
                    }
                }
                0b011 => self.isr &= !(1 << (value & 7)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            2 => {
                self.vector_base = value & 0xf8;
                self.init_step = match (self.single, self.icw4_needed) {
                    (false, _) => 3,
                    (true, true) => 4,
                    (true, false) => 0,
                };
            }
            3 => self.init_step = if self.icw4_needed { 4 } else { 0 },
            4 => {
                self.auto_eoi = value & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    fn read(&self, offset: u64) -> u8 {
        match offset {
            0 if self.read_isr => self.isr,
            0 => self.irr,
            _ => self.imr,
        }
    }
}

/// The master/slave pair.
#[derive(Debug, Default)]
pub struct Pic {
    master: ChipState,
    slave: ChipState,
}

/// Saved state of the pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// The master chip.
    pub master: ChipState,
    /// The slave chip.
    pub slave: ChipState,
}

impl Pic {
    /// A pair in its power-on state (all lines masked off by nothing, uninitialised).
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies edges on ISA lines (bit n = IRQ n pulsed since the last call).
    pub fn pulse_lines(&mut self, edges: u16) {
        for irq in 0..16u8 {
            if edges & (1 << irq) != 0 {
                let chip = if irq < 8 {
                    &mut self.master
                } else {
                    &mut self.slave
                };
                chip.set_level(irq & 7, true);
                chip.set_level(irq & 7, false);
            }
        }
        self.update_cascade();
    }

    fn update_cascade(&mut self) {
        // The slave's INT output is a level on master IRQ 2.
        if self.slave.pending().is_some() {
            self.master.irr |= 1 << 2;
        } else {
            self.master.irr &= !(1 << 2);
        }
    }

    /// The vector that would be delivered if the CPU acknowledged now.
    pub fn pending_vector(&self) -> Option<u8> {
        let irq = self.master.pending()?;
        if irq == 2 {
            let sirq = self.slave.pending()?;
            return Some(self.slave.vector_base.wrapping_add(sirq));
        }
        Some(self.master.vector_base.wrapping_add(irq))
    }

    /// The CPU's interrupt acknowledge cycle: moves the request into service and returns its
    /// vector.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.pending()?;
        let vector = if irq == 2 {
            let sirq = self.slave.pending()?;
            self.slave.acknowledge(sirq);
            self.master.acknowledge(2);
            self.slave.vector_base.wrapping_add(sirq)
        } else {
            self.master.acknowledge(irq);
            self.master.vector_base.wrapping_add(irq)
        };
        self.update_cascade();
        Some(vector)
    }
}

impl BusDevice for Pic {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let chip = if base == SLAVE_PORT {
            &self.slave
        } else {
            &self.master
        };
        data.fill(0);
        data[0] = chip.read(offset);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let chip = if base == SLAVE_PORT {
            &mut self.slave
        } else {
            &mut self.master
        };
        match offset {
            0 => chip.write_command(data[0]),
            _ => chip.write_data(data[0]),
        }
        self.update_cascade();
    }
}

impl Persist for Pic {
    type State = PicState;

    fn save(&self) -> Result<PicState, StateError> {
        Ok(PicState {
            master: self.master.clone(),
            slave: self.slave.clone(),
        })
    }

    fn restore(&mut self, state: &PicState) -> Result<(), StateError> {
        self.master = state.master.clone();
        self.slave = state.slave.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(pic: &mut Pic) {
        for (base, vec, icw3) in [(MASTER_PORT, 0x20, 4), (SLAVE_PORT, 0x28, 2)] {
            pic.write(base, 0, &[0x11]);
            pic.write(base, 1, &[vec]);
            pic.write(base, 1, &[icw3]);
            pic.write(base, 1, &[0x01]);
        }
    }

    #[test]
    fn remap_mask_ack_eoi() {
        let mut pic = Pic::new();
        init(&mut pic);
        pic.write(MASTER_PORT, 1, &[0xfe]); // only IRQ0
        pic.write(SLAVE_PORT, 1, &[0xff]);
        pic.pulse_lines(1 << 4);
        assert_eq!(pic.pending_vector(), None, "IRQ4 is masked");
        pic.pulse_lines(1 << 0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert_eq!(pic.pending_vector(), None);
        // A second tick while the first is in service waits for EOI.
        pic.pulse_lines(1);
        assert_eq!(pic.pending_vector(), None);
        pic.write(MASTER_PORT, 0, &[0x20]);
        assert_eq!(pic.pending_vector(), Some(0x20));
        // OCW3 selects the ISR for reads.
        pic.acknowledge();
        pic.write(MASTER_PORT, 0, &[0x0b]);
        let mut b = [0u8];
        pic.read(MASTER_PORT, 0, &mut b);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn slave_cascades_through_irq2_and_priority_holds() {
        let mut pic = Pic::new();
        init(&mut pic);
        pic.write(MASTER_PORT, 1, &[0x00]);
        pic.write(SLAVE_PORT, 1, &[0x00]);
        pic.pulse_lines(1 << 12 | 1 << 3);
        // IRQ 2 (cascade) outranks IRQ 3.
        assert_eq!(pic.acknowledge(), Some(0x2c));
        assert_eq!(
            pic.pending_vector(),
            None,
            "IRQ3 is lower than IRQ2 in service"
        );
        pic.write(SLAVE_PORT, 0, &[0x20]);
        pic.write(MASTER_PORT, 0, &[0x20]);
        assert_eq!(pic.acknowledge(), Some(0x23));
        let saved = pic.save().unwrap();
        let mut other = Pic::new();
        other.restore(&saved).unwrap();
        assert_eq!(other.save().unwrap(), saved);
    }
}
