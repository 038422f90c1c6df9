//! Joining standbys (pre-copy, resume) and switchovers.

use ftvm_proto::channel::{message::Body, CheckpointEnd, Message, Ready};

use super::{ack, diverged, epoch_end, primary, HB};
use crate::checkpoint::VcpuRequest;
use crate::primary::core::Action;
use crate::primary::FromVcpu;
use crate::status::Request;

#[test]
fn a_primary_started_alone_releases_at_once_and_accepts_a_standby() {
    let mut p = primary(false);
    p.vcpu(FromVcpu::Output(b"hi".to_vec()));
    assert_eq!(p.released(), (b"hi".to_vec(), vec!["release"]));
    assert!(p.status().contains("state=unprotected: started alone"));
    assert_eq!(p.core.accepts_standby(), Ok(()));
}

#[test]
fn a_joining_standby_is_synced_by_pre_copy_then_a_stop_and_copy() {
    let mut p = primary(false);
    p.core
        .attach("standby:2".into(), HB, &Ready::default(), p.now);
    assert!(p.core.attached() && !p.core.protecting());
    assert!(p.tracking.protected());
    assert_eq!(
        p.core.accepts_standby(),
        Err("a standby is already attached")
    );
    // While it syncs the standby has no copy of the guest: the log is not shipped to it and
    // output leaves unprotected, as before it joined.
    p.vcpu(epoch_end(1, 10));
    p.vcpu(FromVcpu::Output(b"o".to_vec()));
    assert_eq!(p.released(), (b"o".to_vec(), vec!["release"]));
    assert!(p.status().contains("state=syncing: round 1"));

    // Pre-copy: a zeroed guest has nothing to send in round 1; then the stop-and-copy.
    let mut steps = 0;
    while p.core.precopy_pending() {
        p.core.precopy_step(p.now);
        steps += 1;
        assert!(steps < 100, "the pre-copy must end");
    }
    let Ok(VcpuRequest::StopAndCopy { id }) = p.requests.try_recv() else {
        panic!("the stop-and-copy is asked of the vCPU thread");
    };
    p.checkpoint(id, 2, 20, true);
    let (_, kinds) = p.released();
    assert_eq!(kinds, vec!["pages", "held", "checkpoint-end"]);
    assert!(p.core.protecting(), "the standby follows the log from here");
    p.vcpu(FromVcpu::Output(b"p".to_vec()));
    assert_eq!(p.released(), (vec![], vec![]));
    p.standby(ack(2));
    assert_eq!(p.core.report().syncs, 1);
    assert!(p.status().contains("state=lockstep"));
}

#[test]
fn a_sync_cut_by_a_lost_connection_is_kept_for_a_while_then_abandoned() {
    let mut p = primary(false);
    p.core
        .attach("standby:2".into(), HB, &Ready::default(), p.now);
    p.core.lose("cut".into(), p.now);
    p.actions();
    // The standby reconnects in time and names the sync: it resumes (no new id).
    let resumed = Ready {
        resume_checkpoint: 1,
        chunks_applied: 0,
    };
    p.core.attach("standby:2".into(), HB, &resumed, p.now);
    assert!(p.status().contains("state=syncing"));
    p.core.lose("cut again".into(), p.now);
    let t = p.later(31_000);
    p.core.tick(t);
    // Too late: a new sync starts.
    p.core.attach("standby:2".into(), HB, &resumed, p.now);
    while p.core.precopy_pending() {
        p.core.precopy_step(p.now);
    }
    assert!(matches!(
        p.requests.try_recv(),
        Ok(VcpuRequest::StopAndCopy { id: 2 })
    ));
}

#[test]
fn a_switchover_hands_over_once_everything_is_verified_and_released() {
    let mut p = primary(true);
    let answer = p.core.control_request(Request::Switchover, p.now, 0);
    assert!(answer.starts_with("switchover started"), "{answer}");
    assert_eq!(p.requests.try_recv(), Ok(VcpuRequest::Switchover));
    assert!(p
        .core
        .control_request(Request::Switchover, p.now, 0)
        .contains("already under way"));

    p.vcpu(FromVcpu::Output(b"last".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.vcpu(FromVcpu::Stopped {
        epoch: 1,
        exit_seq: 10,
    });
    p.actions();
    p.core.try_handover(p.now);
    assert_eq!(
        p.released(),
        (vec![], vec![]),
        "epoch 1 is not verified yet"
    );
    p.standby(ack(1));
    p.actions();
    p.core.try_handover(p.now);
    let actions = p.actions();
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Send(Message {
                body: Some(Body::Switchover(_))
            }),
            Action::HandOver {
                epoch: 1,
                exit_seq: 10,
                output_seq: 4
            }
        ]
    ));
    p.core.handed_over();
    assert!(p.core.done());
    assert!(!p.tracking.protected());
}

#[test]
fn a_divergence_during_a_switchover_lets_the_vcpu_run_and_asks_again_after_the_repair() {
    let mut p = primary(true);
    p.core.start_switchover(p.now).expect("switchover");
    p.requests.try_recv().expect("asked");
    p.vcpu(epoch_end(1, 10));
    p.vcpu(FromVcpu::Stopped {
        epoch: 1,
        exit_seq: 10,
    });
    p.actions();
    p.standby(diverged(1, false));
    let kinds = p.released().1;
    assert_eq!(kinds, vec!["refuse-handover"]);
    let id = p.requests.try_recv().expect("repair").id();
    p.vcpu(FromVcpu::CheckpointEnd(CheckpointEnd {
        checkpoint: id,
        epoch: 2,
        exit_seq: 12,
        ..Default::default()
    }));
    p.standby(ack(2));
    assert_eq!(
        p.requests.try_recv(),
        Ok(VcpuRequest::Switchover),
        "asked again once the repair is installed"
    );
}

#[test]
fn a_switchover_needs_a_protected_guest() {
    let mut p = primary(false);
    assert!(p
        .core
        .start_switchover(p.now)
        .is_err_and(|e| e.contains("not protected")));
}

#[test]
fn a_standby_lost_while_the_vcpu_stops_for_a_switchover_lets_it_run_on() {
    let mut p = primary(true);
    p.core.start_switchover(p.now).expect("switchover");
    p.core.lose("gone".into(), p.now);
    p.actions();
    p.vcpu(FromVcpu::Stopped {
        epoch: 1,
        exit_seq: 10,
    });
    assert_eq!(p.released().1, vec!["refuse-handover"]);
}
