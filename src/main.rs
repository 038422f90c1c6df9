//! `ftvm`: lockstep fault-tolerant VM pairs on KVM. See README.md and docs/.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ftvm_primary::log_file::LogFileWriter;
use ftvm_primary::{EpochPolicy, Recorder};
use ftvm_secondary::log_file::LogFileReader;
use ftvm_secondary::{ReplayError, Replayer};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::{spawn_reader, LiveHook};
use ftvm_vmm::{RunEnd, Vm, VmConfig};

/// The command line the built-in guest runs when none is given.
const DEFAULT_CMDLINE: &str = "workload=counter ticks=20";

/// Exit status for errors of ftvm itself (the guest's own status is passed through otherwise).
const STATUS_ERROR: u8 = 1;
/// `ftvm replay`: the log is unusable (damaged, wrong version, another kernel).
const STATUS_BAD_LOG: u8 = 2;

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
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The log written by `ftvm run --record`.
    log: PathBuf,
    /// The kernel the log was recorded with (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Write the replayed guest's serial output to stdout.
    #[arg(long)]
    show_output: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// ELF64 kernel to boot (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = ftvm_vmm::vm::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Record the replication log into FILE (replay it with `ftvm replay FILE`).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// When recording, deliver pending interrupts through interrupt-window exits. Only for
    /// hosts where those exits are exact (VMX/SVM); on PVM they make replay diverge.
    #[arg(long, requires = "record")]
    interrupt_windows: bool,
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
    #[error("kernel {path}: {source}")]
    KernelImage {
        path: String,
        #[source]
        source: ftvm_vmm::Error,
    },
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
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
}

impl CliError {
    fn status(&self) -> u8 {
        match self {
            CliError::BadLog(_) => STATUS_BAD_LOG,
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

fn stop_status(stop: StopRequest) -> u8 {
    match stop {
        StopRequest::Exit(status) => status,
        StopRequest::Reset => {
            tracing::info!("guest reset through the i8042: powering off");
            0
        }
    }
}

fn run(args: RunArgs) -> Result<u8, CliError> {
    let (kernel, kernel_name) = read_kernel(&args.kernel)?;
    let config = VmConfig {
        mem_mib: args.mem_mib,
        kernel,
        cmdline: args.cmdline,
        cpuid: None,
    };
    let mut vm = Vm::new(&config).map_err(|e| match e {
        ftvm_vmm::Error::Boot(_) => CliError::KernelImage {
            path: kernel_name,
            source: e,
        },
        e => CliError::Vm(e),
    })?;
    let live = LiveHook::new(Some(spawn_reader(std::io::stdin())), std::io::stdout());
    let Some(path) = args.record else {
        let mut hook = live;
        return match vm.run(&mut hook)? {
            RunEnd::Stopped(stop) => Ok(stop_status(stop)),
            RunEnd::Paused(_) => Ok(0),
        };
    };
    let policy = EpochPolicy {
        interrupt_windows: args.interrupt_windows,
        ..EpochPolicy::default()
    };
    let header = ftvm_primary::header(&config, vm.cpuid(), &policy);
    let sink = LogFileWriter::create(&path, header).map_err(|source| CliError::CreateLog {
        path: path.clone(),
        source,
    })?;
    let mut recorder = Recorder::new(live, sink, policy);
    let stop = ftvm_primary::record(&mut vm, &mut recorder).map_err(|source| match source {
        ftvm_primary::RecordError::Vm(e) => CliError::Vm(e),
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
    Ok(stop_status(stop))
}

fn replay(args: ReplayArgs) -> Result<u8, CliError> {
    let (reader, header) = LogFileReader::open(&args.log)
        .map_err(|e| CliError::BadLog(format!("{}: {e}", args.log.display())))?;
    let (kernel, kernel_name) = read_kernel(&args.kernel)?;
    let config = ftvm_secondary::config_from_header(&header, kernel, &kernel_name)
        .map_err(|e| CliError::BadLog(format!("{}: {e}", args.log.display())))?;
    let mut vm = Vm::new(&config)?;
    let output: Box<dyn std::io::Write> = if args.show_output {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::sink())
    };
    let mut replayer = Replayer::new(reader, &header, output);
    let report = ftvm_secondary::replay(&mut vm, &mut replayer).map_err(|e| match e {
        ReplayError::Log(e) => CliError::BadLog(format!("{}: {e}", args.log.display())),
        ReplayError::Vm(e) => CliError::Vm(e),
    })?;
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Replay(args) => replay(args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            ExitCode::from(e.status())
        }
    }
}
