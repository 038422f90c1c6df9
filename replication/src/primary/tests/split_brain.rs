//! The primary's rules against two live primaries (DESIGN.md §5): a standby it drops is
//! told so (`Abandon`) before the connection closes.

use super::*;

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
