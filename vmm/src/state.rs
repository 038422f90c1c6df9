//! Save and restore of VM state by one trait (DESIGN.md §4): every device and the vCPU
//! implement [`Persist`], and a checkpoint is built from their states plus guest pages.

use serde::{de::DeserializeOwned, Serialize};

/// Restoring a state that does not fit the object it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl that reads or writes vCPU state failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The state is malformed (a field out of range, a buffer too large).
    #[error("invalid {device} state: {why}")]
    Invalid {
        /// Which device.
        device: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The encoded state could not be decoded.
    #[error("cannot decode state: {0}")]
    Decode(String),
}

/// Save and restore of one component's complete guest-visible state. Fields that exist only on
/// the host side (file descriptors, host timestamps) are not part of the state.
pub trait Persist {
    /// The saved form: plain data, serialisable, compared bytewise in digests.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug + PartialEq;
    /// Captures the current state.
    fn save(&self) -> Result<Self::State, StateError>;
    /// Replaces the current state by `state`.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// Canonical byte encoding of a state, used for digests and for the wire.
pub fn encode<T: Serialize>(state: &T) -> Vec<u8> {
    // Serialising plain data structs into a Vec cannot fail: bincode only errors on I/O,
    // on sequences of unknown length and on size limits, none of which apply here.
    bincode::serialize(state).unwrap_or_default()
}

/// Decodes a state encoded by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    bincode::deserialize(bytes).map_err(|e| StateError::Decode(e.to_string()))
}
