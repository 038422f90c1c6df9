//! The recorder as the exit loop's hook: each nondeterministic input logged at its exit,
//! epochs cut and digested, kicks and requests taken.

use ftvm_proto::log::{self, record::Kind};
use ftvm_replication::log::to_disk_read;
use ftvm_vmm::devices::virtio::block::DiskRead;
use ftvm_vmm::exit::{Control, Exit, ExitHook, ExitSeq, HostView, Kick, Point};
use ftvm_vmm::Input;

use crate::{LogSink, RecordError, Recorder};

/// The recorder's errors are its own (the log) and its live hook's, which must convert into
/// a [`RecordError`] (the live hook's [`LiveError`] does).
impl<H: ExitHook, S: LogSink> ExitHook for Recorder<H, S>
where
    RecordError: From<H::Error>,
{
    type Error = RecordError;

    fn on_exit(&mut self, seq: ExitSeq, exit: &Exit) -> Result<(), RecordError> {
        let port = match exit {
            Exit::IoIn { port, .. } | Exit::IoOut { port, .. } => Some(*port & !7),
            _ => None,
        };
        self.in_output_burst = port.is_some() && port == self.last_ports;
        self.last_ports = port;
        self.inner.on_exit(seq, exit).map_err(RecordError::from)
    }

    fn end_of_exit(&mut self, seq: ExitSeq) -> Result<Control, RecordError> {
        self.inner.end_of_exit(seq)?;
        if self.take_request() {
            return Ok(Control::Pause);
        }
        let full = self.epoch_started.elapsed() >= self.policy.max_epoch;
        // Output is waiting: end the epoch once the burst that produced it is over (the
        // first exit that is not another access to the same device), so a line printed byte
        // by byte costs one epoch, not one per byte.
        let output_ready = self.output_waiting && !self.in_output_burst;
        if output_ready || full {
            return Ok(Control::Pause);
        }
        let due = self.records.len() >= self.policy.stream_records
            || self.last_flush.elapsed() >= self.policy.stream_interval;
        // A standby replays an exit only once the log is complete through it: while the
        // guest runs without logging anything (a CPU-bound stretch), a protected run still
        // ships how far it got, an empty batch, so the standby trails by one interval, not
        // by an epoch (DESIGN.md §3, streaming). A log file needs no such marks, nor a
        // primary with no standby attached (`--accept-standby` before one joins).
        let progressed = seq.0 > self.shipped_through
            && self
                .checkpoints
                .as_ref()
                .is_some_and(|port| port.tracking.protected());
        if due && (!self.records.is_empty() || progressed) {
            // Every record for this exit is in: ship them now.
            self.flush(seq)?;
        }
        Ok(Control::Continue)
    }

    fn on_halted(&mut self, seq: ExitSeq) -> Result<Control, RecordError> {
        if self.inner.on_halted(seq)? == Control::Pause || self.take_request() {
            return Ok(Control::Pause);
        }
        // The guest halted with output waiting: close the epoch now, before the vCPU waits,
        // so that output is verified and released while the guest sleeps (a guest that
        // prints and then halts must never keep its output held).
        Ok(if self.output_waiting {
            Control::Pause
        } else {
            Control::Continue
        })
    }

    fn on_kick(&mut self, after: ExitSeq) -> Result<(), RecordError> {
        self.inner.on_kick(after).map_err(RecordError::from)
    }

    fn poll_inputs(
        &mut self,
        at: Point,
        view: &HostView,
        inputs: &mut Vec<Input>,
    ) -> Result<(), RecordError> {
        self.inner.poll_inputs(at, view, inputs)?;
        if inputs.is_empty() {
            return Ok(());
        }
        let mut rec = log::Inputs {
            halted: view.halted,
            ..Default::default()
        };
        for input in inputs.iter() {
            match input {
                Input::Clock(ns) => rec.clock_ns = Some(*ns),
                Input::SerialRx(bytes) => rec.serial.extend_from_slice(bytes),
                Input::NetRx(frame) => {
                    self.stats.net_rx_frames += 1;
                    self.stats.net_rx_bytes += frame.len() as u64;
                    rec.net_rx.push(frame.clone());
                }
            }
        }
        if matches!(at, Point::Kick { .. }) {
            self.checkpoint_required = true;
        }
        self.push(at, Kind::Inputs(rec));
        Ok(())
    }

    fn on_read(&mut self, seq: ExitSeq, exit: &Exit, value: &mut [u8]) -> Result<(), RecordError> {
        self.inner.on_read(seq, exit, value)?;
        let kind = match exit {
            Exit::IoIn { port, size, .. } => Kind::PioRead(log::PioRead {
                port: u32::from(*port),
                size: u32::from(*size),
                value: value.to_vec(),
            }),
            Exit::MmioRead { addr, len } => Kind::MmioRead(log::MmioRead {
                addr: *addr,
                size: u32::from(*len),
                value: value.to_vec(),
            }),
            Exit::TscRead { .. } => {
                self.stats.tsc_reads += 1;
                let mut v = [0u8; 8];
                let n = value.len().min(8);
                v[..n].copy_from_slice(&value[..n]);
                Kind::TscRead(log::TscRead {
                    value: u64::from_le_bytes(v),
                })
            }
            _ => return Ok(()),
        };
        self.push(Point::Exit(seq), kind);
        Ok(())
    }

    fn on_inject(&mut self, at: Point, vector: u8) -> Result<(), RecordError> {
        self.inner.on_inject(at, vector)?;
        if matches!(at, Point::Kick { .. }) {
            self.checkpoint_required = true;
        }
        self.push(
            at,
            Kind::Interrupt(log::Interrupt {
                vector: u32::from(vector),
            }),
        );
        Ok(())
    }

    fn on_request_window(&mut self, at: Point) -> Result<(), RecordError> {
        self.inner.on_request_window(at)?;
        self.push(at, Kind::InterruptWindow(log::InterruptWindow {}));
        Ok(())
    }

    fn on_output(&mut self, seq: ExitSeq, bytes: &[u8]) -> Result<(), RecordError> {
        self.output_waiting = true;
        self.inner.on_output(seq, bytes).map_err(RecordError::from)
    }

    fn on_net_output(&mut self, seq: ExitSeq, frames: &[Vec<u8>]) -> Result<(), RecordError> {
        self.output_waiting = true;
        self.stats.net_tx_frames += frames.len() as u64;
        self.stats.net_tx_bytes += frames.iter().map(|f| f.len() as u64).sum::<u64>();
        self.inner
            .on_net_output(seq, frames)
            .map_err(RecordError::from)
    }

    fn on_disk_reads(&mut self, seq: ExitSeq, reads: &[DiskRead]) -> Result<(), RecordError> {
        self.inner.on_disk_reads(seq, reads)?;
        for read in reads {
            self.push(Point::Exit(seq), Kind::DiskRead(to_disk_read(read)));
        }
        Ok(())
    }

    /// Every disk read is logged by (disk, sector, length, hash), DESIGN.md §2.
    fn logs_disk_reads(&self) -> bool {
        true
    }

    fn interrupt_windows(&self) -> bool {
        self.policy.interrupt_windows
    }

    fn kick_at(&self, deadline_ns: u64) -> Option<Kick> {
        self.inner.kick_at(deadline_ns).map(|k| Kick {
            after_guest_time: k.after_guest_time + self.policy.latency_bound,
            ..k
        })
    }
}
