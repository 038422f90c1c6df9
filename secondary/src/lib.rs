//! `ftvm-secondary`: the replayer (DESIGN.md §2).
//!
//! [`Replayer`] is an exit hook that serves every input from the replication log at the same
//! exit sequence number the primary recorded it at, checks that every exit the replayed guest
//! makes matches the recorded one (kind, port or address, size, value), and pauses at every
//! `EpochEnd` so [`replay`] can compare digests. It never runs past a point the log does not
//! cover: before re-entering the guest after exit N it waits until the log is complete through
//! exit N+1, so a kick the primary took after exit N (a checkpoint-required epoch) stops the
//! replay exactly at the last deterministic exit before it.

mod arbiter;
mod describe;
mod disk_reads;
mod disks;
mod hook;
mod install;
mod report;
mod resync;
pub mod standby;
mod tsc;

pub use report::{ReplayError, ReplayReport};

/// An epoch whose digest matched: what [`replay`] tells its caller.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedEpoch {
    /// The epoch.
    pub epoch: u64,
    /// Its last exit.
    pub exit_seq: u64,
    /// When the replay reached that exit (before the digest was computed).
    pub replayed: std::time::Instant,
}

use describe::{describe, hex};

use std::collections::VecDeque;
use std::io::Write;

use ftvm_proto::log::{self, record::Kind, LogHeader, Record};
use ftvm_replication::log::to_run_end;
use ftvm_replication::Position;
use ftvm_vmm::devices::virtio::block::DiskBlock;
use ftvm_vmm::devices::virtio::net::MacAddr;
use ftvm_vmm::digest::epoch_digest;
use ftvm_vmm::exit::{RunEnd, RunError};
use ftvm_vmm::Vm;

/// Where the log comes from, and why it is unusable (re-exported from their home,
/// [`ftvm_replication::log`]).
pub use ftvm_replication::log::{LogError, LogSource};

/// Why the replayer hook stopped the exit loop; [`replay`] sorts it out (a divergence goes
/// into the [`ReplayReport`], the rest become a [`ReplayError`]).
#[derive(Debug, thiserror::Error)]
pub enum ReplayHookError {
    /// The replayed guest did something other than the recorded one.
    #[error(transparent)]
    Divergence(#[from] Divergence),
    /// The log is unusable.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The replayed guest's output could not be written.
    #[error(transparent)]
    Output(#[from] std::io::Error),
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
    /// Likewise the disk blocks written in that epoch.
    unverified_blocks: Vec<DiskBlock>,
    /// The guest's network card, when the output is the two-kind stream
    /// ([`ftvm_vmm::output_stream`]): a standby's, numbered as the primary numbers it.
    muxed: Option<MacAddr>,
    /// The guest's IPv4 address, as its replayed frames show it (for go-live's gratuitous
    /// ARP).
    guest_ipv4: Option<[u8; 4]>,
    /// The guest's IPv6 addresses its replayed frames showed, first seen first (for go-live's
    /// neighbour advertisements), at most [`MAX_GUEST_IPV6`].
    guest_ipv6: Vec<[u8; 16]>,
}

/// The most IPv6 addresses of the guest a standby announces at go-live.
const MAX_GUEST_IPV6: usize = 8;

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
            unverified_blocks: Vec::new(),
            muxed: None,
            guest_ipv4: None,
            guest_ipv6: Vec::new(),
        }
    }

    /// Writes the replayed output as the two-kind stream of a protected VM whose card has
    /// address `mac` (serial bytes and frames as records), as its primary's output is.
    pub fn mux_output(&mut self, mac: MacAddr) {
        self.muxed = Some(mac);
    }

    /// The guest's IPv4 address, if its replayed frames showed one.
    pub fn guest_ipv4(&self) -> Option<[u8; 4]> {
        self.guest_ipv4
    }

    /// The guest's IPv6 addresses its replayed frames showed.
    pub fn guest_ipv6(&self) -> &[[u8; 16]] {
        &self.guest_ipv6
    }

    fn divergence(&self, exit_seq: u64, reason: String) -> ReplayHookError {
        ReplayHookError::Divergence(Divergence {
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

    /// Disk blocks this VM wrote since the last verified boundary, sorted; tracking restarts.
    pub fn dirty_blocks_since_boundary(&mut self, vm: &mut Vm) -> Vec<DiskBlock> {
        let mut blocks = std::mem::take(&mut self.unverified_blocks);
        blocks.extend(vm.take_dirty_blocks());
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }

    /// The VM was put at `at`, the end of an epoch (a checkpoint closing it was installed,
    /// or a switchover made this host the standby there): everything received before it is
    /// superseded; the log goes on with the next epoch. The replayed output is the caller's
    /// to position.
    pub fn restart_after_checkpoint(&mut self, at: Position) {
        self.queue.clear();
        self.complete_through = at.exit_seq;
        self.epoch = at.epoch + 1;
        self.diverged = None;
        self.unverified_dirty.clear();
        self.unverified_blocks.clear();
    }

    /// Pulls batches until every record up to exit `n` is here (or the log ended).
    fn fill_through(&mut self, n: u64) -> Result<(), LogError> {
        while !self.ended && self.complete_through < n {
            self.pull()?;
        }
        Ok(())
    }

    /// Pulls batches until the next record is here (or the log ended). The replay is
    /// halted: every record before this exit was used, so the next one says what the
    /// recorded guest did next (took an input, or its epoch ended before the wait).
    fn fill_next(&mut self) -> Result<(), LogError> {
        while !self.ended && self.queue.is_empty() {
            self.pull()?;
        }
        Ok(())
    }

    /// Pulls one batch of the log, checking its order.
    fn pull(&mut self) -> Result<(), LogError> {
        let Some(batch) = self.source.next_batch()? else {
            self.ended = true;
            return Ok(());
        };
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

impl<S: LogSource, W: Write> Replayer<S, W> {
    fn verify_epoch(
        &mut self,
        vm: &mut Vm,
        seq: u64,
        report: &mut ReplayReport,
        on_verified: &mut dyn FnMut(VerifiedEpoch),
    ) -> Result<bool, ReplayError> {
        let Some(end) = self.take_epoch_end(seq) else {
            return Ok(true);
        };
        let replayed = std::time::Instant::now();
        report.epochs += 1;
        let digest = epoch_digest(vm)?;
        if digest.digest.as_slice() == end.digest.as_slice() {
            report.verified += 1;
            self.epoch = end.epoch + 1;
            on_verified(VerifiedEpoch {
                epoch: end.epoch,
                exit_seq: seq,
                replayed,
            });
            return Ok(true);
        }
        report.diverged += 1;
        self.unverified_dirty = digest.dirty_pages.clone();
        self.unverified_blocks
            .extend(digest.dirty_blocks.iter().copied());
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
/// ([`ReplayReport::log_ended`]). `on_verified` is called as each epoch's
/// digest matches. The replay runs as far as the log goes: it never waits for more of the log
/// than the next exit needs.
pub fn replay<S: LogSource, W: Write>(
    vm: &mut Vm,
    replayer: &mut Replayer<S, W>,
    on_verified: &mut dyn FnMut(VerifiedEpoch),
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    loop {
        // Before entering the guest after exit `seq`: the log must cover the next exit, and
        // a kick the primary took after `seq` must not be run past.
        let seq = vm.exit_seq().0;
        // A halted guest resumes its wait, where the hook reads the log as far as the next
        // record (an input, or an epoch the recorder closed at the halt): waiting here for
        // the next exit would wait for the recorded guest to wake up first.
        if vm.halted() {
            replayer.fill_next()?;
        } else {
            replayer.fill_through(seq + 1)?;
        }
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
                match replayer.take_run_end(seq)? {
                    Some(end) if end == to_run_end(stop) => {}
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
            Err(RunError::Hook(ReplayHookError::Divergence(d))) => {
                report.epochs += 1;
                report.diverged += 1;
                report.divergence = Some(d);
                return Ok(report);
            }
            Err(RunError::Hook(ReplayHookError::Log(e))) => return Err(ReplayError::Log(e)),
            Err(RunError::Hook(ReplayHookError::Output(e))) => return Err(ReplayError::Output(e)),
            // The replayer offered an input the devices refused: the replay's fault, not the
            // guest's.
            Err(RunError::Vm(e @ ftvm_vmm::Error::Input(_))) => return Err(ReplayError::Vm(e)),
            Err(RunError::Vm(e)) => {
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
