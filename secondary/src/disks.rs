//! The standby's own copies of the guest's disks (DESIGN.md §4 "Disks"): no shared storage,
//! so `ftvm standby --disk PATH` names one copy per disk of the primary, in the primary's
//! order. They are checked against the log header (count, size, mode) before the VM is
//! built, so a wrong copy is refused with one clear error on both sides and no guest starts;
//! then the disk resync (`resync.rs`) makes their contents the primary's.

use std::collections::BTreeSet;

use ftvm_proto::channel::{BlockHash, DiskBlock as ProtoDiskBlock};
use ftvm_proto::log::LogHeader;
use ftvm_vmm::devices::virtio::block::{DiskBlock, DiskConfig, DiskImage, SECTOR_SIZE};
use ftvm_vmm::digest::block_hash;
use ftvm_vmm::Vm;

fn size(sectors: u64) -> String {
    let bytes = sectors * SECTOR_SIZE;
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

/// Checks this standby's disk copies against the disks the primary's guest has (`header`):
/// the same number, each present, of the same size and attached in the same mode. Err: why
/// not, in one line, for both this standby's stderr and the primary's.
pub fn check_copies(header: &LogHeader, copies: &[DiskConfig]) -> Result<(), String> {
    let theirs = header.config.as_ref().map_or(&[][..], |c| &c.disks[..]);
    if theirs.len() != copies.len() {
        return Err(format!(
            "the primary's guest has {} disk(s), this standby was given {} (ftvm standby --disk PATH, one copy of each primary disk, in the same order)",
            theirs.len(),
            copies.len()
        ));
    }
    for (i, (spec, copy)) in theirs.iter().zip(copies).enumerate() {
        let image = DiskImage::open(copy)
            .map_err(|e| format!("disk {i}: this standby's copy cannot be attached: {e}"))?;
        let info = image.info();
        if info.sectors != spec.sectors {
            return Err(format!(
                "disk {i}: the primary's disk is {}, this standby's copy {} is {}: a copy must be the same size",
                size(spec.sectors),
                copy.path.display(),
                size(info.sectors)
            ));
        }
        if info.read_only != spec.read_only {
            return Err(format!(
                "disk {i}: the primary attaches its disk {}, this standby's copy {} is attached {} (--disk {}{})",
                mode(spec.read_only),
                copy.path.display(),
                mode(info.read_only),
                copy.path.display(),
                if spec.read_only { ",ro" } else { "" }
            ));
        }
    }
    Ok(())
}

/// `blocks` of this VM's disks with their hashes: what a repair request lists.
pub fn block_hashes(vm: &Vm, blocks: &[DiskBlock]) -> Result<Vec<BlockHash>, ftvm_vmm::Error> {
    let mut scratch = Vec::new();
    blocks
        .iter()
        .map(|&b| {
            Ok(BlockHash {
                disk: b.disk,
                block: b.block,
                hash: block_hash(vm, b, &mut scratch)?.to_vec(),
            })
        })
        .collect()
}

/// Writes the disk blocks of a repair into this standby's copies; returns the blocks the
/// checkpoint covers (those written and `standby_blocks`), sorted.
pub fn write_blocks(
    vm: &Vm,
    blocks: &[ProtoDiskBlock],
    standby_blocks: &[DiskBlock],
) -> Result<Vec<DiskBlock>, ftvm_vmm::Error> {
    let mut covered: BTreeSet<DiskBlock> = standby_blocks.iter().copied().collect();
    for b in blocks {
        let block = DiskBlock {
            disk: b.disk,
            block: b.block,
        };
        vm.write_disk_block(block, &b.data)?;
        covered.insert(block);
    }
    Ok(covered.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::log::{DiskSpec, VmConfig};

    fn header(disks: &[(u64, bool)]) -> LogHeader {
        LogHeader {
            config: Some(VmConfig {
                disks: disks
                    .iter()
                    .map(|&(sectors, read_only)| DiskSpec { sectors, read_only })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn copies_must_match_count_size_and_mode() {
        let dir = std::env::temp_dir().join(format!("ftvm-copies-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let rw = [DiskConfig {
            path: img.clone(),
            read_only: false,
        }];
        assert_eq!(check_copies(&header(&[(2048, false)]), &rw), Ok(()));
        let e = check_copies(&header(&[(4096, false)]), &rw).unwrap_err();
        assert!(
            e.contains("the primary's disk is 2 MiB") && e.contains("is 1 MiB"),
            "{e}"
        );
        let e = check_copies(&header(&[(2048, true)]), &rw).unwrap_err();
        assert!(e.contains("read-only") && e.contains(",ro"), "{e}");
        let e = check_copies(&header(&[(2048, false)]), &[]).unwrap_err();
        assert!(e.contains("has 1 disk(s), this standby was given 0"), "{e}");
        let missing = DiskConfig {
            path: dir.join("missing.img"),
            read_only: false,
        };
        let e = check_copies(&header(&[(2048, false)]), &[missing]).unwrap_err();
        assert!(
            e.contains("missing.img") && e.contains("cannot be attached"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
