//! The COM1 8250/16550 UART (ports 0x3f8–0x3ff, IRQ 4) on vm-superio.
//!
//! Transmitted bytes go to a [`TxQueue`] that the exit loop drains after each exit and hands to
//! the exit hook (live: stdout; primary: the output buffer). Received bytes are an input: the
//! exit hook offers them at an exit and they enter the receive FIFO there.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};

use super::IrqLine;
use crate::bus::{lock, BusDevice};
use crate::state::{Persist, StateError};

/// First I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u8 = 4;
/// Size of the receive FIFO.
pub const RX_FIFO_SIZE: usize = 64;

/// Bytes the guest transmitted and the exit loop has not taken yet.
#[derive(Clone, Default)]
pub struct TxQueue(Arc<Mutex<VecDeque<u8>>>);

impl TxQueue {
    /// Takes everything transmitted since the last call.
    pub fn drain(&self) -> Vec<u8> {
        lock(&self.0).drain(..).collect()
    }
}

impl io::Write for TxQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Inner = vm_superio::Serial<IrqLine, NoEvents, TxQueue>;

/// The UART.
pub struct Serial {
    inner: Inner,
}

/// Saved UART state (the registers and the receive FIFO).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// A UART raising `irq` and transmitting into `tx`.
    pub fn new(irq: IrqLine, tx: TxQueue) -> Self {
        Self {
            inner: vm_superio::Serial::new(irq, tx),
        }
    }

    /// Room left in the receive FIFO.
    pub fn rx_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Puts received bytes into the FIFO; returns how many fit.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        // The only error is a full FIFO, which means nothing was taken.
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.inner.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // Errors are a trigger failure (infallible here) or writing past the FIFO, which
        // vm-superio already turned into a dropped byte.
        let _ = self.inner.write(offset as u8, data[0]);
    }
}

impl Persist for Serial {
    type State = SerialState;

    fn save(&self) -> Result<SerialState, StateError> {
        let s = self.inner.state();
        Ok(SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(&mut self, s: &SerialState) -> Result<(), StateError> {
        let state = SuperioState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self.inner.interrupt_evt().clone();
        let tx = self.inner.writer().clone();
        self.inner = vm_superio::Serial::from_state(&state, irq, NoEvents, tx).map_err(|e| {
            StateError::Invalid {
                device: "serial",
                why: format!("{e:?}"),
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLines;

    #[test]
    fn tx_rx_and_interrupt() {
        let lines = IrqLines::default();
        let tx = TxQueue::default();
        let mut s = Serial::new(lines.line(COM1_IRQ), tx.clone());
        for b in b"hi" {
            s.write(COM1_PORT, 0, &[*b]);
        }
        assert_eq!(tx.drain(), b"hi");
        s.write(COM1_PORT, 1, &[1]); // IER: RX data interrupt
        assert_eq!(s.receive(b"ab"), 2);
        assert_eq!(lines.take(), 1 << COM1_IRQ);
        let saved = s.save().unwrap();
        let mut b = [0u8];
        s.read(COM1_PORT, 0, &mut b);
        assert_eq!(b[0], b'a');
        s.restore(&saved).unwrap();
        s.read(COM1_PORT, 0, &mut b);
        assert_eq!(b[0], b'a', "restored FIFO holds both bytes again");
        assert_eq!(s.rx_capacity(), RX_FIFO_SIZE - 1);
    }
}
