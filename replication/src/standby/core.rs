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
use crate::link::{body_name, ChannelError, Heartbeat};
use crate::liveness::{Beat, Liveness};
use crate::status::{Request, Status};

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
}

/// Where the replay stands against the log received.
#[derive(Debug, Default)]
struct Progress {
    /// Epochs received and not yet verified, with when their end arrived.
    unverified: VecDeque<(u64, Instant)>,
    received_epoch: u64,
    verified_epoch: u64,
    exit_seq: u64,
    released: u64,
}

/// What the standby is doing, besides following the log.
#[derive(Debug, Default)]
struct Condition {
    /// Why the primary was lost.
    lost: Option<String>,
    /// The replayer went live.
    live: bool,
    /// A checkpoint could not be installed: the replay gave up.
    diverged: Option<String>,
    /// Waiting for a repair checkpoint: why.
    awaiting: Option<String>,
    /// Syncing: (bytes received, pages left).
    syncing: Option<(u64, u64)>,
    repairs: u64,
    syncs: u64,
}

/// The standby's side of the pair protocol.
pub struct StandbyCore {
    /// The primary's connection is up.
    primary: Option<Liveness>,
    peer: String,
    heartbeat: Heartbeat,
    audit: bool,
    progress: Progress,
    condition: Condition,
    /// The output the primary sent with the checkpoint whose end comes next.
    held: Option<HeldOutput>,
    /// The primary handed over its role: the connection goes to the new primary's channel.
    handover: bool,
    /// The replayer asked the channel to stop.
    shutdown: bool,
    actions: VecDeque<Action>,
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
            actions: VecDeque::new(),
        }
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
    pub fn poll_timeout(&self, now: Instant) -> Duration {
        self.primary
            .as_ref()
            .map_or(self.heartbeat.interval, |l| l.until_next_heartbeat(now))
    }

    fn send(&mut self, body: Body, now: Instant) {
        if let Some(l) = &mut self.primary {
            l.spoke(now);
            self.actions
                .push_back(Action::Send(Message { body: Some(body) }));
        }
    }

    fn replayer(&mut self, msg: ToReplayer) {
        self.actions.push_back(Action::ToReplayer(msg));
    }

    fn audit(&mut self, line: impl FnOnce() -> String) {
        if self.audit {
            self.actions.push_back(Action::Audit(line()));
        }
    }

    /// Bytes from the primary arrived at `now`.
    pub fn heard(&mut self, now: Instant) {
        if let Some(l) = &mut self.primary {
            l.heard(now);
        }
    }

    /// A message from the primary.
    pub fn on_message(&mut self, msg: Message, now: Instant) {
        if self.primary.is_none() {
            return;
        }
        match msg.body {
            Some(Body::Heartbeat(_)) => {}
            Some(Body::Batch(batch)) => {
                self.progress.exit_seq = batch.complete_through;
                for r in &batch.records {
                    if let Some(Kind::EpochEnd(e)) = &r.kind {
                        self.progress.received_epoch = e.epoch;
                        self.progress.unverified.push_back((e.epoch, now));
                    }
                }
                self.replayer(ToReplayer::Batch(batch));
            }
            Some(Body::Released(r)) => {
                self.progress.released = self.progress.released.max(r.output_seq);
                self.actions.push_back(Action::Released(r.output_seq));
            }
            Some(Body::Switchover(sw)) => {
                tracing::warn!(
                    epoch = sw.epoch,
                    exit_seq = sw.exit_seq,
                    "the primary hands over its role"
                );
                self.handover = true;
                self.replayer(ToReplayer::Switchover(sw));
            }
            Some(Body::Pages(chunk)) => self.replayer(ToReplayer::Pages(chunk)),
            Some(Body::HeldOutput(held)) => self.held = Some(held),
            Some(Body::CheckpointEnd(end)) => {
                let Some(held) = self.held.take().filter(|h| h.checkpoint == end.checkpoint) else {
                    return self.lose(
                        format!(
                            "primary lost: {} broke the pair protocol: the end of checkpoint {} came without its held output",
                            self.peer, end.checkpoint
                        ),
                    );
                };
                self.progress.exit_seq = end.exit_seq;
                self.progress.received_epoch = end.epoch;
                self.progress.unverified.push_back((end.epoch, now));
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
            FromReplayer::Verified { epoch, exit_seq } => {
                self.audit(|| format!("verified epoch={epoch} exit_seq={exit_seq}"));
                self.progress.verified_epoch = epoch;
                while self
                    .progress
                    .unverified
                    .front()
                    .is_some_and(|(e, _)| *e <= epoch)
                {
                    self.progress.unverified.pop_front();
                }
                self.ack(epoch, exit_seq, now);
            }
            FromReplayer::Diverged(d) => {
                let what = format!("epoch {} at exit {}: {}", d.epoch, d.exit_seq, d.reason);
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
                self.progress.unverified.retain(|(e, _)| *e > epoch);
                self.ack(epoch, exit_seq, now);
            }
            FromReplayer::Syncing {
                bytes,
                remaining_pages,
            } => self.condition.syncing = Some((bytes, remaining_pages)),
            FromReplayer::Live => self.condition.live = true,
            FromReplayer::Shutdown => self.shutdown = true,
        }
    }

    fn ack(&mut self, epoch: u64, exit_seq: u64, now: Instant) {
        let received_epoch = self.progress.received_epoch;
        self.send(
            Body::Ack(Ack {
                received_epoch,
                verified_epoch: epoch,
                exit_seq,
            }),
            now,
        );
    }

    /// The connection to the primary failed (closed, reset, silent, a bad frame).
    pub fn link_failed(&mut self, e: ChannelError) {
        self.lose(format!("primary lost: {e}"));
    }

    fn lose(&mut self, why: String) {
        if self.primary.take().is_none() {
            return;
        }
        tracing::debug!("{why}");
        self.condition.lost = Some(why.clone());
        self.actions.push_back(Action::DropLink);
        self.replayer(ToReplayer::PrimaryLost(why));
    }

    /// The clock at `now`: the failure detector and heartbeats.
    pub fn tick(&mut self, now: Instant) {
        let Some(l) = &self.primary else { return };
        match l.tick(now) {
            Beat::Quiet => {}
            Beat::SendHeartbeat => self.send(Body::Heartbeat(Default::default()), now),
            Beat::Silent(silent) => self.link_failed(ChannelError::Silent {
                peer: self.peer.clone(),
                silent,
                timeout: self.heartbeat.timeout,
            }),
        }
    }

    /// Answers a control request; `log_bytes_per_s` is the channel's receive rate now.
    pub fn control_request(&self, request: Request, now: Instant, log_bytes_per_s: u64) -> String {
        match request {
            Request::Status => self.status(now, log_bytes_per_s).to_string(),
            Request::Switchover => {
                "error: this is the standby; ask the primary's control socket\n".into()
            }
        }
    }

    /// Where the standby stands, for `ftvm status`.
    pub fn status(&self, now: Instant, log_bytes_per_s: u64) -> Status {
        let c = &self.condition;
        let (role, protected, state) = if c.live {
            (
                "primary (live after failover)",
                false,
                format!(
                    "unprotected: {}",
                    c.lost.as_deref().unwrap_or("primary lost")
                ),
            )
        } else if let Some(d) = &c.diverged {
            ("standby", false, format!("diverged: {d}"))
        } else if let Some((bytes, left)) = c.syncing {
            (
                "standby",
                false,
                format!(
                    "syncing: {} MiB received, {left} pages left in the round",
                    bytes >> 20
                ),
            )
        } else if let Some(why) = &c.awaiting {
            ("standby", true, format!("repairing: {why}"))
        } else if let Some(why) = &c.lost {
            ("standby", false, format!("going live: {why}"))
        } else {
            ("standby", true, "lockstep".to_string())
        };
        let p = &self.progress;
        Status {
            role: role.into(),
            protected,
            state,
            peer: self.peer.clone(),
            epoch: p.received_epoch,
            verified_epoch: p.verified_epoch,
            exit_seq: p.exit_seq,
            lag_epochs: p.unverified.len() as u64,
            lag: p
                .unverified
                .front()
                .map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(*t)),
            log_bytes_per_s: if self.primary.is_some() {
                log_bytes_per_s
            } else {
                0
            },
            released_output_seq: p.released,
            held_output_bytes: 0,
            repairs: c.repairs,
            syncs: c.syncs,
        }
    }
}
