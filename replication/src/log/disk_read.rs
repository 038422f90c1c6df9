//! A disk read as the log's `DiskRead` record (DESIGN.md §2): the recorder writes one for
//! each read its block devices served, the replayer checks its own read against it.

use ftvm_proto::log;
use ftvm_vmm::devices::virtio::block::DiskRead;

/// The `DiskRead` record of `read`.
pub fn to_disk_read(read: &DiskRead) -> log::DiskRead {
    log::DiskRead {
        disk: read.disk,
        sector: read.sector,
        length: read.length,
        hash: read.hash.to_vec(),
    }
}

fn short(hash: &[u8]) -> String {
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Checks the read the replay made against the one the log names. Err: what differs, in
/// words for a divergence report: another request (disk, sector or length), or the same
/// request whose data differs, which means this host's copy of the disk differs from the
/// primary's there.
pub fn check_disk_read(logged: &log::DiskRead, replayed: &DiskRead) -> Result<(), String> {
    if (logged.disk, logged.sector, logged.length)
        != (replayed.disk, replayed.sector, replayed.length)
    {
        return Err(format!(
            "disk read mismatch: the log has disk {} read of {} bytes at sector {}, the replay \
             read {} bytes at sector {} of disk {}",
            logged.disk,
            logged.length,
            logged.sector,
            replayed.length,
            replayed.sector,
            replayed.disk
        ));
    }
    if logged.hash.as_slice() != replayed.hash.as_slice() {
        return Err(format!(
            "disk {} read of {} bytes at sector {} returned other data than the primary's \
             (hash {} here, {} in the log): this copy of disk {} differs from the primary's",
            replayed.disk,
            replayed.length,
            replayed.sector,
            short(&replayed.hash),
            short(&logged.hash),
            replayed.disk
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_checks_against_its_record() {
        let read = DiskRead {
            disk: 1,
            sector: 2048,
            length: 4096,
            hash: [0xab; 32],
        };
        let logged = to_disk_read(&read);
        assert_eq!(check_disk_read(&logged, &read), Ok(()));
        let other_data = DiskRead {
            hash: [0xcd; 32],
            ..read
        };
        let why = check_disk_read(&logged, &other_data).unwrap_err();
        assert!(
            why.contains("disk 1 read of 4096 bytes at sector 2048"),
            "{why}"
        );
        assert!(why.contains("differs from the primary's"), "{why}");
        let elsewhere = DiskRead { sector: 8, ..read };
        let why = check_disk_read(&logged, &elsewhere).unwrap_err();
        assert!(why.contains("at sector 8 of disk 1"), "{why}");
    }
}
