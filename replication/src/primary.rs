//! The primary's side of the channel: a thread running a mio event loop that ships the log
//! the recorder produces, holds guest output in the [`OutputBuffer`] until the standby
//! verifies its epoch, releases it to stdout, tells the standby what it released, exchanges
//! heartbeats, and drops to unprotected operation (output released at once) when the
//! standby is lost.
//!
//! A standby that cannot follow (`Diverged`) is repaired: the channel thread asks the vCPU
//! thread for a checkpoint ([`CheckpointRequest::Repair`]) and forwards it; the output held
//! across the repair is released once the standby has installed it. A standby that joins a
//! running primary (`--accept-standby`) is synced first: pre-copy ([`PreCopy`]) while the
//! guest runs, then a stop-and-copy checkpoint, then lockstep.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use ftvm_proto::channel::{
    message::Body, CheckpointEnd, Diverged, Message, PageChunk, Ready, Released, Role, Start,
};
use ftvm_proto::log::{record::Kind, RecordBatch};
use ftvm_vmm::memory::GuestMemory;
use mio::net::TcpListener;
use mio::{Events, Poll, Token, Waker};

use crate::audit::Audit;
use crate::checkpoint::{CheckpointPort, CheckpointRequest, DirtyTracking};
use crate::link::{self, body_name, ChannelError, Heartbeat, Link};
use crate::output::OutputBuffer;
use crate::status::{self, RateMeter, Status};
use crate::sync::{PreCopy, Step};
use crate::ChannelOptions;

const WAKER: Token = Token(0);
const LINK: Token = Token(1);
const CONTROL: Token = Token(2);
const ACCEPT: Token = Token(3);

/// How long a sync whose connection dropped is kept for the standby to resume it.
pub const PAUSED_SYNC_KEPT: Duration = Duration::from_secs(30);

/// The pre-copy sends while fewer than this many bytes wait in the socket's queue.
const PRECOPY_QUEUE: usize = 4 << 20;

/// What the vCPU thread hands the channel thread, in the order it happened.
#[derive(Debug)]
pub enum FromVcpu {
    /// Records, usually one epoch's worth closed by its `EpochEnd`.
    Batch(RecordBatch),
    /// Guest output produced in the epoch now open.
    Output(Vec<u8>),
    /// Pages of the checkpoint being made.
    Pages(PageChunk),
    /// The end of the checkpoint being made.
    CheckpointEnd(CheckpointEnd),
    /// Stopped for a switchover after closing `epoch` at exit `exit_seq`.
    Stopped {
        /// The epoch closed.
        epoch: u64,
        /// Its last exit.
        exit_seq: u64,
    },
    /// The guest run is over (the last batch was sent).
    End,
}

/// The vCPU thread's handle on the channel thread.
#[derive(Clone)]
pub struct Feed {
    tx: Sender<FromVcpu>,
    waker: Arc<Waker>,
}

impl Feed {
    /// Hands `event` to the channel thread.
    pub fn send(&self, event: FromVcpu) -> std::io::Result<()> {
        self.tx
            .send(event)
            .map_err(|_| std::io::Error::other("the replication channel thread has stopped"))?;
        self.waker.wake()
    }
}

/// Guest output goes through the channel thread (which holds it until it is verified).
impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(FromVcpu::Output(buf.to_vec()))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the primary's channel measured over the run.
#[derive(Debug, Default, Clone)]
pub struct PrimaryReport {
    /// The standby verified every epoch to the end of the run.
    pub protected_to_end: bool,
    /// Why the run was (or became) unprotected, if it was.
    pub lost: Option<String>,
    /// Epochs closed.
    pub epochs: u64,
    /// The last epoch the standby verified.
    pub verified_epoch: u64,
    /// Repairs installed by the standby.
    pub repairs: u64,
    /// Syncs completed (standbys that joined the running guest).
    pub syncs: u64,
}

/// The connection a switchover hands to the vCPU thread, and where the pair stands: the old
/// primary becomes the standby from here.
pub struct Handover {
    /// The connection to the new primary.
    pub link: Link,
    /// The last epoch, verified by both.
    pub epoch: u64,
    /// Its last exit.
    pub exit_seq: u64,
    /// Every output byte before this was released.
    pub output_seq: u64,
}

/// What the channel thread needs to make checkpoints and to let standbys join.
pub struct PrimarySetup {
    /// Guest memory (read by the pre-copy while the guest runs).
    pub memory: GuestMemory,
    /// What a joining standby is sent first: the log header and the kernel.
    pub start: Start,
    /// Accept joining standbys here (`--accept-standby`).
    pub accept: Option<std::net::TcpListener>,
    /// The first epoch and output sequence number (not 1 and 0 after a switchover).
    pub first_epoch: u64,
    /// See `first_epoch`.
    pub output_seq: u64,
}

/// The primary's channel thread.
pub struct PrimaryChannel {
    feed: Feed,
    port: CheckpointPort,
    thread: JoinHandle<PrimaryReport>,
}

impl PrimaryChannel {
    /// Starts the channel thread over `link` (None: no standby, unprotected from the start,
    /// `why` says why), releasing guest output to `out`.
    pub fn spawn(
        link: Result<Link, String>,
        out: Box<dyn Write + Send>,
        options: ChannelOptions,
        setup: PrimarySetup,
    ) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let (request_tx, request_rx) = crossbeam_channel::unbounded();
        let (handover_tx, handover_rx) = crossbeam_channel::unbounded();
        let tracking = DirtyTracking::default();
        let vcpu = VcpuSide {
            rx,
            requests: request_tx,
            handover: handover_tx,
            tracking: tracking.clone(),
            waker: waker.clone(),
        };
        let mut state = Primary::new(link, out, vcpu, &options, setup, &poll)?;
        let thread = std::thread::Builder::new()
            .name("ftvm-channel".into())
            .spawn(move || {
                state.run(poll);
                std::mem::take(&mut state.report)
            })?;
        let feed = Feed { tx, waker };
        Ok(Self {
            port: CheckpointPort {
                requests: request_rx,
                feed: feed.clone(),
                tracking,
                handover: handover_rx,
            },
            feed,
            thread,
        })
    }

    /// The handle the vCPU thread feeds.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// The vCPU thread's end of the checkpoint machinery.
    pub fn checkpoint_port(&self) -> CheckpointPort {
        self.port.clone()
    }

    /// Waits until every output has been released (after [`FromVcpu::End`]).
    pub fn join(self) -> PrimaryReport {
        drop(self.feed);
        self.thread.join().unwrap_or_else(|_| PrimaryReport {
            lost: Some("the channel thread panicked".into()),
            ..Default::default()
        })
    }
}

struct Primary {
    link: Option<Link>,
    peer: String,
    out: Box<dyn Write + Send>,
    rx: Receiver<FromVcpu>,
    heartbeat: Heartbeat,
    control: Option<TcpListener>,
    audit: Option<Audit>,
    buffer: OutputBuffer,
    /// The epoch now open on the vCPU thread (output is produced in it).
    epoch: u64,
    exit_seq: u64,
    /// Epochs shipped and not yet verified, with when they were shipped.
    unverified: VecDeque<(u64, Instant)>,
    ended: bool,
    /// The log's `RunEnd` went out: the guest has stopped, and the vCPU thread's
    /// [`FromVcpu::End`] follows.
    run_end_shipped: bool,
    meter: RateMeter,
    report: PrimaryReport,
    /// Checkpoint requests to the vCPU thread (dropped when the channel thread ends, which
    /// tells a vCPU thread serving requests after the guest stopped that it is done).
    requests: Sender<CheckpointRequest>,
    tracking: DirtyTracking,
    memory: GuestMemory,
    start: Start,
    waker: Arc<Waker>,
    accept: Option<std::net::TcpListener>,
    /// Standbys whose handshake runs on a helper thread.
    joining: (Sender<Joined>, Receiver<Joined>),
    /// The sync of a standby that joined, while it runs.
    sync: Option<PreCopy>,
    /// A sync whose connection dropped, kept for the standby to resume, since when.
    paused_sync: Option<(PreCopy, Instant)>,
    /// The checkpoint asked of the vCPU thread and not yet installed by the standby.
    checkpoint: Option<PendingCheckpoint>,
    next_checkpoint_id: u64,
    /// Where the switchover's answer goes.
    handover: Sender<Result<Handover, String>>,
    /// A switchover under way.
    switchover: Option<Switchover>,
    /// The connection was handed over: this thread is done.
    handed_over: bool,
    /// A switchover abandoned for a repair is asked again once the repair is installed.
    switchover_after_repair: bool,
    switchover_retries: u32,
}

/// How often a switchover abandoned for a repair is asked again.
const MAX_SWITCHOVER_RETRIES: u32 = 20;

/// Where a switchover stands.
#[derive(Debug, Clone, Copy)]
enum Switchover {
    /// Asked of the vCPU thread.
    Asked,
    /// The vCPU stopped after closing `epoch` at `exit_seq`; hand over once the standby
    /// verified it and all output is released.
    Stopped { epoch: u64, exit_seq: u64 },
}

/// A joining standby's handshake, done on a helper thread: the link, or why it failed.
type Joined = Result<(Link, Ready), String>;

/// The channel thread's ends of what it shares with the vCPU thread.
struct VcpuSide {
    rx: Receiver<FromVcpu>,
    requests: Sender<CheckpointRequest>,
    handover: Sender<Result<Handover, String>>,
    tracking: DirtyTracking,
    waker: Arc<Waker>,
}

/// A checkpoint on its way.
#[derive(Debug)]
struct PendingCheckpoint {
    id: u64,
    /// The epoch it closes, once its end went out.
    epoch: Option<u64>,
    sync: bool,
    asked: Instant,
    /// What it repairs (for the log).
    why: String,
}

impl Primary {
    fn new(
        link: Result<Link, String>,
        out: Box<dyn Write + Send>,
        vcpu: VcpuSide,
        options: &ChannelOptions,
        setup: PrimarySetup,
        poll: &Poll,
    ) -> std::io::Result<Self> {
        let (mut link, lost) = match link {
            Ok(link) => (Some(link), None),
            Err(why) => (None, Some(why)),
        };
        let peer = link
            .as_ref()
            .map_or(String::new(), |l| l.peer().to_string());
        if let Some(l) = &mut link {
            l.register(poll.registry(), LINK)?;
        }
        let control = link::register_control(options.control.as_ref(), poll, CONTROL)?;
        if let Some(l) = &setup.accept {
            l.set_nonblocking(true)?;
            poll.registry().register(
                &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(l)),
                ACCEPT,
                mio::Interest::READABLE,
            )?;
        }
        vcpu.tracking.set_protected(link.is_some());
        Ok(Self {
            link,
            peer,
            out,
            rx: vcpu.rx,
            heartbeat: options.heartbeat,
            control,
            audit: Audit::from_env(),
            buffer: OutputBuffer::starting_at(setup.output_seq),
            epoch: setup.first_epoch.max(1),
            exit_seq: 0,
            unverified: VecDeque::new(),
            ended: false,
            run_end_shipped: false,
            meter: RateMeter::default(),
            report: PrimaryReport {
                lost,
                ..Default::default()
            },
            requests: vcpu.requests,
            tracking: vcpu.tracking,
            memory: setup.memory,
            start: setup.start,
            waker: vcpu.waker,
            accept: setup.accept,
            joining: crossbeam_channel::unbounded(),
            sync: None,
            paused_sync: None,
            checkpoint: None,
            next_checkpoint_id: 1,
            handover: vcpu.handover,
            switchover: None,
            handed_over: false,
            switchover_after_repair: false,
            switchover_retries: 0,
        })
    }

    fn run(&mut self, mut poll: Poll) {
        let mut events = Events::with_capacity(64);
        let mut inbox = Vec::new();
        loop {
            let mut timeout = link::poll_timeout(self.link.as_ref(), &self.heartbeat);
            if self.precopy_can_send() {
                timeout = Duration::ZERO;
            }
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.lose(format!("event loop failed: {e}"));
                }
            }
            let mut control_ready = false;
            let mut accept_ready = false;
            for event in events.iter() {
                control_ready |= event.token() == CONTROL;
                accept_ready |= event.token() == ACCEPT;
            }
            if accept_ready {
                self.accept_standbys();
            }
            self.attach_joined(&poll);
            self.drain_vcpu();
            if let Some(link) = &mut self.link {
                let result = link.flush().and_then(|()| link.receive(&mut inbox));
                for msg in inbox.drain(..) {
                    self.on_message(msg);
                }
                if let Err(e) = result {
                    // A standby that closes once it verified the last epoch of a finished
                    // run is done, not lost. It can do so before the vCPU thread, which
                    // sends `End` right after the batch carrying the run's end, gets to
                    // that (seen where the host is slow: the nested-KVM harness).
                    self.drain_vcpu();
                    if self.run_end_shipped {
                        self.await_end();
                    }
                    if !self.done() {
                        self.lose_with(e);
                    }
                }
            }
            self.pump_precopy();
            self.tick();
            self.try_handover(&poll);
            if control_ready {
                let control = self.control.take();
                status::serve(control.as_ref(), |r| self.control_request(r));
                self.control = control;
            }
            if self.done() {
                self.finish(&mut poll);
                return;
            }
        }
    }

    fn drain_vcpu(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(msg) => self.on_vcpu(msg),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.ended = true;
                    return;
                }
            }
        }
    }

    /// Waits (at most a heartbeat timeout) for the vCPU thread's `End`, handling what comes
    /// before it.
    fn await_end(&mut self) {
        let deadline = Instant::now() + self.heartbeat.timeout;
        while !self.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => self.on_vcpu(msg),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => self.ended = true,
            }
        }
    }

    fn on_vcpu(&mut self, msg: FromVcpu) {
        match msg {
            FromVcpu::Batch(b) => self.ship(b),
            FromVcpu::Output(bytes) => self.output(bytes),
            FromVcpu::Pages(chunk) => {
                // Pages of a checkpoint abandoned with its standby go nowhere: a new
                // standby must never see them.
                if self.checkpoint.as_ref().map(|c| c.id) != Some(chunk.checkpoint) {
                    tracing::debug!(
                        checkpoint = chunk.checkpoint,
                        "pages of an abandoned checkpoint dropped"
                    );
                    return;
                }
                // Stop-and-copy pages count as chunks of the sync, for a resume.
                if let Some(s) = self.sync.as_mut().filter(|s| s.id == chunk.checkpoint) {
                    s.note_chunk(&chunk.pages);
                }
                self.send(Message {
                    body: Some(Body::Pages(chunk)),
                })
            }
            FromVcpu::CheckpointEnd(end) => self.checkpoint_end(end),
            FromVcpu::Stopped { epoch, exit_seq } => {
                if self.link.is_none() || self.switchover.is_none() {
                    // Abandoned while the vCPU was on its way to stop: let it run on.
                    self.switchover = None;
                    self.refuse_handover("the standby was lost or diverged".into());
                } else {
                    self.switchover = Some(Switchover::Stopped { epoch, exit_seq });
                }
            }
            FromVcpu::End => {
                tracing::debug!("guest run over");
                self.ended = true;
                if self.sync.is_some() {
                    self.lose("the guest run ended while the standby was syncing".into());
                }
                if self.paused_sync.take().is_some() {
                    self.tracking.stop_sync();
                }
            }
        }
    }

    /// A standby is attached and has a copy of the guest (not syncing).
    fn protecting(&self) -> bool {
        self.link.is_some() && self.sync.as_ref().is_none_or(|s| s.end_sent)
    }

    fn ship(&mut self, batch: RecordBatch) {
        let now = Instant::now();
        self.exit_seq = batch.complete_through;
        let protecting = self.protecting();
        for r in &batch.records {
            self.run_end_shipped |= matches!(r.kind, Some(Kind::RunEnd(_)));
            if let Some(Kind::EpochEnd(e)) = &r.kind {
                self.epoch = e.epoch + 1;
                self.report.epochs = e.epoch;
                if protecting {
                    self.unverified.push_back((e.epoch, now));
                    if let Some(a) = &mut self.audit {
                        a.line(format_args!(
                            "shipped epoch={} exit_seq={}",
                            e.epoch, e.exit_seq
                        ));
                    }
                }
            }
        }
        // A syncing standby has no copy of the guest to apply the log to: it starts from
        // the stop-and-copy checkpoint.
        if protecting {
            self.send(Message {
                body: Some(Body::Batch(batch)),
            });
        }
    }

    fn output(&mut self, bytes: Vec<u8>) {
        if self.protecting() {
            self.buffer.hold(self.epoch, bytes);
        } else {
            let seq = self.buffer.produced();
            self.buffer.pass_through(bytes.len());
            self.write_out(&bytes, self.epoch, seq, "unprotected");
        }
    }

    fn write_out(&mut self, bytes: &[u8], epoch: u64, seq: u64, why: &str) {
        if let Some(a) = &mut self.audit {
            a.line(format_args!(
                "release epoch={epoch} seq={seq}..{} {why}",
                seq + bytes.len() as u64
            ));
        }
        if let Err(e) = self.out.write_all(bytes).and_then(|()| self.out.flush()) {
            tracing::warn!("cannot write guest output: {e}");
        }
    }

    fn on_message(&mut self, msg: Message) {
        match msg.body {
            Some(Body::Heartbeat(_)) => {}
            Some(Body::Ack(ack)) => {
                if let Some(a) = &mut self.audit {
                    a.line(format_args!("acked epoch={}", ack.verified_epoch));
                }
                self.report.verified_epoch = self.report.verified_epoch.max(ack.verified_epoch);
                self.tracking.set_verified(ack.verified_epoch);
                self.checkpoint_installed(ack.verified_epoch);
                while self
                    .unverified
                    .front()
                    .is_some_and(|(epoch, _)| *epoch <= ack.verified_epoch)
                {
                    self.unverified.pop_front();
                }
                self.release(ack.verified_epoch);
            }
            Some(Body::Diverged(d)) => self.repair(d),
            _ => {
                let got = body_name(&msg).to_string();
                self.lose_with(ChannelError::Unexpected {
                    peer: self.peer.clone(),
                    expected: "Ack, Diverged or Heartbeat",
                    got,
                });
            }
        }
    }

    /// Releases the output of every epoch up to `epoch` and tells the standby.
    fn release(&mut self, epoch: u64) {
        let released = self.buffer.release_through(epoch);
        if released.is_empty() {
            return;
        }
        let now = Instant::now();
        for h in released {
            let held = now - h.produced;
            let why = format!("verified held_ns={}", held.as_nanos());
            self.write_out(&h.bytes, h.epoch, h.seq, &why);
        }
        let output_seq = self.buffer.released();
        self.send(Message {
            body: Some(Body::Released(Released { output_seq })),
        });
    }

    /// Sends `msg` to the standby, if there is one.
    fn send(&mut self, msg: Message) {
        if let Some(link) = &mut self.link {
            if let Err(e) = link.send(&msg) {
                self.lose_with(e);
            }
        }
    }

    fn lose_with(&mut self, e: ChannelError) {
        self.lose(format!("standby lost: {e}"));
    }

    /// The pair is no longer protected: say so once, release everything held, go on alone.
    fn lose(&mut self, why: String) {
        if self.link.take().is_none() {
            return;
        }
        self.tracking.set_protected(false);
        if matches!(self.switchover, Some(Switchover::Stopped { .. })) {
            self.abandon_switchover(why.clone());
        }
        match self.sync.take() {
            // Not once the stop-and-copy is under way: that checkpoint is abandoned, and a
            // standby that comes back starts a new sync.
            Some(sync) if !self.ended && !sync.stopping => {
                // A joining standby reconnects and resumes where it stopped: keep the
                // sync's progress, and go on tracking dirty pages, for a while.
                tracing::warn!(
                    "the standby was lost during its sync; keeping the sync for {:?} for it to reconnect",
                    PAUSED_SYNC_KEPT
                );
                self.paused_sync = Some((sync, Instant::now()));
            }
            _ => self.tracking.stop_sync(),
        }
        self.checkpoint = None;
        tracing::error!(
            held_output_bytes = self.buffer.held_bytes(),
            "{why}: running unprotected"
        );
        self.report.lost = Some(why);
        self.unverified.clear();
        for h in self.buffer.release_all() {
            self.write_out(&h.bytes, h.epoch, h.seq, "unprotected");
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self
            .paused_sync
            .as_ref()
            .is_some_and(|(_, since)| now.duration_since(*since) > PAUSED_SYNC_KEPT)
        {
            tracing::warn!("the standby did not reconnect: its sync is abandoned");
            self.paused_sync = None;
            self.tracking.stop_sync();
        }
        let Some(link) = &mut self.link else { return };
        self.meter.sample(now, link.bytes_sent);
        if let Err(e) = link.tick(now, &self.heartbeat) {
            self.lose_with(e);
        }
    }

    fn done(&self) -> bool {
        self.handed_over
            || self.ended
                && (self.link.is_none()
                    || self.buffer.held_bytes() == 0
                        && self.unverified.is_empty()
                        && self.checkpoint.is_none())
    }

    /// The run is over and every output released: make sure the standby hears the last
    /// `Released` before the connection closes.
    fn finish(&mut self, poll: &mut Poll) {
        self.report.protected_to_end = self.link.is_some();
        tracing::info!(
            epochs = self.report.epochs,
            verified_epoch = self.report.verified_epoch,
            protected = self.report.protected_to_end,
            "guest run over; every output released"
        );
        if let Some(link) = &mut self.link {
            link.drain(poll, self.heartbeat.timeout);
        }
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let (protected, state) = match (&self.link, &self.report.lost) {
            (Some(_), _) if self.sync.is_some() => {
                let s = self.sync.as_ref().map_or(String::new(), |s| {
                    format!(
                        "syncing: round {}, {} MiB sent, {} pages left in the round",
                        s.round,
                        s.bytes_sent >> 20,
                        s.remaining()
                    )
                });
                (false, s)
            }
            (Some(_), _) if self.switchover.is_some() => (true, "switching over".to_string()),
            (Some(_), _) => match &self.checkpoint {
                Some(c) => (true, format!("repairing: {}", c.why)),
                None => (true, "lockstep".to_string()),
            },
            (None, Some(why)) => (false, format!("unprotected: {why}")),
            (None, None) => (false, "unprotected".to_string()),
        };
        Status {
            role: "primary".into(),
            protected,
            state,
            peer: self.peer.clone(),
            epoch: self.epoch.saturating_sub(1),
            verified_epoch: self.report.verified_epoch,
            exit_seq: self.exit_seq,
            lag_epochs: self.unverified.len() as u64,
            lag: self
                .unverified
                .front()
                .map_or(Duration::ZERO, |(_, t)| now.duration_since(*t)),
            log_bytes_per_s: self
                .link
                .as_ref()
                .map_or(0, |l| self.meter.rate(now, l.bytes_sent)),
            released_output_seq: self.buffer.released(),
            held_output_bytes: self.buffer.held_bytes(),
            repairs: self.report.repairs,
            syncs: self.report.syncs,
        }
    }

    fn control_request(&mut self, request: status::Request) -> String {
        match request {
            status::Request::Status => self.status().to_string(),
            status::Request::Switchover => match self.start_switchover() {
                Ok(()) => "switchover started: the primary stops at its next exit\n".into(),
                Err(why) => format!("error: {why}\n"),
            },
        }
    }

    /// `ftvm switchover`: stop the vCPU at its next exit; once the standby verified
    /// everything up to there, hand it the primary's role.
    fn start_switchover(&mut self) -> Result<(), String> {
        if self.link.is_none() || !self.protecting() {
            return Err("the guest is not protected: there is no standby to switch over to".into());
        }
        if self.ended {
            return Err("the guest run is over".into());
        }
        if self.switchover.is_some() {
            return Err("a switchover is already under way".into());
        }
        if !self.ask_vcpu(CheckpointRequest::Switchover) {
            return Err("the vCPU thread is gone".into());
        }
        tracing::warn!(peer = self.peer, "switchover requested");
        self.switchover = Some(Switchover::Asked);
        self.switchover_after_repair = false;
        Ok(())
    }

    /// The switchover cannot happen: the vCPU thread (if it stopped for it) runs on.
    fn abandon_switchover(&mut self, why: String) {
        let was = self.switchover.take();
        if matches!(was, Some(Switchover::Asked)) {
            // The vCPU has not stopped yet; it is told when it does.
            return;
        }
        self.refuse_handover(why);
    }

    /// Tells the vCPU thread, stopped for a switchover, to run on as the primary.
    fn refuse_handover(&self, why: String) {
        tracing::warn!("switchover abandoned: {why}");
        let _ = self.handover.send(Err(why));
    }

    /// Hands the connection over once the stopped primary's last epoch is verified and all
    /// its output released.
    fn try_handover(&mut self, poll: &Poll) {
        let Some(Switchover::Stopped { epoch, exit_seq }) = self.switchover else {
            return;
        };
        if !self.unverified.is_empty() || self.buffer.held_bytes() > 0 {
            return;
        }
        let Some(mut link) = self.link.take() else {
            return;
        };
        let output_seq = self.buffer.released();
        let sent = link
            .send(&Message {
                body: Some(Body::Switchover(ftvm_proto::channel::Switchover {
                    epoch,
                    exit_seq,
                    output_seq,
                })),
            })
            .and_then(|()| {
                // The message must be out before the new roles start on this connection.
                let deadline = Instant::now() + self.heartbeat.timeout;
                while link.pending() > 0 && Instant::now() < deadline {
                    link.flush()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            });
        if let Err(e) = sent {
            self.link = Some(link);
            return self.lose_with(e);
        }
        if let Err(e) = link.deregister(poll.registry()) {
            tracing::warn!("cannot move the connection off this event loop: {e}");
        }
        self.switchover = None;
        self.handed_over = true;
        self.tracking.set_protected(false);
        tracing::warn!(
            epoch,
            exit_seq,
            output_seq,
            "switched over: this host is now the standby"
        );
        let handover = Handover {
            link,
            epoch,
            exit_seq,
            output_seq,
        };
        let _ = self.handover.send(Ok(handover));
    }

    /// The standby cannot follow: ask the vCPU thread for a repair checkpoint.
    fn repair(&mut self, d: Diverged) {
        let what = if d.checkpoint_required {
            "needs a checkpoint"
        } else {
            "diverged"
        };
        let why = format!(
            "epoch {} {what} at exit {}: {}",
            d.epoch, d.exit_seq, d.reason
        );
        if d.checkpoint_failed {
            return self.lose(format!("the standby could not install a checkpoint: {why}"));
        }
        if self.switchover.is_some() {
            // The vCPU must run again to make the repair; the switchover is asked again
            // once the repair is installed.
            self.abandon_switchover(format!("the standby diverged: {why}"));
            if self.switchover_retries < MAX_SWITCHOVER_RETRIES {
                self.switchover_retries += 1;
                self.switchover_after_repair = true;
            }
        }
        if self.sync.is_some() || self.checkpoint.is_some() {
            return self.lose(format!(
                "the standby reports a divergence while a checkpoint is on its way: {why}"
            ));
        }
        let standby_dirty: Option<Vec<(u64, [u8; 32])>> = d
            .dirty
            .iter()
            .map(|p| Some((p.pfn, <[u8; 32]>::try_from(p.hash.as_slice()).ok()?)))
            .collect();
        let Some(standby_dirty) = standby_dirty else {
            return self.lose(format!(
                "the standby sent a page hash that is not 32 bytes long ({why})"
            ));
        };
        let id = self.next_checkpoint_id;
        self.next_checkpoint_id += 1;
        let request = CheckpointRequest::Repair {
            id,
            from_epoch: d.epoch,
            standby_dirty,
        };
        if !self.ask_vcpu(request) {
            return;
        }
        tracing::info!(
            checkpoint = id,
            standby_dirty = d.dirty.len(),
            "repair: {why}"
        );
        if let Some(a) = &mut self.audit {
            a.line(format_args!("repair checkpoint={id} epoch={}", d.epoch));
        }
        self.checkpoint = Some(PendingCheckpoint {
            id,
            epoch: None,
            sync: false,
            asked: Instant::now(),
            why,
        });
    }

    /// Hands `request` to the vCPU thread; false (and unprotected) if it is gone.
    fn ask_vcpu(&mut self, request: CheckpointRequest) -> bool {
        let sent = self.requests.send(request).is_ok();
        if !sent {
            self.lose("the vCPU thread is gone: no checkpoint can be made".into());
        }
        sent
    }

    /// The vCPU thread finished a checkpoint: complete it with the output held so far and
    /// send it; its epoch is verified once the standby installed it.
    fn checkpoint_end(&mut self, mut end: CheckpointEnd) {
        let Some(pending) = self.checkpoint.as_mut().filter(|c| c.id == end.checkpoint) else {
            tracing::debug!(
                checkpoint = end.checkpoint,
                "end of an abandoned checkpoint dropped"
            );
            return;
        };
        pending.epoch = Some(end.epoch);
        let sync = pending.sync;
        self.epoch = end.epoch + 1;
        self.report.epochs = end.epoch;
        self.exit_seq = end.exit_seq;
        let (from, held) = self.buffer.held();
        end.output_seq = self.buffer.produced();
        debug_assert_eq!(from + held.len() as u64, end.output_seq);
        end.held_output = held;
        if let (true, Some(s)) = (sync, &mut self.sync) {
            // From here on the standby follows the log.
            s.end_sent = true;
        }
        if self.link.is_some() {
            self.unverified.push_back((end.epoch, Instant::now()));
            if let Some(a) = &mut self.audit {
                a.line(format_args!(
                    "shipped epoch={} exit_seq={} checkpoint={}",
                    end.epoch, end.exit_seq, end.checkpoint
                ));
            }
        }
        tracing::debug!(
            checkpoint = end.checkpoint,
            epoch = end.epoch,
            pages = end.pages,
            bytes = end.page_bytes,
            "checkpoint forwarded"
        );
        self.send(Message {
            body: Some(Body::CheckpointEnd(end)),
        });
    }

    /// The standby verified `epoch`: a checkpoint closing it (or an earlier one) is
    /// installed.
    fn checkpoint_installed(&mut self, epoch: u64) {
        let Some(c) = &self.checkpoint else { return };
        if c.epoch.is_none_or(|e| e > epoch) {
            return;
        }
        if c.sync {
            self.sync = None;
            self.tracking.stop_sync();
            self.report.syncs += 1;
            self.report.lost = None;
            tracing::warn!(
                peer = self.peer,
                took = ?c.asked.elapsed(),
                "standby synced: the guest is protected again"
            );
        } else {
            self.report.repairs += 1;
            tracing::info!(checkpoint = c.id, took = ?c.asked.elapsed(), "repair installed");
        }
        self.checkpoint = None;
        if std::mem::take(&mut self.switchover_after_repair) {
            if let Err(why) = self.start_switchover() {
                tracing::warn!("switchover not retried: {why}");
            }
        }
    }

    /// Whether the pre-copy has something to send and room to send it.
    fn precopy_can_send(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| !s.stopping)
            && self
                .link
                .as_ref()
                .is_some_and(|l| l.pending() < PRECOPY_QUEUE)
    }

    /// Sends pre-copy chunks while the socket takes them; asks for the stop-and-copy at the
    /// end.
    fn pump_precopy(&mut self) {
        // At most 16 chunks and 5 ms a turn: heartbeats and acks must not wait for the copy.
        let deadline = Instant::now() + Duration::from_millis(5);
        let mut budget = 16;
        while budget > 0 && Instant::now() < deadline && self.precopy_can_send() {
            budget -= 1;
            let Some(sync) = &mut self.sync else { return };
            match sync.step(&self.tracking) {
                Ok(Step::Skipped) => budget += 1,
                Ok(Step::Chunk(chunk)) => self.send(Message {
                    body: Some(Body::Pages(chunk)),
                }),
                Ok(Step::StopAndCopy) => {
                    let id = sync.id;
                    if self.ask_vcpu(CheckpointRequest::StopAndCopy { id }) {
                        self.checkpoint = Some(PendingCheckpoint {
                            id,
                            epoch: None,
                            sync: true,
                            asked: Instant::now(),
                            why: "stop-and-copy of a sync".into(),
                        });
                    }
                    return;
                }
                Err(e) => return self.lose(format!("pre-copy cannot read guest memory: {e}")),
            }
        }
    }

    /// Takes new connections on the `--accept-standby` socket; the handshake runs on a
    /// helper thread so a slow or hostile peer cannot stall this loop.
    fn accept_standbys(&mut self) {
        loop {
            let Some(listener) = &self.accept else { return };
            let (stream, addr) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("cannot accept a standby: {e}");
                    return;
                }
            };
            let peer = addr.to_string();
            if self.link.is_some() || self.ended {
                let why = if self.ended {
                    "the guest run is over"
                } else {
                    "a standby is already attached"
                };
                tracing::warn!(peer, "refusing a joining standby: {why}");
                continue;
            }
            let tx = self.joining.0.clone();
            let waker = self.waker.clone();
            let start = self.start.clone();
            let spawned = std::thread::Builder::new()
                .name("ftvm-join".into())
                .spawn(move || {
                    let result = link::handshake(stream, &peer, Role::Primary)
                        .and_then(|h| offer_vm(h, &peer, start))
                        .map_err(|e| format!("joining standby {peer}: {e}"));
                    let _ = tx.send(result);
                    let _ = waker.wake();
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread for a joining standby: {e}");
            }
        }
    }

    /// A joining standby finished its handshake: start syncing it.
    fn attach_joined(&mut self, poll: &Poll) {
        let Ok(result) = self.joining.1.try_recv() else {
            return;
        };
        let (mut link, ready) = match result {
            Ok(joined) => joined,
            Err(why) => return tracing::warn!("{why}"),
        };
        if self.link.is_some() || self.ended {
            return tracing::warn!(peer = link.peer(), "refusing a joining standby: too late");
        }
        let memory = self.memory.clone();
        if let Err(e) = link.register(poll.registry(), LINK) {
            return tracing::warn!(peer = link.peer(), "cannot watch the joining standby: {e}");
        }
        self.peer = link.peer().to_string();
        self.link = Some(link);
        self.tracking.set_protected(true);
        self.unverified.clear();
        match self.paused_sync.take() {
            Some((mut sync, _)) if ready.resume_checkpoint == sync.id => {
                sync.resume(ready.chunks_applied);
                self.sync = Some(sync);
                return;
            }
            Some(_) => self.tracking.stop_sync(),
            None => {}
        }
        let id = self.next_checkpoint_id;
        self.next_checkpoint_id += 1;
        let sync = PreCopy::start(id, memory, &self.tracking);
        tracing::warn!(
            peer = self.peer,
            memory_mib = sync.memory_bytes() >> 20,
            "standby joined: syncing guest memory while the guest runs"
        );
        self.sync = Some(sync);
    }
}

/// Sends a handshaken standby the VM it must build (`start`) and waits until it is ready
/// (`Ack`), or says why it cannot build it (`Diverged`).
pub fn offer_vm(
    mut h: link::Handshaken,
    peer: &str,
    start: Start,
) -> Result<(Link, Ready), ChannelError> {
    link::send_blocking(
        &mut h.stream,
        peer,
        &Message {
            body: Some(Body::Start(start)),
        },
    )?;
    let msg = link::recv_blocking(&mut h.stream, peer, &mut h.rx_offset)?;
    let ready = match msg.body {
        Some(Body::Ready(ready)) => ready,
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
                expected: "Ready",
                got: link::body_name(&msg).into(),
            })
        }
    };
    tracing::info!(peer, standby = h.hello.software, "standby ready");
    Ok((Link::new(h)?, ready))
}
