//! `ftvm-vmm`: the one VMM core both roles of an ftvm pair share (DESIGN.md §1).
//!
//! A KVM VM with one vCPU and a userspace interrupt model (dual 8259 PIC, 8254 PIT, COM1
//! 8250, i8042, debug-exit port — no in-kernel irqchip), guest memory with dirty-page
//! tracking, a Linux-style 64-bit ELF boot, and one exit loop that numbers every guest-caused
//! exit and passes it through an [`ExitHook`]: live devices, the recorder and the replayer are
//! hooks over the same loop.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod devices;
pub mod digest;
pub mod exit;
pub mod live;
pub mod machine;
pub mod memory;
pub mod output_stream;
pub mod state;
pub mod tap;
pub mod tsc;
pub mod tsc_exits;
pub mod vcpu;
pub mod vm;

pub use exit::{Control, Exit, ExitHook, ExitSeq, HostView, Point, RunEnd, RunError};
pub use machine::Input;
pub use vm::{Vm, VmConfig, VmState};

/// Everything that can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: KVM is not available on this host (load the kvm module, or enable virtualization)")]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error("permission denied opening /dev/kvm (run as root or add the user to the 'kvm' group)")]
    KvmPermission,
    /// /dev/kvm did not answer like KVM.
    #[error("/dev/kvm is not a KVM device with API version 12")]
    NotKvm,
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The CPUID table could not be built.
    #[error("invalid CPUID table: {0}")]
    Cpuid(String),
    /// A disk image could not be attached.
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::DiskError),
    /// `FTVM_TSC_MEASURES` names no measure ([`tsc::TscMeasures`]).
    #[error("{0}")]
    TscMeasures(String),
    /// A device could not be set up.
    #[error("device setup failed: {0}")]
    Device(String),
    /// A disk block could not be read or written (digests and repairs, DESIGN.md §4).
    #[error("disk {disk} block {block}: {source}")]
    DiskBlock {
        /// The disk (slot order).
        disk: u32,
        /// The block.
        block: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(String),
    /// A helper thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// State could not be saved or restored.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The exit hook offered an input the devices could not take.
    #[error(transparent)]
    Input(#[from] machine::InputError),
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    #[error("guest triple fault at rip={rip:#x} (exit sequence number {seq})")]
    TripleFault {
        /// The guest's RIP.
        rip: u64,
        /// The exit at which it happened.
        seq: ExitSeq,
    },
    /// The guest halted with interrupts disabled, or nothing could ever wake it.
    #[error("guest halted and can never wake up at rip={rip:#x} (exit sequence number {seq})")]
    HaltedForever {
        /// The guest's RIP.
        rip: u64,
        /// The exit at which it halted.
        seq: ExitSeq,
    },
    /// An exit ftvm does not handle.
    #[error("unexpected vCPU exit at exit sequence number {seq}: {what}")]
    UnexpectedExit {
        /// What KVM reported.
        what: String,
        /// The exit.
        seq: ExitSeq,
    },
}
