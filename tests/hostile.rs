//! Only its peer can talk to a pair process (DESIGN.md §6): real `ftvm` processes on real
//! loopback sockets, attacked as a host on the same network would attack them. A client
//! without the pair key gets nothing from any listening port (no `Start`, no memory, no
//! status) and the pair runs on; a port scan (connect and close, random bytes, a slow
//! sender, 100 parallel connections) leaves a standby listening, and a real primary then
//! pairs with it; a peer with another key is refused on both sides; a primary whose standby
//! cannot be authenticated does not run unprotected unless told to.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod common;
use common::{free_addr, pair_key, status_with_key, wait_for_status_line, FTVM};

static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A pair process, killed if the test ends before it.
struct Proc(Option<Child>);

impl Proc {
    fn spawn(args: &[&str]) -> Self {
        // A patient failure detector: these tests are about who may connect, and a loaded
        // CI machine must not turn a descheduled process into a lost peer.
        let pair = matches!(args.first(), Some(&("run" | "standby")));
        let patience: &[&str] = match pair {
            true => &["--heartbeat-timeout-ms", "2000"],
            false => &[],
        };
        let child = Command::new(FTVM)
            .args(args)
            .args(patience)
            .env("FTVM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvm");
        Proc(Some(child))
    }

    fn running(&mut self) -> bool {
        let child = self.0.as_mut().expect("child");
        child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the exit (at most 60 s, then kills it and fails).
    fn wait(mut self) -> (Output, String, String) {
        let mut child = self.0.take().expect("child");
        let start = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let o = child.wait_with_output().expect("wait");
                panic!(
                    "did not exit in 60 s: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let o = child.wait_with_output().expect("output");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o, out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Another pair key than [`pair_key`].
fn other_key() -> String {
    let path = std::env::temp_dir().join(format!("ftvm-other-key-{}", std::process::id()));
    if !path.exists() {
        let o = Command::new(FTVM)
            .args(["keygen", "--out"])
            .arg(&path)
            .output()
            .expect("keygen");
        assert!(o.status.success(), "{o:?}");
    }
    path.to_string_lossy().into_owned()
}

fn connect_when_up(addr: &str) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(c) => return c,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{addr} never listened: {e}"),
        }
    }
}

/// What a client without the key gets from `addr` after sending `hello` (everything the
/// process writes until it closes the connection, or 1.5 s).
fn what_a_stranger_gets(addr: &str, hello: &[u8]) -> Vec<u8> {
    let mut c = connect_when_up(addr);
    let _ = c.write_all(hello);
    let _ = c.set_read_timeout(Some(Duration::from_millis(1500)));
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    got
}

fn assert_counter(out: &str, ticks: u64) {
    if let Err(e) = common::check_counter(out, ticks) {
        panic!("{e}:\n{out}");
    }
}

#[test]
fn no_key_and_no_insecure_is_a_clear_error() {
    for args in [
        vec!["standby", "--listen", "127.0.0.1:1"],
        vec!["run", "--peer", "127.0.0.1:1"],
        vec!["status", "127.0.0.1:1"],
    ] {
        let o = Command::new(FTVM).args(&args).output().expect("ftvm");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("no pair key: give --key FILE") && err.contains("ftvm keygen"),
            "{args:?}: {err}"
        );
    }
}

/// Nothing leaves any listening port of a running pair before the client proved it holds
/// the key: not the standby's `--listen` port, not the primary's join port, not either
/// control socket; a client with another key gets no status either; the pair runs on and
/// its guest finishes protected.
#[test]
fn an_unauthenticated_client_gets_nothing_and_the_pair_runs_on() {
    let _one = serial();
    let (listen, join, pc, sc) = (free_addr(), free_addr(), free_addr(), free_addr());
    let key = pair_key();
    let s = Proc::spawn(&[
        "standby",
        "--listen",
        &listen,
        "--control",
        &sc,
        "--key",
        key,
    ]);
    let p = Proc::spawn(&[
        "run",
        "--peer",
        &listen,
        "--accept-standby",
        &join,
        "--control",
        &pc,
        "--cmdline",
        "workload=counter ticks=800",
        "--key",
        key,
    ]);
    let st = wait_for_status_line(&pc, "protected=yes");
    assert!(st.contains("channel=noise-psk key="), "{st}");
    // A pair client speaking the unencrypted protocol, and a control client asking for the
    // status without a key.
    let mut hello = ftvm_proto::CHANNEL_MAGIC.to_vec();
    hello.extend_from_slice(&[16, 0, 0, 0, 1, 2, 3, 4]);
    let mut probes = Vec::new();
    for addr in [&listen, &join, &pc, &sc] {
        for probe in [hello.clone(), b"status\n".to_vec(), vec![0, 48]] {
            let addr = addr.clone();
            probes.push(std::thread::spawn(move || {
                (what_a_stranger_gets(&addr, &probe), addr)
            }));
        }
    }
    for probe in probes {
        let (got, addr) = probe.join().expect("probe");
        assert!(
            got.is_empty(),
            "{addr} sent {} bytes to a stranger: {got:?}",
            got.len()
        );
    }
    for addr in [&pc, &sc] {
        let err = status_with_key(addr, &other_key()).expect_err("a status with another key");
        assert!(err.contains("failed authentication"), "{err}");
    }
    let st = status_with_key(&pc, key).expect("the primary still answers its pair");
    assert!(st.contains("protected=yes"), "{st}");
    let (o, out, err) = p.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_counter(&out, 800);
    assert!(!err.contains("unprotected"), "{err}");
    let (o, _, err) = s.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
}

/// A port scan of `ftvm standby --listen`: connect and close, 100 KB of random bytes, a
/// sender of one byte every 100 ms (still connected when the primary comes), 100 parallel
/// connections. The standby keeps listening through all of it and a real primary then pairs
/// with it and runs its guest protected to the end.
#[test]
fn a_port_scan_leaves_the_standby_listening_and_a_real_primary_pairs() {
    let _one = serial();
    let listen = free_addr();
    let key = pair_key();
    let mut s = Proc::spawn(&["standby", "--listen", &listen, "--key", key]);
    drop(connect_when_up(&listen));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..100_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut c = connect_when_up(&listen);
    let _ = c.write_all(&noise);
    drop(c);
    let slow_addr = listen.clone();
    let slow = std::thread::spawn(move || {
        let mut c = connect_when_up(&slow_addr);
        for b in b"FTVMPAIR slowly" {
            if c.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let flood: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(&listen).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(flood);
    assert!(s.running(), "the standby exited during the scan");
    let p = Proc::spawn(&[
        "run",
        "--peer",
        &listen,
        "--cmdline",
        "workload=counter ticks=20",
        "--key",
        key,
    ]);
    let (o, out, err) = p.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_counter(&out, 20);
    assert!(!err.contains("unprotected"), "{err}");
    let (o, _, err) = s.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("still listening"),
        "the refusals are logged: {err}"
    );
    let _ = slow.join();
}

/// A primary with another key is refused, and refuses, with an error naming the peer; the
/// standby keeps listening and the primary with the right key then pairs. An unencrypted
/// (`--insecure`) primary is refused the same way.
#[test]
fn a_peer_with_the_wrong_key_is_refused_on_both_sides() {
    let _one = serial();
    let listen = free_addr();
    let key = pair_key();
    let wrong = other_key();
    let mut s = Proc::spawn(&["standby", "--listen", &listen, "--key", key]);
    let _ = connect_when_up(&listen);
    for args in [
        ["--key", wrong.as_str()].as_slice(),
        ["--insecure"].as_slice(),
    ] {
        let mut a = vec![
            "run",
            "--peer",
            &listen,
            "--cmdline",
            "workload=counter ticks=5",
        ];
        a.extend_from_slice(args);
        let (o, out, err) = Proc::spawn(&a).wait();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(out.is_empty(), "the guest ran unprotected: {out}");
        assert!(
            err.contains(&format!(
                "ftvm: error: standby {listen}: {listen} failed authentication"
            )),
            "{args:?}: {err}"
        );
        assert!(s.running(), "the standby exited after a wrong key");
    }
    let (o, out, err) = Proc::spawn(&[
        "run",
        "--peer",
        &listen,
        "--cmdline",
        "workload=counter ticks=5",
        "--key",
        key,
    ])
    .wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_counter(&out, 5);
    let (o, _, err) = s.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("failed authentication: its handshake does not authenticate: it does not hold this pair's key"),
        "the standby names the refused peer: {err}"
    );
}

/// A standby that cannot be reached, or holds another key: the primary exits with an error
/// unless `--allow-unprotected`, and then says it runs unprotected.
#[test]
fn a_primary_without_an_authenticated_standby_runs_only_when_allowed() {
    let _one = serial();
    let listen = free_addr();
    let wrong = other_key();
    let _s = Proc::spawn(&["standby", "--listen", &listen, "--key", &wrong]);
    let _ = connect_when_up(&listen);
    let args = [
        "run",
        "--peer",
        &listen,
        "--cmdline",
        "workload=counter ticks=5",
        "--key",
        pair_key(),
    ];
    let (o, out, err) = Proc::spawn(&args).wait();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    let mut allowed = args.to_vec();
    allowed.push("--allow-unprotected");
    let (o, out, err) = Proc::spawn(&allowed).wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_counter(&out, 5);
    assert!(
        err.contains("failed authentication")
            && err.contains("running unprotected (--allow-unprotected)"),
        "{err}"
    );
}

/// `--insecure` on both sides pairs over plain TCP, and `ftvm status` says so.
#[test]
fn an_insecure_pair_says_so_in_its_status() {
    let _one = serial();
    let (listen, pc) = (free_addr(), free_addr());
    let s = Proc::spawn(&["standby", "--listen", &listen, "--insecure"]);
    let p = Proc::spawn(&[
        "run",
        "--peer",
        &listen,
        "--control",
        &pc,
        "--cmdline",
        "workload=counter ticks=200",
        "--insecure",
    ]);
    let start = Instant::now();
    let text = loop {
        let o = Command::new(FTVM)
            .args(["status", &pc, "--insecure"])
            .output()
            .expect("status");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text.contains("protected=yes") {
            break text;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never protected");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.lines().any(|l| l == "channel=insecure"), "{text}");
    let (o, out, err) = p.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_counter(&out, 200);
    let (o, _, err) = s.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
}

/// A standby that holds the key but sends fields that cannot be right: an acknowledgement
/// of an epoch never shipped (which would release unverified output), a repair request
/// naming a page outside guest RAM, a disk the guest does not have, hashes of the wrong
/// length. Each drops that standby, never the guest: it runs to its end, unprotected.
#[test]
fn a_standby_sending_malformed_fields_is_dropped_and_the_guest_runs_on() {
    use ftvm_proto::channel::{message::Body, Ack, BlockHash, Diverged, Message, PageHash};
    use ftvm_replication::link::{self, PairKey, Security};
    let _one = serial();
    let key_text = std::fs::read_to_string(pair_key()).expect("key");
    let key = Security::key(PairKey::from_hex(&key_text).expect("a key"));
    let page = |pfn, len| PageHash {
        pfn,
        hash: vec![7; len],
    };
    let diverged = |d: Diverged| {
        Body::Diverged(Diverged {
            epoch: 1,
            reason: "fake".into(),
            ..d
        })
    };
    let cases: Vec<(Body, &str)> = vec![
        (
            Body::Ack(Ack {
                received_epoch: u64::MAX,
                verified_epoch: u64::MAX,
                exit_seq: 0,
            }),
            "it acknowledged epoch 18446744073709551615",
        ),
        (
            diverged(Diverged {
                dirty: vec![page(1 << 40, 32)],
                ..Default::default()
            }),
            "which is not guest RAM",
        ),
        (
            diverged(Diverged {
                dirty: vec![page(1, 5)],
                ..Default::default()
            }),
            "a page hash that is not 32 bytes long",
        ),
        (
            diverged(Diverged {
                dirty_blocks: vec![BlockHash {
                    disk: 99,
                    block: 0,
                    hash: vec![0; 32],
                }],
                ..Default::default()
            }),
            "of disk 99, which the guest does not have",
        ),
    ];
    for (bad, expected) in cases {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = format!("127.0.0.1:{}", l.local_addr().expect("addr").port());
        let key = key.clone();
        let fake = std::thread::spawn(move || {
            let (mut h, peer) = common::fake_standby_ready(&l, &key);
            std::thread::sleep(Duration::from_millis(100));
            let _ = link::send_blocking(&mut h.stream, &peer, &Message { body: Some(bad) });
            // Read what the primary sends until it closes (after its Abandon).
            let _ = h
                .stream
                .tcp()
                .set_read_timeout(Some(Duration::from_secs(10)));
            let mut sink = [0u8; 65536];
            while matches!(h.stream.read(&mut sink), Ok(n) if n > 0) {}
        });
        let (o, out, err) = Proc::spawn(&[
            "run",
            "--peer",
            &addr,
            "--cmdline",
            "workload=counter ticks=60",
            "--key",
            pair_key(),
        ])
        .wait();
        let _ = fake.join();
        assert_eq!(o.status.code(), Some(0), "{expected}: {err}");
        assert_counter(&out, 60);
        assert!(
            err.contains("standby lost: it broke the pair protocol")
                && err.contains(expected)
                && err.contains("running unprotected"),
            "expected {expected:?} in:\n{err}"
        );
    }
}

/// The join port: a standby with another key is turned away (the primary says so and runs
/// on), and the standby exits with an error naming the primary; the guest is not disturbed.
#[test]
fn a_joining_standby_with_the_wrong_key_is_refused_on_both_sides() {
    let _one = serial();
    let (join, pc) = (free_addr(), free_addr());
    let key = pair_key();
    let p = Proc::spawn(&[
        "run",
        "--accept-standby",
        &join,
        "--control",
        &pc,
        "--cmdline",
        "workload=counter ticks=150",
        "--key",
        key,
    ]);
    let _ = connect_when_up(&join);
    let wrong = other_key();
    let (o, out, err) = Proc::spawn(&["standby", "--join", &join, "--key", &wrong]).wait();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!("{join} failed authentication")),
        "the standby names the primary: {err}"
    );
    let st = status_with_key(&pc, key).expect("the primary answers its own key");
    assert!(st.contains("protected=no"), "{st}");
    let (o, out, err) = p.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_counter(&out, 150);
    assert!(
        err.contains("joining standby 127.0.0.1:") && err.contains("failed authentication"),
        "the primary names the refused standby: {err}"
    );
}
