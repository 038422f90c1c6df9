//! The primary of a protected pair (`ftvm run --peer`): connect to the standby, send it the
//! VM it must build, then record with the log going to the channel thread and guest output
//! going through the output buffer (DESIGN.md §3).

use std::io::Write;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use ftvm_proto::channel::{Role, Start};
use ftvm_proto::log::{LogHeader, RecordBatch};
use ftvm_replication::disk_resync::PrimaryDisks;
use ftvm_replication::link;
use ftvm_replication::primary::{
    offer_vm, Feed, FromVcpu, Handover, PrimaryChannel, PrimaryReport, PrimarySetup,
};
use ftvm_replication::{ChannelError, ChannelOptions, Link, Position};
use ftvm_vmm::devices::virtio::block::DiskConfig;
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::{LiveHook, NetRx};
use ftvm_vmm::Vm;

use crate::{record, EpochPolicy, LogSink, RecordEnd, RecordError, Recorder};

/// The log goes to the channel thread.
pub struct ChannelSink(Feed);

impl LogSink for ChannelSink {
    fn write_batch(&mut self, batch: RecordBatch) -> std::io::Result<()> {
        self.0.send(FromVcpu::Batch(batch))
    }

    fn write_epoch(&mut self, batch: RecordBatch, closing: Instant) -> std::io::Result<()> {
        self.0.send(FromVcpu::Epoch { batch, closing })
    }
}

/// A standby connected and through the handshake, not yet sent the VM
/// ([`handshake_standby`], then [`JoinedStandby::offer`]).
pub struct JoinedStandby {
    h: link::Handshaken,
    peer: String,
    /// The pair's TSC mode: exits when this primary offered them and the standby's host
    /// has them too.
    pub tsc_exits: bool,
}

/// Connects to the standby at `peer` (retrying until `timeout`) and does the handshake,
/// which settles the pair's TSC mode ([`JoinedStandby::tsc_exits`]): exits when `tsc`
/// offers them and the standby's host has them too; a standby without them is refused
/// ([`ChannelError::NoTscExits`]) when `tsc` requires them. The caller builds the guest for
/// that mode (its CPUID table and command line depend on it: `ftvm_vmm::tsc`) before
/// [`JoinedStandby::offer`].
pub fn handshake_standby(
    peer: &str,
    timeout: Duration,
    options: &ftvm_replication::ChannelOptions,
    tsc: TscOffer,
) -> Result<JoinedStandby, ChannelError> {
    let stream = link::connect(peer, timeout)?;
    let me = link::Me {
        role: Role::Primary,
        initiator: true,
        security: &options.security,
    };
    let h = link::handshake(stream, peer, me, options.heartbeat)?;
    // TSC-read exits only where both hosts have them (DESIGN.md §2).
    if tsc == TscOffer::Required && !h.hello.tsc_exits {
        return Err(ChannelError::NoTscExits { peer: peer.into() });
    }
    if tsc == TscOffer::Offered && !h.hello.tsc_exits {
        tracing::warn!(
            peer,
            "the standby's host has no TSC-read exits: the pair repairs what the TSC makes \
             diverge (--tsc auto)"
        );
    }
    Ok(JoinedStandby {
        tsc_exits: tsc != TscOffer::No && h.hello.tsc_exits,
        h,
        peer: peer.into(),
    })
}

impl JoinedStandby {
    /// Sends the standby the VM: the log header (its `tsc_exits` set to the pair's mode),
    /// the kernel image and the initrd; then serves the standby's disk resync from the
    /// images at `disks` (only blocks that differ are sent). A standby that cannot build it
    /// (a missing disk copy, one of another size) is [`ChannelError::Refused`].
    pub fn offer(
        self,
        header: &mut LogHeader,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        disks: &[DiskConfig],
        options: &ftvm_replication::ChannelOptions,
    ) -> Result<Link, ChannelError> {
        header.tsc_exits = self.tsc_exits;
        let mut start = start_message(header.clone(), kernel, initrd, false);
        // With a witness, the standby learns the VM's id there and the term.
        if let Some(w) = &options.witness {
            let t = w.pair_term();
            start.vm_id = t.vm_id;
            start.term = t.term;
            start.set_arbiter(w.backend.kind());
        }
        // The standby answers Ack(0) once its VM is built (or Diverged when it cannot build
        // it): only then does the guest start, so the standby does not begin the run behind.
        let disks = PrimaryDisks::new(disks.iter().map(|d| d.path.clone()).collect());
        Ok(offer_vm(self.h, &self.peer, start, &disks)?.0)
    }
}

/// Whether this primary would run its guest with TSC-read exits (`ftvm run --tsc`, and
/// whether its host has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscOffer {
    /// This host has none, or `--tsc repair`.
    No,
    /// `--tsc auto` on a host that has them: used when the standby's host has them too.
    Offered,
    /// `--tsc exits`: a standby whose host lacks them is refused.
    Required,
}

/// What a standby is sent first: the VM to build, and whether a sync follows.
pub fn start_message(header: LogHeader, kernel: &[u8], initrd: Option<&[u8]>, sync: bool) -> Start {
    Start {
        header: Some(header),
        kernel: kernel.to_vec(),
        initrd: initrd.map(<[u8]>::to_vec).unwrap_or_default(),
        sync,
        ..Default::default()
    }
}

/// Where a primary starts: at the guest's boot (the default), or where an old primary
/// handed over.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartAt {
    /// The end of the last epoch recorded before (the default position at boot): recording
    /// goes on with epoch `after.epoch + 1`, and the guest's next output byte has sequence
    /// number `after.output_seq`.
    pub after: Position,
    /// The guest's virtual clock (ns).
    pub clock_ns: u64,
}

impl StartAt {
    /// The first epoch to record (1 at boot).
    pub fn first_epoch(&self) -> u64 {
        self.after.epoch + 1
    }
}

/// How a primary's run ended.
pub enum PrimaryEnd {
    /// The guest stopped.
    Stopped(StopRequest, PrimaryReport),
    /// `ftvm switchover`: the standby is the primary now; this VM is paused at the handover
    /// point and follows it from there.
    HandedOver(Box<Handover>, PrimaryReport),
}

/// Runs `vm` as the primary from `at`: recording under `policy` into the channel over `link`
/// (Err: no standby, running unprotected for the reason given), guest input from `input`,
/// guest output to `out` once the standby verified it; until the guest stops or a
/// switchover hands the primary's role to the standby.
#[allow(clippy::too_many_arguments)]
pub fn run_primary(
    vm: &mut Vm,
    policy: EpochPolicy,
    link: Result<Link, String>,
    options: ChannelOptions,
    start: Start,
    accept: Option<std::net::TcpListener>,
    at: StartAt,
    input: Option<Receiver<Vec<u8>>>,
    net: Option<NetRx>,
    out: Box<dyn Write + Send>,
) -> Result<PrimaryEnd, RecordError> {
    let setup = PrimarySetup {
        memory: vm.memory().clone(),
        start: Start {
            sync: true,
            ..start
        },
        accept,
        after: at.after,
        disks: PrimaryDisks::new(vm.disk_paths()),
    };
    let channel = PrimaryChannel::spawn(link, out, options, setup).map_err(RecordError::Log)?;
    let port = channel.vcpu_port();
    let live = if at.first_epoch() > 1 {
        LiveHook::resume(input, channel.feed(), at.clock_ns)
    } else {
        LiveHook::new(input, channel.feed())
    }
    .with_doorbell(port.doorbell.clone());
    // A network card: transmitted frames join the serial bytes in the one output stream,
    // held until verified like them; `out` splits them again.
    let live = match net {
        Some(net) => live.with_muxed_net(net),
        None => live,
    };
    let mut recorder = Recorder::new(live, ChannelSink(channel.feed()), policy)
        .with_checkpoints(port.clone())
        .starting_at(at.first_epoch());
    let result = loop {
        match record(vm, &mut recorder) {
            Ok(RecordEnd::Switchover) => {
                let stopped = FromVcpu::Stopped {
                    epoch: recorder.epoch() - 1,
                    exit_seq: vm.exit_seq().0,
                };
                if let Err(e) = channel.feed().send(stopped) {
                    break Err(RecordError::Log(e));
                }
                match port.handover.recv() {
                    Ok(Ok(handover)) => {
                        drop(recorder);
                        let report = channel.join();
                        return Ok(PrimaryEnd::HandedOver(Box::new(handover), report));
                    }
                    // Abandoned: record on from here.
                    Ok(Err(_)) => continue,
                    Err(_) => {
                        break Err(RecordError::Log(std::io::Error::other(
                            "the replication channel thread has stopped",
                        )))
                    }
                }
            }
            Ok(RecordEnd::Stopped(stop)) => break Ok(stop),
            Err(e) => break Err(e),
        }
    };
    let mut result = result;
    if let Err(e) = channel.feed().send(FromVcpu::End) {
        tracing::warn!("{e}");
    }
    if let Ok(stop) = result {
        // A standby that diverged in the last epoch still gets its repair.
        if let Err(e) = recorder.serve_after_end(vm, stop) {
            result = Err(e);
        }
    }
    let stats = recorder.stats();
    tracing::info!(
        epochs = stats.epochs,
        checkpoint_required = stats.checkpoint_required,
        tsc_reads = stats.tsc_reads,
        net_rx_frames = stats.net_rx_frames,
        net_rx_bytes = stats.net_rx_bytes,
        net_tx_frames = stats.net_tx_frames,
        net_tx_bytes = stats.net_tx_bytes,
        guest_ms = vm.clock_ns() / 1_000_000,
        "recorder stats"
    );
    drop(recorder);
    drop(port);
    let report = channel.join();
    result.map(|stop| PrimaryEnd::Stopped(stop, report))
}
