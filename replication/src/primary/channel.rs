//! [`PrimaryChannel`]: the primary's channel thread. It runs [`PrimaryCore`] on the shared
//! event loop and carries out its [`Action`]s: frames to the standby, released output to
//! stdout, the audit trail, the handover of the connection to the vCPU thread. It also
//! accepts joining standbys, whose handshake runs on a helper thread so that a slow or
//! hostile peer cannot stall the loop.

use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use ftvm_proto::channel::{message::Body, Abandon, Message, Ready, Role, Start};
use mio::{Registry, Waker};

use super::backpressure::{self, Verdict};
use super::core::{Action, CoreConfig, PrimaryCore};
use super::{Feed, FromVcpu, Handover, PrimaryReport, PrimarySetup};
use crate::arbiter::STATUS_FENCED;
use crate::audit::Audit;
use crate::checkpoint::{DirtyTracking, VcpuControl, VcpuPort};
use crate::disk_resync::PrimaryDisks;
use crate::event_loop::{EventLoop, Side, Woken, ACCEPT, LINK};
use crate::link::{self, ChannelError, Link};
use crate::position::Position;
use crate::status::{RateMeter, Request};
use crate::witness::{spawn_claim, ClaimOutcome, WitnessConfig};
use crate::ChannelOptions;

/// The pre-copy sends while fewer than this many bytes wait in the socket's queue.
const PRECOPY_QUEUE: usize = 4 << 20;

/// How long the connection to an abandoned standby stays open once `Abandon` is written and
/// our side shut down: the standby reads it before the socket closes (DESIGN.md §5).
const ABANDONED_LINGER: Duration = Duration::from_secs(5);

/// A joining standby's handshake, done on a helper thread: the link, or why it failed.
type Joined = Result<(Link, Ready), String>;

/// The primary's channel thread.
pub struct PrimaryChannel {
    feed: Feed,
    port: VcpuPort,
    thread: JoinHandle<PrimaryReport>,
}

impl PrimaryChannel {
    /// Starts the channel thread over `link` (Err: no standby, unprotected from the start,
    /// it says why), releasing guest output to `out`.
    pub fn spawn(
        link: Result<Link, String>,
        out: Box<dyn Write + Send>,
        options: ChannelOptions,
        setup: PrimarySetup,
    ) -> std::io::Result<Self> {
        let (mut event_loop, waker) = EventLoop::new(&options)?;
        let (tx, rx) = crossbeam_channel::bounded(backpressure::FEED_QUEUE);
        let (vcpu, requests, doorbell) = VcpuControl::new();
        let (handover_tx, handover_rx) = crossbeam_channel::unbounded();
        let tracking = DirtyTracking::default();
        let mut link = link;
        if let Ok(l) = &mut link {
            l.register(event_loop.registry(), LINK)?;
        }
        if let Some(l) = &setup.accept {
            l.set_nonblocking(true)?;
            event_loop.registry().register(
                &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(l)),
                ACCEPT,
                mio::Interest::READABLE,
            )?;
        }
        let audit = Audit::from_env();
        let witness = options.witness.clone();
        let pair_term = witness
            .as_ref()
            .map(|w| w.pair_term())
            .filter(|t| !t.vm_id.is_empty());
        let mut start = setup.start;
        if let Some((t, w)) = pair_term.as_ref().zip(witness.as_ref()) {
            start.vm_id = t.vm_id.clone();
            start.term = t.term;
            start.set_arbiter(w.backend.kind());
        }
        let core = PrimaryCore::new(
            CoreConfig {
                // The settings agreed with the standby (ours until one joins).
                heartbeat: link.as_ref().map_or(options.heartbeat, Link::heartbeat),
                audit: audit.is_some(),
                memory: setup.memory,
                start,
                after: setup.after,
                vcpu,
                tracking: tracking.clone(),
                arbiter: pair_term.zip(witness.as_ref()).map(|(t, w)| {
                    crate::arbiter::Arbiter::named(t.vm_id, t.term, w.backend.name())
                }),
            },
            link.as_ref()
                .map(|l| l.peer().to_string())
                .map_err(Clone::clone),
            Instant::now(),
        );
        let mut driver = Driver {
            core,
            link: link.ok(),
            out,
            audit,
            rx,
            handover: handover_tx,
            accept: setup.accept,
            joining: crossbeam_channel::unbounded(),
            waker: waker.clone(),
            meter: RateMeter::default(),
            report: None,
            closing: Vec::new(),
            heartbeat: options.heartbeat,
            security: options.security.clone(),
            join_slots: link::HandshakeSlots::default(),
            throttle: backpressure::Throttle::new(options.bounds),
            witness,
            claims: crossbeam_channel::unbounded(),
            written: Default::default(),
            telemetry: options.telemetry.clone(),
            disks: setup.disks.with_tracking(tracking.clone()),
        };
        let gate = driver.throttle.gate();
        let thread = std::thread::Builder::new()
            .name("ftvm-channel".into())
            .spawn(move || {
                event_loop.run(&mut driver);
                driver.report.unwrap_or_else(|| driver.core.finish())
            })?;
        let feed = Feed { tx, waker, gate };
        Ok(Self {
            port: VcpuPort {
                requests,
                doorbell,
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

    /// The vCPU thread's end of the vCPU control channel.
    pub fn vcpu_port(&self) -> VcpuPort {
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

/// The channel thread's state outside the core: the sockets, the output, the threads'
/// channels.
struct Driver {
    core: PrimaryCore,
    link: Option<Link>,
    out: Box<dyn Write + Send>,
    audit: Option<Audit>,
    rx: Receiver<FromVcpu>,
    handover: Sender<Result<Handover, String>>,
    accept: Option<std::net::TcpListener>,
    /// Standbys whose handshake runs on a helper thread.
    joining: (Sender<Joined>, Receiver<Joined>),
    waker: Arc<Waker>,
    meter: RateMeter,
    /// The final report, once the loop finished.
    report: Option<PrimaryReport>,
    /// Connections to abandoned standbys, until `Abandon` is out.
    closing: Vec<Closing>,
    /// Our own heartbeat settings (`--heartbeat-ms`), offered to joining standbys.
    heartbeat: crate::Heartbeat,
    /// The pair key (or `--insecure`) a joining standby must prove it holds.
    security: link::Security,
    /// Handshakes with joining standbys running now (capped).
    join_slots: link::HandshakeSlots,
    /// The back-pressure bounds on what a slow standby makes us hold.
    throttle: backpressure::Throttle,
    /// The witness (`--witness`).
    witness: Option<WitnessConfig>,
    /// Outcomes of claims made on helper threads.
    claims: (Sender<ClaimOutcome>, Receiver<ClaimOutcome>),
    /// What reached `out`: `Released` never names more.
    written: super::written::Written,
    /// Metrics and events (`--metrics`, `--events`).
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The guest's disks, for joining standbys' resyncs.
    disks: PrimaryDisks,
}

/// The connection to an abandoned standby: `Abandon` is queued on it. It closes once that
/// is written and the standby had time to read it, or once the standby closes; never before
/// `Abandon` is out, since a close without it is what tells a standby that its primary died.
struct Closing {
    link: Link,
    /// When `Abandon` was written out entirely (and our side shut down).
    flushed: Option<Instant>,
    /// The standby's host acknowledged every byte up to `Abandon`: it is the standby's to
    /// read even if this process dies now (DESIGN.md §5).
    delivered: bool,
    /// The core holds output until this standby is told (the latest one abandoned).
    tells: bool,
}

/// How often a written `Abandon` is checked for the standby host's acknowledgement (the
/// kernel wakes nobody for that).
const DELIVERY_POLL: Duration = Duration::from_millis(1);

impl Closing {
    fn new(link: Link) -> Self {
        Closing {
            link,
            flushed: None,
            delivered: false,
            tells: true,
        }
    }

    /// How long from `now` it may linger (until `Abandon` is out: not timed, the socket
    /// wakes the loop; until it is delivered: polled).
    fn until_closed(&self, now: Instant) -> Duration {
        match self.flushed {
            None => ABANDONED_LINGER,
            Some(t) => {
                let left = (t + ABANDONED_LINGER).saturating_duration_since(now);
                match self.delivered {
                    true => left,
                    false => left.min(DELIVERY_POLL),
                }
            }
        }
    }

    /// Writes what it can, reads and drops what the standby sent; false once it is done.
    fn service(&mut self, now: Instant) -> bool {
        if self.link.flush().is_err() {
            return false;
        }
        if self.flushed.is_none() && self.link.pending() == 0 {
            self.link.shutdown_write();
            self.flushed = Some(now);
            tracing::debug!(peer = self.link.peer(), "Abandon written");
        }
        if let Some(t) = self.flushed {
            if !self.delivered && self.link.unacknowledged() == 0 {
                self.delivered = true;
                tracing::info!(
                    peer = self.link.peer(),
                    after_ms = now.saturating_duration_since(t).as_millis() as u64,
                    "told the standby it is abandoned (Abandon delivered to its host)"
                );
            }
        }
        let mut ignored = Vec::new();
        if self.link.receive(&mut ignored).is_err() {
            // The standby closed (it read `Abandon`, or it is gone): nothing more to say.
            return false;
        }
        self.flushed
            .is_none_or(|t| now.saturating_duration_since(t) < ABANDONED_LINGER)
    }
}

impl Driver {
    /// Carries out what the core asked for.
    fn apply(&mut self, registry: &Registry) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send(mut msg) => {
                    self.written.fit(&mut msg);
                    if let Some(link) = &mut self.link {
                        // Written below, with the rest of this turn's messages.
                        if let Err(e) = link.queue(&msg) {
                            self.core.link_failed(e, Instant::now());
                        }
                    }
                }
                Action::Release {
                    epoch,
                    seq,
                    bytes,
                    why,
                } => {
                    if let Some(a) = &mut self.audit {
                        a.line(format_args!(
                            "release epoch={epoch} seq={seq}..{} {why}",
                            seq + bytes.len() as u64
                        ));
                    }
                    self.written.release(&mut self.out, seq, &bytes);
                }
                Action::Audit(line) => {
                    if let Some(a) = &mut self.audit {
                        a.line(format_args!("{line}"));
                    }
                }
                Action::Abandon(reason) => self.abandon(reason),
                Action::HandOver {
                    epoch,
                    exit_seq,
                    output_seq,
                } => self.hand_over(
                    registry,
                    Position {
                        epoch,
                        exit_seq,
                        output_seq,
                    },
                ),
                Action::RefuseHandover(why) => {
                    let _ = self.handover.send(Err(why));
                }
                Action::Claim {
                    vm_id,
                    expected_term,
                } => self.claim(vm_id, expected_term),
                Action::Fence(why) => {
                    if let Some(t) = &self.telemetry {
                        t.fenced(&why);
                    }
                    fence(&why)
                }
            }
        }
        // The messages of this turn leave together (one write, not one per message).
        if let Some(link) = &mut self.link {
            if let Err(e) = link.flush() {
                self.core.link_failed(e, Instant::now());
            }
        }
    }

    /// Claims the next term at the witness on a helper thread (it may take the request
    /// timeout); the outcome comes back through `claims` and the waker.
    fn claim(&mut self, vm_id: String, expected_term: u64) {
        if let Some(witness) = &self.witness {
            let (tx, waker) = (self.claims.0.clone(), self.waker.clone());
            spawn_claim(witness, vm_id, expected_term, tx, waker);
        }
    }

    /// Sends `Abandon` to the standby being dropped; its connection closes once that is out.
    fn abandon(&mut self, reason: String) {
        let Some(mut link) = self.link.take() else {
            // No connection to tell it on.
            return self.core.standby_told();
        };
        let msg = Message {
            body: Some(Body::Abandon(Abandon { reason })),
        };
        if link.send(&msg).is_err() {
            // The connection is broken already: there is nobody to tell.
            return self.core.standby_told();
        }
        for older in &mut self.closing {
            older.tells = false;
        }
        self.closing.push(Closing::new(link));
        self.service_closing(Instant::now());
    }

    /// Services the connections to abandoned standbys; the core learns when the latest is
    /// told (or cannot be: its connection broke).
    fn service_closing(&mut self, now: Instant) {
        let mut told = false;
        self.closing.retain_mut(|c| {
            let open = c.service(now);
            if c.tells && (c.delivered || !open) {
                c.tells = false;
                told = true;
            }
            open
        });
        if told {
            self.core.standby_told();
        }
    }

    /// Flushes the `Switchover` message (it must be out before the new roles start on
    /// this connection) and hands the connection to the vCPU thread.
    fn hand_over(&mut self, registry: &Registry, at: Position) {
        let Some(mut link) = self.link.take() else {
            return;
        };
        let deadline = Instant::now() + self.core.heartbeat().timeout;
        let mut flushed = Ok(());
        while link.pending() > 0 && Instant::now() < deadline {
            flushed = link.flush();
            if flushed.is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Err(e) = flushed {
            self.link = Some(link);
            return self.core.link_failed(e, Instant::now());
        }
        if let Err(e) = link.deregister(registry) {
            tracing::warn!("cannot move the connection off this event loop: {e}");
        }
        self.core.handed_over();
        let _ = self.handover.send(Ok(Handover { link, at }));
    }

    fn drain_vcpu(&mut self, registry: &Registry) {
        loop {
            if self.throttle.slowed() && self.link.is_some() {
                // The guest waits for the standby (its next send blocks on the full queue).
                break;
            }
            match self.rx.try_recv() {
                Ok(msg) => self.core.on_vcpu(msg, Instant::now()),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.core.vcpu_gone();
                    break;
                }
            }
            self.apply(registry);
        }
        self.apply(registry);
    }

    /// Waits (at most a heartbeat timeout) for the vCPU thread's `End`, handling what comes
    /// before it.
    fn await_end(&mut self, registry: &Registry) {
        let deadline = Instant::now() + self.core.heartbeat().timeout;
        while !self.core.ended() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => self.core.on_vcpu(msg, Instant::now()),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => self.core.vcpu_gone(),
            }
            self.apply(registry);
        }
    }

    /// Takes new connections on the `--accept-standby` socket; each handshake runs on a
    /// helper thread.
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
            if let Err(why) = self.core.accepts_standby() {
                tracing::warn!(peer, "refusing a joining standby: {why}");
                continue;
            }
            let Some(slot) = self.join_slots.take() else {
                tracing::warn!(
                    peer,
                    "refusing a joining standby: {} handshakes already running",
                    link::MAX_CONCURRENT_HANDSHAKES
                );
                continue;
            };
            let security = self.security.clone();
            let tx = self.joining.0.clone();
            let waker = self.waker.clone();
            let start = self.core.start_message().clone();
            let disks = self.disks.clone();
            let heartbeat = self.heartbeat;
            let spawned = std::thread::Builder::new()
                .name("ftvm-join".into())
                .spawn(move || {
                    let me = link::Me {
                        role: Role::Primary,
                        initiator: false,
                        security: &security,
                    };
                    let result = link::handshake(stream, &peer, me, heartbeat)
                        .and_then(|h| offer_vm(h, &peer, start, &disks))
                        .map_err(|e| format!("joining standby {peer}: {e}"));
                    drop(slot);
                    let _ = tx.send(result);
                    let _ = waker.wake();
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread for a joining standby: {e}");
            }
        }
    }

    /// A joining standby finished its handshake: attach it.
    fn attach_joined(&mut self, registry: &Registry) {
        let Ok(result) = self.joining.1.try_recv() else {
            return;
        };
        let (mut link, ready) = match result {
            Ok(joined) => joined,
            Err(why) => return tracing::warn!("{why}"),
        };
        if self.core.accepts_standby().is_err() {
            return tracing::warn!(peer = link.peer(), "refusing a joining standby: too late");
        }
        if let Err(e) = link.register(registry, LINK) {
            return tracing::warn!(peer = link.peer(), "cannot watch the joining standby: {e}");
        }
        self.core.attach(
            link.peer().to_string(),
            link.heartbeat(),
            &ready,
            Instant::now(),
        );
        self.link = Some(link);
        self.apply(registry);
    }

    /// Keeps what a slow standby makes us hold within the bounds: past the first the guest
    /// is slowed (the vCPU thread's queue is left alone), past the second the standby is
    /// dropped.
    fn bound_the_backlog(&mut self, registry: &Registry, now: Instant) {
        let Some(link) = &self.link else {
            return self.throttle.clear();
        };
        let mut backlog = self.core.backlog(now);
        backlog.bytes += link.pending() as u64;
        let was_slowed = self.throttle.slowed();
        match self.throttle.check(&backlog, now) {
            // The vCPU thread may be waiting on its full queue: take from it now.
            Verdict::Run if was_slowed => self.drain_vcpu(registry),
            Verdict::Run | Verdict::Slow => {}
            Verdict::Drop(why) => {
                self.core.lose(why, now);
                self.apply(registry);
            }
        }
    }

    /// Sends pre-copy chunks while the socket takes them.
    fn pump_precopy(&mut self, registry: &Registry) {
        // At most 16 chunks and 5 ms a turn: heartbeats and acks must not wait for the copy.
        let deadline = Instant::now() + Duration::from_millis(5);
        let mut budget = 16;
        while budget > 0 && Instant::now() < deadline && self.precopy_can_send() {
            if self.core.precopy_step(Instant::now()) {
                budget -= 1;
            }
            self.apply(registry);
        }
    }

    fn precopy_can_send(&self) -> bool {
        self.core.precopy_pending()
            && self
                .link
                .as_ref()
                .is_some_and(|l| l.pending() < PRECOPY_QUEUE)
    }
}

impl Side for Driver {
    fn link(&mut self) -> Option<&mut Link> {
        self.link.as_mut()
    }

    fn timeout(&self, now: Instant) -> Option<Duration> {
        if self.precopy_can_send() {
            return Some(Duration::ZERO);
        }
        let lingering = self.closing.iter().map(|c| c.until_closed(now));
        self.core
            .poll_timeout(now)
            .into_iter()
            .chain(lingering)
            .min()
    }

    fn inputs(&mut self, woken: Woken, registry: &Registry, _now: Instant) {
        if woken.accept {
            self.accept_standbys();
        }
        while let Ok(outcome) = self.claims.1.try_recv() {
            self.core.claim_result(outcome, Instant::now());
            self.apply(registry);
        }
        self.attach_joined(registry);
        self.drain_vcpu(registry);
    }

    fn on_message(&mut self, msg: Message, now: Instant) {
        // What the core asks for is done in `after`, in this same turn.
        self.core.on_message(msg, now);
    }

    fn heard(&mut self, now: Instant) {
        self.core.heard(now);
    }

    fn link_failed(&mut self, e: ChannelError, registry: &Registry, now: Instant) {
        // A standby that closes once it verified the last epoch of a finished run is done,
        // not lost. It can do so before the vCPU thread, which sends `End` right after the
        // batch carrying the run's end, gets to that (seen where the host is slow: the
        // nested-KVM harness).
        self.drain_vcpu(registry);
        if self.core.run_end_shipped() {
            self.await_end(registry);
        }
        self.core.link_failed(e, now);
        self.apply(registry);
    }

    fn after(&mut self, registry: &Registry, now: Instant) -> bool {
        self.apply(registry);
        self.bound_the_backlog(registry, now);
        self.service_closing(now);
        self.pump_precopy(registry);
        if let Some(link) = &self.link {
            self.meter.sample(now, link.bytes_sent);
        }
        self.core.tick(now);
        self.apply(registry);
        self.core.try_handover(now);
        self.apply(registry);
        false
    }

    fn control(&mut self, request: Request, registry: &Registry, now: Instant) -> String {
        let rate = self
            .link
            .as_ref()
            .map_or(0, |l| self.meter.rate(now, l.bytes_sent));
        let mut answer = self.core.control_request(request, now, rate);
        self.apply(registry);
        if request == Request::Status {
            // Whether the guest waits for a standby that is behind (DESIGN.md §6, bounds).
            let slowed = self.throttle.slowed() && self.link.is_some();
            answer.push_str(if slowed {
                "slowed=yes\n"
            } else {
                "slowed=no\n"
            });
        }
        answer
    }

    fn snapshot(&mut self, now: Instant) -> (crate::status::Status, crate::telemetry::Timings) {
        let rate = self
            .link
            .as_ref()
            .map_or(0, |l| self.meter.rate(now, l.bytes_sent));
        (self.core.status(now, rate), self.core.take_timings())
    }

    fn done(&self) -> bool {
        self.core.done()
    }

    fn finish(&mut self, event_loop: &mut EventLoop) {
        self.report = Some(self.core.finish());
        if let Some(link) = &mut self.link {
            link.drain(event_loop.poll_mut(), self.core.heartbeat().timeout);
        }
        for c in &mut self.closing {
            c.link
                .drain(event_loop.poll_mut(), self.core.heartbeat().timeout);
        }
    }
}

/// The standby won the term at the witness: this process stops at once, its guest with it,
/// and nothing it holds leaves (DESIGN.md §5, fencing).
fn fence(why: &str) -> ! {
    eprintln!("ftvm: fenced: {why}");
    std::process::exit(i32::from(STATUS_FENCED));
}

/// Sends a handshaken standby the VM it must build (`start`) and waits until it is ready
/// (`Ready`), or says why it cannot build it (`Diverged`).
pub fn offer_vm(
    mut h: link::Handshaken,
    peer: &str,
    start: Start,
    disks: &PrimaryDisks,
) -> Result<(Link, Ready), ChannelError> {
    link::send_blocking(
        &mut h.stream,
        peer,
        &Message {
            body: Some(Body::Start(start)),
        },
    )?;
    let mut msg = link::recv_blocking(&mut h.stream, peer, &mut h.rx_offset)?;
    if let Some(Body::DiskHashes(first)) = msg.body {
        msg = crate::disk_resync::serve(&mut h, peer, disks, first)?;
    }
    let ready = match msg.body {
        Some(Body::Ready(ready)) => ready,
        Some(Body::Diverged(d)) => {
            return Err(ChannelError::Refused {
                peer: peer.into(),
                why: d.reason,
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
