//! A virtio block device on the virtio-mmio transport (virtio 1.x, "version 2" MMIO
//! registers), backed by a raw image file.
//!
//! Determinism (DESIGN.md §2): the device does all its work inside the guest's write to
//! `QueueNotify`, that is at an exit, with the vCPU stopped: it walks the available ring
//! (virtio-queue), reads or writes the image, writes the data and the status into guest
//! memory and completes the request in the used ring, then pulses its interrupt line, which
//! the exit loop injects like any other. Nothing happens on another thread or later, so the
//! guest's view of the disk only changes at exits, and a replay of the same exits against
//! the same image does the same memory writes. Those writes go through the VM's
//! [`GuestMemory`], so the dirty log sees them.
//!
//! Errors from the image (a full host disk, an I/O error) are reported to the guest as
//! `VIRTIO_BLK_S_IOERR` and logged; a malformed request from the guest is completed with an
//! error status too. The device never panics on what the guest or the image give it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::IrqLine;
use crate::bus::BusDevice;
use crate::memory::GuestMemory;
use crate::state::{Persist, StateError};

/// The size of one virtio-mmio register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Sector size of the virtio block protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the one request queue.
const QUEUE_SIZE: u16 = 256;

const MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const DEVICE_ID_BLOCK: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_5446; // "FTVM"

// Register offsets (virtio 1.2, §4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// InterruptStatus bit: the device used a buffer.
const INT_USED_BUFFER: u32 = 1;
/// Status bit the driver sets when it gives up on the device.
const STATUS_FAILED: u32 = 128;
const STATUS_DEVICE_NEEDS_RESET: u32 = 64;

/// A request header: type, reserved, sector.
const REQUEST_HEADER: usize = 16;

/// How the image is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest sees a read-only disk and the image is opened read-only.
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH` or `PATH,ro` (the form `--disk` takes).
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some((_, opt)) => {
                return Err(format!(
                    "unknown disk option {opt:?} (PATH or PATH,ro expected)"
                ))
            }
            None => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A disk image that could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening or inspecting the image failed.
    #[error("disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The path is not a regular file or block device.
    #[error("disk image {0}: is a directory, not a raw image file")]
    Directory(PathBuf),
    /// Read-write attach of an image that cannot be written.
    #[error("disk image {path} is read-only ({why}); attach it read-only with --disk {path},ro")]
    ReadOnly {
        /// The image.
        path: PathBuf,
        /// What makes it read-only.
        why: String,
    },
    /// The image's size is not a whole number of sectors.
    #[error("disk image {path}: size {size} is not a multiple of {SECTOR_SIZE} bytes")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another VMM holds the image.
    #[error("disk image {0} is in use by another process (locked)")]
    Locked(PathBuf),
}

/// What a VM's configuration says about one attached disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in sectors.
    pub sectors: u64,
    /// Attached read-only.
    pub read_only: bool,
}

/// An opened image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
}

impl DiskImage {
    /// Opens the image as `config` says; takes an advisory lock on it (shared when
    /// read-only, exclusive otherwise) so two VMMs never write one image.
    pub fn open(config: &DiskConfig) -> Result<Self, DiskError> {
        let path = config.path.clone();
        let open_err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(open_err)?;
        if meta.is_dir() {
            return Err(DiskError::Directory(path));
        }
        if !config.read_only && meta.permissions().readonly() {
            // Root could open it for writing anyway; the mode says the owner wants it kept.
            return Err(DiskError::ReadOnly {
                path,
                why: "the file has no write permission".into(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EROFS) => DiskError::ReadOnly {
                    path: path.clone(),
                    why: "it is on a read-only file system".into(),
                },
                Some(libc::EACCES | libc::EPERM) if !config.read_only => DiskError::ReadOnly {
                    path: path.clone(),
                    why: "permission denied for writing".into(),
                },
                _ => open_err(e),
            })?;
        let lock = if config.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), lock | libc::LOCK_NB) } != 0
        {
            return Err(DiskError::Locked(path));
        }
        let size = file.metadata().map_err(open_err)?.len();
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::Size { path, size });
        }
        Ok(Self {
            file,
            path,
            sectors: size / SECTOR_SIZE,
            read_only: config.read_only,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size and mode.
    pub fn info(&self) -> DiskInfo {
        DiskInfo {
            sectors: self.sectors,
            read_only: self.read_only,
        }
    }
}

/// The saved state of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available ring entry the device will take.
    pub next_avail: u16,
    /// Next used ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated (never offered; kept for completeness).
    pub event_idx: bool,
}

/// The saved state of the device (the image's contents are not state: each host of a pair
/// has its own copy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// What the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The request queue.
    pub queue: QueueRegs,
}

/// The device.
pub struct VirtioBlk {
    disk: DiskImage,
    mem: GuestMemory,
    irq: IrqLine,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    queue: Queue,
    /// The serial number GET_ID returns (the image's file name, truncated).
    serial: Vec<u8>,
}

fn new_queue() -> Queue {
    // QUEUE_SIZE is a power of two: Queue::new cannot fail for it.
    Queue::new(QUEUE_SIZE).unwrap_or_else(|_| unreachable!("queue size {QUEUE_SIZE} is valid"))
}

impl VirtioBlk {
    /// A block device over `disk`, raising `irq`, doing DMA into `mem`.
    pub fn new(disk: DiskImage, mem: GuestMemory, irq: IrqLine) -> Self {
        let mut serial = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned().into_bytes())
            .unwrap_or_default();
        serial.truncate(VIRTIO_BLK_ID_BYTES as usize);
        Self {
            disk,
            mem,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            queue: new_queue(),
            serial,
        }
    }

    /// The image behind the device.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    fn device_features(&self) -> u64 {
        let mut f =
            1u64 << VIRTIO_F_VERSION_1 | 1u64 << VIRTIO_BLK_F_FLUSH | 1u64 << VIRTIO_BLK_F_SEG_MAX;
        if self.disk.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queue = new_queue();
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64), size_max (le32, not offered), seg_max
        // (le32): a request may have as many data segments as the queue has room for
        // beside its header and status. Without SEG_MAX Linux sends one segment per request,
        // so an O_DIRECT read of 1 MiB took 256 requests (3.8 MiB/s in the nested bench).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i).copied())
                .unwrap_or(0);
        }
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0
    }

    /// Serves every request the driver made available, then interrupts if the driver wants
    /// to hear about it.
    fn process_queue(&mut self) {
        if !self.driver_ok() || !self.queue.ready() || !self.queue.is_valid(&self.mem) {
            return;
        }
        let mem = self.mem.clone();
        let mut used_any = false;
        loop {
            let chain = match self.queue.iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk: bad available ring");
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descriptors: Vec<(GuestAddress, u32, bool)> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let written = self.serve(&descriptors);
            if let Err(e) = self.queue.add_used(&mem, head, written) {
                tracing::warn!(error = %e, "virtio-blk: cannot complete a request");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                break;
            }
            used_any = true;
        }
        if used_any && self.queue.needs_notification(&mem).unwrap_or(true) {
            self.interrupt_status |= INT_USED_BUFFER;
            self.irq.pulse();
        }
    }

    /// Serves one request; returns the bytes written into guest memory (data + status).
    fn serve(&mut self, descriptors: &[(GuestAddress, u32, bool)]) -> u32 {
        // The status byte is the last descriptor's last byte.
        let Some(&(last_addr, last_len, last_writable)) = descriptors.last() else {
            return 0;
        };
        if !last_writable || last_len == 0 {
            tracing::warn!("virtio-blk: request without a writable status byte");
            return 0;
        }
        let status_addr = GuestAddress(last_addr.0 + u64::from(last_len) - 1);
        let (status, data_written) = match self.request(descriptors, status_addr) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(status) => (status, 0),
        };
        if self.mem.write_obj(status as u8, status_addr).is_err() {
            return data_written;
        }
        data_written + 1
    }

    /// Reads the header and moves the data. Err: the status to report.
    fn request(
        &mut self,
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
                self.mem
                    .read_slice(&mut header[filled..filled + take], addr)
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
            VIRTIO_BLK_T_IN => self.transfer(sector, &data, true),
            VIRTIO_BLK_T_OUT => {
                if self.disk.read_only {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                self.transfer(sector, &data, false).map(|_| 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.disk.read_only {
                    self.disk.file.sync_data().map_err(|e| {
                        tracing::error!(disk = %self.disk.path.display(), error = %e, "virtio-blk: flush failed");
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
                self.mem
                    .write_slice(&id[..n], addr)
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
        sector: u64,
        buffers: &[(GuestAddress, u64, bool)],
        read: bool,
    ) -> Result<u32, u32> {
        let total: u64 = buffers.iter().map(|b| b.1).sum();
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(total));
        if end.is_none_or(|end| end > self.disk.sectors * SECTOR_SIZE) {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut offset = sector * SECTOR_SIZE;
        let mut buf = Vec::new();
        for &(addr, len, writable) in buffers {
            if writable != read {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            let len = usize::try_from(len).map_err(|_| VIRTIO_BLK_S_IOERR)?;
            buf.resize(len, 0);
            let io = |e: std::io::Error| {
                tracing::error!(disk = %self.disk.path.display(), offset, error = %e, "virtio-blk: image I/O failed");
                VIRTIO_BLK_S_IOERR
            };
            if read {
                self.disk.file.read_exact_at(&mut buf, offset).map_err(io)?;
                self.mem
                    .write_slice(&buf, addr)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            } else {
                self.mem
                    .read_slice(&mut buf, addr)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                self.disk.file.write_all_at(&buf, offset).map_err(io)?;
            }
            offset += len as u64;
        }
        Ok(total as u32)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => DEVICE_ID_BLOCK,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX if self.queue_sel == 0 => u32::from(QUEUE_SIZE),
            REG_QUEUE_READY if self.queue_sel == 0 => u32::from(self.queue.ready()),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let q0 = self.queue_sel == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                // Only what was offered can be accepted.
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let accepted = (u64::from(v) << shift) & self.device_features();
                self.driver_features = (self.driver_features & !mask) | accepted;
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if q0 => self.queue.set_size(v as u16),
            REG_QUEUE_READY if q0 => self.queue.set_ready(v == 1),
            REG_QUEUE_DESC_LOW if q0 => self.queue.set_desc_table_address(Some(v), None),
            REG_QUEUE_DESC_HIGH if q0 => self.queue.set_desc_table_address(None, Some(v)),
            REG_QUEUE_AVAIL_LOW if q0 => self.queue.set_avail_ring_address(Some(v), None),
            REG_QUEUE_AVAIL_HIGH if q0 => self.queue.set_avail_ring_address(None, Some(v)),
            REG_QUEUE_USED_LOW if q0 => self.queue.set_used_ring_address(Some(v), None),
            REG_QUEUE_USED_HIGH if q0 => self.queue.set_used_ring_address(None, Some(v)),
            REG_QUEUE_NOTIFY if v == 0 => self.process_queue(),
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => {
                if v == 0 {
                    self.reset();
                } else if v & VIRTIO_CONFIG_S_FEATURES_OK != 0
                    && self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
                {
                    // A legacy driver: refuse FEATURES_OK (virtio 1.x only).
                    self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                } else {
                    self.status = v;
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for VirtioBlk {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.config_read(offset - REG_CONFIG, data);
            return;
        }
        let v = self.read_reg(offset).to_le_bytes();
        // Registers are 32-bit; a narrower read gets the low bytes.
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            // The configuration space is read-only for a block device without WCE.
            return;
        }
        let mut v = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            v[i] = *b;
        }
        self.write_reg(offset, u32::from_le_bytes(v));
    }
}

impl Persist for VirtioBlk {
    type State = VirtioBlkState;

    fn save(&self) -> Result<VirtioBlkState, StateError> {
        let q = self.queue.state();
        Ok(VirtioBlkState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queue: QueueRegs {
                size: q.size,
                ready: q.ready,
                desc: q.desc_table,
                avail: q.avail_ring,
                used: q.used_ring,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx: q.event_idx_enabled,
            },
        })
    }

    fn restore(&mut self, s: &VirtioBlkState) -> Result<(), StateError> {
        let mut queue = new_queue();
        if s.queue.size != 0 {
            queue
                .try_set_size(s.queue.size)
                .map_err(|e| StateError::Invalid {
                    device: "virtio-blk",
                    why: format!("queue size: {e}"),
                })?;
        }
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(s.queue.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(s.queue.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(s.queue.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_next_avail(s.queue.next_avail);
        queue.set_next_used(s.queue.next_used);
        queue.set_event_idx(s.queue.event_idx);
        queue.set_ready(s.queue.ready);
        self.queue = queue;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        Ok(())
    }
}

/// Driver status bits a fully set-up device shows (for tests).
pub const STATUS_READY: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLines;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    struct Rig {
        dev: VirtioBlk,
        mem: GuestMemory,
        lines: IrqLines,
        image: PathBuf,
        next_desc: u16,
        avail_idx: u16,
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
            let mem = crate::memory::create(16).unwrap();
            let lines = IrqLines::default();
            let mut dev = VirtioBlk::new(disk, mem.clone(), lines.line(5));
            let w = |dev: &mut VirtioBlk, reg: u64, v: u32| dev.write(0, reg, &v.to_le_bytes());
            w(
                &mut dev,
                REG_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            );
            w(&mut dev, REG_DRIVER_FEATURES_SEL, 1);
            w(&mut dev, REG_DRIVER_FEATURES, 1); // VERSION_1 (bit 32)
            w(&mut dev, REG_QUEUE_SEL, 0);
            w(&mut dev, REG_QUEUE_NUM, 16);
            w(&mut dev, REG_QUEUE_DESC_LOW, DESC as u32);
            w(&mut dev, REG_QUEUE_AVAIL_LOW, AVAIL as u32);
            w(&mut dev, REG_QUEUE_USED_LOW, USED as u32);
            w(&mut dev, REG_QUEUE_READY, 1);
            w(&mut dev, REG_STATUS, STATUS_READY);
            assert_eq!(dev.read_reg(REG_STATUS), STATUS_READY);
            Self {
                dev,
                mem,
                lines,
                image,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// Queues a request made of (addr, len, writable) buffers and notifies.
        fn request(&mut self, bufs: &[(u64, u32, bool)]) {
            let head = self.next_desc;
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let idx = self.next_desc;
                let last = i + 1 == bufs.len();
                let mut flags = if writable { F_WRITE } else { 0 };
                if !last {
                    flags |= F_NEXT;
                }
                let at = DESC + u64::from(idx) * 16;
                self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                self.mem.write_obj(idx + 1, GuestAddress(at + 14)).unwrap();
                self.next_desc += 1;
            }
            let slot = AVAIL + 4 + u64::from(self.avail_idx % 16) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx += 1;
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            self.dev.write(0, REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(at)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }

        fn byte(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
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
        rig.mem
            .write_slice(&[0xab; 1024], GuestAddress(0x5000))
            .unwrap();
        rig.header(0x4000, VIRTIO_BLK_T_OUT, 2);
        rig.request(&[
            (0x4000, 16, false),
            (0x5000, 1024, false),
            (0x4100, 1, true),
        ]);
        assert_eq!(rig.byte(0x4100), VIRTIO_BLK_S_OK as u8);
        assert_eq!(rig.used_idx(), 1);
        assert_eq!(rig.lines.take(), 1 << 5, "completion pulses the line");
        assert_eq!(rig.dev.read_reg(REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        rig.dev.write(0, REG_INTERRUPT_ACK, &1u32.to_le_bytes());
        let file = std::fs::read(&rig.image).unwrap();
        assert!(file[1024..2048].iter().all(|b| *b == 0xab));
        assert_eq!(file[2048], (2048 % 251) as u8);

        // Read sectors 1..4 back into two segments.
        rig.header(0x4200, VIRTIO_BLK_T_IN, 1);
        rig.request(&[
            (0x4200, 16, false),
            (0x6000, 512, true),
            (0x7000, 1024, true),
            (0x4300, 1, true),
        ]);
        assert_eq!(rig.byte(0x4300), VIRTIO_BLK_S_OK as u8);
        assert_eq!(rig.used_idx(), 2);
        let used_len: u32 = rig.mem.read_obj(GuestAddress(USED + 4 + 8 + 4)).unwrap();
        assert_eq!(used_len, 1536 + 1);
        assert_eq!(rig.byte(0x6000), (512 % 251) as u8);
        assert_eq!(rig.byte(0x7000), 0xab);
        assert_eq!(rig.byte(0x7000 + 1023), 0xab);

        // State survives save/restore.
        let saved = rig.dev.save().unwrap();
        rig.dev.restore(&saved).unwrap();
        assert_eq!(rig.dev.save().unwrap(), saved);
        assert_eq!(saved.queue.next_avail, 2);
    }

    #[test]
    fn bad_requests_complete_with_an_error_status() {
        let mut rig = Rig::new("bad", true);
        // Read-only: a write fails, the image is untouched.
        rig.mem
            .write_slice(&[1; 512], GuestAddress(0x5000))
            .unwrap();
        rig.header(0x4000, VIRTIO_BLK_T_OUT, 0);
        rig.request(&[(0x4000, 16, false), (0x5000, 512, false), (0x4100, 1, true)]);
        assert_eq!(rig.byte(0x4100), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(&rig.image).unwrap()[0], 0);
        // Past the end of the disk.
        rig.header(0x4200, VIRTIO_BLK_T_IN, 128);
        rig.request(&[(0x4200, 16, false), (0x6000, 512, true), (0x4300, 1, true)]);
        assert_eq!(rig.byte(0x4300), VIRTIO_BLK_S_IOERR as u8);
        // An unknown request type.
        rig.header(0x4400, 0x99, 0);
        rig.request(&[(0x4400, 16, false), (0x4500, 1, true)]);
        assert_eq!(rig.byte(0x4500), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(rig.used_idx(), 3);
        // The read-only feature is offered.
        rig.dev
            .write(0, REG_DEVICE_FEATURES_SEL, &0u32.to_le_bytes());
        assert_ne!(
            rig.dev.read_reg(REG_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO),
            0
        );
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
