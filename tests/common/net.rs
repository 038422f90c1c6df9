//! The host side of the guest's network card for tests and benchmarks: a TAP made for the
//! run, an AF_PACKET socket on it, and the frames the built-in guest's `netecho` workload
//! answers (guest/src/netecho.c). Needs root. Like the other helpers for tests, these panic
//! on failure.

use std::process::{Command, Stdio};
use std::time::Duration;

/// EtherType the guest answers (guest/src/netecho.c).
pub const NETECHO_TYPE: u16 = 0x88b5;
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x46, 0x54, 0x01];

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2; scripts/setup.sh installs it)");
    assert!(o.status.success(), "ip {args:?}: {o:?}");
}

/// A persistent TAP made for the test (no IPv6, so the host sends no chatter on it), up,
/// deleted on drop.
pub struct TestTap(pub String);

impl TestTap {
    pub fn new(tag: &str) -> Self {
        let name = format!("ft{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let sysctl = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if std::path::Path::new(&sysctl).exists() {
            std::fs::write(&sysctl, "1").expect("disable IPv6 on the test TAP");
        }
        ip(&["link", "set", &name, "up"]);
        Self(name)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// An AF_PACKET socket on the host side of a TAP, for frames of one EtherType.
pub struct PacketSocket {
    fd: libc::c_int,
    ifindex: libc::c_int,
}

impl PacketSocket {
    pub fn open(ifname: &str) -> Self {
        Self::open_for(ifname, NETECHO_TYPE)
    }

    pub fn open_for(ifname: &str, ethertype: u16) -> Self {
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as libc::c_int;
        assert!(ifindex > 0, "no interface {ifname}");
        let proto = ethertype.to_be() as libc::c_int;
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // A failure guard, not a timed assertion: a guest that never answers fails the
        // test instead of hanging it.
        let tv = libc::timeval {
            tv_sec: 120,
            tv_usec: 0,
        };
        // SAFETY: a timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd, ifindex }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// How long a receive waits before it gives up (default 120 s).
    pub fn set_timeout(&self, d: Duration) {
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a timeval of the size given.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
    }

    /// The next frame that came from the guest (the socket also sees the test's own).
    pub fn recv_from_guest(&self) -> Vec<u8> {
        self.try_recv_from_guest().unwrap_or_else(|| {
            panic!(
                "no answer from the guest: {}",
                std::io::Error::last_os_error()
            )
        })
    }

    /// The next frame that came from the guest; None once the receive timeout passes.
    pub fn try_recv_from_guest(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return None;
            }
            let frame = &buf[..n as usize];
            if frame.len() >= 12 && frame[6..12] == GUEST_MAC {
                return Some(frame.to_vec());
            }
        }
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the socket this struct owns.
        unsafe { libc::close(self.fd) };
    }
}

/// A frame of the test's: to the guest, from a made-up host MAC, NETECHO_TYPE, a payload
/// naming `i`, padded to the Ethernet minimum.
pub fn frame(i: usize) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    f.extend_from_slice(&NETECHO_TYPE.to_be_bytes());
    f.extend_from_slice(format!("ftvm frame {i}").as_bytes());
    f.resize(60 + i, 0xa5);
    f
}

/// The address the test's IPv4 frames are sent to: the guest's, as its answers show it.
pub const GUEST_IP: [u8; 4] = [10, 9, 0, 2];
pub const HOST_IP: [u8; 4] = [10, 9, 0, 1];

/// An IPv4 frame to the guest (protocol 253, for experiments), with a valid header checksum
/// (a bridge with `bridge-nf-call-iptables` drops a bad one) and TTL 1, so the guest's answer,
/// which the host's stack sees on the TAP, is never routed on.
pub fn ipv4_frame(i: usize) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let payload = format!("ftvm ipv4 frame {i}");
    let total = 20 + payload.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 1, 253, 0, 0]);
    f.extend_from_slice(&HOST_IP);
    f.extend_from_slice(&GUEST_IP);
    let mut sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(payload.as_bytes());
    f.resize(60.max(f.len()), 0);
    f
}

/// The guest's IPv6 address in the test's IPv6 frames.
pub const GUEST_IP6: [u8; 16] = [0xfd, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const HOST_IP6: [u8; 16] = [0xfd, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An IPv6 frame to the guest (next header 253, for experiments).
pub fn ipv6_frame(i: usize) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let payload = format!("ftvm ipv6 frame {i}");
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[253, 64]);
    f.extend_from_slice(&HOST_IP6);
    f.extend_from_slice(&GUEST_IP6);
    f.extend_from_slice(payload.as_bytes());
    f
}

pub fn assert_answer(got: &[u8], sent: &[u8], i: usize) {
    assert_eq!(
        &got[..6],
        &sent[6..12],
        "answer {i} goes back to the sender"
    );
    assert_eq!(
        &got[26..30],
        &GUEST_IP,
        "answer {i} from the guest's address"
    );
    assert_eq!(&got[30..34], &HOST_IP, "answer {i} to the sender's address");
    assert_eq!(&got[34..], &sent[34..], "answer {i} carries the payload");
}

/// A bridge with `ports` (TAPs of the test) on it and a veth pair whose outer end joins it:
/// the client's side of a host's network (`client` is the other end's name). No IPv6 on any
/// of them. Deleted on drop (the veth pair goes with its end).
pub struct TestBridge {
    pub name: String,
    pub client: String,
    veth: String,
}

impl TestBridge {
    pub fn new(tag: &str, ports: &[&TestTap]) -> Self {
        let id = std::process::id() % 100_000;
        let (name, veth, client) = (
            format!("fb{tag}{id}"),
            format!("fv{tag}{id}"),
            format!("fc{tag}{id}"),
        );
        for n in [&name, &veth] {
            let _ = Command::new("ip")
                .args(["link", "del", n])
                .stderr(Stdio::null())
                .status();
        }
        ip(&["link", "add", &name, "type", "bridge"]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", &client,
        ]);
        for n in [&name, &veth, &client] {
            let sysctl = format!("/proc/sys/net/ipv6/conf/{n}/disable_ipv6");
            if std::path::Path::new(&sysctl).exists() {
                std::fs::write(&sysctl, "1").expect("disable IPv6");
            }
        }
        ip(&["link", "set", &veth, "master", &name]);
        for p in ports {
            ip(&["link", "set", &p.0, "master", &name]);
        }
        for n in [&name, &veth, &client] {
            ip(&["link", "set", n, "up"]);
        }
        Self { name, client, veth }
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}
