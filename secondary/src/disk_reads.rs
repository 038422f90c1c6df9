//! The replayer's check of disk reads (DESIGN.md §2): the log names each read the primary's
//! block devices served (disk, sector, length, BLAKE3 of the data); the replayed devices read
//! this host's own copy, and the two must agree. A read whose data differs means this copy
//! of the disk differs from the primary's there: the replay diverges at that exit, and the
//! blocks the read touched join the blocks this side reports since the last verified
//! boundary, so the repair compares them by hash and sends the primary's (DESIGN.md §4
//! "Disks").

use std::io::Write;

use ftvm_proto::log::record::Kind;
use ftvm_replication::log::check_disk_read;
use ftvm_vmm::devices::virtio::block::{DiskBlock, DiskRead};
use ftvm_vmm::exit::ExitSeq;

use crate::describe::describe;
use crate::{LogSource, Replayer};

impl<S: LogSource, W: Write> Replayer<S, W> {
    /// Checks the reads the replayed devices served at exit `seq` against the log.
    pub(crate) fn check_disk_reads(&mut self, seq: ExitSeq, reads: &[DiskRead]) {
        for read in reads {
            if self.diverged.is_some() {
                return;
            }
            let why = match self.front_at(seq.0, false).map(|r| &r.kind) {
                Some(Some(Kind::DiskRead(logged))) => {
                    let checked = check_disk_read(logged, read);
                    self.queue.pop_front();
                    checked
                }
                _ => {
                    let next = self.queue.front().map_or("nothing".into(), describe);
                    Err(format!(
                        "the replay did a {read} where the log has {next} (a disk read the \
                         primary did not do)"
                    ))
                }
            };
            if let Err(why) = why {
                self.note_read_blocks(read);
                self.diverge(seq.0, why);
            }
        }
    }

    /// The blocks `read` touched (all within this copy: the read succeeded) join the blocks
    /// a repair must cover.
    fn note_read_blocks(&mut self, read: &DiskRead) {
        self.unverified_blocks
            .extend(read.blocks().map(|block| DiskBlock {
                disk: read.disk,
                block,
            }));
    }
}
