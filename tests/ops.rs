//! What operators see (issue 19), end to end with real processes and real sockets: the
//! metrics endpoint of a real pair scraped during a run and after a failover, `ftvm status
//! --json` next to the text form, the event log of a kill drill, and the alert rules under
//! promtool. The tests wait for states, never for a time.

mod common;
#[path = "split_brain/procs.rs"]
mod procs;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_addr, repo, Scratch, FTVM};
use procs::*;

/// One scrape: every sample line as `name{labels}` → value.
struct Scrape(BTreeMap<String, f64>, String);

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in the scrape:\n{}", self.1))
    }
}

/// `GET /metrics` on `addr`.
fn try_scrape(addr: &str) -> Result<Scrape, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {text}"))?;
    if !head.starts_with("HTTP/1.1 200 OK") || !head.contains("openmetrics-text") {
        return Err(format!("unexpected answer: {head}"));
    }
    if !body.ends_with("# EOF\n") {
        return Err(format!("truncated exposition:\n{body}"));
    }
    let mut samples = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (key, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("bad sample line {line:?}"))?;
        let value = value
            .parse()
            .map_err(|_| format!("bad value in {line:?}"))?;
        samples.insert(key.to_string(), value);
    }
    Ok(Scrape(samples, body.to_string()))
}

/// Scrapes `addr` until `pred` holds (the process may still be starting).
fn wait_scrape(addr: &str, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = Instant::now();
    loop {
        let last = match try_scrape(addr) {
            Ok(s) if pred(&s) => return s,
            Ok(s) => s.1,
            Err(e) => e,
        };
        assert!(
            start.elapsed() < LIMIT,
            "never {what}; last scrape:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The event names of an event log, each line checked to be one JSON object with a
/// timestamp.
fn events(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e} in {l:?}"));
            assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
            assert!(v["ts_ms"].as_u64().is_some_and(|t| t > 0), "{l}");
            assert!(v["event"].is_string(), "{l}");
            v
        })
        .collect()
}

/// Asserts that `expected` occur in `log`, in this order (other events may come between).
fn assert_story(log: &[serde_json::Value], expected: &[&str]) {
    let names: Vec<&str> = log.iter().filter_map(|v| v["event"].as_str()).collect();
    let mut rest = names.iter();
    for want in expected {
        assert!(
            rest.any(|n| n == want),
            "{want:?} missing or out of order in {names:?} (expected {expected:?} in order)"
        );
    }
}

fn no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `ftvm status --json ADDR` parses, and has the text form's fields with the same values
/// where they cannot move between the two queries.
fn assert_json_matches_text(control: &str) {
    let text = status_of(control);
    let o = Command::new(FTVM)
        .args(["status", "--json", control])
        .args(common::key_args(&[]))
        .output()
        .expect("ftvm status --json");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("ftvm status --json prints one JSON object");
    let object = json.as_object().expect("an object");
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        object
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        keys.iter().copied().collect(),
        "text:\n{text}json: {json}"
    );
    for key in ["role", "peer"] {
        assert_eq!(json[key], status_field(&text, key), "{key}");
    }
    let protected = status_field(&text, "protected") == "yes";
    assert_eq!(json["protected"], protected);
    for key in ["heartbeat_ms", "heartbeat_timeout_ms", "syncs"] {
        assert_eq!(json[key], status_number(&text, key), "{key}");
    }
    for key in [
        "epoch",
        "verified_epoch",
        "exit_seq",
        "lag_epochs",
        "lag_bytes",
        "held_output_bytes",
    ] {
        assert!(json[key].is_u64(), "{key} in {json}");
    }
    assert!(json["lag_ms"].is_number(), "{json}");
}

fn status_number(text: &str, key: &str) -> u64 {
    status_field(text, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {text}"))
}

/// Every `ftvm_…` metric the alert rules use is in `scrape` (names as exposed; `_total` of
/// counters included).
fn assert_alerted_metrics_exist(scrape: &Scrape) {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/ftvm-alerts.yml"))
        .expect("the alert rules");
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("ftvm_") && !word.starts_with("ftvm_witness") {
                assert!(
                    scrape
                        .0
                        .keys()
                        .any(|k| k == word || k.starts_with(&format!("{word}{{"))),
                    "the alert rules use {word}, which the pair does not expose:\n{}",
                    scrape.1
                );
            }
        }
    }
}

/// A protected pair with a witness: the primary is SIGKILLed mid-run. The metrics move as
/// the run does (epochs grow, both sides protected), then the standby's say it went live
/// unprotected after one failover and won term 1; both event logs tell the same story.
#[test]
fn a_kill_drill_is_told_by_metrics_and_events() {
    let _one = serial();
    let dir = Scratch::new("ops-kill-drill");
    let [wa, wm, addr, sc, sm, pc, pm] = [(); 7].map(|()| free_addr());
    let (se, pe) = (dir.path_str("standby.jsonl"), dir.path_str("primary.jsonl"));
    let state = dir.path_str("witness-state");
    let mut w = spawn(
        &[
            "witness",
            "--listen",
            &wa,
            "--state",
            &state,
            "--metrics",
            &wm,
        ],
        &["witness ready"],
    );
    w.expect("witness ready");
    let s = standby(
        &addr,
        &sc,
        &["--witness", &wa, "--metrics", &sm, "--events", &se],
        &[],
    );
    let ticks = 600;
    let mut p = primary(
        &addr,
        ticks,
        &[
            "--witness",
            &wa,
            "--control",
            &pc,
            "--metrics",
            &pm,
            "--events",
            &pe,
        ],
        &["standby ready"],
    );
    p.expect("standby ready");
    let first = wait_scrape(&pm, "protected with a verified epoch", |m| {
        m.get("ftvm_protected") == 1.0 && m.get("ftvm_verified_epoch") > 0.0
    });
    assert_eq!(first.get("ftvm_role{role=\"primary\"}"), 1.0);
    assert_eq!(first.get("ftvm_state{state=\"lockstep\"}"), 1.0);
    assert_eq!(first.get("ftvm_term"), 0.0);
    assert_eq!(first.get("ftvm_arbiter_reachable"), 1.0);
    let epoch = first.get("ftvm_epoch");
    let later = wait_scrape(&pm, "epochs growing", |m| {
        m.get("ftvm_epoch") > epoch + 10.0 && m.get("ftvm_ack_latency_seconds_count") > 0.0
    });
    assert!(later.get("ftvm_released_output_bytes") > 0.0);
    assert!(later.get("ftvm_output_delay_seconds_count") > 0.0);
    assert_alerted_metrics_exist(&later);
    let following = wait_scrape(&sm, "the standby verifying", |m| {
        m.get("ftvm_protected") == 1.0 && m.get("ftvm_verified_epoch") > epoch
    });
    assert_eq!(following.get("ftvm_role{role=\"standby\"}"), 1.0);
    assert_eq!(following.get("ftvm_failovers_total"), 0.0);
    assert_json_matches_text(&pc);
    assert_json_matches_text(&sc);

    let verified = following.get("ftvm_verified_epoch");
    let old = p.kill();
    let live = wait_scrape(&sm, "live after the failover", |m| {
        m.get("ftvm_failovers_total") == 1.0
    });
    assert_eq!(live.get("ftvm_role{role=\"primary\"}"), 1.0, "{}", live.1);
    assert_eq!(live.get("ftvm_protected"), 0.0, "{}", live.1);
    assert_eq!(live.get("ftvm_term"), 1.0, "{}", live.1);
    assert_eq!(live.get("ftvm_arbiter_reachable"), 1.0, "{}", live.1);
    assert!(live.get("ftvm_verified_epoch") >= verified, "{}", live.1);
    assert_eq!(status_field(&status_of(&sc), "protected"), "no");
    let witness = try_scrape(&wm).expect("the witness's metrics");
    assert_eq!(
        witness.get("ftvm_witness_requests_total{outcome=\"granted\"}"),
        1.0
    );
    assert_eq!(witness.get("ftvm_witness_highest_term"), 1.0);
    let s = s.wait(LIMIT);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    assert_failover_output(&old.stdout, &s.stdout, &s.stderr, ticks);
    drop(w);

    let standby_log = events(&se);
    assert_story(
        &standby_log,
        &[
            "role_changed",
            "protected",
            "unprotected",
            "role_changed",
            "failover",
        ],
    );
    assert_eq!(standby_log[0]["to"], "standby", "{}", standby_log[0]);
    let failover = standby_log
        .iter()
        .find(|v| v["event"] == "failover")
        .expect("a failover event");
    assert!(
        failover["verified_epoch"].as_u64() >= Some(verified as u64),
        "{failover}"
    );
    let primary_log = events(&pe);
    assert_story(&primary_log, &["role_changed", "protected"]);
    assert_eq!(primary_log[0]["to"], "primary", "{}", primary_log[0]);
}

/// A primary that loses its standby shows unprotected (and counts it) until a new standby
/// joins; the sync shows in the metrics and the events, then protection again.
#[test]
fn a_lost_standby_and_a_join_are_told_by_metrics_and_events() {
    let _one = serial();
    let dir = Scratch::new("ops-join");
    let [addr, accept, pc, pm, sc1, sc2] = [(); 6].map(|()| free_addr());
    let (pe, se) = (dir.path_str("primary.jsonl"), dir.path_str("standby.jsonl"));
    let s1 = standby(&addr, &sc1, &[], &[]);
    let ticks = 800;
    let mut p = primary(
        &addr,
        ticks,
        &[
            "--accept-standby",
            &accept,
            "--control",
            &pc,
            "--metrics",
            &pm,
            "--events",
            &pe,
        ],
        &["standby ready"],
    );
    p.expect("standby ready");
    wait_scrape(&pm, "protected", |m| m.get("ftvm_protected") == 1.0);
    let _ = s1.kill();
    let alone = wait_scrape(&pm, "unprotected after the standby's death", |m| {
        m.get("ftvm_protected") == 0.0
    });
    assert_eq!(alone.get("ftvm_protection_lost_total"), 1.0, "{}", alone.1);
    assert_eq!(
        alone.get("ftvm_state{state=\"unprotected\"}"),
        1.0,
        "{}",
        alone.1
    );
    let s2 = spawn(
        &[
            "standby",
            "--join",
            &accept,
            "--control",
            &sc2,
            "--events",
            &se,
        ],
        &[],
    );
    let again = wait_scrape(&pm, "protected again after the join", |m| {
        m.get("ftvm_protected") == 1.0 && m.get("ftvm_syncs_total") == 1.0
    });
    assert_eq!(again.get("ftvm_syncs_started_total"), 1.0, "{}", again.1);
    assert_eq!(again.get("ftvm_failovers_total"), 0.0, "{}", again.1);
    let p = p.wait(LIMIT);
    let s2 = s2.wait(LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", p.stderr);
    assert_eq!(s2.status.code(), Some(0), "standby: {}", s2.stderr);
    assert_complete_count(&p.out(), ticks);
    assert_story(
        &events(&pe),
        &[
            "role_changed",
            "protected",
            "unprotected",
            "sync_started",
            "sync_finished",
            "protected",
            "run_ended",
        ],
    );
    // The joining standby is unprotected from its first event until its sync is done.
    let joined = events(&se);
    assert_story(
        &joined,
        &[
            "role_changed",
            "sync_started",
            "unprotected",
            "sync_finished",
            "protected",
            "run_ended",
        ],
    );
    let names: Vec<&str> = joined.iter().filter_map(|v| v["event"].as_str()).collect();
    let first_protected = names.iter().position(|n| *n == "protected");
    let finished = names.iter().position(|n| *n == "sync_finished");
    assert!(first_protected > finished, "{names:?}");
}

/// A planned switchover: both sides count it and log it, each in its new role, and the run
/// finishes protected.
#[test]
fn a_switchover_is_counted_and_logged_on_both_sides() {
    let _one = serial();
    let dir = Scratch::new("ops-switchover");
    let [addr, pc, pm, sc, sm] = [(); 5].map(|()| free_addr());
    let (pe, se) = (dir.path_str("p.jsonl"), dir.path_str("s.jsonl"));
    let s = standby(&addr, &sc, &["--metrics", &sm, "--events", &se], &[]);
    // Long enough (10 s) that the run cannot end while the switchover is checked.
    let mut p = primary(
        &addr,
        1000,
        &["--control", &pc, "--metrics", &pm, "--events", &pe],
        &["standby ready"],
    );
    p.expect("standby ready");
    wait_scrape(&pm, "protected", |m| {
        m.get("ftvm_protected") == 1.0 && m.get("ftvm_verified_epoch") > 0.0
    });
    let o = Command::new(FTVM)
        .args(["switchover", &pc])
        .args(common::key_args(&[]))
        .output()
        .expect("ftvm switchover");
    if !o.status.success() {
        let (p, s) = (p.kill(), s.kill());
        panic!(
            "ftvm switchover: {}\nprimary: {}\nstandby: {}",
            String::from_utf8_lossy(&o.stderr),
            p.stderr,
            s.stderr
        );
    }
    let old = wait_scrape(&pm, "the old primary a standby", |m| {
        m.get("ftvm_switchovers_total") == 1.0 && m.get("ftvm_role{role=\"standby\"}") == 1.0
    });
    assert_eq!(old.get("ftvm_failovers_total"), 0.0, "{}", old.1);
    let new = wait_scrape(&sm, "the old standby the primary", |m| {
        m.get("ftvm_switchovers_total") == 1.0 && m.get("ftvm_role{role=\"primary\"}") == 1.0
    });
    assert_eq!(new.get("ftvm_failovers_total"), 0.0, "{}", new.1);
    // The events are written before the metrics change: both logs are complete now.
    let (p, s) = (p.kill(), s.kill());
    no_panic(&p.stderr);
    no_panic(&s.stderr);
    let p_log = events(&pe);
    assert_story(&p_log, &["role_changed", "protected", "switchover"]);
    let switched = p_log.iter().find(|v| v["event"] == "switchover");
    assert_eq!(switched.map(|v| &v["to"]), Some(&"standby".into()));
    let s_log = events(&se);
    assert_story(&s_log, &["role_changed", "protected", "switchover"]);
    let switched = s_log.iter().find(|v| v["event"] == "switchover");
    assert_eq!(switched.map(|v| &v["to"]), Some(&"primary".into()));
}

/// A frozen primary loses the term to its standby; let run again, it fences itself, and
/// its event log says so before it exits.
#[test]
fn a_fenced_primary_logs_it_before_it_exits() {
    let _one = serial();
    let dir = Scratch::new("ops-fenced");
    let [wa, addr, sc, sm] = [(); 4].map(|()| free_addr());
    let pe = dir.path_str("p.jsonl");
    let mut w = spawn(
        &[
            "witness",
            "--listen",
            &wa,
            "--state",
            &dir.path_str("state"),
        ],
        &["witness ready"],
    );
    w.expect("witness ready");
    let s = standby(&addr, &sc, &["--witness", &wa, "--metrics", &sm], &[]);
    let mut p = primary(
        &addr,
        300,
        &["--witness", &wa, "--events", &pe],
        &["standby ready"],
    );
    p.expect("standby ready");
    wait_scrape(&sm, "following", |m| m.get("ftvm_verified_epoch") > 0.0);
    p.signal(libc::SIGSTOP);
    let live = wait_scrape(&sm, "live with term 1", |m| {
        m.get("ftvm_failovers_total") == 1.0 && m.get("ftvm_term") == 1.0
    });
    assert_eq!(live.get("ftvm_protected"), 0.0, "{}", live.1);
    p.signal(libc::SIGCONT);
    let p = p.wait(LIMIT);
    assert_eq!(p.status.code(), Some(11), "primary: {}", p.stderr);
    let s = s.wait(LIMIT);
    assert_eq!(s.status.code(), Some(0), "standby: {}", s.stderr);
    drop(w);
    let log = events(&pe);
    assert_story(
        &log,
        &["role_changed", "protected", "unprotected", "fenced"],
    );
    let last = log.last().expect("events");
    assert_eq!(last["event"], "fenced", "{last}");
    assert!(
        last["why"]
            .as_str()
            .is_some_and(|w| w.contains("the witness gave term 1")),
        "{last}"
    );
}

/// The alert rules are valid and their unit tests pass (promtool, installed by
/// scripts/setup.sh; missing, this fails: it is never skipped).
#[test]
fn the_alert_rules_pass_promtool() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        ["check", "rules", "ftvm-alerts.yml"],
        ["test", "rules", "ftvm-alerts.test.yml"],
    ] {
        let o = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool cannot run ({e}): scripts/setup.sh installs it (Debian's prometheus package)")
            });
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
