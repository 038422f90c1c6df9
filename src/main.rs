//! `ftvm`: lockstep fault-tolerant VM pairs on KVM. See README.md and docs/.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::{spawn_reader, LiveHook};
use ftvm_vmm::{RunEnd, Vm, VmConfig};

/// The command line the built-in guest runs when none is given.
const DEFAULT_CMDLINE: &str = "workload=counter ticks=20";

/// Exit status for errors of ftvm itself (the guest's own status is passed through otherwise).
const STATUS_ERROR: u8 = 1;

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
}

fn run(args: RunArgs) -> Result<u8, CliError> {
    let (kernel, kernel_name) = match &args.kernel {
        Some(path) => (
            std::fs::read(path).map_err(|source| CliError::Kernel {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (ftvm_guest::KERNEL.to_vec(), "(built-in)".to_string()),
    };
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
    let mut hook = LiveHook::new(Some(spawn_reader(std::io::stdin())), std::io::stdout());
    match vm.run(&mut hook)? {
        RunEnd::Stopped(StopRequest::Exit(status)) => Ok(status),
        RunEnd::Stopped(StopRequest::Reset) => {
            tracing::info!("guest reset through the i8042: powering off");
            Ok(0)
        }
        RunEnd::Paused(_) => Ok(0),
    }
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
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            ExitCode::from(STATUS_ERROR)
        }
    }
}
