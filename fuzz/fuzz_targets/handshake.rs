//! The pair handshake as a standby runs it, fed arbitrary bytes by a "primary" over a real
//! loopback connection: with the pair key (the first input byte odd), the Noise key exchange
//! (length-prefixed handshake messages, capped); `--insecure` (even), magic, Hello, version,
//! role and host checks. Every outcome is a handshake or a `ChannelError`, never a panic or
//! a hang (the client's side is shut after the bytes, so a short input ends in EOF, not in
//! the handshake timeout).
#![no_main]

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::OnceLock;

use ftvm_proto::channel::Role;
use ftvm_replication::host::HostKind;
use ftvm_replication::link::{self, PairKey, Security};
use libfuzzer_sys::fuzz_target;

fn listener() -> &'static TcpListener {
    static LISTENER: OnceLock<TcpListener> = OnceLock::new();
    LISTENER.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
}

fn key() -> &'static Security {
    static KEY: OnceLock<Security> = OnceLock::new();
    KEY.get_or_init(|| Security::key(PairKey::from_hex(&"ab".repeat(32)).expect("a key")))
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    // What fits in the socket buffers without a reader: the fuzzer's inputs are small.
    let data = &data[..data.len().min(64 << 10)];
    let listener = listener();
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    let Ok(mut client) = TcpStream::connect(addr) else {
        return;
    };
    if client.write_all(data).is_err() || client.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let Ok((server, peer)) = listener.accept() else {
        return;
    };
    let security = match mode & 1 {
        1 => key().clone(),
        _ => Security::Insecure,
    };
    let me = link::Me {
        role: Role::Standby,
        initiator: false,
        security: &security,
    };
    let _ = link::handshake_on(
        server,
        &peer.to_string(),
        me,
        HostKind::local(),
        link::Heartbeat::default(),
    );
});
