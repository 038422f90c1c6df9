//! A position in the pair's run: where a switchover hands over, where a standby starts
//! following, where a checkpoint leaves both VMs.

use std::fmt;

use ftvm_proto::channel::{CheckpointEnd, HeldOutput, Switchover};

/// A point both sides of the pair can name: an epoch, the exit sequence number it ends at (or
/// reached), and the output sequence number of the guest's next output byte there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Position {
    /// The epoch (at a boundary: the epoch that closes there; 0 at boot).
    pub epoch: u64,
    /// The exit sequence number.
    pub exit_seq: u64,
    /// Output sequence number of the guest's next output byte (every byte before it was
    /// produced by then).
    pub output_seq: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {} exit {} output {}",
            self.epoch, self.exit_seq, self.output_seq
        )
    }
}

impl From<&Switchover> for Position {
    /// Where the primary handed over its role.
    fn from(sw: &Switchover) -> Self {
        Self {
            epoch: sw.epoch,
            exit_seq: sw.exit_seq,
            output_seq: sw.output_seq,
        }
    }
}

impl Position {
    /// Where a checkpoint leaves the VM: the end of the epoch it closes, with the output the
    /// primary held then (sent with it) ending at the next output byte.
    pub fn after_checkpoint(end: &CheckpointEnd, held: &HeldOutput) -> Self {
        Self {
            epoch: end.epoch,
            exit_seq: end.exit_seq,
            output_seq: held.released_seq + held.data.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_as_epoch_exit_output() {
        let at = Position {
            epoch: 5,
            exit_seq: 1234,
            output_seq: 77,
        };
        assert_eq!(at.to_string(), "epoch 5 exit 1234 output 77");
        assert_eq!(Position::default().to_string(), "epoch 0 exit 0 output 0");
    }
}
