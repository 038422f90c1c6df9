//! `ftvm`: lockstep fault-tolerant VM pairs on KVM. See README.md and docs/.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod arbiter_args;
mod args;
mod roles;

use args::{
    BenchArgs, Cli, Command, ControlArgs, PairArgs, ReplayArgs, RunArgs, StandbyArgs, WitnessArgs,
};
use clap::Parser;
use roles::{attach_net, Role, Roles};

mod bounds;
mod security;
mod tsc_mode;
use ftvm_primary::{pair, EpochPolicy, Recorder};
use ftvm_replication::log::{LogFileReader, LogFileWriter};
use ftvm_replication::{ChannelOptions, Heartbeat};
use ftvm_secondary::standby::{Rendezvous, StandbyUi};
use ftvm_secondary::{ReplayError, Replayer};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::{spawn_reader, LiveError, LiveHook};
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
pub(crate) const DEFAULT_LATENCY_BOUND_MS: u64 =
    ftvm_primary::DEFAULT_LATENCY_BOUND.as_millis() as u64;

/// The recorder's default longest epoch (`--max-epoch-ms`).
pub(crate) const DEFAULT_MAX_EPOCH_MS: u64 = ftvm_primary::DEFAULT_MAX_EPOCH.as_millis() as u64;

/// Exit status for errors of ftvm itself (the guest's own status is passed through otherwise).
const STATUS_ERROR: u8 = 1;
/// `ftvm replay`: the log is unusable (damaged, wrong version, another kernel).
const STATUS_BAD_LOG: u8 = 2;
/// `ftvm standby`: the primary abandoned this standby (it dropped it and runs on), so this
/// copy of the guest stopped and never went live (DESIGN.md §5). Above the built-in guest's
/// own statuses (0–4).
const STATUS_ABANDONED: u8 = 10;

/// A failure of ftvm, reported as one line.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot read kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw boot randomness for the guest from /dev/urandom: {0}")]
    Seed(std::io::Error),
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

/// Builds the guest `args` describe, for a run whose TSC reads are exits where `tsc_exits`
/// (the measures that keep Linux off the TSC follow from it: `TscMeasures::for_run`).
/// A protected run's guest has all its RAM in the host before it runs, as on the standby:
/// KVM then counts a page's first access alike on both (DESIGN.md §2, "Dirty sets"). That
/// happens here, before any handshake: once a standby is connected, nothing may keep this
/// process from its heartbeats (populating took seconds under the nested harness, and a
/// standby went live on the silence).
fn boot(args: &RunArgs, tsc_exits: bool) -> Result<(VmConfig, Vm), CliError> {
    let tsc = ftvm_vmm::tsc::TscMeasures::for_run(tsc_exits)?;
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
        // A Linux guest's RNG is ready at boot (no entropy spin, which under a pair costs a
        // kick, and so a checkpoint, per timer tick); the built-in guest takes none.
        rng_seed: match &args.kernel {
            Some(_) => ftvm_vmm::boot::new_rng_seed().map_err(CliError::Seed)?,
            None => Vec::new(),
        },
        // The CMOS clock starts at this host's time (a host clock before 1970 gives 1970).
        rtc_base_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let vm = Vm::new(&config).map_err(|e| match e {
        ftvm_vmm::Error::Boot(_) => CliError::KernelImage {
            path: kernel_name,
            source: e,
        },
        e => CliError::Vm(e),
    })?;
    if args.paired() {
        vm.populate_memory()?;
    }
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
    let paired = args.paired();
    // Options of the recorder: refused where nothing is recorded.
    if args.record.is_none() && !paired {
        let recorder_options = [
            (args.latency_bound_ms.is_some(), "--latency-bound-ms"),
            (args.tsc == tsc_mode::TscChoice::Exits, "--tsc exits"),
            (args.max_epoch_ms.is_some(), "--max-epoch-ms"),
            (args.interrupt_windows, "--interrupt-windows"),
        ];
        if let Some((_, option)) = recorder_options.iter().find(|(given, _)| *given) {
            return Err(CliError::Usage(format!(
                "{option} applies only to a recorded or protected run (--record, --peer or --accept-standby)"
            )));
        }
    }
    let latency_bound =
        Duration::from_millis(args.latency_bound_ms.unwrap_or(DEFAULT_LATENCY_BOUND_MS));
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
    // The TSC mode this host would run the guest in (a pair settles it in the handshake):
    // the guest is built for it.
    let offer = if args.record.is_some() || paired {
        tsc_mode::offer(args.tsc)?
    } else {
        pair::TscOffer::No
    };
    let (mut config, mut vm) = boot(&args, offer != pair::TscOffer::No)?;
    let defaults = EpochPolicy::default();
    let policy = EpochPolicy {
        interrupt_windows: args.interrupt_windows,
        latency_bound,
        max_epoch: args
            .max_epoch_ms
            .map_or(defaults.max_epoch, Duration::from_millis),
        stream_interval: if paired {
            ftvm_primary::pair_stream_interval(latency_bound)
        } else {
            defaults.stream_interval
        },
        ..defaults
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
        // Without a standby yet (or none reachable): this host's mode; a standby that joins
        // later must have it too.
        header.tsc_exits = offer != pair::TscOffer::No;
        let timeout = Duration::from_millis(args.connect_timeout_ms);
        let link = match &args.peer {
            None => Err("no standby yet: waiting for one to join".to_string()),
            Some(peer) => {
                let joined = match pair::handshake_standby(peer, timeout, &options, offer) {
                    Ok(standby) => {
                        if standby.tsc_exits != header.tsc_exits {
                            // The standby's host settled the other mode: the guest is built
                            // again for it (its CPUID table and command line), before it runs.
                            drop(vm);
                            (config, vm) = boot(&args, standby.tsc_exits)?;
                            header = ftvm_replication::log::build_header(
                                &config,
                                vm.cpuid(),
                                &vm.machine().disks(),
                                policy.interrupt_windows,
                            );
                        }
                        standby.offer(
                            &mut header,
                            &config.kernel,
                            config.initrd.as_deref(),
                            &config.disks,
                            &options,
                        )
                    }
                    Err(e) => Err(e),
                };
                match joined {
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
            max_epoch: policy.max_epoch,
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
    let tsc = tsc_mode::install(offer != pair::TscOffer::No, &vm)?;
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
        tsc_reads = stats.tsc_reads,
        net_rx_frames = stats.net_rx_frames,
        net_rx_bytes = stats.net_rx_bytes,
        net_tx_frames = stats.net_tx_frames,
        net_tx_bytes = stats.net_tx_bytes,
        guest_ms = vm.clock_ns() / 1_000_000,
        bytes = recorder.into_sink().bytes(),
        "recording complete"
    );
    match stop {
        ftvm_primary::RecordEnd::Stopped(stop) => Ok(stop_status(stop)),
        // Only a pair channel asks for switchovers.
        ftvm_primary::RecordEnd::Switchover => Ok(0),
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
        max_epoch: Duration::from_millis(args.max_epoch_ms),
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
