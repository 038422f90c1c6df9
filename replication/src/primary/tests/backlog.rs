//! What the core tells the back-pressure bounds (DESIGN.md §6): the lag is the age of the
//! oldest unverified epoch, whatever the number of epochs, and a repair is progress.

use std::time::Duration;

use super::{ack, diverged, epoch_end, primary};
use crate::checkpoint::VcpuRequest;
use crate::primary::backpressure::{Backlog, Bounds, Throttle, Verdict};
use crate::primary::FromVcpu;

#[test]
fn the_lag_is_the_age_of_the_oldest_unverified_epoch_not_their_number() {
    let mut p = primary(true);
    p.vcpu(epoch_end(1, 10));
    p.later(100);
    for e in 2..=5000 {
        p.vcpu(epoch_end(e, 10 * e));
    }
    p.later(200);
    let b = p.core.backlog(p.now);
    assert_eq!(
        (b.lag, b.lag_epochs, b.making_checkpoint),
        (Duration::from_millis(300), 5000, false)
    );
    // Verified through epoch 1: the oldest left was shipped 200 ms ago.
    p.standby(ack(1));
    assert_eq!(p.core.backlog(p.now).lag, Duration::from_millis(200));
    p.standby(ack(5000));
    assert_eq!(p.core.backlog(p.now), Backlog::default());
}

#[test]
fn a_repair_is_progress_its_making_is_never_held_and_its_install_verifies_what_it_covers() {
    let mut p = primary(true);
    let mut throttle = Throttle::new(Bounds {
        lag: Duration::from_millis(500),
        ..Bounds::default()
    });
    p.vcpu(FromVcpu::Output(b"held".to_vec()));
    for e in 1..=3 {
        p.vcpu(epoch_end(e, 10 * e));
    }
    p.standby(diverged(1, false));
    let Ok(VcpuRequest::Repair { id, .. }) = p.requests.try_recv() else {
        panic!("a repair is asked of the vCPU thread");
    };
    // The vCPU thread takes its time making the checkpoint: the lag grows past the bound,
    // yet the queue its pages travel through is never held.
    p.later(2000);
    let b = p.core.backlog(p.now);
    assert!(
        b.making_checkpoint && b.lag == Duration::from_secs(2),
        "{b:?}"
    );
    assert_eq!(throttle.check(&b, p.now), Verdict::Run);
    p.checkpoint(id, 4, 40, false);
    // Its end is out: the guest waits for the standby to install it.
    let b = p.core.backlog(p.now);
    assert!(!b.making_checkpoint && b.lag_epochs == 4, "{b:?}");
    assert_eq!(throttle.check(&b, p.now), Verdict::Slow);
    // Installed: every epoch it covers is verified, the output leaves, the guest runs.
    p.later(300);
    p.standby(ack(4));
    assert_eq!(p.released().0, b"held");
    assert_eq!(p.core.backlog(p.now), Backlog::default());
    assert_eq!(throttle.check(&p.core.backlog(p.now), p.now), Verdict::Run);
}
