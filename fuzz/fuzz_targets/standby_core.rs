//! The standby's protocol core fed what a hostile primary could send: arbitrary messages,
//! interleaved with the replayer's reports and the clock. Nothing may panic; whatever the
//! core asks for is drained.
#![no_main]

use std::time::{Duration, Instant};

use ftvm_proto::channel::Message;
use ftvm_replication::link::Heartbeat;
use ftvm_replication::standby::{FromReplayer, StandbyCore};
use ftvm_replication::status::Request;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut core = StandbyCore::new("fuzz".into(), Heartbeat::default(), true, now);
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        match op % 6 {
            0 | 1 => {
                if let Ok(msg) = Message::decode(chunk) {
                    core.heard(now);
                    core.on_message(msg, now);
                }
            }
            2 => {
                let epoch = chunk.iter().map(|b| u64::from(*b)).sum();
                core.on_replayer(
                    FromReplayer::Verified {
                        epoch,
                        exit_seq: epoch * 7,
                        replayed: now,
                    },
                    now,
                );
            }
            3 => {
                if let Ok(d) = ftvm_proto::channel::Diverged::decode(chunk) {
                    core.on_replayer(FromReplayer::Diverged(d), now);
                }
            }
            4 => {
                now += Duration::from_millis(u64::from(len as u8));
                core.tick(now);
            }
            _ => {
                let _ = core.control_request(Request::Status, now, 0);
            }
        }
        while core.poll_action().is_some() {}
    }
});
