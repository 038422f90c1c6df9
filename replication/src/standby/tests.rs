//! The standby's protocol rules, each driven through [`StandbyCore`] with constructed
//! events: no socket, no thread, no clock.

use std::time::{Duration, Instant};

use ftvm_proto::channel::{
    message::Body, Abandon, CheckpointEnd, Diverged, HeldOutput, Message, Released, Switchover,
};
use ftvm_proto::log::{record::Kind, EpochEnd, Record, RecordBatch};
use ftvm_proto::packed;

use super::core::{Action, StandbyCore};
use super::{FromReplayer, ToReplayer};
use crate::link::{ChannelError, Heartbeat};
use crate::status::Request;
use crate::witness::{ClaimOutcome, Verdict};

const HB: Heartbeat = Heartbeat {
    interval: Duration::from_millis(50),
    timeout: Duration::from_millis(150),
};

struct Standby {
    core: StandbyCore,
    now: Instant,
}

fn standby() -> Standby {
    let now = Instant::now();
    Standby {
        core: StandbyCore::new("primary:1".into(), HB, false, now),
        now,
    }
}

fn epoch_end(epoch: u64, exit_seq: u64) -> Message {
    Message {
        body: Some(Body::Batch(packed::pack_batch(RecordBatch {
            complete_through: exit_seq,
            records: vec![Record {
                exit_seq,
                at_kick: false,
                kind: Some(Kind::EpochEnd(EpochEnd {
                    epoch,
                    exit_seq,
                    ..Default::default()
                })),
            }],
            packed: Default::default(),
        }))),
    }
}

impl Standby {
    fn primary(&mut self, msg: Message) {
        self.core.heard(self.now);
        self.core.on_message(msg, self.now);
    }

    fn replayer(&mut self, event: FromReplayer) {
        self.core.on_replayer(event, self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn status(&self) -> String {
        self.core.status(self.now, 0).to_string()
    }
}

#[test]
fn the_log_goes_to_the_replayer_each_received_epoch_and_each_verified_epoch_is_acknowledged() {
    let mut s = standby();
    let ack_of = |a: &Action| match a {
        Action::Send(Message {
            body: Some(Body::Ack(ack)),
        }) => Some((ack.received_epoch, ack.verified_epoch, ack.exit_seq)),
        _ => None,
    };
    s.primary(epoch_end(1, 10));
    s.primary(epoch_end(2, 20));
    let actions = s.actions();
    // Each epoch's end goes to the replayer, then Received(k) goes back at once.
    assert!(
        matches!(
            actions.as_slice(),
            [
                Action::ToReplayer(ToReplayer::Batch(_)),
                Action::Send(_),
                Action::ToReplayer(ToReplayer::Batch(_)),
                Action::Send(_)
            ]
        ),
        "{actions:?}"
    );
    let acks: Vec<_> = actions.iter().filter_map(ack_of).collect();
    assert_eq!(acks, [(1, 0, 0), (2, 0, 0)]);
    assert!(s.status().contains("lag_epochs=2"));
    s.replayer(FromReplayer::Verified {
        epoch: 1,
        exit_seq: 10,
        replayed: s.now,
    });
    let actions = s.actions();
    let acks: Vec<_> = actions.iter().filter_map(ack_of).collect();
    assert_eq!(acks, [(2, 1, 10)], "{actions:?}");
    assert!(s.status().contains("lag_epochs=1"));
    assert!(s.status().contains("verified_epoch=1"));
}

#[test]
fn released_output_is_noted_and_never_goes_back() {
    let mut s = standby();
    s.primary(Message {
        body: Some(Body::Released(Released { output_seq: 40 })),
    });
    s.primary(Message {
        body: Some(Body::Released(Released { output_seq: 30 })),
    });
    assert!(matches!(
        s.actions().as_slice(),
        [Action::Released(40), Action::Released(30)]
    ));
    assert!(s.status().contains("released_output_seq=40"));
}

#[test]
fn a_divergence_is_reported_and_the_repair_acknowledged_once_installed() {
    let mut s = standby();
    s.primary(epoch_end(1, 10));
    s.actions();
    s.replayer(FromReplayer::Diverged(Diverged {
        epoch: 1,
        exit_seq: 9,
        reason: "digest mismatch".into(),
        ..Default::default()
    }));
    assert!(matches!(
        s.actions().as_slice(),
        [Action::Send(Message {
            body: Some(Body::Diverged(_))
        })]
    ));
    assert!(s.status().contains("state=repairing: epoch 1 at exit 9"));
    // The checkpoint's held output comes first, then its end.
    s.primary(Message {
        body: Some(Body::HeldOutput(HeldOutput {
            checkpoint: 4,
            released_seq: 7,
            data: b"held".to_vec(),
        })),
    });
    s.primary(Message {
        body: Some(Body::CheckpointEnd(CheckpointEnd {
            checkpoint: 4,
            epoch: 2,
            exit_seq: 12,
            ..Default::default()
        })),
    });
    let actions = s.actions();
    let [Action::ToReplayer(ToReplayer::CheckpointEnd { end, held })] = actions.as_slice() else {
        panic!("the checkpoint goes to the replayer: {actions:?}");
    };
    assert_eq!(
        (end.epoch, held.released_seq, held.data.as_slice()),
        (2, 7, &b"held"[..])
    );
    s.replayer(FromReplayer::Installed {
        epoch: 2,
        exit_seq: 12,
        sync: false,
    });
    assert!(matches!(
        s.actions().as_slice(),
        [Action::Send(Message {
            body: Some(Body::Ack(_))
        })]
    ));
    assert!(s.status().contains("state=lockstep"));
    assert!(s.status().contains("repairs=1"));
    assert!(s.status().contains("lag_epochs=0"));
}

#[test]
fn a_checkpoint_end_without_its_held_output_stops_following_but_never_goes_live() {
    let mut s = standby();
    s.primary(Message {
        body: Some(Body::CheckpointEnd(CheckpointEnd {
            checkpoint: 4,
            ..Default::default()
        })),
    });
    // A primary that breaks the protocol may still run: no go-live without evidence.
    let actions = s.actions();
    assert!(
        matches!(actions.as_slice(), [Action::DropLink]),
        "{actions:?}"
    );
    assert!(s
        .status()
        .contains("state=waiting: primary primary:1 broke the pair protocol"));
    assert!(s.status().contains("came without its held output"));
}

fn heartbeats(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Send(Message {
                    body: Some(Body::Heartbeat(_))
                })
            )
        })
        .count()
}

#[test]
fn a_silent_primary_makes_the_standby_wait_and_it_follows_again_when_the_primary_speaks() {
    let mut s = standby();
    s.now += Duration::from_millis(60);
    s.core.tick(s.now);
    assert_eq!(heartbeats(&s.actions()), 1);
    s.now += Duration::from_millis(91);
    s.core.tick(s.now);
    // Silence is no evidence of death: the VM stays as it is, nothing goes to the replayer,
    // the connection stays open and heartbeats go on, so a paused primary finds us alive.
    let actions = s.actions();
    assert!(
        actions.iter().all(|a| matches!(a, Action::Send(_))),
        "{actions:?}"
    );
    assert!(s
        .status()
        .contains("state=waiting: primary primary:1 silent for"));
    assert!(s.status().contains("not going live without an arbiter"));
    for _ in 0..20 {
        s.now += Duration::from_millis(50);
        s.core.tick(s.now);
    }
    assert_eq!(heartbeats(&s.actions()), 20);
    // The primary speaks again on the same connection: lockstep goes on.
    s.primary(epoch_end(1, 10));
    assert!(matches!(
        s.actions().as_slice(),
        [
            Action::ToReplayer(ToReplayer::Batch(_)),
            Action::Send(Message {
                body: Some(Body::Ack(_))
            })
        ]
    ));
    assert!(s.status().contains("state=lockstep"), "{}", s.status());
}

#[test]
fn promote_makes_a_waiting_standby_go_live_and_is_refused_otherwise() {
    let mut s = standby();
    s.core.set_control_addr("127.0.0.1:7".into());
    let refused = s.core.control_request(Request::Promote, s.now, 0);
    assert!(
        refused.starts_with("error: this standby follows a live primary"),
        "{refused}"
    );
    assert!(s.actions().is_empty());
    s.now += Duration::from_millis(200);
    s.core.tick(s.now);
    s.actions();
    assert!(s.status().contains("(ftvm promote 127.0.0.1:7 to go live)"));
    let answer = s.core.control_request(Request::Promote, s.now, 0);
    assert!(answer.starts_with("promoted"), "{answer}");
    let actions = s.actions();
    let [Action::DropLink, Action::ToReplayer(ToReplayer::PrimaryLost(why))] = actions.as_slice()
    else {
        panic!("promote goes live: {actions:?}");
    };
    assert!(why.starts_with("promoted by the operator (primary primary:1 silent for"));
    assert!(s
        .status()
        .contains("state=going live: promoted by the operator"));
    let again = s.core.control_request(Request::Promote, s.now, 0);
    assert!(
        again.starts_with("error: this standby is live already"),
        "{again}"
    );
}

#[test]
fn an_abandoned_standby_stops_and_never_goes_live() {
    let mut s = standby();
    s.primary(epoch_end(1, 10));
    s.actions();
    s.primary(Message {
        body: Some(Body::Abandon(Abandon {
            reason: "standby lost: standby:1 silent for 151ms".into(),
        })),
    });
    let actions = s.actions();
    let [Action::DropLink, Action::ToReplayer(ToReplayer::Abandoned(why))] = actions.as_slice()
    else {
        panic!("abandoned: {actions:?}");
    };
    assert!(why.contains("silent for 151ms"));
    // The close that follows is not the primary's death.
    s.core.link_failed(ChannelError::Closed {
        peer: "primary:1".into(),
    });
    s.core.tick(s.now + Duration::from_secs(1));
    assert!(s.actions().is_empty());
    assert!(s.status().contains("state=abandoned: standby lost"));
    assert!(s
        .core
        .control_request(Request::Promote, s.now, 0)
        .starts_with("error: the primary abandoned this standby"));
}

#[test]
fn only_a_close_or_a_reset_is_evidence_that_the_primary_is_gone() {
    let peer = || "primary:1".to_string();
    let io = |kind| ChannelError::Io {
        peer: peer(),
        source: std::io::Error::from(kind),
    };
    for (e, evidence) in [
        (ChannelError::Closed { peer: peer() }, true),
        (io(std::io::ErrorKind::ConnectionReset), true),
        (io(std::io::ErrorKind::TimedOut), false),
        (io(std::io::ErrorKind::HostUnreachable), false),
        (
            ChannelError::Silent {
                peer: peer(),
                silent: Duration::from_millis(200),
                timeout: HB.timeout,
            },
            false,
        ),
        (
            ChannelError::Unexpected {
                peer: peer(),
                expected: "a record batch",
                got: "Ack".into(),
            },
            false,
        ),
    ] {
        let what = e.to_string();
        let mut s = standby();
        s.core.link_failed(e);
        let lost = s
            .actions()
            .iter()
            .any(|a| matches!(a, Action::ToReplayer(ToReplayer::PrimaryLost(_))));
        assert_eq!(lost, evidence, "{what}");
    }
}

#[test]
fn a_closed_connection_loses_the_primary_once() {
    let mut s = standby();
    let closed = || ChannelError::Closed {
        peer: "primary:1".into(),
    };
    s.core.link_failed(closed());
    s.core.link_failed(closed());
    assert_eq!(s.actions().len(), 2, "DropLink and PrimaryLost, once");
    s.replayer(FromReplayer::Live);
    assert!(s.status().contains("role=primary (live after failover)"));
}

#[test]
fn a_switchover_hands_the_connection_over() {
    let mut s = standby();
    s.primary(Message {
        body: Some(Body::Switchover(Switchover {
            epoch: 3,
            exit_seq: 30,
            output_seq: 9,
        })),
    });
    assert!(s.core.handing_over());
    assert!(matches!(
        s.actions().as_slice(),
        [Action::ToReplayer(ToReplayer::Switchover(_))]
    ));
    assert!(s
        .core
        .control_request(Request::Switchover, s.now, 0)
        .starts_with("error: this is the standby"));
}

#[test]
fn a_message_only_a_standby_sends_loses_the_primary() {
    let mut s = standby();
    s.primary(Message {
        body: Some(Body::Ack(Default::default())),
    });
    assert!(s
        .status()
        .contains("expected a record batch, Released or Heartbeat, got Ack"));
}

#[test]
fn the_replayer_shutting_down_stops_the_channel() {
    let mut s = standby();
    assert!(!s.core.shut_down());
    s.replayer(FromReplayer::Shutdown);
    assert!(s.core.shut_down());
}

fn with_witness() -> Standby {
    let mut s = standby();
    s.core.set_arbiter("vm".into(), 3);
    s
}

fn claimed(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Claim { expected_term, .. } => Some(*expected_term),
            _ => None,
        })
        .collect()
}

fn silence(s: &mut Standby) -> Vec<Action> {
    s.now += Duration::from_millis(151);
    s.core.tick(s.now);
    s.actions()
}

#[test]
fn with_a_witness_a_silent_primary_is_claimed_against_and_the_winner_goes_live() {
    let mut s = with_witness();
    let actions = silence(&mut s);
    assert_eq!(claimed(&actions), vec![3]);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::ToReplayer(_) | Action::DropLink)),
        "no go-live before the verdict: {actions:?}"
    );
    assert!(s.status().contains("claiming term 4 at the witness"));
    assert!(s
        .core
        .control_request(Request::Promote, s.now, 0)
        .starts_with("error: this pair has an arbiter (the witness)"));
    s.core
        .claim_result(ClaimOutcome::Decided(Verdict::Granted { term: 4 }), s.now);
    let actions = s.actions();
    let [Action::DropLink, Action::ToReplayer(ToReplayer::PrimaryLost(why))] = actions.as_slice()
    else {
        panic!("the winner goes live: {actions:?}");
    };
    assert!(why.starts_with("won term 4 at the witness (primary primary:1 silent"));
}

#[test]
fn with_a_witness_a_standby_that_lost_the_term_stops_for_good() {
    let mut s = with_witness();
    silence(&mut s);
    s.core.claim_result(
        ClaimOutcome::Decided(Verdict::Refused {
            term: 4,
            holder: "ftvm on a pid 1".into(),
        }),
        s.now,
    );
    let actions = s.actions();
    let [Action::DropLink, Action::ToReplayer(ToReplayer::Fenced(why))] = actions.as_slice() else {
        panic!("fenced: {actions:?}");
    };
    assert!(why.starts_with("the witness gave term 4 to ftvm on a pid 1: the primary won"));
    assert!(s.status().contains("state=fenced: "));
}

#[test]
fn with_an_unreachable_witness_the_standby_waits_and_follows_a_primary_that_comes_back() {
    let mut s = with_witness();
    assert_eq!(claimed(&silence(&mut s)), vec![3]);
    // The primary speaks while the claim is out: the claim's outcome decides.
    s.primary(epoch_end(1, 10));
    s.core
        .claim_result(ClaimOutcome::Unreachable("timed out".into()), s.now);
    // Unreachable, and the primary was heard: follow it again, claim nothing more.
    assert!(s.status().contains("state=lockstep"), "{}", s.status());
    s.now += Duration::from_secs(1);
    s.core.heard(s.now);
    s.core.tick(s.now);
    assert!(claimed(&s.actions()).is_empty());
}

#[test]
fn with_a_witness_even_a_closed_connection_goes_live_only_through_the_term() {
    let mut s = with_witness();
    s.core.link_failed(ChannelError::Closed {
        peer: "primary:1".into(),
    });
    s.core.tick(s.now);
    let actions = s.actions();
    // A primary that dropped this standby without a word reaching it (its Abandon stuck
    // behind a full socket) holds the term already: the claim decides, not the close.
    assert!(
        matches!(actions.first(), Some(Action::DropLink)),
        "{actions:?}"
    );
    assert_eq!(claimed(&actions), vec![3]);
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::ToReplayer(ToReplayer::PrimaryLost(_)))));
}

#[test]
fn with_a_witness_abandon_during_a_claim_waits_for_the_verdict() {
    let abandon = || Message {
        body: Some(Body::Abandon(Abandon {
            reason: "standby lost: silent".into(),
        })),
    };
    // Granted: this standby holds the term, so it goes live (the primary will be refused).
    let mut s = with_witness();
    assert_eq!(claimed(&silence(&mut s)), vec![3]);
    s.primary(abandon());
    assert!(matches!(s.actions().as_slice(), [Action::DropLink]));
    s.core
        .claim_result(ClaimOutcome::Decided(Verdict::Granted { term: 4 }), s.now);
    assert!(matches!(
        s.actions().as_slice(),
        [Action::ToReplayer(ToReplayer::PrimaryLost(_))]
    ));
    // Not decided (unreachable): the primary lives on without us: abandoned.
    let mut s = with_witness();
    silence(&mut s);
    s.primary(abandon());
    s.actions();
    s.core
        .claim_result(ClaimOutcome::Unreachable("timed out".into()), s.now);
    assert!(matches!(
        s.actions().as_slice(),
        [Action::ToReplayer(ToReplayer::Abandoned(_))]
    ));
    s.now += Duration::from_secs(1);
    s.core.tick(s.now);
    assert!(claimed(&s.actions()).is_empty(), "no claim after abandon");
}

#[test]
fn with_a_witness_a_close_after_the_run_end_claims_nothing() {
    let mut s = with_witness();
    s.primary(Message {
        body: Some(Body::Batch(packed::pack_batch(RecordBatch {
            complete_through: 10,
            records: vec![Record {
                exit_seq: 10,
                at_kick: false,
                kind: Some(Kind::RunEnd(Default::default())),
            }],
            packed: Default::default(),
        }))),
    });
    s.actions();
    s.core.link_failed(ChannelError::Closed {
        peer: "primary:1".into(),
    });
    s.core.tick(s.now);
    let actions = s.actions();
    assert!(claimed(&actions).is_empty(), "{actions:?}");
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::ToReplayer(ToReplayer::PrimaryLost(_)))));
}

#[test]
fn a_syncing_standby_has_nothing_to_go_live_with_so_silence_loses_the_primary() {
    let mut s = with_witness();
    s.replayer(FromReplayer::Syncing {
        bytes: 0,
        remaining_pages: 0,
    });
    let actions = silence(&mut s);
    assert!(claimed(&actions).is_empty(), "{actions:?}");
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::ToReplayer(ToReplayer::PrimaryLost(_)))));
}

#[test]
fn the_audit_trail_says_when_the_primary_was_seen_dead_and_when_the_standby_went_live() {
    let now = Instant::now();
    let mut s = Standby {
        core: StandbyCore::new("primary:1".into(), HB, true, now),
        now,
    };
    s.core.link_failed(ChannelError::Closed {
        peer: "primary:1".into(),
    });
    s.replayer(FromReplayer::Live);
    let audits: Vec<String> = s
        .actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Audit(line) => Some(line),
            _ => None,
        })
        .collect();
    assert_eq!(audits, ["lost", "live"]);
}
