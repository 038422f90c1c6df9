//! 8254 programmable interval timer (ports 0x40–0x43) and the port-0x61 gate/status bits of
//! channel 2, emulated in userspace. Channel 0 drives ISA IRQ 0.
//!
//! The PIT never reads host time: its notion of "now" is the virtual clock, advanced only by
//! clock inputs the exit loop delivers at exits ([`Pit::advance`]). That is what makes it a
//! deterministic state machine the secondary can replay (DESIGN.md §2).

use serde::{Deserialize, Serialize};

use super::IrqLine;
use crate::bus::BusDevice;
use crate::state::{Persist, StateError};

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// First I/O port (channel 0 data).
pub const PIT_PORT: u64 = 0x40;
/// System control port B (gate and output of channel 2).
pub const PORT_61: u64 = 0x61;

const NS_PER_S: u128 = 1_000_000_000;

/// One counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// Operating mode 0–5.
    pub mode: u8,
    /// Access mode: 1 = low byte, 2 = high byte, 3 = low then high.
    pub access: u8,
    /// Initial count (0 means 65536).
    pub reload: u16,
    /// Whether a count has been loaded and the counter runs.
    pub running: bool,
    /// Virtual time at which the count was loaded.
    pub load_ns: u64,
    /// Periods completed so far (channel 0 interrupts delivered).
    pub periods: u64,
    /// A latched count waiting to be read.
    pub latch: Option<u16>,
    /// The next read returns the high byte (low/high access).
    pub read_high: bool,
    /// The next write is the high byte (low/high access).
    pub write_high: bool,
    /// Low byte written, waiting for the high byte.
    pub write_low: u8,
}

impl ChannelState {
    fn reload_ticks(&self) -> u64 {
        if self.reload == 0 {
            0x10000
        } else {
            u64::from(self.reload)
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    fn elapsed_ticks(&self, now_ns: u64) -> u64 {
        let dt = u128::from(now_ns.saturating_sub(self.load_ns));
        (dt * u128::from(PIT_HZ) / NS_PER_S) as u64
    }

    /// Virtual time at which `k` reloads' worth of ticks have elapsed since the load.
    fn time_of_period(&self, k: u64) -> u64 {
        let ticks = u128::from(k) * u128::from(self.reload_ticks());
        let ns = (ticks * NS_PER_S).div_ceil(u128::from(PIT_HZ));
        self.load_ns
            .saturating_add(ns.min(u128::from(u64::MAX)) as u64)
    }

    fn count(&self, now_ns: u64) -> u16 {
        if !self.running {
            return self.reload;
        }
        let reload = self.reload_ticks();
        let elapsed = self.elapsed_ticks(now_ns);
        let count = if self.periodic() {
            reload - elapsed % reload
        } else {
            reload.wrapping_sub(elapsed) & 0xffff
        };
        count as u16
    }

    /// Output pin level (used for channel 2 through port 0x61).
    fn output(&self, now_ns: u64) -> bool {
        if !self.running {
            return !matches!(self.mode, 0);
        }
        let elapsed = self.elapsed_ticks(now_ns);
        match self.mode {
            0 | 1 => elapsed >= self.reload_ticks(),
            3 => elapsed % self.reload_ticks() < self.reload_ticks().div_ceil(2),
            _ => true,
        }
    }

    fn read_byte(&mut self, now_ns: u64) -> u8 {
        let value = self.latch.unwrap_or_else(|| self.count(now_ns));
        let (byte, done) = match self.access {
            1 => (value as u8, true),
            2 => ((value >> 8) as u8, true),
            _ if self.read_high => {
                self.read_high = false;
                ((value >> 8) as u8, true)
            }
            _ => {
                self.read_high = true;
                (value as u8, false)
            }
        };
        if done {
            self.latch = None;
        }
        byte
    }

    /// Writes a count byte; returns true when a complete count was loaded.
    fn write_byte(&mut self, value: u8, now_ns: u64) -> bool {
        let reload = match self.access {
            1 => u16::from(value),
            2 => u16::from(value) << 8,
            _ if self.write_high => {
                self.write_high = false;
                u16::from(self.write_low) | u16::from(value) << 8
            }
            _ => {
                self.write_high = true;
                self.write_low = value;
                return false;
            }
        };
        self.reload = reload;
        self.running = true;
        self.load_ns = now_ns;
        self.periods = 0;
        true
    }
}

/// Saved PIT state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// The three counters.
    pub channels: [ChannelState; 3],
    /// Port 0x61 bits 0 (gate 2) and 1 (speaker data).
    pub port61: u8,
    /// The virtual clock, in nanoseconds since the VM started.
    pub now_ns: u64,
}

/// The 8254 with its IRQ 0 line.
pub struct Pit {
    state: PitState,
    irq0: IrqLine,
}

impl Pit {
    /// A PIT at virtual time 0 with no counter running.
    pub fn new(irq0: IrqLine) -> Self {
        Self {
            state: PitState::default(),
            irq0,
        }
    }

    /// The virtual clock.
    pub fn now_ns(&self) -> u64 {
        self.state.now_ns
    }

    /// Advances the virtual clock to `now_ns` (never backwards) and raises IRQ 0 if channel 0
    /// reached the end of a period. Missed periods coalesce into one edge, as they would at an
    /// edge-triggered PIC input that is not serviced.
    pub fn advance(&mut self, now_ns: u64) {
        if now_ns <= self.state.now_ns {
            return;
        }
        self.state.now_ns = now_ns;
        let ch = &mut self.state.channels[0];
        if !ch.running {
            return;
        }
        if ch.periodic() {
            let elapsed = ch.elapsed_ticks(now_ns);
            let periods = elapsed / ch.reload_ticks();
            if periods > ch.periods {
                ch.periods = periods;
                self.irq0.pulse();
            }
        } else if ch.periods == 0 && ch.elapsed_ticks(now_ns) >= ch.reload_ticks() {
            ch.periods = 1;
            self.irq0.pulse();
        }
    }

    /// Virtual time at which channel 0 raises IRQ 0 next, if it will.
    pub fn next_deadline(&self) -> Option<u64> {
        let ch = &self.state.channels[0];
        if !ch.running {
            return None;
        }
        if ch.periodic() {
            Some(ch.time_of_period(ch.periods + 1))
        } else {
            (ch.periods == 0).then(|| ch.time_of_period(1))
        }
    }

    fn write_control(&mut self, value: u8) {
        let now = self.state.now_ns;
        let select = value >> 6;
        if select == 3 {
            // Read-back command: only "latch count" is supported (bit 5 clear).
            if value & 0x20 == 0 {
                for (i, ch) in self.state.channels.iter_mut().enumerate() {
                    if value & (2 << i) != 0 && ch.latch.is_none() {
                        ch.latch = Some(ch.count(now));
                    }
                }
            }
            return;
        }
        let ch = &mut self.state.channels[usize::from(select)];
        let access = (value >> 4) & 3;
        if access == 0 {
            if ch.latch.is_none() {
                ch.latch = Some(ch.count(now));
                ch.read_high = false;
            }
            return;
        }
        let mode = (value >> 1) & 7;
        *ch = ChannelState {
            mode: if mode > 5 { mode - 4 } else { mode },
            access,
            ..ChannelState::default()
        };
    }
}

impl BusDevice for Pit {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let now = self.state.now_ns;
        data.fill(0);
        data[0] = if base == PORT_61 {
            let out2 = self.state.channels[2].output(now);
            // Bit 4 toggles with the DRAM refresh clock (every 15.085 µs).
            let refresh = (now / 15_085) & 1 == 1;
            self.state.port61 & 3 | u8::from(refresh) << 4 | u8::from(out2) << 5
        } else {
            match offset {
                0..=2 => self.state.channels[offset as usize].read_byte(now),
                _ => 0xff,
            }
        };
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let now = self.state.now_ns;
        if base == PORT_61 {
            self.state.port61 = data[0] & 3;
            return;
        }
        match offset {
            0..=2 => {
                self.state.channels[offset as usize].write_byte(data[0], now);
            }
            _ => self.write_control(data[0]),
        }
    }

    fn uses_clock(&self) -> bool {
        true
    }
}

impl Persist for Pit {
    type State = PitState;

    fn save(&self) -> Result<PitState, StateError> {
        Ok(self.state.clone())
    }

    fn restore(&mut self, state: &PitState) -> Result<(), StateError> {
        if state.channels.iter().any(|c| c.mode > 5 || c.access > 3) {
            return Err(StateError::Invalid {
                device: "pit",
                why: "channel mode or access mode out of range".into(),
            });
        }
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLines;

    fn program_100hz(pit: &mut Pit) {
        pit.write(PIT_PORT, 3, &[0x34]);
        pit.write(PIT_PORT, 0, &[(11932 & 0xff) as u8]);
        pit.write(PIT_PORT, 0, &[(11932 >> 8) as u8]);
    }

    fn read_count(pit: &mut Pit) -> u16 {
        let (mut lo, mut hi) = ([0u8], [0u8]);
        pit.write(PIT_PORT, 3, &[0x00]);
        pit.read(PIT_PORT, 0, &mut lo);
        pit.read(PIT_PORT, 0, &mut hi);
        u16::from(lo[0]) | u16::from(hi[0]) << 8
    }

    #[test]
    fn periodic_channel0_raises_irq0_each_period() {
        let lines = IrqLines::default();
        let mut pit = Pit::new(lines.line(0));
        program_100hz(&mut pit);
        let deadline = pit.next_deadline().unwrap();
        assert!((9_990_000..=10_010_000).contains(&deadline), "{deadline}");
        pit.advance(deadline - 1);
        assert_eq!(lines.take(), 0);
        pit.advance(deadline);
        assert_eq!(lines.take(), 1);
        // Three periods at once coalesce into one edge.
        pit.advance(deadline * 4 + 5);
        assert_eq!(lines.take(), 1);
        assert!(pit.next_deadline().unwrap() > deadline * 4);
    }

    #[test]
    fn counter_runs_down_with_virtual_time_only() {
        let mut pit = Pit::new(IrqLines::default().line(0));
        program_100hz(&mut pit);
        let a = read_count(&mut pit);
        assert_eq!(a, 11932);
        assert_eq!(read_count(&mut pit), a, "no clock input, no change");
        pit.advance(1_000_000); // 1 ms = 1193 ticks
        let b = read_count(&mut pit);
        assert_eq!(b, 11932 - 1193);
        let saved = pit.save().unwrap();
        let mut other = Pit::new(IrqLines::default().line(0));
        other.restore(&saved).unwrap();
        assert_eq!(read_count(&mut other), b);
    }

    #[test]
    fn channel2_output_shows_on_port_61() {
        let mut pit = Pit::new(IrqLines::default().line(0));
        pit.write(PORT_61, 0, &[1]);
        pit.write(PIT_PORT, 3, &[0xb0]); // ch2, lo/hi, mode 0
        pit.write(PIT_PORT, 2, &[0x10]);
        pit.write(PIT_PORT, 2, &[0x00]);
        let mut b = [0u8];
        pit.read(PORT_61, 0, &mut b);
        assert_eq!(b[0] & 0x20, 0);
        pit.advance(20_000); // 23 ticks > 16
        pit.read(PORT_61, 0, &mut b);
        assert_eq!(b[0] & 0x21, 0x21);
    }
}
