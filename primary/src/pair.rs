//! The primary of a protected pair (`ftvm run --peer`): connect to the standby, send it the
//! VM it must build, then record with the log going to the channel thread and guest output
//! going through the output buffer (DESIGN.md §3).

use std::io::Write;
use std::time::Duration;

use crossbeam_channel::Receiver;
use ftvm_proto::channel::{message::Body, Message, Role, Start};
use ftvm_proto::log::{LogHeader, RecordBatch};
use ftvm_replication::link::{self, Handshaken};
use ftvm_replication::primary::{Feed, FromVcpu, PrimaryChannel, PrimaryReport};
use ftvm_replication::{ChannelError, ChannelOptions, Link};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::LiveHook;
use ftvm_vmm::Vm;

use crate::{record, EpochPolicy, LogSink, RecordError, Recorder};

/// The log goes to the channel thread.
pub struct ChannelSink(Feed);

impl LogSink for ChannelSink {
    fn write_batch(&mut self, batch: RecordBatch) -> std::io::Result<()> {
        self.0.send(FromVcpu::Batch(batch))
    }
}

/// Connects to the standby at `peer` (retrying until `timeout`), does the handshake and
/// sends it the VM: the log header and the kernel image.
pub fn connect_standby(
    peer: &str,
    timeout: Duration,
    header: LogHeader,
    kernel: &[u8],
) -> Result<Link, ChannelError> {
    let stream = link::connect(peer, timeout)?;
    let mut h: Handshaken = link::handshake(stream, peer, Role::Primary)?;
    link::send_blocking(
        &mut h.stream,
        peer,
        &Message {
            body: Some(Body::Start(Start {
                header: Some(header),
                kernel: kernel.to_vec(),
            })),
        },
    )?;
    // The standby answers Ack(0) once its VM is built (or Diverged when it cannot build
    // it): only then does the guest start, so the standby does not begin the run behind.
    let msg = link::recv_blocking(&mut h.stream, peer, &mut h.rx_offset)?;
    match msg.body {
        Some(Body::Ack(_)) => {}
        Some(Body::Diverged(d)) => {
            return Err(ChannelError::Unexpected {
                peer: peer.into(),
                expected: "a ready standby",
                got: format!("a standby that cannot build the VM: {}", d.reason),
            })
        }
        _ => {
            return Err(ChannelError::Unexpected {
                peer: peer.into(),
                expected: "Ack (standby ready)",
                got: link::body_name(&msg).into(),
            })
        }
    }
    tracing::info!(peer, standby = h.hello.software, "standby ready");
    Link::new(h)
}

/// Runs `vm` to its end as the primary: recording under `policy` into the channel over
/// `link` (Err: no standby, running unprotected for the reason given), guest input from
/// `input`, guest output to `out` once the standby verified it.
pub fn run_primary(
    vm: &mut Vm,
    policy: EpochPolicy,
    link: Result<Link, String>,
    options: ChannelOptions,
    input: Option<Receiver<Vec<u8>>>,
    out: Box<dyn Write + Send>,
) -> Result<(StopRequest, PrimaryReport), RecordError> {
    let channel = PrimaryChannel::spawn(link, out, options).map_err(RecordError::Log)?;
    let live = LiveHook::new(input, channel.feed());
    let mut recorder = Recorder::new(live, ChannelSink(channel.feed()), policy);
    let result = record(vm, &mut recorder);
    if let Err(e) = channel.feed().send(FromVcpu::End) {
        tracing::warn!("{e}");
    }
    drop(recorder);
    let report = channel.join();
    result.map(|stop| (stop, report))
}
