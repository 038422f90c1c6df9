//! A host TAP device: the host side of the guest's network card (`--net tap=NAME`).
//!
//! Opened with `IFF_TAP | IFF_NO_PI` and no `IFF_VNET_HDR`: every read is one whole Ethernet
//! frame and every write sends one, and no offload is ever on (the kernel hands a TAP without
//! a vnet header only complete, checksummed frames), so what the guest receives is exactly
//! the bytes the primary logged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use crossbeam_channel::{Receiver, TrySendError};

use crate::devices::virtio::net::{MAX_FRAME, MAX_IFNAME};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Received frames the reader thread keeps for the vCPU thread; past that a frame is
/// dropped, as a card drops what its ring cannot hold.
const RX_BACKLOG: usize = 1024;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device that could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("TAP {name}: cannot open /dev/net/tun: {source} (is the tun module loaded, and is ftvm running as root or with CAP_NET_ADMIN?)")]
    Clone {
        /// The TAP's name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// TUNSETIFF refused the name.
    #[error("TAP {name} cannot be opened: {source}{hint}")]
    Attach {
        /// The TAP's name.
        name: String,
        /// Why.
        source: std::io::Error,
        /// What the error usually means.
        hint: &'static str,
    },
    /// The name is not an interface name.
    #[error("TAP name {0:?} is not a valid interface name")]
    Name(String),
}

/// An opened TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP device `name`, creating it if no interface has that name (a TAP
    /// created here goes away when ftvm exits; one made persistent beforehand with
    /// `ip tuntap add` stays, with its bridge port).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > MAX_IFNAME || name.as_bytes().contains(&0) {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Clone {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (40 bytes,
        // the name NUL-terminated), on a file descriptor this function owns.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EINVAL) => " (an interface of that name exists and is not a TAP)",
                Some(libc::EBUSY) => " (another process has it open)",
                Some(libc::EPERM) => {
                    " (attaching needs root or CAP_NET_ADMIN, or a TAP created for this user)"
                }
                _ => "",
            };
            return Err(TapError::Attach {
                name: name.to_string(),
                source,
                hint,
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// Another handle on the same TAP (to send from another place).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one frame out of the TAP (to the bridge or the host stack behind it).
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other(format!(
                "short write of a {}-byte frame ({n} bytes)",
                frame.len()
            )));
        }
        Ok(())
    }

    /// Reads the TAP on a thread of its own and delivers each received frame on the
    /// returned channel, which closes if the TAP fails. The thread never touches guest
    /// memory: the exit hook takes the frames at exits.
    pub fn spawn_reader(&self) -> std::io::Result<Receiver<Vec<u8>>> {
        let mut file = self.file.try_clone()?;
        let name = self.name.clone();
        let (tx, rx) = crossbeam_channel::bounded(RX_BACKLOG);
        std::thread::Builder::new()
            .name(format!("ftvm-tap-{name}"))
            .spawn(move || {
                let mut buf = vec![0u8; MAX_FRAME.max(65536)];
                let mut dropped = 0u64;
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) if n > MAX_FRAME => dropped += 1,
                        Ok(n) => match tx.try_send(buf[..n].to_vec()) {
                            Ok(()) => {}
                            Err(TrySendError::Full(_)) => {
                                dropped += 1;
                                if dropped.is_power_of_two() {
                                    tracing::warn!(tap = %name, dropped, "guest not taking frames: received frames dropped");
                                }
                            }
                            Err(TrySendError::Disconnected(_)) => return,
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::error!(tap = %name, error = %e, "TAP read failed: the guest receives no more frames");
                            return;
                        }
                    }
                }
            })?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_that_is_not_a_tap_is_one_clear_error() {
        // `lo` exists on every host and is not a TAP.
        let e = Tap::open("lo").unwrap_err().to_string();
        assert!(
            e.starts_with("TAP lo cannot be opened") && e.contains("not a TAP"),
            "{e}"
        );
        let e = Tap::open("a-name-far-too-long").unwrap_err().to_string();
        assert!(e.contains("not a valid interface name"), "{e}");
    }
}
