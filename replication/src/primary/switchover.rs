//! `ftvm switchover`: the planned role swap. The vCPU thread stops at its next exit and
//! closes the epoch there; once the standby verified it and every output byte is released,
//! the connection (and the primary's role) is handed over. A divergence on the way abandons
//! the switchover and asks for it again once the repair is installed.

use std::time::Instant;

use ftvm_proto::channel::message::Body;

use super::core::{Action, PrimaryCore};
use crate::checkpoint::VcpuRequest;

/// How often a switchover abandoned for a repair is asked again.
pub(super) const MAX_RETRIES: u32 = 20;

/// Where a switchover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Asked of the vCPU thread.
    Asked,
    /// The vCPU stopped after closing `epoch` at `exit_seq`; hand over once the standby
    /// verified it and all output is released.
    Stopped { epoch: u64, exit_seq: u64 },
    /// The `Switchover` message is on its way; the event loop hands the connection over.
    HandingOver,
}

/// The switchover under way, if any, and its retries after repairs.
#[derive(Debug, Default)]
pub(super) struct Switchover {
    pub phase: Option<Phase>,
    /// Ask again once the repair under way is installed.
    pub after_repair: bool,
    retries: u32,
}

impl Switchover {
    /// A switchover was asked of the vCPU thread.
    pub fn asked(&mut self) {
        self.phase = Some(Phase::Asked);
        self.after_repair = false;
    }

    /// The standby diverged while a switchover was under way: it is abandoned, to be asked
    /// again after the repair (a bounded number of times). Returns whether the vCPU thread
    /// is stopped for it and must be told to run on.
    pub fn abandon_for_repair(&mut self) -> bool {
        if self.retries < MAX_RETRIES {
            self.retries += 1;
            self.after_repair = true;
        }
        self.abandon()
    }

    /// The switchover is off. Returns whether the vCPU thread is stopped for it (or about
    /// to hand over) and must be told to run on; a vCPU that has not stopped yet is told
    /// when it does.
    pub fn abandon(&mut self) -> bool {
        matches!(
            self.phase.take(),
            Some(Phase::Stopped { .. } | Phase::HandingOver)
        )
    }
}

/// The switchover, as the core runs it.
impl PrimaryCore {
    /// `ftvm switchover`: stop the vCPU at its next exit; once the standby verified
    /// everything up to there, hand it the primary's role.
    pub fn start_switchover(&mut self, now: Instant) -> Result<(), String> {
        if !self.protecting() {
            return Err("the guest is not protected: there is no standby to switch over to".into());
        }
        if self.lifecycle.ended {
            return Err("the guest run is over".into());
        }
        if self.switchover.phase.is_some() {
            return Err("a switchover is already under way".into());
        }
        if !self.ask_vcpu(VcpuRequest::Switchover, now) {
            return Err("the vCPU thread is gone".into());
        }
        tracing::info!(peer = self.peer, "switchover requested");
        self.switchover.asked();
        Ok(())
    }

    /// Tells the vCPU thread, stopped for a switchover, to run on.
    pub(super) fn refuse_handover(&mut self, why: String) {
        tracing::warn!("switchover abandoned: {why}");
        self.actions.push_back(Action::RefuseHandover(why));
    }

    /// The vCPU thread stopped for the switchover after closing `epoch` at `exit_seq`.
    pub(super) fn stopped(&mut self, epoch: u64, exit_seq: u64) {
        if self.standby.is_none() || self.switchover.phase.is_none() {
            // Abandoned while the vCPU was on its way to stop: let it run on.
            self.switchover.phase = None;
            self.refuse_handover("the standby was lost or diverged".into());
        } else {
            self.switchover.phase = Some(Phase::Stopped { epoch, exit_seq });
        }
    }

    /// Hands the connection over once the stopped primary's last epoch is verified and all
    /// its output released.
    pub fn try_handover(&mut self, now: Instant) {
        let Some(Phase::Stopped { epoch, exit_seq }) = self.switchover.phase else {
            return;
        };
        if !self.protection.settled() || self.standby.is_none() {
            return;
        }
        let output_seq = self.protection.buffer.released();
        self.send(
            Body::Switchover(ftvm_proto::channel::Switchover {
                epoch,
                exit_seq,
                output_seq,
            }),
            now,
        );
        self.switchover.phase = Some(Phase::HandingOver);
        self.actions.push_back(Action::HandOver {
            epoch,
            exit_seq,
            output_seq,
        });
    }

    /// The event loop handed the connection to the vCPU thread: this side is done.
    pub fn handed_over(&mut self) {
        let Some(Phase::HandingOver) = self.switchover.phase else {
            return;
        };
        self.switchover.phase = None;
        self.standby = None;
        self.lifecycle.handed_over = true;
        self.tracking.set_protected(false);
        tracing::warn!(
            epoch = self.epoch.saturating_sub(1),
            exit_seq = self.exit_seq,
            output_seq = self.protection.buffer.released(),
            "switched over: this host is now the standby"
        );
    }
}
