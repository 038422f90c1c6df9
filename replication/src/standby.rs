//! The standby's side of the channel: a thread running a mio event loop that passes the
//! primary's record batches to the replayer as they arrive, answers each verified epoch with
//! an `Ack`, reports a divergence, records what output the primary released, exchanges
//! heartbeats, and tells the replayer when the primary is gone (EOF or reset: at once;
//! silence: after the heartbeat timeout).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ftvm_proto::channel::{message::Body, Ack, CheckpointEnd, Diverged, Message, PageChunk};
use ftvm_proto::log::{record::Kind, RecordBatch};
use mio::net::TcpListener;
use mio::{Events, Poll, Token, Waker};

use crate::audit::Audit;
use crate::link::{self, body_name, ChannelError, Heartbeat, Link};
use crate::status::{self, RateMeter, Status};
use crate::ChannelOptions;

const WAKER: Token = Token(0);
const LINK: Token = Token(1);
const CONTROL: Token = Token(2);

/// What the channel thread hands the replayer.
#[derive(Debug)]
pub enum ToReplayer {
    /// The next record batch of the log.
    Batch(RecordBatch),
    /// Pages of a checkpoint (a repair, or a sync).
    Pages(PageChunk),
    /// The end of a checkpoint.
    CheckpointEnd(CheckpointEnd),
    /// The primary hands over its role (`ftvm switchover`); the connection is the
    /// replayer's to take ([`StandbyChannel::into_link`]).
    Switchover(ftvm_proto::channel::Switchover),
    /// The primary is gone; nothing more will come. The reason, for the log.
    PrimaryLost(String),
}

/// What the replayer tells the channel thread.
#[derive(Debug)]
pub enum FromReplayer {
    /// The replay matched the digest of `epoch`, ending at `exit_seq`.
    Verified {
        /// The epoch.
        epoch: u64,
        /// Its last exit.
        exit_seq: u64,
    },
    /// The replay cannot follow past `epoch`: ask for a repair (or, with
    /// `checkpoint_failed`, give up).
    Diverged(Diverged),
    /// A checkpoint closing `epoch` is installed and its digest matched.
    Installed {
        /// The epoch it closes.
        epoch: u64,
        /// Its exit.
        exit_seq: u64,
        /// It ended a sync (else a repair).
        sync: bool,
    },
    /// Sync progress, for `ftvm status`: page bytes received, and pages the primary said
    /// are left.
    Syncing {
        /// Page bytes received.
        bytes: u64,
        /// Pages left in the primary's current round.
        remaining_pages: u64,
    },
    /// The standby went live: it is the primary now (unprotected).
    Live,
    /// Flush what is queued for the primary and stop.
    Shutdown,
}

/// The standby's channel thread.
pub struct StandbyChannel {
    tx: Sender<FromReplayer>,
    waker: Arc<Waker>,
    rx: Receiver<ToReplayer>,
    released: Arc<AtomicU64>,
    thread: JoinHandle<Option<Link>>,
}

impl StandbyChannel {
    /// Starts the channel thread over `link`.
    pub fn spawn(link: Link, options: ChannelOptions) -> std::io::Result<Self> {
        let mut poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (to_replayer, rx) = crossbeam_channel::unbounded();
        let (tx, from_replayer) = crossbeam_channel::unbounded();
        let released = Arc::new(AtomicU64::new(0));
        let mut state = Standby::new(
            link,
            to_replayer,
            from_replayer,
            released.clone(),
            &options,
            &poll,
        )?;
        let thread = std::thread::Builder::new()
            .name("ftvm-channel".into())
            .spawn(move || {
                state.run(&mut poll);
                let mut link = state.handover.then(|| state.link.take()).flatten()?;
                if let Err(e) = link.deregister(poll.registry()) {
                    tracing::warn!("cannot move the connection off this event loop: {e}");
                }
                Some(link)
            })?;
        Ok(Self {
            tx,
            waker,
            rx,
            released,
            thread,
        })
    }

    /// Where the replayer reads the log from.
    pub fn inbox(&self) -> Receiver<ToReplayer> {
        self.rx.clone()
    }

    /// The primary's released output sequence number, as last heard.
    pub fn released(&self) -> Arc<AtomicU64> {
        self.released.clone()
    }

    /// Tells the channel thread `event`.
    pub fn tell(&self, event: FromReplayer) {
        if self.tx.send(event).is_ok() {
            if let Err(e) = self.waker.wake() {
                tracing::warn!("cannot wake the channel thread: {e}");
            }
        }
    }

    /// Flushes what is queued for the primary and stops the channel thread.
    pub fn shutdown(self) {
        self.tell(FromReplayer::Shutdown);
        if self.thread.join().is_err() {
            tracing::warn!("the channel thread panicked");
        }
    }

    /// After a [`ToReplayer::Switchover`]: the connection, for the new primary's channel.
    pub fn into_link(self) -> Option<Link> {
        self.tell(FromReplayer::Shutdown);
        self.thread.join().ok().flatten()
    }
}

struct Standby {
    link: Option<Link>,
    peer: String,
    to_replayer: Sender<ToReplayer>,
    from_replayer: Receiver<FromReplayer>,
    released: Arc<AtomicU64>,
    heartbeat: Heartbeat,
    control: Option<TcpListener>,
    audit: Option<Audit>,
    /// Epochs received and not yet verified, with when their end arrived.
    unverified: VecDeque<(u64, Instant)>,
    received_epoch: u64,
    verified_epoch: u64,
    exit_seq: u64,
    lost: Option<String>,
    live: bool,
    diverged: Option<String>,
    /// Waiting for a repair checkpoint: why.
    awaiting: Option<String>,
    /// Syncing: (bytes received, pages left).
    syncing: Option<(u64, u64)>,
    repairs: u64,
    syncs: u64,
    /// The primary handed over its role: keep the connection for the new primary.
    handover: bool,
    meter: RateMeter,
}

impl Standby {
    fn new(
        mut link: Link,
        to_replayer: Sender<ToReplayer>,
        from_replayer: Receiver<FromReplayer>,
        released: Arc<AtomicU64>,
        options: &ChannelOptions,
        poll: &Poll,
    ) -> std::io::Result<Self> {
        link.register(poll.registry(), LINK)?;
        let control = link::register_control(options.control.as_ref(), poll, CONTROL)?;
        Ok(Self {
            peer: link.peer().to_string(),
            link: Some(link),
            to_replayer,
            from_replayer,
            released,
            heartbeat: options.heartbeat,
            control,
            audit: Audit::from_env(),
            unverified: VecDeque::new(),
            received_epoch: 0,
            verified_epoch: 0,
            exit_seq: 0,
            lost: None,
            live: false,
            diverged: None,
            awaiting: None,
            syncing: None,
            repairs: 0,
            syncs: 0,
            handover: false,
            meter: RateMeter::default(),
        })
    }

    fn run(&mut self, poll: &mut Poll) {
        let mut events = Events::with_capacity(64);
        let mut inbox = Vec::new();
        loop {
            let timeout = Some(link::poll_timeout(self.link.as_ref(), &self.heartbeat));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.lose(format!("event loop failed: {e}"));
                }
            }
            let control_ready = events.iter().any(|e| e.token() == CONTROL);
            if let Some(link) = &mut self.link {
                let result = link.flush().and_then(|()| link.receive(&mut inbox));
                for msg in inbox.drain(..) {
                    self.on_message(msg);
                }
                if let Err(e) = result {
                    self.lose_with(e);
                }
            }
            if self.handover {
                // Nothing more is read from this connection here: the new primary's
                // channel takes it over.
                return;
            }
            if self.drain_replayer() {
                self.finish(poll);
                return;
            }
            self.tick();
            if control_ready {
                let control = self.control.take();
                status::serve(control.as_ref(), |r| self.control_request(r));
                self.control = control;
            }
        }
    }

    fn on_message(&mut self, msg: Message) {
        match msg.body {
            Some(Body::Heartbeat(_)) => {}
            Some(Body::Batch(batch)) => {
                let now = Instant::now();
                self.exit_seq = batch.complete_through;
                for r in &batch.records {
                    if let Some(Kind::EpochEnd(e)) = &r.kind {
                        self.received_epoch = e.epoch;
                        self.unverified.push_back((e.epoch, now));
                    }
                }
                // The replayer stops reading only when it stops replaying; then nothing
                // needs the batch.
                let _ = self.to_replayer.send(ToReplayer::Batch(batch));
            }
            Some(Body::Released(r)) => {
                self.released.fetch_max(r.output_seq, Ordering::SeqCst);
            }
            Some(Body::Switchover(sw)) => {
                tracing::warn!(
                    epoch = sw.epoch,
                    exit_seq = sw.exit_seq,
                    "the primary hands over its role"
                );
                self.handover = true;
                let _ = self.to_replayer.send(ToReplayer::Switchover(sw));
            }
            Some(Body::Pages(chunk)) => {
                let _ = self.to_replayer.send(ToReplayer::Pages(chunk));
            }
            Some(Body::CheckpointEnd(end)) => {
                self.exit_seq = end.exit_seq;
                self.received_epoch = end.epoch;
                self.unverified.push_back((end.epoch, Instant::now()));
                let _ = self.to_replayer.send(ToReplayer::CheckpointEnd(end));
            }
            _ => {
                let got = body_name(&msg).to_string();
                self.lose_with(ChannelError::Unexpected {
                    peer: self.peer.clone(),
                    expected: "a record batch, Released or Heartbeat",
                    got,
                });
            }
        }
    }

    /// Handles what the replayer said; true when it asked to shut down.
    fn drain_replayer(&mut self) -> bool {
        loop {
            let event = match self.from_replayer.try_recv() {
                Ok(e) => e,
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            };
            match event {
                FromReplayer::Verified { epoch, exit_seq } => {
                    if let Some(a) = &mut self.audit {
                        a.line(format_args!("verified epoch={epoch} exit_seq={exit_seq}"));
                    }
                    self.verified_epoch = epoch;
                    while self.unverified.front().is_some_and(|(e, _)| *e <= epoch) {
                        self.unverified.pop_front();
                    }
                    self.send(Message {
                        body: Some(Body::Ack(Ack {
                            received_epoch: self.received_epoch,
                            verified_epoch: epoch,
                            exit_seq,
                        })),
                    });
                }
                FromReplayer::Diverged(d) => {
                    let what = format!("epoch {} at exit {}: {}", d.epoch, d.exit_seq, d.reason);
                    if d.checkpoint_failed {
                        self.diverged = Some(what);
                    } else {
                        self.awaiting = Some(what);
                    }
                    self.send(Message {
                        body: Some(Body::Diverged(d)),
                    });
                }
                FromReplayer::Installed {
                    epoch,
                    exit_seq,
                    sync,
                } => {
                    if let Some(a) = &mut self.audit {
                        a.line(format_args!(
                            "verified epoch={epoch} exit_seq={exit_seq} checkpoint"
                        ));
                    }
                    if sync {
                        self.syncs += 1;
                        self.syncing = None;
                    } else {
                        self.repairs += 1;
                    }
                    self.awaiting = None;
                    self.verified_epoch = epoch;
                    self.unverified.retain(|(e, _)| *e > epoch);
                    self.send(Message {
                        body: Some(Body::Ack(Ack {
                            received_epoch: self.received_epoch,
                            verified_epoch: epoch,
                            exit_seq,
                        })),
                    });
                }
                FromReplayer::Syncing {
                    bytes,
                    remaining_pages,
                } => self.syncing = Some((bytes, remaining_pages)),
                FromReplayer::Live => self.live = true,
                FromReplayer::Shutdown => return true,
            }
        }
    }

    fn send(&mut self, msg: Message) {
        if let Some(link) = &mut self.link {
            if let Err(e) = link.send(&msg) {
                self.lose_with(e);
            }
        }
    }

    fn lose_with(&mut self, e: ChannelError) {
        self.lose(format!("primary lost: {e}"));
    }

    fn lose(&mut self, why: String) {
        if self.link.take().is_none() {
            return;
        }
        tracing::debug!("{why}");
        self.lost = Some(why.clone());
        let _ = self.to_replayer.send(ToReplayer::PrimaryLost(why));
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let Some(link) = &mut self.link else { return };
        self.meter.sample(now, link.bytes_received);
        if let Err(e) = link.tick(now, &self.heartbeat) {
            self.lose_with(e);
        }
    }

    /// Sends what is still queued (a last Ack or Diverged) before the connection closes.
    fn finish(&mut self, poll: &mut Poll) {
        if let Some(link) = &mut self.link {
            link.drain(poll, self.heartbeat.timeout);
        }
    }

    fn control_request(&mut self, request: status::Request) -> String {
        match request {
            status::Request::Status => self.status().to_string(),
            status::Request::Switchover => {
                "error: this is the standby; ask the primary's control socket\n".into()
            }
        }
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let (role, protected, state) = if self.live {
            (
                "primary (live after failover)",
                false,
                format!(
                    "unprotected: {}",
                    self.lost.as_deref().unwrap_or("primary lost")
                ),
            )
        } else if let Some(d) = &self.diverged {
            ("standby", false, format!("diverged: {d}"))
        } else if let Some((bytes, left)) = self.syncing {
            (
                "standby",
                false,
                format!(
                    "syncing: {} MiB received, {left} pages left in the round",
                    bytes >> 20
                ),
            )
        } else if let Some(why) = &self.awaiting {
            ("standby", true, format!("repairing: {why}"))
        } else if let Some(why) = &self.lost {
            ("standby", false, format!("going live: {why}"))
        } else {
            ("standby", true, "lockstep".to_string())
        };
        Status {
            role: role.into(),
            protected,
            state,
            peer: self.peer.clone(),
            epoch: self.received_epoch,
            verified_epoch: self.verified_epoch,
            exit_seq: self.exit_seq,
            lag_epochs: self.unverified.len() as u64,
            lag: self
                .unverified
                .front()
                .map_or(Duration::ZERO, |(_, t)| now.duration_since(*t)),
            log_bytes_per_s: self
                .link
                .as_ref()
                .map_or(0, |l| self.meter.rate(now, l.bytes_received)),
            released_output_seq: self.released.load(Ordering::SeqCst),
            held_output_bytes: 0,
            repairs: self.repairs,
            syncs: self.syncs,
        }
    }
}
