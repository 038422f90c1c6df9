//! Every message decoder a peer's bytes reach: the pair messages, the log records, and the
//! VM state a checkpoint carries (decoded by the standby before it installs it).
#![no_main]

use ftvm_proto::channel::{CheckpointEnd, Diverged, Hello, Message, PageChunk, Start};
use ftvm_proto::log::{LogFrame, LogHeader, RecordBatch};
use ftvm_replication::link::body_name;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let _ = body_name(&m);
    }
    let _ = Hello::decode(data);
    let _ = Start::decode(data);
    let _ = Diverged::decode(data);
    let _ = PageChunk::decode(data);
    let _ = CheckpointEnd::decode(data);
    let _ = RecordBatch::decode(data);
    let _ = LogHeader::decode(data);
    let _ = LogFrame::decode(data);
    let _ = ftvm_vmm::state::decode::<ftvm_vmm::VmState>(data);
});
