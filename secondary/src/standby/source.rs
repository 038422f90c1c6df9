//! What the standby's replayer reads and writes: the log as the channel thread hands it over
//! ([`ChannelSource`]) and the guest's output, held until the primary released it or the
//! standby goes live ([`ReplayedOutput`]).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::StandbyError;
use crossbeam_channel::Receiver;
use ftvm_proto::channel::Switchover;
use ftvm_proto::log::record::Kind;
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
    /// The last virtual clock the log carried, and when this standby took the batch that
    /// carried it (none since the last checkpoint installed: it set the clock itself).
    pub(super) clock_anchor: Option<(u64, Instant)>,
}

impl ChannelSource {
    /// The log as `rx` hands it over.
    pub(super) fn new(rx: Receiver<ToReplayer>) -> Self {
        Self {
            rx,
            batches: 0,
            lost: None,
            stop: None,
            switchover: None,
            clock_anchor: None,
        }
    }

    /// The virtual clock a VM at `clock_ns` (everything received replayed) goes live with:
    /// the primary's guest time did not stop at its last logged clock, nor does the wall
    /// clock stop while a failover runs. Virtual time goes on from the last clock the log
    /// carried by the time since this standby took it, an underestimate of how far the
    /// primary's clock got (the primary read it before sending it), so that a timer due
    /// while the primary was dying fires at go-live instead of a whole period later
    /// (DESIGN.md §5). Only forward: a VM whose clock is not that last logged one (a
    /// checkpoint installed since) goes on from its own.
    pub(super) fn go_live_clock(&self, clock_ns: u64) -> u64 {
        match self.clock_anchor {
            Some((logged, taken)) if logged == clock_ns => {
                let since = u64::try_from(taken.elapsed().as_nanos()).unwrap_or(u64::MAX);
                clock_ns.saturating_add(since.min(MAX_CLOCK_CATCH_UP_NS))
            }
            _ => clock_ns,
        }
    }

    fn note_clock(&mut self, batch: &RecordBatch) {
        let last = batch.records.iter().rev().find_map(|r| match &r.kind {
            Some(Kind::Inputs(i)) => i.clock_ns,
            _ => None,
        });
        if let Some(ns) = last {
            self.clock_anchor = Some((ns, Instant::now()));
        }
    }
}

/// The most virtual time a go-live adds to the last logged clock (a standby that heard
/// nothing for this long had lost its primary long before).
const MAX_CLOCK_CATCH_UP_NS: u64 = Duration::from_secs(60).as_nanos() as u64;

impl LogSource for ChannelSource {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError> {
        match self.rx.recv() {
            Ok(ToReplayer::Batch(b)) => {
                self.batches += 1;
                self.note_clock(&b);
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

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::log::{Inputs, Record};

    fn clock_batch(ns: u64) -> RecordBatch {
        RecordBatch {
            complete_through: 3,
            records: vec![Record {
                exit_seq: 3,
                at_kick: false,
                kind: Some(Kind::Inputs(Inputs {
                    clock_ns: Some(ns),
                    ..Default::default()
                })),
            }],
            packed: Default::default(),
        }
    }

    #[test]
    fn going_live_moves_the_last_logged_clock_on_by_the_time_since_it_came() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut source = ChannelSource::new(rx);
        // No clock logged yet: the VM's own.
        assert_eq!(source.go_live_clock(7), 7);
        tx.send(ToReplayer::Batch(clock_batch(50_000_000)))
            .expect("send");
        assert!(source.next_batch().expect("a batch").is_some());
        std::thread::sleep(Duration::from_millis(20));
        let live = source.go_live_clock(50_000_000);
        assert!(
            (70_000_000..50_000_000 + MAX_CLOCK_CATCH_UP_NS).contains(&live),
            "{live}"
        );
        // A VM whose clock is not the last logged one (a checkpoint set it) keeps its own.
        assert_eq!(source.go_live_clock(60_000_000), 60_000_000);
        source.clock_anchor = None;
        assert_eq!(source.go_live_clock(50_000_000), 50_000_000);
    }
}
