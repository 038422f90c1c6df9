//! The frame decoder (`[len][crc32c][protobuf]`) on arbitrary bytes, as the pair channel and
//! the log reader see them: every outcome is a message or a `FrameError`, never a panic.
#![no_main]

use ftvm_proto::channel::Message;
use ftvm_proto::frame;
use ftvm_proto::log::LogFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((_, len))) = frame::decode_from::<Message>(&data[at..], at as u64) {
        at += len;
    }
    let mut at = 0;
    while let Ok(Some((_, len))) = frame::decode_from::<LogFrame>(&data[at..], at as u64) {
        at += len;
    }
    let _ = frame::truncated(data, 0);
});
