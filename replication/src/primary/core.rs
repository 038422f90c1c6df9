//! [`PrimaryCore`]: the primary's side of the pair protocol as a state machine. Events go in
//! through its methods, each with the time it happened; what the event loop must do comes
//! out of [`PrimaryCore::poll_action`]. No socket, thread or clock is touched here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ftvm_proto::channel::{message::Body, Ack, Message, Released, Start};
use ftvm_proto::log::{record::Kind, RecordBatch};
use ftvm_vmm::memory::GuestMemory;

use super::backpressure::Backlog;
use super::join::Join;
use super::protection::Protection;
use super::repair::Checkpoints;
use super::switchover::Switchover;
use super::{FromVcpu, PrimaryReport};
use crate::arbiter::Arbiter;
use crate::checkpoint::{DirtyTracking, VcpuControl, VcpuRequest};
use crate::link::{body_name, ChannelError, Heartbeat};
use crate::liveness::{Beat, Liveness};
use crate::position::Position;
use crate::telemetry::Timings;

/// What the event loop must do for the core, in order.
#[derive(Debug)]
// Actions live for one turn in one Vec; boxing the message would cost an allocation for
// every record batch sent, to save bytes on a few short-lived values.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Send this message to the standby.
    Send(Message),
    /// Output bytes `seq..seq + bytes.len()` of `epoch` may leave the VM now.
    Release {
        /// The epoch that produced them.
        epoch: u64,
        /// Output sequence number of the first byte.
        seq: u64,
        /// The bytes.
        bytes: Vec<u8>,
        /// Why they may leave (`verified held_ns=…`, `unprotected`), for the audit trail.
        why: String,
    },
    /// A line for the audit trail (`FTVM_AUDIT`).
    Audit(String),
    /// The standby is dropped: send it `Abandon { reason }` (so it knows this primary lives
    /// on and never goes live from this pair), then close the connection once that is
    /// flushed (bounded). DESIGN.md §5.
    Abandon(String),
    /// The switchover is complete on this side: flush what is queued (the `Switchover`
    /// message) and hand the connection to the vCPU thread, then call
    /// [`PrimaryCore::handed_over`] (or [`PrimaryCore::link_failed`]).
    HandOver {
        /// The last epoch, verified by both.
        epoch: u64,
        /// Its last exit.
        exit_seq: u64,
        /// Every output byte before this was released.
        output_seq: u64,
    },
    /// Tell the vCPU thread, stopped for a switchover, to run on as the primary.
    RefuseHandover(String),
    /// Claim term `expected_term + 1` of `vm_id` at the witness; its outcome goes to
    /// [`PrimaryCore::claim_result`].
    Claim {
        /// The protected VM's id at the witness.
        vm_id: String,
        /// The term this primary knows.
        expected_term: u64,
    },
    /// The standby won the term: stop the guest now, release nothing held, exit non-zero
    /// (fencing, DESIGN.md §5). Why, for stderr.
    Fence(String),
}

/// How the core is set up.
pub struct CoreConfig {
    /// Heartbeats and the failure detector.
    pub heartbeat: Heartbeat,
    /// Produce [`Action::Audit`] lines.
    pub audit: bool,
    /// Guest memory, which a sync's pre-copy reads.
    pub memory: GuestMemory,
    /// What a joining standby is sent first.
    pub start: Start,
    /// Where the run starts (after epoch 0 and output 0 at boot).
    pub after: Position,
    /// Requests to the vCPU thread.
    pub vcpu: VcpuControl,
    /// Dirty pages, shared with the vCPU thread.
    pub tracking: DirtyTracking,
    /// With a witness: the protected VM's id there and the term now.
    pub arbiter: Option<Arbiter>,
}

/// The standby attached now.
pub(super) struct Attached {
    pub(super) liveness: Liveness,
    /// The highest epoch it said it received (`Received(k)`, the `received_epoch` of an Ack).
    pub(super) received: u64,
}

impl Attached {
    pub(super) fn new(heartbeat: Heartbeat, now: Instant) -> Self {
        Self {
            liveness: Liveness::new(heartbeat, now),
            received: 0,
        }
    }
}

/// The primary's side of the pair protocol.
pub struct PrimaryCore {
    pub(super) standby: Option<Attached>,
    /// The last standby's address (kept after it is lost, for `ftvm status`).
    pub(super) peer: String,
    pub(super) heartbeat: Heartbeat,
    pub(super) audit: bool,
    /// The epoch now open on the vCPU thread (output is produced in it).
    pub(super) epoch: u64,
    /// The last exit the log shipped covers.
    pub(super) exit_seq: u64,
    pub(super) protection: Protection,
    pub(super) join: Join,
    pub(super) checkpoints: Checkpoints,
    pub(super) switchover: Switchover,
    pub(super) vcpu: VcpuControl,
    pub(super) tracking: DirtyTracking,
    pub(super) lifecycle: Lifecycle,
    pub(super) report: PrimaryReport,
    /// The witness, if there is one.
    pub(super) arbiter: Option<Arbiter>,
    /// Without a witness: since when output is held until the lost standby's host holds
    /// `Abandon` (DESIGN.md §5), and why it was lost.
    pub(super) telling: Option<(Instant, String)>,
    pub(super) actions: VecDeque<Action>,
    /// Ack latencies and output delays measured, until the driver takes them.
    pub(super) timings: Timings,
}

/// How far the run is.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Lifecycle {
    /// The vCPU thread said the guest run is over (or is gone).
    pub(super) ended: bool,
    /// The log's `RunEnd` went out: the vCPU thread's `End` follows.
    pub(super) run_end_shipped: bool,
    /// The connection was handed over: this side is done.
    pub(super) handed_over: bool,
}

impl PrimaryCore {
    /// A primary whose standby is `standby` (its address) or, with `Err(why)`, that runs
    /// unprotected from the start.
    pub fn new(config: CoreConfig, standby: Result<String, String>, now: Instant) -> Self {
        let (attached, peer, lost) = match standby {
            Ok(peer) => (Some(Attached::new(config.heartbeat, now)), peer, None),
            Err(why) => (None, String::new(), Some(why)),
        };
        config.tracking.set_protected(attached.is_some());
        Self {
            standby: attached,
            peer,
            heartbeat: config.heartbeat,
            audit: config.audit,
            epoch: config.after.epoch + 1,
            exit_seq: 0,
            protection: Protection::new(config.after.output_seq),
            join: Join::new(config.memory, config.start),
            checkpoints: Checkpoints::new(),
            switchover: Switchover::default(),
            vcpu: config.vcpu,
            tracking: config.tracking,
            lifecycle: Lifecycle::default(),
            report: PrimaryReport {
                lost,
                ..Default::default()
            },
            arbiter: config.arbiter,
            telling: None,
            actions: VecDeque::new(),
            timings: Timings::default(),
        }
    }

    /// The next thing the event loop must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The ack latencies and output delays measured since the last call (for the metrics).
    pub fn take_timings(&mut self) -> Timings {
        std::mem::take(&mut self.timings)
    }

    /// A standby is attached (syncing or in lockstep).
    pub fn attached(&self) -> bool {
        self.standby.is_some()
    }

    /// A standby is attached and has a copy of the guest (it is not syncing).
    pub fn protecting(&self) -> bool {
        self.standby.is_some() && !self.join.syncing()
    }

    /// Heartbeats and the failure detector.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }

    /// What the channel measured so far.
    pub fn report(&self) -> &PrimaryReport {
        &self.report
    }

    /// The guest run is over on the vCPU thread.
    pub fn ended(&self) -> bool {
        self.lifecycle.ended
    }

    /// The log's `RunEnd` went out (the vCPU thread's `End` follows).
    pub fn run_end_shipped(&self) -> bool {
        self.lifecycle.run_end_shipped
    }

    /// Nothing is left to do: the connection was handed over, or the run is over and every
    /// output was released (with the standby having verified everything, if there is one).
    pub fn done(&self) -> bool {
        self.lifecycle.handed_over
            || self.lifecycle.ended
                && !self.arbitrating()
                && self.telling.is_none()
                && (self.standby.is_none()
                    || self.protection.settled() && self.checkpoints.pending.is_none())
    }

    /// The run is over: the final report.
    pub fn finish(&mut self) -> PrimaryReport {
        self.report.protected_to_end = self.standby.is_some();
        tracing::info!(
            epochs = self.report.epochs,
            verified_epoch = self.report.verified_epoch,
            protected = self.report.protected_to_end,
            "guest run over; every output released"
        );
        std::mem::take(&mut self.report)
    }

    /// How long the event loop may wait from `now` before it must call [`Self::tick`].
    pub fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let beat = self
            .standby
            .as_ref()
            .map(|s| s.liveness.until_next_heartbeat(now));
        [
            beat,
            self.arbiter.as_ref().and_then(|a| a.until_retry(now)),
            self.join.until_expiry(now),
            self.telling_deadline()
                .map(|t| t.saturating_duration_since(now)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(super) fn send(&mut self, body: Body, now: Instant) {
        if let Some(s) = &mut self.standby {
            s.liveness.spoke(now);
            self.actions
                .push_back(Action::Send(Message { body: Some(body) }));
        }
    }

    pub(super) fn audit(&mut self, line: impl FnOnce() -> String) {
        if self.audit {
            self.actions.push_back(Action::Audit(line()));
        }
    }

    // ---- the vCPU thread ----

    /// The vCPU thread handed over `msg` at `now`.
    pub fn on_vcpu(&mut self, msg: FromVcpu, now: Instant) {
        match msg {
            FromVcpu::Batch(b) => self.ship(b, None, now),
            FromVcpu::Epoch { batch, closing } => self.ship(batch, Some(closing), now),
            FromVcpu::Output(bytes) => self.output(bytes, now),
            FromVcpu::Pages(chunk) => self.pages(chunk, now),
            FromVcpu::CheckpointEnd(end) => self.checkpoint_end(end, now),
            FromVcpu::Stopped { epoch, exit_seq } => self.stopped(epoch, exit_seq),
            FromVcpu::End => {
                tracing::debug!("guest run over");
                self.lifecycle.ended = true;
                if self.join.sync.is_some() {
                    self.lose(
                        "the guest run ended while the standby was syncing".into(),
                        now,
                    );
                }
                self.join.run_ended(&self.tracking);
            }
        }
    }

    /// The vCPU thread is gone (its end of the channel closed).
    pub fn vcpu_gone(&mut self) {
        self.lifecycle.ended = true;
    }

    /// Sends `batch` to the standby; `closing`: when the vCPU thread began to close the
    /// epoch the batch ends (for the audit trail's latency breakdown).
    fn ship(&mut self, batch: RecordBatch, closing: Option<Instant>, now: Instant) {
        self.exit_seq = batch.complete_through;
        let protecting = self.protecting();
        for r in &batch.records {
            self.lifecycle.run_end_shipped |= matches!(r.kind, Some(Kind::RunEnd(_)));
            if let Some(Kind::EpochEnd(e)) = &r.kind {
                self.epoch = e.epoch + 1;
                self.report.epochs = e.epoch;
                if protecting {
                    self.protection.shipped(e.epoch, now);
                    let (epoch, exit_seq) = (e.epoch, e.exit_seq);
                    self.audit(|| {
                        let closing_ns = closing.map_or(0, |t| crate::audit::ns_before(now, t));
                        format!("shipped epoch={epoch} exit_seq={exit_seq} closing_ns={closing_ns}")
                    });
                }
            }
        }
        // A syncing standby has no copy of the guest to apply the log to: it starts from
        // the stop-and-copy checkpoint.
        if protecting {
            let batch = ftvm_proto::packed::pack_batch(batch);
            self.protection
                .log_bytes(prost::Message::encoded_len(&batch));
            self.send(Body::Batch(batch), now);
        }
    }

    fn output(&mut self, bytes: Vec<u8>, now: Instant) {
        // While a claim is under way nothing leaves: the standby may win the term. Nor
        // while the lost standby may not know it was abandoned.
        if self.protecting() || self.arbitrating() || self.telling.is_some() {
            self.protection.buffer.hold(self.epoch, bytes, now);
        } else {
            let seq = self.protection.buffer.produced();
            self.protection.buffer.pass_through(bytes.len());
            self.actions.push_back(Action::Release {
                epoch: self.epoch,
                seq,
                bytes,
                why: "unprotected".into(),
            });
        }
    }

    /// Hands `request` to the vCPU thread; false (and unprotected) if it is gone.
    pub(super) fn ask_vcpu(&mut self, request: VcpuRequest, now: Instant) -> bool {
        let sent = self.vcpu.ask(request);
        if !sent {
            self.lose(
                "the vCPU thread is gone: no checkpoint can be made".into(),
                now,
            );
        }
        sent
    }

    // ---- the standby ----

    /// Bytes from the standby arrived at `now`.
    pub fn heard(&mut self, now: Instant) {
        if let Some(s) = &mut self.standby {
            s.liveness.heard(now);
        }
    }

    /// A message from the standby.
    pub fn on_message(&mut self, msg: Message, now: Instant) {
        if self.standby.is_none() {
            return;
        }
        match msg.body {
            Some(Body::Heartbeat(_)) => {}
            Some(Body::Ack(ack)) => self.ack(ack, now),
            Some(Body::Diverged(d)) => self.repair(d, now),
            body => {
                let got = body_name(&Message { body }).to_string();
                self.link_failed(
                    ChannelError::Unexpected {
                        peer: self.peer.clone(),
                        expected: "Ack, Diverged or Heartbeat",
                        got,
                    },
                    now,
                );
            }
        }
    }

    fn ack(&mut self, ack: Ack, now: Instant) {
        if let Err(why) = self.protection.check_ack(&ack) {
            return self.lose(
                format!("standby lost: it broke the pair protocol: {why}"),
                now,
            );
        }
        if let Some(s) = &mut self.standby {
            if ack.received_epoch > s.received {
                s.received = ack.received_epoch;
                let received = ack.received_epoch;
                self.audit(|| format!("received epoch={received}"));
            }
        }
        if !self.protection.verifies_more(&ack) {
            // `Received(k)` alone: the log is on the standby's host, nothing is verified.
            return;
        }
        let epoch = ack.verified_epoch;
        self.audit(|| format!("acked epoch={epoch}"));
        self.report.verified_epoch = self.report.verified_epoch.max(epoch);
        self.tracking.set_verified(epoch);
        if let Some(c) = self.checkpoints.installed(epoch) {
            self.checkpoint_installed(c, now);
        }
        for latency in self.protection.ack_latencies(epoch, now) {
            self.timings.ack_latency(latency);
        }
        let released = self.protection.verify(epoch);
        if released.is_empty() {
            return;
        }
        for h in released {
            let held = now.saturating_duration_since(h.produced);
            self.timings.output_delay(held);
            self.actions.push_back(Action::Release {
                epoch: h.epoch,
                seq: h.seq,
                bytes: h.bytes,
                why: format!("verified held_ns={}", held.as_nanos()),
            });
        }
        let output_seq = self.protection.buffer.released();
        self.send(Body::Released(Released { output_seq }), now);
    }

    /// The connection to the standby failed (closed, reset, a bad frame, a send error). A
    /// standby that closes once it verified the last epoch of a finished run is done, not
    /// lost.
    pub fn link_failed(&mut self, e: ChannelError, now: Instant) {
        if self.standby.is_some() && !self.done() {
            self.lose(format!("standby lost: {e}"), now);
        }
    }

    /// What the back-pressure bounds look at, at `now`: guest output held for the
    /// standby's acks (bytes; the channel adds what waits in the socket), the age of the
    /// oldest epoch shipped and not yet verified, how many there are, and whether the vCPU
    /// thread is making a checkpoint the standby waits for (its end not yet out).
    pub fn backlog(&self, now: Instant) -> Backlog {
        Backlog {
            bytes: self.protection.buffer.held_bytes(),
            lag: self.protection.lag(now),
            lag_epochs: self.protection.lag_epochs(),
            making_checkpoint: self
                .checkpoints
                .pending
                .as_ref()
                .is_some_and(|c| c.epoch.is_none()),
        }
    }

    /// The pair is no longer protected: tell the standby it is abandoned (whatever the
    /// reason, so it never takes our close for our death), say so once, release everything
    /// held, go on alone.
    pub fn lose(&mut self, why: String, now: Instant) {
        // A standby still syncing has no copy of the guest: it cannot go live, so there is
        // no term to win.
        let had_copy = self.protecting();
        if self.standby.take().is_none() {
            return;
        }
        self.actions.push_back(Action::Abandon(why.clone()));
        self.tracking.set_protected(false);
        if self.switchover.abandon() {
            self.refuse_handover(why.clone());
        }
        self.join
            .standby_lost(self.lifecycle.ended, now, &self.tracking);
        // A checkpoint on its way is abandoned with its standby (its pages and end are
        // dropped when they come: a new standby must never see them).
        self.checkpoints.pending = None;
        if had_copy && (self.arbitrate(&why, now) || self.tell(&why, now)) {
            self.report.lost = Some(why);
            return;
        }
        tracing::warn!(
            held_output_bytes = self.protection.buffer.held_bytes(),
            "{why}: running unprotected"
        );
        self.report.lost = Some(why);
        self.release_unprotected("unprotected");
    }

    /// Releases everything held (`why` names it in the audit trail); from here output
    /// passes through.
    pub(super) fn release_unprotected(&mut self, why: &str) {
        for h in self.protection.unprotect() {
            self.actions.push_back(Action::Release {
                epoch: h.epoch,
                seq: h.seq,
                bytes: h.bytes,
                why: why.into(),
            });
        }
    }

    /// The clock at `now`: the failure detector, heartbeats, paused syncs that expired.
    pub fn tick(&mut self, now: Instant) {
        self.join.expire(now, &self.tracking);
        self.claim_due(now);
        self.telling_expired(now);
        let Some(s) = &self.standby else { return };
        match s.liveness.tick(now) {
            Beat::Quiet => {}
            Beat::SendHeartbeat => self.send(Body::Heartbeat(Default::default()), now),
            Beat::Silent(silent) => self.link_failed(
                ChannelError::Silent {
                    peer: self.peer.clone(),
                    silent,
                    timeout: self.heartbeat.timeout,
                },
                now,
            ),
        }
    }
}
