//! The primary's protocol core fed what a hostile standby could send (acks for epochs never
//! shipped, repair requests for pages that do not exist, messages only a primary sends),
//! interleaved with epochs from the vCPU thread and the clock. Nothing may panic, and a bad
//! field may only drop the standby.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ftvm_proto::channel::{Message, Start};
use ftvm_proto::log::{record::Kind, EpochEnd, Record, RecordBatch};
use ftvm_replication::checkpoint::{DirtyTracking, VcpuControl};
use ftvm_replication::link::Heartbeat;
use ftvm_replication::primary::{CoreConfig, FromVcpu, PrimaryCore};
use ftvm_replication::Position;
use ftvm_vmm::memory::GuestMemory;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fn memory() -> GuestMemory {
    static MEMORY: OnceLock<GuestMemory> = OnceLock::new();
    MEMORY
        .get_or_init(|| ftvm_vmm::memory::create(16).expect("16 MiB of guest memory"))
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let (vcpu, requests, _doorbell) = VcpuControl::new();
    let mut core = PrimaryCore::new(
        CoreConfig {
            heartbeat: Heartbeat::default(),
            audit: true,
            memory: memory(),
            start: Start::default(),
            after: Position::default(),
            vcpu,
            tracking: DirtyTracking::default(),
            arbiter: None,
        },
        Ok("fuzz".into()),
        now,
    );
    let mut epoch = 0;
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        match op % 5 {
            0 | 1 => {
                if let Ok(msg) = Message::decode(chunk) {
                    core.heard(now);
                    core.on_message(msg, now);
                }
            }
            2 => {
                epoch += 1;
                core.on_vcpu(FromVcpu::Output(chunk.to_vec()), now);
                core.on_vcpu(
                    FromVcpu::Batch(RecordBatch {
                        complete_through: epoch * 10,
                        records: vec![Record {
                            exit_seq: epoch * 10,
                            at_kick: false,
                            kind: Some(Kind::EpochEnd(EpochEnd {
                                epoch,
                                exit_seq: epoch * 10,
                                ..Default::default()
                            })),
                        }],
                        packed: Default::default(),
                    }),
                    now,
                );
            }
            3 => {
                now += Duration::from_millis(u64::from(len as u8));
                core.tick(now);
                core.try_handover(now);
            }
            _ => {
                if let Ok(end) = ftvm_proto::channel::CheckpointEnd::decode(chunk) {
                    core.on_vcpu(FromVcpu::CheckpointEnd(end), now);
                }
            }
        }
        while core.poll_action().is_some() {}
        while requests.try_recv().is_ok() {}
    }
});
