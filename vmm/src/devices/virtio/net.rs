//! A virtio network device (virtio 1.2, §5.1) with one receive and one transmit queue; it goes
//! on the MMIO bus behind the virtio-mmio transport ([`super::mmio`]).
//!
//! The device has no host side of its own (DESIGN.md §4 "Network"): what the guest transmits
//! goes to a [`NetTxQueue`] that the exit loop drains after each exit and hands to the exit
//! hook as output (live: the TAP; primary: the output buffer, released once verified), and
//! what the guest receives is an input ([`crate::Input::NetRx`]) that the hook offers at an
//! exit, only while the receive queue has a buffer for it ([`crate::HostView::net_rx_ready`]),
//! and that the machine copies into that buffer there. So a frame enters guest memory only at
//! an exit, and a replay that is offered the same frames at the same exits does the same
//! memory writes.
//!
//! No offloads are offered (no checksum, TSO or mergeable buffers): every frame is a whole
//! Ethernet frame preceded by a zero `virtio_net_hdr_v1`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{MmioState, MmioTransport, Processed, VirtioDevice, TYPE_NET};
use crate::bus::lock;
use crate::memory::GuestMemory;
use crate::state::{Persist, StateError};

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// Entries in each queue.
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (VIRTIO_F_VERSION_1: `num_buffers` is always there).
pub const NET_HDR_LEN: usize = 12;
/// The largest frame the device takes from the guest or gives it: without TSO or mergeable
/// buffers the guest sends and expects nothing past an Ethernet frame of its MTU; this leaves
/// room for a VLAN tag and jumbo frames and bounds what one descriptor chain can make the
/// device allocate.
pub const MAX_FRAME: usize = 9216 + 18;

/// A network device on its virtio-mmio window: what the machine puts on the MMIO bus.
pub type VirtioNet = MmioTransport<Net>;
/// The saved state of a [`VirtioNet`] (the network device keeps none of its own).
pub type VirtioNetState = MmioState<<Net as Persist>::State>;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The address the guest gets when `--net` names none: locally administered, unicast,
    /// the same on both hosts of a pair (the guest must not see another card after go-live).
    pub const DEFAULT: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x46, 0x54, 0x01]);

    /// The six octets, big-endian, in the low 48 bits (how the log header carries it).
    pub fn to_u64(self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.0);
        u64::from_be_bytes(b)
    }

    /// The address [`MacAddr::to_u64`] gave; None past 48 bits.
    pub fn from_u64(v: u64) -> Option<Self> {
        let b = v.to_be_bytes();
        if b[..2] != [0, 0] {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[2..]);
        Some(Self(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    /// Six hex octets separated by colons (`52:54:00:12:34:56`); a unicast address.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("malformed MAC address {s:?} (six hex octets: 52:54:00:12:34:56)");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac == [0; 6] {
            return Err(format!(
                "MAC address {s} is all zeroes; give the card a real one"
            ));
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "MAC address {s} is a multicast address; the guest's card needs a unicast one"
            ));
        }
        Ok(Self(mac))
    }
}

/// How the network card is attached: `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host TAP device the card's frames go through.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
}

/// The longest interface name Linux takes (IFNAMSIZ less the NUL).
pub const MAX_IFNAME: usize = 15;

impl std::str::FromStr for NetConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = MacAddr::DEFAULT;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = m.parse()?,
                _ => {
                    return Err(format!(
                        "unknown network option {part:?} (tap=NAME[,mac=MAC] expected)"
                    ))
                }
            }
        }
        let tap = tap.ok_or_else(|| format!("--net {s}: no tap=NAME given"))?;
        if tap.is_empty() || tap.len() > MAX_IFNAME || tap.contains(['/', ' ', '\0']) {
            return Err(format!(
                "TAP name {tap:?} is not a valid interface name (1 to {MAX_IFNAME} characters, no '/' or spaces)"
            ));
        }
        Ok(Self { tap, mac })
    }
}

/// Frames the guest transmitted, whole Ethernet frames in order, until the exit loop takes
/// them.
#[derive(Debug, Clone, Default)]
pub struct NetTxQueue(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl NetTxQueue {
    /// Takes every frame transmitted since the last call.
    pub fn drain(&self) -> Vec<Vec<u8>> {
        lock(&self.0).drain(..).collect()
    }

    fn push(&self, frame: Vec<u8>) {
        lock(&self.0).push_back(frame);
    }
}

/// The network device behind the transport.
pub struct Net {
    mac: MacAddr,
    tx: NetTxQueue,
}

impl Net {
    /// A card with address `mac` whose transmitted frames go to `tx`.
    pub fn new(mac: MacAddr, tx: NetTxQueue) -> Self {
        Self { mac, tx }
    }

    /// The card's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Puts `frame` into the next receive buffer. A frame that does not fit the buffer is
    /// dropped (the buffer goes back empty, which the driver counts as a length error), as
    /// a real card drops what its ring cannot hold.
    pub fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory, frame: &[u8]) -> Processed {
        let mut done = Processed::default();
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                tracing::warn!(error = %e, "virtio-net: bad receive ring");
                done.broken = true;
                return done;
            }
        };
        let Some(chain) = chain else {
            tracing::warn!(
                len = frame.len(),
                "virtio-net: frame offered with no receive buffer, dropped"
            );
            return done;
        };
        let head = chain.head_index();
        let buffers: Vec<(GuestAddress, u32, bool)> = chain
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        let written = Self::fill(mem, &buffers, frame);
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!(error = %e, "virtio-net: cannot complete a receive buffer");
            done.broken = true;
            return done;
        }
        done.used = true;
        done
    }

    /// Writes the header and `frame` across the writable `buffers`; the bytes written, 0
    /// when the frame does not fit or a buffer is not writable.
    fn fill(mem: &GuestMemory, buffers: &[(GuestAddress, u32, bool)], frame: &[u8]) -> u32 {
        let room: u64 = buffers.iter().map(|b| u64::from(b.1)).sum();
        let total = NET_HDR_LEN + frame.len();
        if buffers.iter().any(|b| !b.2) || room < total as u64 || frame.len() > MAX_FRAME {
            tracing::warn!(
                len = frame.len(),
                room,
                "virtio-net: received frame does not fit the receive buffer, dropped"
            );
            return 0;
        }
        let mut header = [0u8; NET_HDR_LEN];
        // num_buffers: the frame is in this one buffer.
        header[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut bytes = header.iter().chain(frame.iter()).copied();
        let mut left = total;
        for &(addr, len, _) in buffers {
            if left == 0 {
                break;
            }
            let n = (len as usize).min(left);
            let chunk: Vec<u8> = bytes.by_ref().take(n).collect();
            if mem.write_slice(&chunk, addr).is_err() {
                tracing::warn!("virtio-net: receive buffer outside guest memory");
                return 0;
            }
            left -= n;
        }
        total as u32
    }

    /// Takes one transmitted frame out of `buffers` (the header, then the frame); None for
    /// a malformed request, which is completed and dropped.
    fn transmit(mem: &GuestMemory, buffers: &[(GuestAddress, u32, bool)]) -> Option<Vec<u8>> {
        let total: u64 = buffers.iter().map(|b| u64::from(b.1)).sum();
        if buffers.iter().any(|b| b.2) {
            tracing::warn!("virtio-net: device-writable buffer in a transmit request, dropped");
            return None;
        }
        if total < NET_HDR_LEN as u64 || total > (NET_HDR_LEN + MAX_FRAME) as u64 {
            tracing::warn!(total, "virtio-net: transmit request of a bad size, dropped");
            return None;
        }
        let mut all = vec![0u8; total as usize];
        let mut at = 0;
        for &(addr, len, _) in buffers {
            let len = len as usize;
            if mem.read_slice(&mut all[at..at + len], addr).is_err() {
                tracing::warn!("virtio-net: transmit buffer outside guest memory, dropped");
                return None;
            }
            at += len;
        }
        all.drain(..NET_HDR_LEN);
        Some(all)
    }
}

impl VirtioDevice for Net {
    const NAME: &'static str = "virtio-net";

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6]; the rest (status, queue pairs, MTU) belongs to
        // features not offered.
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.mac.0.get(o + i).copied())
                .unwrap_or(0);
        }
    }

    /// Transmit: every frame the driver made available goes to the transmit queue. Receive:
    /// the driver added buffers; frames come only as inputs, so there is nothing to do.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> Processed {
        let mut done = Processed::default();
        if index != TX_QUEUE {
            return done;
        }
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-net: bad transmit ring");
                    done.broken = true;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, u32, bool)> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            if let Some(frame) = Self::transmit(mem, &buffers) {
                self.tx.push(frame);
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!(error = %e, "virtio-net: cannot complete a transmit request");
                done.broken = true;
                break;
            }
            done.used = true;
        }
        done
    }
}

/// The network device's state is all in its queues (frames in flight are inputs and output,
/// owned by the exit hook).
impl Persist for Net {
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
    use crate::bus::BusDevice;
    use crate::devices::virtio::mmio::{REG_CONFIG, REG_DEVICE_FEATURES, REG_DEVICE_ID};
    use crate::devices::virtio::test_driver::{Driver, IRQ};

    fn rig() -> (Driver<Net>, NetTxQueue) {
        let tx = NetTxQueue::default();
        let mac = "52:54:00:aa:bb:cc".parse().unwrap();
        (Driver::new(Net::new(mac, tx.clone()), 2), tx)
    }

    #[test]
    fn transmitted_frames_leave_whole_without_the_header() {
        let (mut d, tx) = rig();
        assert_eq!(d.reg(REG_DEVICE_ID), TYPE_NET);
        assert_eq!(d.reg(REG_DEVICE_FEATURES), 1 << VIRTIO_NET_F_MAC);
        let mut mac = [0u8; 6];
        d.dev.read(0, REG_CONFIG, &mut mac);
        assert_eq!(mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

        // Header and frame in one buffer, then split over two.
        d.mem.write_slice(&[0; 12], GuestAddress(0x2_0000)).unwrap();
        d.mem
            .write_slice(&[7u8; 60], GuestAddress(0x2_0000 + 12))
            .unwrap();
        d.request_on(1, &[(0x2_0000, 72, false)]);
        d.mem.write_slice(&[0; 12], GuestAddress(0x2_1000)).unwrap();
        d.mem
            .write_slice(&[1, 2, 3], GuestAddress(0x2_2000))
            .unwrap();
        d.request_on(1, &[(0x2_1000, 12, false), (0x2_2000, 3, false)]);
        assert_eq!(tx.drain(), vec![vec![7u8; 60], vec![1, 2, 3]]);
        assert_eq!(d.used_idx(1), 2);
        assert_eq!(d.lines.take(), 1 << IRQ);
        // A request shorter than the header, or device-writable: completed, not sent.
        d.request_on(1, &[(0x2_0000, 4, false)]);
        d.request_on(1, &[(0x2_0000, 72, true)]);
        assert!(tx.drain().is_empty());
        assert_eq!(d.used_idx(1), 4);
    }

    #[test]
    fn a_received_frame_fills_the_next_buffer_only_when_one_is_there() {
        let (mut d, _tx) = rig();
        assert!(!d.dev.has_available(RX_QUEUE), "no buffer posted yet");
        let frame: Vec<u8> = (0..100u8).collect();
        // Nothing posted: the frame is dropped, nothing is used.
        d.dev
            .serve_queue(RX_QUEUE, |n, q, m| n.receive(q, m, &frame));
        assert_eq!(d.used_idx(0), 0);

        // Linux posts header and data as one writable buffer.
        d.request(&[(0x8000, 1526, true)]);
        assert!(d.dev.has_available(RX_QUEUE));
        assert_eq!(d.lines.take(), 0, "posting buffers uses none");
        d.dev
            .serve_queue(RX_QUEUE, |n, q, m| n.receive(q, m, &frame));
        assert!(!d.dev.has_available(RX_QUEUE));
        assert_eq!(d.used_idx(0), 1);
        assert_eq!(d.used_len(0, 0), 112);
        assert_eq!(d.lines.take(), 1 << IRQ);
        let mut got = [0u8; 112];
        d.mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[12..], &frame[..]);

        // A buffer too small for the frame goes back empty.
        d.request(&[(0x9000, 50, true)]);
        d.dev
            .serve_queue(RX_QUEUE, |n, q, m| n.receive(q, m, &frame));
        assert_eq!((d.used_idx(0), d.used_len(0, 1)), (2, 0));
    }

    #[test]
    fn net_options_parse_and_refuse_what_is_malformed() {
        let n: NetConfig = "tap=ftvm0".parse().unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("ftvm0", MacAddr::DEFAULT));
        let n: NetConfig = "tap=t1,mac=02:00:00:00:00:0A".parse().unwrap();
        assert_eq!(n.mac.to_string(), "02:00:00:00:00:0a");
        assert_eq!(MacAddr::from_u64(n.mac.to_u64()), Some(n.mac));
        assert_eq!(n.mac.to_u64(), 0x0200_0000_000a);
        assert_eq!(MacAddr::from_u64(1 << 48), None);
        assert!("tap=t1,mac=00:00:00:00:00:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("all zeroes"));
        for bad in [
            "tap=t1,mac=02:00:00:00:00",
            "tap=t1,mac=02:00:00:00:00:00:00",
            "tap=t1,mac=0g:00:00:00:00:00",
            "tap=t1,mac=2:00:00:00:00:000",
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err();
            assert!(e.contains("malformed MAC address"), "{bad}: {e}");
        }
        assert!("tap=t1,mac=01:00:5e:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("mac=02:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("no tap"));
        assert!("tap=a-name-far-too-long".parse::<NetConfig>().is_err());
        assert!("tap=t1,fast".parse::<NetConfig>().is_err());
    }
}
