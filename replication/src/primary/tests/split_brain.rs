//! The primary's rules against two live primaries (DESIGN.md §5): a standby it drops is
//! told so (`Abandon`) before the connection closes.

use super::*;
use ftvm_proto::channel::Ready;

#[test]
fn a_dropped_standby_is_abandoned_first_whatever_the_reason() {
    // Silence.
    let mut p = primary(true);
    let t = p.later(151);
    p.core.tick(t);
    let actions = p.actions();
    let Some(Action::Abandon(why)) = actions.first() else {
        panic!("Abandon comes first: {actions:?}");
    };
    assert!(why.contains("standby:1 silent for"), "{why}");
    // A protocol violation.
    let mut p = primary(true);
    p.standby(ack(3));
    let actions = p.actions();
    let Some(Action::Abandon(why)) = actions.first() else {
        panic!("Abandon comes first: {actions:?}");
    };
    assert!(why.contains("broke the pair protocol"), "{why}");
    // The vCPU thread is gone while a checkpoint is needed.
    let mut p = primary(true);
    p.requests = crossbeam_channel::unbounded().1;
    p.vcpu(epoch_end(1, 10));
    p.actions();
    p.standby(diverged(1, false));
    let actions = p.actions();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Abandon(why) if why.contains("vCPU thread is gone"))),
        "{actions:?}"
    );
    // Once: a later failure of the same connection says nothing more.
    p.core.link_failed(
        ChannelError::Closed {
            peer: "standby:1".into(),
        },
        p.now,
    );
    assert!(p.actions().is_empty());
}

/// A primary without a witness that holds output `a` of epoch 1 and just dropped its
/// standby for silence: `Abandon` went out, nothing was released.
fn silent_standby_lost_holding_a() -> Pair {
    let mut p = primary(true);
    p.vcpu(FromVcpu::Output(b"a".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.actions();
    let t = p.later(151);
    p.core.tick(t);
    assert_eq!(p.released(), (vec![], vec!["abandon"]));
    p
}

/// Without a witness, a primary that dropped its standby holds every output, old and new,
/// until that standby is told (its host holds `Abandon`): were this process to die before,
/// the standby would go live, and must not find output it never verified released. The run
/// cannot end meanwhile.
#[test]
fn without_a_witness_output_waits_until_the_lost_standby_is_told() {
    let mut p = silent_standby_lost_holding_a();
    p.vcpu(FromVcpu::Output(b"b".to_vec()));
    p.vcpu(FromVcpu::End);
    assert_eq!(p.released(), (vec![], vec![]));
    assert!(!p.core.done());
    let status = p.status();
    assert!(
        status.contains(
            "state=unprotected: standby lost: standby:1 silent for 151ms (heartbeat timeout 150ms); \
         holding all output until the standby is told"
        ),
        "{status}"
    );
    p.core.standby_told();
    assert_eq!(p.released(), (b"ab".to_vec(), vec!["release", "release"]));
    assert!(p.core.done());
    // Once: a second word of the same standby changes nothing.
    p.core.standby_told();
    assert!(p.actions().is_empty());
}

/// A standby that joins meanwhile does not wait for the lost one to be told: what was held
/// goes out as it attaches (it syncs unprotected anyway).
#[test]
fn a_standby_that_joins_while_the_lost_one_is_told_ends_the_hold() {
    let mut p = silent_standby_lost_holding_a();
    assert_eq!(p.core.accepts_standby(), Ok(()));
    p.core
        .attach("standby:2".into(), HB, &Ready::default(), p.now);
    assert_eq!(p.released().0, b"a".to_vec());
}

/// A standby whose host never takes `Abandon` (frozen behind a full socket buffer) holds
/// the guest's output for at most the heartbeat timeout.
#[test]
fn without_a_witness_output_waits_for_the_telling_at_most_a_heartbeat_timeout() {
    let mut p = silent_standby_lost_holding_a();
    assert_eq!(
        p.core.poll_timeout(p.now),
        Some(Duration::from_millis(150)),
        "the loop wakes for the deadline"
    );
    let t = p.later(149);
    p.core.tick(t);
    assert_eq!(p.released(), (vec![], vec![]));
    let t = p.later(1);
    p.core.tick(t);
    assert_eq!(p.released(), (b"a".to_vec(), vec!["release"]));
    p.vcpu(FromVcpu::Output(b"b".to_vec()));
    assert_eq!(p.released(), (b"b".to_vec(), vec!["release"]));
}

use crate::arbiter::Arbiter;
use crate::witness::{ClaimOutcome, Verdict};

fn with_witness() -> Pair {
    let mut p = primary(true);
    p.core.arbiter = Some(Arbiter::new("vm".into(), 0));
    p
}

fn claims(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Claim { expected_term, .. } => Some(*expected_term),
            _ => None,
        })
        .collect()
}

#[test]
fn with_a_witness_a_primary_that_lost_its_standby_holds_output_until_it_wins_the_term() {
    let mut p = with_witness();
    p.vcpu(FromVcpu::Output(b"a".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.actions();
    let t = p.later(151);
    p.core.tick(t);
    let actions = p.actions();
    assert!(
        matches!(actions.first(), Some(Action::Abandon(_))),
        "{actions:?}"
    );
    assert_eq!(claims(&actions), vec![0]);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Release { .. })),
        "nothing leaves while the term is undecided: {actions:?}"
    );
    // The guest runs on; its output is held too, and the run cannot end meanwhile.
    p.vcpu(FromVcpu::Output(b"b".to_vec()));
    p.vcpu(FromVcpu::End);
    assert_eq!(p.released(), (Vec::new(), Vec::new()));
    assert!(!p.core.done());
    assert!(p
        .status()
        .contains("state=arbitrating: standby lost: standby:1 silent for"));
    // The witness cannot be reached: wait, ask again later, never guess.
    p.core.claim_result(
        ClaimOutcome::Unreachable("connection refused".into()),
        p.now,
    );
    assert!(p.actions().is_empty());
    assert!(p
        .status()
        .contains("cannot be reached (connection refused)"));
    let t = p.later(100);
    p.core.tick(t);
    assert!(claims(&p.actions()).is_empty(), "not yet");
    let t = p.later(450);
    p.core.tick(t);
    assert_eq!(claims(&p.actions()), vec![0]);
    // Won: everything held leaves, and the guest runs on unprotected.
    p.core
        .claim_result(ClaimOutcome::Decided(Verdict::Granted { term: 1 }), p.now);
    assert_eq!(p.released().0, b"ab".to_vec());
    assert_eq!(p.core.start_message().term, 1);
    assert!(p.core.done());
}

#[test]
fn with_a_witness_a_primary_whose_standby_won_the_term_fences_itself() {
    let mut p = with_witness();
    p.vcpu(FromVcpu::Output(b"held".to_vec()));
    p.core.link_failed(
        ChannelError::Closed {
            peer: "standby:1".into(),
        },
        p.now,
    );
    assert_eq!(claims(&p.actions()), vec![0]);
    p.core.claim_result(
        ClaimOutcome::Decided(Verdict::Refused {
            term: 1,
            holder: "ftvm on b pid 7".into(),
        }),
        p.now,
    );
    let actions = p.actions();
    let [Action::Fence(why)] = actions.as_slice() else {
        panic!("fence, release nothing: {actions:?}");
    };
    assert!(
        why.contains("the witness gave term 1 to ftvm on b pid 7")
            && why.contains("releasing none of the 4 output bytes"),
        "{why}"
    );
}

#[test]
fn with_a_witness_a_standby_lost_during_its_sync_needs_no_claim() {
    let mut p = with_witness();
    p.core.link_failed(
        ChannelError::Closed {
            peer: "standby:1".into(),
        },
        p.now,
    );
    p.actions();
    // Unprotected now (the term won or not needed); a joining standby syncs.
    p.core.arbiter = Some(Arbiter::new("vm".into(), 1));
    p.core
        .attach("standby:2".into(), HB, &Ready::default(), p.now);
    assert!(!p.core.protecting());
    p.core.link_failed(
        ChannelError::Closed {
            peer: "standby:2".into(),
        },
        p.now,
    );
    assert!(claims(&p.actions()).is_empty());
    assert!(!p.core.arbitrating());
    p.vcpu(FromVcpu::Output(b"free".to_vec()));
    assert_eq!(p.released().0, b"free".to_vec());
}
