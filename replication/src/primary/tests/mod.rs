//! The primary's protocol rules, each driven through [`PrimaryCore`] with constructed events:
//! no socket, no thread, no clock. Joining standbys and switchovers are in [`sessions`].

mod backlog;
mod sessions;
mod split_brain;
mod wakeup;

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use ftvm_proto::channel::{
    message::Body, Ack, CheckpointEnd, Diverged, Message, PageChunk, PageHash, Start,
};
use ftvm_proto::log::{record::Kind, EpochEnd, Record, RecordBatch, RunEnd};

use super::core::{Action, CoreConfig, PrimaryCore};
use super::FromVcpu;
use crate::checkpoint::{DirtyTracking, VcpuControl, VcpuRequest};
use crate::link::{ChannelError, Heartbeat};
use crate::position::Position;

const HB: Heartbeat = Heartbeat {
    interval: Duration::from_millis(50),
    timeout: Duration::from_millis(150),
};

struct Pair {
    core: PrimaryCore,
    requests: Receiver<VcpuRequest>,
    tracking: DirtyTracking,
    now: Instant,
}

/// A primary over a 16 MiB guest, with a standby attached (or not).
fn primary(standby: bool) -> Pair {
    let (vcpu, requests, _doorbell) = VcpuControl::new();
    let tracking = DirtyTracking::default();
    let memory = ftvm_vmm::memory::create(16).expect("guest memory");
    let now = Instant::now();
    let core = PrimaryCore::new(
        CoreConfig {
            heartbeat: HB,
            audit: false,
            memory,
            start: Start::default(),
            after: Position::default(),
            vcpu,
            tracking: tracking.clone(),
            arbiter: None,
        },
        if standby {
            Ok("standby:1".into())
        } else {
            Err("started alone".into())
        },
        now,
    );
    Pair {
        core,
        requests,
        tracking,
        now,
    }
}

fn batch(records: Vec<Kind>, complete_through: u64) -> FromVcpu {
    FromVcpu::Batch(RecordBatch {
        complete_through,
        records: records
            .into_iter()
            .map(|kind| Record {
                exit_seq: complete_through,
                at_kick: false,
                kind: Some(kind),
            })
            .collect(),
        packed: Default::default(),
    })
}

fn epoch_end(epoch: u64, exit_seq: u64) -> FromVcpu {
    batch(
        vec![Kind::EpochEnd(EpochEnd {
            epoch,
            exit_seq,
            ..Default::default()
        })],
        exit_seq,
    )
}

fn ack(verified: u64) -> Message {
    Message {
        body: Some(Body::Ack(Ack {
            received_epoch: verified,
            verified_epoch: verified,
            exit_seq: 0,
        })),
    }
}

fn diverged(epoch: u64, checkpoint_required: bool) -> Message {
    Message {
        body: Some(Body::Diverged(Diverged {
            epoch,
            exit_seq: 10 * epoch,
            reason: "digest mismatch".into(),
            checkpoint_required,
            dirty: vec![PageHash {
                pfn: 3,
                hash: vec![7; 32],
            }],
            checkpoint_failed: false,
            dirty_blocks: Vec::new(),
        })),
    }
}

impl Pair {
    fn later(&mut self, ms: u64) -> Instant {
        self.now += Duration::from_millis(ms);
        self.now
    }

    fn vcpu(&mut self, msg: FromVcpu) {
        self.core.on_vcpu(msg, self.now);
    }

    /// The vCPU thread makes checkpoint `id`: one chunk of stopped pages, then its end.
    fn checkpoint(&mut self, id: u64, epoch: u64, exit_seq: u64, sync: bool) {
        self.vcpu(FromVcpu::Pages(PageChunk {
            checkpoint: id,
            stopped: true,
            ..Default::default()
        }));
        self.vcpu(FromVcpu::CheckpointEnd(CheckpointEnd {
            checkpoint: id,
            epoch,
            exit_seq,
            sync,
            ..Default::default()
        }));
    }

    fn standby(&mut self, msg: Message) {
        self.core.heard(self.now);
        self.core.on_message(msg, self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    /// The bytes released by the pending actions (and the actions' kinds, in order).
    fn released(&mut self) -> (Vec<u8>, Vec<&'static str>) {
        let mut bytes = Vec::new();
        let mut kinds = Vec::new();
        for a in self.actions() {
            kinds.push(match a {
                Action::Release { bytes: b, .. } => {
                    bytes.extend(b);
                    "release"
                }
                Action::Send(m) => match m.body {
                    Some(Body::Released(_)) => "released",
                    Some(Body::Batch(_)) => "batch",
                    Some(Body::Heartbeat(_)) => "heartbeat",
                    Some(Body::HeldOutput(_)) => "held",
                    Some(Body::CheckpointEnd(_)) => "checkpoint-end",
                    Some(Body::Pages(_)) => "pages",
                    Some(Body::Switchover(_)) => "switchover",
                    _ => "send",
                },
                Action::Abandon(_) => "abandon",
                Action::HandOver { .. } => "hand-over",
                Action::RefuseHandover(_) => "refuse-handover",
                Action::Audit(_) => "audit",
                Action::Claim { .. } => "claim",
                Action::Fence(_) => "fence",
            });
        }
        (bytes, kinds)
    }

    fn status(&self) -> String {
        self.core.status(self.now, 0).to_string()
    }
}

#[test]
fn output_is_released_only_through_the_verified_epoch() {
    let mut p = primary(true);
    p.vcpu(FromVcpu::Output(b"one ".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.vcpu(FromVcpu::Output(b"two ".to_vec()));
    p.vcpu(epoch_end(2, 20));
    p.vcpu(FromVcpu::Output(b"three".to_vec()));
    assert_eq!(p.released(), (vec![], vec!["batch", "batch"]));
    assert!(p.status().contains("held_output_bytes=13"));

    p.standby(ack(1));
    assert_eq!(
        p.released(),
        (b"one ".to_vec(), vec!["release", "released"])
    );
    p.standby(ack(2));
    assert_eq!(
        p.released(),
        (b"two ".to_vec(), vec!["release", "released"])
    );
    // Epoch 3 is open: its output waits.
    assert!(p.status().contains("released_output_seq=8"));
    assert!(p.status().contains("held_output_bytes=5"));
}

#[test]
fn received_alone_releases_nothing_and_is_audited() {
    let mut p = primary(true);
    p.core.audit = true;
    p.vcpu(FromVcpu::Output(b"a".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.actions();
    // Received(1): the log is on the standby's host, not verified.
    p.standby(Message {
        body: Some(Body::Ack(Ack {
            received_epoch: 1,
            verified_epoch: 0,
            exit_seq: 0,
        })),
    });
    let actions = p.actions();
    assert!(
        matches!(actions.as_slice(), [Action::Audit(line)] if line == "received epoch=1"),
        "{actions:?}"
    );
    assert!(p.status().contains("held_output_bytes=1"));
    // Verified(1) releases it.
    p.standby(ack(1));
    assert_eq!(p.released().0, b"a");
}

#[test]
fn a_stale_acknowledgement_releases_nothing_new() {
    let mut p = primary(true);
    p.vcpu(FromVcpu::Output(b"a".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.vcpu(FromVcpu::Output(b"b".to_vec()));
    p.vcpu(epoch_end(2, 20));
    p.actions();
    p.standby(ack(1));
    assert_eq!(p.released().0, b"a");
    p.standby(ack(0));
    p.standby(ack(1));
    assert_eq!(p.released(), (vec![], vec![]));
    assert!(p.core.attached(), "a stale ack is harmless");
}

#[test]
fn an_acknowledgement_of_an_epoch_never_shipped_drops_the_standby_not_the_guest() {
    let mut p = primary(true);
    p.vcpu(FromVcpu::Output(b"held".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.actions();
    p.standby(ack(u64::MAX));
    assert_eq!(p.released(), (vec![], vec!["abandon"]));
    // The standby is dropped, and once it is told (the driver says when its host holds
    // `Abandon`) the output it held goes out unprotected; the guest runs on (nothing is
    // asked of the vCPU thread).
    p.core.standby_told();
    let (bytes, kinds) = p.released();
    assert_eq!(kinds, vec!["release"]);
    assert_eq!(bytes, b"held");
    assert!(!p.core.attached());
    assert!(p
        .status()
        .contains("it acknowledged epoch 18446744073709551615"));
    assert!(p.requests.try_recv().is_err());
}

#[test]
fn output_is_held_across_a_divergence_until_the_repair_is_installed() {
    let mut p = primary(true);
    p.vcpu(FromVcpu::Output(b"before ".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.actions();
    p.standby(diverged(1, false));
    let request = p
        .requests
        .try_recv()
        .expect("a repair is asked of the vCPU thread");
    let VcpuRequest::Repair {
        id,
        from_epoch,
        standby_dirty,
        ..
    } = request
    else {
        panic!("not a repair: {request:?}");
    };
    assert_eq!((from_epoch, standby_dirty), (1, vec![(3, [7; 32])]));
    assert!(p
        .status()
        .contains("state=repairing: epoch 1 diverged at exit 10"));

    // The vCPU thread stops at its next exit: more output came meanwhile.
    p.vcpu(FromVcpu::Output(b"during".to_vec()));
    p.checkpoint(id, 2, 15, false);
    let actions = p.actions();
    let held = actions.iter().find_map(|a| match a {
        Action::Send(Message {
            body: Some(Body::HeldOutput(h)),
        }) => Some(h.clone()),
        _ => None,
    });
    let held = held.expect("the held output travels with the checkpoint");
    assert_eq!(
        (held.checkpoint, held.released_seq, held.data.as_slice()),
        (id, 0, &b"before during"[..])
    );
    assert!(matches!(
        actions.last(),
        Some(Action::Send(Message {
            body: Some(Body::CheckpointEnd(_))
        }))
    ));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Release { .. })),
        "nothing leaves before the standby installed the checkpoint"
    );
    // Installed: the standby verifies the checkpoint's epoch.
    p.standby(ack(2));
    assert_eq!(p.released().0, b"before during");
    assert!(p.status().contains("repairs=1"));
    assert!(p.status().contains("state=lockstep"));
}

#[test]
fn a_checkpoint_required_epoch_asks_for_a_repair() {
    let mut p = primary(true);
    p.vcpu(epoch_end(1, 10));
    p.standby(diverged(1, true));
    assert!(matches!(
        p.requests.try_recv(),
        Ok(VcpuRequest::Repair { from_epoch: 1, .. })
    ));
    assert!(p.status().contains("epoch 1 needs a checkpoint at exit 10"));
}

#[test]
fn a_second_divergence_while_a_repair_is_on_its_way_drops_the_standby() {
    let mut p = primary(true);
    p.vcpu(epoch_end(1, 10));
    p.standby(diverged(1, false));
    p.actions();
    p.standby(diverged(1, false));
    assert!(!p.core.attached());
    assert!(p
        .status()
        .contains("a divergence while a checkpoint is on its way"));
}

#[test]
fn a_repair_request_for_a_page_outside_guest_memory_drops_the_standby() {
    let mut p = primary(true);
    p.vcpu(epoch_end(1, 10));
    let mut d = diverged(1, false);
    if let Some(Body::Diverged(d)) = &mut d.body {
        d.dirty[0].pfn = 1 << 40;
    }
    p.standby(d);
    assert!(p.requests.try_recv().is_err(), "no checkpoint is made");
    assert!(!p.core.attached());
    assert!(p.status().contains("which is not guest RAM"));
}

#[test]
fn pages_of_an_abandoned_checkpoint_go_nowhere() {
    let mut p = primary(true);
    p.vcpu(epoch_end(1, 10));
    p.standby(diverged(1, false));
    let id = p.requests.try_recv().expect("repair").id();
    p.core.link_failed(
        ChannelError::Closed {
            peer: "standby:1".into(),
        },
        p.now,
    );
    p.actions();
    p.vcpu(FromVcpu::Pages(PageChunk {
        checkpoint: id,
        ..Default::default()
    }));
    p.vcpu(FromVcpu::CheckpointEnd(CheckpointEnd {
        checkpoint: id,
        epoch: 2,
        ..Default::default()
    }));
    assert_eq!(p.released(), (vec![], vec![]));
}

#[test]
fn a_silent_standby_is_lost_after_the_heartbeat_timeout_and_output_flows_again() {
    let mut p = primary(true);
    p.vcpu(FromVcpu::Output(b"x".to_vec()));
    p.vcpu(epoch_end(1, 10));
    p.actions();
    let t = p.later(50);
    p.core.tick(t);
    assert_eq!(p.released().1, vec!["heartbeat"]);
    let t = p.later(100);
    p.core.tick(t);
    assert!(p.core.attached(), "150 ms of silence is within the timeout");
    assert_eq!(p.released().1, vec!["heartbeat"]);
    let t = p.later(1);
    p.core.tick(t);
    assert_eq!(p.released(), (vec![], vec!["abandon"]));
    p.core.standby_told();
    assert_eq!(p.released(), (b"x".to_vec(), vec!["release"]));
    assert!(!p.tracking.protected());
    assert!(p.status().contains("silent for"));
    // Unprotected: output leaves at once.
    p.vcpu(FromVcpu::Output(b"y".to_vec()));
    assert_eq!(p.released(), (b"y".to_vec(), vec!["release"]));
}

#[test]
fn hearing_the_standby_keeps_it_alive() {
    let mut p = primary(true);
    for _ in 0..10 {
        p.later(100);
        p.standby(Message {
            body: Some(Body::Heartbeat(Default::default())),
        });
        p.core.tick(p.now);
    }
    assert!(p.core.attached());
}

#[test]
fn a_closed_connection_loses_the_standby_unless_the_run_is_over_and_verified() {
    let closed = || ChannelError::Closed {
        peer: "standby:1".into(),
    };
    let mut p = primary(true);
    p.vcpu(epoch_end(1, 10));
    p.core.link_failed(closed(), p.now);
    assert!(!p.core.attached());
    assert!(p
        .status()
        .contains("standby lost: standby:1 closed the connection"));

    // A standby that verified the last epoch of a finished run and closed is done.
    let mut p = primary(true);
    p.vcpu(batch(
        vec![
            Kind::RunEnd(RunEnd::default()),
            Kind::EpochEnd(EpochEnd {
                epoch: 1,
                exit_seq: 10,
                ..Default::default()
            }),
        ],
        10,
    ));
    p.standby(ack(1));
    p.vcpu(FromVcpu::End);
    assert!(p.core.run_end_shipped() && p.core.done());
    p.core.link_failed(closed(), p.now);
    assert!(p.core.attached());
    assert!(p.core.finish().protected_to_end);
}

#[test]
fn a_message_only_a_primary_sends_drops_the_standby() {
    let mut p = primary(true);
    p.standby(Message {
        body: Some(Body::Start(Start::default())),
    });
    assert!(!p.core.attached());
    assert!(p
        .status()
        .contains("expected Ack, Diverged or Heartbeat, got Start"));
}
