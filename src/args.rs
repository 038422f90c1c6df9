//! The command line: `ftvm`'s subcommands and their options (clap), as `main` dispatches
//! them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{
    arbiter_args, bounds, ops, security, tsc_mode, DEFAULT_LATENCY_BOUND_MS, DEFAULT_MAX_EPOCH_MS,
};

#[derive(Parser)]
#[command(
    name = "ftvm",
    version,
    about = "Lockstep fault-tolerant VM pairs on KVM"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run a guest. Its serial console is stdin/stdout; ftvm exits with the guest's status.
    Run(RunArgs),
    /// Re-execute a recorded log and check the replayed VM against it at every epoch.
    Replay(ReplayArgs),
    /// Wait for a primary (`ftvm run --peer`), replay its guest in lockstep, and go live if
    /// the primary is lost. Exits with the guest's status.
    Standby(StandbyArgs),
    /// Print the status of a pair process through its control socket (`--control`).
    Status(ops::StatusArgs),
    /// Planned role swap, no output lost: the standby becomes the primary and the primary
    /// its standby. ADDR is the primary's control socket (`--control`); returns once the
    /// swap is done.
    Switchover(ControlArgs),
    /// Make a standby that waits for a silent primary go live now, from its last consistent
    /// point: an operator's decision that the primary is gone (without an arbiter, silence
    /// never makes a standby live on its own). ADDR is the standby's control socket.
    Promote(ControlArgs),
    /// Measure the logging channel between two hosts: on one, `ftvm bench --listen ADDR`; on
    /// the other, `ftvm bench --peer ADDR` prints ack latency and log throughput over the
    /// pair channel, each next to raw TCP between the same hosts.
    Bench(BenchArgs),
    /// The arbiter of protected pairs (`--witness`): keeps each protected VM's term and its
    /// holder in FILE, fsynced before it answers, and grants each term once.
    Witness(WitnessArgs),
    /// Make a pair key: both hosts of a pair (and `ftvm status`) are given it with `--key`.
    Keygen(security::KeygenArgs),
    /// Say whether this host's KVM turns guest TSC reads into exits (the ftvm-rdtsc-exits
    /// module, kmod/): prints `tsc-exits: present` or `tsc-exits: absent: why`.
    TscProbe(tsc_mode::TscProbeArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("side").required(true).args(["listen", "peer"])))]
pub(crate) struct BenchArgs {
    /// Answer benchmark connections on this address (host:port) until killed.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// Measure against the responder at this address.
    #[arg(long, value_name = "ADDR")]
    pub(crate) peer: Option<String>,
    /// Round trips per latency figure.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub(crate) samples: u64,
    /// Seconds each throughput figure is measured.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) seconds: f64,
    /// Records in a large batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) records: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) security: security::SecurityArgs,
}

#[derive(clap::Args)]
pub(crate) struct WitnessArgs {
    /// Address to answer on (host:port).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: String,
    /// The state file (created if missing; kept across restarts).
    #[arg(long, value_name = "FILE")]
    pub(crate) state: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (requests by outcome, VMs, terms).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<String>,
}

#[derive(clap::Args)]
pub(crate) struct PairArgs {
    /// Heartbeat interval in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) heartbeat_ms: u64,
    /// A peer silent this long (milliseconds) is lost. Default: three heartbeat intervals.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) heartbeat_timeout_ms: Option<u64>,
    /// Answer `ftvm status` on this address (host:port).
    #[arg(long, value_name = "ADDR")]
    pub(crate) control: Option<String>,
    #[command(flatten)]
    pub(crate) arbiter: arbiter_args::ArbiterArgs,
    #[command(flatten)]
    pub(crate) security: security::SecurityArgs,
    #[command(flatten)]
    pub(crate) bounds: bounds::BoundsArgs,
    #[command(flatten)]
    pub(crate) telemetry: ops::TelemetryArgs,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("rendezvous").required(true).args(["listen", "join"])))]
pub(crate) struct StandbyArgs {
    /// Address to wait for the primary on (host:port): a primary started with `--peer`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
    /// Join a primary that is already running: its `--accept-standby` address. The guest's
    /// memory is synced while it runs (a progress bar shows on a terminal), then the
    /// standby follows in lockstep.
    #[arg(long, value_name = "ADDR")]
    pub(crate) join: Option<String>,
    /// With --join: how long to keep trying to reach the primary, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "join")]
    pub(crate) connect_timeout_ms: u64,
    /// If this standby becomes the primary (switchover): the latency bound, as for `ftvm run`.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_LATENCY_BOUND_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) latency_bound_ms: u64,
    /// If this standby becomes the primary (switchover): the longest epoch, as for `ftvm run`.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_MAX_EPOCH_MS, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) max_epoch_ms: u64,
    /// This standby's own copy of each of the primary's disks, in the primary's order
    /// (PATH, or PATH,ro for a disk the primary attaches read-only): identical to the
    /// primary's image when the guest starts, the same size and mode. A missing copy, one of
    /// another size or mode, or another number of disks is refused before the guest starts.
    #[arg(long, value_name = "PATH[,ro]")]
    pub(crate) disk: Vec<ftvm_vmm::devices::virtio::block::DiskConfig>,
    /// This standby's own TAP for the guest's network card, exactly when the primary has
    /// one (`--net` on one side only is refused at the handshake), with the primary's MAC:
    /// nothing is sent on it until this standby goes live, which announces the guest there
    /// with a gratuitous ARP.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub(crate) net: Option<ftvm_vmm::devices::virtio::net::NetConfig>,
    /// Once this standby is the primary (it went live, or took over in a switchover),
    /// accept a new standby here (`ftvm standby --join ADDR`), as `ftvm run
    /// --accept-standby` does: the guest is re-protected.
    #[arg(long, value_name = "ADDR")]
    pub(crate) accept_standby: Option<String>,
    #[command(flatten)]
    pub(crate) pair: PairArgs,
}

/// A pair process's control socket, for `switchover` and `promote`.
#[derive(clap::Args)]
pub(crate) struct ControlArgs {
    /// The control address of a primary or standby (its `--control`).
    pub(crate) addr: String,
    #[command(flatten)]
    pub(crate) security: security::SecurityArgs,
}

#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// The log written by `ftvm run --record`.
    pub(crate) log: PathBuf,
    /// The kernel the log was recorded with (default: the built-in test guest).
    #[arg(long)]
    pub(crate) kernel: Option<PathBuf>,
    /// The initrd the log was recorded with.
    #[arg(long, value_name = "FILE")]
    pub(crate) initrd: Option<PathBuf>,
    /// The disks the log was recorded with, in the same order: copies of the images as they
    /// were when the recording started (the replay writes to them as the guest did).
    #[arg(long, value_name = "PATH[,ro]")]
    pub(crate) disk: Vec<ftvm_vmm::devices::virtio::block::DiskConfig>,
    /// Write the replayed guest's serial output to stdout.
    #[arg(long)]
    pub(crate) show_output: bool,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Kernel to boot: a Linux bzImage, or an ELF64 vmlinux (default: the built-in test
    /// guest).
    #[arg(long)]
    pub(crate) kernel: Option<PathBuf>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub(crate) initrd: Option<PathBuf>,
    /// Attach a raw disk image as a virtio-mmio block device (Linux: /dev/vda, then vdb…);
    /// PATH,ro attaches it read-only. Up to four.
    #[arg(long, value_name = "PATH[,ro]")]
    pub(crate) disk: Vec<ftvm_vmm::devices::virtio::block::DiskConfig>,
    /// Kernel command line. Default: "workload=counter ticks=20" for the built-in guest;
    /// for --kernel: "console=ttyS0 noapic nolapic reboot=k panic=-1 nokaslr pci=off
    /// i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc_early_khz=<host TSC kHz>
    /// tsc=reliable clocksource=acpi_pm randomize_kstack_offset=off lpj=<host TSC kHz × 4>"
    /// (docs/ARCHITECTURE.md says why).
    #[arg(long)]
    pub(crate) cmdline: Option<String>,
    /// Words appended to the kernel command line (the default one or --cmdline), e.g.
    /// "quiet" or a guest's own options.
    #[arg(long, value_name = "STR")]
    pub(crate) append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = ftvm_vmm::vm::DEFAULT_MEM_MIB)]
    pub(crate) mem_mib: u64,
    /// Record the replication log into FILE (replay it with `ftvm replay FILE`).
    #[arg(long, value_name = "FILE")]
    pub(crate) record: Option<PathBuf>,
    /// Give the guest a virtio-mmio network card behind the host TAP device NAME (created if
    /// no interface has that name; put it on a bridge to reach the guest). MAC: the guest's
    /// address (default 52:54:00:46:54:01). Received frames are inputs, logged with their
    /// bytes; transmitted frames are output.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub(crate) net: Option<ftvm_vmm::devices::virtio::net::NetConfig>,
    /// When recording, deliver pending interrupts through interrupt-window exits. Only for
    /// hosts where those exits are exact (VMX/SVM); on PVM they make replay diverge.
    #[arg(long)]
    pub(crate) interrupt_windows: bool,
    /// How a recorded or protected run keeps the guest's TSC reads in step: `auto` logs each
    /// one as an exit where this host's KVM has the ftvm-rdtsc-exits module (kmod/), exact
    /// replay — for a protected run only when the standby's host has it too, else both sides
    /// repair; `exits` insists on it (a standby without it is refused); `repair` never uses
    /// it. `ftvm status` says which (`tsc=`).
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) tsc: tsc_mode::TscChoice,
    /// Recorded or protected runs: how long (ms of the vCPU thread's CPU time) a due
    /// interrupt may wait for the guest to exit before the vCPU is kicked, which makes the
    /// epoch checkpoint-required. Raise it where exits are slow (nested KVM). Default: 4.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) latency_bound_ms: Option<u64>,
    /// Recorded or protected runs: the longest an epoch runs (ms of wall time) before it is
    /// cut and digested, where no output or halt cuts it first. Longer epochs mean fewer
    /// digests, and for a guest that diverges often (Linux in repair mode: every interrupt
    /// mixes the TSC into its entropy pool) fewer repairs; the standby trails by up to one
    /// epoch. Default: 10.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) max_epoch_ms: Option<u64>,
    /// Run protected: the standby (`ftvm standby`) listening at ADDR (host:port) replays the
    /// guest in lockstep; output is released only once the standby verified it.
    #[arg(long, value_name = "ADDR", conflicts_with = "record")]
    pub(crate) peer: Option<String>,
    /// How long to keep trying to reach the standby, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "peer")]
    pub(crate) connect_timeout_ms: u64,
    /// With --peer: when the standby cannot be reached or authenticated, run the guest
    /// unprotected (it can take a standby later with --accept-standby) instead of exiting
    /// with an error.
    #[arg(long, requires = "peer")]
    pub(crate) allow_unprotected: bool,
    /// Accept a standby joining the running guest (`ftvm standby --join ADDR`) whenever the
    /// guest is unprotected: started without --peer, or after its standby was lost. The
    /// standby is synced while the guest runs, then protects it.
    #[arg(long, value_name = "ADDR", conflicts_with = "record")]
    pub(crate) accept_standby: Option<String>,
    #[command(flatten)]
    pub(crate) pair: PairArgs,
}

impl RunArgs {
    /// A protected run: the primary of a pair (`--peer`) or one a standby may join
    /// (`--accept-standby`).
    pub(crate) fn paired(&self) -> bool {
        self.peer.is_some() || self.accept_standby.is_some()
    }
}
