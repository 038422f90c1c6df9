//! The vCPU exit loop, shared by every role (DESIGN.md §1–2).
//!
//! Every KVM_RUN return caused by the guest gets the next **exit sequence number**; returns
//! caused by the VMM (a kick: EINTR, immediate_exit) never do. Every exit passes through one
//! [`ExitHook`], the only thing that differs between running live, recording (primary) and
//! replaying (secondary): it decides what each nondeterministic input is, sees every value the
//! guest reads and every interrupt injected, and receives the guest's output. Interrupts are
//! injected only while the vCPU is stopped, at an exit (or at a kick, which the hook is told
//! about), with KVM_INTERRUPT and interrupt-window requests: the userspace irqchip model.
//!
//! The loop is written against [`VcpuRun`] so it can be driven by constructed exits in unit
//! tests, as Firecracker tests its exit dispatch.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A moment in the past, for kicks that count from the entry into the guest.
static PAST: OnceLock<Instant> = OnceLock::new();

use crate::devices::virtio::block::DiskRead;
use crate::devices::StopRequest;
use crate::machine::{Input, InputError, Machine};

/// The count of guest-caused exits since the VM started: the coordinate of every logged input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExitSeq(pub u64);

impl std::fmt::Display for ExitSeq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where an input or an injection happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// At the exit with this sequence number: a deterministic point.
    Exit(ExitSeq),
    /// At a kick that interrupted guest execution after this exit: not a deterministic point.
    Kick {
        /// The last exit before the kick.
        after: ExitSeq,
    },
}

impl Point {
    /// The exit sequence number the point belongs to (for a kick: the last exit before it)
    /// and whether it is a kick.
    pub fn log_position(self) -> (u64, bool) {
        match self {
            Point::Exit(seq) => (seq.0, false),
            Point::Kick { after } => (after.0, true),
        }
    }
}

/// A guest-caused exit, owned so tests can construct one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// IN from `port`: `count` accesses of `size` bytes (count > 1 for string I/O).
    IoIn {
        /// The port.
        port: u16,
        /// Bytes per access.
        size: u8,
        /// Number of accesses.
        count: u32,
    },
    /// OUT to `port` of `data` (`size` bytes per access).
    IoOut {
        /// The port.
        port: u16,
        /// Bytes per access.
        size: u8,
        /// What the guest wrote.
        data: Vec<u8>,
    },
    /// An MMIO read of `len` bytes.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Bytes read.
        len: u8,
    },
    /// An MMIO write.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// What the guest wrote.
        data: Vec<u8>,
    },
    /// RDTSC or RDTSCP, on a host with TSC-read exits ([`crate::tsc_exits`]): `tsc` is the
    /// value KVM would give the guest; the guest gets what [`VcpuRun::complete_read`] hands
    /// back (8 bytes, little-endian).
    TscRead {
        /// KVM's value.
        tsc: u64,
    },
    /// A guest write to the TSC or TSC_ADJUST, denied by the TSC-exit filter: dropped.
    TscWrite {
        /// The MSR.
        index: u32,
        /// What the guest wrote.
        data: u64,
    },
    /// HLT.
    Hlt,
    /// The interrupt window requested by the VMM opened.
    IrqWindowOpen,
    /// Triple fault (or another shutdown condition).
    Shutdown,
    /// A debug exception (single-step, breakpoint).
    Debug,
    /// A KVM system event (guest reset / shutdown through PSCI-like paths).
    SystemEvent(u32),
    /// Anything else KVM returned; fatal.
    Unexpected(String),
}

impl Exit {
    /// Bytes a read exit returns to the guest.
    pub fn read_len(&self) -> Option<usize> {
        match self {
            Exit::IoIn { size, count, .. } => Some(usize::from(*size) * *count as usize),
            Exit::MmioRead { len, .. } => Some(usize::from(*len)),
            Exit::TscRead { .. } => Some(8),
            _ => None,
        }
    }
}

/// What one KVM_RUN returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest caused an exit.
    Exit(Exit),
    /// The VMM kicked the vCPU (EINTR / immediate_exit): not an exit.
    Kicked,
}

/// The vCPU operations the exit loop needs.
pub trait VcpuRun {
    /// Enters the guest until the next exit or kick.
    fn run(&mut self) -> Result<RunOutcome, crate::Error>;
    /// Hands the value of the pending read exit back to the guest (taken at the next run).
    fn complete_read(&mut self, data: &[u8]);
    /// Whether an interrupt can be injected now (window open and IF set).
    fn ready_for_interrupt(&mut self) -> bool;
    /// Whether the guest has interrupts enabled (RFLAGS.IF).
    fn interrupts_enabled(&mut self) -> Result<bool, crate::Error>;
    /// Asks KVM to exit as soon as an interrupt can be injected.
    fn request_interrupt_window(&mut self, on: bool);
    /// Queues an external interrupt (KVM_INTERRUPT).
    fn inject(&mut self, vector: u8) -> Result<(), crate::Error>;
    /// Lets KVM finish a pending PIO/MMIO instruction without running further guest code, so
    /// the vCPU state is complete (re-entry with immediate_exit, as Cloud Hypervisor pauses).
    fn complete_pending_io(&mut self) -> Result<(), crate::Error>;
    /// Arranges for the vCPU to be kicked out of the guest as `kick` says (None: never).
    fn arm_kick(&mut self, kick: Option<Kick>);
    /// The guest's instruction pointer, for error reports.
    fn rip(&mut self) -> u64;
}

/// When to kick the vCPU out of an exit-free stretch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kick {
    /// Not before this moment (a timer deadline).
    pub at: Instant,
    /// And only once the vCPU thread has run this much CPU time since `at` without an exit.
    /// Measured on the thread's CPU clock, so a vCPU thread that the host deschedules is not
    /// kicked for time the guest never ran.
    pub after_guest_time: Duration,
}

/// What the host side looks like to the hook when it is asked for inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostView {
    /// The vCPU is halted with nothing to inject: the hook may block until an input arrives or
    /// the timer deadline passes.
    pub halted: bool,
    /// The exit accesses a device that reads the virtual clock: deliver a fresh clock input.
    pub wants_clock: bool,
    /// The virtual clock now.
    pub now_ns: u64,
    /// Virtual time of the next timer interrupt.
    pub timer_deadline_ns: Option<u64>,
    /// Room in the serial receive FIFO.
    pub rx_capacity: usize,
    /// The network card has a receive buffer: one [`Input::NetRx`] frame may be offered.
    pub net_rx_ready: bool,
}

/// Whether the loop goes on after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep running.
    Continue,
    /// Stop at the end of this exit (an epoch boundary, a checkpoint): `run` returns
    /// [`RunEnd::Paused`] with the vCPU state complete.
    Pause,
}

/// The one place that decides what a nondeterministic input is. See the module docs.
pub trait ExitHook {
    /// What the hook reports when the run cannot go on (a log that cannot be written, a
    /// divergence): [`run`] passes it on untouched as [`RunError::Hook`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// Every guest-caused exit, numbered, before it is handled.
    fn on_exit(&mut self, _seq: ExitSeq, _exit: &Exit) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The exit `seq` is fully handled (inputs applied, output taken, interrupt injected):
    /// the hook may pause here (an epoch boundary, a checkpoint).
    fn end_of_exit(&mut self, _seq: ExitSeq) -> Result<Control, Self::Error> {
        Ok(Control::Continue)
    }

    /// The vCPU is halted after exit `seq` with nothing to inject, and the loop is about to
    /// wait for the host side (called again before each wait). The guest stays at this
    /// deterministic point until an input arrives: the hook may pause here to close an
    /// epoch or make a checkpoint; `run` then returns [`RunEnd::Paused`] and resumes the
    /// wait when called again.
    fn on_halted(&mut self, _seq: ExitSeq) -> Result<Control, Self::Error> {
        Ok(Control::Continue)
    }

    /// A kick interrupted guest execution after exit `after`.
    fn on_kick(&mut self, _after: ExitSeq) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Fills `inputs` with what reaches the devices at `at`. Called at every exit and kick,
    /// and repeatedly while the vCPU is halted.
    fn poll_inputs(
        &mut self,
        at: Point,
        view: &HostView,
        inputs: &mut Vec<Input>,
    ) -> Result<(), Self::Error>;

    /// The guest reads: `value` holds the device's answer; the hook may log or replace it.
    fn on_read(
        &mut self,
        _seq: ExitSeq,
        _exit: &Exit,
        _value: &mut [u8],
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The interrupt `vector` is injected at `at`.
    fn on_inject(&mut self, _at: Point, _vector: u8) -> Result<(), Self::Error> {
        Ok(())
    }

    /// An interrupt is pending but the vCPU cannot take it: the loop requests an
    /// interrupt-window exit at `at`.
    fn on_request_window(&mut self, _at: Point) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Output the guest produced at exit `seq` (serial bytes).
    fn on_output(&mut self, seq: ExitSeq, bytes: &[u8]) -> Result<(), Self::Error>;

    /// Ethernet frames the guest's network card transmitted at exit `seq`, in order: output,
    /// like [`ExitHook::on_output`]'s bytes, in a stream of its own.
    fn on_net_output(&mut self, seq: ExitSeq, frames: &[Vec<u8>]) -> Result<(), Self::Error>;

    /// The block devices served these reads from their images during exit `seq` (the
    /// guest's `QueueNotify` write), in order; called only while [`ExitHook::logs_disk_reads`]
    /// is on, after the access and before any interrupt is injected.
    fn on_disk_reads(&mut self, _seq: ExitSeq, _reads: &[DiskRead]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Whether the block devices hash their reads for [`ExitHook::on_disk_reads`] (a
    /// recorder logs them, a replayer checks them; hashing costs CPU, so the default is off).
    fn logs_disk_reads(&self) -> bool {
        false
    }

    /// Whether a pending interrupt the vCPU cannot take yet may be delivered through an
    /// interrupt-window exit. Where that exit is not at an exact instruction boundary (PVM),
    /// a recorded run must not use it: the interrupt then waits for the next natural exit at
    /// which the vCPU is ready, or for the kick after the latency bound.
    fn interrupt_windows(&self) -> bool {
        true
    }

    /// When to kick the vCPU out of an exit-free stretch if the timer deadline `deadline_ns`
    /// (virtual time) passes without an exit. None: never kick.
    fn kick_at(&self, _deadline_ns: u64) -> Option<Kick> {
        None
    }

    /// The most vCPU time the guest may run without an exit when no timer kick is armed
    /// ([`ExitHook::kick_at`] gave none): past it the vCPU is kicked and [`ExitHook::on_kick`]
    /// decides what that means. None (the default): no bound. A replayer bounds it: it only
    /// enters the guest once the log shows the recorded guest reached its next exit, so a
    /// replayed guest that runs on and on without one has gone another way.
    fn exit_free_bound(&self) -> Option<Duration> {
        None
    }
}

/// Why [`run`] failed: the VM, or the hook (with its own error type `E`).
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] crate::Error),
    /// The hook stopped the run.
    #[error(transparent)]
    Hook(E),
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest asked to stop.
    Stopped(StopRequest),
    /// The hook asked to pause at this exit.
    Paused(ExitSeq),
}

/// The exit loop state that outlives one [`run`] call.
#[derive(Debug, Default, Clone)]
pub struct LoopState {
    /// The last exit sequence number handed out.
    pub seq: ExitSeq,
    /// The vCPU executed HLT and no interrupt has woken it yet.
    pub halted: bool,
}

/// Runs the vCPU until the guest stops or the hook pauses.
pub fn run<V: VcpuRun + ?Sized, H: ExitHook + ?Sized>(
    vcpu: &mut V,
    machine: &mut Machine,
    hook: &mut H,
    state: &mut LoopState,
) -> Result<RunEnd, RunError<H::Error>> {
    let mut inputs = Vec::new();
    machine.set_disk_read_logging(hook.logs_disk_reads());
    loop {
        if state.halted {
            // Paused while halted: resume waiting, not running.
            let point = Point::Exit(state.seq);
            if let Some(end) = after_exit(vcpu, machine, hook, state, point, &mut inputs)? {
                return Ok(end);
            }
            continue;
        }
        // An interrupt the vCPU could not take at the last exit or kick, with no window exit
        // to say when it can (a recorded run's default): only a kick delivers it to a guest
        // that enables interrupts and then runs on without exits (a one-shot timer that
        // already fired leaves no deadline to kick at). So the kick is due now, after the
        // hook's latency bound.
        let due = if machine.pending_vector().is_some() && !hook.interrupt_windows() {
            Some(machine.now_ns())
        } else {
            machine.next_timer_deadline()
        };
        let kick = due.and_then(|deadline| hook.kick_at(deadline)).or_else(|| {
            hook.exit_free_bound().map(|bound| Kick {
                // Any moment already past: the count starts at this entry. The same one every
                // time, so re-arming an unchanged kick does not wake the kicker at every exit.
                at: *PAST.get_or_init(Instant::now),
                after_guest_time: bound,
            })
        });
        vcpu.arm_kick(kick);
        let exit = match vcpu.run()? {
            RunOutcome::Kicked => {
                tracing::trace!(after = state.seq.0, "kick");
                hook.on_kick(state.seq).map_err(RunError::Hook)?;
                let point = Point::Kick { after: state.seq };
                deliver_inputs(machine, hook, point, false, false, &mut inputs)?;
                inject_if_ready(vcpu, machine, hook, point)?;
                continue;
            }
            RunOutcome::Exit(exit) => exit,
        };
        state.seq.0 += 1;
        let seq = state.seq;
        tracing::trace!(seq = seq.0, ?exit, "exit");
        hook.on_exit(seq, &exit).map_err(RunError::Hook)?;
        let point = Point::Exit(seq);
        handle_exit(vcpu, machine, hook, seq, &exit, &mut inputs)?;
        if exit == Exit::Hlt {
            state.halted = true;
        }
        if let Some(end) = after_exit(vcpu, machine, hook, state, point, &mut inputs)? {
            return Ok(end);
        }
        if hook.end_of_exit(seq).map_err(RunError::Hook)? == Control::Pause {
            vcpu.complete_pending_io()?;
            return Ok(RunEnd::Paused(seq));
        }
    }
}

/// Performs the device side of one exit.
fn handle_exit<V: VcpuRun + ?Sized, H: ExitHook + ?Sized>(
    vcpu: &mut V,
    machine: &mut Machine,
    hook: &mut H,
    seq: ExitSeq,
    exit: &Exit,
    inputs: &mut Vec<Input>,
) -> Result<(), RunError<H::Error>> {
    let point = Point::Exit(seq);
    match exit {
        Exit::IoIn { port, size, .. } | Exit::IoOut { port, size, .. } => {
            let addr = u64::from(*port);
            let wants_clock = machine.pio.uses_clock(addr);
            deliver_inputs(machine, hook, point, false, wants_clock, inputs)?;
            let size = usize::from((*size).max(1));
            if let Exit::IoOut { data, .. } = exit {
                for chunk in data.chunks(size) {
                    if !machine.pio.write(addr, chunk) {
                        tracing::trace!(port, "write to unassigned port dropped");
                    }
                }
                report_disk_reads(machine, hook, seq)?;
            } else {
                let mut value = vec![0u8; exit.read_len().unwrap_or(0)];
                for chunk in value.chunks_mut(size) {
                    machine.pio.read(addr, chunk);
                }
                hook.on_read(seq, exit, &mut value)
                    .map_err(RunError::Hook)?;
                vcpu.complete_read(&value);
            }
        }
        Exit::MmioRead { addr, len } => {
            let wants_clock = machine.mmio.uses_clock(*addr);
            deliver_inputs(machine, hook, point, false, wants_clock, inputs)?;
            let mut value = vec![0u8; usize::from(*len)];
            machine.mmio.read(*addr, &mut value);
            hook.on_read(seq, exit, &mut value)
                .map_err(RunError::Hook)?;
            vcpu.complete_read(&value);
        }
        Exit::MmioWrite { addr, data } => {
            let wants_clock = machine.mmio.uses_clock(*addr);
            deliver_inputs(machine, hook, point, false, wants_clock, inputs)?;
            machine.mmio.write(*addr, data);
            report_disk_reads(machine, hook, seq)?;
        }
        Exit::TscRead { tsc } => {
            deliver_inputs(machine, hook, point, false, false, inputs)?;
            let mut value = tsc.to_le_bytes();
            hook.on_read(seq, exit, &mut value)
                .map_err(RunError::Hook)?;
            vcpu.complete_read(&value);
        }
        Exit::TscWrite { index, data } => {
            tracing::trace!(index, data, "guest TSC write dropped");
            deliver_inputs(machine, hook, point, false, false, inputs)?;
        }
        Exit::Hlt | Exit::IrqWindowOpen | Exit::Debug => {
            deliver_inputs(machine, hook, point, false, false, inputs)?;
        }
        Exit::Shutdown => {
            return Err(crate::Error::TripleFault {
                rip: vcpu.rip(),
                seq,
            }
            .into())
        }
        Exit::SystemEvent(kind) => {
            return Err(crate::Error::UnexpectedExit {
                what: format!("system event {kind}"),
                seq,
            }
            .into())
        }
        Exit::Unexpected(what) => {
            return Err(crate::Error::UnexpectedExit {
                what: what.clone(),
                seq,
            }
            .into())
        }
    }
    Ok(())
}

/// Hands the disk reads a write just caused to the hook.
fn report_disk_reads<H: ExitHook + ?Sized>(
    machine: &Machine,
    hook: &mut H,
    seq: ExitSeq,
) -> Result<(), RunError<H::Error>> {
    let reads = machine.take_disk_reads();
    if reads.is_empty() {
        return Ok(());
    }
    tracing::trace!(seq = seq.0, reads = reads.len(), "disk reads");
    hook.on_disk_reads(seq, &reads).map_err(RunError::Hook)
}

/// After an exit: output, stop requests, interrupt injection, and the halt wait.
fn after_exit<V: VcpuRun + ?Sized, H: ExitHook + ?Sized>(
    vcpu: &mut V,
    machine: &mut Machine,
    hook: &mut H,
    state: &mut LoopState,
    point: Point,
    inputs: &mut Vec<Input>,
) -> Result<Option<RunEnd>, RunError<H::Error>> {
    let output = machine.take_output();
    if !output.is_empty() {
        hook.on_output(state.seq, &output).map_err(RunError::Hook)?;
    }
    let frames = machine.take_net_output();
    if !frames.is_empty() {
        hook.on_net_output(state.seq, &frames)
            .map_err(RunError::Hook)?;
    }
    if let Some(stop) = machine.take_stop() {
        return Ok(Some(RunEnd::Stopped(stop)));
    }
    loop {
        if inject_if_ready(vcpu, machine, hook, point)? {
            state.halted = false;
        }
        if !state.halted {
            return Ok(None);
        }
        // Halted with nothing to deliver: wait for the host side.
        if !vcpu.interrupts_enabled()? {
            return Err(crate::Error::HaltedForever {
                rip: vcpu.rip(),
                seq: state.seq,
            }
            .into());
        }
        if hook.on_halted(state.seq).map_err(RunError::Hook)? == Control::Pause {
            return Ok(Some(RunEnd::Paused(state.seq)));
        }
        deliver_inputs(machine, hook, point, true, false, inputs)?;
    }
}

/// Asks the hook for inputs and applies them.
fn deliver_inputs<H: ExitHook + ?Sized>(
    machine: &mut Machine,
    hook: &mut H,
    at: Point,
    halted: bool,
    wants_clock: bool,
    inputs: &mut Vec<Input>,
) -> Result<(), RunError<H::Error>> {
    let view = HostView {
        halted,
        wants_clock,
        now_ns: machine.now_ns(),
        timer_deadline_ns: machine.next_timer_deadline(),
        rx_capacity: machine.serial_rx_capacity(),
        net_rx_ready: machine.net_rx_ready(),
    };
    inputs.clear();
    hook.poll_inputs(at, &view, inputs)
        .map_err(RunError::Hook)?;
    if !inputs.is_empty() {
        tracing::trace!(?at, halted, ?inputs, "inputs");
    }
    for input in inputs.iter() {
        machine
            .apply(input)
            .map_err(|e: InputError| RunError::Vm(e.into()))?;
    }
    Ok(())
}

/// Injects the PIC's pending vector if the vCPU can take it, else requests the window.
/// Returns whether it injected.
fn inject_if_ready<V: VcpuRun + ?Sized, H: ExitHook + ?Sized>(
    vcpu: &mut V,
    machine: &mut Machine,
    hook: &mut H,
    at: Point,
) -> Result<bool, RunError<H::Error>> {
    if machine.pending_vector().is_none() {
        vcpu.request_interrupt_window(false);
        return Ok(false);
    }
    if !vcpu.ready_for_interrupt() {
        if hook.interrupt_windows() {
            tracing::trace!(?at, "request interrupt window");
            hook.on_request_window(at).map_err(RunError::Hook)?;
            vcpu.request_interrupt_window(true);
        }
        return Ok(false);
    }
    let Some(vector) = machine.acknowledge_interrupt() else {
        return Ok(false);
    };
    tracing::trace!(?at, vector, "inject");
    hook.on_inject(at, vector).map_err(RunError::Hook)?;
    vcpu.inject(vector)?;
    vcpu.request_interrupt_window(false);
    Ok(true)
}

#[cfg(test)]
mod tests;
