//! `ftvm-secondary`: the replayer (DESIGN.md §2).
//!
//! [`Replayer`] is an exit hook that serves every input from the replication log at the same
//! exit sequence number the primary recorded it at, checks that every exit the replayed guest
//! makes matches the recorded one (kind, port or address, size, value), and pauses at every
//! `EpochEnd` so [`replay`] can compare digests. It never runs past a point the log does not
//! cover: before re-entering the guest after exit N it waits until the log is complete through
//! exit N+1, so a kick the primary took after exit N (a checkpoint-required epoch) stops the
//! replay exactly at the last deterministic exit before it.

pub mod log_file;
pub mod standby;

use std::collections::VecDeque;
use std::io::Write;

use ftvm_proto::frame::FrameError;
use ftvm_proto::log::{self, record::Kind, LogHeader, Record, RecordBatch};
use ftvm_vmm::cpuid::CpuidTable;
use ftvm_vmm::devices::virtio::block::{DiskConfig, DiskInfo};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::digest::{epoch_digest, hash};
use ftvm_vmm::exit::{Control, Exit, ExitHook, ExitSeq, HookError, HostView, Point, RunEnd};
use ftvm_vmm::{Input, Vm, VmConfig};

/// Where the log comes from: a file now, the pair's channel later.
pub trait LogSource {
    /// The next batch, or None when the log has ended.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError>;
    /// Byte offset reached (for error messages).
    fn offset(&self) -> u64;
}

/// The log is unusable (as opposed to the replay diverging from it).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file cannot be opened.
    #[error("cannot open log {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// Not a log file.
    #[error("not an ftvm log: bad magic at offset 0")]
    BadMagic,
    /// A frame is damaged.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Written by an incompatible version.
    #[error("unsupported log format version {found} in the header frame at offset {offset} (this ftvm reads version {})", ftvm_proto::FORMAT_VERSION)]
    Version {
        /// Offset of the header frame.
        offset: u64,
        /// The version found.
        found: u32,
    },
    /// A frame of the wrong kind.
    #[error("unexpected frame at offset {offset}: {what}")]
    UnexpectedFrame {
        /// Offset of the frame.
        offset: u64,
        /// What was found.
        what: &'static str,
    },
    /// The log has no header.
    #[error("log ends at offset {offset} before its header")]
    Ended {
        /// Offset of the end.
        offset: u64,
    },
    /// The log ends before the run does.
    #[error("log ends at offset {offset} after exit {exit_seq} without a run-end record (truncated log?)")]
    Truncated {
        /// Offset of the end.
        offset: u64,
        /// The last exit the log covers.
        exit_seq: u64,
    },
    /// A record makes no sense.
    #[error("malformed record in the frame ending at offset {offset}: {why}")]
    Malformed {
        /// Offset reached.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The log was recorded with another kernel.
    #[error("log was recorded with another kernel: log has kernel hash {logged}, {kernel} hashes to {actual}")]
    KernelMismatch {
        /// Hash in the log.
        logged: String,
        /// Hash of the kernel given.
        actual: String,
        /// Which kernel.
        kernel: String,
    },
    /// The header's VM configuration is unusable.
    #[error("invalid VM configuration in the log header: {0}")]
    Config(String),
}

/// The replayed guest did something other than the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("diverged epoch={epoch} exit_seq={exit_seq} reason={reason}")]
pub struct Divergence {
    /// The epoch being replayed.
    pub epoch: u64,
    /// The exit at which it showed.
    pub exit_seq: u64,
    /// What differed.
    pub reason: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The VM configuration a log header describes, with `kernel` (named `kernel_name` in errors)
/// as the image, `initrd` and `disks`; the kernel and initrd must be the ones the log was
/// recorded with (the disks are checked against the header by [`check_disks`] once opened).
pub fn config_from_header(
    header: &LogHeader,
    kernel: Vec<u8>,
    kernel_name: &str,
    initrd: Option<Vec<u8>>,
    disks: Vec<DiskConfig>,
) -> Result<VmConfig, LogError> {
    let c = header
        .config
        .as_ref()
        .ok_or_else(|| LogError::Config("no VM configuration".into()))?;
    let actual = hash(&kernel);
    if actual.as_slice() != c.kernel_hash.as_slice() {
        return Err(LogError::KernelMismatch {
            logged: hex(&c.kernel_hash),
            actual: hex(&actual),
            kernel: kernel_name.to_string(),
        });
    }
    if hash(&c.cpuid_table).as_slice() != c.cpuid_hash.as_slice() {
        return Err(LogError::Config(
            "CPUID table does not match its hash".into(),
        ));
    }
    let cpuid: CpuidTable = ftvm_vmm::state::decode(&c.cpuid_table)
        .map_err(|e| LogError::Config(format!("CPUID table: {e}")))?;
    match (&initrd, c.initrd_hash.is_empty()) {
        (None, false) => {
            return Err(LogError::Config(
                "the guest was recorded with an initrd; give the same one (--initrd)".into(),
            ))
        }
        (Some(_), true) => {
            return Err(LogError::Config(
                "the guest was recorded without an initrd, but one was given".into(),
            ))
        }
        (Some(i), false) if hash(i).as_slice() != c.initrd_hash.as_slice() => {
            return Err(LogError::Config(format!(
                "the initrd given hashes to {}, the log's to {}",
                hex(&hash(i)),
                hex(&c.initrd_hash)
            )))
        }
        _ => {}
    }
    if disks.len() != c.disks.len() {
        return Err(LogError::Config(format!(
            "the guest was recorded with {} disks, {} given (--disk)",
            c.disks.len(),
            disks.len()
        )));
    }
    Ok(VmConfig {
        mem_mib: c.mem_mib,
        kernel,
        initrd,
        disks,
        cmdline: c.cmdline.clone(),
        cpuid: Some(cpuid),
    })
}

/// Checks the opened disks against the ones the header describes (same count, size and
/// mode). Their contents cannot be checked here: a disk that differs shows as a divergence.
pub fn check_disks(header: &LogHeader, disks: &[DiskInfo]) -> Result<(), LogError> {
    let logged = header.config.as_ref().map_or(&[][..], |c| &c.disks[..]);
    if logged.len() != disks.len() {
        return Err(LogError::Config(format!(
            "the guest was recorded with {} disks, {} given",
            logged.len(),
            disks.len()
        )));
    }
    for (i, (l, d)) in logged.iter().zip(disks).enumerate() {
        if l.sectors != d.sectors || l.read_only != d.read_only {
            return Err(LogError::Config(format!(
                "disk {i}: recorded with {} sectors{}, given {} sectors{}",
                l.sectors,
                if l.read_only { " read-only" } else { "" },
                d.sectors,
                if d.read_only { " read-only" } else { "" },
            )));
        }
    }
    Ok(())
}

fn describe(r: &Record) -> String {
    let what = match &r.kind {
        Some(Kind::PioRead(p)) => format!("PIO read of port {:#x} size {}", p.port, p.size),
        Some(Kind::MmioRead(m)) => format!("MMIO read of {:#x} size {}", m.addr, m.size),
        Some(Kind::Interrupt(i)) => format!("interrupt vector {:#x}", i.vector),
        Some(Kind::InterruptWindow(_)) => "interrupt-window request".into(),
        Some(Kind::GuestWrite(w)) => format!("guest memory write at {:#x}", w.gpa),
        Some(Kind::Inputs(_)) => "inputs".into(),
        Some(Kind::EpochEnd(e)) => format!("end of epoch {}", e.epoch),
        Some(Kind::RunEnd(_)) => "end of run".into(),
        None => "empty record".into(),
    };
    if r.at_kick {
        format!("{what} at a kick after exit {}", r.exit_seq)
    } else {
        format!("{what} at exit {}", r.exit_seq)
    }
}

fn describe_exit(e: &Exit) -> String {
    match e {
        Exit::IoIn { port, size, .. } => format!("PIO read of port {port:#x} size {size}"),
        Exit::IoOut { port, size, .. } => format!("PIO write to port {port:#x} size {size}"),
        Exit::MmioRead { addr, len } => format!("MMIO read of {addr:#x} size {len}"),
        Exit::MmioWrite { addr, data } => format!("MMIO write to {addr:#x} size {}", data.len()),
        other => format!("{other:?}"),
    }
}

/// The replayer hook.
pub struct Replayer<S, W> {
    source: S,
    queue: VecDeque<Record>,
    complete_through: u64,
    ended: bool,
    epoch: u64,
    output: W,
    interrupt_windows: bool,
    /// The replay diverged at this exit: the exit completes with the replayed guest's own
    /// values and the replay pauses at its end.
    diverged: Option<Divergence>,
    /// Pages dirtied in an epoch whose digest did not match (the digest took them from the
    /// dirty log): part of what a repair must cover.
    unverified_dirty: Vec<u64>,
}

impl<S: LogSource, W: Write> Replayer<S, W> {
    /// A replayer reading `source` (whose log was recorded with `header`), writing the
    /// replayed guest output to `output`.
    pub fn new(source: S, header: &LogHeader, output: W) -> Self {
        Self {
            interrupt_windows: header.interrupt_windows,
            source,
            queue: VecDeque::new(),
            complete_through: 0,
            ended: false,
            epoch: 1,
            output,
            diverged: None,
            unverified_dirty: Vec::new(),
        }
    }

    fn divergence(&self, exit_seq: u64, reason: String) -> HookError {
        Box::new(Divergence {
            epoch: self.epoch,
            exit_seq,
            reason,
        })
    }

    /// Notes the first divergence. The exit in progress then completes with the replayed
    /// guest's own device values, and the replay pauses at its end: the VM stops at a
    /// consistent point, from which it can install a repair or go live.
    fn diverge(&mut self, exit_seq: u64, reason: String) {
        if self.diverged.is_none() {
            tracing::debug!(epoch = self.epoch, exit_seq, reason, "diverged");
            self.diverged = Some(Divergence {
                epoch: self.epoch,
                exit_seq,
                reason,
            });
        }
    }

    /// The epoch being replayed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The log source.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Pages this VM dirtied since the last verified boundary (the last matching digest or
    /// installed checkpoint), sorted; the dirty logs restart.
    pub fn dirty_since_boundary(&mut self, vm: &mut Vm) -> Result<Vec<u64>, ftvm_vmm::Error> {
        let mut pages = std::mem::take(&mut self.unverified_dirty);
        pages.extend(vm.take_dirty_pages()?);
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    /// A checkpoint closing `epoch` at exit `exit_seq` was installed: everything received
    /// before it is superseded; the log goes on with the next epoch.
    pub fn restart_after_checkpoint(&mut self, epoch: u64, exit_seq: u64) {
        self.queue.clear();
        self.complete_through = exit_seq;
        self.epoch = epoch + 1;
        self.diverged = None;
        self.unverified_dirty.clear();
    }

    /// Pulls batches until every record up to exit `n` is here (or the log ended).
    fn fill_through(&mut self, n: u64) -> Result<(), LogError> {
        while !self.ended && self.complete_through < n {
            match self.source.next_batch()? {
                None => self.ended = true,
                Some(batch) => {
                    let offset = self.source.offset();
                    let mut last = self.queue.back().map_or(0, |r| r.exit_seq);
                    for r in &batch.records {
                        if r.kind.is_none() || r.exit_seq < last {
                            return Err(LogError::Malformed {
                                offset,
                                why: format!("{} out of order or empty", describe(r)),
                            });
                        }
                        last = r.exit_seq;
                    }
                    if batch.complete_through < self.complete_through {
                        return Err(LogError::Malformed {
                            offset,
                            why: "log completeness went backwards".into(),
                        });
                    }
                    self.complete_through = batch.complete_through;
                    self.queue.extend(batch.records);
                }
            }
        }
        Ok(())
    }

    fn front_at(&self, seq: u64, at_kick: bool) -> Option<&Record> {
        self.queue
            .front()
            .filter(|r| r.exit_seq == seq && r.at_kick == at_kick)
    }

    /// The log has ended and holds nothing past exit `seq`: the replay cannot go on from
    /// here (a truncated log file, or a primary that is gone).
    pub fn log_exhausted(&self, seq: u64) -> bool {
        self.ended && self.complete_through <= seq && self.queue.is_empty()
    }

    /// The replayed guest output writer.
    pub fn output_mut(&mut self) -> &mut W {
        &mut self.output
    }

    /// The error for a log that ended before the run did.
    pub fn log_ended_error(&self) -> LogError {
        LogError::Truncated {
            offset: self.source.offset(),
            exit_seq: self.complete_through,
        }
    }

    /// Takes the `EpochEnd` for exit `seq`, if it is next.
    pub fn take_epoch_end(&mut self, seq: u64) -> Option<log::EpochEnd> {
        match self.front_at(seq, false)?.kind {
            Some(Kind::EpochEnd(_)) => match self.queue.pop_front()?.kind {
                Some(Kind::EpochEnd(e)) => Some(e),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the primary took a kick that delivered input right after exit `seq`: the
    /// replay cannot go past this exit (the epoch is checkpoint-required).
    pub fn kick_follows(&self, seq: u64) -> bool {
        self.front_at(seq, true).is_some()
    }

    /// Takes the `RunEnd` for exit `seq`, if it is next.
    pub fn take_run_end(&mut self, seq: u64) -> Result<Option<log::RunEnd>, LogError> {
        self.fill_through(seq)?;
        match self.front_at(seq, false).map(|r| &r.kind) {
            Some(Some(Kind::RunEnd(_))) => match self.queue.pop_front().and_then(|r| r.kind) {
                Some(Kind::RunEnd(e)) => Ok(Some(e)),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

impl<S: LogSource, W: Write> ExitHook for Replayer<S, W> {
    fn on_exit(&mut self, seq: ExitSeq, _exit: &Exit) -> Result<(), HookError> {
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
            return Err(Box::new(self.log_ended_error()));
        }
        Ok(())
    }

    fn end_of_exit(&mut self, seq: ExitSeq) -> Result<Control, HookError> {
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

    fn poll_inputs(
        &mut self,
        at: Point,
        view: &HostView,
        inputs: &mut Vec<Input>,
    ) -> Result<(), HookError> {
        let (seq, at_kick) = at.log_position();
        if let Some(d) = &self.diverged {
            // Halted after diverging: nothing in the log applies; stop here (at the HLT,
            // a consistent point).
            return match view.halted {
                true => Err(Box::new(d.clone())),
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
                    return Err(Box::new(self.log_ended_error()));
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
        Ok(())
    }

    fn on_read(&mut self, seq: ExitSeq, exit: &Exit, value: &mut [u8]) -> Result<(), HookError> {
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

    fn on_inject(&mut self, at: Point, vector: u8) -> Result<(), HookError> {
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

    fn on_request_window(&mut self, at: Point) -> Result<(), HookError> {
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

    fn interrupt_windows(&self) -> bool {
        self.interrupt_windows
    }

    fn on_output(&mut self, _seq: ExitSeq, bytes: &[u8]) -> Result<(), HookError> {
        self.output.write_all(bytes)?;
        self.output.flush()?;
        Ok(())
    }
}

/// How a replay went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Epochs replayed.
    pub epochs: u64,
    /// Epochs whose digests matched.
    pub verified: u64,
    /// Epochs that diverged (the replay stops at the first).
    pub diverged: u64,
    /// Epochs that need a checkpoint (the replay stops at the first).
    pub checkpoint_required: u64,
    /// The first divergence.
    pub divergence: Option<Divergence>,
    /// The checkpoint-required epoch the replay stopped at: (epoch, last exit before the
    /// kick).
    pub checkpoint_at: Option<(u64, u64)>,
    /// The log ended (no more records, no run end) after this exit: the replay stopped at a
    /// consistent point from which the guest can go live.
    pub log_ended: Option<u64>,
    /// How the replayed guest stopped, if it ran to the end.
    pub stop: Option<StopRequest>,
}

/// Replay failed for a reason other than divergence.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log is unusable.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
}

impl<S: LogSource, W: Write> Replayer<S, W> {
    fn verify_epoch(
        &mut self,
        vm: &mut Vm,
        seq: u64,
        report: &mut ReplayReport,
        on_verified: &mut dyn FnMut(u64, u64),
    ) -> Result<bool, ReplayError> {
        let Some(end) = self.take_epoch_end(seq) else {
            return Ok(true);
        };
        report.epochs += 1;
        let digest = epoch_digest(vm)?;
        if digest.digest.as_slice() == end.digest.as_slice() {
            report.verified += 1;
            self.epoch = end.epoch + 1;
            on_verified(end.epoch, seq);
            return Ok(true);
        }
        report.diverged += 1;
        self.unverified_dirty = digest.dirty_pages.clone();
        report.divergence = Some(Divergence {
            epoch: end.epoch,
            exit_seq: seq,
            reason: format!(
                "digest mismatch: log {} replay {} ({} pages dirty in replay)",
                hex(&end.digest[..8.min(end.digest.len())]),
                hex(&digest.digest[..8]),
                digest.dirty_pages.len()
            ),
        });
        Ok(false)
    }
}

/// Replays the log into `vm` (built from the log's header) until the run ends, the replay
/// diverges, a checkpoint-required epoch is reached, or the log ends
/// ([`ReplayReport::log_ended`]). `on_verified(epoch, exit_seq)` is called as each epoch's
/// digest matches. The replay runs as far as the log goes: it never waits for more of the log
/// than the next exit needs.
pub fn replay<S: LogSource, W: Write>(
    vm: &mut Vm,
    replayer: &mut Replayer<S, W>,
    on_verified: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    loop {
        // Before entering the guest after exit `seq`: the log must cover the next exit, and
        // a kick the primary took after `seq` must not be run past.
        let seq = vm.exit_seq().0;
        replayer.fill_through(seq + 1)?;
        if replayer.kick_follows(seq) {
            report.epochs += 1;
            report.checkpoint_required += 1;
            report.checkpoint_at = Some((replayer.epoch, seq));
            return Ok(report);
        }
        if replayer.log_exhausted(seq) {
            report.log_ended = Some(seq);
            return Ok(report);
        }
        let result = vm.run(replayer);
        if let Some(d) = replayer.diverged.clone() {
            if result.is_ok() {
                report.epochs += 1;
                report.diverged += 1;
                report.divergence = Some(d);
                return Ok(report);
            }
        }
        match result {
            Ok(RunEnd::Paused(seq)) => {
                if !replayer.verify_epoch(vm, seq.0, &mut report, on_verified)? {
                    return Ok(report);
                }
            }
            Ok(RunEnd::Stopped(stop)) => {
                let seq = vm.exit_seq().0;
                replayer.fill_through(seq)?;
                let had_epoch_end = replayer
                    .front_at(seq, false)
                    .is_some_and(|r| matches!(r.kind, Some(Kind::EpochEnd(_))));
                if !had_epoch_end {
                    report.epochs += 1;
                    report.diverged += 1;
                    report.divergence = Some(Divergence {
                        epoch: replayer.epoch,
                        exit_seq: seq,
                        reason: "the replayed guest stopped where the recorded one did not".into(),
                    });
                    return Ok(report);
                }
                if !replayer.verify_epoch(vm, seq, &mut report, on_verified)? {
                    return Ok(report);
                }
                let expected = match stop {
                    StopRequest::Exit(s) => log::run_end::Stop::ExitStatus(u32::from(s)),
                    StopRequest::Reset => log::run_end::Stop::Reset(true),
                };
                match replayer.take_run_end(seq)? {
                    Some(end) if end.stop == Some(expected) => {}
                    other => {
                        report.diverged += 1;
                        report.divergence = Some(Divergence {
                            epoch: replayer.epoch,
                            exit_seq: seq,
                            reason: format!(
                                "the replayed guest stopped with {stop:?}, the log has {other:?}"
                            ),
                        });
                        return Ok(report);
                    }
                }
                report.stop = Some(stop);
                return Ok(report);
            }
            Err(ftvm_vmm::Error::Hook(e)) => {
                let e = match e.downcast::<Divergence>() {
                    Ok(d) => {
                        report.epochs += 1;
                        report.diverged += 1;
                        report.divergence = Some(*d);
                        return Ok(report);
                    }
                    Err(e) => e,
                };
                return match e.downcast::<LogError>() {
                    Ok(l) => Err(ReplayError::Log(*l)),
                    Err(e) => Err(ReplayError::Vm(ftvm_vmm::Error::Hook(e))),
                };
            }
            Err(e) => {
                // The replayed guest failed where the recorded one went on.
                report.epochs += 1;
                report.diverged += 1;
                report.divergence = Some(Divergence {
                    epoch: replayer.epoch,
                    exit_seq: vm.exit_seq().0,
                    reason: e.to_string(),
                });
                return Ok(report);
            }
        }
    }
}
