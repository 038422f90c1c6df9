//! [`StandbyCore`]: the standby's side of the pair protocol as a state machine. It passes
//! what the primary sends to the replayer, answers each verified epoch with an `Ack`,
//! forwards a divergence, notes what output the primary released, and declares the primary
//! lost. Events go in through its methods with the time they happened; what the event loop
//! must do comes out of [`StandbyCore::poll_action`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ftvm_proto::channel::{message::Body, Ack, HeldOutput, Message};
use ftvm_proto::log::record::Kind;

use super::{FromReplayer, ToReplayer};
use crate::arbiter::Arbiter;
use crate::link::{body_name, ChannelError, Heartbeat};
use crate::liveness::{Beat, Liveness};
use crate::witness::{ClaimOutcome, Verdict};

/// What the event loop must do for the core, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this message to the primary.
    Send(Message),
    /// Hand this to the replayer.
    ToReplayer(ToReplayer),
    /// The primary released every output byte before this sequence number.
    Released(u64),
    /// A line for the audit trail (`FTVM_AUDIT`).
    Audit(String),
    /// The primary is lost: close the connection.
    DropLink,
    /// Claim term `expected_term + 1` of `vm_id` at the witness; its outcome goes to
    /// [`StandbyCore::claim_result`].
    Claim {
        /// The protected VM's id at the witness.
        vm_id: String,
        /// The term this standby knows.
        expected_term: u64,
    },
}

/// Where the replay stands against the log received.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Epochs received and not yet verified, with when their end arrived.
    pub(super) unverified: VecDeque<(u64, Instant)>,
    /// Log bytes received since the replay last caught up with everything received (see
    /// [`StandbyCore::count_log_bytes`]).
    pub(super) unverified_bytes: u64,
    pub(super) received_epoch: u64,
    pub(super) verified_epoch: u64,
    /// The last exit of the last verified epoch.
    pub(super) verified_exit_seq: u64,
    pub(super) exit_seq: u64,
    pub(super) released: u64,
    /// The log's end (the guest's run is over on the primary) arrived.
    pub(super) run_end: bool,
}

/// What the standby is doing, besides following the log.
#[derive(Debug, Default)]
pub(super) struct Condition {
    /// Why the primary was lost.
    pub(super) lost: Option<String>,
    /// The primary abandoned this standby: why.
    pub(super) abandoned: Option<String>,
    /// The primary abandoned this standby while its claim was out: the verdict decides.
    pub(super) abandon_pending: Option<String>,
    /// The primary won the term at the witness: why this standby stopped.
    pub(super) fenced: Option<String>,
    /// The primary fell silent or broke the stream, and may live on: why. The standby keeps
    /// its VM as it is and waits for the primary to come back or for `promote`.
    pub(super) waiting: Option<String>,
    /// The replayer went live.
    pub(super) live: bool,
    /// A checkpoint could not be installed: the replay gave up.
    pub(super) diverged: Option<String>,
    /// Waiting for a repair checkpoint: why.
    pub(super) awaiting: Option<String>,
    /// Syncing: (bytes received, pages left).
    pub(super) syncing: Option<(u64, u64)>,
    pub(super) repairs: u64,
    pub(super) syncs: u64,
    /// Divergences reported to the primary, and how many of them were checkpoint-required.
    pub(super) divergences: u64,
    pub(super) checkpoint_required: u64,
    /// Page bytes of the repair checkpoints received.
    pub(super) repair_bytes: u64,
}

/// The standby's side of the pair protocol.
pub struct StandbyCore {
    /// The primary's connection is up.
    pub(super) primary: Option<Liveness>,
    pub(super) peer: String,
    pub(super) heartbeat: Heartbeat,
    pub(super) audit: bool,
    pub(super) progress: Progress,
    pub(super) condition: Condition,
    /// The output the primary sent with the checkpoint whose end comes next.
    pub(super) held: Option<HeldOutput>,
    /// The primary handed over its role: the connection goes to the new primary's channel.
    pub(super) handover: bool,
    /// The replayer asked the channel to stop.
    pub(super) shutdown: bool,
    /// Our control socket's address, for the hint a waiting standby logs.
    pub(super) control: Option<String>,
    /// The witness, if the pair has one.
    pub(super) arbiter: Option<Arbiter>,
    /// The guest's TSC reads are exits (the primary's header said so), for `ftvm status`.
    pub(super) tsc_exits: bool,
    pub(super) actions: VecDeque<Action>,
}

/// Whether the failure of the primary's connection is evidence that its process is gone
/// while its host lives (DESIGN.md §5): the connection closed or was reset (and writes to
/// it fail). Silence, a malformed frame, a message that breaks the protocol, or a socket
/// error that says the network failed (a TCP timeout, an unreachable host or network) are
/// not: the primary may run on.
pub fn evidence_of_death(e: &ChannelError) -> bool {
    use std::io::ErrorKind;
    match e {
        ChannelError::Closed { .. } | ChannelError::ClosedMidFrame { .. } => true,
        ChannelError::Io { source, .. } => !matches!(
            source.kind(),
            ErrorKind::TimedOut
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::NetworkDown
        ),
        _ => false,
    }
}

impl StandbyCore {
    /// A standby following the primary at `peer`, connected at `now`.
    pub fn new(peer: String, heartbeat: Heartbeat, audit: bool, now: Instant) -> Self {
        Self {
            primary: Some(Liveness::new(heartbeat, now)),
            peer,
            heartbeat,
            audit,
            progress: Progress::default(),
            condition: Condition::default(),
            held: None,
            handover: false,
            shutdown: false,
            control: None,
            arbiter: None,
            tsc_exits: false,
            actions: VecDeque::new(),
        }
    }

    /// The guest's TSC reads are exits (`ftvm status` says `tsc=exits`).
    pub fn set_tsc_exits(&mut self, exits: bool) {
        self.tsc_exits = exits;
    }

    /// The pair has a witness: the VM's id there and the term now. Silence makes this
    /// standby claim the next term; it goes live only if it wins.
    pub fn set_arbiter(&mut self, vm_id: String, term: u64) {
        self.arbiter = Some(Arbiter::new(vm_id, term));
    }

    /// [`StandbyCore::set_arbiter`] for an arbiter messages call `name` ("etcd").
    pub fn set_named_arbiter(&mut self, vm_id: String, term: u64, name: &'static str) {
        self.arbiter = Some(Arbiter::named(vm_id, term, name));
    }

    /// Our control socket is at `addr` (what `ftvm promote` is pointed at).
    pub fn set_control_addr(&mut self, addr: String) {
        self.control = Some(addr);
    }

    /// Counts a batch's bytes towards `lag_bytes`: from 0 again whenever the replay had
    /// verified everything received before it.
    fn count_log_bytes(&mut self, batch: &ftvm_proto::log::RecordBatch) {
        let p = &mut self.progress;
        if p.unverified.is_empty() {
            p.unverified_bytes = 0;
        }
        p.unverified_bytes += prost::Message::encoded_len(batch) as u64;
    }

    /// This standby joins a running guest: it syncs (unprotected) before it follows.
    pub fn set_syncing(&mut self) {
        self.condition.syncing.get_or_insert((0, 0));
    }

    /// The next thing the event loop must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Heartbeats and the failure detector.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat
    }

    /// The primary handed over its role: stop reading the connection here.
    pub fn handing_over(&self) -> bool {
        self.handover
    }

    /// The replayer asked the channel to stop.
    pub fn shut_down(&self) -> bool {
        self.shutdown
    }

    /// How long the event loop may wait from `now`.
    pub fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let beat = self.primary.as_ref().map(|l| l.until_next_heartbeat(now));
        let retry = self.arbiter.as_ref().and_then(|a| a.until_retry(now));
        beat.into_iter().chain(retry).min()
    }

    fn send(&mut self, body: Body, now: Instant) {
        if let Some(l) = &mut self.primary {
            l.spoke(now);
            self.actions
                .push_back(Action::Send(Message { body: Some(body) }));
        }
    }

    pub(super) fn replayer(&mut self, msg: ToReplayer) {
        self.actions.push_back(Action::ToReplayer(msg));
    }

    fn audit(&mut self, line: impl FnOnce() -> String) {
        if self.audit {
            self.actions.push_back(Action::Audit(line()));
        }
    }

    /// Bytes from the primary arrived at `now`. A primary that was silent is back: follow
    /// it again.
    pub fn heard(&mut self, now: Instant) {
        if let Some(l) = &mut self.primary {
            l.heard(now);
            if self.condition.waiting.is_some() && self.arbiter.as_mut().is_none_or(|a| a.cancel())
            {
                if let Some(why) = self.condition.waiting.take() {
                    tracing::info!("the primary is back ({why}): following it again");
                }
            }
        }
    }

    /// A message from the primary.
    pub fn on_message(&mut self, msg: Message, now: Instant) {
        if self.primary.is_none() {
            return;
        }
        if let Some(Body::Batch(batch)) = &msg.body {
            self.count_log_bytes(batch);
        }
        match msg.body {
            Some(Body::Heartbeat(_)) => {}
            Some(Body::Batch(batch)) => {
                let batch = match ftvm_proto::packed::unpack_batch(batch) {
                    Ok(b) => b,
                    Err(e) => {
                        return self.wait(
                            format!(
                                "primary {} broke the pair protocol: a record batch does not decode: {e}",
                                self.peer
                            ),
                            false,
                        )
                    }
                };
                self.progress.exit_seq = batch.complete_through;
                let received_before = self.progress.received_epoch;
                for r in &batch.records {
                    if let Some(Kind::EpochEnd(e)) = &r.kind {
                        self.progress.received_epoch = e.epoch;
                        self.progress.unverified.push_back((e.epoch, now));
                    }
                    self.progress.run_end |= matches!(r.kind, Some(Kind::RunEnd(_)));
                }
                self.replayer(ToReplayer::Batch(batch));
                if self.progress.received_epoch != received_before {
                    // Received(k): the log through epoch k is on this host (DESIGN.md §3).
                    let epoch = self.progress.received_epoch;
                    self.audit(|| format!("received epoch={epoch}"));
                    self.ack(now);
                }
            }
            Some(Body::Released(r)) => {
                self.progress.released = self.progress.released.max(r.output_seq);
                self.actions.push_back(Action::Released(r.output_seq));
            }
            Some(Body::Switchover(sw)) => {
                tracing::info!(
                    epoch = sw.epoch,
                    exit_seq = sw.exit_seq,
                    "the primary hands over its role"
                );
                self.handover = true;
                self.replayer(ToReplayer::Switchover(sw));
            }
            Some(Body::Abandon(a)) => self.abandoned(a.reason),
            Some(Body::Pages(chunk)) => self.replayer(ToReplayer::Pages(chunk)),
            Some(Body::HeldOutput(held)) => self.held = Some(held),
            Some(Body::CheckpointEnd(end)) => {
                let Some(held) = self.held.take().filter(|h| h.checkpoint == end.checkpoint) else {
                    return self.wait(
                        format!(
                            "primary {} broke the pair protocol: the end of checkpoint {} came without its held output",
                            self.peer, end.checkpoint
                        ),
                        false,
                    );
                };
                self.progress.exit_seq = end.exit_seq;
                self.progress.received_epoch = end.epoch;
                self.progress.run_end |= end.run_end.is_some();
                self.progress.unverified.push_back((end.epoch, now));
                if !end.sync {
                    self.condition.repair_bytes += end.page_bytes;
                }
                self.replayer(ToReplayer::CheckpointEnd { end, held });
            }
            body => {
                let got = body_name(&Message { body }).to_string();
                self.link_failed(ChannelError::Unexpected {
                    peer: self.peer.clone(),
                    expected: "a record batch, Released or Heartbeat",
                    got,
                });
            }
        }
    }

    /// What the replayer said.
    pub fn on_replayer(&mut self, event: FromReplayer, now: Instant) {
        match event {
            FromReplayer::Verified {
                epoch,
                exit_seq,
                replayed,
            } => {
                self.audit(|| {
                    let replayed_ns = crate::audit::ns_before(now, replayed);
                    format!("verified epoch={epoch} exit_seq={exit_seq} replayed_ns={replayed_ns}")
                });
                self.progress.verified_epoch = epoch;
                self.progress.verified_exit_seq = exit_seq;
                while self
                    .progress
                    .unverified
                    .front()
                    .is_some_and(|(e, _)| *e <= epoch)
                {
                    self.progress.unverified.pop_front();
                }
                self.ack(now);
            }
            FromReplayer::Diverged(d) => {
                let what = format!("epoch {} at exit {}: {}", d.epoch, d.exit_seq, d.reason);
                self.condition.divergences += 1;
                self.condition.checkpoint_required += u64::from(d.checkpoint_required);
                if d.checkpoint_failed {
                    self.condition.diverged = Some(what);
                } else {
                    self.condition.awaiting = Some(what);
                }
                self.send(Body::Diverged(d), now);
            }
            FromReplayer::Installed {
                epoch,
                exit_seq,
                sync,
            } => {
                self.audit(|| format!("verified epoch={epoch} exit_seq={exit_seq} checkpoint"));
                if sync {
                    self.condition.syncs += 1;
                    self.condition.syncing = None;
                } else {
                    self.condition.repairs += 1;
                }
                self.condition.awaiting = None;
                self.progress.verified_epoch = epoch;
                self.progress.verified_exit_seq = exit_seq;
                self.progress.unverified.retain(|(e, _)| *e > epoch);
                self.ack(now);
            }
            FromReplayer::Syncing {
                bytes,
                remaining_pages,
            } => self.condition.syncing = Some((bytes, remaining_pages)),
            FromReplayer::Live => {
                self.condition.live = true;
                self.audit(|| "live".into());
            }
            FromReplayer::Shutdown => self.shutdown = true,
        }
    }

    /// Tells the primary how far the log arrived (`Received`) and how far it is verified
    /// (`Verified`), in one Ack.
    fn ack(&mut self, now: Instant) {
        let p = &self.progress;
        let ack = Ack {
            received_epoch: p.received_epoch,
            verified_epoch: p.verified_epoch,
            exit_seq: p.verified_exit_seq,
        };
        self.send(Body::Ack(ack), now);
    }

    /// The connection to the primary failed (closed, reset, silent, a bad frame). Only a
    /// close or a reset is evidence that the primary is gone: then the standby goes live
    /// (with a witness, once it won the term: a primary that dropped this standby and could
    /// not tell it has claimed the term already). Otherwise it waits (DESIGN.md §5), on the
    /// same connection if it is only silence.
    pub fn link_failed(&mut self, e: ChannelError) {
        // A syncing standby has no copy to go live with: whatever the failure, the primary
        // is lost (a joining standby reconnects to resume the sync).
        if self.condition.syncing.is_some() {
            self.lose(format!("primary lost: {e}"));
        // After the run's end there is nothing to go live for: the close ends the pair.
        } else if evidence_of_death(&e) && (self.arbiter.is_none() || self.progress.run_end) {
            self.lose(format!("primary lost: {e}"));
        } else if evidence_of_death(&e) {
            self.wait(format!("primary lost: {e}"), false);
        } else {
            let keep = matches!(e, ChannelError::Silent { .. });
            self.wait(format!("primary {e}"), keep);
        }
    }

    /// The primary may live on but this standby cannot follow it now: keep the VM as it is
    /// and wait, for the primary to speak again (`keep_link`: it is only silent) or for an
    /// operator's `promote`. Never live on its own.
    fn wait(&mut self, why: String, keep_link: bool) {
        if self.primary.is_none() {
            return;
        }
        if !keep_link {
            self.primary = None;
            self.actions.push_back(Action::DropLink);
        }
        let first = self.condition.waiting.is_none() || !keep_link;
        self.condition.waiting = Some(why.clone());
        if let Some(a) = &mut self.arbiter {
            if first {
                tracing::warn!(
                    "{why}; claiming term {} at {}: this standby goes live only if it wins",
                    a.term + 1,
                    a.name
                );
            }
            a.start(why);
        } else if first {
            tracing::warn!(
                "{why}; not going live without an arbiter: waiting ({})",
                self.promote_hint()
            );
        }
    }

    fn claim_due(&mut self, now: Instant) {
        if let Some((vm_id, expected_term)) = self.arbiter.as_mut().and_then(|a| a.due(now)) {
            self.actions.push_back(Action::Claim {
                vm_id,
                expected_term,
            });
        }
    }

    /// The witness's answer to our claim (or that it could not be reached): go live if this
    /// standby won the term; stop for good if the primary did.
    pub fn claim_result(&mut self, outcome: ClaimOutcome, now: Instant) {
        let Some(a) = &mut self.arbiter else { return };
        let Some((verdict, why)) = a.outcome(outcome, now) else {
            if let Some(reason) = self.condition.abandon_pending.take() {
                // Not granted as far as we know, and the primary lives on without us.
                a.cancel();
                return self.abandon_now(reason);
            }
            // The witness could not be reached. A primary heard from again meanwhile is
            // followed again rather than claimed against.
            let back = self
                .primary
                .as_ref()
                .is_some_and(|l| !matches!(l.tick(now), Beat::Silent(_)));
            if back && a.cancel() {
                if let Some(why) = self.condition.waiting.take() {
                    tracing::info!("the primary is back ({why}): following it again");
                }
            }
            return;
        };
        let c = &self.condition;
        if c.live || c.lost.is_some() || c.abandoned.is_some() || c.fenced.is_some() {
            return;
        }
        self.condition.waiting = None;
        if self.primary.take().is_some() {
            self.actions.push_back(Action::DropLink);
        }
        let at = a.name;
        match verdict {
            Verdict::Granted { term } => {
                let reason = format!("won term {term} at {at} ({why})");
                tracing::warn!("{reason}");
                self.condition.lost = Some(reason.clone());
                self.replayer(ToReplayer::PrimaryLost(reason));
            }
            Verdict::Refused { term, holder } => {
                let reason = format!(
                    "{at} gave term {term} to {holder}: the primary won, so this standby stops and never goes live ({why})"
                );
                self.condition.fenced = Some(reason.clone());
                self.replayer(ToReplayer::Fenced(reason));
            }
        }
    }

    fn lose(&mut self, why: String) {
        if self.primary.take().is_none() {
            return;
        }
        tracing::debug!("{why}");
        self.audit(|| "lost".into());
        self.condition.lost = Some(why.clone());
        self.actions.push_back(Action::DropLink);
        self.replayer(ToReplayer::PrimaryLost(why));
    }

    /// The primary dropped this standby and lives on: this copy must never go live.
    fn abandoned(&mut self, reason: String) {
        if self.primary.take().is_none() {
            return;
        }
        self.actions.push_back(Action::DropLink);
        if self
            .arbiter
            .as_ref()
            .and_then(|a| a.claim.as_ref())
            .is_some_and(|c| c.in_flight)
        {
            // Our claim is out and may be granted already: the witness decides (the
            // primary, which claims too, is refused then and fences itself).
            tracing::debug!("the primary abandoned this standby while it claims: {reason}");
            self.condition.abandon_pending = Some(reason);
            return;
        }
        self.abandon_now(reason);
    }

    fn abandon_now(&mut self, reason: String) {
        tracing::debug!("the primary abandoned this standby: {reason}");
        self.condition.waiting = None;
        self.condition.abandoned = Some(reason.clone());
        self.replayer(ToReplayer::Abandoned(reason));
    }

    /// The clock at `now`: the failure detector and heartbeats. A standby waiting for a
    /// silent primary goes on sending heartbeats, so a primary that was only paused finds
    /// it alive when it runs again.
    pub fn tick(&mut self, now: Instant) {
        self.tick_link(now);
        self.claim_due(now);
    }

    fn tick_link(&mut self, now: Instant) {
        let Some(l) = &self.primary else { return };
        let due = l.heartbeat_due(now);
        if let Beat::Silent(silent) = l.tick(now) {
            if self.condition.waiting.is_none() {
                self.link_failed(ChannelError::Silent {
                    peer: self.peer.clone(),
                    silent,
                    timeout: self.heartbeat.timeout,
                });
            }
        }
        if due {
            self.send(Body::Heartbeat(Default::default()), now);
        }
    }
}
