//! The packed block's tests: round trips under proptest, damage of every kind.

use super::*;
use crate::frame::tests::kind;
use crate::log::{EpochEnd, GuestWrite};
use proptest::prelude::*;

/// Kinds that fit a fixed slot (most of a real log), and any kind at all.
fn any_kind() -> impl Strategy<Value = Kind> {
    let value = || (1usize..=8).prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n));
    prop_oneof![
        (any::<u16>(), value()).prop_map(|(p, v)| Kind::PioRead(PioRead {
            port: u32::from(p),
            size: v.len() as u32,
            value: v
        })),
        (any::<u64>(), value()).prop_map(|(a, v)| Kind::MmioRead(MmioRead {
            addr: a,
            size: v.len() as u32,
            value: v
        })),
        (
            any::<bool>(),
            proptest::option::of(any::<u64>()),
            // Received frames (virtio-net) make an Inputs record an escape.
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..2)
        )
            .prop_map(|(halted, clock_ns, net_rx)| {
                Kind::Inputs(Inputs {
                    halted,
                    clock_ns,
                    serial: Vec::new(),
                    net_rx,
                })
            }),
        kind(),
    ]
}

fn records() -> impl Strategy<Value = Vec<Record>> {
    (
        any::<u64>(),
        proptest::collection::vec((0u64..1 << 34, any::<bool>(), any_kind()), 0..64),
    )
        .prop_map(|(base, rs)| {
            rs.into_iter()
                .map(|(d, at_kick, k)| Record {
                    exit_seq: base.wrapping_add(d),
                    at_kick,
                    kind: Some(k),
                })
                .collect()
        })
}

fn sample() -> Vec<Record> {
    let at = |exit_seq, kind| Record {
        exit_seq,
        at_kick: false,
        kind: Some(kind),
    };
    vec![
        at(
            10,
            Kind::PioRead(PioRead {
                port: 0x3fd,
                size: 1,
                value: vec![0x60],
            }),
        ),
        at(11, Kind::Interrupt(Interrupt { vector: 0x20 })),
        at(
            12,
            Kind::Inputs(Inputs {
                halted: true,
                clock_ns: Some(5),
                serial: Vec::new(),
                net_rx: Vec::new(),
            }),
        ),
        at(
            13,
            Kind::EpochEnd(EpochEnd {
                epoch: 1,
                exit_seq: 13,
                digest: vec![7; 32],
                checkpoint_required: false,
            }),
        ),
    ]
}

proptest! {
    #[test]
    fn records_survive_pack_unpack(rs in records()) {
        let block = pack(&rs);
        prop_assert_eq!(unpack(&block).unwrap(), rs.clone());
        let batch = pack_batch(RecordBatch { complete_through: 3, records: rs.clone(), packed: Bytes::new() });
        prop_assert!(batch.records.is_empty());
        prop_assert_eq!(unpack_batch(batch).unwrap().records, rs);
    }

    /// Damage never panics; what decodes is the records of some block.
    #[test]
    fn damaged_blocks_fail_cleanly(rs in records(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let mut block = pack(&rs).to_vec();
        let i = at % block.len();
        block[i] ^= byte | 1;
        let _ = unpack(&block);
        block.truncate(cut % (block.len() + 1));
        let _ = unpack(&block);
    }

    /// The one-pass check accepts exactly what reading slot by slot accepts, with the same
    /// count and the same escapes, intact or damaged.
    #[test]
    fn check_agrees_with_slots(rs in records(), at in any::<usize>(), byte in any::<u8>(), damage in any::<bool>()) {
        let mut block = pack(&rs).to_vec();
        if damage {
            let i = at % block.len();
            block[i] ^= byte | 1;
        }
        let read: Result<Vec<Slot>, PackedError> = Slots::new(&block).and_then(|s| s.collect());
        let mut escapes = Vec::new();
        let checked = check(&block, |at, encoded| {
            escapes.push(Slot::Escaped { at, encoded });
            Ok(())
        });
        match read {
            Ok(slots) => {
                prop_assert_eq!(checked, Ok(slots.len() as u32));
                let want: Vec<Slot> = slots.into_iter().filter(|s| matches!(s, Slot::Escaped { .. })).collect();
                prop_assert_eq!(escapes, want);
            }
            Err(e) => prop_assert_eq!(checked, Err(e)),
        }
        if !damage {
            prop_assert_eq!(check(&block, |_, _| Ok(())), Ok(rs.len() as u32));
        }
    }
}

#[test]
fn frequent_kinds_take_one_fixed_slot_each() {
    let rs = sample();
    let block = pack(&rs);
    let escape = ESCAPE_HEAD_LEN + rs[3].encoded_len();
    assert_eq!(block.len(), HEADER_LEN + 3 * SLOT_LEN + escape);
    let slots: Vec<_> = Slots::new(&block).unwrap().map(Result::unwrap).collect();
    assert_eq!(
        slots[0],
        Slot::Fixed(Fixed {
            exit_seq: 10,
            at_kick: false,
            kind: FixedKind::PioRead {
                port: 0x3fd,
                size: 1,
                value: 0x60
            }
        })
    );
    assert!(matches!(slots[3], Slot::Escaped { at, .. } if at == HEADER_LEN + 3 * SLOT_LEN));
}

#[test]
fn what_no_slot_fits_is_escaped() {
    let rs = vec![
        Record {
            exit_seq: 5,
            at_kick: true,
            kind: Some(Kind::PioRead(PioRead {
                port: 0x3f8,
                size: 1,
                value: b"string".to_vec(),
            })),
        },
        // Before the base: no delta.
        Record {
            exit_seq: 4,
            at_kick: false,
            kind: Some(Kind::InterruptWindow(InterruptWindow {})),
        },
        Record {
            exit_seq: 6,
            at_kick: false,
            kind: Some(Kind::GuestWrite(GuestWrite {
                gpa: 0x1000,
                data: vec![1, 2, 3],
                ..Default::default()
            })),
        },
        Record {
            exit_seq: 7,
            at_kick: false,
            kind: None,
        },
    ];
    let block = pack(&rs);
    for slot in Slots::new(&block).unwrap() {
        assert!(matches!(slot.unwrap(), Slot::Escaped { .. }));
    }
    assert_eq!(unpack(&block).unwrap(), rs);
}

#[test]
fn damage_is_named() {
    let block = pack(&sample()).to_vec();
    let with = |i: usize, b: u8| {
        let mut d = block.clone();
        d[i] = b;
        unpack(&d).unwrap_err()
    };
    assert_eq!(with(0, 2), PackedError::Version { found: 2 });
    let slot = HEADER_LEN + SLOT_LEN;
    assert_eq!(with(slot, 9), PackedError::Kind { at: slot, kind: 9 });
    assert!(
        matches!(with(slot + 1, 0x80), PackedError::Field { at, what: "unknown flags" } if at == slot)
    );
    assert!(matches!(
        with(HEADER_LEN + 2, 0),
        PackedError::Field {
            what: "read size is not 1 to 8 bytes",
            ..
        }
    ));
    assert!(matches!(
        with(HEADER_LEN + 17, 1),
        PackedError::Field {
            what: "value bytes past the read size",
            ..
        }
    ));
    // The count says more records than the block holds, or fewer.
    assert!(matches!(
        with(4, 200),
        PackedError::Count { declared: 200, .. }
    ));
    assert!(matches!(
        with(4, 3),
        PackedError::Count {
            declared: 3,
            found: 3,
            ..
        }
    ));
    // A cut anywhere is a truncation (or, at a slot boundary, a short count).
    for len in 0..block.len() {
        let e = unpack(&block[..len]).unwrap_err();
        assert!(
            matches!(e, PackedError::Truncated { .. } | PackedError::Count { .. }),
            "{len}: {e}"
        );
    }
    // An escape whose record does not decode.
    let esc = HEADER_LEN + 3 * SLOT_LEN + ESCAPE_HEAD_LEN;
    assert!(
        matches!(with(esc, 0xff), PackedError::Escape { at, .. } if at == esc - ESCAPE_HEAD_LEN)
    );
}

#[test]
fn a_batch_with_records_outside_the_block_is_refused() {
    let batch = RecordBatch {
        complete_through: 1,
        records: sample(),
        packed: Bytes::new(),
    };
    assert!(unpack_batch(batch).is_err());
}
