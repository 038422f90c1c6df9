//! A standby that joins the running guest (re-protection, DESIGN.md §4): its sync runs here
//! as a pre-copy ([`PreCopy`]) while the guest runs, then the vCPU thread makes the
//! stop-and-copy checkpoint. A sync whose connection dropped is kept for a while, so the
//! standby can reconnect and resume where it stopped.

use std::time::{Duration, Instant};

use ftvm_proto::channel::{Ready, Start};
use ftvm_vmm::memory::GuestMemory;

use ftvm_proto::channel::message::Body;

use super::core::{Attached, PrimaryCore};
use super::repair::PendingCheckpoint;
use super::PAUSED_SYNC_KEPT;
use crate::checkpoint::{DirtyTracking, VcpuRequest};
use crate::link::Heartbeat;
use crate::sync::{PreCopy, Step};

/// Syncs: the one running, or the one paused by a dropped connection.
pub(super) struct Join {
    /// Guest memory, which the pre-copy reads while the guest runs.
    memory: GuestMemory,
    /// What a joining standby is sent first.
    pub start: Start,
    /// The sync of the standby attached now, while it runs.
    pub sync: Option<PreCopy>,
    /// A sync whose connection dropped, kept for the standby to resume, since when.
    paused: Option<(PreCopy, Instant)>,
}

impl Join {
    pub fn new(memory: GuestMemory, start: Start) -> Self {
        Self {
            memory,
            start,
            sync: None,
            paused: None,
        }
    }

    /// A standby that finished its handshake attaches: resume its paused sync if it names
    /// it, else start a new one whose checkpoint id `new_id` makes.
    pub fn attach(
        &mut self,
        ready: &Ready,
        new_id: impl FnOnce() -> u64,
        tracking: &DirtyTracking,
    ) {
        if let Some((mut sync, _)) = self.paused.take() {
            if ready.resume_checkpoint == sync.id {
                sync.resume(ready.chunks_applied);
                self.sync = Some(sync);
                return;
            }
            // Another standby's paused sync is dropped: the new sync restarts page tracking
            // and keeps the disk blocks tracked since this standby's resync began.
        }
        let sync = PreCopy::start(new_id(), self.memory.clone(), tracking);
        tracing::info!(
            memory_mib = sync.memory_bytes() >> 20,
            "standby joined: syncing guest memory while the guest runs"
        );
        self.sync = Some(sync);
    }

    /// Whether page `pfn` is guest RAM.
    pub fn is_ram(&self, pfn: u64) -> bool {
        ftvm_vmm::memory::holds_page(&self.memory, pfn)
    }

    /// The standby syncing now (if any) is still syncing: it has no copy of the guest yet.
    pub fn syncing(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| !s.end_sent)
    }

    /// The pre-copy has pages to send.
    pub fn copying(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| !s.stopping)
    }

    /// The standby was lost: keep a sync that can resume (not once the stop-and-copy is
    /// under way: that checkpoint is abandoned, and a standby that comes back starts anew).
    pub fn standby_lost(&mut self, ended: bool, now: Instant, tracking: &DirtyTracking) {
        match self.sync.take() {
            Some(sync) if !ended && !sync.stopping => {
                tracing::warn!(
                    "the standby was lost during its sync; keeping the sync for {:?} for it to reconnect",
                    PAUSED_SYNC_KEPT
                );
                self.paused = Some((sync, now));
            }
            _ => tracking.stop_sync(),
        }
    }

    /// The guest run is over: a paused sync can never finish.
    pub fn run_ended(&mut self, tracking: &DirtyTracking) {
        if self.paused.take().is_some() {
            tracking.stop_sync();
        }
    }

    /// How long from `now` until a paused sync expires (None: none is paused).
    pub fn until_expiry(&self, now: Instant) -> Option<Duration> {
        self.paused
            .as_ref()
            .map(|(_, since)| (*since + PAUSED_SYNC_KEPT).saturating_duration_since(now))
    }

    /// Drops a paused sync whose standby did not come back in time.
    pub fn expire(&mut self, now: Instant, tracking: &DirtyTracking) {
        if self
            .paused
            .as_ref()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= PAUSED_SYNC_KEPT)
        {
            tracing::warn!("the standby did not reconnect: its sync is abandoned");
            self.paused = None;
            tracking.stop_page_sync();
        }
    }

    /// The sync's stop-and-copy is installed: it is over.
    pub fn finished(&mut self, tracking: &DirtyTracking) {
        self.sync = None;
        tracking.stop_sync();
    }

    /// The sync's progress: (page bytes sent, pages left in the round).
    pub fn progress(&self) -> Option<(u64, u64)> {
        self.sync.as_ref().map(|s| (s.bytes_sent, s.remaining()))
    }

    /// The sync, for `ftvm status`.
    pub fn describe(&self) -> Option<String> {
        self.sync.as_ref().map(|s| {
            format!(
                "syncing: round {}, {} MiB sent, {} pages left in the round",
                s.round,
                s.bytes_sent >> 20,
                s.remaining()
            )
        })
    }
}

/// Joining standbys, as the core runs them.
impl PrimaryCore {
    /// Whether a joining standby may attach now; the reason if not.
    pub fn accepts_standby(&self) -> Result<(), &'static str> {
        if self.lifecycle.ended {
            Err("the guest run is over")
        } else if self.standby.is_some() {
            Err("a standby is already attached")
        } else if self.arbitrating() {
            Err("this primary waits for the arbiter")
        } else {
            Ok(())
        }
    }

    /// A joining standby at `peer` finished its handshake (agreeing on `heartbeat`) and is
    /// ready: start (or resume) its sync.
    pub fn attach(&mut self, peer: String, heartbeat: Heartbeat, ready: &Ready, now: Instant) {
        // A standby lost a moment ago may not be told yet: a new one does not wait for that
        // (it syncs unprotected anyway); what was held for the lost one goes out now.
        self.standby_told();
        self.peer = peer;
        self.heartbeat = heartbeat;
        self.standby = Some(Attached::new(heartbeat, now));
        self.tracking.set_protected(true);
        self.protection.attached();
        let checkpoints = &mut self.checkpoints;
        self.join
            .attach(ready, || checkpoints.next_id(), &self.tracking);
    }

    /// The pre-copy has pages to send (the event loop calls [`Self::precopy_step`] while
    /// the socket has room).
    pub fn precopy_pending(&self) -> bool {
        self.standby.is_some() && self.join.copying()
    }

    /// One step of the pre-copy: a chunk to send, or the stop-and-copy asked of the vCPU
    /// thread. Returns false when the step sent nothing (it read zero pages only).
    pub fn precopy_step(&mut self, now: Instant) -> bool {
        let Some(sync) = &mut self.join.sync else {
            return false;
        };
        match sync.step(&self.tracking) {
            Ok(Step::Skipped) => false,
            Ok(Step::Chunk(chunk)) => {
                self.send(Body::Pages(chunk), now);
                true
            }
            Ok(Step::StopAndCopy) => {
                let id = sync.id;
                if self.ask_vcpu(VcpuRequest::StopAndCopy { id }, now) {
                    self.checkpoints.pending = Some(PendingCheckpoint {
                        id,
                        epoch: None,
                        sync: true,
                        asked: now,
                        why: "stop-and-copy of a sync".into(),
                    });
                }
                true
            }
            Err(e) => {
                self.lose(format!("pre-copy cannot read guest memory: {e}"), now);
                true
            }
        }
    }

    /// What a joining standby is sent first.
    pub fn start_message(&self) -> &Start {
        &self.join.start
    }
}
