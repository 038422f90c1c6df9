//! The exit loop against a scripted vCPU: injection points, inputs, kicks, disk reads.

use super::*;
use std::collections::VecDeque;

/// A vCPU that plays back constructed outcomes and records what the loop did to it.
#[derive(Default)]
struct ScriptedVcpu {
    script: VecDeque<RunOutcome>,
    /// Calls in order: "run", "inject <v>", "window <on>", "read <bytes>".
    log: Vec<String>,
    ready: bool,
    /// Every kick the loop armed before a run, in order.
    armed: Vec<Option<Kick>>,
}

impl VcpuRun for ScriptedVcpu {
    fn run(&mut self) -> Result<RunOutcome, crate::Error> {
        self.log.push("run".into());
        Ok(self
            .script
            .pop_front()
            .unwrap_or(RunOutcome::Exit(Exit::IoOut {
                port: 0xf4,
                size: 1,
                data: vec![0],
            })))
    }
    fn complete_read(&mut self, data: &[u8]) {
        self.log.push(format!("read {data:?}"));
    }
    fn ready_for_interrupt(&mut self) -> bool {
        self.ready
    }
    fn interrupts_enabled(&mut self) -> Result<bool, crate::Error> {
        Ok(true)
    }
    fn request_interrupt_window(&mut self, on: bool) {
        if on {
            self.log.push("window".into());
        }
    }
    fn inject(&mut self, vector: u8) -> Result<(), crate::Error> {
        self.log.push(format!("inject {vector:#x}"));
        Ok(())
    }
    fn complete_pending_io(&mut self) -> Result<(), crate::Error> {
        self.log.push("complete".into());
        Ok(())
    }
    fn arm_kick(&mut self, kick: Option<Kick>) {
        self.armed.push(kick);
    }
    fn rip(&mut self) -> u64 {
        0x1234
    }
}

/// Records what the hook saw; fires the timer at chosen points.
#[derive(Default)]
struct Recorder {
    exits: Vec<(ExitSeq, Exit)>,
    polls: Vec<Point>,
    injections: Vec<(Point, u8)>,
    kicks: Vec<ExitSeq>,
    clock_at: Vec<Point>,
    output: Vec<u8>,
    windows: Vec<Point>,
    /// Pause at the end of this exit.
    pause_at: Option<u64>,
    /// Forbid interrupt-window exits.
    no_windows: bool,
    /// The deadlines the loop asked to kick at, in order.
    kick_deadlines: std::cell::RefCell<Vec<u64>>,
    /// What `exit_free_bound` answers.
    exit_free: Option<Duration>,
}

impl ExitHook for Recorder {
    type Error = std::convert::Infallible;

    fn on_exit(&mut self, seq: ExitSeq, exit: &Exit) -> Result<(), Self::Error> {
        self.exits.push((seq, exit.clone()));
        Ok(())
    }
    fn on_request_window(&mut self, at: Point) -> Result<(), Self::Error> {
        self.windows.push(at);
        Ok(())
    }
    fn end_of_exit(&mut self, seq: ExitSeq) -> Result<Control, Self::Error> {
        Ok(if Some(seq.0) == self.pause_at {
            Control::Pause
        } else {
            Control::Continue
        })
    }
    fn interrupt_windows(&self) -> bool {
        !self.no_windows
    }
    fn kick_at(&self, deadline_ns: u64) -> Option<Kick> {
        self.kick_deadlines.borrow_mut().push(deadline_ns);
        None
    }
    fn exit_free_bound(&self) -> Option<Duration> {
        self.exit_free
    }
    fn on_kick(&mut self, after: ExitSeq) -> Result<(), Self::Error> {
        self.kicks.push(after);
        Ok(())
    }
    fn poll_inputs(
        &mut self,
        at: Point,
        view: &HostView,
        inputs: &mut Vec<Input>,
    ) -> Result<(), Self::Error> {
        self.polls.push(at);
        if self.clock_at.contains(&at) || view.halted {
            inputs.push(Input::Clock(view.timer_deadline_ns.unwrap_or(0)));
        }
        Ok(())
    }
    fn on_inject(&mut self, at: Point, vector: u8) -> Result<(), Self::Error> {
        self.injections.push((at, vector));
        Ok(())
    }
    fn on_output(&mut self, _seq: ExitSeq, bytes: &[u8]) -> Result<(), Self::Error> {
        self.output.extend_from_slice(bytes);
        Ok(())
    }
    fn on_net_output(&mut self, _: ExitSeq, _: &[Vec<u8>]) -> Result<(), Self::Error> {
        Ok(())
    }
}

fn out(port: u16, byte: u8) -> RunOutcome {
    RunOutcome::Exit(Exit::IoOut {
        port,
        size: 1,
        data: vec![byte],
    })
}

/// PIC remapped to 0x20 with only IRQ0 open, PIT at 100 Hz: eleven OUT exits.
fn platform_setup() -> Vec<RunOutcome> {
    let mut s = vec![];
    for (base, vec, icw3) in [(0x20u16, 0x20u8, 4u8), (0xa0, 0x28, 2)] {
        s.push(out(base, 0x11));
        s.push(out(base + 1, vec));
        s.push(out(base + 1, icw3));
        s.push(out(base + 1, 0x01));
    }
    s.push(out(0x21, 0xfe));
    s.push(out(0x43, 0x34));
    s.push(out(0x40, (11932 & 0xff) as u8));
    s.push(out(0x40, (11932 >> 8) as u8));
    s
}

fn run_script(script: Vec<RunOutcome>, hook: &mut Recorder, ready: bool) -> ScriptedVcpu {
    let mut vcpu = ScriptedVcpu {
        script: script.into(),
        ready,
        ..Default::default()
    };
    let mut machine = Machine::new(&crate::memory::create(16).unwrap(), Vec::new(), None).unwrap();
    let mut state = LoopState::default();
    let end = run(&mut vcpu, &mut machine, hook, &mut state).unwrap();
    assert_eq!(end, RunEnd::Stopped(StopRequest::Exit(0)));
    vcpu
}

#[test]
fn exit_sequence_numbers_increase_and_kicks_do_not_count() {
    let mut script = vec![out(0x80, 1), RunOutcome::Kicked, out(0x80, 2)];
    script.push(RunOutcome::Kicked);
    script.push(RunOutcome::Kicked);
    script.push(RunOutcome::Exit(Exit::IoIn {
        port: 0x80,
        size: 1,
        count: 1,
    }));
    let mut hook = Recorder::default();
    let vcpu = run_script(script, &mut hook, true);
    let seqs: Vec<u64> = hook.exits.iter().map(|(s, _)| s.0).collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4],
        "3 exits + the final debug-exit write"
    );
    assert_eq!(hook.kicks, vec![ExitSeq(1), ExitSeq(2), ExitSeq(2)]);
    assert!(vcpu.log.contains(&"read [2]".to_string()), "{:?}", vcpu.log);
}

#[test]
fn interrupts_are_injected_only_when_the_vcpu_is_stopped_at_an_exit() {
    let mut script = platform_setup();
    let setup = script.len() as u64;
    script.push(out(0x80, 0)); // timer fires here
    script.push(out(0x80, 0));
    let mut hook = Recorder {
        clock_at: vec![Point::Exit(ExitSeq(setup + 1))],
        ..Default::default()
    };
    let vcpu = run_script(script, &mut hook, true);
    assert_eq!(
        hook.injections,
        vec![(Point::Exit(ExitSeq(setup + 1)), 0x20)]
    );
    // The injection sits between two KVM_RUNs, never before the exit that carried it.
    let runs_before = vcpu
        .log
        .iter()
        .position(|l| l == "inject 0x20")
        .map(|i| vcpu.log[..i].iter().filter(|l| *l == "run").count())
        .unwrap();
    assert_eq!(runs_before as u64, setup + 1);
}

#[test]
fn a_closed_window_is_requested_and_injection_waits_for_its_exit() {
    let mut script = platform_setup();
    let setup = script.len() as u64;
    script.push(out(0x80, 0)); // timer fires, guest not ready
    script.push(RunOutcome::Exit(Exit::IrqWindowOpen));
    let mut hook = Recorder {
        clock_at: vec![Point::Exit(ExitSeq(setup + 1))],
        ..Default::default()
    };
    let mut vcpu = ScriptedVcpu {
        script: script.into(),
        ready: false,
        ..Default::default()
    };
    let mut machine = Machine::new(&crate::memory::create(16).unwrap(), Vec::new(), None).unwrap();
    let mut state = LoopState::default();
    // Run up to the window exit with the guest not ready; then make it ready.
    hook.pause_at = Some(setup + 1);
    let end = run(&mut vcpu, &mut machine, &mut hook, &mut state).unwrap();
    assert_eq!(end, RunEnd::Paused(ExitSeq(setup + 1)));
    assert!(hook.injections.is_empty());
    assert_eq!(hook.windows, vec![Point::Exit(ExitSeq(setup + 1))]);
    assert_eq!(vcpu.log.last().map(String::as_str), Some("complete"));
    assert!(vcpu.log.contains(&"window".to_string()));
    vcpu.ready = true;
    let end = run(&mut vcpu, &mut machine, &mut hook, &mut state).unwrap();
    assert_eq!(end, RunEnd::Stopped(StopRequest::Exit(0)));
    assert_eq!(
        hook.injections,
        vec![(Point::Exit(ExitSeq(setup + 2)), 0x20)]
    );
}

#[test]
fn without_interrupt_windows_injection_waits_for_the_next_natural_exit() {
    let mut script = platform_setup();
    let setup = script.len() as u64;
    script.push(out(0x80, 0)); // timer fires, guest not ready
    script.push(out(0x80, 0)); // still not ready
    let mut hook = Recorder {
        clock_at: vec![Point::Exit(ExitSeq(setup + 1))],
        no_windows: true,
        ..Default::default()
    };
    let mut vcpu = ScriptedVcpu {
        script: script.into(),
        ready: false,
        ..Default::default()
    };
    let mut machine = Machine::new(&crate::memory::create(16).unwrap(), Vec::new(), None).unwrap();
    let mut state = LoopState::default();
    // The final debug-exit write stops the run before anything becomes ready.
    let end = run(&mut vcpu, &mut machine, &mut hook, &mut state).unwrap();
    assert_eq!(end, RunEnd::Stopped(StopRequest::Exit(0)));
    assert!(hook.windows.is_empty());
    assert!(!vcpu.log.contains(&"window".to_string()));
    assert!(hook.injections.is_empty());
    // From the exit where the timer fired on, the kick the loop asks for is due at once
    // (the moment the interrupt became pending), not at the next timer deadline: a guest
    // that enables interrupts and then runs without exits gets it after the latency bound.
    let fired = machine.now_ns();
    let asked = hook.kick_deadlines.borrow().clone();
    // (Without the pending interrupt the loop asks for the periodic timer's next deadline,
    // one period later.)
    assert!(asked.len() >= 2, "{asked:?}");
    assert_eq!(&asked[asked.len() - 2..], &[fired, fired], "{asked:?}");
    // Once the guest is ready at a natural exit, the interrupt goes in there.
    vcpu.ready = true;
    vcpu.script = vec![out(0x80, 0)].into();
    run(&mut vcpu, &mut machine, &mut hook, &mut state).unwrap();
    assert_eq!(
        hook.injections,
        vec![(Point::Exit(ExitSeq(setup + 4)), 0x20)]
    );
}

#[test]
fn halt_waits_for_inputs_at_the_halt_exit() {
    let mut script = platform_setup();
    let setup = script.len() as u64;
    script.push(RunOutcome::Exit(Exit::Hlt));
    let mut hook = Recorder::default();
    run_script(script, &mut hook, true);
    let hlt = Point::Exit(ExitSeq(setup + 1));
    // The hook was polled at the HLT exit until the timer input woke the guest.
    assert!(hook.polls.iter().filter(|p| **p == hlt).count() >= 2);
    assert_eq!(hook.injections, vec![(hlt, 0x20)]);
}

#[test]
fn serial_output_reaches_the_hook_and_triple_fault_is_an_error() {
    let mut hook = Recorder::default();
    run_script(vec![out(0x3f8, b'h'), out(0x3f8, b'i')], &mut hook, true);
    assert_eq!(hook.output, b"hi");

    let mut vcpu = ScriptedVcpu {
        script: vec![out(0x80, 0), RunOutcome::Exit(Exit::Shutdown)].into(),
        ..Default::default()
    };
    let mut machine = Machine::new(&crate::memory::create(16).unwrap(), Vec::new(), None).unwrap();
    let err = run(
        &mut vcpu,
        &mut machine,
        &mut Recorder::default(),
        &mut LoopState::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest triple fault at rip=0x1234 (exit sequence number 2)"
    );
}

#[test]
fn an_exit_free_bound_arms_a_kick_where_no_timer_kick_is_armed() {
    // This hook arms no timer kick (kick_at answers None): without a bound nothing is armed.
    let run_with = |exit_free| {
        let mut hook = Recorder {
            exit_free,
            ..Default::default()
        };
        let mut vcpu = ScriptedVcpu {
            script: vec![out(0x80, 0), RunOutcome::Kicked, out(0x80, 0)].into(),
            ..Default::default()
        };
        let mut machine =
            Machine::new(&crate::memory::create(16).unwrap(), Vec::new(), None).unwrap();
        run(
            &mut vcpu,
            &mut machine,
            &mut hook,
            &mut LoopState::default(),
        )
        .unwrap();
        (vcpu.armed, hook.kicks)
    };
    let (armed, kicks) = run_with(None);
    assert!(armed.iter().all(Option::is_none), "{armed:?}");
    assert_eq!(kicks, vec![ExitSeq(1)]);
    // With a bound (a replayer's): every entry is armed with it, counted from the entry.
    let bound = Duration::from_secs(7);
    let (armed, kicks) = run_with(Some(bound));
    assert_eq!(armed.len(), 4, "{armed:?}");
    assert!(
        armed
            .iter()
            .all(|k| k.is_some_and(|k| k.after_guest_time == bound)),
        "{armed:?}"
    );
    assert_eq!(kicks, vec![ExitSeq(1)]);
}
