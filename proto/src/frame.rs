//! Framing: `[len: u32 LE][crc32c(payload): u32 LE][payload: len bytes]`, the payload one
//! prost message. Readers never trust a frame: length, checksum and decoding are checked, and
//! every error names the byte offset of the frame it is about.

use std::io::{self, Read, Write};

use prost::bytes::BytesMut;
use prost::Message;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest payload accepted.
pub const MAX_FRAME_LEN: u32 = 64 << 20;

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended inside a frame.
    #[error("truncated frame at offset {offset}: needed {needed} bytes, got {got}")]
    Truncated {
        /// Offset of the frame.
        offset: u64,
        /// Bytes the frame needs.
        needed: u64,
        /// Bytes that were there.
        got: u64,
    },
    /// The length field is impossible.
    #[error("frame at offset {offset} claims {len} bytes (limit {limit}): corrupt length")]
    TooLarge {
        /// Offset of the frame.
        offset: u64,
        /// The claimed length.
        len: u32,
        /// The limit where it was read.
        limit: u32,
    },
    /// The checksum does not match the payload.
    #[error("CRC mismatch in frame at offset {offset}: header says {expected:#010x}, payload has {actual:#010x}")]
    Crc {
        /// Offset of the frame.
        offset: u64,
        /// CRC in the header.
        expected: u32,
        /// CRC of the payload.
        actual: u32,
    },
    /// The payload is not a valid message.
    #[error("cannot decode frame at offset {offset}: {source}")]
    Decode {
        /// Offset of the frame.
        offset: u64,
        /// prost's reason.
        #[source]
        source: prost::DecodeError,
    },
    /// Reading failed.
    #[error("read error at offset {offset}: {source}")]
    Io {
        /// Offset reached.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl FrameError {
    /// The offset of the frame the error is about.
    pub fn offset(&self) -> u64 {
        match self {
            FrameError::Truncated { offset, .. }
            | FrameError::TooLarge { offset, .. }
            | FrameError::Crc { offset, .. }
            | FrameError::Decode { offset, .. }
            | FrameError::Io { offset, .. } => *offset,
        }
    }
}

/// Encodes `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, msg);
    out
}

/// Appends `msg` as one frame to `out` (no buffer of its own); returns the frame's length.
pub fn encode_into<M: Message>(out: &mut Vec<u8>, msg: &M) -> usize {
    let len = msg.encoded_len();
    let start = out.len();
    out.reserve(HEADER_LEN + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // Encoding into a Vec grows it as needed, so it cannot run out of room.
    msg.encode(out).unwrap_or_default();
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Writes `msg` as one frame.
pub fn write<M: Message, W: Write>(w: &mut W, msg: &M) -> io::Result<usize> {
    let frame = encode(msg);
    w.write_all(&frame)?;
    Ok(frame.len())
}

/// Reads frames from a byte stream, tracking the offset.
pub struct FrameReader<R> {
    inner: R,
    offset: u64,
    buf: Vec<u8>,
    limit: u32,
}

impl<R: Read> FrameReader<R> {
    /// A reader whose first frame starts at `offset` in the underlying stream.
    pub fn new(inner: R, offset: u64) -> Self {
        Self {
            inner,
            offset,
            buf: Vec::new(),
            limit: MAX_FRAME_LEN,
        }
    }

    /// Accepts payloads of at most `limit` bytes (a frame read before its peer is
    /// authenticated is capped at a few KiB), never above [`MAX_FRAME_LEN`].
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = limit.min(MAX_FRAME_LEN);
        self
    }

    /// Offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads until `buf` is full or EOF; returns the bytes read.
    fn fill(&mut self, len: usize) -> Result<usize, FrameError> {
        self.buf.resize(len, 0);
        let mut got = 0;
        while got < len {
            match self.inner.read(&mut self.buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(FrameError::Io {
                        offset: self.offset + got as u64,
                        source,
                    })
                }
            }
        }
        Ok(got)
    }

    /// The next frame with its offset, or None at a clean end of stream (EOF exactly at a
    /// frame boundary).
    pub fn read_frame<M: Message + Default>(&mut self) -> Result<Option<(u64, M)>, FrameError> {
        let offset = self.offset;
        let got = self.fill(HEADER_LEN)?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            return Err(FrameError::Truncated {
                offset,
                needed: HEADER_LEN as u64,
                got: got as u64,
            });
        }
        let (len, expected) = parse_header(&self.buf, offset, self.limit)?;
        let got = self.fill(len)?;
        if got < len {
            return Err(FrameError::Truncated {
                offset,
                needed: (HEADER_LEN + len) as u64,
                got: (HEADER_LEN + got) as u64,
            });
        }
        let msg = check_payload(&self.buf, expected, offset)?;
        self.offset += (HEADER_LEN + len) as u64;
        Ok(Some((offset, msg)))
    }
}

/// The payload length and CRC of the frame header at the start of `buf` (at least
/// [`HEADER_LEN`] bytes), for the frame at stream offset `offset`.
fn parse_header(buf: &[u8], offset: u64, limit: u32) -> Result<(usize, u32), FrameError> {
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > limit {
        return Err(FrameError::TooLarge { offset, len, limit });
    }
    Ok((len as usize, crc))
}

/// Checks `payload` against the header's CRC and decodes it.
fn check_payload<M: Message + Default>(
    payload: &[u8],
    expected: u32,
    offset: u64,
) -> Result<M, FrameError> {
    let actual = crc32c::crc32c(payload);
    if actual != expected {
        return Err(FrameError::Crc {
            offset,
            expected,
            actual,
        });
    }
    M::decode(payload).map_err(|source| FrameError::Decode { offset, source })
}

/// Decodes the frame at the start of `buf` (bytes received so far from a non-blocking
/// stream; the frame sits at stream offset `offset`). Returns the message and the frame's
/// length in bytes, or None when `buf` does not hold the whole frame yet. A damaged frame is
/// an error as soon as its header or its payload is complete.
pub fn decode_from<M: Message + Default>(
    buf: &[u8],
    offset: u64,
) -> Result<Option<(M, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (len, expected) = parse_header(buf, offset, MAX_FRAME_LEN)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let msg = check_payload(payload, expected, offset)?;
    Ok(Some((msg, HEADER_LEN + len)))
}

/// [`decode_from`] for received bytes held in a `BytesMut`: the whole frame is split off
/// `buf` and the message's `bytes` fields that prost maps to `Bytes` (a batch's packed
/// records) are slices of it, not copies.
pub fn decode_split<M: Message + Default>(
    buf: &mut BytesMut,
    offset: u64,
) -> Result<Option<M>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (len, expected) = parse_header(buf, offset, MAX_FRAME_LEN)?;
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let actual = crc32c::crc32c(&buf[HEADER_LEN..HEADER_LEN + len]);
    if actual != expected {
        return Err(FrameError::Crc {
            offset,
            expected,
            actual,
        });
    }
    let mut frame = buf.split_to(HEADER_LEN + len).freeze();
    let payload = frame.split_off(HEADER_LEN);
    M::decode(payload)
        .map(Some)
        .map_err(|source| FrameError::Decode { offset, source })
}

/// How far into an incomplete frame a stream ended: for reporting a peer that closed
/// mid-frame. `buf` holds the bytes of the frame received so far.
pub fn truncated(buf: &[u8], offset: u64) -> FrameError {
    let needed = if buf.len() >= HEADER_LEN {
        parse_header(buf, offset, MAX_FRAME_LEN).map_or(HEADER_LEN, |(len, _)| HEADER_LEN + len)
    } else {
        HEADER_LEN
    };
    FrameError::Truncated {
        offset,
        needed: needed as u64,
        got: buf.len() as u64,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::log::{self, record, LogFrame, Record, RecordBatch};
    use proptest::prelude::*;

    /// Any record kind, with any field values (shared with `packed`'s tests).
    pub(crate) fn kind() -> impl Strategy<Value = record::Kind> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..16);
        prop_oneof![
            (any::<u16>(), 1u32..5, bytes()).prop_map(|(p, s, v)| record::Kind::PioRead(
                log::PioRead {
                    port: u32::from(p),
                    size: s,
                    value: v
                }
            )),
            (any::<u64>(), 1u32..9, bytes()).prop_map(|(a, s, v)| record::Kind::MmioRead(
                log::MmioRead {
                    addr: a,
                    size: s,
                    value: v
                }
            )),
            any::<u8>().prop_map(|v| record::Kind::Interrupt(log::Interrupt {
                vector: u32::from(v)
            })),
            Just(record::Kind::InterruptWindow(log::InterruptWindow {})),
            (any::<u64>(), bytes()).prop_map(|(gpa, data)| record::Kind::GuestWrite(
                log::GuestWrite {
                    gpa,
                    data,
                    ..Default::default()
                }
            )),
            (
                any::<bool>(),
                proptest::option::of(any::<u64>()),
                bytes(),
                proptest::collection::vec(bytes(), 0..3)
            )
                .prop_map(|(halted, clock_ns, serial, net_rx)| record::Kind::Inputs(
                    log::Inputs {
                        halted,
                        clock_ns,
                        serial,
                        net_rx,
                    }
                )),
            (any::<u64>(), any::<u64>(), bytes(), any::<bool>()).prop_map(|(e, s, d, c)| {
                record::Kind::EpochEnd(log::EpochEnd {
                    epoch: e,
                    exit_seq: s,
                    digest: d,
                    checkpoint_required: c,
                })
            }),
            any::<u8>().prop_map(|s| record::Kind::RunEnd(log::RunEnd {
                stop: Some(log::run_end::Stop::ExitStatus(u32::from(s)))
            })),
            any::<u64>().prop_map(|v| record::Kind::TscRead(log::TscRead { value: v })),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 32)
            )
                .prop_map(|(disk, sector, length, hash)| record::Kind::DiskRead(
                    log::DiskRead {
                        disk,
                        sector,
                        length,
                        hash,
                    }
                )),
        ]
    }

    fn batch() -> impl Strategy<Value = RecordBatch> {
        (
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<bool>(), kind()), 0..40),
        )
            .prop_map(|(complete_through, records)| RecordBatch {
                complete_through,
                records: records
                    .into_iter()
                    .map(|(exit_seq, at_kick, k)| Record {
                        exit_seq,
                        at_kick,
                        kind: Some(k),
                    })
                    .collect(),
                packed: Default::default(),
            })
    }

    proptest! {
        #[test]
        fn record_batches_survive_encode_frame_decode(batches in proptest::collection::vec(batch(), 1..8)) {
            let mut stream = Vec::new();
            for b in &batches {
                write(&mut stream, &LogFrame { body: Some(log::log_frame::Body::Batch(b.clone())) }).unwrap();
            }
            let mut r = FrameReader::new(stream.as_slice(), 0);
            for b in &batches {
                let (_, f) = r.read_frame::<LogFrame>().unwrap().unwrap();
                prop_assert_eq!(f.body, Some(log::log_frame::Body::Batch(b.clone())));
            }
            prop_assert!(r.read_frame::<LogFrame>().unwrap().is_none());
        }

        #[test]
        fn any_single_flipped_byte_is_detected(b in batch(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut frame = encode(&LogFrame { body: Some(log::log_frame::Body::Batch(b)) });
            let i = pos.index(frame.len());
            frame[i] ^= 1 << bit;
            let mut r = FrameReader::new(frame.as_slice(), 100);
            let err = r.read_frame::<LogFrame>().unwrap_err();
            prop_assert_eq!(err.offset(), 100);
        }
    }

    #[test]
    fn truncation_is_reported_with_the_frame_offset() {
        let a = encode(&LogFrame::default());
        let b = encode(&LogFrame {
            body: Some(log::log_frame::Body::Batch(RecordBatch {
                complete_through: 7,
                records: vec![],
                packed: Default::default(),
            })),
        });
        let mut stream = [a.clone(), b.clone()].concat();
        stream.truncate(a.len() + b.len() - 1);
        let mut r = FrameReader::new(stream.as_slice(), 8);
        assert!(r.read_frame::<LogFrame>().unwrap().is_some());
        let err = r.read_frame::<LogFrame>().unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { offset, .. } if offset == 8 + a.len() as u64)
        );
        assert!(err
            .to_string()
            .starts_with(&format!("truncated frame at offset {}", 8 + a.len())));
    }

    #[test]
    fn an_absurd_length_is_refused_before_allocating() {
        let mut frame = vec![0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
        frame.extend_from_slice(&[0; 16]);
        let err = FrameReader::new(frame.as_slice(), 0)
            .read_frame::<LogFrame>()
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { offset: 0, .. }));
    }

    /// Before its peer is authenticated a reader is capped at a few KiB: a 5 KiB length
    /// is refused from the header alone.
    #[test]
    fn a_capped_reader_refuses_a_frame_over_its_limit_from_the_header() {
        let mut frame = (5u32 << 10).to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 4]);
        let err = FrameReader::new(frame.as_slice(), 8)
            .with_limit(4 << 10)
            .read_frame::<LogFrame>()
            .unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    offset: 8,
                    len: 5120,
                    limit: 4096
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn decode_split_slices_the_packed_records_out_of_the_received_buffer() {
        let batch = RecordBatch {
            complete_through: 9,
            records: vec![],
            packed: crate::packed::pack(&[Record {
                exit_seq: 9,
                at_kick: false,
                kind: Some(record::Kind::InterruptWindow(log::InterruptWindow {})),
            }]),
        };
        let a = encode(&LogFrame {
            body: Some(log::log_frame::Body::Batch(batch.clone())),
        });
        let mut rx = BytesMut::new();
        rx.extend_from_slice(&a[..a.len() - 1]);
        assert!(decode_split::<LogFrame>(&mut rx, 0).unwrap().is_none());
        rx.extend_from_slice(&a[a.len() - 1..]);
        rx.extend_from_slice(&a[..3]);
        let base = rx.as_ptr() as usize;
        let got = decode_split::<LogFrame>(&mut rx, 0).unwrap().unwrap();
        let Some(log::log_frame::Body::Batch(b)) = got.body else {
            panic!("not a batch: {got:?}");
        };
        assert_eq!(b, batch);
        // The block is a slice of the received bytes, not a copy.
        let at = b.packed.as_ptr() as usize;
        assert!(
            at > base && at < base + a.len(),
            "the packed block was copied"
        );
        assert_eq!(&rx[..], &a[..3]);
        let mut damaged = BytesMut::from(&a[..]);
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(matches!(
            decode_split::<LogFrame>(&mut damaged, 5),
            Err(FrameError::Crc { offset: 5, .. })
        ));
    }

    #[test]
    fn decode_from_waits_for_the_whole_frame_then_consumes_exactly_it() {
        let a = encode(&LogFrame {
            body: Some(log::log_frame::Body::Batch(RecordBatch {
                complete_through: 9,
                records: vec![],
                packed: Default::default(),
            })),
        });
        let stream = [a.clone(), a.clone()].concat();
        for cut in 0..a.len() {
            assert!(decode_from::<LogFrame>(&stream[..cut], 0)
                .unwrap()
                .is_none());
        }
        let (f, used) = decode_from::<LogFrame>(&stream, 0).unwrap().unwrap();
        assert_eq!(used, a.len());
        assert!(
            matches!(f.body, Some(log::log_frame::Body::Batch(ref b)) if b.complete_through == 9)
        );
        let mut bad = stream.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(matches!(
            decode_from::<LogFrame>(&bad, 40),
            Err(FrameError::Crc { offset: 40, .. })
        ));
        let err = truncated(&stream[..a.len() - 1], 7);
        assert!(
            matches!(err, FrameError::Truncated { offset: 7, .. }),
            "{err}"
        );
    }
}
