//! The output rule's bookkeeping (DESIGN.md §3): the epochs shipped to the standby and not
//! yet verified, and the guest output held until they are.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ftvm_proto::channel::Ack;

use crate::output::{HeldOutput, OutputBuffer};

/// Unverified epochs and the output buffer.
#[derive(Debug)]
pub(super) struct Protection {
    /// Output held until its epoch is verified.
    pub buffer: OutputBuffer,
    /// Epochs shipped to the standby and not yet verified, with when they were shipped.
    unverified: VecDeque<(u64, Instant)>,
    /// The highest epoch shipped to the standby attached now (0: none yet).
    shipped: u64,
    /// Log bytes (records, checkpoint pages) shipped for each epoch in `unverified`.
    epoch_bytes: VecDeque<(u64, u64)>,
    /// Log bytes shipped for the epoch now open.
    open_bytes: u64,
}

impl Protection {
    /// No output yet; the first byte produced gets sequence number `output_seq`.
    pub fn new(output_seq: u64) -> Self {
        Self {
            buffer: OutputBuffer::starting_at(output_seq),
            unverified: VecDeque::new(),
            shipped: 0,
            epoch_bytes: VecDeque::new(),
            open_bytes: 0,
        }
    }

    /// A new standby attached: nothing is shipped to it yet.
    pub fn attached(&mut self) {
        self.unverified.clear();
        self.shipped = 0;
        self.forget_bytes();
    }

    /// The end of `epoch` went to the standby at `now`.
    pub fn shipped(&mut self, epoch: u64, now: Instant) {
        self.unverified.push_back((epoch, now));
        self.shipped = self.shipped.max(epoch);
        let bytes = std::mem::take(&mut self.open_bytes);
        self.epoch_bytes.push_back((epoch, bytes));
    }

    /// Checks an acknowledgement against what was shipped: the standby cannot have received
    /// or verified an epoch that was never sent to it.
    pub fn check_ack(&self, ack: &Ack) -> Result<(), String> {
        let claimed = ack.verified_epoch.max(ack.received_epoch);
        if claimed > self.shipped {
            return Err(format!(
                "it acknowledged epoch {claimed} (received {}, verified {}) but the last epoch shipped to it is {}",
                ack.received_epoch, ack.verified_epoch, self.shipped
            ));
        }
        Ok(())
    }

    /// The acknowledgement says more than `Received(k)`: it verifies an epoch not verified
    /// yet, or (a repair's or a sync's acknowledgement) nothing shipped waits for it.
    pub fn verifies_more(&self, ack: &Ack) -> bool {
        self.unverified
            .front()
            .is_none_or(|(e, _)| ack.verified_epoch >= *e)
    }

    /// The standby verified every epoch through `epoch`: the output they produced may
    /// leave. A stale acknowledgement (an epoch verified before) releases nothing new.
    pub fn verify(&mut self, epoch: u64) -> Vec<HeldOutput> {
        while self.unverified.front().is_some_and(|(e, _)| *e <= epoch) {
            self.unverified.pop_front();
        }
        while self.epoch_bytes.front().is_some_and(|(e, _)| *e <= epoch) {
            self.epoch_bytes.pop_front();
        }
        self.buffer.release_through(epoch)
    }

    /// The standby is gone: nothing waits for it any more, everything held may leave.
    pub fn unprotect(&mut self) -> Vec<HeldOutput> {
        self.unverified.clear();
        self.forget_bytes();
        self.buffer.release_all()
    }

    /// Every shipped epoch is verified and no output is held.
    pub fn settled(&self) -> bool {
        self.unverified.is_empty() && self.buffer.held_bytes() == 0
    }

    /// Epochs shipped and not verified.
    pub fn lag_epochs(&self) -> u64 {
        self.unverified.len() as u64
    }

    /// Age of the oldest epoch not verified.
    pub fn lag(&self, now: Instant) -> Duration {
        self.unverified
            .front()
            .map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(*t))
    }

    /// How long each epoch through `epoch` not verified yet waited since it was shipped.
    pub fn ack_latencies(&self, epoch: u64, now: Instant) -> Vec<Duration> {
        self.unverified
            .iter()
            .take_while(|(e, _)| *e <= epoch)
            .map(|(_, t)| now.saturating_duration_since(*t))
            .collect()
    }

    /// `bytes` of log (records, checkpoint pages) went to the standby for the open epoch.
    pub fn log_bytes(&mut self, bytes: usize) {
        self.open_bytes += bytes as u64;
    }

    /// Log bytes shipped and not verified (the open epoch's included).
    pub fn lag_bytes(&self) -> u64 {
        self.open_bytes + self.epoch_bytes.iter().map(|(_, b)| b).sum::<u64>()
    }

    fn forget_bytes(&mut self) {
        self.epoch_bytes.clear();
        self.open_bytes = 0;
    }
}
