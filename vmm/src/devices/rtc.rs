//! The CMOS real-time clock (an MC146818 at ports 0x70–0x71): the date and time a PC guest
//! reads at boot (Linux's `read_persistent_clock64`), plus the CMOS RAM around them.
//!
//! The time is the wall-clock time the VM was started with ([`Rtc::set_base`], carried in
//! the log header so both sides of a pair agree) plus the VM's virtual clock, never host
//! time: a read observes the clock ([`BusDevice::uses_clock`]), so the exit loop refreshes
//! it as a logged input first and a replayed read returns the same bytes. The update cycle
//! is never in progress (register A's UIP bit reads 0): without this device the port read
//! as 0xff, UIP set, and Linux polled it for a second before giving up ("Unable to read
//! current time from RTC"), some 40000 exits. No interrupts: alarms and periodic interrupts
//! are not emulated (register C reads 0). Writes to the time registers are ignored: the
//! guest cannot set this clock.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::pit::Pit;
use crate::bus::{lock, BusDevice};
use crate::state::{Persist, StateError};

/// The index port (bit 7 of a write masks NMIs, which this platform does not have).
pub const RTC_PORT: u64 = 0x70;
/// Ports: index and data.
pub const RTC_PORTS: u64 = 2;
/// Bytes of CMOS RAM (registers included).
const CMOS_BYTES: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
/// The century byte (IBM's location; the FADT does not name one, so Linux does not read it).
const CENTURY: u8 = 0x32;

/// Register A: the 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const STATUS_A_VALUE: u8 = 0x26;
/// Register B's 24-hour bit (else 12-hour, bit 7 of the hour for PM).
const B_24H: u8 = 0x02;
/// Register B's binary bit (else BCD).
const B_BINARY: u8 = 0x04;
/// Register D: the battery is good (VRT).
const STATUS_D_VALUE: u8 = 0x80;

/// The CMOS RAM at power-on: zero but register B, in 24-hour BCD mode.
const INITIAL_RAM: [u8; CMOS_BYTES] = {
    let mut ram = [0; CMOS_BYTES];
    ram[STATUS_B as usize] = B_24H;
    ram
};

/// The latest time this clock can show (9999-12-31 23:59:59 UTC); a log header that asks for
/// a later start is refused.
pub const MAX_BASE_S: u64 = 253_402_300_799;

/// The clock.
pub struct Rtc {
    clock: Arc<Mutex<Pit>>,
    /// Unix seconds at virtual time 0.
    base_s: u64,
    index: u8,
    ram: [u8; CMOS_BYTES],
}

/// Saved clock: the selected register and the CMOS RAM (the time registers in it are not
/// used: the time comes from the base and the virtual clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The register the index port selects.
    pub index: u8,
    /// The CMOS RAM.
    pub ram: Vec<u8>,
}

impl Default for RtcState {
    fn default() -> Self {
        Self {
            index: 0,
            ram: INITIAL_RAM.to_vec(),
        }
    }
}

impl Rtc {
    /// A clock over the virtual clock `clock`, showing the Unix epoch at virtual time 0
    /// until [`Rtc::set_base`].
    pub fn new(clock: Arc<Mutex<Pit>>) -> Self {
        Self {
            clock,
            base_s: 0,
            index: 0,
            ram: INITIAL_RAM,
        }
    }

    /// The wall-clock time at virtual time 0, in Unix seconds (at most [`MAX_BASE_S`]).
    pub fn set_base(&mut self, base_s: u64) {
        self.base_s = base_s.min(MAX_BASE_S);
    }

    fn register(&self, reg: u8) -> u8 {
        match reg {
            STATUS_A => STATUS_A_VALUE,
            STATUS_C => 0,
            STATUS_D => STATUS_D_VALUE,
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                let now_s = self.base_s + lock(&self.clock).now_ns() / 1_000_000_000;
                let t = civil(now_s.min(MAX_BASE_S));
                let b = self.ram[usize::from(STATUS_B)];
                let enc = |v: u8| if b & B_BINARY != 0 { v } else { bcd(v) };
                match reg {
                    SECONDS => enc(t.second),
                    MINUTES => enc(t.minute),
                    HOURS if b & B_24H != 0 => enc(t.hour),
                    HOURS => {
                        let h12 = match t.hour % 12 {
                            0 => 12,
                            h => h,
                        };
                        enc(h12) | if t.hour >= 12 { 0x80 } else { 0 }
                    }
                    WEEKDAY => enc(t.weekday),
                    DAY => enc(t.day),
                    MONTH => enc(t.month),
                    YEAR => enc((t.year % 100) as u8),
                    _ => enc((t.year / 100) as u8),
                }
            }
            r => self.ram[usize::from(r) % CMOS_BYTES],
        }
    }
}

/// A date and time of day (UTC, proleptic Gregorian).
#[derive(Debug, PartialEq, Eq)]
pub struct Civil {
    /// The year (past 9999 for times past [`MAX_BASE_S`]).
    pub year: u64,
    /// 1 to 12.
    pub month: u8,
    /// 1 to 31.
    pub day: u8,
    /// 1 (Sunday) to 7, as the MC146818 counts.
    pub weekday: u8,
    /// 0 to 23.
    pub hour: u8,
    /// 0 to 59.
    pub minute: u8,
    /// 0 to 59.
    pub second: u8,
}

/// The UTC date and time `unix_s` seconds after 1970-01-01: the clock's calendar, which the
/// telemetry's timestamps use too.
pub fn civil(unix_s: u64) -> Civil {
    let days = unix_s / 86_400;
    let rem = unix_s % 86_400;
    // Howard Hinnant's days-to-civil, on the era of 400 years from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    Civil {
        year,
        month: month as u8,
        day: day as u8,
        // 1970-01-01 was a Thursday (5).
        weekday: ((days + 4) % 7 + 1) as u8,
        hour: (rem / 3600) as u8,
        minute: (rem / 60 % 60) as u8,
        second: (rem % 60) as u8,
    }
}

fn bcd(v: u8) -> u8 {
    (v / 10) << 4 | (v % 10)
}

impl BusDevice for Rtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = value & 0x7f,
            _ => match self.index {
                SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {}
                STATUS_A | STATUS_C | STATUS_D => {}
                r => self.ram[usize::from(r) % CMOS_BYTES] = value,
            },
        }
    }

    fn uses_clock(&self) -> bool {
        true
    }
}

impl Persist for Rtc {
    type State = RtcState;

    fn save(&self) -> Result<RtcState, StateError> {
        Ok(RtcState {
            index: self.index,
            ram: self.ram.to_vec(),
        })
    }

    fn restore(&mut self, state: &RtcState) -> Result<(), StateError> {
        if state.ram.len() != CMOS_BYTES || state.index as usize >= CMOS_BYTES {
            return Err(StateError::Invalid {
                device: "rtc",
                why: format!(
                    "CMOS state of {} bytes, register {:#x}",
                    state.ram.len(),
                    state.index
                ),
            });
        }
        self.index = state.index;
        self.ram.copy_from_slice(&state.ram);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtc() -> (Rtc, Arc<Mutex<Pit>>) {
        let pit = Arc::new(Mutex::new(Pit::new(
            crate::devices::IrqLines::default().line(0),
        )));
        (Rtc::new(pit.clone()), pit)
    }

    fn read(r: &mut Rtc, reg: u8) -> u8 {
        r.write(RTC_PORT, 0, &[reg]);
        let mut v = [0u8];
        r.read(RTC_PORT, 1, &mut v);
        v[0]
    }

    #[test]
    fn dates_convert_like_the_calendar() {
        let c = civil(0);
        assert_eq!((c.year, c.month, c.day, c.weekday), (1970, 1, 1, 5));
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        let c = civil(951_827_696);
        assert_eq!(
            (c.year, c.month, c.day, c.weekday, c.hour, c.minute, c.second),
            (2000, 2, 29, 3, 12, 34, 56)
        );
        // 2026-12-02 00:00:00 UTC, a Wednesday.
        let c = civil(1_796_169_600);
        assert_eq!((c.year, c.month, c.day, c.weekday), (2026, 12, 2, 4));
        let c = civil(MAX_BASE_S);
        assert_eq!((c.year, c.month, c.day, c.hour), (9999, 12, 31, 23));
    }

    #[test]
    fn the_clock_reads_the_base_plus_the_virtual_clock_in_bcd_never_updating() {
        let (mut r, pit) = rtc();
        r.set_base(951_827_696);
        assert_eq!(read(&mut r, STATUS_A) & 0x80, 0, "UIP clear");
        assert_eq!(read(&mut r, STATUS_D), 0x80, "valid");
        assert_eq!(read(&mut r, SECONDS), 0x56);
        assert_eq!(read(&mut r, MINUTES), 0x34);
        assert_eq!(read(&mut r, HOURS), 0x12);
        assert_eq!(read(&mut r, DAY), 0x29);
        assert_eq!(read(&mut r, MONTH), 0x02);
        assert_eq!(read(&mut r, YEAR), 0x00);
        assert_eq!(read(&mut r, CENTURY), 0x20);
        lock(&pit).advance(5_000_000_000);
        assert_eq!(read(&mut r, SECONDS), 0x01, "56 s + 5 s");
        assert_eq!(read(&mut r, MINUTES), 0x35);
        assert!(r.uses_clock());
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b_and_the_time_cannot_be_written() {
        let (mut r, _) = rtc();
        r.set_base(951_827_696 + 3600); // 13:34:56
        r.write(RTC_PORT, 0, &[STATUS_B]);
        r.write(RTC_PORT, 1, &[B_BINARY]);
        assert_eq!(read(&mut r, HOURS), 0x80 | 1, "1 PM, binary");
        assert_eq!(read(&mut r, SECONDS), 56);
        r.write(RTC_PORT, 0, &[SECONDS]);
        r.write(RTC_PORT, 1, &[0]);
        assert_eq!(read(&mut r, SECONDS), 56, "the time is not writable");
        // CMOS RAM outside the clock keeps what was written, and travels in the state.
        r.write(RTC_PORT, 0, &[0x0f | 0x80]);
        r.write(RTC_PORT, 1, &[0xa5]);
        let saved = r.save().unwrap();
        let (mut other, _) = rtc();
        other.restore(&saved).unwrap();
        assert_eq!(read(&mut other, 0x0f), 0xa5);
        assert_eq!(read(&mut other, STATUS_B), B_BINARY);
        let bad = RtcState {
            index: 0,
            ram: vec![0; 3],
        };
        assert!(other.restore(&bad).is_err());
        assert_eq!(RtcState::default(), rtc().0.save().unwrap());
    }
}
