//! The primary's side of a sync (re-protection, DESIGN.md §4): iterative pre-copy of guest
//! memory while the guest runs. Round 1 sends every non-zero page (the standby's new VM is
//! zeroed); each later round sends the pages the guest dirtied since the previous round read
//! them, until what is left is small enough for a short stop-and-copy, which the vCPU thread
//! makes as a checkpoint ([`VcpuRequest::StopAndCopy`]).
//!
//! [`VcpuRequest::StopAndCopy`]: crate::checkpoint::VcpuRequest::StopAndCopy

use std::time::{Duration, Instant};

use ftvm_proto::channel::{Page, PageChunk};
use ftvm_vmm::memory::{self, GuestMemory, PAGE_SIZE};

use crate::checkpoint::{DirtyTracking, PAGES_PER_CHUNK};

/// Stop and copy once a round would send at most this many pages (4 MiB).
pub const STOP_AND_COPY_PAGES: usize = 1024;
/// Stop and copy after this many rounds even if the guest dirties memory faster than it
/// can be sent.
pub const MAX_ROUNDS: u32 = 8;

/// Pages one step reads at most (8 MiB), so the event loop that runs the pre-copy keeps
/// its heartbeats going even over long stretches of zero pages.
pub const PAGES_READ_PER_STEP: usize = 2048;

/// What the pre-copy does next.
#[derive(Debug)]
pub enum Step {
    /// Send this chunk.
    Chunk(PageChunk),
    /// Pages were read and all were zero: nothing to send this step.
    Skipped,
    /// Pre-copy is done: ask the vCPU thread for the stop-and-copy checkpoint.
    StopAndCopy,
}

/// A running pre-copy.
pub struct PreCopy {
    /// The checkpoint id the sync ends with.
    pub id: u64,
    memory: GuestMemory,
    /// Current round (1 = every page).
    pub round: u32,
    queue: Vec<u64>,
    next: usize,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Page bytes sent so far (zero pages count nothing).
    pub bytes_sent: u64,
    /// When the sync started.
    pub started: Instant,
    last_report: Instant,
    /// The stop-and-copy was asked for.
    pub stopping: bool,
    /// The stop-and-copy checkpoint's end went out: the standby follows the log from it.
    pub end_sent: bool,
    /// Page chunks sent in this sync, over all its connections (the standby counts the
    /// same way: what it reports applied after a reconnect is a prefix of these).
    pub chunks: u64,
    /// The pages of each chunk sent, by chunk number, for a resume.
    sent: Vec<(u64, Vec<u64>)>,
}

impl PreCopy {
    /// Starts a pre-copy of `memory`; dirty pages are tracked from now on.
    pub fn start(id: u64, memory: GuestMemory, tracking: &DirtyTracking) -> Self {
        tracking.start_sync();
        let queue: Vec<u64> = memory::all_pages(&memory).collect();
        let now = Instant::now();
        Self {
            id,
            memory,
            round: 1,
            queue,
            next: 0,
            pages_sent: 0,
            bytes_sent: 0,
            started: now,
            last_report: now,
            stopping: false,
            end_sent: false,
            chunks: 0,
            sent: Vec::new(),
        }
    }

    /// A chunk of this sync went out (a pre-copy chunk, or one the vCPU thread made for the
    /// stop-and-copy).
    pub fn note_chunk(&mut self, pages: &[Page]) {
        self.chunks += 1;
        self.sent
            .push((self.chunks, pages.iter().map(|p| p.pfn).collect()));
    }

    /// The standby reconnected having applied the first `applied` chunks: everything sent
    /// after them goes out again (with what the guest dirtied meanwhile, which the dirty
    /// tracking kept), and a stop-and-copy that was under way is made again.
    pub fn resume(&mut self, applied: u64) {
        let mut again: Vec<u64> = Vec::new();
        for (_, pages) in self.sent.iter().filter(|(n, _)| *n > applied) {
            again.extend(pages);
        }
        self.sent.retain(|(n, _)| *n <= applied);
        self.chunks = applied.min(self.chunks);
        again.extend_from_slice(&self.queue[self.next..]);
        again.sort_unstable();
        again.dedup();
        tracing::warn!(
            applied,
            resend = again.len(),
            round = self.round,
            "sync resumed"
        );
        self.queue = again;
        self.next = 0;
        self.stopping = false;
        self.end_sent = false;
    }

    /// Pages left in the current round.
    pub fn remaining(&self) -> u64 {
        (self.queue.len() - self.next) as u64
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        memory::page_count(&self.memory) * PAGE_SIZE
    }

    /// The next step. Round 1 skips zero pages; later rounds send them as empty pages (the
    /// standby may hold an older, non-zero copy).
    pub fn step(&mut self, tracking: &DirtyTracking) -> Result<Step, memory::MemoryError> {
        if self.next == self.queue.len() {
            let dirty = tracking.take_sync();
            if dirty.len() <= STOP_AND_COPY_PAGES || self.round >= MAX_ROUNDS {
                // The vCPU thread takes what is left, with what it dirties until it stops.
                tracking.note(&dirty.into_iter().collect::<Vec<_>>());
                self.stopping = true;
                tracing::info!(
                    round = self.round,
                    pages = self.pages_sent,
                    bytes = self.bytes_sent,
                    memory_bytes = self.memory_bytes(),
                    elapsed_us = self.started.elapsed().as_micros() as u64,
                    "pre-copy done; stop-and-copy"
                );
                return Ok(Step::StopAndCopy);
            }
            self.round += 1;
            tracing::info!(
                round = self.round,
                pages = dirty.len(),
                "pre-copy: next round resends the pages dirtied meanwhile"
            );
            self.queue = dirty.into_iter().collect();
            self.next = 0;
        }
        let mut pages = Vec::with_capacity(PAGES_PER_CHUNK);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut read = 0;
        while pages.len() < PAGES_PER_CHUNK
            && self.next < self.queue.len()
            && read < PAGES_READ_PER_STEP
        {
            let pfn = self.queue[self.next];
            self.next += 1;
            read += 1;
            memory::read_page(&self.memory, pfn, &mut buf)?;
            let zero = memory::is_zero_page(&buf);
            if zero && self.round == 1 {
                continue;
            }
            self.pages_sent += 1;
            let data = if zero { Vec::new() } else { buf.clone() };
            self.bytes_sent += data.len() as u64;
            pages.push(Page { pfn, data });
        }
        if self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                round = self.round,
                sent_mib = self.bytes_sent >> 20,
                left_pages = self.remaining(),
                mib_per_s = format!("{:.1}", self.bytes_sent as f64 / secs / f64::from(1 << 20)),
                "pre-copy"
            );
        }
        if pages.is_empty() {
            return Ok(Step::Skipped);
        }
        self.note_chunk(&pages);
        Ok(Step::Chunk(PageChunk {
            checkpoint: self.id,
            pages,
            stopped: false,
            round: self.round,
            remaining_pages: self.remaining(),
            blocks: Vec::new(),
        }))
    }
}
