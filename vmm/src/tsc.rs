//! What keeps a Linux guest off the TSC (DESIGN.md §2 "RDTSC / RDTSCP"). Linux reads the
//! time-stamp counter without an exit, so every read differs between the primary and its
//! standby and the pages it lands in need a repair. The measures, each off by default where
//! TSC reads run natively and turned on with `FTVM_TSC_MEASURES=cpuid,cmdline` (measured in
//! the nested harness, they raised the repairs instead of lowering them: DESIGN.md §2). Where
//! TSC reads are exits ([`crate::tsc_exits`], exact mode) they are all on unless
//! `FTVM_TSC_MEASURES` names others ([`TscMeasures::for_run`]): every read is then an exit,
//! and a Linux that sees the TSC reads it constantly (its clocksource and `sched_clock`).
//!
//! - **cpuid**: the CPUID table hides TSC, RDTSCP, RDPID, invariant TSC and MWAITX
//!   ([`crate::cpuid::TscCpuid`]): Linux then keeps no TSC clocksource, its `sched_clock`
//!   counts jiffies and its delay loop counts loops.
//! - **cmdline**: words on the default Linux command line (`linux_words`):
//!   `clocksource=acpi_pm` (the ACPI PM timer, [`crate::devices::pm_timer`], reads the
//!   virtual clock through an exit; named so Linux takes it even where the TSC is visible),
//!   `randomize_kstack_offset=off` (each system call would otherwise mix RDTSC into its
//!   kernel stack offset, so stacks, and the pages they are in, differ), and `lpj=` (loops
//!   per jiffy from the host's TSC rate at Debian's HZ=250: without it Linux calibrates its
//!   delay loop against jiffies, a measurement that differs between hosts and is slow
//!   where exits are).
//!
//! The ACPI PM timer itself is always declared. `cargo bench --bench linux -- repairs` shows
//! what each measure does to the repairs.

use crate::cpuid::{CpuidTable, TscCpuid};
use crate::Error;

/// The environment variable that turns measures on (a comma-separated list).
pub const MEASURES_ENV: &str = "FTVM_TSC_MEASURES";

/// Which measures are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscMeasures {
    /// The CPUID table hides the TSC.
    pub cpuid: bool,
    /// The default Linux command line carries the words that keep Linux off the TSC.
    pub cmdline: bool,
}

/// Off unless asked for: measured in the nested harness, the measures raised the repairs
/// (DESIGN.md §2).
impl Default for TscMeasures {
    fn default() -> Self {
        Self {
            cpuid: false,
            cmdline: false,
        }
    }
}

impl TscMeasures {
    /// Those `on` names on (`cpuid`, `cmdline`, comma-separated; `all`: both; `none` or
    /// empty: none).
    pub fn parse_on(on: &str) -> Result<Self, Error> {
        let mut m = Self::default();
        for word in on.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "cpuid" => m.cpuid = true,
                "cmdline" => m.cmdline = true,
                "all" => {
                    m.cpuid = true;
                    m.cmdline = true;
                }
                "none" => {}
                other => {
                    return Err(Error::TscMeasures(format!(
                        "{MEASURES_ENV}: unknown measure {other:?} (cpuid, cmdline, all, none)"
                    )))
                }
            }
        }
        Ok(m)
    }

    /// The measures `FTVM_TSC_MEASURES` turns on.
    pub fn from_env() -> Result<Self, Error> {
        Self::parse_on(&std::env::var(MEASURES_ENV).unwrap_or_default())
    }

    /// Every measure on.
    pub fn all() -> Self {
        Self {
            cpuid: true,
            cmdline: true,
        }
    }

    /// The one place a new guest's measures are decided: what `FTVM_TSC_MEASURES` names
    /// where it is set (`none` included); otherwise all of them when the guest's TSC reads
    /// are exits (`exits`: a Linux that sees the TSC reads it on every clock read, each an
    /// exit, while with it hidden only the RNG's per-interrupt sample and a few boot-time
    /// reads are left), none where they run natively (measured: hiding raised the repairs).
    /// The CPUID table and the command line this gives travel in the log header, so a
    /// replayer or standby builds the same guest.
    pub fn for_run(exits: bool) -> Result<Self, Error> {
        Self::decide(std::env::var(MEASURES_ENV).ok().as_deref(), exits)
    }

    /// [`Self::for_run`] with `FTVM_TSC_MEASURES` as `env`.
    fn decide(env: Option<&str>, exits: bool) -> Result<Self, Error> {
        match env {
            Some(on) if !on.trim().is_empty() => Self::parse_on(on),
            _ if exits => Ok(Self::all()),
            _ => Ok(Self::default()),
        }
    }

    /// The CPUID table a new VM gets: None for the default (derived by the VM, TSC hidden),
    /// or this host's table with the TSC visible.
    pub fn cpuid_table(&self) -> Result<Option<CpuidTable>, Error> {
        if self.cpuid {
            return Ok(None);
        }
        let kvm = crate::vm::open_kvm()?;
        CpuidTable::from_supported_with(&kvm, TscCpuid::Visible)
            .map(Some)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))
    }

    /// The words ftvm appends to the default Linux command line on a host whose TSC counts
    /// at `tsc_khz`. Always `tsc_early_khz=… tsc=reliable`, for a guest that sees the TSC
    /// (PIT calibration needs a thousand exits in 10 ms, too many where exits are slow);
    /// then the measures.
    pub fn linux_words(&self, tsc_khz: u32) -> String {
        let mut words = format!("tsc_early_khz={tsc_khz} tsc=reliable");
        if self.cmdline {
            let lpj = u64::from(tsc_khz) * 1000 / 250;
            words.push_str(&format!(
                " clocksource=acpi_pm randomize_kstack_offset=off lpj={lpj}"
            ));
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_are_off_unless_named_on() {
        assert_eq!(TscMeasures::parse_on("").unwrap(), TscMeasures::default());
        assert!(!TscMeasures::default().cpuid && !TscMeasures::default().cmdline);
        let m = TscMeasures::parse_on("cpuid").unwrap();
        assert!(m.cpuid && !m.cmdline);
        let m = TscMeasures::parse_on(" cmdline , cpuid").unwrap();
        assert!(m.cpuid && m.cmdline);
        assert_eq!(TscMeasures::all(), m);
        // Unset (or empty): all where TSC reads are exits, none where they run natively;
        // set: what it names, in either mode.
        assert_eq!(TscMeasures::decide(None, true).unwrap(), m);
        assert_eq!(TscMeasures::decide(Some(" "), true).unwrap(), m);
        assert_eq!(
            TscMeasures::decide(None, false).unwrap(),
            TscMeasures::default()
        );
        assert_eq!(
            TscMeasures::decide(Some("none"), true).unwrap(),
            TscMeasures::default()
        );
        assert_eq!(TscMeasures::decide(Some("all"), false).unwrap(), m);
        assert_eq!(TscMeasures::parse_on("all").unwrap(), m);
        assert!(TscMeasures::parse_on("tsc").is_err());
        assert_eq!(
            m.linux_words(2_000_000),
            "tsc_early_khz=2000000 tsc=reliable clocksource=acpi_pm randomize_kstack_offset=off lpj=8000000"
        );
        assert_eq!(
            TscMeasures::default().linux_words(1000),
            "tsc_early_khz=1000 tsc=reliable"
        );
    }
}
