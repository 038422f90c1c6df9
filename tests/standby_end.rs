//! The standby cannot hang instead of going live (DESIGN.md §5, issue 14): a replay that
//! stops at a divergence, or at a kick at the end of the log, asks for a repair; when the
//! primary is then lost, the repair can never come, and the standby goes live from its last
//! consistent point (with an arbiter: once it won the term) instead of waiting for it.
//!
//! The primary here is a fake that speaks the real protocol: it hands a real `ftvm standby`
//! the log of a real recording (`ftvm run --record`) of a guest the standby cannot follow
//! to the end (`workload=spin`: kicks, so checkpoint-required epochs; `workload=rdtsc`:
//! divergences), waits for the standby's repair request, and closes the connection without
//! `Abandon` (its process is gone) and without ever sending the repair.

mod common;
#[path = "split_brain/procs.rs"]
mod procs;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_addr, Scratch, FTVM};
use ftvm_proto::channel::{message::Body, ArbiterKind, Hello, Message, Role, Start};
use ftvm_proto::frame::{self, FrameReader};
use ftvm_proto::log::record;
use ftvm_replication::host::HostKind;
use ftvm_replication::log::{LogFileReader, LogSource};
use procs::*;

/// Records `cmdline` with the built-in guest into `log`; what the guest printed.
fn record(log: &str, cmdline: &str) -> String {
    let o = Command::new(FTVM)
        .args(["run", "--record", log, "--cmdline", cmdline])
        .output()
        .expect("ftvm run --record");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn connect(addr: &str) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(c) => return c,
            Err(e) => {
                assert!(start.elapsed() < LIMIT, "the standby never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn send(s: &mut TcpStream, body: Body) {
    s.write_all(&frame::encode(&Message { body: Some(body) }))
        .expect("send to the standby");
}

/// Plays the primary of the recording in `log` to the standby on `addr` (with `vm_id` at
/// an arbiter if not empty), waits for its repair request, and closes.
fn fake_primary(addr: &str, log: &str, vm_id: &str) -> String {
    let mut s = connect(addr);
    let mut hello = ftvm_proto::CHANNEL_MAGIC.to_vec();
    hello.extend(frame::encode(&Message {
        body: Some(Body::Hello(Hello {
            protocol_version: ftvm_proto::PROTOCOL_VERSION,
            role: Role::Primary as i32,
            software: "fake primary".into(),
            host: Some(HostKind::local().to_proto()),
            // Patient: only the close, never silence, may end this pair.
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 60_000,
            ..Default::default()
        })),
    }));
    s.write_all(&hello).expect("hello");
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).expect("the standby's magic");
    assert_eq!(&magic, ftvm_proto::CHANNEL_MAGIC);
    let (mut reader, header) = LogFileReader::open(log.as_ref()).expect("open the log");
    let mut start = Start {
        header: Some(header),
        kernel: ftvm_guest::KERNEL.to_vec(),
        vm_id: vm_id.into(),
        ..Default::default()
    };
    start.set_arbiter(ArbiterKind::Witness);
    let mut frames = FrameReader::new(s.try_clone().expect("clone"), 8);
    let mut next = move || -> Body {
        match frames.read_frame::<Message>() {
            Ok(Some((_, Message { body: Some(b) }))) => b,
            other => panic!("the standby said {other:?}"),
        }
    };
    assert!(matches!(next(), Body::Hello(_)));
    send(&mut s, Body::Start(start));
    loop {
        match next() {
            Body::Ready(_) => break,
            Body::Heartbeat(_) | Body::Ack(_) => {}
            other => panic!("expected Ready, got {other:?}"),
        }
    }
    // The primary dies before its guest ends: the run's end is never sent.
    while let Some(mut batch) = reader.next_batch().expect("read the log") {
        batch
            .records
            .retain(|r| !matches!(r.kind, Some(record::Kind::RunEnd(_))));
        // On the wire a batch's records travel packed, as a real primary sends them.
        send(&mut s, Body::Batch(ftvm_proto::packed::pack_batch(batch)));
    }
    let reason = loop {
        match next() {
            Body::Diverged(d) => break d.reason,
            Body::Heartbeat(_) | Body::Ack(_) => {}
            other => panic!("expected a repair request, got {other:?}"),
        }
    };
    // Gone without a word: no Abandon, no repair.
    drop(s);
    reason
}

/// A kick at the end of the log: the standby stops at the last deterministic exit before
/// it, asks for a repair that never comes, and goes live from there.
#[test]
fn a_kick_at_the_end_of_a_lost_primarys_log_goes_live() {
    let _one = serial();
    let dir = Scratch::new("standby-end-kick");
    let log = dir.path_str("spin.log");
    let recorded = record(&log, "workload=spin ms=300");
    let (addr, sc) = (free_addr(), free_addr());
    // The fake primary speaks the plain protocol: this standby takes it (--insecure).
    let s = standby(&addr, &sc, &["--insecure"], &[]);
    let reason = fake_primary(&addr, &log, "");
    assert!(reason.contains("kicked the vCPU"), "{reason}");
    let s = s.wait(LIMIT);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert!(s.stderr.contains("going live at exit"), "{}", s.stderr);
    // Its own execution from the kick on: the same lines, the sum its own.
    let out = s.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("spin ticks="), "{out}");
    assert_eq!(lines[1], "done", "{out}");
    assert_eq!(recorded.lines().last(), Some("done"));
}

/// A divergence: the standby stops where its replay differs, asks for a repair that never
/// comes, and goes live from its last consistent point, here once it won the term at the
/// witness (the fake primary named the VM there).
#[test]
fn a_divergence_before_a_lost_primarys_repair_goes_live_through_the_witness() {
    let _one = serial();
    let dir = Scratch::new("standby-end-diverged");
    let log = dir.path_str("rdtsc.log");
    record(&log, "workload=rdtsc n=6");
    let wa = free_addr();
    let _w = spawn(
        &[
            "witness",
            "--listen",
            &wa,
            "--state",
            &dir.path_str("state"),
        ],
        &[],
    );
    let (addr, sc) = (free_addr(), free_addr());
    let s = standby(&addr, &sc, &["--witness", &wa, "--insecure"], &[]);
    let reason = fake_primary(&addr, &log, "fake-vm");
    assert!(!reason.contains("kicked"), "{reason}");
    let s = s.wait(LIMIT);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert!(
        s.stderr.contains("won term 1 at the witness"),
        "{}",
        s.stderr
    );
    assert!(s.stderr.contains("going live at exit"), "{}", s.stderr);
    // Nothing was released: the standby prints the whole run, its own from the divergence.
    let out = s.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    for (i, l) in lines[..6].iter().enumerate() {
        assert!(l.starts_with(&format!("rdtsc {i} value=")), "{out}");
    }
    assert_eq!(lines[6], "done", "{out}");
}
