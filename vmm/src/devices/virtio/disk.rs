//! A raw disk image as a block device sees it ([`DiskImage`]), and the blocks the guest wrote
//! to it (DESIGN.md §4 "Disks"): each host of a pair has its own copy of every disk, so the
//! device keeps a bitmap of the [`DISK_BLOCK_SIZE`] blocks written since it was last taken,
//! the way the memory keeps dirty pages. Epoch digests and repairs cover those blocks; a
//! repair writes blocks into the image directly, without marking them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size of the virtio block protocol.
pub const SECTOR_SIZE: u64 = 512;
/// The unit of disk dirty tracking, digests and repairs (64 KiB).
pub const DISK_BLOCK_SIZE: u64 = 64 << 10;

/// A block of one of a VM's disks: the disk's index (slot order) and the block's index
/// ([`DISK_BLOCK_SIZE`] bytes each; the last block of a disk may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskBlock {
    /// The disk (0 = the first `--disk`).
    pub disk: u32,
    /// The block.
    pub block: u64,
}

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
    /// One bit per block written through [`DiskImage::write_at`] since the last
    /// [`DiskImage::take_dirty_blocks`].
    dirty: Vec<u64>,
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
            dirty: vec![0; size.div_ceil(DISK_BLOCK_SIZE).div_ceil(64) as usize],
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

    /// Attached read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Number of [`DISK_BLOCK_SIZE`] blocks (the last may be shorter).
    pub fn blocks(&self) -> u64 {
        self.size().div_ceil(DISK_BLOCK_SIZE)
    }

    /// Reads `buf.len()` bytes at `offset` (the guest's reads).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset` (the guest's writes) and marks the blocks it touches dirty,
    /// even when the write fails half-way (the image may have changed).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !buf.is_empty() {
            let first = offset / DISK_BLOCK_SIZE;
            let last = offset.saturating_add(buf.len() as u64 - 1) / DISK_BLOCK_SIZE;
            for b in first..=last.min(self.blocks().saturating_sub(1)) {
                if let Some(word) = self.dirty.get_mut((b / 64) as usize) {
                    *word |= 1 << (b % 64);
                }
            }
        }
        self.file.write_all_at(buf, offset)
    }

    /// Flushes written data to the host's disk.
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// The blocks written since the last call, ascending; tracking starts again.
    pub fn take_dirty_blocks(&mut self) -> Vec<u64> {
        let mut blocks = Vec::new();
        for (i, word) in self.dirty.iter_mut().enumerate() {
            let mut w = std::mem::take(word);
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                blocks.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        blocks
    }

    /// The byte range of `block` in the image. Err: past the end of the disk.
    fn block_range(&self, block: u64) -> std::io::Result<(u64, usize)> {
        if block >= self.blocks() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "block {block} is past the end of {} ({} blocks)",
                    self.path.display(),
                    self.blocks()
                ),
            ));
        }
        let offset = block * DISK_BLOCK_SIZE;
        Ok((offset, (self.size() - offset).min(DISK_BLOCK_SIZE) as usize))
    }

    /// Reads `block` into `buf` (resized to the block's length).
    pub fn read_block(&self, block: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let (offset, len) = self.block_range(block)?;
        buf.resize(len, 0);
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `block` (a repair being installed) without marking it dirty: `data` is the
    /// whole block, or empty for a block of zeroes.
    pub fn write_block(&self, block: u64, data: &[u8]) -> std::io::Result<()> {
        let (offset, len) = self.block_range(block)?;
        if data.is_empty() {
            return self.file.write_all_at(&vec![0u8; len], offset);
        }
        if data.len() != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "block {block} of {} is {len} bytes, {} given",
                    self.path.display(),
                    data.len()
                ),
            ));
        }
        self.file.write_all_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_blocks_and_repairs_do_not() {
        let path = std::env::temp_dir().join(format!("ftvm-disk-{}.img", std::process::id()));
        // Three blocks and a half.
        let size = 3 * DISK_BLOCK_SIZE + DISK_BLOCK_SIZE / 2;
        std::fs::write(&path, vec![0u8; size as usize]).unwrap();
        let mut d = DiskImage::open(&DiskConfig {
            path: path.clone(),
            read_only: false,
        })
        .unwrap();
        assert_eq!(d.blocks(), 4);
        assert!(d.take_dirty_blocks().is_empty());
        // A write across the boundary of blocks 0 and 1, and one in the short last block.
        d.write_at(&[1; 512], DISK_BLOCK_SIZE - 256).unwrap();
        d.write_at(&[2; 512], 3 * DISK_BLOCK_SIZE).unwrap();
        assert_eq!(d.take_dirty_blocks(), vec![0, 1, 3]);
        assert!(d.take_dirty_blocks().is_empty(), "taking resets");
        let mut buf = Vec::new();
        d.read_block(3, &mut buf).unwrap();
        assert_eq!(
            buf.len() as u64,
            DISK_BLOCK_SIZE / 2,
            "the last block is short"
        );
        assert_eq!(&buf[..512], &[2; 512]);
        // A repair writes whole blocks (empty: zeroes) and marks nothing.
        d.write_block(3, &[]).unwrap();
        d.write_block(2, &vec![7; DISK_BLOCK_SIZE as usize])
            .unwrap();
        assert!(d.take_dirty_blocks().is_empty());
        d.read_block(3, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        d.read_block(2, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        // Wrong sizes and blocks past the end are errors, not panics.
        assert!(d.write_block(2, &[1; 10]).is_err());
        assert!(d.read_block(4, &mut buf).is_err());
        assert!(d.write_block(u64::MAX, &[]).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
