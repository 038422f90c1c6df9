//! Which TSC mode a run uses (DESIGN.md §2, kmod/README.md): `--tsc` on `ftvm run`, the log
//! header on `ftvm replay`, and `ftvm tsc-probe`.

use ftvm_primary::pair::TscOffer;
use ftvm_vmm::tsc_exits::{this_host, Probe, TscMode};
use ftvm_vmm::vm::Vm;

use crate::CliError;

/// `ftvm run --tsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TscChoice {
    /// Recorded and protected runs take TSC-read exits where this host has them (the
    /// ftvm-rdtsc-exits module) — a protected run only when the standby's host has them
    /// too; every other run repairs.
    Auto,
    /// Recorded and protected runs must take TSC-read exits: an error where this host, or a
    /// standby's host, lacks them.
    Exits,
    /// Never TSC-read exits.
    Repair,
}

/// The TSC mode this host offers a recorded run (`ftvm run --record`: exits unless
/// [`TscOffer::No`]) or a protected run's standby (`ftvm run --peer|--accept-standby`: the
/// mode is settled once the standby's host is known). The guest is built for it (its CPUID
/// table and command line, `ftvm_vmm::tsc::TscMeasures::for_run`), and [`install`] follows.
pub(crate) fn offer(choice: TscChoice) -> Result<TscOffer, CliError> {
    if choice == TscChoice::Repair {
        return Ok(TscOffer::No);
    }
    match this_host() {
        Probe::Present => Ok(match choice {
            TscChoice::Exits => TscOffer::Required,
            _ => TscOffer::Offered,
        }),
        Probe::Absent(why) if choice == TscChoice::Exits => Err(CliError::Usage(format!(
            "--tsc exits: this host's KVM has no TSC-read exits (kmod/README.md): {why}"
        ))),
        Probe::Absent(why) => {
            tracing::debug!(%why, "no TSC-read exits on this host: repair");
            Ok(TscOffer::No)
        }
    }
}

/// Installs the TSC-read filter on `vm` when `exits` (a mode this host was found to have).
pub(crate) fn install(exits: bool, vm: &Vm) -> Result<TscMode, CliError> {
    if !exits {
        return Ok(TscMode::Repair);
    }
    vm.enable_tsc_exits()?;
    tracing::info!("TSC reads are exits: logged and replayed exactly");
    Ok(TscMode::Exits)
}

/// A replay of a log recorded with TSC-read exits takes them too (else its exits would not
/// be the log's): the filter on `vm`, or an error where this host lacks the module.
pub(crate) fn for_replay(tsc_exits: bool, vm: &Vm) -> Result<TscMode, CliError> {
    if !tsc_exits {
        return Ok(TscMode::Repair);
    }
    match this_host() {
        Probe::Present => install(true, vm),
        Probe::Absent(why) => Err(CliError::Usage(format!(
            "the log was recorded with TSC-read exits, which this host's KVM lacks \
             (kmod/README.md): {why}"
        ))),
    }
}

/// `ftvm tsc-probe`.
#[derive(clap::Args)]
pub(crate) struct TscProbeArgs {
    /// Also measure, where the module is present, what a TSC-read exit costs next to a
    /// port-I/O exit: N of each in one throwaway VM.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    measure: Option<u16>,
}

/// `ftvm tsc-probe`: prints `tsc-exits: present` or `tsc-exits: absent: why`; with
/// `--measure N` (module present) then `n=… tsc_exit_ns=… pio_exit_ns=… ratio=…`.
pub(crate) fn print_probe(args: &TscProbeArgs) -> Result<u8, CliError> {
    let found = this_host().clone();
    println!("tsc-exits: {found}");
    if let (Some(n), Probe::Present) = (args.measure, &found) {
        let c = ftvm_vmm::tsc_exits::measure(n)?;
        println!(
            "n={} tsc_exit_ns={} pio_exit_ns={} ratio={:.2}",
            c.n,
            c.tsc_exit.as_nanos(),
            c.pio_exit.as_nanos(),
            c.tsc_exit.as_secs_f64() / c.pio_exit.as_secs_f64().max(1e-12)
        );
    }
    Ok(0)
}
