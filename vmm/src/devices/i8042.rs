//! A minimal i8042 keyboard controller (ports 0x60 and 0x64): no keyboard behind it, but its
//! reset line works — the command 0xfe written to port 0x64 powers the VM off, which is how
//! both Linux (`reboot=k`) and the test guest end a VM through it.

use serde::{Deserialize, Serialize};

use super::{StopLine, StopRequest};
use crate::bus::BusDevice;
use crate::state::{Persist, StateError};

/// Data port.
pub const DATA_PORT: u64 = 0x60;
/// Status / command port.
pub const COMMAND_PORT: u64 = 0x64;
const CMD_PULSE_RESET: u8 = 0xfe;
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const STATUS_OUTPUT_FULL: u8 = 0x01;

/// Saved controller state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller configuration byte.
    pub config: u8,
    /// A byte waiting in the output buffer.
    pub output: Option<u8>,
    /// The last command, when it expects a data byte.
    pub pending_command: Option<u8>,
}

/// The controller.
pub struct I8042 {
    state: I8042State,
    stop: StopLine,
}

impl I8042 {
    /// A controller whose reset line raises `stop`.
    pub fn new(stop: StopLine) -> Self {
        Self {
            state: I8042State::default(),
            stop,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = if base == DATA_PORT {
            self.state.output.take().unwrap_or(0)
        } else if self.state.output.is_some() {
            STATUS_OUTPUT_FULL
        } else {
            0
        };
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let value = data[0];
        if base == DATA_PORT {
            if self.state.pending_command.take() == Some(CMD_WRITE_CONFIG) {
                self.state.config = value;
            }
            return;
        }
        match value {
            CMD_PULSE_RESET => self.stop.raise(StopRequest::Reset),
            CMD_READ_CONFIG => self.state.output = Some(self.state.config),
            CMD_WRITE_CONFIG => self.state.pending_command = Some(value),
            _ => {}
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;

    fn save(&self) -> Result<I8042State, StateError> {
        Ok(self.state.clone())
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let stop = StopLine::default();
        let mut k = I8042::new(stop.clone());
        k.write(COMMAND_PORT, 0, &[0x60]);
        k.write(DATA_PORT, 0, &[0x47]);
        k.write(COMMAND_PORT, 0, &[0x20]);
        let mut b = [0u8];
        k.read(COMMAND_PORT, 0, &mut b);
        assert_eq!(b[0], 1);
        k.read(DATA_PORT, 0, &mut b);
        assert_eq!(b[0], 0x47);
        assert_eq!(stop.take(), None);
        k.write(COMMAND_PORT, 0, &[0xfe]);
        assert_eq!(stop.take(), Some(StopRequest::Reset));
    }
}
