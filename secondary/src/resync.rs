//! The disk resync before protection (DESIGN.md §4 "Disks"), the standby's side: between the
//! primary's `Start` and this standby's `Ready`, the standby sends the BLAKE3 hash of each
//! 64 KiB block of its copies, a run at a time, and writes the blocks the primary answers
//! with (those that differ). A [`ResyncRecord`] keeps the hashes across reconnects (a
//! `--join` standby whose connection dropped): updated for every block received, it is
//! what lets the next attempt resume where the last stopped, since blocks already received
//! now match and are not sent again, and the copies need not be read a second time.

use std::collections::VecDeque;

use ftvm_proto::channel::{message::Body, DiskHashes, Message};
use ftvm_proto::log::LogHeader;
use ftvm_replication::disk_resync::{HASHES_PER_REQUEST, HASH_LEN};
use ftvm_replication::link::{self, body_name, Handshaken};
use ftvm_replication::ChannelError;
use ftvm_vmm::devices::virtio::block::{DiskBlock, DISK_BLOCK_SIZE, SECTOR_SIZE};
use ftvm_vmm::digest::{block_hash, hash};
use ftvm_vmm::Vm;

use crate::standby::{StandbyError, StandbyUi};

/// Runs of hashes sent ahead of their answers (each run asks for at most 4 MiB of blocks,
/// so the primary's answers waiting in the socket stay bounded).
const RUNS_IN_FLIGHT: usize = 2;

/// The hashes of this standby's copies as they are now, kept across reconnects.
#[derive(Debug, Default)]
pub struct ResyncRecord {
    /// Per disk, the hash of each block read so far (from block 0 on).
    hashes: Vec<Vec<[u8; HASH_LEN]>>,
    /// Blocks received over all attempts, and their bytes.
    received: u64,
    received_bytes: u64,
}

impl ResyncRecord {
    /// Blocks written into the copies since the record was made (a sync's stop-and-copy):
    /// their hashes are read again.
    pub fn refresh(&mut self, vm: &Vm, blocks: &[DiskBlock]) -> Result<(), StandbyError> {
        let mut scratch = Vec::new();
        for &b in blocks {
            if let Some(h) = self
                .hashes
                .get_mut(b.disk as usize)
                .and_then(|d| d.get_mut(b.block as usize))
            {
                *h = block_hash(vm, b, &mut scratch)?;
            }
        }
        Ok(())
    }
}

/// The number of blocks of each disk `header` describes, and whether it is read-only.
fn disks(header: &LogHeader) -> Vec<(u64, bool)> {
    header.config.as_ref().map_or_else(Vec::new, |c| {
        c.disks
            .iter()
            .map(|d| {
                (
                    d.sectors
                        .saturating_mul(SECTOR_SIZE)
                        .div_ceil(DISK_BLOCK_SIZE),
                    d.read_only,
                )
            })
            .collect()
    })
}

fn progress_bar(ui: StandbyUi, total: u64) -> indicatif::ProgressBar {
    let bar = if ui.progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "disk resync {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Resyncs this standby's copies (`vm`'s disks) with the primary's on `h`. Err
/// [`StandbyError::Disks`]: a read-only copy differs (it cannot be written); a channel
/// error: the connection failed (a `--join` standby reconnects and calls this again).
pub fn resync(
    h: &mut Handshaken,
    peer: &str,
    vm: &Vm,
    header: &LogHeader,
    record: &mut ResyncRecord,
    ui: StandbyUi,
) -> Result<(), StandbyError> {
    let disks = disks(header);
    if disks.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let total: u64 = disks.iter().map(|(n, _)| n * DISK_BLOCK_SIZE).sum();
    let bar = progress_bar(ui, total);
    let mut scratch = Vec::new();
    if record.hashes.len() != disks.len() {
        // Hashed a run at a time, just before the run is sent, so the primary never waits
        // long for the next message (its read timeout holds).
        record.hashes = vec![Vec::new(); disks.len()];
    }
    let mut differing_read_only = Vec::new();
    let (mut differed, mut bytes) = (0u64, 0u64);
    for (disk, &(blocks, read_only)) in disks.iter().enumerate() {
        let mut differ_here = 0;
        // Runs asked for and not yet answered, oldest first: the next run's hashes go out
        // before the answer to the current one is read, so this side's hashing and the
        // primary's reading overlap, and the link is never idle for a round trip.
        let mut asked: VecDeque<(u64, u64)> = VecDeque::new();
        let mut next = 0;
        while next < blocks || !asked.is_empty() {
            while asked.len() < RUNS_IN_FLIGHT && next < blocks {
                let count = (blocks - next).min(HASHES_PER_REQUEST);
                let known = &mut record.hashes[disk];
                for block in known.len() as u64..next + count {
                    let b = DiskBlock {
                        disk: disk as u32,
                        block,
                    };
                    known.push(block_hash(vm, b, &mut scratch)?);
                }
                let hashes: Vec<u8> = known[next as usize..(next + count) as usize].concat();
                link::send_blocking(
                    &mut h.stream,
                    peer,
                    &Message {
                        body: Some(Body::DiskHashes(DiskHashes {
                            disk: disk as u32,
                            first_block: next,
                            hashes,
                        })),
                    },
                )?;
                asked.push_back((next, count));
                next += count;
            }
            let Some((first, count)) = asked.pop_front() else {
                break;
            };
            loop {
                let msg = link::recv_blocking(&mut h.stream, peer, &mut h.rx_offset)?;
                let Some(Body::DiskBlocks(answer)) = msg.body else {
                    return Err(ChannelError::Unexpected {
                        peer: peer.into(),
                        expected: "DiskBlocks",
                        got: body_name(&msg).into(),
                    }
                    .into());
                };
                for b in &answer.blocks {
                    if b.disk != disk as u32 || b.block < first || b.block >= first + count {
                        return Err(ChannelError::DiskResync {
                            peer: peer.into(),
                            why: format!(
                                "sent block {} of disk {} for hashes of blocks {first}..{} of disk {disk}",
                                b.block,
                                b.disk,
                                first + count
                            ),
                        }
                        .into());
                    }
                    differ_here += 1;
                    if read_only {
                        continue;
                    }
                    let block = DiskBlock {
                        disk: b.disk,
                        block: b.block,
                    };
                    vm.write_disk_block(block, &b.data)?;
                    record.hashes[disk][b.block as usize] = if b.data.is_empty() {
                        block_hash(vm, block, &mut scratch)?
                    } else {
                        hash(&b.data)
                    };
                    record.received += 1;
                    record.received_bytes += b.data.len() as u64;
                    bytes += b.data.len() as u64;
                }
                if answer.last {
                    break;
                }
            }
            bar.inc(count * DISK_BLOCK_SIZE);
            bar.set_message(format!("{} blocks differed", differed + differ_here));
        }
        differed += differ_here;
        if read_only && differ_here > 0 {
            differing_read_only.push(format!("disk {disk}: {differ_here} block(s)"));
        }
    }
    bar.finish_and_clear();
    tracing::info!(
        peer,
        differed,
        received_bytes = bytes,
        received_total = record.received,
        received_total_bytes = record.received_bytes,
        disk_bytes = total,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "disk resync done"
    );
    if !differing_read_only.is_empty() {
        return Err(StandbyError::Disks(format!(
            "this standby's read-only copies differ from the primary's disks ({}); a read-only copy is never written, so it must be identical",
            differing_read_only.join(", ")
        )));
    }
    Ok(())
}

/// How a `--join` standby meets its primary again after a dropped connection.
pub(crate) type Reconnect<'a> =
    &'a mut dyn FnMut() -> Result<(Handshaken, String, ftvm_proto::channel::Start), StandbyError>;

/// [`resync`], and when the connection drops and `reconnect` is given (a `--join`
/// standby), meets the primary again (at most `max_reconnects` times) and resumes: the
/// record says what this standby has, so only what it lacks is sent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resync_reconnecting(
    h: &mut Handshaken,
    peer: &mut String,
    vm: &Vm,
    header: &LogHeader,
    record: &mut ResyncRecord,
    ui: StandbyUi,
    mut reconnect: Option<Reconnect<'_>>,
    max_reconnects: u32,
) -> Result<(), StandbyError> {
    let mut tries = 0;
    loop {
        match resync(h, peer, vm, header, record, ui) {
            Err(StandbyError::Channel(e))
                if tries < max_reconnects
                    && matches!(
                        e,
                        ChannelError::Closed { .. }
                            | ChannelError::ClosedMidFrame { .. }
                            | ChannelError::Io { .. }
                            | ChannelError::HandshakeTimeout { .. }
                            | ChannelError::SetupTimeout { .. }
                    ) =>
            {
                let Some(again) = reconnect.as_mut() else {
                    return Err(e.into());
                };
                tries += 1;
                tracing::warn!(
                    received = record.received,
                    "{e}: reconnecting to resume the disk resync"
                );
                let (h2, p2, start) = again()?;
                if !start.sync || start.header.as_ref() != Some(header) {
                    return Err(StandbyError::SyncLost(format!(
                        "{e}; {p2} now runs another guest"
                    )));
                }
                *h = h2;
                *peer = p2;
            }
            other => return other,
        }
    }
}
