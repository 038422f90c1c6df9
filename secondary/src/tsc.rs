//! The standby's side of the pair's TSC mode (DESIGN.md §2): a primary that runs its guest
//! with TSC-read exits says so in its log header, and the standby's VM must take them too
//! (else its exits would not be the log's).

use ftvm_proto::log::LogHeader;
use ftvm_vmm::tsc_exits::{this_host, Probe};
use ftvm_vmm::vm::Vm;

use crate::standby::StandbyError;

/// Installs the TSC-read filter on `vm` when `header` says the guest runs with TSC-read
/// exits; refuses the guest when this host has none (a standby that joins a primary whose
/// host has them, where the standby's has not: the primary cannot change its guest's mode).
pub(crate) fn exits_as_header(vm: &Vm, header: &LogHeader) -> Result<(), StandbyError> {
    if !header.tsc_exits {
        return Ok(());
    }
    match this_host() {
        Probe::Present => {
            vm.enable_tsc_exits()?;
            tracing::info!("TSC reads are exits: replayed exactly from the log");
            Ok(())
        }
        Probe::Absent(why) => Err(StandbyError::Tsc(format!(
            "the primary's guest runs with TSC-read exits (exact replay), which this host's \
             KVM lacks (kmod/README.md: {why}); start that primary with --tsc repair to \
             protect it here"
        ))),
    }
}
