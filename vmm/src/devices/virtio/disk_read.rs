//! Disk reads as the replication log names them (DESIGN.md §2, "device writes into guest
//! memory"): each host of a pair reads its own copy of every disk, so the data of a read is
//! not logged; the read is, as (disk, sector, length, BLAKE3 of the bytes). The block device
//! hashes what it read from its image into guest memory and queues a [`DiskRead`] in the
//! machine's [`DiskReadLog`]; the exit loop hands the queue to the exit hook at the end of
//! the access that caused it (the guest's `QueueNotify` write). The recorder logs each one;
//! the replayer compares its own with the log, so a standby whose copy differs is caught at
//! the read rather than at the next digest.
//!
//! Hashing costs CPU (BLAKE3, about a GiB per second per core), so the device hashes only
//! while the log is enabled: the exit loop enables it when the hook asks
//! ([`crate::exit::ExitHook::logs_disk_reads`]); an unprotected run never hashes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One read request the block device served from its image: the data reached guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRead {
    /// The disk (0 = the first `--disk`).
    pub disk: u32,
    /// The first sector read (512 bytes each).
    pub sector: u64,
    /// Bytes read.
    pub length: u32,
    /// BLAKE3 of the bytes read, in request order.
    pub hash: [u8; 32],
}

impl DiskRead {
    /// The [`super::disk::DISK_BLOCK_SIZE`] blocks the read touched (none for an empty read).
    pub fn blocks(&self) -> std::ops::Range<u64> {
        if self.length == 0 {
            return 0..0;
        }
        let start = self.sector.saturating_mul(super::disk::SECTOR_SIZE);
        let last = start.saturating_add(u64::from(self.length) - 1);
        start / super::disk::DISK_BLOCK_SIZE..last / super::disk::DISK_BLOCK_SIZE + 1
    }
}

impl std::fmt::Display for DiskRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short: String = self.hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "disk {} read of {} bytes at sector {} (hash {short})",
            self.disk, self.length, self.sector
        )
    }
}

#[derive(Debug, Default)]
struct Inner {
    enabled: AtomicBool,
    reads: Mutex<Vec<DiskRead>>,
}

/// The reads every block device of a machine served since the exit loop last took them.
/// Cloning shares the queue.
#[derive(Debug, Clone, Default)]
pub struct DiskReadLog(Arc<Inner>);

impl DiskReadLog {
    /// Whether the devices hash and queue their reads.
    pub fn enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    /// Starts or stops hashing and queueing reads.
    pub fn set_enabled(&self, on: bool) {
        self.0.enabled.store(on, Ordering::Relaxed);
    }

    /// Queues a read.
    pub fn push(&self, read: DiskRead) {
        self.lock().push(read);
    }

    /// The reads queued since the last call, in the order the devices served them.
    pub fn take(&self) -> Vec<DiskRead> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DiskRead>> {
        // A queue of plain values stays usable if a holder panicked.
        self.0.reads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_a_read() {
        let r = |sector, length| DiskRead {
            disk: 0,
            sector,
            length,
            hash: [0; 32],
        };
        assert_eq!(r(0, 512).blocks(), 0..1);
        assert_eq!(r(127, 1024).blocks(), 0..2, "across the first boundary");
        assert_eq!(r(128, 65536).blocks(), 1..2);
        assert_eq!(r(5, 0).blocks(), 0..0);
        assert_eq!(r(u64::MAX, u32::MAX).blocks().start, u64::MAX / (64 << 10));
    }

    #[test]
    fn the_log_is_shared_and_taken() {
        let log = DiskReadLog::default();
        assert!(!log.enabled());
        let other = log.clone();
        other.set_enabled(true);
        assert!(log.enabled());
        other.push(DiskRead {
            disk: 1,
            sector: 8,
            length: 4096,
            hash: [7; 32],
        });
        assert_eq!(log.take().len(), 1);
        assert!(log.take().is_empty());
    }
}
