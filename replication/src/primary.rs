//! The primary's side of the channel: a thread running a mio event loop that ships the log
//! the recorder produces, holds guest output in the [`OutputBuffer`] until the standby
//! verifies its epoch, releases it to stdout, tells the standby what it released, exchanges
//! heartbeats, and drops to unprotected operation (output released at once) when the
//! standby is lost or cannot follow.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ftvm_proto::channel::{message::Body, Message, Released};
use ftvm_proto::log::{record::Kind, RecordBatch};
use mio::net::TcpListener;
use mio::{Events, Poll, Token, Waker};

use crate::audit::Audit;
use crate::link::{self, body_name, ChannelError, Heartbeat, Link};
use crate::output::OutputBuffer;
use crate::status::{self, RateMeter, Status};
use crate::ChannelOptions;

const WAKER: Token = Token(0);
const LINK: Token = Token(1);
const CONTROL: Token = Token(2);

/// What the vCPU thread hands the channel thread, in the order it happened.
#[derive(Debug)]
pub enum FromVcpu {
    /// Records, usually one epoch's worth closed by its `EpochEnd`.
    Batch(RecordBatch),
    /// Guest output produced in the epoch now open.
    Output(Vec<u8>),
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
}

/// The primary's channel thread.
pub struct PrimaryChannel {
    feed: Feed,
    thread: JoinHandle<PrimaryReport>,
}

impl PrimaryChannel {
    /// Starts the channel thread over `link` (None: no standby, unprotected from the start,
    /// `why` says why), releasing guest output to `out`.
    pub fn spawn(
        link: Result<Link, String>,
        out: Box<dyn Write + Send>,
        options: ChannelOptions,
    ) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut state = Primary::new(link, out, rx, &options, &poll)?;
        let thread = std::thread::Builder::new()
            .name("ftvm-channel".into())
            .spawn(move || {
                state.run(poll);
                state.report
            })?;
        Ok(Self {
            feed: Feed { tx, waker },
            thread,
        })
    }

    /// The handle the vCPU thread feeds.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
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
    meter: RateMeter,
    report: PrimaryReport,
}

impl Primary {
    fn new(
        link: Result<Link, String>,
        out: Box<dyn Write + Send>,
        rx: Receiver<FromVcpu>,
        options: &ChannelOptions,
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
        Ok(Self {
            link,
            peer,
            out,
            rx,
            heartbeat: options.heartbeat,
            control,
            audit: Audit::from_env(),
            buffer: OutputBuffer::default(),
            epoch: 1,
            exit_seq: 0,
            unverified: VecDeque::new(),
            ended: false,
            meter: RateMeter::default(),
            report: PrimaryReport {
                lost,
                ..Default::default()
            },
        })
    }

    fn run(&mut self, mut poll: Poll) {
        let mut events = Events::with_capacity(64);
        let mut inbox = Vec::new();
        loop {
            let timeout = Some(link::poll_timeout(self.link.as_ref(), &self.heartbeat));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.lose(format!("event loop failed: {e}"));
                }
            }
            let mut control_ready = false;
            for event in events.iter() {
                control_ready |= event.token() == CONTROL;
            }
            self.drain_vcpu();
            if let Some(link) = &mut self.link {
                let result = link.flush().and_then(|()| link.receive(&mut inbox));
                for msg in inbox.drain(..) {
                    self.on_message(msg);
                }
                if let Err(e) = result {
                    // A standby that closes once it verified the last epoch of a finished
                    // run is done, not lost.
                    self.drain_vcpu();
                    if !self.done() {
                        self.lose_with(e);
                    }
                }
            }
            self.tick();
            if control_ready {
                status::serve(self.control.as_ref(), || self.status());
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
                Ok(FromVcpu::Batch(b)) => self.ship(b),
                Ok(FromVcpu::Output(bytes)) => self.output(bytes),
                Ok(FromVcpu::End) => {
                    tracing::debug!("guest run over");
                    self.ended = true;
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.ended = true;
                    return;
                }
            }
        }
    }

    fn ship(&mut self, batch: RecordBatch) {
        let now = Instant::now();
        self.exit_seq = batch.complete_through;
        for r in &batch.records {
            if let Some(Kind::EpochEnd(e)) = &r.kind {
                self.epoch = e.epoch + 1;
                self.report.epochs = e.epoch;
                if self.link.is_some() {
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
        self.send(Message {
            body: Some(Body::Batch(batch)),
        });
    }

    fn output(&mut self, bytes: Vec<u8>) {
        if self.link.is_some() {
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
                while self
                    .unverified
                    .front()
                    .is_some_and(|(epoch, _)| *epoch <= ack.verified_epoch)
                {
                    self.unverified.pop_front();
                }
                self.release(ack.verified_epoch);
            }
            Some(Body::Diverged(d)) => {
                let what = if d.checkpoint_required {
                    "needs a checkpoint"
                } else {
                    "diverged"
                };
                self.lose(format!(
                    "the standby reports that epoch {} {what} at exit {}: {}; checkpoints are not implemented yet",
                    d.epoch, d.exit_seq, d.reason
                ));
            }
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
        let Some(link) = &mut self.link else { return };
        self.meter.sample(now, link.bytes_sent);
        if let Err(e) = link.tick(now, &self.heartbeat) {
            self.lose_with(e);
        }
    }

    fn done(&self) -> bool {
        self.ended
            && (self.link.is_none() || self.buffer.held_bytes() == 0 && self.unverified.is_empty())
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
            (Some(_), _) => (true, "lockstep".to_string()),
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
        }
    }
}
