//! The wake-up path between the vCPU thread and the channel thread, stressed: the channel
//! thread's event loop waits with no bound when nothing is timed (an unprotected primary has
//! no heartbeat to send), so a message whose wake-up were lost would never be handled. Each
//! round trip below is a guest output handed over by [`Feed::send`] and released by the
//! channel thread; a lost wake-up stalls the round trip and the watchdog names it.

use std::io::Write;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ftvm_proto::channel::Start;

use super::super::{FromVcpu, PrimaryChannel, PrimarySetup};
use crate::position::Position;
use crate::ChannelOptions;

/// Far longer than a round trip takes on the slowest host this runs on (the nested
/// harness), so only a message nobody handles trips it.
const WATCHDOG: Duration = Duration::from_secs(20);

const ROUND_TRIPS: u32 = 20_000;

/// Where the channel thread writes released output: each write reaches the test.
struct Released(Sender<Vec<u8>>);

impl Write for Released {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| std::io::Error::other("the test stopped reading"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unprotected_primary() -> (PrimaryChannel, Receiver<Vec<u8>>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let channel = PrimaryChannel::spawn(
        Err("no standby: the wake-up test runs unprotected".into()),
        Box::new(Released(tx)),
        ChannelOptions {
            heartbeat: crate::Heartbeat::default(),
            control: None,
            witness: None,
            primary_after_go_live: false,
            security: crate::link::Security::Insecure,
            bounds: Default::default(),
            telemetry: None,
            tsc_exits: false,
        },
        PrimarySetup {
            memory: ftvm_vmm::memory::create(16).expect("guest memory"),
            start: Start::default(),
            accept: None,
            after: Position::default(),
            disks: Default::default(),
        },
    )
    .expect("channel thread");
    (channel, rx)
}

#[test]
fn every_message_from_the_vcpu_thread_wakes_the_channel_thread() {
    let (channel, released) = unprotected_primary();
    let feed = channel.feed();
    for i in 0..ROUND_TRIPS {
        let bytes = i.to_le_bytes().to_vec();
        feed.send(FromVcpu::Output(bytes.clone()))
            .expect("the channel thread runs");
        match released.recv_timeout(WATCHDOG) {
            Ok(got) => assert_eq!(got, bytes, "round trip {i}"),
            Err(_) => panic!(
                "lost wake-up: output {i} of {ROUND_TRIPS} was not released within {WATCHDOG:?}"
            ),
        }
    }
    feed.send(FromVcpu::End).expect("the channel thread runs");
    drop(feed);
    let report = channel.join();
    assert!(report.lost.is_some(), "ran unprotected from the start");
}

#[test]
fn bursts_from_several_threads_are_all_handled() {
    let (channel, released) = unprotected_primary();
    let senders: Vec<_> = (0..4u8)
        .map(|t| {
            let feed = channel.feed();
            std::thread::spawn(move || {
                for _ in 0..ROUND_TRIPS / 4 {
                    feed.send(FromVcpu::Output(vec![t]))
                        .expect("the channel thread runs");
                }
            })
        })
        .collect();
    let mut count = [0u32; 4];
    for n in 0..ROUND_TRIPS {
        match released.recv_timeout(WATCHDOG) {
            Ok(got) => got.iter().for_each(|&t| count[usize::from(t)] += 1),
            Err(_) => panic!("lost wake-up: {n} of {ROUND_TRIPS} outputs released"),
        }
    }
    for s in senders {
        s.join().expect("sender thread");
    }
    assert_eq!(count, [ROUND_TRIPS / 4; 4]);
    channel
        .feed()
        .send(FromVcpu::End)
        .expect("the channel thread runs");
    channel.join();
}
