//! `ftvm bench`: a responder and a measuring side as real processes on loopback. No timing
//! is asserted: the figures must be there and make sense.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_addr, FTVM};

/// `ftvm bench --listen`, killed when dropped.
struct Responder(std::process::Child);

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn responder(addr: &str) -> Responder {
    let child = Command::new(FTVM)
        .args(["bench", "--listen", addr])
        .args(common::key_args(&[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the bench responder");
    // Up once it accepts connections.
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the responder never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Responder(child)
}

#[test]
fn bench_against_a_real_responder_prints_every_figure_next_to_raw_tcp() {
    let addr = free_addr();
    let _r = responder(&addr);
    let o = Command::new(FTVM)
        .args([
            "bench",
            "--peer",
            &addr,
            "--samples",
            "50",
            "--seconds",
            "0.2",
        ])
        .args(common::key_args(&[]))
        .output()
        .expect("ftvm bench");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for line in [
        "raw TCP round trip",
        "channel ack, 1-record batch",
        "channel ack, 1000-record batch",
        "log throughput",
        // With the key, the same run measures the encrypted channel, each cipher.
        "AES-GCM: ack, 1-record batch",
        "ChaChaPoly: ack, 1-record batch",
        "log throughput, AES-GCM",
        "log throughput, ChaChaPoly",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    // JSON for scripts: every figure positive, percentiles ordered.
    let o = Command::new(FTVM)
        .args([
            "bench",
            "--peer",
            &addr,
            "--samples",
            "50",
            "--seconds",
            "0.2",
            "--json",
        ])
        .args(common::key_args(&[]))
        .output()
        .expect("ftvm bench --json");
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    for series in ["raw_rtt", "ack_small", "ack_large"] {
        let s = &v[series];
        let (p50, p99) = (s["p50_us"].as_f64(), s["p99_us"].as_f64());
        assert!(
            matches!((p50, p99), (Some(a), Some(b)) if a > 0.0 && b >= a),
            "{series}: {s}"
        );
        assert_eq!(s["samples"].as_u64().map(|n| n > 0), Some(true), "{s}");
    }
    let sealed = v["encrypted"].as_array().expect("encrypted figures");
    assert_eq!(sealed.len(), 2, "{v}");
    for e in sealed {
        assert!(e["log_mib_per_s"].as_f64().is_some_and(|r| r > 0.0), "{e}");
        assert!(
            e["ack_small"]["p50_us"].as_f64().is_some_and(|r| r > 0.0),
            "{e}"
        );
    }
    for rate in ["raw_mib_per_s", "log_mib_per_s"] {
        assert!(v[rate].as_f64().is_some_and(|r| r > 0.0), "{rate}: {v}");
    }
}

#[test]
fn a_bench_target_that_is_not_listening_is_a_clear_error() {
    let addr = free_addr();
    let o = Command::new(FTVM)
        .args(["bench", "--peer", &addr, "--samples", "10"])
        .args(common::key_args(&[]))
        .output()
        .expect("ftvm bench");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with(&format!("ftvm: error: bench: cannot connect to {addr}:")),
        "{err}"
    );
}

#[test]
fn a_bench_responder_is_not_a_pair_standby() {
    // Something that is not a responder: the bench says so, it does not hang.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            use std::io::Write;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let o = Command::new(FTVM)
        .args(["bench", "--peer", &addr, "--samples", "10"])
        .args(common::key_args(&[]))
        .output()
        .expect("ftvm bench");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).starts_with("ftvm: error: bench:"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = t.join();
}
