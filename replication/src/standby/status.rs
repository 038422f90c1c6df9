//! What the standby's control socket answers (`ftvm status`, `ftvm promote`).

use std::time::{Duration, Instant};

use super::core::{Action, StandbyCore};
use super::ToReplayer;
use crate::status::{Request, Status};

impl StandbyCore {
    pub(super) fn promote_hint(&self) -> String {
        match &self.control {
            Some(addr) => format!("ftvm promote {addr} to go live"),
            None => "ftvm promote ADDR to go live; this standby has no --control socket".into(),
        }
    }

    /// `ftvm promote`: an operator decided that the primary this standby waits for is gone;
    /// go live from the last consistent point (the same path as a primary's death).
    pub fn promote(&mut self) -> Result<(), String> {
        let c = &self.condition;
        if c.live || c.lost.is_some() {
            return Err("this standby is live already".into());
        }
        if let Some(a) = &self.arbiter {
            return Err(format!(
                "this pair has an arbiter ({}): a standby goes live only when it wins the term there",
                a.name
            ));
        }
        if let Some(why) = &c.abandoned {
            return Err(format!(
                "the primary abandoned this standby ({why}): its copy is not the guest's"
            ));
        }
        if let Some(why) = &c.diverged {
            return Err(format!(
                "this standby has no usable copy of the guest: {why}"
            ));
        }
        let Some(why) = self.condition.waiting.take() else {
            return Err(
                "this standby follows a live primary; only a standby that waits for a silent primary can be promoted (`ftvm switchover` swaps the roles of a healthy pair)"
                    .into(),
            );
        };
        tracing::warn!("promoted by the operator ({why})");
        if self.primary.take().is_some() {
            self.actions.push_back(Action::DropLink);
        }
        let reason = format!("promoted by the operator ({why})");
        self.condition.lost = Some(reason.clone());
        self.replayer(ToReplayer::PrimaryLost(reason));
        Ok(())
    }

    /// Answers a control request; `log_bytes_per_s` is the channel's receive rate now.
    pub fn control_request(
        &mut self,
        request: Request,
        now: Instant,
        log_bytes_per_s: u64,
    ) -> String {
        match request {
            Request::Status => self.status(now, log_bytes_per_s).to_string(),
            Request::Promote => match self.promote() {
                Ok(()) => {
                    "promoted: this standby goes live from its last consistent point\n".into()
                }
                Err(why) => format!("error: {why}\n"),
            },
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
        } else if let Some(why) = &c.fenced {
            ("standby", false, format!("fenced: {why}"))
        } else if let Some(why) = &c.abandoned {
            ("standby", false, format!("abandoned: {why}"))
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
        } else if let (Some(why), Some(claim)) =
            (&c.waiting, self.arbiter.as_ref().and_then(|a| a.describe()))
        {
            ("standby", false, format!("waiting: {why}; {claim}"))
        } else if let Some(why) = &c.waiting {
            (
                "standby",
                false,
                format!(
                    "waiting: {why}; not going live without an arbiter ({})",
                    self.promote_hint()
                ),
            )
        } else if self.progress.run_end && self.progress.unverified.is_empty() {
            // Every epoch to the run's end verified: nothing is left to protect.
            (
                "standby",
                true,
                "ended: the guest's run is over".to_string(),
            )
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
            lag_bytes: if p.unverified.is_empty() {
                0
            } else {
                p.unverified_bytes
            },
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
            divergences: c.divergences,
            checkpoint_required: c.checkpoint_required,
            repair_bytes: c.repair_bytes,
            sync_bytes: c.syncing.map_or(0, |(bytes, _)| bytes),
            sync_pages_left: c.syncing.map_or(0, |(_, left)| left),
            heartbeat: self.heartbeat,
            tsc_exits: self.tsc_exits,
            term: self.arbiter.as_ref().map(|a| a.term),
            arbiter_reachable: self
                .arbiter
                .as_ref()
                .map(crate::arbiter::Arbiter::reachable),
        }
    }
}
