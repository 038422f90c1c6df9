//! `ftvm`: lockstep fault-tolerant VM pairs on KVM. See README.md and docs/.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod arbiter_args;

use clap::{Parser, Subcommand};

mod bounds;
mod security;
mod tsc_mode;
use ftvm_primary::{pair, EpochPolicy, Recorder};
use ftvm_replication::log::{LogFileReader, LogFileWriter};
use ftvm_replication::{ChannelOptions, Heartbeat, Position};
use ftvm_secondary::standby::{Rendezvous, StandbyEnd, StandbyUi};
use ftvm_secondary::{ReplayError, Replayer};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::{spawn_reader, LiveError, LiveHook, NetRx};
use ftvm_vmm::output_stream::Demux;
use ftvm_vmm::{RunEnd, RunError, Vm, VmConfig};

mod ops;

/// The command line the built-in guest runs when none is given.
const DEFAULT_CMDLINE: &str = "workload=counter ticks=20";

/// The command line a `--kernel` (Linux) runs with when none is given. What each part is for:
/// `console=ttyS0`: the console is COM1; `noapic nolapic`: no local or I/O APIC (the CPUID
/// table hides the local APIC too), so Linux stays on the 8259 PIC and takes its timer from
/// the 8254 PIT, the userspace interrupt model every exit is logged through; `reboot=k`: a
/// reboot pulses the i8042 reset line, which ends the VM; `panic=-1`: so does a panic;
/// `nokaslr`: KASLR seeds from RDTSC, so the kernel would land elsewhere on each host;
/// `pci=off`: there is no PCI bus (the disks are virtio-mmio, announced through ACPI);
/// `i8042.*`: the keyboard controller exists only for its reset line. ftvm appends
/// `ftvm_vmm::tsc::TscMeasures::linux_words`: `tsc_early_khz=<this host's TSC kHz>
/// tsc=reliable` (no PIT calibration where the TSC is visible) and the words that keep
/// Linux off the TSC (`clocksource=acpi_pm randomize_kstack_offset=off lpj=`).
const LINUX_CMDLINE: &str = "console=ttyS0 noapic nolapic reboot=k panic=-1 nokaslr pci=off \
                             i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The recorder's default latency bound (`--latency-bound-ms`).
const DEFAULT_LATENCY_BOUND_MS: u64 = ftvm_primary::DEFAULT_LATENCY_BOUND.as_millis() as u64;

/// Exit status for errors of ftvm itself (the guest's own status is passed through otherwise).
const STATUS_ERROR: u8 = 1;
/// `ftvm replay`: the log is unusable (damaged, wrong version, another kernel).
const STATUS_BAD_LOG: u8 = 2;
/// `ftvm standby`: the primary abandoned this standby (it dropped it and runs on), so this
/// copy of the guest stopped and never went live (DESIGN.md §5). Above the built-in guest's
/// own statuses (0–4).
const STATUS_ABANDONED: u8 = 10;

#[derive(Parser)]
#[command(
    name = "ftvm",
    version,
    about = "Lockstep fault-tolerant VM pairs on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
struct BenchArgs {
    /// Answer benchmark connections on this address (host:port) until killed.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Measure against the responder at this address.
    #[arg(long, value_name = "ADDR")]
    peer: Option<String>,
    /// Round trips per latency figure.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    samples: u64,
    /// Seconds each throughput figure is measured.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Records in a large batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    records: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    security: security::SecurityArgs,
}

#[derive(clap::Args)]
struct WitnessArgs {
    /// Address to answer on (host:port).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The state file (created if missing; kept across restarts).
    #[arg(long, value_name = "FILE")]
    state: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (requests by outcome, VMs, terms).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

#[derive(clap::Args)]
struct PairArgs {
    /// Heartbeat interval in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_ms: u64,
    /// A peer silent this long (milliseconds) is lost. Default: three heartbeat intervals.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_timeout_ms: Option<u64>,
    /// Answer `ftvm status` on this address (host:port).
    #[arg(long, value_name = "ADDR")]
    control: Option<String>,
    #[command(flatten)]
    arbiter: arbiter_args::ArbiterArgs,
    #[command(flatten)]
    security: security::SecurityArgs,
    #[command(flatten)]
    bounds: bounds::BoundsArgs,
    #[command(flatten)]
    telemetry: ops::TelemetryArgs,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("rendezvous").required(true).args(["listen", "join"])))]
struct StandbyArgs {
    /// Address to wait for the primary on (host:port): a primary started with `--peer`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Join a primary that is already running: its `--accept-standby` address. The guest's
    /// memory is synced while it runs (a progress bar shows on a terminal), then the
    /// standby follows in lockstep.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// With --join: how long to keep trying to reach the primary, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "join")]
    connect_timeout_ms: u64,
    /// If this standby becomes the primary (switchover): the latency bound, as for `ftvm run`.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_LATENCY_BOUND_MS, value_parser = clap::value_parser!(u64).range(1..))]
    latency_bound_ms: u64,
    /// This standby's own copy of each of the primary's disks, in the primary's order
    /// (PATH, or PATH,ro for a disk the primary attaches read-only): identical to the
    /// primary's image when the guest starts, the same size and mode. A missing copy, one of
    /// another size or mode, or another number of disks is refused before the guest starts.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<ftvm_vmm::devices::virtio::block::DiskConfig>,
    /// This standby's own TAP for the guest's network card, exactly when the primary has
    /// one (`--net` on one side only is refused at the handshake), with the primary's MAC:
    /// nothing is sent on it until this standby goes live, which announces the guest there
    /// with a gratuitous ARP.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Option<ftvm_vmm::devices::virtio::net::NetConfig>,
    /// Once this standby is the primary (it went live, or took over in a switchover),
    /// accept a new standby here (`ftvm standby --join ADDR`), as `ftvm run
    /// --accept-standby` does: the guest is re-protected.
    #[arg(long, value_name = "ADDR")]
    accept_standby: Option<String>,
    #[command(flatten)]
    pair: PairArgs,
}

/// A pair process's control socket, for `switchover` and `promote`.
#[derive(clap::Args)]
struct ControlArgs {
    /// The control address of a primary or standby (its `--control`).
    addr: String,
    #[command(flatten)]
    security: security::SecurityArgs,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The log written by `ftvm run --record`.
    log: PathBuf,
    /// The kernel the log was recorded with (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initrd the log was recorded with.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// The disks the log was recorded with, in the same order: copies of the images as they
    /// were when the recording started (the replay writes to them as the guest did).
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<ftvm_vmm::devices::virtio::block::DiskConfig>,
    /// Write the replayed guest's serial output to stdout.
    #[arg(long)]
    show_output: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel to boot: a Linux bzImage, or an ELF64 vmlinux (default: the built-in test
    /// guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Attach a raw disk image as a virtio-mmio block device (Linux: /dev/vda, then vdb…);
    /// PATH,ro attaches it read-only. Up to four.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<ftvm_vmm::devices::virtio::block::DiskConfig>,
    /// Kernel command line. Default: "workload=counter ticks=20" for the built-in guest;
    /// for --kernel: "console=ttyS0 noapic nolapic reboot=k panic=-1 nokaslr pci=off
    /// i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc_early_khz=<host TSC kHz>
    /// tsc=reliable clocksource=acpi_pm randomize_kstack_offset=off lpj=<host TSC kHz × 4>"
    /// (docs/ARCHITECTURE.md says why).
    #[arg(long)]
    cmdline: Option<String>,
    /// Words appended to the kernel command line (the default one or --cmdline), e.g.
    /// "quiet" or a guest's own options.
    #[arg(long, value_name = "STR")]
    append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = ftvm_vmm::vm::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Record the replication log into FILE (replay it with `ftvm replay FILE`).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Give the guest a virtio-mmio network card behind the host TAP device NAME (created if
    /// no interface has that name; put it on a bridge to reach the guest). MAC: the guest's
    /// address (default 52:54:00:46:54:01). Received frames are inputs, logged with their
    /// bytes; transmitted frames are output.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Option<ftvm_vmm::devices::virtio::net::NetConfig>,
    /// When recording, deliver pending interrupts through interrupt-window exits. Only for
    /// hosts where those exits are exact (VMX/SVM); on PVM they make replay diverge.
    #[arg(long)]
    interrupt_windows: bool,
    /// How a recorded or protected run keeps the guest's TSC reads in step: `auto` logs each
    /// one as an exit where this host's KVM has the ftvm-rdtsc-exits module (kmod/), exact
    /// replay — for a protected run only when the standby's host has it too, else both sides
    /// repair; `exits` insists on it (a standby without it is refused); `repair` never uses
    /// it. `ftvm status` says which (`tsc=`).
    #[arg(long, value_enum, default_value = "auto")]
    tsc: tsc_mode::TscChoice,
    /// Recorded or protected runs: how long (ms of the vCPU thread's CPU time) a due
    /// interrupt may wait for the guest to exit before the vCPU is kicked, which makes the
    /// epoch checkpoint-required. Raise it where exits are slow (nested KVM). Default: 4.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    latency_bound_ms: Option<u64>,
    /// Run protected: the standby (`ftvm standby`) listening at ADDR (host:port) replays the
    /// guest in lockstep; output is released only once the standby verified it.
    #[arg(long, value_name = "ADDR", conflicts_with = "record")]
    peer: Option<String>,
    /// How long to keep trying to reach the standby, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000, requires = "peer")]
    connect_timeout_ms: u64,
    /// With --peer: when the standby cannot be reached or authenticated, run the guest
    /// unprotected (it can take a standby later with --accept-standby) instead of exiting
    /// with an error.
    #[arg(long, requires = "peer")]
    allow_unprotected: bool,
    /// Accept a standby joining the running guest (`ftvm standby --join ADDR`) whenever the
    /// guest is unprotected: started without --peer, or after its standby was lost. The
    /// standby is synced while the guest runs, then protects it.
    #[arg(long, value_name = "ADDR", conflicts_with = "record")]
    accept_standby: Option<String>,
    #[command(flatten)]
    pair: PairArgs,
}

/// A failure of ftvm, reported as one line.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot read kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: {source}")]
    KernelImage {
        path: String,
        #[source]
        source: ftvm_vmm::Error,
    },
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Replay(ReplayError),
    #[error("cannot create log {path}: {source}")]
    CreateLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recording to {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: ftvm_primary::RecordError,
    },
    #[error("{0}")]
    BadLog(String),
    #[error("standby {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: ftvm_replication::ChannelError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Standby(#[from] ftvm_secondary::standby::StandbyError),
    #[error(transparent)]
    Status(#[from] ftvm_replication::status::QueryError),
    #[error("cannot share the control socket: {0}")]
    Control(#[source] std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("bench: {0}")]
    Bench(#[from] ftvm_replication::bench::BenchError),
    #[error(transparent)]
    Telemetry(#[from] ops::TelemetryError),
    #[error(transparent)]
    Tap(#[from] ftvm_vmm::tap::TapError),
}

impl From<RunError<LiveError>> for CliError {
    fn from(e: RunError<LiveError>) -> Self {
        match e {
            RunError::Vm(e) => e.into(),
            RunError::Hook(e) => e.into(),
        }
    }
}

impl CliError {
    fn status(&self) -> u8 {
        match self {
            CliError::BadLog(_) => STATUS_BAD_LOG,
            CliError::Standby(ftvm_secondary::standby::StandbyError::Abandoned(_)) => {
                STATUS_ABANDONED
            }
            CliError::Standby(ftvm_secondary::standby::StandbyError::Fenced(_)) => {
                ftvm_replication::arbiter::STATUS_FENCED
            }
            _ => STATUS_ERROR,
        }
    }
}

fn read_kernel(path: &Option<PathBuf>) -> Result<(Vec<u8>, String), CliError> {
    Ok(match path {
        Some(path) => (
            std::fs::read(path).map_err(|source| CliError::Kernel {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (
            ftvm_guest::KERNEL.to_vec(),
            "the built-in guest".to_string(),
        ),
    })
}

fn read_initrd(path: &Option<PathBuf>) -> Result<Option<Vec<u8>>, CliError> {
    path.as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| CliError::Initrd {
                path: path.clone(),
                source,
            })
        })
        .transpose()
}

fn stop_status(stop: StopRequest) -> u8 {
    match stop {
        StopRequest::Exit(status) => status,
        StopRequest::Reset => {
            tracing::info!("guest reset through the i8042: powering off");
            0
        }
    }
}

fn boot(args: &RunArgs) -> Result<(VmConfig, Vm), CliError> {
    let tsc = ftvm_vmm::tsc::TscMeasures::from_env()?;
    let (kernel, kernel_name) = read_kernel(&args.kernel)?;
    let cmdline = match (&args.cmdline, &args.kernel) {
        (Some(c), _) => c.clone(),
        (None, None) => DEFAULT_CMDLINE.to_string(),
        (None, Some(_)) => format!(
            "{LINUX_CMDLINE} {}",
            tsc.linux_words(ftvm_vmm::vm::host_tsc_khz()?)
        ),
    };
    let cmdline = match &args.append {
        Some(extra) => format!("{cmdline} {extra}"),
        None => cmdline,
    };
    let config = VmConfig {
        mem_mib: args.mem_mib,
        kernel,
        initrd: read_initrd(&args.initrd)?,
        disks: args.disk.clone(),
        cmdline,
        cpuid: tsc.cpuid_table()?,
        net: args.net.as_ref().map(|n| n.mac),
    };
    let vm = Vm::new(&config).map_err(|e| match e {
        ftvm_vmm::Error::Boot(_) => CliError::KernelImage {
            path: kernel_name,
            source: e,
        },
        e => CliError::Vm(e),
    })?;
    Ok((config, vm))
}

fn channel_options(args: &PairArgs) -> Result<ChannelOptions, CliError> {
    let interval = Duration::from_millis(args.heartbeat_ms);
    let timeout = args
        .heartbeat_timeout_ms
        .map_or(interval * 3, Duration::from_millis);
    if timeout <= interval {
        return Err(CliError::Usage(format!(
            "--heartbeat-timeout-ms ({} ms) must be longer than the heartbeat interval ({} ms)",
            timeout.as_millis(),
            interval.as_millis()
        )));
    }
    let control = match &args.control {
        Some(addr) => Some(listen(addr)?),
        None => None,
    };
    let security = args.security.security().map_err(CliError::Usage)?;
    Ok(ChannelOptions {
        security,
        bounds: args.bounds.bounds(),
        heartbeat: Heartbeat { interval, timeout },
        control,
        witness: args.arbiter.config().map_err(CliError::Usage)?,
        primary_after_go_live: false,
        telemetry: ops::start(&args.telemetry)?,
        tsc_exits: false,
    })
}

fn listen(addr: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr).map_err(|source| CliError::Listen {
        addr: addr.into(),
        source,
    })
}

fn run(args: RunArgs) -> Result<u8, CliError> {
    let paired = args.peer.is_some() || args.accept_standby.is_some();
    if args.latency_bound_ms.is_some() && args.record.is_none() && !paired {
        return Err(CliError::Usage(
            "--latency-bound-ms applies only to a recorded or protected run (--record, --peer or --accept-standby)"
                .into(),
        ));
    }
    if args.tsc == tsc_mode::TscChoice::Exits && args.record.is_none() && !paired {
        return Err(CliError::Usage(
            "--tsc exits applies only to a recorded or protected run (--record, --peer or --accept-standby)"
                .into(),
        ));
    }
    let latency_bound =
        Duration::from_millis(args.latency_bound_ms.unwrap_or(DEFAULT_LATENCY_BOUND_MS));
    if args.interrupt_windows && args.record.is_none() && !paired {
        return Err(CliError::Usage(
            "--interrupt-windows applies only to a recorded or protected run (--record, --peer or --accept-standby)"
                .into(),
        ));
    }
    if args.pair.control.is_some() && !paired {
        return Err(CliError::Usage(
            "--control needs --peer or --accept-standby".into(),
        ));
    }
    let t = &args.pair.telemetry;
    if (t.metrics.is_some() || t.events.is_some()) && !paired {
        return Err(CliError::Usage(
            "--metrics and --events need --peer or --accept-standby".into(),
        ));
    }
    // The TAP first: a name that cannot be opened is refused before the guest boots.
    let tap = args
        .net
        .as_ref()
        .map(|n| ftvm_vmm::tap::Tap::open(&n.tap))
        .transpose()?;
    let (config, mut vm) = boot(&args)?;
    let policy = EpochPolicy {
        interrupt_windows: args.interrupt_windows,
        latency_bound,
        ..EpochPolicy::default()
    };
    if paired {
        let options = channel_options(&args.pair)?;
        if let Some(w) = &options.witness {
            // A new protected VM: its own id at the witness, term 0.
            w.set_pair_term(ftvm_replication::witness::PairTerm {
                vm_id: ftvm_replication::witness::new_vm_id(),
                term: 0,
            });
        }
        let accept = match &args.accept_standby {
            Some(addr) => Some(listen(addr)?),
            None => None,
        };
        let mut header = ftvm_replication::log::build_header(
            &config,
            vm.cpuid(),
            &vm.machine().disks(),
            policy.interrupt_windows,
        );
        let tsc = tsc_mode::offer(args.tsc)?;
        // Without a standby yet (or none reachable): this host's mode; a standby that joins
        // later must have it too.
        header.tsc_exits = tsc != pair::TscOffer::No;
        let timeout = Duration::from_millis(args.connect_timeout_ms);
        let link = match &args.peer {
            None => Err("no standby yet: waiting for one to join".to_string()),
            Some(peer) => {
                match pair::connect_standby(
                    peer,
                    timeout,
                    &mut header,
                    &config.kernel,
                    config.initrd.as_deref(),
                    &config.disks,
                    &options,
                    tsc,
                ) {
                    Ok(link) => Ok(link),
                    Err(source) if !args.allow_unprotected => {
                        return Err(CliError::Connect {
                            peer: peer.clone(),
                            source,
                        })
                    }
                    Err(e) => {
                        let why = format!("no standby: {e}");
                        tracing::error!("{why}: running unprotected (--allow-unprotected)");
                        Err(why)
                    }
                }
            }
        };
        tsc_mode::install(header.tsc_exits, &vm)?;
        let roles = Roles {
            header,
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            options,
            input: Some(spawn_reader(std::io::stdin())),
            accept,
            latency_bound,
            net: attach_net(tap, config.net)?,
        };
        let first = Role::Primary {
            vm,
            link,
            at: pair::StartAt::default(),
        };
        return roles.run(first);
    }
    let mut live = LiveHook::new(Some(spawn_reader(std::io::stdin())), std::io::stdout());
    if let Some(tap) = tap {
        live = live
            .with_net(tap)
            .map_err(|e| CliError::Usage(format!("cannot start the TAP reader thread: {e}")))?;
    }
    let Some(path) = args.record else {
        let mut hook = live;
        return match vm.run(&mut hook)? {
            RunEnd::Stopped(stop) => Ok(stop_status(stop)),
            RunEnd::Paused(_) => Ok(0),
        };
    };
    let tsc = tsc_mode::for_run(args.tsc, &vm)?;
    let mut header = ftvm_replication::log::build_header(
        &config,
        vm.cpuid(),
        &vm.machine().disks(),
        policy.interrupt_windows,
    );
    header.tsc_exits = tsc == ftvm_vmm::tsc_exits::TscMode::Exits;
    let sink = LogFileWriter::create(&path, header).map_err(|source| CliError::CreateLog {
        path: path.clone(),
        source,
    })?;
    let mut recorder = Recorder::new(live, sink, policy);
    let stop = ftvm_primary::record(&mut vm, &mut recorder).map_err(|source| match source {
        ftvm_primary::RecordError::Vm(e) => CliError::Vm(e),
        ftvm_primary::RecordError::Live(e) => CliError::Live(e),
        source => CliError::Record { path, source },
    })?;
    let stats = recorder.stats();
    tracing::info!(
        epochs = stats.epochs,
        checkpoint_required = stats.checkpoint_required,
        records = stats.records,
        bytes = recorder.into_sink().bytes(),
        "recording complete"
    );
    match stop {
        ftvm_primary::RecordEnd::Stopped(stop) => Ok(stop_status(stop)),
        // Only a pair channel asks for switchovers.
        ftvm_primary::RecordEnd::Switchover => Ok(0),
    }
}

/// What a pair process keeps across role changes (`ftvm switchover` swaps primary and
/// standby on the same connection; each process may change roles several times).
struct Roles {
    header: ftvm_proto::log::LogHeader,
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    options: ChannelOptions,
    input: Option<crossbeam_channel::Receiver<Vec<u8>>>,
    accept: Option<TcpListener>,
    /// The recorder's latency bound whenever this process is the primary.
    latency_bound: Duration,
    /// The guest's network card's host side (`--net`): the TAP, and the frames its reader
    /// thread receives.
    net: Option<(ftvm_vmm::tap::Tap, NetRx)>,
}

/// The role a pair process plays now.
enum Role {
    /// Recording from `at`, shipping to `link`.
    Primary {
        vm: Vm,
        link: Result<ftvm_replication::Link, String>,
        at: pair::StartAt,
    },
    /// Following the primary on `link` from `at` (the end of the last epoch both verified).
    Standby {
        vm: Vm,
        link: ftvm_replication::Link,
        at: Position,
    },
}

impl Roles {
    /// Where released guest output goes: stdout, and for a VM with a network card the
    /// frames to the TAP (the output is then the two-kind stream).
    fn out(&self) -> Result<Box<dyn std::io::Write + Send>, CliError> {
        Ok(match &self.net {
            None => Box::new(std::io::stdout()),
            Some((tap, _)) => Box::new(Demux::new(
                std::io::stdout(),
                tap.try_clone()
                    .map_err(|e| CliError::Usage(format!("TAP {}: {e}", tap.name())))?,
            )),
        })
    }

    fn net_rx(&self) -> Option<NetRx> {
        self.net.as_ref().map(|(_, rx)| rx.clone())
    }

    /// Plays `role`, then whatever role a switchover gives this process, until the guest
    /// ends. Returns the guest's exit status.
    fn run(mut self, mut role: Role) -> Result<u8, CliError> {
        loop {
            role = match role {
                Role::Primary { mut vm, link, at } => {
                    let policy = EpochPolicy {
                        interrupt_windows: self.header.interrupt_windows,
                        latency_bound: self.latency_bound,
                        ..EpochPolicy::default()
                    };
                    let options = self.options.try_clone().map_err(CliError::Control)?;
                    let end = pair::run_primary(
                        &mut vm,
                        policy,
                        link,
                        options,
                        pair::start_message(
                            self.header.clone(),
                            &self.kernel,
                            self.initrd.as_deref(),
                            true,
                        ),
                        self.accept.take(),
                        at,
                        self.input.clone(),
                        self.net_rx(),
                        self.out()?,
                    )
                    .map_err(|source| match source {
                        ftvm_primary::RecordError::Vm(e) => CliError::Vm(e),
                        ftvm_primary::RecordError::Live(e) => CliError::Live(e),
                        source => CliError::Record {
                            path: PathBuf::from("the pair channel"),
                            source,
                        },
                    })?;
                    match end {
                        pair::PrimaryEnd::Stopped(stop, report) => {
                            tracing::info!(
                                epochs = report.epochs,
                                verified = report.verified_epoch,
                                repairs = report.repairs,
                                syncs = report.syncs,
                                protected_to_end = report.protected_to_end,
                                "protected run complete"
                            );
                            return Ok(stop_status(stop));
                        }
                        pair::PrimaryEnd::HandedOver(h, _) => Role::Standby {
                            vm,
                            link: h.link,
                            at: h.at,
                        },
                    }
                }
                Role::Standby { vm, link, at } => {
                    let options = self.options.try_clone().map_err(CliError::Control)?;
                    let end = ftvm_secondary::standby::follow(
                        vm,
                        self.header.clone(),
                        self.kernel.clone(),
                        self.initrd.clone(),
                        link,
                        options,
                        at,
                        self.input.clone(),
                        self.net_rx(),
                        self.out()?,
                    )?;
                    match self.standby_ended(end) {
                        Ok(status) => return Ok(status),
                        Err(role) => *role,
                    }
                }
            };
        }
    }

    /// The guest's status when the standby's run is over, or the primary role it took over.
    fn standby_ended(&mut self, end: StandbyEnd) -> Result<u8, Box<Role>> {
        match end {
            StandbyEnd::Completed(stop) | StandbyEnd::WentLive(stop) => Ok(stop_status(stop)),
            StandbyEnd::TookOver(t) => {
                let t = *t;
                self.header = t.header;
                self.kernel = t.kernel;
                self.initrd = t.initrd;
                let at = pair::StartAt {
                    after: t.at,
                    clock_ns: t.vm.clock_ns(),
                };
                Err(Box::new(Role::Primary {
                    vm: t.vm,
                    link: t.link,
                    at,
                }))
            }
        }
    }
}

fn switchover(args: ControlArgs) -> Result<u8, CliError> {
    let key = args.security.security().map_err(CliError::Usage)?;
    let answer = ftvm_replication::status::ask(&args.addr, "switchover", &key)?;
    if let Some(why) = answer.strip_prefix("error: ") {
        return Err(CliError::Usage(format!(
            "{}: switchover refused: {}",
            args.addr,
            why.trim()
        )));
    }
    // The old primary's control socket answers for its new role once the swap is done. While
    // the roles change hands the socket may go unanswered or reset a connection for a moment:
    // that is asked again, within the same 30 s.
    let start = std::time::Instant::now();
    loop {
        let status = ftvm_replication::status::query(&args.addr, &key);
        if let Ok(s) = &status {
            if s.lines().any(|l| l == "role=standby") {
                println!("switched over: {} is now the standby", args.addr);
                return Ok(0);
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            let status = status?;
            return Err(CliError::Usage(format!(
                "{}: the switchover did not complete within 30 s:\n{status}",
                args.addr
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn witness(args: WitnessArgs) -> Result<u8, CliError> {
    let mut terms = ftvm_replication::witness::server::Terms::load(&args.state)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let listener = listen(&args.listen)?;
    let metrics = ops::start_witness(args.metrics.as_deref())?;
    tracing::info!(addr = args.listen, state = %args.state.display(), "witness ready");
    ftvm_replication::witness::server::serve(&listener, &mut terms, metrics.as_deref());
    Ok(0)
}

fn promote(args: ControlArgs) -> Result<u8, CliError> {
    let key = args.security.security().map_err(CliError::Usage)?;
    let answer = ftvm_replication::status::ask(&args.addr, "promote", &key)?;
    if let Some(why) = answer.strip_prefix("error: ") {
        return Err(CliError::Usage(format!(
            "{}: promote refused: {}",
            args.addr,
            why.trim()
        )));
    }
    print!("{answer}");
    Ok(0)
}

/// The host side of a pair process's network card: the TAP and a reader thread on it.
fn attach_net(
    tap: Option<ftvm_vmm::tap::Tap>,
    mac: Option<ftvm_vmm::devices::virtio::net::MacAddr>,
) -> Result<Option<(ftvm_vmm::tap::Tap, NetRx)>, CliError> {
    let (Some(tap), Some(mac)) = (tap, mac) else {
        return Ok(None);
    };
    let rx = tap.spawn_reader().map_err(|e| {
        CliError::Usage(format!(
            "TAP {}: cannot start its reader thread: {e}",
            tap.name()
        ))
    })?;
    Ok(Some((tap, NetRx { mac, rx })))
}

fn standby(args: StandbyArgs) -> Result<u8, CliError> {
    // The TAP first: a name that cannot be opened is refused before meeting the primary.
    let tap = args
        .net
        .as_ref()
        .map(|n| ftvm_vmm::tap::Tap::open(&n.tap))
        .transpose()?;
    let mut options = channel_options(&args.pair)?;
    let accept = args.accept_standby.as_deref().map(listen).transpose()?;
    options.primary_after_go_live = accept.is_some();
    let listener = match &args.listen {
        Some(addr) => {
            let l = listen(addr)?;
            tracing::info!(addr, "waiting for a primary");
            Some(l)
        }
        None => None,
    };
    let rendezvous = match (&listener, args.join) {
        (Some(l), _) => Rendezvous::Listen(l),
        (None, Some(addr)) => Rendezvous::Join {
            addr,
            timeout: Duration::from_millis(args.connect_timeout_ms),
        },
        (None, None) => return Err(CliError::Usage("--listen or --join is required".into())),
    };
    let ui = StandbyUi {
        progress: std::io::stderr().is_terminal(),
    };
    let input = Some(spawn_reader(std::io::stdin()));
    let mut roles = Roles {
        header: Default::default(),
        kernel: Vec::new(),
        initrd: None,
        options: options.try_clone().map_err(CliError::Control)?,
        input: input.clone(),
        accept,
        latency_bound: Duration::from_millis(args.latency_bound_ms),
        net: attach_net(tap, args.net.as_ref().map(|n| n.mac))?,
    };
    let end = ftvm_secondary::standby::run_standby(
        rendezvous,
        args.disk,
        options,
        ui,
        input,
        roles.net_rx(),
        roles.out()?,
    )?;
    match roles.standby_ended(end) {
        Ok(status) => Ok(status),
        Err(role) => roles.run(*role),
    }
}

fn status(args: ops::StatusArgs) -> Result<u8, CliError> {
    let key = args.security.security().map_err(CliError::Usage)?;
    print!("{}", ops::status(&args, &key)?);
    Ok(0)
}

fn replay(args: ReplayArgs) -> Result<u8, CliError> {
    let (reader, header) = LogFileReader::open(&args.log)
        .map_err(|e| CliError::BadLog(format!("{}: {e}", args.log.display())))?;
    let (kernel, kernel_name) = read_kernel(&args.kernel)?;
    let config = ftvm_replication::log::config_from_header(
        &header,
        kernel,
        &kernel_name,
        read_initrd(&args.initrd)?,
        args.disk.clone(),
    )
    .map_err(|e| CliError::BadLog(format!("{}: {e}", args.log.display())))?;
    let mut vm = Vm::new(&config)?;
    ftvm_replication::log::check_disks(&header, &vm.machine().disks())
        .map_err(|e| CliError::BadLog(format!("{}: {e}", args.log.display())))?;
    tsc_mode::for_replay(header.tsc_exits, &vm)?;
    let output: Box<dyn std::io::Write> = if args.show_output {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::sink())
    };
    let mut replayer = Replayer::new(reader, &header, output);
    let report =
        ftvm_secondary::replay(&mut vm, &mut replayer, &mut |_| {}).map_err(|e| match e {
            ReplayError::Log(e) => CliError::BadLog(format!("{}: {e}", args.log.display())),
            ReplayError::Vm(e) => CliError::Vm(e),
            e @ ReplayError::Output(_) => CliError::Replay(e),
        })?;
    if report.log_ended.is_some() {
        let e = replayer.log_ended_error();
        return Err(CliError::BadLog(format!("{}: {e}", args.log.display())));
    }
    if let Some(d) = &report.divergence {
        eprintln!("{d}");
    }
    eprintln!(
        "epochs={} verified={} diverged={} checkpoint_required={}",
        report.epochs, report.verified, report.diverged, report.checkpoint_required
    );
    Ok(u8::from(
        report.diverged > 0 || report.checkpoint_required > 0,
    ))
}

/// `ftvm bench`.
fn bench(args: BenchArgs) -> Result<u8, CliError> {
    let key = args.security.security().map_err(CliError::Usage)?;
    if let Some(addr) = args.listen {
        let listener = std::net::TcpListener::bind(&addr).map_err(|source| CliError::Listen {
            addr: addr.clone(),
            source,
        })?;
        eprintln!("ftvm bench: answering on {addr}");
        ftvm_replication::bench::serve(listener, key)
            .map_err(|source| CliError::Listen { addr, source })?;
        return Ok(0);
    }
    let peer = args.peer.unwrap_or_default();
    if !(args.seconds.is_finite() && (0.1..=600.0).contains(&args.seconds)) {
        return Err(CliError::Usage(
            "--seconds must be between 0.1 and 600".into(),
        ));
    }
    let options = ftvm_replication::bench::BenchOptions {
        samples: args.samples as usize,
        large_records: args.records as usize,
        duration: std::time::Duration::from_secs_f64(args.seconds),
    };
    let report = ftvm_replication::bench::run(&peer, options, &key)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(0)
}

/// Keeps the large buffers of the channel (frames of up to 64 MiB, 1 MiB chunks of pages and
/// disk blocks) in glibc's heap: by default an allocation past 128 KiB is a fresh mmap,
/// whose pages fault in (and are zeroed by the kernel) every time, which measured as a fifth
/// of a disk resync's CPU time.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called first thing, on one thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> ExitCode {
    tune_malloc();
    tracing_subscriber::fmt()
        .with_env_filter(
            // FTVM_LOG, else RUST_LOG, else INFO: lifecycle events show by default.
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Replay(args) => replay(args),
        Command::Standby(args) => standby(args),
        Command::Status(args) => status(args),
        Command::Switchover(args) => switchover(args),
        Command::Bench(args) => bench(args),
        Command::Promote(args) => promote(args),
        Command::Witness(args) => witness(args),
        Command::Keygen(args) => security::keygen(&args).map_err(CliError::Usage),
        Command::TscProbe(args) => tsc_mode::print_probe(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        // Not an error of ftvm's: the pair's rules stopped this standby.
        Err(
            e @ CliError::Standby(
                ftvm_secondary::standby::StandbyError::Abandoned(_)
                | ftvm_secondary::standby::StandbyError::Fenced(_),
            ),
        ) => {
            eprintln!("ftvm: {e}");
            ExitCode::from(e.status())
        }
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            ExitCode::from(e.status())
        }
    }
}
