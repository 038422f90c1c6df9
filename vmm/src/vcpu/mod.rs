//! The one vCPU: KVM_RUN with exits converted to [`Exit`], interrupt injection with
//! KVM_INTERRUPT (userspace irqchip), kicks, and save/restore of the complete vCPU state.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_interrupt, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs, KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_X86_RDMSR,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::exit::{Exit, Kick, RunOutcome, VcpuRun};
use crate::state::{Persist, StateError};
use crate::Error;

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// MSRs that are part of the vCPU state, when the host KVM supports them.
const SAVED_MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// The complete architectural state of the vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, pending interrupt bitmap.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state: the 4 KiB XSAVE area as 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// (index, value) of [`SAVED_MSRS`] the host supports.
    pub msrs: Vec<(u32, u64)>,
}

thread_local! {
    /// The kvm_run area of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Sets `immediate_exit`, wherever the vCPU thread is: in KVM_RUN (which then returns), about
/// to enter it (which then returns at once), or handling an exit (the next entry returns at
/// once, and [`Vcpu::run`] sees that the kick was for an earlier entry and enters again).
/// A kick is never dropped here: one that landed between the arming and the entry used to
/// be, and a guest that runs without exits then ran on for good.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by the vCPU thread (this thread: the signal is
            // delivered to it with pthread_kill) to its kvm_run mapping, which lives as long as
            // the VcpuFd; it is cleared before the VcpuFd is dropped. Writing immediate_exit is
            // what the KVM API documents for exactly this race-free kick.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// The real-time signal used to kick the vCPU thread.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

/// Kicks the vCPU thread out of KVM_RUN once a deadline has passed and the vCPU thread has
/// then run for a given CPU time without reaching an exit. One thread per VM.
///
/// The CPU time is counted from the later of the deadline and the entry into the current
/// KVM_RUN ([`Kicker::arm`] is called before every entry and restarts the count), so time
/// the VMM spends handling exits (an epoch digest, a checkpoint) never counts as guest time
/// without an exit. Where exits are slow (nested KVM, the VMM under emulation) that time
/// alone used to exceed the latency bound, and recordings took kicks the guest never
/// needed.
struct Kicker {
    shared: Arc<(Mutex<KickState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct KickState {
    kick: Option<Kick>,
    /// Counts the entries into KVM_RUN ([`Kicker::arm`]): which one a kick was armed for.
    entry: u64,
    /// The entry the last kick fired for.
    fired_for: Option<u64>,
    /// The vCPU thread's CPU time when the count started: at the entry into the current
    /// KVM_RUN if the deadline had passed then, else when the kicker saw it pass.
    cpu_base: Option<Duration>,
    shutdown: bool,
}

/// CPU time consumed by the thread whose CPU clock is `clock` (guest time included).
fn thread_cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; an invalid clock makes the call fail, which
    // reads as zero elapsed CPU time (the kick then waits for wall time only to run out).
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Kicker {
    fn spawn(target: libc::pthread_t) -> std::io::Result<Self> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `target` is the calling vCPU thread (alive); `clock` is a valid out pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(target, &mut clock) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let shared = Arc::new((Mutex::new(KickState::default()), Condvar::new()));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-kicker".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = crate::bus::lock(lock);
                loop {
                    if st.shutdown {
                        return;
                    }
                    let Some(kick) = st.kick else {
                        st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    let now = Instant::now();
                    let wait = if now < kick.at {
                        kick.at - now
                    } else {
                        let cpu = thread_cpu_time(clock);
                        let used = cpu.saturating_sub(*st.cpu_base.get_or_insert(cpu));
                        if used >= kick.after_guest_time {
                            tracing::trace!(
                                late_us = (now - kick.at).as_micros() as u64,
                                cpu_us = used.as_micros() as u64,
                                "kicker fires"
                            );
                            st.kick = None;
                            st.fired_for = Some(st.entry);
                            // SAFETY: `target` is the vCPU thread, alive while this thread
                            // runs (the Kicker is dropped, and this thread joined, before the
                            // Vcpu); the signal has a handler.
                            unsafe { libc::pthread_kill(target, kick_signal()) };
                            continue;
                        }
                        // CPU time advances no faster than wall time.
                        kick.after_guest_time - used
                    };
                    st = cv
                        .wait_timeout(st, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Arms `kick` for the KVM_RUN the calling (vCPU) thread is about to enter. The CPU time
    /// the kick waits for restarts now if the deadline has passed, at the deadline if not.
    fn arm(&self, kick: Option<Kick>) {
        let cpu_base = kick
            .filter(|k| Instant::now() >= k.at)
            .map(|_| thread_cpu_time(libc::CLOCK_THREAD_CPUTIME_ID));
        let (lock, cv) = &*self.shared;
        let mut st = crate::bus::lock(lock);
        st.entry += 1;
        st.cpu_base = cpu_base;
        if st.kick != kick {
            st.kick = kick;
            cv.notify_one();
        }
        // An unchanged kick needs no wake-up: the kicker re-reads the base when its wait
        // ends, and the base only moved later.
    }

    /// Whether a kick fired for the entry armed last (not for an earlier one whose signal
    /// arrived late).
    fn fired_for_this_entry(&self) -> bool {
        let st = crate::bus::lock(&self.shared.0);
        st.fired_for == Some(st.entry)
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            crate::bus::lock(lock).shutdown = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    saved_msrs: Vec<u32>,
    kicker: Option<Kicker>,
    kicker_thread: libc::pthread_t,
    /// The kick for the next entry ([`VcpuRun::arm_kick`]), armed by [`VcpuRun::run`].
    kick: Option<Kick>,
}

impl Vcpu {
    /// The TSC frequency (kHz) the guest sees (KVM_GET_TSC_KHZ).
    pub fn tsc_khz(&self) -> Result<u32, Error> {
        self.fd
            .get_tsc_khz()
            .map_err(|e| Error::Kvm("KVM_GET_TSC_KHZ", e))
    }

    /// Sets the TSC frequency the guest sees (KVM_SET_TSC_KHZ): refused where the host
    /// cannot scale its TSC to `khz`.
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), Error> {
        self.fd
            .set_tsc_khz(khz)
            .map_err(|e| Error::Kvm("KVM_SET_TSC_KHZ", e))
    }

    /// Wraps a created vCPU. `kvm` tells which MSRs the host can save.
    pub fn new(kvm: &Kvm, fd: VcpuFd) -> Result<Self, Error> {
        let supported = kvm
            .get_msr_index_list()
            .map_err(|e| Error::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let saved_msrs = SAVED_MSRS
            .iter()
            .copied()
            .filter(|m| supported.as_slice().contains(m))
            .collect();
        static HANDLER: Once = Once::new();
        let mut handler_result = Ok(());
        HANDLER.call_once(|| {
            handler_result =
                vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
        });
        handler_result.map_err(|e| Error::Signal(e.to_string()))?;
        Ok(Self {
            fd,
            saved_msrs,
            kicker: None,
            kicker_thread: 0,
            kick: None,
        })
    }

    /// The KVM file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm_run(&mut self) -> &mut kvm_run {
        self.fd.get_kvm_run()
    }

    /// Makes sure the kicker targets the calling thread (the one that will enter KVM_RUN).
    fn bind_to_current_thread(&mut self) -> Result<(), Error> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if self.kicker.is_none() || self.kicker_thread != me {
            self.kicker = None;
            self.kicker = Some(Kicker::spawn(me).map_err(Error::Thread)?);
            self.kicker_thread = me;
        }
        let run: *mut kvm_run = self.kvm_run();
        KVM_RUN.with(|p| p.set(run));
        Ok(())
    }

    fn io_size(&mut self) -> u8 {
        let run = self.kvm_run();
        // SAFETY: read only after a KVM_EXIT_IO, when `io` is the active union member.
        unsafe { run.__bindgen_anon_1.io.size }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.kicker = None;
        KVM_RUN.with(|p| {
            if std::ptr::eq(p.get(), self.fd.get_kvm_run()) {
                p.set(std::ptr::null_mut());
            }
        });
    }
}

impl Vcpu {
    /// One KVM_RUN, its return converted.
    fn enter(&mut self) -> Result<RunOutcome, Error> {
        let (port, len) = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => (port, data.len()),
            Ok(VcpuExit::IoOut(port, data)) => {
                let data = data.to_vec();
                let size = self.io_size();
                return Ok(RunOutcome::Exit(Exit::IoOut { port, size, data }));
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                return Ok(RunOutcome::Exit(Exit::MmioRead {
                    addr,
                    len: data.len() as u8,
                }))
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                return Ok(RunOutcome::Exit(Exit::MmioWrite {
                    addr,
                    data: data.to_vec(),
                }))
            }
            // Only the TSC-exit filter (crate::tsc_exits) makes MSR exits.
            Ok(VcpuExit::X86Rdmsr(msr)) if msr.index == crate::tsc_exits::MSR_TSC => {
                return Ok(RunOutcome::Exit(Exit::TscRead { tsc: *msr.data }))
            }
            Ok(VcpuExit::X86Wrmsr(msr)) => {
                // Completed with no error: KVM skips the WRMSR, the write is dropped.
                *msr.error = 0;
                return Ok(RunOutcome::Exit(Exit::TscWrite {
                    index: msr.index,
                    data: msr.data,
                }));
            }
            Ok(VcpuExit::Hlt) => return Ok(RunOutcome::Exit(Exit::Hlt)),
            Ok(VcpuExit::IrqWindowOpen) => return Ok(RunOutcome::Exit(Exit::IrqWindowOpen)),
            Ok(VcpuExit::Shutdown) => return Ok(RunOutcome::Exit(Exit::Shutdown)),
            Ok(VcpuExit::Debug(_)) => return Ok(RunOutcome::Exit(Exit::Debug)),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Ok(RunOutcome::Exit(Exit::SystemEvent(kind)))
            }
            Ok(VcpuExit::Intr) => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(RunOutcome::Kicked);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Ok(RunOutcome::Exit(Exit::Unexpected(format!(
                    "VM entry failed: hardware reason {reason:#x} on cpu {cpu}"
                ))))
            }
            Ok(VcpuExit::InternalError) => {
                return Ok(RunOutcome::Exit(Exit::Unexpected(
                    "KVM internal error (emulation failure)".into(),
                )))
            }
            Ok(other) => {
                return Ok(RunOutcome::Exit(Exit::Unexpected(format!(
                    "unhandled exit {other:?}"
                ))))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(RunOutcome::Kicked);
            }
            Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
        };
        let size = self.io_size().max(1);
        Ok(RunOutcome::Exit(Exit::IoIn {
            port,
            size,
            count: (len / usize::from(size)) as u32,
        }))
    }
}

impl VcpuRun for Vcpu {
    fn run(&mut self) -> Result<RunOutcome, Error> {
        // The handler's kvm_run pointer is in place before the kick is armed, so a kick that
        // fires at once still reaches this entry.
        self.bind_to_current_thread()?;
        if let Some(k) = &self.kicker {
            k.arm(self.kick);
        }
        loop {
            let outcome = self.enter();
            match outcome {
                Ok(RunOutcome::Exit(_)) => {
                    // The guest exited by itself: a kick that raced that exit is void.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Ok(RunOutcome::Kicked)
                    if !self
                        .kicker
                        .as_ref()
                        .is_some_and(Kicker::fired_for_this_entry) =>
                {
                    // A kick armed for an earlier entry whose signal landed after that entry
                    // ended (while the VMM handled an exit), or another signal: the guest has
                    // not run out its time, so it runs on. Without this, such a kick would end
                    // this KVM_RUN before the guest ran an instruction.
                    continue;
                }
                _ => {}
            }
            return outcome;
        }
    }

    fn complete_read(&mut self, data: &[u8]) {
        let run = self.kvm_run();
        match run.exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: after KVM_EXIT_IO `io` is the active union member; data_offset and
                // size*count describe a buffer inside the kvm_run mapping (KVM guarantees it),
                // and we copy at most that many bytes.
                unsafe {
                    let io = run.__bindgen_anon_1.io;
                    let len = (usize::from(io.size) * io.count as usize).min(data.len());
                    let base = (run as *mut kvm_run).cast::<u8>();
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        base.add(io.data_offset as usize),
                        len,
                    );
                }
            }
            KVM_EXIT_MMIO => {
                // SAFETY: after KVM_EXIT_MMIO `mmio` is the active union member.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let len = (mmio.len as usize).min(data.len()).min(8);
                mmio.data[..len].copy_from_slice(&data[..len]);
            }
            KVM_EXIT_X86_RDMSR => {
                // SAFETY: after KVM_EXIT_X86_RDMSR `msr` is the active union member.
                let msr = unsafe { &mut run.__bindgen_anon_1.msr };
                let mut value = [0u8; 8];
                let len = data.len().min(8);
                value[..len].copy_from_slice(&data[..len]);
                msr.data = u64::from_le_bytes(value);
                msr.error = 0;
            }
            _ => {}
        }
    }

    fn ready_for_interrupt(&mut self) -> bool {
        let run = self.kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    fn interrupts_enabled(&mut self) -> Result<bool, Error> {
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
        Ok(regs.rflags & (1 << 9) != 0)
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.kvm_run().request_interrupt_window = u8::from(on);
    }

    fn inject(&mut self, vector: u8) -> Result<(), Error> {
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer, which is valid for
        // the duration of the call; the fd is a vCPU fd.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(Error::Kvm("KVM_INTERRUPT", kvm_ioctls::Error::last()));
        }
        Ok(())
    }

    fn complete_pending_io(&mut self) -> Result<(), Error> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ()).or_else(|e| {
            if e.errno() == libc::EINTR {
                Ok(())
            } else {
                Err(Error::Kvm("KVM_RUN (immediate exit)", e))
            }
        });
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    fn arm_kick(&mut self, kick: Option<Kick>) {
        self.kick = kick;
    }

    fn rip(&mut self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

impl Persist for Vcpu {
    type State = VcpuState;

    fn save(&self) -> Result<VcpuState, StateError> {
        let mut msrs = Msrs::from_entries(
            &self
                .saved_msrs
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| StateError::Invalid {
            device: "vcpu",
            why: format!("MSR list: {e:?}"),
        })?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            // No dynamic xfeatures (AMX) are enabled, so the legacy 4 KiB area is complete.
            xsave: self
                .fd
                .get_xsave()
                .map_err(kvm_err("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: self.fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    fn restore(&mut self, s: &VcpuState) -> Result<(), StateError> {
        // Order as in Firecracker: sregs before regs (mode), MSRs, then events last.
        self.fd
            .set_sregs(&s.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let mut xsave = kvm_xsave::default();
        if s.xsave.len() != xsave.region.len() {
            return Err(StateError::Invalid {
                device: "vcpu",
                why: format!("XSAVE area of {} words, expected 1024", s.xsave.len()),
            });
        }
        xsave.region.copy_from_slice(&s.xsave);
        // SAFETY: the area is a full legacy 4 KiB XSAVE area (checked above) and no dynamic
        // xfeatures are enabled, so KVM reads nothing past the struct.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Invalid {
            device: "vcpu",
            why: format!("MSR list: {e:?}"),
        })?;
        let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(StateError::Invalid {
                device: "vcpu",
                why: format!(
                    "KVM accepted {n} of {} MSRs (first refused: {:#x})",
                    entries.len(),
                    entries[n].index
                ),
            });
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
