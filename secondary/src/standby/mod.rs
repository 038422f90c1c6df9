//! The standby of a protected pair (`ftvm standby`): accept a primary, build the VM it
//! describes, replay its log in lockstep as it streams in, answer each epoch, and when the
//! primary is gone, replay everything received and **go live** (DESIGN.md §5).

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::Receiver;
use ftvm_proto::channel::{message::Body, Diverged, Message, Ready, Switchover};
use ftvm_proto::log::LogHeader;
use ftvm_replication::link::{self};
use ftvm_replication::log::{check_net, check_version, config_from_header, logged_mac, LogError};
use ftvm_replication::standby::{FromReplayer, StandbyChannel, ToReplayer};
use ftvm_replication::witness::PairTerm;
use ftvm_replication::{ChannelError, ChannelOptions, Link, Position};
use ftvm_vmm::devices::virtio::block::DiskConfig;
use ftvm_vmm::devices::virtio::net::MacAddr;
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::{LiveError, LiveHook, NetRx};
use ftvm_vmm::output_stream::{encode, gratuitous_arp, unsolicited_na, KIND_FRAME};
use ftvm_vmm::{RunEnd, RunError, Vm};

use crate::resync::{resync_reconnecting, Reconnect, ResyncRecord};
use crate::{replay, ReplayError, Replayer};

mod meet;
mod repair;
mod source;
mod sync;

use meet::{meet, meet_again};
use repair::{await_repair, installed, Repair};
pub use source::{ChannelSource, ReplayedOutput};
use sync::{receive_sync, SyncProgress};

/// The standby could not protect the guest.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// Listening or accepting failed.
    #[error("cannot accept a primary: {0}")]
    Accept(#[source] std::io::Error),
    /// The channel failed before the VM existed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The primary described an unusable VM.
    #[error("the primary sent an unusable VM: {0}")]
    Config(#[source] LogError),
    /// This standby's disk copies do not fit the primary's guest (`ftvm standby --disk`).
    #[error("{0}")]
    Disks(String),
    /// This host cannot run the guest's TSC at the primary's rate.
    #[error("{0}")]
    Tsc(String),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
    /// The guest, live, cannot go on.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// The replayed guest's output could not be written.
    #[error(transparent)]
    Output(std::io::Error),
    /// A checkpoint could not be installed: this standby has no usable copy of the guest.
    #[error("{0}; this standby has no usable copy of the guest, so it stops")]
    Diverged(String),
    /// The primary was lost before the sync completed.
    #[error("the primary was lost during the sync ({0}): this standby has no complete copy of the guest and cannot take over")]
    SyncLost(String),
    /// The log the primary sent is unusable.
    #[error("the primary sent a bad log: {0}")]
    Log(#[source] LogError),
    /// The primary dropped this standby and runs on (`Abandon`): this copy must never go
    /// live (DESIGN.md §5).
    #[error("the primary abandoned this standby: {0}")]
    Abandoned(String),
    /// The primary arbitrates at another kind of arbiter than this standby (`--witness`
    /// on one side, `--etcd` on the other).
    #[error("{0}")]
    Arbiter(String),
    /// The primary won the term at the witness: this copy must never go live.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A thread could not be started.
    #[error("cannot start the channel thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<RunError<LiveError>> for StandbyError {
    fn from(e: RunError<LiveError>) -> Self {
        match e {
            RunError::Vm(e) => e.into(),
            RunError::Hook(e) => e.into(),
        }
    }
}

/// How the standby's run ended.
pub enum StandbyEnd {
    /// The primary ran the guest to its end, verified to the last epoch.
    Completed(StopRequest),
    /// The primary was lost; the standby went live and ran the guest to its end.
    WentLive(StopRequest),
    /// `ftvm switchover`: the primary handed over its role; this host records from here.
    /// Also a standby that went live with `--accept-standby`: it records from where it went
    /// live, unprotected until a new standby joins.
    TookOver(Box<TakeOver>),
}

/// What a standby that takes over the primary's role in a switchover has.
pub struct TakeOver {
    /// The VM, paused at the end of the last verified epoch.
    pub vm: Vm,
    /// The connection to the old primary, the new standby (a switchover); Err: none, the
    /// standby went live and runs unprotected until a standby joins (why).
    pub link: Result<Link, String>,
    /// The log header (the VM configuration).
    pub header: LogHeader,
    /// The kernel image (for standbys that join later).
    pub kernel: Vec<u8>,
    /// The initrd, if the guest has one (likewise).
    pub initrd: Option<Vec<u8>>,
    /// Where the primary handed over: the end of the last epoch, verified by both; every
    /// output byte before `at.output_seq` was released.
    pub at: Position,
    /// The virtual clock the guest goes on from: the VM's own after a switchover, moved on
    /// by the failover's time after a go-live ([`ChannelSource::go_live_clock`]).
    pub clock_ns: u64,
}

/// How often a joining standby reconnects to resume one sync before it gives up.
pub const MAX_SYNC_RECONNECTS: u32 = 10;

/// How the standby finds its primary.
pub enum Rendezvous<'a> {
    /// Wait for a primary to connect (`ftvm standby --listen`): a primary starting a new
    /// guest, or one that re-protects a running guest.
    Listen(&'a TcpListener),
    /// Join a running primary (`ftvm standby --join`, the primary's `--accept-standby`).
    Join {
        /// The primary's accept address.
        addr: String,
        /// How long to keep trying to connect.
        timeout: Duration,
    },
}

/// What the standby shows while it syncs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandbyUi {
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// Meets a primary as `rendezvous` says and protects its guest: lockstep replay with repairs,
/// then go-live if the primary is lost. Guest input after go-live comes from `input`; output
/// (after go-live, or output the primary never released) goes to `out`.
pub fn run_standby(
    rendezvous: Rendezvous<'_>,
    disks: Vec<DiskConfig>,
    mut options: ChannelOptions,
    ui: StandbyUi,
    input: Option<Receiver<Vec<u8>>>,
    net: Option<NetRx>,
    mut out: impl Write,
) -> Result<StandbyEnd, StandbyError> {
    let (mut h, mut peer, start) = meet(&rendezvous, options.heartbeat, &options.security)?;
    if let Some(w) = &options.witness {
        if start.vm_id.is_empty() {
            tracing::warn!(
                "the primary has no witness: this standby never goes live on silence (ftvm promote)"
            );
        }
        w.set_pair_term(PairTerm {
            vm_id: start.vm_id.clone(),
            term: start.term,
        });
    }
    let arbiters = crate::arbiter::same_arbiter(&start, &options);
    let header = start.header.unwrap_or_default();
    check_version(&header, 0).map_err(StandbyError::Config)?;
    options.tsc_exits = header.tsc_exits;
    let sync = start.sync;
    let kernel = start.kernel.clone();
    let initrd = (!start.initrd.is_empty()).then_some(start.initrd);
    let built = arbiters
        .and_then(|()| {
            check_net(&header, net.as_ref().map(|n| n.mac)).map_err(StandbyError::Config)
        })
        .and_then(|()| crate::disks::check_copies(&header, &disks).map_err(StandbyError::Disks))
        .and_then(|()| {
            config_from_header(
                &header,
                start.kernel,
                "the kernel the primary sent",
                initrd.clone(),
                disks,
            )
            .map_err(StandbyError::Config)
        })
        .and_then(|config| {
            let vm = if sync {
                Vm::new_incoming(&config)?
            } else {
                Vm::new(&config)?
            };
            // The guest's TSC counts at the primary's rate, or this host refuses it.
            let khz = header.config.as_ref().map_or(0, |c| c.tsc_khz);
            vm.match_tsc_khz(khz).map_err(StandbyError::Tsc)?;
            crate::tsc::exits_as_header(&vm, &header)?;
            // All of guest RAM in the host, as on the primary (DESIGN.md §2, "Dirty sets").
            vm.populate_memory()?;
            Ok((vm, config))
        });
    // Copies of the right size and mode: make their contents the primary's disks'.
    let mut record = ResyncRecord::default();
    let built = match built {
        Ok((vm, config)) => {
            let mut again = || meet_again(&rendezvous, options.heartbeat, &options.security);
            let reconnect: Option<Reconnect<'_>> =
                matches!(rendezvous, Rendezvous::Join { .. }).then_some(&mut again);
            let (max, header) = (MAX_SYNC_RECONNECTS, &header);
            match resync_reconnecting(
                &mut h,
                &mut peer,
                &vm,
                header,
                &mut record,
                ui,
                reconnect,
                max,
            ) {
                Ok(()) => Ok((vm, config)),
                Err(e @ StandbyError::Disks(_)) => Err(e),
                Err(e) => return Err(e),
            }
        }
        Err(e) => Err(e),
    };
    // Tell the primary whether it can start the guest (or the sync).
    let answer = match &built {
        Ok(_) => Body::Ready(Ready::default()),
        Err(e) => Body::Diverged(Diverged {
            reason: e.to_string(),
            ..Default::default()
        }),
    };
    link::send_blocking(&mut h.stream, &peer, &Message { body: Some(answer) })?;
    let (mut vm, config) = built?;
    tracing::info!(
        peer,
        mem_mib = config.mem_mib,
        cmdline = config.cmdline,
        sync,
        "primary connected"
    );

    let mut channel = StandbyChannel::spawn_with(
        Link::new(h)?,
        options.try_clone().map_err(StandbyError::Thread)?,
        sync,
    )
    .map_err(StandbyError::Thread)?;
    let mut synced = None;
    if sync {
        let mut progress = SyncProgress::new(ui, config.mem_mib);
        let mut reconnects = 0;
        synced = Some(loop {
            match receive_sync(&mut vm, &channel, &mut progress) {
                Ok(end) => break end,
                Err(StandbyError::SyncLost(why))
                    if matches!(rendezvous, Rendezvous::Join { .. })
                        && reconnects < MAX_SYNC_RECONNECTS =>
                {
                    reconnects += 1;
                    // Reconnect and resume: the primary resends only what this VM has not
                    // applied.
                    channel.shutdown();
                    tracing::warn!("{why}: reconnecting to resume the sync");
                    let (mut h, mut peer, start) =
                        meet_again(&rendezvous, options.heartbeat, &options.security)?;
                    if !start.sync || start.header.as_ref() != Some(&header) {
                        return Err(StandbyError::SyncLost(format!(
                            "{why}; {peer} now runs another guest"
                        )));
                    }
                    // The disks again (the primary may not have kept what its guest wrote
                    // meanwhile): only what differs now is sent.
                    record.refresh(&vm, &progress.stopped_blocks)?;
                    let mut again =
                        || meet_again(&rendezvous, options.heartbeat, &options.security);
                    resync_reconnecting(
                        &mut h,
                        &mut peer,
                        &vm,
                        &header,
                        &mut record,
                        ui,
                        Some(&mut again),
                        MAX_SYNC_RECONNECTS - reconnects,
                    )?;
                    let ready = Ready {
                        resume_checkpoint: progress.id,
                        chunks_applied: progress.chunks,
                    };
                    link::send_blocking(
                        &mut h.stream,
                        &peer,
                        &Message {
                            body: Some(Body::Ready(ready)),
                        },
                    )?;
                    progress.stopped.clear();
                    progress.stopped_blocks.clear();
                    channel = StandbyChannel::spawn_with(
                        Link::new(h)?,
                        options.try_clone().map_err(StandbyError::Thread)?,
                        true,
                    )
                    .map_err(StandbyError::Thread)?;
                }
                Err(e) => return Err(e),
            }
        });
    }
    let mut replayer = new_replayer(&channel, &header);
    if let Some(end) = synced {
        if let Some(stop) = installed(&mut vm, &mut replayer, &channel, &end, true) {
            return finish_completed(channel, &mut replayer, &mut out, stop);
        }
    }
    let as_primary = options.primary_after_go_live;
    follow_with(
        vm,
        header,
        (kernel, initrd),
        channel,
        replayer,
        (input, as_primary, net),
        out,
    )
}

fn new_replayer(
    channel: &StandbyChannel,
    header: &LogHeader,
) -> Replayer<ChannelSource, ReplayedOutput> {
    let source = ChannelSource::new(channel.inbox());
    let output = ReplayedOutput {
        released: channel.released(),
        base: 0,
        pending: Vec::new(),
    };
    let mut replayer = Replayer::new(source, header, output);
    // A guest with a network card: the output is the two-kind stream, on both hosts. (A
    // header whose MAC is malformed was refused before the VM was built.)
    if let Ok(Some(mac)) = logged_mac(header) {
        replayer.mux_output(mac);
    }
    replayer
}

/// Follows a primary on `link` as its standby from `at`, the end of the last epoch both VMs
/// verified (after a switchover made this host the standby: `vm` is in the state both
/// verified there).
#[allow(clippy::too_many_arguments)]
pub fn follow(
    vm: Vm,
    header: LogHeader,
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    link: Link,
    mut options: ChannelOptions,
    at: Position,
    input: Option<Receiver<Vec<u8>>>,
    net: Option<NetRx>,
    out: impl Write,
) -> Result<StandbyEnd, StandbyError> {
    let as_primary = options.primary_after_go_live;
    options.tsc_exits = header.tsc_exits;
    let channel = StandbyChannel::spawn(link, options).map_err(StandbyError::Thread)?;
    let mut replayer = new_replayer(&channel, &header);
    replayer.restart_after_checkpoint(at);
    replayer.output_mut().base = at.output_seq;
    follow_with(
        vm,
        header,
        (kernel, initrd),
        channel,
        replayer,
        (input, as_primary, net),
        out,
    )
}

/// The standby's life: lockstep replay with repairs; go-live if the primary is lost; the
/// primary's role if it hands it over.
fn follow_with(
    mut vm: Vm,
    header: LogHeader,
    images: GuestImages,
    channel: StandbyChannel,
    mut replayer: Replayer<ChannelSource, ReplayedOutput>,
    (input, as_primary, net): (Option<Receiver<Vec<u8>>>, bool, Option<NetRx>),
    mut out: impl Write,
) -> Result<StandbyEnd, StandbyError> {
    let mut full_compares = repair::full_compares();
    loop {
        let result = replay(&mut vm, &mut replayer, &mut |v| {
            channel.tell(FromReplayer::Verified {
                epoch: v.epoch,
                exit_seq: v.exit_seq,
                replayed: v.replayed,
            });
        });
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let reason = e.to_string();
                channel.tell(FromReplayer::Diverged(Diverged {
                    exit_seq: vm.exit_seq().0,
                    reason: reason.clone(),
                    checkpoint_failed: true,
                    ..Default::default()
                }));
                channel.shutdown();
                return Err(match e {
                    ReplayError::Log(e) => StandbyError::Log(e),
                    ReplayError::Output(e) => StandbyError::Output(e),
                    ReplayError::Vm(e) => StandbyError::Vm(e),
                });
            }
        };
        if let Some(e) = replayer.source.stop.take() {
            channel.shutdown();
            return Err(e);
        }
        if let Some(stop) = report.stop {
            return finish_completed(channel, &mut replayer, &mut out, stop);
        }
        let stop_reason = if let Some(d) = &report.divergence {
            Some((d.epoch, d.exit_seq, d.reason.clone(), false))
        } else {
            report.checkpoint_at.map(|(epoch, seq)| {
                let reason = format!(
                    "the primary kicked the vCPU at a non-deterministic point after exit {seq}"
                );
                (epoch, seq, reason, true)
            })
        };
        let Some((epoch, exit_seq, reason, checkpoint_required)) = stop_reason else {
            if let Some(sw) = replayer.source.switchover.take() {
                return take_over(vm, header, images, channel, sw);
            }
            // The log ended: the primary is gone, and everything received has been replayed.
            break;
        };
        // Ask for a repair: the pages this VM dirtied since the last verified boundary, with
        // their hashes, so the primary sends only the pages that differ.
        let (dirty, hashes) = repair::pages_to_compare(&mut vm, &mut replayer, &mut full_compares)?;
        // And the disk blocks its guest wrote, likewise (DESIGN.md §4 "Disks").
        let blocks = replayer.dirty_blocks_since_boundary(&mut vm);
        let dirty_blocks = crate::disks::block_hashes(&vm, &blocks)?;
        tracing::info!(
            epoch,
            exit_seq,
            dirty = dirty.len(),
            dirty_blocks = blocks.len(),
            checkpoint_required,
            "asking for a repair: {reason}"
        );
        channel.tell(FromReplayer::Diverged(Diverged {
            epoch,
            exit_seq,
            reason: reason.clone(),
            checkpoint_required,
            dirty: hashes,
            checkpoint_failed: false,
            dirty_blocks,
        }));
        match await_repair(&mut vm, &mut replayer, &dirty, &blocks) {
            Repair::Installed(end, held) => {
                let checkpoint = (end, held);
                if let Some(stop) = installed(&mut vm, &mut replayer, &channel, &checkpoint, false)
                {
                    return finish_completed(channel, &mut replayer, &mut out, stop);
                }
            }
            Repair::PrimaryLost(why) => {
                // This VM stopped at a consistent point: the end of an exit (or a HLT) of its
                // own execution since the last verified boundary. Nothing the primary did
                // after that boundary was released, so going live from here is consistent.
                tracing::warn!("{why} while waiting for a repair of epoch {epoch}");
                replayer.source.lost = Some(why);
                break;
            }
            Repair::Stopped(e) => {
                channel.shutdown();
                return Err(e);
            }
            Repair::Failed(why) => {
                channel.tell(FromReplayer::Diverged(Diverged {
                    epoch,
                    exit_seq: vm.exit_seq().0,
                    reason: why.clone(),
                    checkpoint_failed: true,
                    ..Default::default()
                }));
                channel.shutdown();
                return Err(StandbyError::Diverged(format!(
                    "the repair of epoch {epoch} failed: {why}"
                )));
            }
        }
    }

    // The primary is gone. Everything received has been replayed; go live.
    let seq = vm.exit_seq().0;
    let why = replayer
        .source
        .lost
        .clone()
        .unwrap_or_else(|| "the log ended".into());
    let (from, bytes) = replayer.output_mut().unreleased();
    tracing::warn!(
        "{why}: going live at exit {seq} after verified epoch {}; re-emitting output from sequence {from} ({} bytes)",
        replayer.epoch().saturating_sub(1),
        bytes.len()
    );
    channel.tell(FromReplayer::Live);
    let clock_ns = replayer.source.go_live_clock(vm.clock_ns());
    tracing::debug!(
        logged_ms = vm.clock_ns() / 1_000_000,
        live_ms = clock_ns / 1_000_000,
        "the virtual clock at go-live"
    );
    write_out(&mut out, &bytes);
    if let Some(net) = &net {
        // What reached this TAP before go-live was the primary's traffic (floods of a
        // bridge): not for this guest now. Dropped before the announcement, so that every
        // frame sent after it is kept.
        while net.rx.try_recv().is_ok() {}
        announce(
            &mut out,
            net.mac,
            replayer.guest_ipv4(),
            replayer.guest_ipv6(),
        );
    }
    if as_primary {
        // `--accept-standby`: record from here as a primary that a new standby may join.
        channel.shutdown();
        let at = Position {
            epoch: replayer.epoch(),
            exit_seq: seq,
            output_seq: replayer.output_mut().produced(),
        };
        let (kernel, initrd) = images;
        return Ok(StandbyEnd::TookOver(Box::new(TakeOver {
            vm,
            link: Err(format!("{why}: live after failover")),
            header,
            kernel,
            initrd,
            at,
            clock_ns,
        })));
    }
    let mut live = LiveHook::resume(input, out, clock_ns);
    if let Some(net) = net {
        live = live.with_muxed_net(net);
    }
    let stop = loop {
        match vm.run(&mut live)? {
            RunEnd::Stopped(stop) => break stop,
            RunEnd::Paused(_) => {}
        }
    };
    channel.shutdown();
    Ok(StandbyEnd::WentLive(stop))
}

/// The kernel image and the initrd the primary sent (kept for standbys that join later, if
/// this host becomes the primary).
type GuestImages = (Vec<u8>, Option<Vec<u8>>);

/// The primary handed over its role at `sw`: this VM must be exactly there.
fn take_over(
    vm: Vm,
    header: LogHeader,
    (kernel, initrd): GuestImages,
    channel: StandbyChannel,
    sw: Switchover,
) -> Result<StandbyEnd, StandbyError> {
    let at = Position::from(&sw);
    let here = vm.exit_seq().0;
    if here != at.exit_seq {
        channel.shutdown();
        return Err(StandbyError::Diverged(format!(
            "the primary handed over at exit {} but this standby is at exit {here}",
            at.exit_seq
        )));
    }
    let link = channel.into_link().ok_or_else(|| {
        StandbyError::Diverged("the connection was lost during the switchover".into())
    })?;
    tracing::warn!(
        epoch = at.epoch,
        exit_seq = at.exit_seq,
        output_seq = at.output_seq,
        "switched over: this host is now the primary"
    );
    let clock_ns = vm.clock_ns();
    Ok(StandbyEnd::TookOver(Box::new(TakeOver {
        vm,
        link: Ok(link),
        header,
        kernel,
        initrd,
        at,
        clock_ns,
    })))
}

/// The guest ended in lockstep. Waits for the primary to release the last output; if it
/// dies first, what it did not release is ours to emit.
fn finish_completed<W: Write>(
    channel: StandbyChannel,
    replayer: &mut Replayer<ChannelSource, ReplayedOutput>,
    out: &mut W,
    stop: StopRequest,
) -> Result<StandbyEnd, StandbyError> {
    let lost = loop {
        if channel.released().load(Ordering::SeqCst) >= replayer.output_mut().produced() {
            break None;
        }
        match channel.inbox().recv_timeout(Duration::from_millis(20)) {
            Ok(ToReplayer::PrimaryLost(why)) => break Some(why),
            Ok(ToReplayer::Abandoned(why)) => {
                channel.shutdown();
                return Err(StandbyError::Abandoned(why));
            }
            Ok(ToReplayer::Fenced(why)) => {
                channel.shutdown();
                return Err(StandbyError::Fenced(why));
            }
            Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                break Some("channel closed".into())
            }
        }
    };
    let (seq, bytes) = replayer.output_mut().unreleased();
    if let (Some(why), false) = (lost, bytes.is_empty()) {
        tracing::warn!(
            "{why}: the guest had ended; re-emitting output from sequence {seq} ({} bytes the primary did not release)",
            bytes.len()
        );
        write_out(out, &bytes);
        channel.shutdown();
        return Ok(StandbyEnd::WentLive(stop));
    }
    channel.shutdown();
    Ok(StandbyEnd::Completed(stop))
}

/// Go-live announces the guest on this host's TAP: a gratuitous ARP for its MAC and IPv4
/// address and an unsolicited neighbour advertisement for each of its IPv6 addresses, so the
/// bridge and the clients send to this port from now on. A guest whose frames never showed
/// an address cannot be announced (logged).
fn announce(out: &mut impl Write, mac: MacAddr, ipv4: Option<[u8; 4]>, ipv6: &[[u8; 16]]) {
    let mut records = Vec::new();
    match ipv4 {
        Some(ip) => {
            encode(KIND_FRAME, &gratuitous_arp(mac.0, ip), &mut records);
            tracing::info!(%mac, ip = %std::net::Ipv4Addr::from(ip), "gratuitous ARP for the guest");
        }
        None => {
            tracing::warn!(%mac, "going live without a gratuitous ARP: the guest's frames never showed its IPv4 address")
        }
    }
    for &ip in ipv6 {
        encode(KIND_FRAME, &unsolicited_na(mac.0, ip), &mut records);
        tracing::info!(%mac, ip = %std::net::Ipv6Addr::from(ip), "unsolicited neighbour advertisement for the guest");
    }
    write_out(out, &records);
}

fn write_out(out: &mut impl Write, bytes: &[u8]) {
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        tracing::warn!("cannot write guest output: {e}");
    }
}
