//! What the primary's control socket answers (`ftvm status`, `ftvm switchover`).

use std::time::Instant;

use super::core::PrimaryCore;
use crate::status::{Request, Status};

impl PrimaryCore {
    /// Answers a control request; `log_bytes_per_s` is the channel's send rate now.
    pub fn control_request(
        &mut self,
        request: Request,
        now: Instant,
        log_bytes_per_s: u64,
    ) -> String {
        match request {
            Request::Status => self.status(now, log_bytes_per_s).to_string(),
            Request::Switchover => match self.start_switchover(now) {
                Ok(()) => "switchover started: the primary stops at its next exit\n".into(),
                Err(why) => format!("error: {why}\n"),
            },
            Request::Promote => {
                "error: this is the primary; promote asks a standby that waits for its primary\n"
                    .into()
            }
        }
    }

    /// Where the pair stands, for `ftvm status`.
    pub fn status(&self, now: Instant, log_bytes_per_s: u64) -> Status {
        let (protected, state) = if self.standby.is_some() {
            if self.lifecycle.run_end_shipped && self.protection.settled() {
                (true, "ended: the guest's run is over".to_string())
            } else if let Some(s) = self.join.describe() {
                (false, s)
            } else if self.switchover.phase.is_some() {
                (true, "switching over".to_string())
            } else if let Some(c) = &self.checkpoints.pending {
                (true, format!("repairing: {}", c.why))
            } else {
                (true, "lockstep".to_string())
            }
        } else if let Some(claim) = self.arbiter.as_ref().and_then(|a| a.describe()) {
            let why = self.report.lost.as_deref().unwrap_or("standby lost");
            (
                false,
                format!("arbitrating: {why}; holding all output, {claim}"),
            )
        } else if let Some((_, why)) = &self.telling {
            (
                false,
                format!("unprotected: {why}; holding all output until the standby is told"),
            )
        } else if let Some(why) = &self.report.lost {
            (false, format!("unprotected: {why}"))
        } else {
            (false, "unprotected".to_string())
        };
        Status {
            role: "primary".into(),
            protected,
            state,
            peer: self.peer.clone(),
            epoch: self.epoch.saturating_sub(1),
            verified_epoch: self.report.verified_epoch,
            exit_seq: self.exit_seq,
            lag_epochs: self.protection.lag_epochs(),
            lag: self.protection.lag(now),
            lag_bytes: self.protection.lag_bytes(),
            log_bytes_per_s: if self.standby.is_some() {
                log_bytes_per_s
            } else {
                0
            },
            released_output_seq: self.protection.buffer.released(),
            held_output_bytes: self.protection.buffer.held_bytes(),
            repairs: self.report.repairs,
            syncs: self.report.syncs,
            divergences: self.report.divergences,
            checkpoint_required: self.report.checkpoint_required,
            repair_bytes: self.report.repair_bytes,
            sync_bytes: self.join.progress().map_or(0, |(bytes, _)| bytes),
            sync_pages_left: self.join.progress().map_or(0, |(_, left)| left),
            heartbeat: self.heartbeat,
            tsc_exits: self.join.start.header.as_ref().is_some_and(|h| h.tsc_exits),
            term: self.arbiter.as_ref().map(|a| a.term),
            arbiter_reachable: self
                .arbiter
                .as_ref()
                .map(crate::arbiter::Arbiter::reachable),
        }
    }
}
