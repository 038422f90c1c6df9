//! What reached the primary's stdout (DESIGN.md §3): `Released { output_seq }` tells the
//! standby that every byte before `output_seq` reached the client, so after a failover it
//! re-emits only what lies past it. The core counts a byte released once the output rule
//! lets it go; the driver writes it. [`Written`] keeps the two apart: released output
//! counts only bytes that were written (and flushed). A write that fails stops the count
//! there for good (a later write that succeeds would leave a hole the client never saw);
//! the bytes released since are kept, up to [`KEEP_UNWRITTEN`], and travel in the next
//! checkpoint's `HeldOutput`, so a standby that goes live re-emits them: a byte may appear
//! twice, never be lost.

use std::io::Write;

use ftvm_proto::channel::{message::Body, Message};

/// The most unwritten released output kept for `HeldOutput`.
pub(super) const KEEP_UNWRITTEN: usize = 64 << 20;

/// The output sequence number through which bytes reached the primary's output.
#[derive(Debug, Default)]
pub(super) struct Written {
    /// Every byte before this one was written and flushed (None: nothing released yet).
    through: Option<u64>,
    /// Why writing failed, once it did.
    broken: Option<String>,
    /// Bytes released from `through` on that were not written (while they fit the cap).
    unwritten: Vec<u8>,
    /// The unwritten bytes outgrew the cap: `HeldOutput` can no longer carry them.
    overflowed: bool,
}

impl Written {
    /// Writes released bytes `seq..seq + bytes.len()` to `out`.
    pub(super) fn release(&mut self, out: &mut dyn Write, seq: u64, bytes: &[u8]) {
        let through = *self.through.get_or_insert(seq);
        if self.broken.is_none() && through == seq {
            match out.write_all(bytes).and_then(|()| out.flush()) {
                Ok(()) => {
                    self.through = Some(seq + bytes.len() as u64);
                    return;
                }
                Err(e) => {
                    tracing::error!(
                        "cannot write guest output ({e}): bytes from sequence {seq} on are not counted as released; a standby that goes live re-emits them"
                    );
                    self.broken = Some(e.to_string());
                }
            }
        }
        if self.overflowed || self.unwritten.len() + bytes.len() > KEEP_UNWRITTEN {
            self.overflowed = true;
            self.unwritten = Vec::new();
        } else {
            self.unwritten.extend_from_slice(bytes);
        }
    }

    /// Fits a message to the standby to what was written: `Released` never names a byte
    /// that was not written; `HeldOutput` carries the unwritten bytes before what it holds.
    pub(super) fn fit(&self, msg: &mut Message) {
        let Some(through) = self.through else { return };
        match &mut msg.body {
            Some(Body::Released(r)) => r.output_seq = r.output_seq.min(through),
            Some(Body::HeldOutput(h)) if h.released_seq > through && !self.overflowed => {
                let missing = (h.released_seq - through) as usize;
                if let Some(gap) = self.unwritten.get(..missing) {
                    let mut data = gap.to_vec();
                    data.extend_from_slice(&h.data);
                    h.data = data;
                    h.released_seq = through;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::channel::{HeldOutput, Released};

    /// A writer that takes `room` bytes, then fails.
    struct Failing {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.got.len() >= self.room {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            let n = buf.len().min(self.room - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn released(w: &Written, seq: u64) -> u64 {
        let mut m = Message {
            body: Some(Body::Released(Released { output_seq: seq })),
        };
        w.fit(&mut m);
        match m.body {
            Some(Body::Released(r)) => r.output_seq,
            _ => unreachable!(),
        }
    }

    #[test]
    fn released_counts_only_bytes_that_were_written() {
        let mut out = Failing {
            got: Vec::new(),
            room: 8,
        };
        let mut w = Written::default();
        w.release(&mut out, 100, b"tick 1\n");
        assert_eq!(released(&w, 107), 107);
        // The next line is cut after one byte: none of it counts.
        w.release(&mut out, 107, b"tick 2\n");
        assert_eq!(released(&w, 114), 107);
        // Writing works again? The hole stays: nothing after it counts either.
        out.room = usize::MAX;
        w.release(&mut out, 114, b"tick 3\n");
        assert_eq!(released(&w, 121), 107);
        assert_eq!(out.got, b"tick 1\nt");
        // A checkpoint's held output carries what was released and not written.
        let mut m = Message {
            body: Some(Body::HeldOutput(HeldOutput {
                checkpoint: 1,
                released_seq: 121,
                data: b"tick 4\n".to_vec(),
            })),
        };
        w.fit(&mut m);
        let Some(Body::HeldOutput(h)) = m.body else {
            unreachable!()
        };
        assert_eq!(h.released_seq, 107);
        assert_eq!(h.data, b"tick 2\ntick 3\ntick 4\n");
    }

    #[test]
    fn a_healthy_output_changes_nothing() {
        let mut out = Vec::new();
        let mut w = Written::default();
        assert_eq!(released(&w, 5), 5);
        w.release(&mut out, 0, b"ab");
        w.release(&mut out, 2, b"cd");
        assert_eq!(released(&w, 4), 4);
        let mut m = Message {
            body: Some(Body::HeldOutput(HeldOutput {
                checkpoint: 1,
                released_seq: 4,
                data: b"e".to_vec(),
            })),
        };
        w.fit(&mut m);
        let Some(Body::HeldOutput(h)) = m.body else {
            unreachable!()
        };
        assert_eq!((h.released_seq, h.data), (4, b"e".to_vec()));
    }
}
