//! TSC reads as exits (DESIGN.md §2 "RDTSC / RDTSCP", kmod/README.md).
//!
//! Stock KVM runs a guest's RDTSC and RDTSCP natively, so nothing records when a Linux guest
//! read the TSC and a replay drifts (ftvm repairs it). On a host with the ftvm-rdtsc-exits
//! KVM module (kmod/), every TSC read exits to userspace as `KVM_EXIT_X86_RDMSR` for MSR
//! 0x10 once the VM has `KVM_CAP_X86_USER_SPACE_MSR` (`KVM_MSR_EXIT_REASON_FILTER`) and an
//! MSR filter that denies reads of 0x10. The exit is a deterministic point like a port read:
//! the recorder logs the value the guest got, the replayer answers from the log.
//!
//! [`probe`] says whether this host has the module (a throwaway VM runs RDTSC under the
//! filter and sees the exit or not); [`install`] puts the filter on a VM. The filter also
//! denies guest writes to the TSC (0x10) and TSC_ADJUST (0x3b): each becomes an exit that
//! the loop drops ([`crate::exit::Exit::TscWrite`]), so the guest cannot move its TSC.
//! kvmclock and the TSC-deadline timer are hidden from every guest already
//! ([`crate::cpuid`]).

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{
    Cap, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuExit, VmFd,
};
use vm_memory::{Bytes, GuestAddress};

use crate::Error;

/// IA32_TIME_STAMP_COUNTER: the MSR a TSC-read exit names.
pub const MSR_TSC: u32 = 0x10;
/// IA32_TSC_ADJUST.
pub const MSR_TSC_ADJUST: u32 = 0x3b;

/// How the guest's TSC reads are kept in step on this host (or in a log, or a pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscMode {
    /// Stock KVM: TSC reads run natively; the pages they land in are repaired.
    Repair,
    /// Every TSC read is an exit, logged and replayed: exact replay.
    Exits,
}

impl TscMode {
    /// The word `ftvm status` and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            TscMode::Repair => "repair",
            TscMode::Exits => "exits",
        }
    }
}

impl std::fmt::Display for TscMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// RDTSC exited to userspace under the filter: the module is loaded.
    Present,
    /// It did not; why, in words (stock KVM, PVM, no MSR-exit capability).
    Absent(String),
}

impl Probe {
    /// The mode a VM on this host can run in.
    pub fn mode(&self) -> TscMode {
        match self {
            Probe::Present => TscMode::Exits,
            Probe::Absent(_) => TscMode::Repair,
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Present => f.write_str("present"),
            Probe::Absent(why) => write!(f, "absent: {why}"),
        }
    }
}

/// Enables MSR exits for filtered MSRs on `vm` and installs the filter: reads of the TSC and
/// writes of the TSC and TSC_ADJUST are denied (each exits to userspace), everything else is
/// as without a filter. The capability comes first: the module re-evaluates its intercepts
/// when the filter changes.
pub fn install(vm: &VmFd) -> Result<(), Error> {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| Error::Kvm("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)", e))?;
    // One bit per MSR, 0 = denied. 0x10..=0x3b: 44 MSRs; only 0x10 and 0x3b are denied for
    // writes, only 0x10 for reads.
    let count = MSR_TSC_ADJUST - MSR_TSC + 1;
    let mut writes = vec![0xffu8; count.div_ceil(8) as usize];
    for msr in [MSR_TSC, MSR_TSC_ADJUST] {
        let bit = (msr - MSR_TSC) as usize;
        writes[bit / 8] &= !(1 << (bit % 8));
    }
    let reads = [0xfeu8];
    vm.set_msr_filter(
        MsrFilterDefaultAction::ALLOW,
        &[
            MsrFilterRange {
                flags: MsrFilterRangeFlags::READ,
                base: MSR_TSC,
                msr_count: 1,
                bitmap: &reads,
            },
            MsrFilterRange {
                flags: MsrFilterRangeFlags::WRITE,
                base: MSR_TSC,
                msr_count: count,
                bitmap: &writes,
            },
        ],
    )
    .map_err(|e| Error::Kvm("KVM_X86_SET_MSR_FILTER", e))
}

/// The value the probe answers the guest's RDTSC with.
const PROBE_ANSWER: u64 = 0x0123_4567_89ab_cdef;

/// Where the throwaway guests' code starts (real mode, CS base 0).
const ENTRY: u64 = 0x1000;

/// A throwaway VM: one vCPU in real mode at [`ENTRY`] running `code`, with the TSC-exit
/// filter installed. Field order is drop order: the vCPU and VM close before memory goes.
struct Throwaway {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: VmFd,
    _memory: crate::memory::GuestMemory,
}

impl Throwaway {
    fn new(code: &[u8]) -> Result<Self, Error> {
        let kvm = crate::vm::open_kvm()?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        let memory = crate::memory::create(crate::memory::MIN_MEM_MIB)?;
        crate::memory::register(&vm, &memory)?;
        memory
            .write_slice(code, GuestAddress(ENTRY))
            .map_err(|e| Error::Device(format!("TSC-exit probe: cannot write its code: {e}")))?;
        install(&vm)?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        let regs = kvm_bindings::kvm_regs {
            rip: ENTRY,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        Ok(Self {
            vcpu,
            _vm: vm,
            _memory: memory,
        })
    }
}

/// Whether KVM offers MSR exits and filters at all.
fn msr_exits_offered() -> Result<bool, Error> {
    let kvm = crate::vm::open_kvm()?;
    Ok(kvm.check_extension(Cap::X86UserSpaceMsr) && kvm.check_extension(Cap::X86MsrFilter))
}

/// [`probe`] once per process (each probe builds a throwaway VM): what the pair handshake
/// tells the peer and what a run decides from. A probe that fails counts as absent, with the
/// failure in words. `FTVM_TSC_EXITS=off` in the environment makes this host say absent
/// without probing: an operator's way to keep a host with the module out of exact mode
/// (its pairs repair), and how the tests give one host of a pair no TSC-read exits.
pub fn this_host() -> &'static Probe {
    static FOUND: std::sync::OnceLock<Probe> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        if std::env::var_os("FTVM_TSC_EXITS").is_some_and(|v| v == "off") {
            return Probe::Absent("turned off by FTVM_TSC_EXITS=off".into());
        }
        probe().unwrap_or_else(|e| Probe::Absent(format!("the probe failed: {e}")))
    })
}

/// Whether this host's KVM turns TSC reads into exits: a throwaway VM (one vCPU in real
/// mode, 16 MiB) runs `rdtsc; mov esi,eax; mov edi,edx; hlt` with the filter installed. With
/// the module, the RDTSC exits for MSR 0x10 and the guest gets the probe's answer; without
/// it, the guest reaches HLT and nothing else changes. Errors only where /dev/kvm itself
/// fails; anything the guest does that is neither outcome is "absent", with what happened.
pub fn probe() -> Result<Probe, Error> {
    if !msr_exits_offered()? {
        return Ok(Probe::Absent(
            "KVM offers no MSR exits to userspace (KVM_CAP_X86_USER_SPACE_MSR, KVM_CAP_X86_MSR_FILTER)".into(),
        ));
    }
    const CODE: [u8; 9] = [0x0f, 0x31, 0x66, 0x89, 0xc6, 0x66, 0x89, 0xd7, 0xf4];
    let mut t = Throwaway::new(&CODE)?;
    let mut exits = 0;
    // A handful of entries at most: the code is four instructions.
    for _ in 0..16 {
        match t.vcpu.run() {
            Ok(VcpuExit::X86Rdmsr(exit)) => {
                if exit.index != MSR_TSC || exit.reason != MsrExitReason::Filter || exits > 0 {
                    return Ok(Probe::Absent(format!(
                        "unexpected MSR read exit for {:#x}",
                        exit.index
                    )));
                }
                *exit.data = PROBE_ANSWER;
                exits += 1;
            }
            Ok(VcpuExit::Hlt) => break,
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => {
                return Ok(Probe::Absent(format!(
                    "the probe guest stopped with {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Ok(Probe::Absent(format!("KVM_RUN of the probe guest: {e}"))),
        }
    }
    if exits == 0 {
        return Ok(Probe::Absent(
            "RDTSC ran natively under the MSR filter: no ftvm-rdtsc-exits module".into(),
        ));
    }
    let regs = t
        .vcpu
        .get_regs()
        .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
    let read = (regs.rdi & 0xffff_ffff) << 32 | (regs.rsi & 0xffff_ffff);
    if read != PROBE_ANSWER {
        return Ok(Probe::Absent(format!(
            "RDTSC exited but the guest read {read:#x}, not the answer {PROBE_ANSWER:#x}"
        )));
    }
    Ok(Probe::Present)
}

/// What one exit costs, measured in one throwaway VM (`ftvm tsc-probe --measure N`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitCosts {
    /// Exits of each kind.
    pub n: u16,
    /// Mean wall time per TSC-read exit (KVM_RUN round trip plus two guest instructions).
    pub tsc_exit: std::time::Duration,
    /// Mean wall time per port-write exit, the baseline (same loop, OUT instead of RDTSC).
    pub pio_exit: std::time::Duration,
}

/// Measures a TSC-read exit next to a port-I/O exit in the same VM: the guest runs `n`
/// RDTSCs in a LOOP, then `n` OUTs to port 0x80 in the same kind of loop, then HLT. Each
/// phase's time runs from its first exit to the next phase's first exit. Needs the module
/// (an error otherwise: without it the first loop makes no exits).
pub fn measure(n: u16) -> Result<ExitCosts, Error> {
    let [lo, hi] = n.to_le_bytes();
    // mov cx,n; l1: rdtsc; loop l1; mov cx,n; l2: out 0x80,al; loop l2; hlt
    let code = [
        0xb9, lo, hi, 0x0f, 0x31, 0xe2, 0xfc, 0xb9, lo, hi, 0xe6, 0x80, 0xe2, 0xfc, 0xf4,
    ];
    if n == 0 {
        return Err(Error::Device(
            "TSC-exit measure: n must be at least 1".into(),
        ));
    }
    if !msr_exits_offered()? {
        return Err(Error::Device(
            "TSC-exit measure: KVM offers no MSR exits to userspace".into(),
        ));
    }
    let mut t = Throwaway::new(&code)?;
    let (mut tsc_exits, mut pio_exits) = (0u32, 0u32);
    let (mut first_tsc, mut first_pio) = (None, None);
    let end = loop {
        match t.vcpu.run() {
            Ok(VcpuExit::X86Rdmsr(exit)) if exit.index == MSR_TSC => {
                first_tsc.get_or_insert_with(std::time::Instant::now);
                tsc_exits += 1;
            }
            Ok(VcpuExit::IoOut(0x80, _)) => {
                first_pio.get_or_insert_with(std::time::Instant::now);
                pio_exits += 1;
            }
            Ok(VcpuExit::Hlt) => break std::time::Instant::now(),
            Ok(VcpuExit::Intr) => continue,
            Ok(other) => {
                return Err(Error::Device(format!(
                    "TSC-exit measure: the guest stopped with {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
        }
    };
    let (Some(first_tsc), Some(first_pio)) = (first_tsc, first_pio) else {
        return Err(Error::Device(format!(
            "TSC-exit measure: {tsc_exits} TSC-read exits and {pio_exits} port exits \
             (no ftvm-rdtsc-exits module?)"
        )));
    };
    if tsc_exits != u32::from(n) || pio_exits != u32::from(n) {
        return Err(Error::Device(format!(
            "TSC-exit measure: {tsc_exits} TSC-read exits and {pio_exits} port exits, not {n} each"
        )));
    }
    Ok(ExitCosts {
        n,
        tsc_exit: (first_pio - first_tsc) / u32::from(n),
        pio_exit: (end - first_pio) / u32::from(n),
    })
}
