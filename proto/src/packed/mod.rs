//! The packed record block: how a [`RecordBatch`](crate::log::RecordBatch)'s records travel
//! (its `packed` field) in log format 3 and pair protocol 7.
//!
//! The frequent, fixed-size kinds (port and MMIO reads of up to 8 bytes, interrupts,
//! interrupt windows, input polls without serial bytes) are one fixed-width slot each, read
//! without a protobuf decoder and without an allocation. Everything else (epoch ends, run
//! ends, guest writes, serial input, string I/O, and any kind added to `Record` later) is an
//! escape: a length-prefixed prost-encoded `Record`, so a new kind needs no change here.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! block   = header slot*
//! header  = version:u8 (= 1) | 0:u8 ×3 | count:u32 | base_exit_seq:u64           16 bytes
//! fixed   = kind:u8 (1..=5) | flags:u8 | size:u8 | 0:u8 | exit_delta:u32
//!           | a:u64 | b:u64                                                      24 bytes
//! escape  = 0:u8 | 0:u8 ×3 | len:u32 | len bytes of a prost `Record`
//! ```
//!
//! A fixed slot's exit sequence number is `base_exit_seq + exit_delta`. Per kind:
//!
//! | kind | name | a | b | size | flags |
//! |---|---|---|---|---|---|
//! | 1 | `PioRead` | port | value | bytes of value (1..=8) | at_kick |
//! | 2 | `MmioRead` | address | value | bytes of value (1..=8) | at_kick |
//! | 3 | `Interrupt` | vector | 0 | 0 | at_kick |
//! | 4 | `InterruptWindow` | 0 | 0 | 0 | at_kick |
//! | 5 | `Inputs` (no serial bytes, no frames) | 0 | clock ns | 0 | at_kick, halted, has clock |
//!
//! A decoder never trusts a block: every length, kind, flag, size, padding byte and escape is
//! checked, and every error names the byte offset in the block it is about.

use prost::bytes::Bytes;
use prost::Message;

use crate::log::{
    record::Kind, Inputs, Interrupt, InterruptWindow, MmioRead, PioRead, Record, RecordBatch,
};

/// The block layout this build writes and reads (the block's first byte).
pub const BLOCK_VERSION: u8 = 1;
/// Bytes of the block header.
pub const HEADER_LEN: usize = 16;
/// Bytes of a fixed slot.
pub const SLOT_LEN: usize = 24;
/// Bytes of an escape's head (before the encoded record).
pub const ESCAPE_HEAD_LEN: usize = 8;

const ESCAPE: u8 = 0;
const PIO_READ: u8 = 1;
const MMIO_READ: u8 = 2;
const INTERRUPT: u8 = 3;
const INTERRUPT_WINDOW: u8 = 4;
const INPUTS: u8 = 5;

const AT_KICK: u8 = 1;
const HALTED: u8 = 2;
const HAS_CLOCK: u8 = 4;

/// A packed block that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackedError {
    /// The block is shorter than what it says it holds.
    #[error("packed records: truncated at byte {at}: needed {needed} bytes, {have} left")]
    Truncated {
        /// Offset in the block.
        at: usize,
        /// Bytes needed there.
        needed: usize,
        /// Bytes left.
        have: usize,
    },
    /// The block was written by another layout.
    #[error("packed records: block version {found} (this ftvm reads version {BLOCK_VERSION})")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// An unknown slot kind.
    #[error("packed records: unknown record kind {kind} at byte {at}")]
    Kind {
        /// Offset of the slot.
        at: usize,
        /// The kind byte.
        kind: u8,
    },
    /// A field is out of its range, or a byte that must be zero is not.
    #[error("packed records: bad slot at byte {at}: {what}")]
    Field {
        /// Offset of the slot.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// An escaped record does not decode.
    #[error("packed records: escaped record at byte {at} does not decode: {source}")]
    Escape {
        /// Offset of the escape.
        at: usize,
        /// prost's reason.
        #[source]
        source: prost::DecodeError,
    },
    /// The count in the header does not match the slots.
    #[error("packed records: header says {declared} records, block holds {found} then {trailing} more bytes")]
    Count {
        /// The header's count.
        declared: u32,
        /// Records read.
        found: u32,
        /// Bytes after them.
        trailing: usize,
    },
}

/// Builds a block, record by record.
#[derive(Debug)]
pub struct PackedWriter {
    buf: Vec<u8>,
    count: u32,
    base: u64,
}

impl PackedWriter {
    /// A writer whose fixed slots count exit sequence numbers from `base_exit_seq` (the
    /// first record's; a record before it, or more than `u32::MAX` after it, is escaped).
    pub fn new(base_exit_seq: u64, records: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + records * SLOT_LEN);
        buf.push(BLOCK_VERSION);
        buf.extend_from_slice(&[0; 3]);
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&base_exit_seq.to_le_bytes());
        Self {
            buf,
            count: 0,
            base: base_exit_seq,
        }
    }

    #[inline]
    fn delta(&self, exit_seq: u64) -> Option<u32> {
        exit_seq
            .checked_sub(self.base)
            .and_then(|d| u32::try_from(d).ok())
    }

    /// Appends a fixed slot; false (nothing written) when `exit_seq` has no delta.
    #[inline]
    fn slot(&mut self, exit_seq: u64, head: [u8; 3], a: u64, b: u64) -> bool {
        let Some(delta) = self.delta(exit_seq) else {
            return false;
        };
        let w0 = u64::from(head[0])
            | u64::from(head[1]) << 8
            | u64::from(head[2]) << 16
            | u64::from(delta) << 32;
        let mut slot = [0u8; SLOT_LEN];
        slot[..8].copy_from_slice(&w0.to_le_bytes());
        slot[8..16].copy_from_slice(&a.to_le_bytes());
        slot[16..24].copy_from_slice(&b.to_le_bytes());
        // One copy of the whole slot.
        self.buf.extend_from_slice(&slot);
        self.count += 1;
        true
    }

    /// A port read of `value` (1 to 8 bytes) at `exit_seq`, without building a `Record`.
    #[inline]
    pub fn pio_read(&mut self, exit_seq: u64, at_kick: bool, port: u16, value: &[u8]) {
        if !(1..=8).contains(&value.len())
            || !self.slot(
                exit_seq,
                [PIO_READ, flag(at_kick, AT_KICK), value.len() as u8],
                u64::from(port),
                le_value(value),
            )
        {
            self.escape(&Record {
                exit_seq,
                at_kick,
                kind: Some(Kind::PioRead(PioRead {
                    port: u32::from(port),
                    size: value.len() as u32,
                    value: value.to_vec(),
                })),
            });
        }
    }

    /// Appends `record`: a fixed slot when its kind and fields fit one, else an escape.
    pub fn push(&mut self, record: &Record) {
        let at_kick = flag(record.at_kick, AT_KICK);
        let seq = record.exit_seq;
        let fixed = match &record.kind {
            Some(Kind::PioRead(r)) if r.port <= 0xffff && fits(r.size, &r.value) => self.slot(
                seq,
                [PIO_READ, at_kick, r.size as u8],
                u64::from(r.port),
                le_value(&r.value),
            ),
            Some(Kind::MmioRead(r)) if fits(r.size, &r.value) => self.slot(
                seq,
                [MMIO_READ, at_kick, r.size as u8],
                r.addr,
                le_value(&r.value),
            ),
            Some(Kind::Interrupt(i)) if i.vector <= 0xff => {
                self.slot(seq, [INTERRUPT, at_kick, 0], u64::from(i.vector), 0)
            }
            Some(Kind::InterruptWindow(_)) => self.slot(seq, [INTERRUPT_WINDOW, at_kick, 0], 0, 0),
            Some(Kind::Inputs(i)) if i.serial.is_empty() && i.net_rx.is_empty() => {
                let flags =
                    at_kick | flag(i.halted, HALTED) | flag(i.clock_ns.is_some(), HAS_CLOCK);
                self.slot(seq, [INPUTS, flags, 0], 0, i.clock_ns.unwrap_or(0))
            }
            _ => false,
        };
        if !fixed {
            self.escape(record);
        }
    }

    #[inline(never)]
    fn escape(&mut self, record: &Record) {
        let len = record.encoded_len();
        self.buf.extend_from_slice(&[ESCAPE, 0, 0, 0]);
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.reserve(len);
        // Encoding into a Vec with room reserved cannot fail.
        let _ = record.encode(&mut self.buf);
        self.count += 1;
    }

    /// Records appended so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// No record appended yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The finished block.
    pub fn finish(mut self) -> Bytes {
        self.buf[4..8].copy_from_slice(&self.count.to_le_bytes());
        Bytes::from(self.buf)
    }
}

#[inline]
fn flag(on: bool, bit: u8) -> u8 {
    if on {
        bit
    } else {
        0
    }
}

#[inline]
fn fits(size: u32, value: &[u8]) -> bool {
    (1..=8).contains(&size) && value.len() == size as usize
}

#[inline]
fn le_value(value: &[u8]) -> u64 {
    // The usual sizes without a variable-length copy.
    match *value {
        [a] => u64::from(a),
        [a, b] => u64::from(u16::from_le_bytes([a, b])),
        [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
        _ => {
            let mut b = [0u8; 8];
            b[..value.len()].copy_from_slice(value);
            u64::from_le_bytes(b)
        }
    }
}

/// `records` as one block.
pub fn pack(records: &[Record]) -> Bytes {
    let mut w = PackedWriter::new(records.first().map_or(0, |r| r.exit_seq), records.len());
    for r in records {
        w.push(r);
    }
    w.finish()
}

/// `batch` with its records moved into `packed` (what a log file or the channel carries).
pub fn pack_batch(batch: RecordBatch) -> RecordBatch {
    if batch.records.is_empty() {
        return batch;
    }
    RecordBatch {
        complete_through: batch.complete_through,
        packed: pack(&batch.records),
        records: Vec::new(),
    }
}

/// `batch` with its `packed` block decoded into `records`. A batch that carries records
/// outside the block is refused: format 3 keeps them all in the block.
pub fn unpack_batch(batch: RecordBatch) -> Result<RecordBatch, PackedError> {
    if !batch.records.is_empty() {
        return Err(PackedError::Field {
            at: 0,
            what: "the batch carries unpacked records (format 3 packs them all)",
        });
    }
    if batch.packed.is_empty() {
        return Ok(batch);
    }
    let records = unpack(&batch.packed)?;
    Ok(RecordBatch {
        complete_through: batch.complete_through,
        records,
        packed: Bytes::new(),
    })
}

/// Every record of `block`.
pub fn unpack(block: &[u8]) -> Result<Vec<Record>, PackedError> {
    let slots = Slots::new(block)?;
    let mut out = Vec::with_capacity(slots.remaining as usize);
    for slot in slots {
        out.push(slot?.to_record()?);
    }
    Ok(out)
}

/// Checks every record of `block` in one pass and returns how many it holds: each fixed
/// slot is checked in place (nothing is built for it), each escaped record's encoding is
/// handed to `escaped` with its offset in the block (an error it returns ends the check).
/// Accepts exactly the blocks whose [`Slots`] all read without an error.
pub fn check<'a>(
    block: &'a [u8],
    mut escaped: impl FnMut(usize, &'a [u8]) -> Result<(), PackedError>,
) -> Result<u32, PackedError> {
    let mut slots = Slots::new(block)?;
    while slots.remaining > 0 {
        let at = slots.at;
        if let Some(slot) = block.get(at..at + SLOT_LEN) {
            let w0 = u64::from_le_bytes(arr(&slot[..8]));
            let a = u64::from_le_bytes(arr(&slot[8..16]));
            let b = u64::from_le_bytes(arr(&slot[16..24]));
            if fixed_slot(slots.base, w0, a, b).is_some() {
                slots.at = at + SLOT_LEN;
                slots.remaining -= 1;
                continue;
            }
        }
        if let Slot::Escaped { at, encoded } = slots.next_slot()? {
            escaped(at, encoded)?;
        }
        slots.remaining -= 1;
    }
    if slots.at != block.len() {
        return Err(PackedError::Count {
            declared: slots.declared,
            found: slots.declared,
            trailing: block.len() - slots.at,
        });
    }
    Ok(slots.declared)
}

/// One record of a block, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot<'a> {
    /// A fixed slot.
    Fixed(Fixed),
    /// An escaped record: its offset in the block and its prost encoding.
    Escaped {
        /// Offset of the escape in the block.
        at: usize,
        /// The encoded `Record`.
        encoded: &'a [u8],
    },
}

/// A fixed slot's fields (already checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// Exit sequence number.
    pub exit_seq: u64,
    /// Belongs to a kick after `exit_seq`.
    pub at_kick: bool,
    /// What it records.
    pub kind: FixedKind,
}

/// What a fixed slot records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedKind {
    /// A port read: `size` bytes of `value`, little-endian.
    PioRead {
        /// The port.
        port: u16,
        /// Bytes read (1..=8).
        size: u8,
        /// The value.
        value: u64,
    },
    /// An MMIO read.
    MmioRead {
        /// The address.
        addr: u64,
        /// Bytes read (1..=8).
        size: u8,
        /// The value.
        value: u64,
    },
    /// An injected interrupt.
    Interrupt {
        /// The vector.
        vector: u8,
    },
    /// An interrupt window was requested.
    InterruptWindow,
    /// An input poll without serial bytes.
    Inputs {
        /// Polled while halted.
        halted: bool,
        /// The virtual clock, when it advanced.
        clock_ns: Option<u64>,
    },
}

impl Slot<'_> {
    /// The slot as a prost `Record` (allocates what `Record` holds).
    pub fn to_record(&self) -> Result<Record, PackedError> {
        match *self {
            Slot::Escaped { at, encoded } => {
                Record::decode(encoded).map_err(|source| PackedError::Escape { at, source })
            }
            Slot::Fixed(f) => {
                let kind = match f.kind {
                    FixedKind::PioRead { port, size, value } => Kind::PioRead(PioRead {
                        port: u32::from(port),
                        size: u32::from(size),
                        value: value.to_le_bytes()[..usize::from(size)].to_vec(),
                    }),
                    FixedKind::MmioRead { addr, size, value } => Kind::MmioRead(MmioRead {
                        addr,
                        size: u32::from(size),
                        value: value.to_le_bytes()[..usize::from(size)].to_vec(),
                    }),
                    FixedKind::Interrupt { vector } => Kind::Interrupt(Interrupt {
                        vector: u32::from(vector),
                    }),
                    FixedKind::InterruptWindow => Kind::InterruptWindow(InterruptWindow {}),
                    FixedKind::Inputs { halted, clock_ns } => Kind::Inputs(Inputs {
                        halted,
                        clock_ns,
                        serial: Vec::new(),
                        net_rx: Vec::new(),
                    }),
                };
                Ok(Record {
                    exit_seq: f.exit_seq,
                    at_kick: f.at_kick,
                    kind: Some(kind),
                })
            }
        }
    }
}

/// The records of a block, read in place; stops after the first error.
#[derive(Debug, Clone)]
pub struct Slots<'a> {
    block: &'a [u8],
    at: usize,
    base: u64,
    declared: u32,
    remaining: u32,
    failed: bool,
}

impl<'a> Slots<'a> {
    /// Checks `block`'s header.
    pub fn new(block: &'a [u8]) -> Result<Self, PackedError> {
        let header = take(block, 0, HEADER_LEN)?;
        if header[0] != BLOCK_VERSION {
            return Err(PackedError::Version { found: header[0] });
        }
        if header[1..4] != [0; 3] {
            return Err(PackedError::Field {
                at: 0,
                what: "header padding is not zero",
            });
        }
        let declared = u32::from_le_bytes(arr(&header[4..8]));
        // Every record takes at least an escape head: a count the block cannot hold is
        // refused before anything sized by it is allocated.
        if declared as usize > (block.len() - HEADER_LEN) / ESCAPE_HEAD_LEN {
            return Err(PackedError::Count {
                declared,
                found: 0,
                trailing: block.len() - HEADER_LEN,
            });
        }
        Ok(Self {
            block,
            at: HEADER_LEN,
            base: u64::from_le_bytes(arr(&header[8..16])),
            declared,
            remaining: declared,
            failed: false,
        })
    }

    /// Records the header declares.
    pub fn declared(&self) -> u32 {
        self.declared
    }

    /// The next slot, every field checked one by one, so an error says which.
    #[inline]
    fn next_slot(&mut self) -> Result<Slot<'a>, PackedError> {
        let at = self.at;
        let kind = take(self.block, at, 1)?[0];
        if kind == ESCAPE {
            let head = take(self.block, at, ESCAPE_HEAD_LEN)?;
            if head[1..4] != [0; 3] {
                return Err(PackedError::Field {
                    at,
                    what: "escape padding is not zero",
                });
            }
            let len = u32::from_le_bytes(arr(&head[4..8])) as usize;
            let encoded = take(self.block, at + ESCAPE_HEAD_LEN, len)?;
            self.at = at + ESCAPE_HEAD_LEN + len;
            return Ok(Slot::Escaped { at, encoded });
        }
        let slot: [u8; SLOT_LEN] = arr(take(self.block, at, SLOT_LEN)?);
        let (flags, size) = (slot[1], slot[2]);
        if slot[3] != 0 {
            return Err(PackedError::Field {
                at,
                what: "slot padding is not zero",
            });
        }
        let exit_seq = self
            .base
            .checked_add(u64::from(u32::from_le_bytes(arr(&slot[4..8]))))
            .ok_or(PackedError::Field {
                at,
                what: "exit sequence number overflows",
            })?;
        let a = u64::from_le_bytes(arr(&slot[8..16]));
        let b = u64::from_le_bytes(arr(&slot[16..24]));
        let allowed = if kind == INPUTS {
            AT_KICK | HALTED | HAS_CLOCK
        } else {
            AT_KICK
        };
        let bad = |what| PackedError::Field { at, what };
        if flags & !allowed != 0 {
            return Err(bad("unknown flags"));
        }
        let sized = matches!(kind, PIO_READ | MMIO_READ);
        if sized && !(1..=8).contains(&size) {
            return Err(bad("read size is not 1 to 8 bytes"));
        }
        if !sized && size != 0 {
            return Err(bad("size on a kind without one"));
        }
        if sized && size < 8 && b >> (u32::from(size) * 8) != 0 {
            return Err(bad("value bytes past the read size"));
        }
        let kind = match kind {
            PIO_READ => FixedKind::PioRead {
                port: u16::try_from(a).map_err(|_| bad("port past 0xffff"))?,
                size,
                value: b,
            },
            MMIO_READ => FixedKind::MmioRead {
                addr: a,
                size,
                value: b,
            },
            INTERRUPT if b == 0 => FixedKind::Interrupt {
                vector: u8::try_from(a).map_err(|_| bad("vector past 255"))?,
            },
            INTERRUPT_WINDOW if a == 0 && b == 0 => FixedKind::InterruptWindow,
            INPUTS if a == 0 && (flags & HAS_CLOCK != 0 || b == 0) => FixedKind::Inputs {
                halted: flags & HALTED != 0,
                clock_ns: (flags & HAS_CLOCK != 0).then_some(b),
            },
            INTERRUPT | INTERRUPT_WINDOW | INPUTS => return Err(bad("unused field is not zero")),
            other => return Err(PackedError::Kind { at, kind: other }),
        };
        self.at = at + SLOT_LEN;
        Ok(Slot::Fixed(Fixed {
            exit_seq,
            at_kick: flags & AT_KICK != 0,
            kind,
        }))
    }
}

/// A fixed slot's fields when the slot (its first word `w0`, then `a` and `b`) is well
/// formed, else None. Accepts exactly what [`Slots::next_slot`] accepts.
#[inline]
fn fixed_slot(base: u64, w0: u64, a: u64, b: u64) -> Option<Fixed> {
    // Shifts, not a byte array: the fields stay in registers.
    let (kind, flags, size) = (w0 as u8, (w0 >> 8) as u8, (w0 >> 16) as u8);
    if (w0 >> 24) as u8 != 0 {
        return None;
    }
    let exit_seq = base.checked_add(w0 >> 32)?;
    let plain = flags & !AT_KICK == 0;
    let kind = match kind {
        PIO_READ | MMIO_READ => {
            if !plain || !(1..=8).contains(&size) || (size < 8 && b >> (u32::from(size) * 8) != 0) {
                return None;
            }
            if kind == PIO_READ {
                FixedKind::PioRead {
                    port: u16::try_from(a).ok()?,
                    size,
                    value: b,
                }
            } else {
                FixedKind::MmioRead {
                    addr: a,
                    size,
                    value: b,
                }
            }
        }
        INTERRUPT if plain && size == 0 && b == 0 => FixedKind::Interrupt {
            vector: u8::try_from(a).ok()?,
        },
        INTERRUPT_WINDOW if plain && size == 0 && a == 0 && b == 0 => FixedKind::InterruptWindow,
        INPUTS
            if flags & !(AT_KICK | HALTED | HAS_CLOCK) == 0
                && size == 0
                && a == 0
                && (flags & HAS_CLOCK != 0 || b == 0) =>
        {
            FixedKind::Inputs {
                halted: flags & HALTED != 0,
                clock_ns: (flags & HAS_CLOCK != 0).then_some(b),
            }
        }
        _ => return None,
    };
    Some(Fixed {
        exit_seq,
        at_kick: flags & AT_KICK != 0,
        kind,
    })
}

impl<'a> Iterator for Slots<'a> {
    type Item = Result<Slot<'a>, PackedError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.remaining == 0 {
            if self.at == self.block.len() {
                return None;
            }
            self.failed = true;
            return Some(Err(PackedError::Count {
                declared: self.declared,
                found: self.declared,
                trailing: self.block.len() - self.at,
            }));
        }
        let r = self.next_slot();
        match r {
            Ok(_) => self.remaining -= 1,
            Err(_) => self.failed = true,
        }
        Some(r)
    }
}

/// `len` bytes of `block` at `at`, or why not.
fn take(block: &[u8], at: usize, len: usize) -> Result<&[u8], PackedError> {
    let have = block.len().saturating_sub(at);
    if len > have {
        return Err(PackedError::Truncated {
            at,
            needed: len,
            have,
        });
    }
    Ok(&block[at..at + len])
}

#[inline]
fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests;
