//! What the standby's replayer reads and writes: the log as the channel thread hands it over
//! ([`ChannelSource`]) and the guest's output, held until the primary released it or the
//! standby goes live ([`ReplayedOutput`]).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::StandbyError;
use crossbeam_channel::Receiver;
use ftvm_proto::channel::Switchover;
use ftvm_proto::log::RecordBatch;
use ftvm_replication::log::{LogError, LogSource};
use ftvm_replication::standby::ToReplayer;

/// The log as it streams in from the channel thread.
pub struct ChannelSource {
    pub(super) rx: Receiver<ToReplayer>,
    pub(super) batches: u64,
    pub(super) lost: Option<String>,
    /// The pair's rules stopped this standby (`Abandon`, or the primary won the term).
    pub(super) stop: Option<StandbyError>,
    /// The primary handed over its role here: the log ends.
    pub(super) switchover: Option<Switchover>,
}

impl LogSource for ChannelSource {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError> {
        match self.rx.recv() {
            Ok(ToReplayer::Batch(b)) => {
                self.batches += 1;
                Ok(Some(b))
            }
            Ok(ToReplayer::PrimaryLost(why)) => {
                self.lost = Some(why);
                Ok(None)
            }
            Ok(ToReplayer::Abandoned(why)) => {
                self.stop = Some(StandbyError::Abandoned(why));
                Ok(None)
            }
            Ok(ToReplayer::Fenced(why)) => {
                self.stop = Some(StandbyError::Fenced(why));
                Ok(None)
            }
            Ok(ToReplayer::Switchover(sw)) => {
                self.switchover = Some(sw);
                Ok(None)
            }
            Ok(ToReplayer::Pages(_) | ToReplayer::CheckpointEnd { .. }) => {
                Err(LogError::Malformed {
                    offset: self.batches,
                    why: "a checkpoint this standby did not ask for".into(),
                })
            }
            Err(_) => Ok(None),
        }
    }

    fn offset(&self) -> u64 {
        self.batches
    }
}

/// The replayed guest's output, kept from the primary's last known release on: after go-live
/// exactly that part is emitted again.
pub struct ReplayedOutput {
    pub(super) released: Arc<AtomicU64>,
    /// Output sequence number of `pending[0]`.
    pub(super) base: u64,
    pub(super) pending: Vec<u8>,
}

impl ReplayedOutput {
    pub(super) fn trim(&mut self) {
        let released = self.released.load(Ordering::SeqCst);
        if released > self.base {
            let n = (released - self.base).min(self.pending.len() as u64);
            self.pending.drain(..n as usize);
            self.base += n;
        }
    }

    /// Output sequence number of the next byte.
    pub fn produced(&self) -> u64 {
        self.base + self.pending.len() as u64
    }

    /// The output the primary has not reported released: its first sequence number and the
    /// bytes.
    pub fn unreleased(&mut self) -> (u64, Vec<u8>) {
        self.trim();
        (self.base, std::mem::take(&mut self.pending))
    }
}

impl Write for ReplayedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.trim();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
