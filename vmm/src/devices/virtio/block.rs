//! A virtio block device (virtio 1.2, §5.2), backed by a raw image file; it goes on the
//! MMIO bus behind the virtio-mmio transport ([`super::mmio`]).
//!
//! The device does all its work when the transport hands it a notified queue (see
//! [`super`] on determinism): it reads the request header, reads or writes the image, writes
//! the data and the status into guest memory and completes the request in the used ring.
//!
//! Errors from the image (a full host disk, an I/O error) are reported to the guest as
//! `VIRTIO_BLK_S_IOERR` and logged; a malformed request from the guest is completed with an
//! error status too. The device never panics on what the guest or the image give it.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{MmioState, MmioTransport, Processed, VirtioDevice, TYPE_BLOCK};
use crate::memory::GuestMemory;
use crate::state::{Persist, StateError};

pub use super::disk::{
    DiskBlock, DiskConfig, DiskError, DiskImage, DiskInfo, DISK_BLOCK_SIZE, SECTOR_SIZE,
};
pub use super::disk_read::{DiskRead, DiskReadLog};
/// Entries in the one request queue.
const QUEUE_SIZE: u16 = 256;

/// A request header: type, reserved, sector.
const REQUEST_HEADER: usize = 16;

/// A block device on its virtio-mmio window: what the machine puts on the MMIO bus.
pub type VirtioBlk = MmioTransport<Block>;
/// The saved state of a [`VirtioBlk`] (the block device keeps none of its own).
pub type VirtioBlkState = MmioState<<Block as Persist>::State>;

/// The block device behind the transport.
pub struct Block {
    disk: DiskImage,
    /// The serial number GET_ID returns (the image's file name, truncated).
    serial: Vec<u8>,
    /// The disk's index (slot order), as its reads are logged.
    index: u32,
    /// Where served reads are queued while the log is enabled (DESIGN.md §2).
    reads: DiskReadLog,
}

impl Block {
    /// A block device over `disk`.
    pub fn new(disk: DiskImage) -> Self {
        let mut serial = disk
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned().into_bytes())
            .unwrap_or_default();
        serial.truncate(VIRTIO_BLK_ID_BYTES as usize);
        Self {
            disk,
            serial,
            index: 0,
            reads: DiskReadLog::default(),
        }
    }

    /// Queues the reads this device (disk `index`) serves in `reads`, hashed, while that log
    /// is enabled.
    pub fn logging_reads(mut self, index: u32, reads: DiskReadLog) -> Self {
        self.index = index;
        self.reads = reads;
        self
    }

    /// The image behind the device.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// The image, to take its dirty blocks.
    pub fn disk_mut(&mut self) -> &mut DiskImage {
        &mut self.disk
    }

    /// Serves one request; returns the bytes written into guest memory (data + status).
    fn serve(&mut self, mem: &GuestMemory, descriptors: &[(GuestAddress, u32, bool)]) -> u32 {
        // The status byte is the last descriptor's last byte.
        let Some(&(last_addr, last_len, last_writable)) = descriptors.last() else {
            return 0;
        };
        if !last_writable || last_len == 0 {
            tracing::warn!("virtio-blk: request without a writable status byte");
            return 0;
        }
        let status_addr = GuestAddress(last_addr.0 + u64::from(last_len) - 1);
        let (status, data_written) = match self.request(mem, descriptors, status_addr) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(status) => (status, 0),
        };
        if mem.write_obj(status as u8, status_addr).is_err() {
            return data_written;
        }
        data_written + 1
    }

    /// Reads the header and moves the data. Err: the status to report.
    fn request(
        &mut self,
        mem: &GuestMemory,
        descriptors: &[(GuestAddress, u32, bool)],
        status_addr: GuestAddress,
    ) -> Result<u32, u32> {
        // The header: the readable bytes before the data (usually one descriptor of 16).
        let mut header = [0u8; REQUEST_HEADER];
        let mut filled = 0;
        let mut data = Vec::new();
        for &(addr, len, writable) in descriptors {
            let mut addr = addr;
            let mut len = u64::from(len);
            if filled < REQUEST_HEADER {
                if writable {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let take = len.min((REQUEST_HEADER - filled) as u64) as usize;
                mem.read_slice(&mut header[filled..filled + take], addr)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                filled += take;
                addr = GuestAddress(addr.0 + take as u64);
                len -= take as u64;
            }
            // The status byte is not data.
            if GuestAddress(addr.0 + len) > status_addr && addr <= status_addr {
                len = status_addr.0 - addr.0;
            }
            if len > 0 {
                data.push((addr, len, writable));
            }
        }
        if filled < REQUEST_HEADER {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        match kind {
            VIRTIO_BLK_T_IN => self.transfer(mem, sector, &data, true),
            VIRTIO_BLK_T_OUT => {
                if self.disk.read_only() {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                self.transfer(mem, sector, &data, false).map(|_| 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.disk.read_only() {
                    self.disk.sync_data().map_err(|e| {
                        tracing::error!(disk = %self.disk.path().display(), error = %e, "virtio-blk: flush failed");
                        VIRTIO_BLK_S_IOERR
                    })?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let Some(&(addr, len, true)) = data.first() else {
                    return Err(VIRTIO_BLK_S_IOERR);
                };
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..self.serial.len()].copy_from_slice(&self.serial);
                let n = (len as usize).min(id.len());
                mem.write_slice(&id[..n], addr)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Moves data between the image at `sector` and the guest buffers. `read`: image →
    /// guest (the buffers must be writable), else guest → image.
    fn transfer(
        &mut self,
        mem: &GuestMemory,
        sector: u64,
        buffers: &[(GuestAddress, u64, bool)],
        read: bool,
    ) -> Result<u32, u32> {
        let total: u64 = buffers.iter().map(|b| b.1).sum();
        // The used ring and the read log count a request's bytes in 32 bits.
        let length = u32::try_from(total).map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(total));
        if end.is_none_or(|end| end > self.disk.size()) {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut offset = sector * SECTOR_SIZE;
        let mut buf = Vec::new();
        let mut hasher = (read && self.reads.enabled()).then(blake3::Hasher::new);
        for &(addr, len, writable) in buffers {
            if writable != read {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let len = usize::try_from(len).map_err(|_| VIRTIO_BLK_S_IOERR)?;
            buf.resize(len, 0);
            let path = self.disk.path().display().to_string();
            let io = |e: std::io::Error| {
                tracing::error!(disk = %path, offset, error = %e, "virtio-blk: image I/O failed");
                VIRTIO_BLK_S_IOERR
            };
            if read {
                self.disk.read_at(&mut buf, offset).map_err(io)?;
                mem.write_slice(&buf, addr)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf);
                }
            } else {
                mem.read_slice(&mut buf, addr)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                self.disk.write_at(&buf, offset).map_err(io)?;
            }
            offset += len as u64;
        }
        // Only a read whose data all reached the guest is logged: a failed one completes
        // with an error status, which the digest covers.
        if let Some(h) = hasher {
            self.reads.push(DiskRead {
                disk: self.index,
                sector,
                length,
                hash: *h.finalize().as_bytes(),
            });
        }
        Ok(length)
    }
}

impl VirtioDevice for Block {
    const NAME: &'static str = "virtio-blk";

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH | 1u64 << VIRTIO_BLK_F_SEG_MAX;
        if self.disk.read_only() {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64), size_max (le32, not offered), seg_max
        // (le32): a request may have as many data segments as the queue has room for
        // beside its header and status. Without SEG_MAX Linux sends one segment per request,
        // so an O_DIRECT read of 1 MiB took 256 requests (3.8 MiB/s in the nested bench).
        // The configuration space is read-only (no WCE): writes take the default.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.disk.info().sectors.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i).copied())
                .unwrap_or(0);
        }
    }

    /// Serves every request the driver made available.
    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemory) -> Processed {
        let mut done = Processed::default();
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk: bad available ring");
                    done.broken = true;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descriptors: Vec<(GuestAddress, u32, bool)> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let written = self.serve(mem, &descriptors);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!(error = %e, "virtio-blk: cannot complete a request");
                done.broken = true;
                break;
            }
            done.used = true;
        }
        done
    }
}

/// The block device's state is all in its queue (the image's contents are not state: each
/// host of a pair has its own copy).
impl Persist for Block {
    type State = ();

    fn save(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn restore(&mut self, _state: &()) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{
        INT_USED_BUFFER, REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_INTERRUPT_ACK,
        REG_INTERRUPT_STATUS,
    };
    use crate::devices::virtio::test_driver::{Driver, IRQ};
    use std::path::PathBuf;

    /// A block device over a 64 KiB image of a known pattern, set up by the test driver.
    struct Rig {
        d: Driver<Block>,
        image: PathBuf,
    }

    impl Rig {
        fn new(name: &str, read_only: bool) -> Self {
            let image =
                std::env::temp_dir().join(format!("ftvm-blk-{name}-{}.img", std::process::id()));
            let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            std::fs::write(&image, pattern).unwrap();
            let disk = DiskImage::open(&DiskConfig {
                path: image.clone(),
                read_only,
            })
            .unwrap();
            Self {
                d: Driver::new(Block::new(disk), 1),
                image,
            }
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            let mem = &self.d.mem;
            mem.write_obj(kind, GuestAddress(at)).unwrap();
            mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.image);
        }
    }

    #[test]
    fn writes_then_reads_back_across_segments_at_the_notify() {
        let mut rig = Rig::new("rw", false);
        // Write 1 KiB of 0xab at sector 2.
        rig.d
            .mem
            .write_slice(&[0xab; 1024], GuestAddress(0x5000))
            .unwrap();
        rig.header(0x4000, VIRTIO_BLK_T_OUT, 2);
        rig.d.request(&[
            (0x4000, 16, false),
            (0x5000, 1024, false),
            (0x4100, 1, true),
        ]);
        assert_eq!(rig.d.byte(0x4100), VIRTIO_BLK_S_OK as u8);
        assert_eq!(rig.d.used_idx(0), 1);
        assert_eq!(rig.d.lines.take(), 1 << IRQ, "completion pulses the line");
        assert_eq!(rig.d.reg(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        rig.d.write_reg(REG_INTERRUPT_ACK, 1);
        let file = std::fs::read(&rig.image).unwrap();
        assert!(file[1024..2048].iter().all(|b| *b == 0xab));
        assert_eq!(file[2048], (2048 % 251) as u8);

        // Read sectors 1..4 back into two segments.
        rig.header(0x4200, VIRTIO_BLK_T_IN, 1);
        rig.d.request(&[
            (0x4200, 16, false),
            (0x6000, 512, true),
            (0x7000, 1024, true),
            (0x4300, 1, true),
        ]);
        assert_eq!(rig.d.byte(0x4300), VIRTIO_BLK_S_OK as u8);
        assert_eq!(rig.d.used_idx(0), 2);
        assert_eq!(rig.d.used_len(0, 1), 1536 + 1);
        assert_eq!(rig.d.byte(0x6000), (512 % 251) as u8);
        assert_eq!(rig.d.byte(0x7000), 0xab);
        assert_eq!(rig.d.byte(0x7000 + 1023), 0xab);

        // State survives save/restore.
        let saved = rig.d.dev.save().unwrap();
        rig.d.dev.restore(&saved).unwrap();
        assert_eq!(rig.d.dev.save().unwrap(), saved);
        assert_eq!(saved.queues[0].next_avail, 2);
    }

    #[test]
    fn bad_requests_complete_with_an_error_status() {
        let mut rig = Rig::new("bad", true);
        // Read-only: a write fails, the image is untouched.
        rig.d
            .mem
            .write_slice(&[1; 512], GuestAddress(0x5000))
            .unwrap();
        rig.header(0x4000, VIRTIO_BLK_T_OUT, 0);
        rig.d
            .request(&[(0x4000, 16, false), (0x5000, 512, false), (0x4100, 1, true)]);
        assert_eq!(rig.d.byte(0x4100), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(&rig.image).unwrap()[0], 0);
        // Past the end of the disk.
        rig.header(0x4200, VIRTIO_BLK_T_IN, 128);
        rig.d
            .request(&[(0x4200, 16, false), (0x6000, 512, true), (0x4300, 1, true)]);
        assert_eq!(rig.d.byte(0x4300), VIRTIO_BLK_S_IOERR as u8);
        // An unknown request type.
        rig.header(0x4400, 0x99, 0);
        rig.d.request(&[(0x4400, 16, false), (0x4500, 1, true)]);
        assert_eq!(rig.d.byte(0x4500), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(rig.d.used_idx(0), 3);
        // The read-only feature is offered.
        rig.d.write_reg(REG_DEVICE_FEATURES_SEL, 0);
        assert_ne!(rig.d.reg(REG_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "/x/y.img,ro".parse().unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("/x/y.img"), true));
        let d: DiskConfig = "/x/y.img".parse().unwrap();
        assert!(!d.read_only);
        assert!("/x,y.img,fast".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
    }
}
