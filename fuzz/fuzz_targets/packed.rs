//! The packed record block decoder on arbitrary bytes, as a batch's `packed` field brings
//! them from a log file or a peer: every outcome is records or a `PackedError`, never a panic;
//! records that decode pack and decode back to themselves; `packed::check` agrees with
//! reading slot by slot.
#![no_main]

use ftvm_proto::packed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(slots) = packed::Slots::new(data) {
        for slot in slots {
            match slot {
                Ok(s) => {
                    let _ = s.to_record();
                }
                Err(_) => break,
            }
        }
    }
    // The one-pass check accepts exactly what reading slot by slot accepts.
    let read: Result<Vec<_>, _> = packed::Slots::new(data).and_then(|s| s.collect());
    let checked = packed::check(data, |_, _| Ok(()));
    assert_eq!(
        checked,
        read.map(|v| v.len() as u32),
        "check and Slots disagree"
    );
    if let Ok(records) = packed::unpack(data) {
        let again = packed::unpack(&packed::pack(&records));
        assert_eq!(again.as_ref(), Ok(&records), "pack(unpack(x)) lost records");
    }
});
