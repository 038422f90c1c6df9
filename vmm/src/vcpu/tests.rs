//! Kicks against a real vCPU on /dev/kvm.

use super::*;
use crate::exit::{Control, ExitHook, ExitSeq, HostView, Point};
use crate::{Input, Vm, VmConfig};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

/// Arms a kick whose deadline has long passed, to fire after `after` of CPU time without
/// an exit; spends `busy` of CPU time at the end of every exit (as an epoch digest does);
/// counts kicks; pauses after `exits` exits. The virtual clock never moves.
struct BusyHook {
    at: Instant,
    after: Duration,
    busy: Duration,
    exits: u64,
    kicks: u64,
}

impl ExitHook for BusyHook {
    type Error = Infallible;

    fn end_of_exit(&mut self, seq: ExitSeq) -> Result<Control, Infallible> {
        let start = thread_cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
        while thread_cpu_time(libc::CLOCK_THREAD_CPUTIME_ID) - start < self.busy {}
        Ok(if seq.0 >= self.exits {
            Control::Pause
        } else {
            Control::Continue
        })
    }
    fn on_kick(&mut self, _after: ExitSeq) -> Result<(), Infallible> {
        self.kicks += 1;
        Ok(())
    }
    fn poll_inputs(
        &mut self,
        _: Point,
        _: &HostView,
        _: &mut Vec<Input>,
    ) -> Result<(), Infallible> {
        Ok(())
    }
    fn on_output(&mut self, _seq: ExitSeq, _bytes: &[u8]) -> Result<(), Infallible> {
        Ok(())
    }
    fn on_net_output(&mut self, _: ExitSeq, _: &[Vec<u8>]) -> Result<(), Infallible> {
        Ok(())
    }
    fn kick_at(&self, _deadline_ns: u64) -> Option<Kick> {
        Some(Kick {
            at: self.at,
            after_guest_time: self.after,
        })
    }
}

/// For the spin guest, which makes no exit once its timer is set: arms a kick whose deadline
/// passed when the hook was made, to fire after `after` of CPU time without an exit; counts
/// kicks (shared, so another thread can watch) and ends the run at the `stop_at`th.
struct SpinKicks {
    at: Instant,
    after: Duration,
    stop_at: u64,
    kicks: Arc<AtomicU64>,
}

impl SpinKicks {
    fn new(after: Duration, stop_at: u64) -> Self {
        Self {
            at: Instant::now(),
            after,
            stop_at,
            kicks: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl ExitHook for SpinKicks {
    type Error = std::io::Error;

    fn on_kick(&mut self, _after: ExitSeq) -> Result<(), std::io::Error> {
        if self.kicks.fetch_add(1, Ordering::Relaxed) + 1 >= self.stop_at {
            return Err(std::io::Error::other("enough kicks"));
        }
        Ok(())
    }
    fn poll_inputs(
        &mut self,
        _: Point,
        _: &HostView,
        _: &mut Vec<Input>,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn on_output(&mut self, _seq: ExitSeq, _bytes: &[u8]) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn on_net_output(&mut self, _: ExitSeq, _: &[Vec<u8>]) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn kick_at(&self, _deadline_ns: u64) -> Option<Kick> {
        Some(Kick {
            at: self.at,
            after_guest_time: self.after,
        })
    }
}

fn vm(workload: &str) -> Vm {
    Vm::new(&VmConfig {
        mem_mib: 32,
        kernel: ftvm_guest::KERNEL.to_vec(),
        cmdline: format!("workload={workload}"),
        cpuid: None,
        initrd: None,
        disks: Vec::new(),
        net: None,
        rng_seed: Vec::new(),
        rtc_base_s: 0,
    })
    .unwrap()
}

/// The counter guest exits every few hundred instructions. The VMM spends 2.5 times the
/// kick's CPU-time budget on every exit: that is not guest time without an exit, so no
/// kick may land (the kicker used to count it and end the next KVM_RUN at once).
#[test]
fn time_spent_handling_exits_does_not_count_towards_a_kick() {
    let mut vm = vm("counter ticks=1000");
    let mut hook = BusyHook {
        at: Instant::now(),
        after: Duration::from_millis(2),
        busy: Duration::from_millis(5),
        exits: 60,
        kicks: 0,
    };
    assert_eq!(
        vm.run(&mut hook).unwrap(),
        crate::RunEnd::Paused(ExitSeq(60))
    );
    assert_eq!(hook.kicks, 0);
}

/// Kicks that fire the moment they are armed, over and over, at a guest that never exits
/// on its own: each lands somewhere between the arming and the guest running, and none
/// may be lost (one used to be dropped when it landed after the arming but before the
/// entry, and the guest then ran on without an exit for good: a protected Linux stuck
/// at redis-server's start). A stuck run shows as no progress for a minute.
#[test]
fn kicks_that_race_the_entry_are_never_lost() {
    let hook = SpinKicks::new(Duration::ZERO, 20_000);
    let kicks = hook.kicks.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut hook = hook;
        let result = vm("spin ms=100000").run(&mut hook).map(|_| ());
        let _ = done_tx.send(result.map_err(|e| e.to_string()));
    });
    let mut last = 0;
    loop {
        match done_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(result) => {
                let err = result.expect_err("the spin guest never stops by itself");
                assert!(err.contains("enough kicks"), "{err}");
                return;
            }
            Err(_) => {
                let now = kicks.load(Ordering::Relaxed);
                assert!(
                    now > last,
                    "a kick was lost: the guest ran a minute without an exit after {now} kicks"
                );
                last = now;
            }
        }
    }
}

/// The spin guest runs without exits once its timer is set: the kick must still come.
#[test]
fn a_guest_running_without_exits_is_kicked() {
    // Five kicks; the guest never exits on its own by then.
    let mut hook = SpinKicks::new(Duration::from_millis(1), 5);
    let err = vm("spin ms=100000").run(&mut hook).unwrap_err();
    assert!(err.to_string().contains("enough kicks"), "{err}");
    assert_eq!(hook.kicks.load(Ordering::Relaxed), 5);
}
