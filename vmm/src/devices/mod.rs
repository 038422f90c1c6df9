//! The emulated devices. All of them are driven from the vCPU thread only, at exits: the
//! userspace interrupt model of DESIGN.md §2 (no in-kernel irqchip, no in-kernel PIT).

pub mod acpi_pm;
pub mod debug_exit;
pub mod i8042;
pub mod pic;
pub mod pit;
pub mod pm_timer;
pub mod post;
pub mod rtc;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

/// Why the guest asked the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopRequest {
    /// The guest wrote its exit status to the debug-exit port.
    Exit(u8),
    /// The guest pulsed the i8042 reset line or asked ACPI for soft-off (S5): the VM powers
    /// off.
    Reset,
}

/// A stop request raised by a device, taken by the exit loop after the exit that raised it.
#[derive(Clone, Default)]
pub struct StopLine(Arc<Mutex<Option<StopRequest>>>);

impl StopLine {
    /// Raises a stop request (the first one wins).
    pub fn raise(&self, req: StopRequest) {
        let mut s = crate::bus::lock(&self.0);
        if s.is_none() {
            *s = Some(req);
        }
    }

    /// Takes the pending stop request, if any.
    pub fn take(&self) -> Option<StopRequest> {
        crate::bus::lock(&self.0).take()
    }
}

/// The sixteen ISA interrupt lines as seen by devices: a device pulses its line (an edge), the
/// machine folds the edges into the PIC at the next exit.
#[derive(Clone, Default)]
pub struct IrqLines(Arc<AtomicU16>);

impl IrqLines {
    /// Pulses ISA interrupt line `irq` (0..16).
    pub fn pulse(&self, irq: u8) {
        self.0.fetch_or(1 << (irq & 15), Ordering::AcqRel);
    }

    /// Takes the set of lines pulsed since the last call.
    pub fn take(&self) -> u16 {
        self.0.swap(0, Ordering::AcqRel)
    }

    /// A line bound to one IRQ, for a device to own.
    pub fn line(&self, irq: u8) -> IrqLine {
        IrqLine {
            lines: self.clone(),
            irq,
        }
    }
}

/// One interrupt line owned by a device.
#[derive(Clone)]
pub struct IrqLine {
    lines: IrqLines,
    irq: u8,
}

impl IrqLine {
    /// Pulses the line.
    pub fn pulse(&self) {
        self.lines.pulse(self.irq);
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.pulse();
        Ok(())
    }
}
