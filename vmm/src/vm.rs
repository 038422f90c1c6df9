//! One VM: the KVM VM and its single vCPU, guest memory, the machine's devices, and the exit
//! loop state. Primary, secondary and a plain `ftvm run` all drive this same type; they differ
//! only in the [`ExitHook`] they pass to [`Vm::run`].

use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::acpi;
use crate::boot;
use crate::cpuid::CpuidTable;
use crate::devices::virtio::block::{DiskBlock, DiskConfig, DiskImage};
use crate::devices::virtio::net::MacAddr;
use crate::exit::{self, ExitHook, ExitSeq, LoopState, RunEnd, RunError, VcpuRun};
use crate::machine::{DeviceStates, Machine};
use crate::memory::{self, GuestMemory};
use crate::state::Persist;
use crate::vcpu::{Vcpu, VcpuState};
use crate::Error;

/// Default guest memory size.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// Everything that defines a VM's initial state. Identical on both hosts of a pair.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The kernel image: ELF64 (`vmlinux`, the built-in test guest) or a Linux bzImage.
    pub kernel: Vec<u8>,
    /// An initial ramdisk for a Linux kernel.
    pub initrd: Option<Vec<u8>>,
    /// Raw disk images, offered as virtio-mmio block devices in this order (Linux: vda, vdb…).
    pub disks: Vec<DiskConfig>,
    /// The network card's MAC address, if the VM has one (a virtio-mmio card after the
    /// disks); its frames are the exit hook's (`Input::NetRx`, `ExitHook::on_net_output`).
    pub net: Option<MacAddr>,
    /// The kernel command line.
    pub cmdline: String,
    /// The CPUID table; None derives it from this host ([`CpuidTable::from_supported`]).
    pub cpuid: Option<CpuidTable>,
    /// Boot randomness for a Linux (bzImage) guest ([`boot::BootImages::rng_seed`]); empty:
    /// none. Part of the configuration because both sides of a pair must boot with the
    /// same bytes ([`boot::new_rng_seed`] draws them).
    pub rng_seed: Vec<u8>,
    /// The wall-clock time, in Unix seconds, the CMOS clock shows at virtual time 0
    /// ([`crate::devices::rtc`]); both sides of a pair show the same.
    pub rtc_base_s: u64,
}

/// The complete state of a VM except guest memory: what a checkpoint carries besides pages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The vCPU.
    pub vcpu: VcpuState,
    /// Every device.
    pub devices: DeviceStates,
    /// The exit sequence number reached.
    pub exit_seq: u64,
    /// The vCPU was halted.
    pub halted: bool,
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: the vCPU and VM fds close before memory is unmapped.
    vcpu: Vcpu,
    vm_fd: VmFd,
    _kvm: Kvm,
    memory: GuestMemory,
    machine: Machine,
    cpuid: CpuidTable,
    loop_state: LoopState,
}

/// Opens /dev/kvm (refusing a device that does not answer as KVM API 12) with an error that
/// says what to do about it.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::Kvm("open /dev/kvm", e),
    })?;
    if kvm.get_api_version() != 12 {
        return Err(Error::NotKvm);
    }
    Ok(kvm)
}

/// The TSC frequency (kHz) KVM gives a new vCPU on this host. A Linux guest is told it on its
/// command line (`tsc_early_khz=`): calibrating the TSC against the PIT takes a thousand
/// port reads within 10 ms, which slow exits (nested virtualization) cannot deliver.
pub fn host_tsc_khz() -> Result<u32, Error> {
    let kvm = open_kvm()?;
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
    vcpu.get_tsc_khz()
        .map_err(|e| Error::Kvm("KVM_GET_TSC_KHZ", e))
}

impl Vm {
    /// Creates the VM, loads the kernel and puts the vCPU at its entry point.
    pub fn new(config: &VmConfig) -> Result<Self, Error> {
        Self::create(config, true)
    }

    /// Creates the VM with zeroed memory and no kernel loaded: the target of a sync, whose
    /// pages and state all come from a running primary (DESIGN.md §4). The kernel in
    /// `config` is only checked against the primary's, never loaded.
    pub fn new_incoming(config: &VmConfig) -> Result<Self, Error> {
        Self::create(config, false)
    }

    fn create(config: &VmConfig, boot_kernel: bool) -> Result<Self, Error> {
        // Refuse a bad size before touching /dev/kvm.
        memory::ram_ranges(config.mem_mib)?;
        let disks = config
            .disks
            .iter()
            .map(DiskImage::open)
            .collect::<Result<Vec<_>, _>>()?;
        let kvm = open_kvm()?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        let memory = memory::create(config.mem_mib)?;
        memory::register(&vm_fd, &memory)?;
        let machine =
            Machine::new(&memory, disks, config.net).map_err(|e| Error::Device(e.to_string()))?;
        machine.set_rtc_base(config.rtc_base_s);
        let kernel = if boot_kernel {
            let rsdp = acpi::write_tables(&memory, &machine.virtio_slots())?;
            Some(boot::load_kernel(
                &memory,
                &boot::BootImages {
                    kernel: &config.kernel,
                    initrd: config.initrd.as_deref(),
                    cmdline: &config.cmdline,
                    acpi_rsdp: Some(rsdp),
                    rng_seed: &config.rng_seed,
                },
            )?)
        } else {
            None
        };

        let cpuid = match &config.cpuid {
            Some(t) => t.clone(),
            None => CpuidTable::from_supported(&kvm)
                .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?,
        };
        let vcpu_fd = vm_fd
            .create_vcpu(0)
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let kvm_cpuid = cpuid.to_kvm().map_err(|e| Error::Cpuid(format!("{e:?}")))?;
        vcpu_fd
            .set_cpuid2(&kvm_cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
        let sregs = vcpu_fd
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        vcpu_fd
            .set_sregs(&boot::boot_sregs(sregs))
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        if let Some(kernel) = &kernel {
            vcpu_fd
                .set_regs(&boot::boot_regs(kernel))
                .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        }
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu_fd
            .set_fpu(&fpu)
            .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
        let vcpu = Vcpu::new(&kvm, vcpu_fd)?;
        let mut vm = Self {
            vcpu,
            vm_fd,
            _kvm: kvm,
            memory,
            machine,
            cpuid,
            loop_state: LoopState::default(),
        };
        // The boot image is the initial state both hosts start from, not an epoch's writes.
        vm.take_dirty_pages()?;
        vm.take_dirty_blocks();
        Ok(vm)
    }

    /// Turns every guest TSC read into an exit ([`crate::tsc_exits`]): installs the MSR
    /// filter on this VM. Only on a host where [`crate::tsc_exits::probe`] finds the module;
    /// elsewhere the filter changes nothing.
    pub fn enable_tsc_exits(&self) -> Result<(), Error> {
        crate::tsc_exits::install(&self.vm_fd)
    }

    /// Runs the guest until it stops or `hook` pauses it.
    pub fn run<H: ExitHook + ?Sized>(
        &mut self,
        hook: &mut H,
    ) -> Result<RunEnd, RunError<H::Error>> {
        exit::run(
            &mut self.vcpu,
            &mut self.machine,
            hook,
            &mut self.loop_state,
        )
    }

    /// The last exit sequence number.
    pub fn exit_seq(&self) -> ExitSeq {
        self.loop_state.seq
    }

    /// The vCPU is halted (after HLT, no interrupt has woken it yet).
    pub fn halted(&self) -> bool {
        self.loop_state.halted
    }

    /// The virtual clock (ns since the VM started, as the devices see it).
    pub fn clock_ns(&self) -> u64 {
        self.machine.now_ns()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The CPUID table the vCPU runs with.
    pub fn cpuid(&self) -> &CpuidTable {
        &self.cpuid
    }

    /// Makes the guest's TSC count at `khz` (the primary's rate, DESIGN.md §2), where it
    /// counts at another rate here. Err: this host cannot (no TSC scaling), with both rates.
    pub fn match_tsc_khz(&self, khz: u32) -> Result<(), String> {
        let ours = self.vcpu.tsc_khz().map_err(|e| e.to_string())?;
        if khz == 0 || khz == ours {
            return Ok(());
        }
        self.vcpu.set_tsc_khz(khz).map_err(|e| {
            format!(
                "the primary's guest counts its TSC at {khz} kHz, this host's at {ours} kHz, and KVM cannot scale it here ({e}); pair hosts whose TSCs run at the same rate"
            )
        })?;
        tracing::info!(
            primary_khz = khz,
            host_khz = ours,
            "TSC rate set to the primary's"
        );
        Ok(())
    }

    /// The devices.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The vCPU's registers and special registers.
    pub fn registers(&self) -> Result<(kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs), Error> {
        let fd = self.vcpu.fd();
        Ok((
            fd.get_regs().map_err(|e| Error::Kvm("KVM_GET_REGS", e))?,
            fd.get_sregs().map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?,
        ))
    }

    /// Reads guest page `pfn` into `page` (4096 bytes).
    pub fn read_page(&self, pfn: u64, page: &mut [u8]) -> Result<(), Error> {
        memory::read_page(&self.memory, pfn, page).map_err(Error::Memory)
    }

    /// Writes guest page `pfn` (a checkpoint being installed); empty `data` zeroes it.
    pub fn write_page(&self, pfn: u64, data: &[u8]) -> Result<(), Error> {
        memory::write_page(&self.memory, pfn, data).map_err(Error::Memory)
    }

    /// Backs all guest memory in the host, writable, before the guest runs: a VM of a
    /// protected pair ([`memory::populate`]).
    pub fn populate_memory(&self) -> Result<(), Error> {
        Ok(memory::populate(&self.memory)?)
    }

    /// Drops KVM's mappings of guest memory, at a checkpoint, after the dirty pages were
    /// taken ([`memory::remap`]).
    pub fn drop_guest_mappings(&mut self) -> Result<(), Error> {
        Ok(memory::remap(&self.vm_fd, &self.memory)?)
    }

    /// Pages written since the last call (guest and VMM writes), sorted page frame numbers.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<u64>, Error> {
        Ok(memory::take_dirty_pages(&self.vm_fd, &self.memory)?)
    }

    /// The attached disks' image paths, in the guest's disk order.
    pub fn disk_paths(&self) -> Vec<std::path::PathBuf> {
        self.machine.disk_paths()
    }

    /// Disk blocks the guest wrote since the last call, ascending (DESIGN.md §4 "Disks").
    pub fn take_dirty_blocks(&mut self) -> Vec<DiskBlock> {
        self.machine.take_dirty_blocks()
    }

    /// Reads disk block `b` into `buf` (resized to the block's length).
    pub fn read_disk_block(&self, b: DiskBlock, buf: &mut Vec<u8>) -> Result<(), Error> {
        self.machine.read_disk_block(b, buf)
    }

    /// Writes disk block `b` (a repair being installed); empty `data` zeroes it.
    pub fn write_disk_block(&self, b: DiskBlock, data: &[u8]) -> Result<(), Error> {
        self.machine.write_disk_block(b, data)
    }

    /// Saves vCPU and device state. Call only when [`Vm::run`] returned (the pending I/O
    /// instruction is then complete).
    pub fn save(&self) -> Result<VmState, Error> {
        Ok(VmState {
            vcpu: self.vcpu.save()?,
            devices: self.machine.save()?,
            exit_seq: self.loop_state.seq.0,
            halted: self.loop_state.halted,
        })
    }

    /// Restores vCPU and device state saved by [`Vm::save`] (guest memory is restored by the
    /// caller through [`Vm::memory`]). The vCPU may be stopped in the middle of an exit (a
    /// replay that diverged there): KVM first finishes that exit, so its completion cannot
    /// land on top of the restored registers.
    pub fn restore(&mut self, state: &VmState) -> Result<(), Error> {
        self.vcpu.complete_pending_io()?;
        self.vcpu.restore(&state.vcpu)?;
        self.machine.restore(&state.devices)?;
        self.loop_state = LoopState {
            seq: ExitSeq(state.exit_seq),
            halted: state.halted,
        };
        Ok(())
    }
}
