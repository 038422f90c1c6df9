//! A primary that lost its standby (DESIGN.md §5). With a witness it holds all output and
//! claims the next term; it runs on unprotected once it won, and fences itself (stops its
//! guest, releases nothing it holds) if the standby won. Without one it holds all output
//! until the standby's host holds `Abandon` (or for at most the heartbeat timeout), so that
//! a standby that may still go live, because this process dies before it is told, never
//! goes live behind output it did not verify.

use std::time::Instant;

use super::core::{Action, PrimaryCore};
use crate::witness::{ClaimOutcome, Verdict};

impl PrimaryCore {
    /// A claim of the next term is under way: output is held.
    pub fn arbitrating(&self) -> bool {
        self.arbiter.as_ref().is_some_and(|a| a.claiming())
    }

    /// The standby is lost (`why`): with a witness, hold everything and claim the next term.
    /// Returns false without a witness (the caller releases and runs on unprotected).
    pub(super) fn arbitrate(&mut self, why: &str, now: Instant) -> bool {
        let Some(a) = &mut self.arbiter else {
            return false;
        };
        a.start(why.to_string());
        tracing::warn!(
            held_output_bytes = self.protection.buffer.held_bytes(),
            "{why}: holding all output until this primary wins term {} at {}",
            a.term + 1,
            a.name
        );
        self.claim_due(now);
        true
    }

    /// Asks the driver to make the claim if one is due.
    pub(super) fn claim_due(&mut self, now: Instant) {
        if let Some((vm_id, expected_term)) = self.arbiter.as_mut().and_then(|a| a.due(now)) {
            self.actions.push_back(Action::Claim {
                vm_id,
                expected_term,
            });
        }
    }

    /// The witness's answer to our claim (or that it could not be reached).
    pub fn claim_result(&mut self, outcome: ClaimOutcome, now: Instant) {
        let Some(a) = &mut self.arbiter else { return };
        let Some((verdict, why)) = a.outcome(outcome, now) else {
            return;
        };
        let at = a.name;
        match verdict {
            Verdict::Granted { term } => {
                self.join.start.term = term;
                tracing::warn!(
                    term,
                    "won term {term} at {at}: releasing held output, running unprotected"
                );
                for h in self.protection.unprotect() {
                    self.actions.push_back(Action::Release {
                        epoch: h.epoch,
                        seq: h.seq,
                        bytes: h.bytes,
                        why: format!("unprotected term={term}"),
                    });
                }
            }
            Verdict::Refused { term, holder } => {
                self.actions.push_back(Action::Fence(format!(
                    "{at} gave term {term} to {holder}: this primary lost its standby ({why}) and lost the term; stopping the guest, releasing none of the {} output bytes it holds",
                    self.protection.buffer.held_bytes()
                )));
            }
        }
    }

    /// Without a witness: holds all output until the standby is told (`Abandon` delivered);
    /// false with a witness (the claim holds it instead).
    pub(super) fn tell(&mut self, why: &str, now: Instant) -> bool {
        if self.arbiter.is_some() {
            return false;
        }
        tracing::warn!(
            held_output_bytes = self.protection.buffer.held_bytes(),
            "{why}: holding all output until the standby is told it is abandoned"
        );
        self.telling = Some((now, why.to_string()));
        true
    }

    /// The lost standby's host holds `Abandon`, or nobody is left to tell (the connection
    /// broke): release what is held and run on unprotected.
    pub fn standby_told(&mut self) {
        if let Some((_, why)) = self.telling.take() {
            tracing::warn!(
                held_output_bytes = self.protection.buffer.held_bytes(),
                "{why}: the standby is told; running unprotected"
            );
            self.release_unprotected("unprotected");
        }
    }

    /// `Abandon` not delivered within the heartbeat timeout (the standby is frozen behind a
    /// full socket buffer): release anyway; the residual gap of DESIGN.md §5.
    pub(super) fn telling_expired(&mut self, now: Instant) {
        match &self.telling {
            Some((since, _)) if now.saturating_duration_since(*since) >= self.heartbeat.timeout => {
            }
            _ => return,
        }
        let Some((_, why)) = self.telling.take() else {
            return;
        };
        tracing::warn!(
            held_output_bytes = self.protection.buffer.held_bytes(),
            "{why}: running unprotected; the standby's host did not take Abandon within \
             {} ms (were this process to die now, it could go live behind released output)",
            self.heartbeat.timeout.as_millis()
        );
        self.release_unprotected("unprotected");
    }

    /// When the core next needs the clock for the standby it is telling.
    pub(super) fn telling_deadline(&self) -> Option<Instant> {
        self.telling
            .as_ref()
            .map(|(since, _)| *since + self.heartbeat.timeout)
    }
}
