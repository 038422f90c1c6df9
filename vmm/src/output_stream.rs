//! The guest's output as one stream of two kinds (DESIGN.md §3, output rule): serial bytes
//! and network frames. A VM with a network card writes its output as records — a kind byte,
//! a little-endian `u32` length, the bytes — so the one output mechanism (sequence numbers,
//! the output buffer, `Released`, the held output a checkpoint carries, re-emission after
//! go-live) holds frames exactly as it holds serial bytes; [`Demux`] splits the stream again
//! where output leaves ftvm: serial bytes to their writer, frames to the TAP. A VM without a
//! card keeps the plain serial byte stream.
//!
//! Every stretch of output the buffer holds or releases is made of whole records (output is
//! held as the exit loop produced it), so a released sequence number is always a record
//! boundary and re-emission past it starts at a record.

use std::io::Write;

use crate::tap::Tap;

/// Record kind: serial bytes.
pub const KIND_SERIAL: u8 = 0;
/// Record kind: one Ethernet frame.
pub const KIND_FRAME: u8 = 1;
const RECORD_HEADER: usize = 5;

/// Appends one record of `kind` holding `data` to `out`.
pub fn encode(kind: u8, data: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

/// Where frames from a [`Demux`] go.
pub trait FrameSink: Send {
    /// Sends one frame; a frame that cannot be sent is dropped (a network drops frames).
    fn send_frame(&mut self, frame: &[u8]);
}

impl FrameSink for Tap {
    fn send_frame(&mut self, frame: &[u8]) {
        if let Err(e) = self.send(frame) {
            tracing::warn!(tap = self.name(), error = %e, "transmitted frame dropped");
        }
    }
}

impl FrameSink for Vec<Vec<u8>> {
    fn send_frame(&mut self, frame: &[u8]) {
        self.push(frame.to_vec());
    }
}

/// Splits a record stream: serial bytes to `serial`, frames to `frames`. Records may arrive
/// split across writes.
pub struct Demux<W, F> {
    serial: W,
    frames: F,
    partial: Vec<u8>,
}

impl<W: Write, F: FrameSink> Demux<W, F> {
    /// A demultiplexer writing serial bytes to `serial` and frames to `frames`.
    pub fn new(serial: W, frames: F) -> Self {
        Self {
            serial,
            frames,
            partial: Vec::new(),
        }
    }

    /// The frame sink.
    pub fn frames(&self) -> &F {
        &self.frames
    }
}

impl<W: Write, F: FrameSink> Write for Demux<W, F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        let mut at = 0;
        while self.partial.len() - at >= RECORD_HEADER {
            let kind = self.partial[at];
            let mut len = [0u8; 4];
            len.copy_from_slice(&self.partial[at + 1..at + RECORD_HEADER]);
            let len = u32::from_le_bytes(len) as usize;
            let end = at + RECORD_HEADER + len;
            if self.partial.len() < end {
                break;
            }
            let data = &self.partial[at + RECORD_HEADER..end];
            match kind {
                KIND_SERIAL => self.serial.write_all(data)?,
                KIND_FRAME => self.frames.send_frame(data),
                other => {
                    return Err(std::io::Error::other(format!(
                        "output stream record of unknown kind {other}"
                    )))
                }
            }
            at = end;
        }
        self.partial.drain(..at);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.serial.flush()
    }
}

/// EtherType of ARP.
const ETH_ARP: u16 = 0x0806;
/// EtherType of IPv4.
const ETH_IPV4: u16 = 0x0800;

/// The IPv4 address the guest uses, as its own transmitted `frame` (from `mac`) shows it: the
/// sender address of an ARP packet, or the source of an IPv4 packet.
pub fn sender_ipv4(frame: &[u8], mac: [u8; 6]) -> Option<[u8; 4]> {
    if frame.len() < 14 || frame[6..12] != mac {
        return None;
    }
    let ip = match u16::from_be_bytes([frame[12], frame[13]]) {
        // ARP for Ethernet/IPv4: the sender protocol address at 14 + 14.
        ETH_ARP if frame.len() >= 42 && frame[14..20] == [0, 1, 8, 0, 6, 4] => &frame[28..32],
        ETH_IPV4 if frame.len() >= 34 && frame[14] >> 4 == 4 => &frame[26..30],
        _ => return None,
    };
    let ip: [u8; 4] = ip.try_into().ok()?;
    (ip != [0; 4]).then_some(ip)
}

/// EtherType of IPv6.
const ETH_IPV6: u16 = 0x86dd;

/// An IPv6 address the guest uses, as its own transmitted `frame` (from `mac`) shows it: the
/// source of an IPv6 packet, unless unspecified (`::`, duplicate address detection).
pub fn sender_ipv6(frame: &[u8], mac: [u8; 6]) -> Option<[u8; 16]> {
    if frame.len() < 54
        || frame[6..12] != mac
        || u16::from_be_bytes([frame[12], frame[13]]) != ETH_IPV6
        || frame[14] >> 4 != 6
    {
        return None;
    }
    let ip: [u8; 16] = frame[22..38].try_into().ok()?;
    (ip != [0; 16]).then_some(ip)
}

/// The one's-complement sum of `data` as 16-bit big-endian words, folded.
fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// An unsolicited neighbour advertisement (RFC 4861 §7.2.6) that `ip` is at `mac`, to all
/// nodes (ff02::1), with the Override flag and the target link-layer address option, so
/// neighbours replace what they cached for `ip`.
pub fn unsolicited_na(mac: [u8; 6], ip: [u8; 16]) -> Vec<u8> {
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    // ICMPv6: type 136, code 0, checksum, flags (Override), target, option 2 (length 1).
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip);
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    // Checksum over the pseudo-header (source, destination, length, next header 58).
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&ip);
    pseudo.extend_from_slice(&all_nodes);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = ones_complement_sum(&icmp, ones_complement_sum(&pseudo, 0));
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_IPV6.to_be_bytes());
    // Version 6, no traffic class or flow label; payload length; next header ICMPv6; hop
    // limit 255 (neighbour discovery is refused with any other).
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&all_nodes);
    f.extend_from_slice(&icmp);
    f
}

/// A gratuitous ARP request announcing that `ip` is at `mac`: broadcast, sender and target
/// address both `ip`, so every bridge and neighbour learns the port the guest is behind now.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    // Ethernet, IPv4, address lengths 6 and 4, request.
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_anywhere_come_out_whole_and_in_order() {
        let mut stream = Vec::new();
        encode(KIND_SERIAL, b"hello ", &mut stream);
        encode(KIND_FRAME, &[1, 2, 3], &mut stream);
        encode(KIND_SERIAL, b"world", &mut stream);
        encode(KIND_FRAME, &[], &mut stream);
        for split in 0..stream.len() {
            let mut d = Demux::new(Vec::new(), Vec::<Vec<u8>>::new());
            d.write_all(&stream[..split]).unwrap();
            d.write_all(&stream[split..]).unwrap();
            assert_eq!(d.serial, b"hello world", "split at {split}");
            assert_eq!(d.frames, vec![vec![1, 2, 3], vec![]], "split at {split}");
            assert!(d.partial.is_empty());
        }
        let mut d = Demux::new(Vec::new(), Vec::<Vec<u8>>::new());
        assert!(d.write(&[9, 0, 0, 0, 0]).is_err(), "an unknown kind");
    }

    #[test]
    fn the_guest_address_is_learnt_from_its_frames_and_announced() {
        let mac = [0x52, 0x54, 0, 0x46, 0x54, 1];
        let garp = gratuitous_arp(mac, [10, 0, 0, 2]);
        assert_eq!(garp.len(), 60);
        assert_eq!(&garp[..6], &[0xff; 6]);
        assert_eq!(sender_ipv4(&garp, mac), Some([10, 0, 0, 2]));
        assert_eq!(&garp[38..42], &[10, 0, 0, 2], "target = sender: gratuitous");
        assert_eq!(
            sender_ipv4(&garp, [2, 0, 0, 0, 0, 1]),
            None,
            "not the guest's"
        );
        let mut ipv4 = vec![0u8; 34];
        ipv4[6..12].copy_from_slice(&mac);
        ipv4[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        ipv4[14] = 0x45;
        ipv4[26..30].copy_from_slice(&[192, 168, 7, 9]);
        assert_eq!(sender_ipv4(&ipv4, mac), Some([192, 168, 7, 9]));
        assert_eq!(sender_ipv4(&ipv4[..20], mac), None);
    }

    #[test]
    fn an_unsolicited_neighbour_advertisement_is_well_formed() {
        let mac = [0x52, 0x54, 0, 0x46, 0x54, 1];
        let ip = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let na = unsolicited_na(mac, ip);
        assert_eq!(na.len(), 14 + 40 + 32);
        assert_eq!(
            &na[..6],
            &[0x33, 0x33, 0, 0, 0, 1],
            "all-nodes multicast MAC"
        );
        assert_eq!((na[20], na[21]), (58, 255), "ICMPv6, hop limit 255");
        assert_eq!((na[54], na[55]), (136, 0), "neighbour advertisement");
        assert_eq!(na[58], 0x20, "Override, not Solicited");
        assert_eq!(&na[62..78], &ip, "target");
        assert_eq!(&na[78..86], &[2, 1, 0x52, 0x54, 0, 0x46, 0x54, 1]);
        // The checksum makes the sum over pseudo-header and message all ones.
        let mut pseudo = ip.to_vec();
        pseudo.extend_from_slice(&na[38..54]);
        pseudo.extend_from_slice(&[0, 0, 0, 32, 0, 0, 0, 58]);
        assert_eq!(
            ones_complement_sum(&na[54..], ones_complement_sum(&pseudo, 0)),
            0xffff
        );
        // The guest's own address is learnt back from it (it is a frame from the guest).
        assert_eq!(sender_ipv6(&na, mac), Some(ip));
        assert_eq!(sender_ipv6(&na, [2, 0, 0, 0, 0, 1]), None);
        let mut dad = na.clone();
        dad[22..38].fill(0);
        assert_eq!(sender_ipv6(&dad, mac), None, "unspecified source");
    }
}
