//! The disk resync before protection (DESIGN.md §4 "Disks"), the primary's side. Between
//! `Start` and its `Ready`, a standby sends the BLAKE3 hashes of its copy of each disk, a
//! run of [`HASHES_PER_REQUEST`] blocks at a time (`DiskHashes`); the primary answers each
//! run with the blocks whose content differs from its own disk (`DiskBlocks`). Only the
//! hashes and the differing blocks cross the wire. A standby that reconnects sends the hashes
//! it kept, updated for the blocks it received, so what it already has is not sent again.
//!
//! When a standby joins a running guest, the guest writes its disks during the resync: the
//! blocks it writes from the resync's start on are tracked
//! ([`DirtyTracking::begin_disk_resync`]) and the sync's stop-and-copy sends them all.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use ftvm_proto::channel::{message::Body, DiskBlock, DiskBlocks, DiskHashes, Message};
use ftvm_vmm::devices::virtio::block::DISK_BLOCK_SIZE;

use crate::checkpoint::DirtyTracking;
use crate::link::{self, Handshaken};
use crate::ChannelError;

/// Block hashes per `DiskHashes` (4 MiB of disk, 2 KiB of hashes): one round trip each, so
/// neither side waits long between messages (the handshake's read timeout holds).
pub const HASHES_PER_REQUEST: u64 = 64;
/// Blocks per `DiskBlocks` message (1 MiB).
pub const BLOCKS_PER_MESSAGE: usize = 16;
/// Bytes of one block hash.
pub const HASH_LEN: usize = 32;

/// The primary's disks as the resync reads them: their images, opened read-only beside the
/// VM's own handles (the guest may write them meanwhile; see [`DirtyTracking`]).
#[derive(Debug, Clone, Default)]
pub struct PrimaryDisks {
    paths: Vec<PathBuf>,
    tracking: Option<DirtyTracking>,
}

impl PrimaryDisks {
    /// The images at `paths`, in the guest's disk order.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            tracking: None,
        }
    }

    /// The guest runs while standbys resync: track the blocks it writes through `tracking`.
    pub fn with_tracking(mut self, tracking: DirtyTracking) -> Self {
        self.tracking = Some(tracking);
        self
    }
}

/// What one resync sent, for the log line tests and benchmarks read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncStats {
    /// Blocks whose hashes were compared.
    pub compared: u64,
    /// Blocks sent (they differed).
    pub sent: u64,
    /// Bytes of block data sent (a block of zeroes travels as nothing).
    pub bytes: u64,
    /// Bytes of hashes received.
    pub hash_bytes: u64,
}

/// Serves a standby's disk resync on `h`, starting from its first `DiskHashes` (`first`),
/// until the standby's answer to `Start` (`Ready` or `Diverged`), which it returns.
pub(crate) fn serve(
    h: &mut Handshaken,
    peer: &str,
    disks: &PrimaryDisks,
    first: DiskHashes,
) -> Result<Message, ChannelError> {
    let err = |why: String| ChannelError::DiskResync {
        peer: peer.into(),
        why,
    };
    if let Some(t) = &disks.tracking {
        // Before any block is read: whatever the guest writes from here on is sent again.
        t.begin_disk_resync();
    }
    let files = disks
        .paths
        .iter()
        .map(|p| {
            let f = File::open(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
            let len = f
                .metadata()
                .map_err(|e| err(format!("cannot read {}: {e}", p.display())))?
                .len();
            Ok((f, len))
        })
        .collect::<Result<Vec<_>, ChannelError>>()?;
    let started = std::time::Instant::now();
    let mut stats = ResyncStats::default();
    let mut request = first;
    loop {
        answer(h, peer, &files, &request, &mut stats)?;
        let msg = link::recv_blocking(&mut h.stream, peer, &mut h.rx_offset)?;
        match msg.body {
            Some(Body::DiskHashes(next)) => request = next,
            _ => {
                tracing::info!(
                    peer,
                    compared = stats.compared,
                    sent = stats.sent,
                    bytes = stats.bytes,
                    hash_bytes = stats.hash_bytes,
                    disk_bytes = stats.compared * DISK_BLOCK_SIZE,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "disk resync served"
                );
                return Ok(msg);
            }
        }
    }
}

/// Answers one run of hashes: the differing blocks, then `last`.
fn answer(
    h: &mut Handshaken,
    peer: &str,
    files: &[(File, u64)],
    request: &DiskHashes,
    stats: &mut ResyncStats,
) -> Result<(), ChannelError> {
    let bad = |why: String| ChannelError::DiskResync {
        peer: peer.into(),
        why,
    };
    let Some((file, len)) = files.get(request.disk as usize) else {
        return Err(bad(format!(
            "hashes for disk {}, the guest has {} disk(s)",
            request.disk,
            files.len()
        )));
    };
    if !request.hashes.len().is_multiple_of(HASH_LEN)
        || request.hashes.len() as u64 > HASHES_PER_REQUEST * HASH_LEN as u64
    {
        return Err(bad(format!(
            "{} bytes of hashes (at most {HASHES_PER_REQUEST} hashes of {HASH_LEN} bytes)",
            request.hashes.len()
        )));
    }
    let blocks = len.div_ceil(DISK_BLOCK_SIZE);
    let count = (request.hashes.len() / HASH_LEN) as u64;
    if request.first_block.saturating_add(count) > blocks {
        return Err(bad(format!(
            "hashes of blocks {}..{} of disk {}, which has {blocks}",
            request.first_block,
            request.first_block.saturating_add(count),
            request.disk
        )));
    }
    stats.hash_bytes += request.hashes.len() as u64;
    let mut data = Vec::new();
    let mut out = Vec::new();
    for (i, theirs) in request.hashes.chunks_exact(HASH_LEN).enumerate() {
        let block = request.first_block + i as u64;
        let offset = block * DISK_BLOCK_SIZE;
        data.resize((len - offset).min(DISK_BLOCK_SIZE) as usize, 0);
        file.read_exact_at(&mut data, offset).map_err(|e| {
            bad(format!(
                "cannot read block {block} of disk {}: {e}",
                request.disk
            ))
        })?;
        stats.compared += 1;
        if ftvm_vmm::digest::hash(&data)[..] == *theirs {
            continue;
        }
        let zero = data.iter().all(|&b| b == 0);
        let sent = if zero { Vec::new() } else { data.clone() };
        stats.sent += 1;
        stats.bytes += sent.len() as u64;
        out.push(DiskBlock {
            disk: request.disk,
            block,
            data: sent,
        });
        if out.len() == BLOCKS_PER_MESSAGE {
            send(h, peer, std::mem::take(&mut out), false)?;
        }
    }
    send(h, peer, out, true)
}

fn send(
    h: &mut Handshaken,
    peer: &str,
    blocks: Vec<DiskBlock>,
    last: bool,
) -> Result<(), ChannelError> {
    link::send_blocking(
        &mut h.stream,
        peer,
        &Message {
            body: Some(Body::DiskBlocks(DiskBlocks { blocks, last })),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::channel::{Hello, Ready};
    use std::net::{TcpListener, TcpStream};

    /// A connected pair of sockets: (the primary's end as a `Handshaken`, the standby's).
    fn connected() -> (Handshaken, link::secure::SecureStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let theirs = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        theirs
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let h = Handshaken {
            stream: link::secure::SecureStream::new(ours, None),
            peer: "standby".into(),
            hello: Hello::default(),
            rx_offset: 0,
            heartbeat: crate::Heartbeat::default(),
        };
        (h, link::secure::SecureStream::new(theirs, None))
    }

    fn hashes(disk: u32, first_block: u64, blocks: &[&[u8]]) -> DiskHashes {
        DiskHashes {
            disk,
            first_block,
            hashes: blocks
                .iter()
                .flat_map(|b| ftvm_vmm::digest::hash(b))
                .collect(),
        }
    }

    /// Only the blocks whose hash differs come back (a zero block as empty data), then the
    /// standby's `Ready` ends the resync; hashes for blocks or disks the guest does not have,
    /// or hashes of the wrong length, are errors, never panics.
    #[test]
    fn sends_only_differing_blocks_and_refuses_bad_requests() {
        let dir = std::env::temp_dir().join(format!("ftvm-resync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        let block = DISK_BLOCK_SIZE as usize;
        let mut data = vec![7u8; 3 * block];
        data[2 * block..].fill(0);
        std::fs::write(&img, &data).unwrap();
        let disks = PrimaryDisks::new(vec![img]);

        let (mut h, mut standby) = connected();
        let waiter = std::thread::spawn(move || {
            let mut offset = 0;
            let mut got = Vec::new();
            loop {
                let m = link::recv_blocking(&mut standby, "primary", &mut offset).unwrap();
                let Some(Body::DiskBlocks(b)) = m.body else {
                    panic!("{m:?}")
                };
                got.extend(b.blocks);
                if b.last {
                    break;
                }
            }
            let ready = Message {
                body: Some(Body::Ready(Ready::default())),
            };
            link::send_blocking(&mut standby, "primary", &ready).unwrap();
            got
        });
        let differs = vec![1u8; block];
        let request = hashes(0, 0, &[&data[..block], &differs, &differs]);
        let answer = serve(&mut h, "standby", &disks, request).unwrap();
        assert!(matches!(answer.body, Some(Body::Ready(_))));
        let got = waiter.join().unwrap();
        let sent: Vec<(u64, usize)> = got.iter().map(|b| (b.block, b.data.len())).collect();
        assert_eq!(
            sent,
            vec![(1, block), (2, 0)],
            "block 0 matched; block 2 is zeroes"
        );

        for bad in [
            hashes(1, 0, &[&data[..block]]),
            hashes(0, 3, &[&data[..block]]),
            hashes(0, u64::MAX, &[&data[..block]]),
            DiskHashes {
                disk: 0,
                first_block: 0,
                hashes: vec![0; 31],
            },
            DiskHashes {
                disk: 0,
                first_block: 0,
                hashes: vec![0; (HASHES_PER_REQUEST as usize + 1) * HASH_LEN],
            },
        ] {
            let (mut h, _standby) = connected();
            let e = serve(&mut h, "standby", &disks, bad).unwrap_err();
            assert!(matches!(e, ChannelError::DiskResync { .. }), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
