//! The POST-code port 0x80: writes are latched, reads return the last value written. Guests
//! use it as a cheap I/O delay; the test guest uses it to make deterministic exits.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state::{Persist, StateError};

/// The port.
pub const POST_PORT: u64 = 0x80;

/// The latch.
#[derive(Debug, Default)]
pub struct PostCode {
    value: u8,
}

/// Saved latch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostState {
    /// The last value written.
    pub value: u8,
}

impl BusDevice for PostCode {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.value);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        self.value = data[0];
    }
}

impl Persist for PostCode {
    type State = PostState;

    fn save(&self) -> Result<PostState, StateError> {
        Ok(PostState { value: self.value })
    }

    fn restore(&mut self, state: &PostState) -> Result<(), StateError> {
        self.value = state.value;
        Ok(())
    }
}
