//! What a replay reports: [`ReplayReport`] and [`ReplayError`].

use ftvm_vmm::devices::StopRequest;

use crate::{Divergence, LogError};

/// How a replay went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Epochs replayed.
    pub epochs: u64,
    /// Epochs whose digests matched.
    pub verified: u64,
    /// Epochs that diverged (the replay stops at the first).
    pub diverged: u64,
    /// Epochs that need a checkpoint (the replay stops at the first).
    pub checkpoint_required: u64,
    /// The first divergence.
    pub divergence: Option<Divergence>,
    /// The checkpoint-required epoch the replay stopped at: (epoch, last exit before the
    /// kick).
    pub checkpoint_at: Option<(u64, u64)>,
    /// The log ended (no more records, no run end) after this exit: the replay stopped at a
    /// consistent point from which the guest can go live.
    pub log_ended: Option<u64>,
    /// How the replayed guest stopped, if it ran to the end.
    pub stop: Option<StopRequest>,
}

/// Replay failed for a reason other than divergence.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log is unusable.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The replayed guest's output could not be written.
    #[error(transparent)]
    Output(std::io::Error),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
}
