//! The standby's side of the pair protocol.
//!
//! [`StandbyCore`] is the protocol as a state machine with no I/O inside; [`StandbyChannel`]
//! runs it on a thread over the shared event loop ([`crate::event_loop`]), handing the
//! primary's log to the replayer as it arrives and telling the replayer when the primary is
//! gone (EOF or reset without `Abandon`: at once; silence: never on its own, it waits for
//! the primary to speak again or for `ftvm promote`; DESIGN.md §5).

mod core;
mod status;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ftvm_proto::channel::{CheckpointEnd, Diverged, HeldOutput, Message, PageChunk};
use ftvm_proto::log::RecordBatch;
use mio::{Registry, Waker};

pub use self::core::{Action, StandbyCore};

use crate::audit::Audit;
use crate::event_loop::{EventLoop, Side, Woken, LINK};
use crate::link::{ChannelError, Link};
use crate::status::{RateMeter, Request};
use crate::witness::{spawn_claim, ClaimOutcome, WitnessConfig};
use crate::ChannelOptions;

/// What the channel thread hands the replayer.
#[derive(Debug)]
pub enum ToReplayer {
    /// The next record batch of the log.
    Batch(RecordBatch),
    /// Pages of a checkpoint (a repair, or a sync).
    Pages(PageChunk),
    /// The end of a checkpoint, with the output the primary held when it made it.
    CheckpointEnd {
        /// The state, digest and position.
        end: CheckpointEnd,
        /// The output not yet released at that point.
        held: HeldOutput,
    },
    /// The primary hands over its role (`ftvm switchover`); the connection is the
    /// replayer's to take ([`StandbyChannel::into_link`]).
    Switchover(ftvm_proto::channel::Switchover),
    /// The primary is gone; nothing more will come. The reason, for the log.
    PrimaryLost(String),
    /// The primary dropped this standby and runs on (`Abandon`): stop, never go live. Its
    /// reason.
    Abandoned(String),
    /// The primary won the term at the witness: stop, never go live. Why.
    Fenced(String),
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
        /// When the replay reached that exit (the digest was computed after).
        replayed: Instant,
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
        Self::spawn_with(link, options, false)
    }

    /// Like [`StandbyChannel::spawn`], for a standby that `syncing` joins a running guest
    /// (unprotected from the first status on, not only from the replayer's first report).
    pub fn spawn_with(
        mut link: Link,
        options: ChannelOptions,
        syncing: bool,
    ) -> std::io::Result<Self> {
        let (mut event_loop, waker) = EventLoop::new(&options)?;
        link.register(event_loop.registry(), LINK)?;
        let (to_replayer, rx) = crossbeam_channel::unbounded();
        let (tx, from_replayer) = crossbeam_channel::unbounded();
        let released = Arc::new(AtomicU64::new(0));
        let audit = Audit::from_env();
        let mut core = StandbyCore::new(
            link.peer().to_string(),
            // The settings agreed with the primary in the handshake.
            link.heartbeat(),
            audit.is_some(),
            Instant::now(),
        );
        if let Some(addr) = options.control.as_ref().and_then(|l| l.local_addr().ok()) {
            core.set_control_addr(addr.to_string());
        }
        if syncing {
            core.set_syncing();
        }
        core.set_tsc_exits(options.tsc_exits);
        // The witness counts only once the primary named the VM there (its Start).
        let witness = options
            .witness
            .clone()
            .filter(|w| !w.pair_term().vm_id.is_empty());
        if let Some(w) = &witness {
            let t = w.pair_term();
            core.set_named_arbiter(t.vm_id, t.term, w.backend.name());
        }
        let mut driver = Driver {
            core,
            link: Some(link),
            to_replayer,
            from_replayer,
            released: released.clone(),
            audit,
            meter: RateMeter::default(),
            witness,
            claims: crossbeam_channel::unbounded(),
            waker: waker.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ftvm-channel".into())
            .spawn(move || {
                event_loop.run(&mut driver);
                if !driver.core.handing_over() {
                    return None;
                }
                let mut link = driver.link.take()?;
                if let Err(e) = link.deregister(event_loop.registry()) {
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

/// Messages queued for the replayer past which the channel thread stops reading the
/// primary's socket until the replayer catches up: TCP flow control then reaches the primary,
/// whose own bounds slow its guest (DESIGN.md §6, bounds).
pub const REPLAYER_QUEUE: usize = 256;

/// The channel thread's state outside the core.
struct Driver {
    core: StandbyCore,
    link: Option<Link>,
    to_replayer: Sender<ToReplayer>,
    from_replayer: Receiver<FromReplayer>,
    released: Arc<AtomicU64>,
    audit: Option<Audit>,
    meter: RateMeter,
    /// The witness (`--witness`) and the outcomes of claims made on helper threads.
    witness: Option<WitnessConfig>,
    claims: (Sender<ClaimOutcome>, Receiver<ClaimOutcome>),
    waker: Arc<Waker>,
}

impl Driver {
    /// Carries out what the core asked for.
    fn apply(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send(msg) => {
                    if let Some(link) = &mut self.link {
                        if let Err(e) = link.send(&msg) {
                            self.core.link_failed(e);
                        }
                    }
                }
                // The replayer stops reading only when it stops replaying; then nothing
                // needs what it was sent.
                Action::ToReplayer(msg) => {
                    let _ = self.to_replayer.send(msg);
                }
                Action::Released(seq) => {
                    self.released.fetch_max(seq, Ordering::SeqCst);
                }
                Action::Audit(line) => {
                    if let Some(a) = &mut self.audit {
                        a.line(format_args!("{line}"));
                    }
                }
                Action::DropLink => self.link = None,
                Action::Claim {
                    vm_id,
                    expected_term,
                } => {
                    if let Some(witness) = &self.witness {
                        let (tx, waker) = (self.claims.0.clone(), self.waker.clone());
                        spawn_claim(witness, vm_id, expected_term, tx, waker);
                    }
                }
            }
        }
    }

    /// Handles what the replayer said; a replayer that is gone means stop.
    fn drain_replayer(&mut self, now: Instant) {
        loop {
            match self.from_replayer.try_recv() {
                Ok(event) => self.core.on_replayer(event, now),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.core.on_replayer(FromReplayer::Shutdown, now);
                    break;
                }
            }
            self.apply();
            if self.core.shut_down() {
                break;
            }
        }
        self.apply();
    }
}

impl Side for Driver {
    fn link(&mut self) -> Option<&mut Link> {
        self.link.as_mut()
    }

    fn timeout(&self, now: Instant) -> Option<Duration> {
        self.core.poll_timeout(now)
    }

    fn inputs(&mut self, _woken: Woken, _registry: &Registry, now: Instant) {
        while let Ok(outcome) = self.claims.1.try_recv() {
            self.core.claim_result(outcome, now);
            self.apply();
        }
    }

    fn on_message(&mut self, msg: Message, now: Instant) {
        self.core.on_message(msg, now);
        self.apply();
    }

    fn heard(&mut self, now: Instant) {
        self.core.heard(now);
    }

    fn hold_reads(&self) -> bool {
        self.to_replayer.len() >= REPLAYER_QUEUE
    }

    fn link_failed(&mut self, e: ChannelError, _registry: &Registry, _now: Instant) {
        self.core.link_failed(e);
        self.apply();
    }

    fn after(&mut self, _registry: &Registry, now: Instant) -> bool {
        if self.core.handing_over() {
            // Nothing more is read from this connection here: the new primary's channel
            // takes it over.
            return true;
        }
        self.drain_replayer(now);
        if self.core.shut_down() {
            return false;
        }
        if let Some(link) = &self.link {
            self.meter.sample(now, link.bytes_received);
        }
        self.core.tick(now);
        self.apply();
        false
    }

    fn control(&mut self, request: Request, _registry: &Registry, now: Instant) -> String {
        let rate = self
            .link
            .as_ref()
            .map_or(0, |l| self.meter.rate(now, l.bytes_received));
        let answer = self.core.control_request(request, now, rate);
        self.apply();
        answer
    }

    fn snapshot(&mut self, now: Instant) -> (crate::status::Status, crate::telemetry::Timings) {
        let rate = self
            .link
            .as_ref()
            .map_or(0, |l| self.meter.rate(now, l.bytes_received));
        (self.core.status(now, rate), Default::default())
    }

    fn done(&self) -> bool {
        self.core.shut_down()
    }

    /// Sends what is still queued (a last Ack or Diverged) before the connection closes.
    fn finish(&mut self, event_loop: &mut EventLoop) {
        if let Some(link) = &mut self.link {
            link.drain(event_loop.poll_mut(), self.core.heartbeat().timeout);
        }
    }
}
