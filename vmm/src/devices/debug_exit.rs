//! The debug-exit port: the guest ends the VM with an exit status by writing it to port 0xf4
//! (one byte, or the low byte of a wider write). `ftvm` exits with exactly that status; unlike
//! QEMU's isa-debug-exit the value is not shifted.

use super::{StopLine, StopRequest};
use crate::bus::BusDevice;

/// The port.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

/// The device. It has no state of its own.
pub struct DebugExit {
    stop: StopLine,
}

impl DebugExit {
    /// A debug-exit port raising `stop`.
    pub fn new(stop: StopLine) -> Self {
        Self { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        self.stop.raise(StopRequest::Exit(data[0]));
    }
}
