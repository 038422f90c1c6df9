//! Authentication and encryption of every pair process's connections: the pair channel, the
//! join port and the control socket (DESIGN.md §6).
//!
//! A Noise handshake (`Noise_NNpsk0_25519_AESGCM_BLAKE2s`) with the pair's pre-shared key
//! (`ftvm keygen`) runs before anything else is sent: the initiator's first message already
//! carries a tag only the key can make, the responder's answer one too, so both sides know
//! the other holds the key before a byte of state is exchanged, and the ephemeral
//! Diffie-Hellman gives each connection its own keys (forward secrecy). After it, every byte
//! travels in records `[len u16 BE][ciphertext + 16-byte tag]` of at most 65535 bytes (the
//! Noise limit); the ftvm frames inside are cut across records as they come.
//!
//! A handshake message is at most [`MAX_HANDSHAKE_MESSAGE`] bytes and the whole handshake
//! has one deadline, so a peer without the key gets nothing and holds nothing.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use prost::bytes::BufMut;

pub use super::key::{KeyError, PairKey, KEY_LEN};
use super::ChannelError;

/// The Noise protocol every connection runs: AES-256-GCM measured a few µs faster per ack
/// than ChaCha20-Poly1305 on this machine's AES-NI (`ftvm bench` measures both).
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
/// The same with ChaCha20-Poly1305 (measured by the bench).
pub const NOISE_PARAMS_CHACHA: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The AEAD tag on each record.
const TAG_LEN: usize = 16;
/// The largest Noise message.
const MAX_RECORD: usize = 65535;
/// The most plaintext one record carries.
pub const MAX_PLAIN: usize = MAX_RECORD - TAG_LEN;
/// The largest handshake message accepted (NNpsk0's are 48 bytes).
pub const MAX_HANDSHAKE_MESSAGE: usize = 128;

/// How a pair process protects its connections.
#[derive(Debug, Clone, Default)]
pub enum Security {
    /// Plain TCP (`--insecure`): only for a trusted link.
    #[default]
    Insecure,
    /// Noise with the pair's key.
    Key(Arc<PairKey>),
}

impl Security {
    /// With `key`.
    pub fn key(key: PairKey) -> Self {
        Security::Key(Arc::new(key))
    }

    /// What `ftvm status` says (`channel=`).
    pub fn describe(&self) -> String {
        match self {
            Security::Insecure => "insecure".into(),
            Security::Key(k) => format!("noise-psk key={}", k.fingerprint()),
        }
    }
}

/// What a connection is for: mixed into the handshake, so a connection made for one purpose
/// cannot be passed off as another.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// The pair channel or the join port.
    Pair,
    /// The control socket.
    Control,
    /// `ftvm bench`.
    Bench,
}

impl Purpose {
    fn prologue(self) -> &'static [u8] {
        match self {
            Purpose::Pair => b"ftvm pair channel v1",
            Purpose::Control => b"ftvm control socket v1",
            Purpose::Bench => b"ftvm bench v1",
        }
    }
}

/// The keys of an established connection: seals what this side sends, opens what arrives.
pub struct Cipher {
    state: Box<snow::TransportState>,
    /// Where one record is opened.
    scratch: Vec<u8>,
}

/// A record that does not authenticate.
#[derive(Debug, thiserror::Error)]
#[error("a record that does not authenticate (tampered, or sealed with another key)")]
pub struct BadRecord;

impl Cipher {
    /// Both ends of a connection keyed with `key`, made in memory (for tests and fuzzing):
    /// what the first seals, the second opens.
    pub fn loopback(key: &PairKey) -> Option<(Cipher, Cipher)> {
        let build = |initiator: bool| {
            let b = snow::Builder::new(NOISE_PARAMS.parse().ok()?)
                .prologue(Purpose::Pair.prologue())
                .and_then(|b| b.psk(0, &key.0))
                .ok()?;
            match initiator {
                true => b.build_initiator().ok(),
                false => b.build_responder().ok(),
            }
        };
        let (mut i, mut r) = (build(true)?, build(false)?);
        let (mut m, mut scratch) = ([0u8; MAX_HANDSHAKE_MESSAGE], [0u8; MAX_HANDSHAKE_MESSAGE]);
        let n = i.write_message(&[], &mut m).ok()?;
        r.read_message(&m[..n], &mut scratch).ok()?;
        let n = r.write_message(&[], &mut m).ok()?;
        i.read_message(&m[..n], &mut scratch).ok()?;
        let cipher = |h: snow::HandshakeState| h.into_transport_mode().ok().map(Cipher::new);
        Some((cipher(i)?, cipher(r)?))
    }

    fn new(state: snow::TransportState) -> Self {
        Self {
            state: Box::new(state),
            scratch: vec![0; MAX_RECORD],
        }
    }

    /// Appends `plain` to `out` as records.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), BadRecord> {
        for chunk in plain.chunks(MAX_PLAIN) {
            let start = out.len();
            out.resize(start + 2 + chunk.len() + TAG_LEN, 0);
            let n = self
                .state
                .write_message(chunk, &mut out[start + 2..])
                .map_err(|_| BadRecord)?;
            out.truncate(start + 2 + n);
            out[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
        }
        Ok(())
    }

    /// Opens every complete record at the start of `input`, appending the plaintext to `out`;
    /// returns the bytes of `input` used.
    pub fn open<B: BufMut>(&mut self, input: &[u8], out: &mut B) -> Result<usize, BadRecord> {
        let mut used = 0;
        while input.len() - used >= 2 {
            let len = usize::from(u16::from_be_bytes([input[used], input[used + 1]]));
            if len < TAG_LEN {
                return Err(BadRecord);
            }
            if input.len() - used - 2 < len {
                break;
            }
            let n = self
                .state
                .read_message(&input[used + 2..used + 2 + len], &mut self.scratch)
                .map_err(|_| BadRecord)?;
            out.put_slice(&self.scratch[..n]);
            used += 2 + len;
        }
        Ok(used)
    }
}

/// Reads into `buf` from `stream` until it is full, by `deadline`.
fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), io::Error> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs the Noise handshake on `stream` as the side that connected (`initiator`) or
/// accepted, finishing by `deadline`. With [`Security::Insecure`] nothing is exchanged and
/// the connection stays plain (`None`).
pub fn establish(
    stream: &mut TcpStream,
    peer: &str,
    security: &Security,
    purpose: Purpose,
    initiator: bool,
    deadline: Instant,
) -> Result<Option<Cipher>, ChannelError> {
    establish_with(
        stream,
        peer,
        security,
        purpose,
        initiator,
        deadline,
        NOISE_PARAMS,
    )
}

/// [`establish`] with the Noise protocol `params`.
pub fn establish_with(
    stream: &mut TcpStream,
    peer: &str,
    security: &Security,
    purpose: Purpose,
    initiator: bool,
    deadline: Instant,
    params: &str,
) -> Result<Option<Cipher>, ChannelError> {
    let Security::Key(key) = security else {
        return Ok(None);
    };
    let auth = |why: String| ChannelError::Auth {
        peer: peer.into(),
        why,
    };
    let budget = deadline.saturating_duration_since(Instant::now());
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ChannelError::HandshakeTimeout {
            peer: peer.into(),
            timeout: budget,
        },
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => auth(
            "it closed the connection during the key exchange: it refused this side's key \
             (is it given the same --key?) or is not an ftvm peer"
                .into(),
        ),
        _ => ChannelError::io(peer, e),
    };
    let params = params
        .parse()
        .map_err(|e| auth(format!("noise parameters: {e}")))?;
    let builder = snow::Builder::new(params)
        .prologue(purpose.prologue())
        .and_then(|b| b.psk(0, &key.0));
    let mut hs = match initiator {
        true => builder.and_then(|b| b.build_initiator()),
        false => builder.and_then(|b| b.build_responder()),
    }
    .map_err(|e| auth(format!("cannot start the handshake: {e}")))?;
    stream.set_nodelay(true).map_err(io_err)?;
    let mut msg = [0u8; MAX_HANDSHAKE_MESSAGE];
    let mut scratch = [0u8; MAX_HANDSHAKE_MESSAGE];
    let mut send = |hs: &mut snow::HandshakeState, stream: &mut TcpStream| {
        let n = hs
            .write_message(&[], &mut msg)
            .map_err(|e| auth(format!("cannot write the handshake: {e}")))?;
        let mut out = (n as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&msg[..n]);
        stream.write_all(&out).map_err(io_err)
    };
    let mut receive = |hs: &mut snow::HandshakeState, stream: &mut TcpStream| {
        let mut len = [0u8; 2];
        read_exact_by(stream, &mut len, deadline).map_err(io_err)?;
        if &len == b"FT" {
            return Err(auth(
                "it speaks the pair protocol unencrypted (--insecure); give both sides the same --key"
                    .into(),
            ));
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_HANDSHAKE_MESSAGE {
            return Err(auth(format!(
                "it sent a {len}-byte handshake message (at most {MAX_HANDSHAKE_MESSAGE}): not an ftvm peer"
            )));
        }
        let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
        read_exact_by(stream, &mut buf[..len], deadline).map_err(io_err)?;
        hs.read_message(&buf[..len], &mut scratch)
            .map(|_| ())
            .map_err(|_| {
                auth("its handshake does not authenticate: it does not hold this pair's key".into())
            })
    };
    if initiator {
        send(&mut hs, stream)?;
        receive(&mut hs, stream)?;
    } else {
        receive(&mut hs, stream)?;
        send(&mut hs, stream)?;
    }
    let state = hs
        .into_transport_mode()
        .map_err(|e| auth(format!("handshake incomplete: {e}")))?;
    tracing::debug!(peer, "authenticated with the pair key");
    Ok(Some(Cipher::new(state)))
}

/// A blocking connection that seals what is written and opens what is read (plain when it
/// has no [`Cipher`]): for the handshake's messages before a [`Link`](super::Link) takes
/// over, and for the control socket.
pub struct SecureStream {
    tcp: TcpStream,
    cipher: Option<Cipher>,
    /// Ciphertext read and not yet opened.
    sealed: Vec<u8>,
    /// Plaintext opened and not yet read.
    plain: Vec<u8>,
    plain_read: usize,
    deadline: Option<Instant>,
}

impl SecureStream {
    /// `tcp` with `cipher` (from [`establish`]).
    pub fn new(tcp: TcpStream, cipher: Option<Cipher>) -> Self {
        Self {
            tcp,
            cipher,
            sealed: Vec::new(),
            plain: Vec::new(),
            plain_read: 0,
            deadline: None,
        }
    }

    /// Every read must finish by `deadline` (None: the socket's own read timeout applies).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the connection is encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The socket, the cipher, plaintext opened and not yet read, ciphertext not yet opened.
    pub fn into_parts(self) -> (TcpStream, Option<Cipher>, Vec<u8>, Vec<u8>) {
        let mut plain = self.plain;
        plain.drain(..self.plain_read);
        (self.tcp, self.cipher, plain, self.sealed)
    }

    fn read_tcp(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        self.tcp.read(buf)
    }
}

impl Read for SecureStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cipher.is_none() && self.plain_read == self.plain.len() {
            return self.read_tcp(buf);
        }
        let mut chunk = [0u8; 16 * 1024];
        while self.plain_read == self.plain.len() {
            self.plain.clear();
            self.plain_read = 0;
            if let Some(cipher) = &mut self.cipher {
                let used = cipher
                    .open(&self.sealed, &mut self.plain)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                self.sealed.drain(..used);
                if !self.plain.is_empty() {
                    break;
                }
            }
            let n = self.read_tcp(&mut chunk)?;
            if n == 0 {
                return Ok(0);
            }
            self.sealed.extend_from_slice(&chunk[..n]);
        }
        let n = buf.len().min(self.plain.len() - self.plain_read);
        buf[..n].copy_from_slice(&self.plain[self.plain_read..self.plain_read + n]);
        self.plain_read += n;
        Ok(n)
    }
}

impl Write for SecureStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(cipher) = &mut self.cipher else {
            return self.tcp.write(buf);
        };
        let mut sealed = Vec::with_capacity(buf.len() + 2 + TAG_LEN);
        cipher
            .seal(buf, &mut sealed)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.tcp.write_all(&sealed)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair(
        a: Security,
        b: Security,
    ) -> (
        Result<SecureStream, ChannelError>,
        Result<SecureStream, ChannelError>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let deadline = Instant::now() + Duration::from_secs(5);
            establish(&mut s, "client", &b, Purpose::Pair, false, deadline)
                .map(|c| SecureStream::new(s, c))
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = establish(&mut c, "server", &a, Purpose::Pair, true, deadline)
            .map(|cipher| SecureStream::new(c, cipher));
        (client, server.join().expect("server"))
    }

    fn key() -> Security {
        Security::key(PairKey::generate().expect("random"))
    }

    #[test]
    fn the_same_key_talks_both_ways_across_record_boundaries() {
        let k = key();
        let (c, s) = pair(k.clone(), k);
        let (mut c, mut s) = (c.expect("client"), s.expect("server"));
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let writer = std::thread::spawn(move || {
            c.write_all(&big).expect("write");
            c
        });
        let mut got = vec![0u8; 200_000];
        s.read_exact(&mut got).expect("read");
        assert!(got.iter().enumerate().all(|(i, b)| *b == i as u8));
        let mut c = writer.join().expect("writer");
        s.write_all(b"back").expect("write back");
        let mut four = [0u8; 4];
        c.read_exact(&mut four).expect("read back");
        assert_eq!(&four, b"back");
    }

    #[test]
    fn another_key_is_refused_on_both_sides() {
        let (c, s) = pair(key(), key());
        let c = c.err().expect("the client must refuse").to_string();
        let s = s.err().expect("the server must refuse").to_string();
        assert!(c.contains("server") && c.contains("authenticat"), "{c}");
        assert!(s.contains("client") && s.contains("pair's key"), "{s}");
    }

    /// A peer that sends a byte every 20 ms never lets a per-read timeout fire; the one
    /// deadline for the whole handshake ends it.
    #[test]
    fn a_slow_sender_meets_one_deadline_for_the_whole_handshake() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let slow = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let mut first = vec![0u8, 48];
            first.extend_from_slice(&[1; 48]);
            for b in first {
                if c.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let (mut s, _) = l.accept().expect("accept");
        let deadline = Instant::now() + Duration::from_millis(300);
        let result = establish(&mut s, "slow", &key(), Purpose::Pair, false, deadline);
        assert!(
            matches!(result, Err(ChannelError::HandshakeTimeout { .. })),
            "{:?}",
            result.err()
        );
        drop(s);
        let _ = slow.join();
    }

    #[test]
    fn a_tampered_record_does_not_open() {
        let k = key();
        let (c, s) = pair(k.clone(), k);
        let (c, s) = (c.expect("client"), s.expect("server"));
        let (_, Some(mut seal), _, _) = c.into_parts() else {
            panic!("no cipher")
        };
        let (_, Some(mut open), _, _) = s.into_parts() else {
            panic!("no cipher")
        };
        let mut sealed = Vec::new();
        seal.seal(b"hello", &mut sealed).expect("seal");
        sealed[4] ^= 1;
        assert!(open.open(&sealed, &mut Vec::new()).is_err());
    }

    #[test]
    fn key_files_round_trip_and_exposed_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ftvm-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("pair.key");
        let k = PairKey::generate().expect("random");
        k.write_new(&path).expect("write");
        assert!(k.write_new(&path).is_err(), "never overwrites");
        let back = PairKey::load(&path).expect("load");
        assert_eq!(back.to_hex(), k.to_hex());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            PairKey::load(&path),
            Err(KeyError::Exposed { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
