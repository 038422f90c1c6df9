//! Installing a checkpoint on the standby (DESIGN.md §4): its pages and disk blocks are
//! written, its state restored, and its digest checked over what it covers.

use std::collections::BTreeSet;

use ftvm_proto::channel::{CheckpointEnd, DiskBlock as ProtoDiskBlock, Page};
use ftvm_vmm::devices::virtio::block::DiskBlock;
use ftvm_vmm::digest::state_digest;
use ftvm_vmm::{Vm, VmState};

/// Writes `pages` and disk `blocks`, restores the state of `end` and checks the checkpoint
/// digest over the pages and blocks it covers: those sent (while the primary was stopped)
/// plus `standby_dirty` pages and blocks (for a sync: the stop-and-copy pages, already
/// written).
pub(crate) fn install(
    vm: &mut Vm,
    (pages, blocks): (&[Page], &[ProtoDiskBlock]),
    end: &CheckpointEnd,
    (standby_dirty, standby_blocks): (&[u64], &[DiskBlock]),
) -> Result<(), String> {
    let state: VmState = ftvm_vmm::state::decode(&end.vm_state)
        .map_err(|e| format!("checkpoint {}: {e}", end.checkpoint))?;
    for p in pages {
        vm.write_page(p.pfn, &p.data)
            .map_err(|e| format!("checkpoint {}: {e}", end.checkpoint))?;
    }
    let covered_blocks = crate::disks::write_blocks(vm, blocks, standby_blocks)
        .map_err(|e| format!("checkpoint {}: {e}", end.checkpoint))?;
    vm.restore(&state).map_err(|e| {
        format!(
            "checkpoint {}: cannot restore the state: {e}",
            end.checkpoint
        )
    })?;
    let covered: BTreeSet<u64> = standby_dirty
        .iter()
        .copied()
        .chain(pages.iter().map(|p| p.pfn))
        .collect();
    let covered: Vec<u64> = covered.into_iter().collect();
    let digest = state_digest(vm, &covered, &covered_blocks).map_err(|e| e.to_string())?;
    if digest.as_slice() != end.digest.as_slice() {
        return Err(format!(
            "checkpoint {} installed but its digest does not match ({} pages, {} disk blocks covered; {})",
            end.checkpoint,
            covered.len(),
            covered_blocks.len(),
            mismatch_detail(vm, &state)
        ));
    }
    // The checkpoint is the new boundary: dirty tracking restarts from it, and KVM's
    // mappings of guest memory too, as the primary's do here (DESIGN.md §2, "Dirty sets").
    vm.take_dirty_pages().map_err(|e| e.to_string())?;
    vm.take_dirty_blocks();
    vm.drop_guest_mappings().map_err(|e| e.to_string())?;
    Ok(())
}

/// What differs after a checkpoint whose digest did not match: the state read back from
/// the VM against the state the checkpoint carried (a restore KVM did not take as given),
/// or else the pages or disk blocks.
fn mismatch_detail(vm: &Vm, sent: &VmState) -> String {
    use ftvm_vmm::state::encode;
    let mut differ = Vec::new();
    match vm.registers() {
        Ok((regs, sregs)) => {
            if encode(&regs) != encode(&sent.vcpu.regs) {
                differ.push("registers");
            }
            if sregs.interrupt_bitmap != sent.vcpu.sregs.interrupt_bitmap {
                differ.push("pending interrupt bitmap");
            } else if encode(&sregs) != encode(&sent.vcpu.sregs) {
                differ.push("special registers");
            }
        }
        Err(_) => differ.push("registers (unreadable)"),
    }
    if vm.machine().save().ok().as_ref() != Some(&sent.devices) {
        differ.push("device state");
    }
    if differ.is_empty() {
        "the state read back is the checkpoint's: pages or disk blocks differ".into()
    } else {
        format!(
            "read back, the {} differ from the checkpoint's",
            differ.join(", ")
        )
    }
}
