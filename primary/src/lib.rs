//! `ftvm-primary`: the recorder (DESIGN.md §2).
//!
//! [`Recorder`] is an exit hook layered over a live hook: the live hook decides what each
//! nondeterministic input is (host clock, serial input) and the recorder writes every one of
//! them into the replication log at its exit sequence number, together with every value the
//! guest read and every interrupt injected. It cuts the run into **epochs** at exits — when an
//! epoch reaches its maximum length or as soon as guest output is waiting — and closes each
//! with an `EpochEnd` carrying the epoch's **digest**. An epoch in which a kick delivered an
//! input at a non-deterministic point is marked **checkpoint-required**.

mod hook;
pub mod pair;
mod repair;

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use ftvm_proto::channel::{CheckpointEnd, Page, PageChunk};
use ftvm_proto::log::{self, record::Kind, Record, RecordBatch};
use ftvm_replication::checkpoint::{VcpuPort, VcpuRequest, PAGES_PER_CHUNK};
use ftvm_replication::log::to_run_end;
use ftvm_replication::primary::FromVcpu;
use ftvm_vmm::devices::virtio::block::DiskBlock;
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::digest::{epoch_digest, state_digest_with};
use ftvm_vmm::exit::{ExitHook, ExitSeq, Point, RunEnd, RunError};
use ftvm_vmm::live::LiveError;
use ftvm_vmm::memory::{is_zero_page, PAGE_SIZE};
use ftvm_vmm::Vm;

/// Where the log goes (re-exported from its home, [`ftvm_replication::log`]).
pub use ftvm_replication::log::LogSink;

/// Default maximum epoch length.
pub const DEFAULT_MAX_EPOCH: Duration = Duration::from_millis(10);
/// Default interval at which the log is shipped within an epoch (a log file: batches this
/// far apart keep its frames few).
pub const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_millis(1);
/// The stream interval of a protected run whose latency bound is `latency_bound`: a
/// sixteenth of it (250 µs at the default 4 ms), between 50 µs and an epoch. Its standby
/// replays no further than the log shipped so far, so this is about how far it trails a
/// busy guest, and each interval can cost a batch (DESIGN.md §3, streaming). Tied to the
/// latency bound because a host slow enough to need a larger bound (the nested harness,
/// 50 ms: 3.1 ms here) pays proportionally more for each batch: at a fixed 250 µs there,
/// where an exit takes about a millisecond, every exit shipped one, and the harness's Linux
/// pair drills took 80% longer.
pub fn pair_stream_interval(latency_bound: Duration) -> Duration {
    (latency_bound / 16).clamp(Duration::from_micros(50), DEFAULT_MAX_EPOCH)
}
/// Default [`EpochPolicy::stream_records`].
pub const DEFAULT_STREAM_RECORDS: usize = 256;
/// Default latency bound: how long a due interrupt waits for a natural exit before the vCPU
/// is kicked.
pub const DEFAULT_LATENCY_BOUND: Duration = Duration::from_millis(4);

/// Recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The log could not be written.
    #[error("cannot write the replication log: {0}")]
    Log(#[source] std::io::Error),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
    /// The live hook under the recorder failed (a guest that can never wake up, output that
    /// cannot be written).
    #[error(transparent)]
    Live(#[from] LiveError),
}

impl From<RunError<RecordError>> for RecordError {
    fn from(e: RunError<RecordError>) -> Self {
        match e {
            RunError::Vm(e) => e.into(),
            RunError::Hook(e) => e,
        }
    }
}

/// Epoch policy.
#[derive(Debug, Clone, Copy)]
pub struct EpochPolicy {
    /// Maximum length of an epoch (wall time while the guest runs).
    pub max_epoch: Duration,
    /// Within an epoch, ship what was recorded at the first exit after this long, so the
    /// standby replays right behind the primary instead of one epoch at a time.
    pub stream_interval: Duration,
    /// ... or as soon as this many records are waiting, whichever comes first (a busy guest
    /// streams in small batches, not one large one per interval).
    pub stream_records: usize,
    /// How long a due interrupt may wait for an exit before the vCPU is kicked.
    pub latency_bound: Duration,
    /// Deliver pending interrupts through interrupt-window exits (exact on VMX/SVM, not on
    /// PVM). Off: they wait for the next natural exit at which the vCPU is ready.
    pub interrupt_windows: bool,
}

impl Default for EpochPolicy {
    fn default() -> Self {
        Self {
            max_epoch: DEFAULT_MAX_EPOCH,
            stream_interval: DEFAULT_STREAM_INTERVAL,
            stream_records: DEFAULT_STREAM_RECORDS,
            latency_bound: DEFAULT_LATENCY_BOUND,
            interrupt_windows: false,
        }
    }
}

/// Counters of a recording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Epochs closed.
    pub epochs: u64,
    /// Of which checkpoint-required.
    pub checkpoint_required: u64,
    /// Records written.
    pub records: u64,
    /// TSC reads logged (`TscRead` records: a guest whose TSC reads are exits).
    pub tsc_reads: u64,
    /// Frames the guest received, every one logged with its bytes (`Inputs.net_rx`).
    pub net_rx_frames: u64,
    /// Their bytes.
    pub net_rx_bytes: u64,
    /// Frames the guest sent (output, not logged).
    pub net_tx_frames: u64,
    /// Their bytes.
    pub net_tx_bytes: u64,
}

/// The recorder hook over `inner` (the live hook), writing to `sink`.
pub struct Recorder<H, S> {
    inner: H,
    sink: S,
    policy: EpochPolicy,
    records: Vec<Record>,
    epoch: u64,
    epoch_started: Instant,
    last_flush: Instant,
    /// The exit through which the log was last shipped complete (`complete_through`).
    shipped_through: u64,
    /// When the epoch being closed began to close (its digest is computed after).
    closing: Option<Instant>,
    output_waiting: bool,
    /// The port block (8 ports) the previous exit accessed, and whether the current exit
    /// accesses the same block: an output burst goes on while it does.
    last_ports: Option<u16>,
    in_output_burst: bool,
    checkpoint_required: bool,
    stats: RecordStats,
    /// Where checkpoints are asked for and sent (a protected run).
    checkpoints: Option<VcpuPort>,
    /// A checkpoint asked for: it is made at the end of the current exit.
    requested: Option<VcpuRequest>,
    /// Pages dirtied and disk blocks written in each closed epoch the standby has not
    /// verified yet.
    unverified_dirty: VecDeque<(u64, Vec<u64>, Vec<DiskBlock>)>,
}

impl<H: ExitHook, S: LogSink> Recorder<H, S> {
    /// A recorder starting at epoch 1.
    pub fn new(inner: H, sink: S, policy: EpochPolicy) -> Self {
        Self {
            inner,
            sink,
            policy,
            records: Vec::new(),
            epoch: 1,
            epoch_started: Instant::now(),
            last_flush: Instant::now(),
            shipped_through: 0,
            closing: None,
            output_waiting: false,
            last_ports: None,
            in_output_burst: false,
            checkpoint_required: false,
            stats: RecordStats::default(),
            checkpoints: None,
            requested: None,
            unverified_dirty: VecDeque::new(),
        }
    }

    /// Starts numbering epochs at `epoch` (a primary that took over in a switchover).
    pub fn starting_at(mut self, epoch: u64) -> Self {
        self.epoch = epoch.max(1);
        self
    }

    /// The epoch now open.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Makes the checkpoints the channel asks for through `port`.
    pub fn with_checkpoints(mut self, port: VcpuPort) -> Self {
        self.checkpoints = Some(port);
        self
    }

    /// Keeps the dirty set of the epoch just closed for repairs, and passes it to a running
    /// sync.
    fn note_dirty(&mut self, epoch: u64, dirty: Vec<u64>, blocks: Vec<DiskBlock>) {
        let Some(port) = &self.checkpoints else {
            return;
        };
        port.tracking.note(&dirty);
        port.tracking.note_blocks(&blocks);
        if !port.tracking.protected() {
            self.unverified_dirty.clear();
            return;
        }
        let verified = port.tracking.verified();
        while self
            .unverified_dirty
            .front()
            .is_some_and(|(e, ..)| *e <= verified)
        {
            self.unverified_dirty.pop_front();
        }
        self.unverified_dirty.push_back((epoch, dirty, blocks));
    }

    /// Makes the checkpoint `request` at exit `seq` (the vCPU is stopped there), closing the
    /// open epoch: the records so far, the pages, then the state go out in that order.
    /// `run_end`: the guest has already stopped.
    pub fn checkpoint(
        &mut self,
        vm: &mut Vm,
        seq: ExitSeq,
        request: VcpuRequest,
        run_end: Option<StopRequest>,
    ) -> Result<(), RecordError> {
        let Some(port) = self.checkpoints.clone() else {
            return Ok(());
        };
        if request == VcpuRequest::Switchover {
            // Not a checkpoint: `record` returns at the switchover's pause.
            return Ok(());
        }
        let stopped = Instant::now();
        self.flush(seq)?;
        let dirty_now = vm.take_dirty_pages()?;
        let blocks_now = vm.take_dirty_blocks();
        let mut differ = Vec::new();
        let mut differ_not_mine = Vec::new();
        // Page hashes the repair's filter computed, reused by the checkpoint digest.
        let mut known = std::collections::BTreeMap::new();
        let (send, covered, blocks) = match &request {
            VcpuRequest::Repair {
                from_epoch,
                standby_dirty,
                standby_blocks,
                ..
            } => {
                // What this side dirtied since the boundary: every unverified epoch from the
                // standby's first unverified one, and the open epoch.
                let mut pages: BTreeSet<u64> = dirty_now.iter().copied().collect();
                let mut written: BTreeSet<DiskBlock> = blocks_now.into_iter().collect();
                for (_, p, b) in self
                    .unverified_dirty
                    .iter()
                    .filter(|(e, ..)| e >= from_epoch)
                {
                    pages.extend(p.iter().copied());
                    written.extend(b.iter().copied());
                }
                let plan = repair::plan_pages(vm, pages, standby_dirty)?;
                differ = plan.differ;
                differ_not_mine = plan.differ_not_mine;
                known = plan.hashes;
                (
                    plan.send,
                    plan.covered,
                    repair::plan_blocks(vm, written, standby_blocks)?,
                )
            }
            VcpuRequest::Switchover => return Ok(()),
            VcpuRequest::StopAndCopy { .. } => {
                // Every page dirtied since the pre-copy read it, and every disk block the
                // guest wrote since the standby's disk resync compared it.
                let mut pages = port.tracking.take_sync();
                pages.extend(dirty_now.iter().copied());
                let pages: Vec<u64> = pages.into_iter().collect();
                let mut written = port.tracking.take_sync_blocks();
                written.extend(blocks_now.iter().copied());
                let written: Vec<DiskBlock> = written.into_iter().collect();
                let blocks = repair::BlockRepair {
                    send: written.clone(),
                    covered: written,
                };
                (pages.clone(), pages, blocks)
            }
        };
        let id = request.id();
        let mut page_bytes = 0;
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for chunk in send.chunks(PAGES_PER_CHUNK) {
            let mut pages = Vec::with_capacity(chunk.len());
            for &pfn in chunk {
                vm.read_page(pfn, &mut buf)?;
                let data = if is_zero_page(&buf) {
                    Vec::new()
                } else {
                    buf.clone()
                };
                page_bytes += data.len() as u64;
                pages.push(Page { pfn, data });
            }
            port.feed
                .send(FromVcpu::Pages(PageChunk {
                    checkpoint: id,
                    pages,
                    stopped: true,
                    round: 0,
                    remaining_pages: 0,
                    blocks: Vec::new(),
                }))
                .map_err(RecordError::Log)?;
        }
        let block_bytes = repair::send_blocks(vm, id, &blocks, &port.feed)?;
        let state = vm.save()?;
        repair::log_differing(&differ, &differ_not_mine, &state);
        let digest = state_digest_with(vm, &covered, &blocks.covered, &known)?;
        let sync = matches!(request, VcpuRequest::StopAndCopy { .. });
        let run_end = run_end.map(to_run_end);
        let sent = send.len();
        let covered_pages = covered.len();
        port.feed
            .send(FromVcpu::CheckpointEnd(CheckpointEnd {
                checkpoint: id,
                epoch: self.epoch,
                exit_seq: seq.0,
                vm_state: ftvm_vmm::state::encode(&state),
                digest: digest.to_vec(),
                pages: send.len() as u64,
                page_bytes,
                blocks: blocks.send.len() as u64,
                sync,
                run_end,
            }))
            .map_err(RecordError::Log)?;
        // What the benchmarks read: pages sent next to the pages a full dirty-set
        // checkpoint would send, and how long the guest was stopped.
        tracing::debug!(
            checkpoint = id,
            epoch = self.epoch,
            exit_seq = seq.0,
            sent,
            page_bytes,
            covered = covered_pages,
            blocks = blocks.send.len(),
            block_bytes,
            covered_blocks = blocks.covered.len(),
            sync,
            pause_us = stopped.elapsed().as_micros() as u64,
            "checkpoint made"
        );
        // The checkpoint is the new boundary both VMs start from, KVM's mappings of guest
        // memory included: the standby drops its own where it installs this (DESIGN.md §2,
        // "Dirty sets"). The vCPU is stopped and this epoch's dirty pages were taken above.
        vm.drop_guest_mappings()?;
        self.unverified_dirty.clear();
        self.stats.epochs += 1;
        self.epoch += 1;
        self.output_waiting = false;
        self.checkpoint_required = false;
        self.epoch_started = Instant::now();
        Ok(())
    }

    /// After the guest stopped: makes the checkpoints the channel still asks for (a standby
    /// that diverged in the last epoch) until the channel thread is done.
    pub fn serve_after_end(&mut self, vm: &mut Vm, stop: StopRequest) -> Result<(), RecordError> {
        let Some(port) = self.checkpoints.clone() else {
            return Ok(());
        };
        while let Ok(request) = port.requests.recv() {
            if request == VcpuRequest::Switchover {
                // Too late for a switchover: the run is over.
                continue;
            }
            self.checkpoint(vm, vm.exit_seq(), request, Some(stop))?;
        }
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> RecordStats {
        self.stats
    }

    /// Takes a request from the channel thread, if one is waiting: the vCPU pauses for it.
    fn take_request(&mut self) -> bool {
        let Some(port) = &self.checkpoints else {
            return false;
        };
        match port.requests.try_recv() {
            Ok(request) => {
                self.requested = Some(request);
                true
            }
            Err(_) => false,
        }
    }

    /// The sink.
    pub fn into_sink(self) -> S {
        self.sink
    }

    fn push(&mut self, at: Point, kind: Kind) {
        let (exit_seq, at_kick) = at.log_position();
        tracing::trace!(exit_seq, at_kick, ?kind, "record");
        self.records.push(Record {
            exit_seq,
            at_kick,
            kind: Some(kind),
        });
    }

    fn flush(&mut self, complete_through: ExitSeq) -> Result<(), RecordError> {
        self.last_flush = Instant::now();
        self.shipped_through = complete_through.0;
        self.stats.records += self.records.len() as u64;
        let batch = RecordBatch {
            complete_through: complete_through.0,
            records: std::mem::take(&mut self.records),
            packed: Default::default(),
        };
        match self.closing.take() {
            Some(closing) => self.sink.write_epoch(batch, closing),
            None => self.sink.write_batch(batch),
        }
        .map_err(RecordError::Log)
    }

    /// Closes the epoch at exit `seq`: digest, `EpochEnd`, and the batch goes out.
    pub fn end_epoch(&mut self, vm: &mut Vm, seq: ExitSeq) -> Result<(), RecordError> {
        self.close_epoch(vm, seq)?;
        self.flush(seq)?;
        self.epoch_started = Instant::now();
        Ok(())
    }

    /// Appends the `EpochEnd` of the epoch ending at exit `seq`.
    fn close_epoch(&mut self, vm: &mut Vm, seq: ExitSeq) -> Result<(), RecordError> {
        self.closing = Some(Instant::now());
        let digest = epoch_digest(vm)?;
        let dirty_pages = digest.dirty_pages.clone();
        let dirty_blocks = digest.dirty_blocks.clone();
        self.push(
            Point::Exit(seq),
            Kind::EpochEnd(log::EpochEnd {
                epoch: self.epoch,
                exit_seq: seq.0,
                digest: digest.digest.to_vec(),
                checkpoint_required: self.checkpoint_required,
            }),
        );
        tracing::debug!(
            epoch = self.epoch,
            exit_seq = seq.0,
            dirty = digest.dirty_pages.len(),
            checkpoint_required = self.checkpoint_required,
            "epoch end"
        );
        self.stats.epochs += 1;
        self.stats.checkpoint_required += u64::from(self.checkpoint_required);
        self.note_dirty(self.epoch, dirty_pages, dirty_blocks);
        self.epoch += 1;
        self.output_waiting = false;
        self.checkpoint_required = false;
        Ok(())
    }

    /// Closes the last epoch at the exit `seq` where the guest stopped, records how the run
    /// ended, and ships the rest of the log in one batch.
    pub fn finish(
        &mut self,
        vm: &mut Vm,
        seq: ExitSeq,
        stop: StopRequest,
    ) -> Result<(), RecordError> {
        self.close_epoch(vm, seq)?;
        self.push(Point::Exit(seq), Kind::RunEnd(to_run_end(stop)));
        self.flush(seq)
    }

    /// Ships what was recorded so far without closing the epoch (before reporting an error,
    /// so the log holds everything up to it).
    pub fn flush_partial(&mut self, seq: ExitSeq) -> Result<(), RecordError> {
        self.flush(seq)
    }
}

/// Why [`record`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEnd {
    /// The guest stopped.
    Stopped(StopRequest),
    /// A switchover: the epoch was closed at the current exit and the VM is paused there.
    Switchover,
}

/// Runs `vm` under `recorder` until the guest stops (or a switchover pauses it), closing
/// epochs and making checkpoints as the recorder asks.
pub fn record<H: ExitHook, S: LogSink>(
    vm: &mut Vm,
    recorder: &mut Recorder<H, S>,
) -> Result<RecordEnd, RecordError>
where
    RecordError: From<H::Error>,
{
    loop {
        match vm.run(recorder) {
            Ok(RunEnd::Paused(seq)) => match recorder.requested.take() {
                Some(VcpuRequest::Switchover) => {
                    recorder.end_epoch(vm, seq)?;
                    return Ok(RecordEnd::Switchover);
                }
                Some(request) => recorder.checkpoint(vm, seq, request, None)?,
                None => recorder.end_epoch(vm, seq)?,
            },
            Ok(RunEnd::Stopped(stop)) => {
                recorder.finish(vm, vm.exit_seq(), stop)?;
                return Ok(RecordEnd::Stopped(stop));
            }
            Err(e) => {
                // Keep what was recorded up to the failure; the failure itself is what
                // the caller reports.
                if let Err(log_error) = recorder.flush_partial(vm.exit_seq()) {
                    tracing::warn!("{log_error}");
                }
                return Err(e.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairs_stream_interval_is_a_sixteenth_of_its_latency_bound_within_limits() {
        let ms = Duration::from_millis;
        assert_eq!(pair_stream_interval(ms(4)), Duration::from_micros(250));
        assert_eq!(pair_stream_interval(ms(50)), Duration::from_micros(3125));
        assert_eq!(pair_stream_interval(ms(0)), Duration::from_micros(50));
        assert_eq!(pair_stream_interval(ms(30_000)), DEFAULT_MAX_EPOCH);
    }
}
