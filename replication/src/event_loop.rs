//! The one mio event loop both channel threads run. It only moves bytes and time: it waits
//! for the socket, the waker (a message from the vCPU thread or the replayer), the control
//! socket and the join socket; moves frames between the [`Link`] and the role's protocol
//! core; and serves `ftvm status`. What each role does with what arrives is its [`Side`].

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_proto::channel::Message;
use mio::net::TcpListener;
use mio::{Events, Poll, Registry, Token, Waker};

use crate::control::ControlServer;
use crate::link::{self, ChannelError, Link};
use crate::status::{Request, Status};
use crate::telemetry::{Telemetry, Timings};
use crate::ChannelOptions;

/// The waker: another thread has something for this one.
pub const WAKER: Token = Token(0);
/// The pair connection.
pub const LINK: Token = Token(1);
/// The control socket (`ftvm status`).
pub const CONTROL: Token = Token(2);
/// The socket joining standbys connect to (`--accept-standby`).
pub const ACCEPT: Token = Token(3);

/// What one wait found ready, besides the link and the waker (always looked at).
#[derive(Debug, Default, Clone, Copy)]
pub struct Woken {
    /// A control client is waiting.
    pub control: bool,
    /// A standby is connecting to the join socket.
    pub accept: bool,
}

/// A role's part of the loop.
pub trait Side {
    /// The pair connection, if there is one.
    fn link(&mut self) -> Option<&mut Link>;
    /// How long the loop may wait from `now`: until the side's next deadline, or without a
    /// bound (None) when nothing is timed; everything else wakes the loop.
    fn timeout(&self, now: Instant) -> Option<Duration>;
    /// What arrived from the other threads (and, with `woken.accept`, joining standbys),
    /// before the link is read.
    fn inputs(&mut self, woken: Woken, registry: &Registry, now: Instant);
    /// A message from the peer; bytes arrived at `now`.
    fn on_message(&mut self, msg: Message, now: Instant);
    /// Bytes arrived from the peer at `now`.
    fn heard(&mut self, now: Instant);
    /// The side cannot take more from the peer now (its consumer is behind): the loop
    /// leaves the socket unread, so TCP flow control slows the peer down. While it holds,
    /// the peer counts as heard: silence that this side causes is not the peer's.
    fn hold_reads(&self) -> bool {
        false
    }
    /// The connection failed (after the messages that came before the failure).
    fn link_failed(&mut self, e: ChannelError, registry: &Registry, now: Instant);
    /// The rest of the turn: timers, work that waits for room in the socket. Returns true
    /// when the loop must stop now (without [`Side::finish`]).
    fn after(&mut self, registry: &Registry, now: Instant) -> bool;
    /// Answers a control request.
    fn control(&mut self, request: Request, registry: &Registry, now: Instant) -> String;
    /// The role's status now and the durations its core measured since the last call (for
    /// the metrics and the event log).
    fn snapshot(&mut self, now: Instant) -> (Status, Timings);
    /// The loop is done: [`Side::finish`] and stop.
    fn done(&self) -> bool;
    /// The last thing the loop does when [`Side::done`].
    fn finish(&mut self, event_loop: &mut EventLoop);
}

/// The poll, its events, and the control socket.
pub struct EventLoop {
    poll: Poll,
    events: Events,
    control: Option<ControlServer>,
    telemetry: Option<Arc<Telemetry>>,
}

impl EventLoop {
    /// A loop with a waker for other threads and the control socket of `options`.
    pub fn new(options: &ChannelOptions) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let control = link::register_control(options.control.as_ref(), &poll, CONTROL)?
            .map(|l: TcpListener| ControlServer::new(l, options.security.clone(), waker.clone()));
        Ok((
            Self {
                poll,
                events: Events::with_capacity(64),
                control,
                telemetry: options.telemetry.clone(),
            },
            waker,
        ))
    }

    /// Where sockets are registered.
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// The poll itself (to drain a link before closing it).
    pub fn poll_mut(&mut self) -> &mut Poll {
        &mut self.poll
    }

    /// Waits at most `timeout` (None: until something happens) for something to happen.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Woken> {
        match self.poll.poll(&mut self.events, timeout) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
        let mut woken = Woken::default();
        for event in self.events.iter() {
            woken.control |= event.token() == CONTROL;
            woken.accept |= event.token() == ACCEPT;
        }
        Ok(woken)
    }

    /// Runs `side` until it is done or asks to stop.
    pub fn run(&mut self, side: &mut impl Side) {
        let mut inbox = Vec::new();
        loop {
            let holding = side.hold_reads();
            let timeout = match side.link() {
                Some(link) if link.unread() && !holding => Some(Duration::ZERO),
                _ => side.timeout(Instant::now()),
            };
            let woken = match self.wait(timeout) {
                Ok(w) => w,
                Err(e) => {
                    side.link_failed(
                        ChannelError::Io {
                            peer: "the event loop".into(),
                            source: e,
                        },
                        self.poll.registry(),
                        Instant::now(),
                    );
                    Woken::default()
                }
            };
            side.inputs(woken, self.poll.registry(), Instant::now());
            let hold = side.hold_reads();
            if let Some(link) = side.link() {
                let before = link.bytes_received;
                let result = match hold {
                    true => link.flush(),
                    false => link.flush().and_then(|()| link.receive(&mut inbox)),
                };
                let heard = hold || link.bytes_received != before;
                let now = Instant::now();
                if heard {
                    side.heard(now);
                }
                for msg in inbox.drain(..) {
                    side.on_message(msg, now);
                }
                if let Err(e) = result {
                    side.link_failed(e, self.poll.registry(), now);
                }
            }
            if side.after(self.poll.registry(), Instant::now()) {
                self.observe(side);
                return;
            }
            if let Some(control) = &self.control {
                if woken.control {
                    control.accept();
                }
                for call in control.calls() {
                    let answer = side.control(call.request, self.poll.registry(), Instant::now());
                    call.answer(answer);
                }
            }
            self.observe(side);
            if side.done() {
                side.finish(self);
                self.observe(side);
                return;
            }
        }
    }

    /// Hands the role's status to the metrics and the event log, if there are any.
    fn observe(&self, side: &mut impl Side) {
        if let Some(t) = &self.telemetry {
            let (status, timings) = side.snapshot(Instant::now());
            t.observe(&status, timings);
        }
    }
}
