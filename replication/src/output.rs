//! The output buffer (DESIGN.md §3): guest output produced in epoch k waits here until the
//! standby has verified epoch k. Output sequence numbers count output bytes from the start
//! of the run, so both hosts number the same byte the same way.

use std::collections::VecDeque;
use std::time::Instant;

/// One stretch of output, all from one epoch.
#[derive(Debug)]
pub struct HeldOutput {
    /// The epoch that produced it.
    pub epoch: u64,
    /// Output sequence number of its first byte.
    pub seq: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// When the guest produced it.
    pub produced: Instant,
}

/// Output held until its epoch is verified.
#[derive(Debug, Default)]
pub struct OutputBuffer {
    held: VecDeque<HeldOutput>,
    /// Sequence number of the next byte produced.
    produced: u64,
    /// Every byte before this sequence number has been released.
    released: u64,
}

impl OutputBuffer {
    /// A buffer whose first byte has output sequence number `seq` (a primary that took
    /// over in a switchover: everything before was released by the old primary).
    pub fn starting_at(seq: u64) -> Self {
        Self {
            produced: seq,
            released: seq,
            ..Self::default()
        }
    }

    /// Holds `bytes` produced in `epoch` at `now`.
    pub fn hold(&mut self, epoch: u64, bytes: Vec<u8>, now: Instant) {
        let seq = self.produced;
        self.produced += bytes.len() as u64;
        match self.held.back_mut() {
            Some(last) if last.epoch == epoch => last.bytes.extend_from_slice(&bytes),
            _ => self.held.push_back(HeldOutput {
                epoch,
                seq,
                bytes,
                produced: now,
            }),
        }
    }

    /// Takes the output of every epoch up to and including `epoch`, oldest first.
    pub fn release_through(&mut self, epoch: u64) -> Vec<HeldOutput> {
        let n = self.held.iter().take_while(|h| h.epoch <= epoch).count();
        self.take(n)
    }

    /// Takes everything held.
    pub fn release_all(&mut self) -> Vec<HeldOutput> {
        self.take(self.held.len())
    }

    fn take(&mut self, n: usize) -> Vec<HeldOutput> {
        let out: Vec<_> = self.held.drain(..n).collect();
        if let Some(last) = out.last() {
            self.released = last.seq + last.bytes.len() as u64;
        }
        out
    }

    /// Counts `len` bytes that went out without being held (running unprotected).
    pub fn pass_through(&mut self, len: usize) {
        self.produced += len as u64;
        self.released = self.produced;
    }

    /// The held output as one stretch: its first sequence number and the bytes.
    pub fn held(&self) -> (u64, Vec<u8>) {
        let bytes = self
            .held
            .iter()
            .flat_map(|h| h.bytes.iter().copied())
            .collect();
        (self.released, bytes)
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> u64 {
        self.produced - self.released
    }

    /// The released output sequence number: every byte before it has been released.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// The output sequence number of the next byte.
    pub fn produced(&self) -> u64 {
        self.produced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_leaves_only_with_its_epoch_and_in_order() {
        let mut b = OutputBuffer::default();
        let now = Instant::now();
        b.hold(1, b"ab".to_vec(), now);
        b.hold(1, b"c".to_vec(), now);
        b.hold(2, b"de".to_vec(), now);
        b.hold(4, b"f".to_vec(), now);
        assert!(b.release_through(0).is_empty());
        let r = b.release_through(1);
        assert_eq!(
            (r.len(), r[0].seq, r[0].bytes.as_slice()),
            (1, 0, &b"abc"[..])
        );
        assert_eq!((b.released(), b.held_bytes()), (3, 3));
        let r = b.release_through(3);
        assert_eq!((r.len(), r[0].seq, r[0].epoch), (1, 3, 2));
        assert_eq!(b.released(), 5);
        b.pass_through(0);
        let r = b.release_all();
        assert_eq!((r.len(), r[0].seq), (1, 5));
        assert_eq!((b.released(), b.produced(), b.held_bytes()), (6, 6, 0));
        b.pass_through(4);
        assert_eq!((b.released(), b.produced()), (10, 10));
    }
}
