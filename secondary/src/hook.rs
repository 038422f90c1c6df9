//! The replayer as the exit loop's hook: each exit checked against the log, inputs and
//! interrupts delivered where the log says, epochs closed and compared by digest.

use std::io::Write;

use ftvm_proto::log::{record::Kind, Record};
use ftvm_vmm::devices::virtio::block::DiskRead;
use ftvm_vmm::exit::{Control, Exit, ExitHook, ExitSeq, HostView, Point};
use ftvm_vmm::output_stream::{encode, sender_ipv4, sender_ipv6, KIND_FRAME, KIND_SERIAL};
use ftvm_vmm::Input;

use ftvm_replication::log::LogSource;

use crate::describe::{describe, describe_exit, hex};
use crate::{ReplayHookError, Replayer, MAX_GUEST_IPV6};

/// How much vCPU time a replayed guest may run past an exit without reaching the next one
/// the log holds ([`ExitHook::exit_free_bound`]). Far above any exit-free stretch of a
/// recording: the recorder kicks a guest that runs on past a timer deadline after its
/// latency bound (50 ms in the nested suites, 30 s at most in the tests), and a spinning
/// guest reaches an exit or a kick long before.
pub(crate) const REPLAY_EXIT_FREE_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

impl<S: LogSource, W: Write> ExitHook for Replayer<S, W> {
    type Error = ReplayHookError;

    fn on_exit(&mut self, seq: ExitSeq, _exit: &Exit) -> Result<(), ReplayHookError> {
        if self.diverged.is_some() {
            return Ok(());
        }
        self.fill_through(seq.0)?;
        if let Some(r) = self.queue.front() {
            if r.exit_seq < seq.0 {
                let reason = format!("the log holds {} that the replay never did", describe(r));
                self.diverge(seq.0, reason);
                return Ok(());
            }
        } else if self.ended && self.complete_through < seq.0 {
            return Err(self.log_ended_error().into());
        }
        Ok(())
    }

    fn end_of_exit(&mut self, seq: ExitSeq) -> Result<Control, ReplayHookError> {
        if self.diverged.is_some() {
            return Ok(Control::Pause);
        }
        // An epoch ends here: pause to compare digests now, without waiting for the next
        // batch (`replay` looks ahead before it re-enters the guest).
        if matches!(
            self.front_at(seq.0, false).map(|r| &r.kind),
            Some(Some(Kind::EpochEnd(_)))
        ) {
            return Ok(Control::Pause);
        }
        // Know whether a kick follows this exit, or the log ends here, before running past it.
        self.fill_through(seq.0 + 1)?;
        if self.log_exhausted(seq.0) {
            return Ok(Control::Pause);
        }
        let Some(r) = self.queue.front().filter(|r| r.exit_seq == seq.0) else {
            return Ok(Control::Continue);
        };
        match (&r.kind, r.at_kick) {
            (_, true) | (Some(Kind::EpochEnd(_)), false) => Ok(Control::Pause),
            (Some(Kind::RunEnd(_)), false) => {
                let reason = "the recorded guest stopped here, the replayed one did not";
                self.diverge(seq.0, reason.into());
                Ok(Control::Pause)
            }
            _ => {
                let reason = format!("the log holds {} that the replay did not do", describe(r));
                self.diverge(seq.0, reason);
                Ok(Control::Pause)
            }
        }
    }

    fn on_halted(&mut self, seq: ExitSeq) -> Result<Control, ReplayHookError> {
        if self.diverged.is_some() {
            return Ok(Control::Continue);
        }
        // The recorder closes an epoch at a halt, before the wait, when output is waiting
        // (or for a switchover): pause at the same point to compare digests.
        self.fill_next()?;
        Ok(match self.front_at(seq.0, false).map(|r| &r.kind) {
            Some(Some(Kind::EpochEnd(_))) => Control::Pause,
            _ => Control::Continue,
        })
    }

    fn poll_inputs(
        &mut self,
        at: Point,
        view: &HostView,
        inputs: &mut Vec<Input>,
    ) -> Result<(), ReplayHookError> {
        let (seq, at_kick) = at.log_position();
        if let Some(d) = &self.diverged {
            // Halted after diverging: nothing in the log applies; stop here (at the HLT,
            // a consistent point).
            return match view.halted {
                true => Err(d.clone().into()),
                false => Ok(()),
            };
        }
        self.fill_through(seq)?;
        let matches = matches!(
            self.front_at(seq, at_kick).map(|r| &r.kind),
            Some(Some(Kind::Inputs(i))) if i.halted == view.halted
        );
        if !matches {
            if view.halted {
                if self.ended && self.queue.is_empty() {
                    return Err(self.log_ended_error().into());
                }
                let next = self.queue.front().map_or("nothing".into(), describe);
                let reason = format!("the guest halted and the log has no input to wake it (next in the log: {next})");
                return Err(self.divergence(seq, reason));
            }
            return Ok(());
        }
        let Some(Record {
            kind: Some(Kind::Inputs(rec)),
            ..
        }) = self.queue.pop_front()
        else {
            return Ok(());
        };
        if let Some(ns) = rec.clock_ns {
            inputs.push(Input::Clock(ns));
        }
        if !rec.serial.is_empty() {
            if rec.serial.len() > view.rx_capacity {
                let reason = format!(
                    "the log delivers {} serial bytes where the replayed UART has room for {}",
                    rec.serial.len(),
                    view.rx_capacity
                );
                self.diverge(seq, reason);
                return Ok(());
            }
            inputs.push(Input::SerialRx(rec.serial));
        }
        if !rec.net_rx.is_empty() {
            // The recorder offers one frame per poll, and only to a card with a buffer.
            if rec.net_rx.len() > 1 || !view.net_rx_ready {
                let reason = format!(
                    "the log delivers {} network frame(s) where the replayed card has {}",
                    rec.net_rx.len(),
                    if view.net_rx_ready {
                        "room for one"
                    } else {
                        "no receive buffer"
                    }
                );
                self.diverge(seq, reason);
                return Ok(());
            }
            inputs.extend(rec.net_rx.into_iter().map(Input::NetRx));
        }
        Ok(())
    }

    fn on_read(
        &mut self,
        seq: ExitSeq,
        exit: &Exit,
        value: &mut [u8],
    ) -> Result<(), ReplayHookError> {
        if self.diverged.is_some() {
            return Ok(());
        }
        let logged = match (self.front_at(seq.0, false).map(|r| &r.kind), exit) {
            (Some(Some(Kind::PioRead(p))), Exit::IoIn { port, size, .. })
                if p.port == u32::from(*port)
                    && p.size == u32::from(*size)
                    && p.value.len() == value.len() =>
            {
                p.value.clone()
            }
            (Some(Some(Kind::MmioRead(m))), Exit::MmioRead { addr, len })
                if m.addr == *addr && m.size == u32::from(*len) && m.value.len() == value.len() =>
            {
                m.value.clone()
            }
            (Some(Some(Kind::TscRead(t))), Exit::TscRead { .. }) if value.len() == 8 => {
                // The replayed guest reads the recorded TSC: this host's differs by nature,
                // which is no divergence (DESIGN.md §2, TSC-read exits).
                value.copy_from_slice(&t.value.to_le_bytes());
                self.queue.pop_front();
                return Ok(());
            }
            _ => {
                let expected = self.queue.front().map_or("nothing".into(), describe);
                let reason = format!(
                    "exit mismatch: the log has {expected}, the replayed guest did a {}",
                    describe_exit(exit)
                );
                self.diverge(seq.0, reason);
                return Ok(());
            }
        };
        self.queue.pop_front();
        // The guest gets the logged value; a replayed device that answered differently has
        // diverged, so after this check the two are the same bytes.
        if logged != value {
            let reason = format!(
                "the {} returned {} in the log and {} in the replay",
                describe_exit(exit),
                hex(&logged),
                hex(value)
            );
            self.diverge(seq.0, reason);
        }
        Ok(())
    }

    fn on_inject(&mut self, at: Point, vector: u8) -> Result<(), ReplayHookError> {
        let (seq, at_kick) = at.log_position();
        if self.diverged.is_some() {
            return Ok(());
        }
        match self.front_at(seq, at_kick).map(|r| &r.kind) {
            Some(Some(Kind::Interrupt(i))) if i.vector == u32::from(vector) => {
                self.queue.pop_front();
                Ok(())
            }
            _ => {
                let next = self.queue.front().map_or("nothing".into(), describe);
                let reason = format!("the replay injects vector {vector:#x}, the log has {next}");
                self.diverge(seq, reason);
                Ok(())
            }
        }
    }

    fn on_request_window(&mut self, at: Point) -> Result<(), ReplayHookError> {
        let (seq, at_kick) = at.log_position();
        if self.diverged.is_some() {
            return Ok(());
        }
        match self.front_at(seq, at_kick).map(|r| &r.kind) {
            Some(Some(Kind::InterruptWindow(_))) => {
                self.queue.pop_front();
                Ok(())
            }
            _ => {
                let next = self.queue.front().map_or("nothing".into(), describe);
                let reason = format!("the replay requests an interrupt window, the log has {next}");
                self.diverge(seq, reason);
                Ok(())
            }
        }
    }

    fn on_disk_reads(&mut self, seq: ExitSeq, reads: &[DiskRead]) -> Result<(), ReplayHookError> {
        self.check_disk_reads(seq, reads);
        Ok(())
    }

    fn logs_disk_reads(&self) -> bool {
        true
    }

    fn interrupt_windows(&self) -> bool {
        self.interrupt_windows
    }

    fn exit_free_bound(&self) -> Option<std::time::Duration> {
        Some(REPLAY_EXIT_FREE_BOUND)
    }

    /// Only [`REPLAY_EXIT_FREE_BOUND`] kicks a replayed guest: it ran that long past exit
    /// `after` although the log shows the recorded guest reached its next exit. Its state
    /// differs from the recorded guest's in a way no exit showed (seen with Linux after a
    /// repair, spinning in `KVM_RUN` for minutes while its primary went on): a divergence,
    /// which a standby repairs, rather than a replay that never ends.
    fn on_kick(&mut self, after: ExitSeq) -> Result<(), ReplayHookError> {
        Err(crate::Divergence {
            epoch: self.epoch,
            exit_seq: after.0,
            reason: format!(
                "the replayed guest ran {REPLAY_EXIT_FREE_BOUND:?} of vCPU time past exit {} \
                 without reaching the next exit the log holds",
                after.0
            ),
        }
        .into())
    }

    fn on_output(&mut self, _seq: ExitSeq, bytes: &[u8]) -> Result<(), ReplayHookError> {
        if self.muxed.is_some() {
            let mut record = Vec::with_capacity(bytes.len() + 5);
            encode(KIND_SERIAL, bytes, &mut record);
            self.output.write_all(&record)?;
        } else {
            self.output.write_all(bytes)?;
        }
        self.output.flush()?;
        Ok(())
    }

    /// The replayed card's frames are the ones the primary sent: a standby sends none of
    /// them until it is live; it keeps them in its output (the two-kind stream) to re-emit
    /// what the primary did not release, and learns the guest's address from them.
    fn on_net_output(&mut self, _seq: ExitSeq, frames: &[Vec<u8>]) -> Result<(), ReplayHookError> {
        let Some(mac) = self.muxed else {
            return Ok(());
        };
        let mut records = Vec::new();
        for frame in frames {
            if let Some(ip) = sender_ipv4(frame, mac.0) {
                self.guest_ipv4 = Some(ip);
            }
            if let Some(ip) = sender_ipv6(frame, mac.0) {
                if !self.guest_ipv6.contains(&ip) && self.guest_ipv6.len() < MAX_GUEST_IPV6 {
                    self.guest_ipv6.push(ip);
                }
            }
            encode(KIND_FRAME, frame, &mut records);
        }
        self.output.write_all(&records)?;
        self.output.flush()?;
        Ok(())
    }
}
