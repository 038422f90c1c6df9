//! The live exit hook: inputs come straight from the host (monotonic clock, serial input from a
//! byte stream, frames from the network card's TAP) and output goes straight out. `ftvm run` without a peer uses it; the recorder
//! wraps it to log what it decides.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, TryRecvError};

use crate::devices::virtio::net::MacAddr;
use crate::exit::{ExitHook, ExitSeq, HostView, Kick, Point};
use crate::machine::Input;
use crate::output_stream::{encode, KIND_FRAME, KIND_SERIAL};
use crate::tap::Tap;

/// Why a live run cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Nothing can ever wake the halted guest: no timer is armed and serial input is closed.
    #[error(
        "the guest is halted waiting for input, but serial input is closed and no timer is armed"
    )]
    IdleForever,
    /// The guest's output could not be written.
    #[error(transparent)]
    Output(#[from] std::io::Error),
}

/// The host side of a live VM.
pub struct LiveHook<W: Write> {
    start: Instant,
    input: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<u8>,
    out: W,
    /// Rings when the VMM has a request for the vCPU thread: a halted wait ends at once.
    doorbell: Option<Receiver<()>>,
    /// The network card's host side, if the VM has a card.
    net: Option<LiveNet>,
}

/// The host side of a protected VM's network card: its MAC address and the frames the TAP's
/// reader thread ([`Tap::spawn_reader`]) receives. Its output is the two-kind stream
/// ([`crate::output_stream`]): frames leave with serial bytes, under the output rule.
#[derive(Clone)]
pub struct NetRx {
    /// The guest's card.
    pub mac: MacAddr,
    /// Received frames.
    pub rx: Receiver<Vec<u8>>,
}

/// The TAP behind the network card: frames its reader thread received, waiting for receive
/// buffers, and the TAP to send transmitted frames to (None: output is the two-kind stream,
/// frames go to `out` as records).
struct LiveNet {
    tap: Option<Tap>,
    rx: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<Vec<u8>>,
    /// Transmitted frames the TAP refused (logged at powers of two).
    send_errors: u64,
}

impl LiveNet {
    fn drain(&mut self) {
        let Some(rx) = &self.rx else { return };
        loop {
            match rx.try_recv() {
                Ok(frame) => self.pending.push_back(frame),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.rx = None;
                    return;
                }
            }
        }
    }
}

/// Reads `source` on a thread and delivers what it reads as chunks; the channel closes at EOF.
pub fn spawn_reader<R: Read + Send + 'static>(mut source: R) -> Receiver<Vec<u8>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let spawned = std::thread::Builder::new()
        .name("ftvm-serial-in".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match source.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("serial input closed: {e}");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the serial input thread, input disabled: {e}");
    }
    rx
}

impl<W: Write> LiveHook<W> {
    /// A live hook whose clock starts now, reading serial input from `input` (None: no input)
    /// and writing guest output to `out`.
    pub fn new(input: Option<Receiver<Vec<u8>>>, out: W) -> Self {
        Self {
            start: Instant::now(),
            input,
            pending: VecDeque::new(),
            out,
            doorbell: None,
            net: None,
        }
    }

    /// Connects the network card to `tap`: received frames are offered to the guest at exits
    /// while it has receive buffers, transmitted frames are sent out of the TAP.
    pub fn with_net(mut self, tap: Tap) -> std::io::Result<Self> {
        let rx = tap.spawn_reader()?;
        self.net = Some(LiveNet {
            tap: Some(tap),
            rx: Some(rx),
            pending: VecDeque::new(),
            send_errors: 0,
        });
        Ok(self)
    }

    /// Connects the network card to frames received on `net` and makes the output the
    /// two-kind stream: serial bytes and transmitted frames both go to `out` as records (a
    /// protected VM, whose output is held until verified).
    pub fn with_muxed_net(mut self, net: NetRx) -> Self {
        self.net = Some(LiveNet {
            tap: None,
            rx: Some(net.rx),
            pending: VecDeque::new(),
            send_errors: 0,
        });
        self
    }

    fn muxed(&self) -> bool {
        self.net.as_ref().is_some_and(|n| n.tap.is_none())
    }

    /// Ends a halted wait as soon as `doorbell` rings (the vCPU control channel).
    pub fn with_doorbell(mut self, doorbell: Receiver<()>) -> Self {
        self.doorbell = Some(doorbell);
        self
    }

    /// A live hook for a VM whose virtual clock already reads `clock_ns` (a standby going
    /// live): virtual time continues from there at host speed.
    pub fn resume(input: Option<Receiver<Vec<u8>>>, out: W, clock_ns: u64) -> Self {
        let now = Instant::now();
        Self {
            start: now
                .checked_sub(Duration::from_nanos(clock_ns))
                .unwrap_or(now),
            ..Self::new(input, out)
        }
    }

    /// Virtual time now: host monotonic time since the VM started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn drain_input(&mut self) {
        let Some(rx) = &self.input else { return };
        loop {
            match rx.try_recv() {
                Ok(chunk) => self.pending.extend(chunk),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.input = None;
                    return;
                }
            }
        }
    }

    /// Blocks until serial input arrives, a frame arrives for a guest with receive buffers
    /// (`net_ready`), the doorbell rings, or virtual time reaches `deadline_ns`.
    fn wait(&mut self, deadline_ns: Option<u64>, net_ready: bool) -> Result<(), LiveError> {
        let now = self.now_ns();
        let timeout = deadline_ns.map(|d| Duration::from_nanos(d.saturating_sub(now)));
        if timeout.is_some_and(|t| t.is_zero()) {
            return Ok(());
        }
        let net_rx = self
            .net
            .as_ref()
            .and_then(|n| n.rx.clone())
            .filter(|_| net_ready);
        let net_open = self.net.as_ref().is_some_and(|n| n.rx.is_some());
        if self.input.is_none() && timeout.is_none() && !net_open {
            // The doorbell alone cannot wake the guest.
            return Err(LiveError::IdleForever);
        }
        let mut select = Select::new();
        let input = self.input.as_ref().map(|rx| select.recv(rx));
        let doorbell = self.doorbell.as_ref().map(|rx| select.recv(rx));
        let net = net_rx.as_ref().map(|rx| select.recv(rx));
        if input.is_none() && doorbell.is_none() && net.is_none() {
            if let Some(t) = timeout {
                std::thread::sleep(t);
            }
            return Ok(());
        }
        let ready = match timeout {
            Some(t) => match select.select_timeout(t) {
                Ok(op) => op,
                Err(_) => return Ok(()),
            },
            None => select.select(),
        };
        let index = Some(ready.index());
        if index == input {
            if let Some(rx) = &self.input {
                match ready.recv(rx) {
                    Ok(chunk) => self.pending.extend(chunk),
                    Err(_) => self.input = None,
                }
            }
        } else if index == net {
            if let (Some(n), Some(rx)) = (&mut self.net, &net_rx) {
                match ready.recv(rx) {
                    Ok(frame) => n.pending.push_back(frame),
                    Err(_) => n.rx = None,
                }
            }
        } else if index == doorbell {
            if let Some(rx) = &self.doorbell {
                // Rung: return, so the loop asks the hook at once. Closed: nobody will ring.
                if ready.recv(rx).is_err() {
                    self.doorbell = None;
                }
            }
        }
        Ok(())
    }
}

impl<W: Write> ExitHook for LiveHook<W> {
    type Error = LiveError;

    fn poll_inputs(
        &mut self,
        _at: Point,
        view: &HostView,
        inputs: &mut Vec<Input>,
    ) -> Result<(), LiveError> {
        self.drain_input();
        if let Some(n) = &mut self.net {
            n.drain();
        }
        let net_waiting = self.net.as_ref().is_some_and(|n| !n.pending.is_empty());
        let can_receive = (!self.pending.is_empty() && view.rx_capacity > 0)
            || (net_waiting && view.net_rx_ready);
        if view.halted && !can_receive {
            self.wait(view.timer_deadline_ns, view.net_rx_ready)?;
        }
        let now = self.now_ns();
        let timer_due = view.timer_deadline_ns.is_some_and(|d| now >= d);
        if (view.wants_clock || timer_due || view.halted) && now > view.now_ns {
            inputs.push(Input::Clock(now));
        }
        if !self.pending.is_empty() && view.rx_capacity > 0 {
            let n = view.rx_capacity.min(self.pending.len());
            inputs.push(Input::SerialRx(self.pending.drain(..n).collect()));
        }
        if view.net_rx_ready {
            // One frame per poll: the card said it has a buffer, not how many.
            if let Some(frame) = self.net.as_mut().and_then(|n| n.pending.pop_front()) {
                inputs.push(Input::NetRx(frame));
            }
        }
        Ok(())
    }

    fn on_net_output(&mut self, _seq: ExitSeq, frames: &[Vec<u8>]) -> Result<(), LiveError> {
        let Some(n) = &mut self.net else {
            return Ok(());
        };
        let Some(tap) = &mut n.tap else {
            let mut records = Vec::new();
            for frame in frames {
                encode(KIND_FRAME, frame, &mut records);
            }
            self.out.write_all(&records)?;
            self.out.flush()?;
            return Ok(());
        };
        for frame in frames {
            // A network drops frames; a TAP that refuses one (its link down, no buffer
            // space) is no reason to stop the guest.
            if let Err(e) = tap.send(frame) {
                n.send_errors += 1;
                if n.send_errors.is_power_of_two() {
                    tracing::warn!(tap = tap.name(), error = %e, errors = n.send_errors, "transmitted frame dropped");
                }
            }
        }
        Ok(())
    }

    fn on_output(&mut self, _seq: ExitSeq, bytes: &[u8]) -> Result<(), LiveError> {
        if self.muxed() {
            let mut record = Vec::with_capacity(bytes.len() + 5);
            encode(KIND_SERIAL, bytes, &mut record);
            self.out.write_all(&record)?;
        } else {
            self.out.write_all(bytes)?;
        }
        self.out.flush()?;
        Ok(())
    }

    fn kick_at(&self, deadline_ns: u64) -> Option<Kick> {
        Some(Kick {
            at: self.start + Duration::from_nanos(deadline_ns),
            // Live runs need no determinism: kick as soon as the deadline passes.
            after_guest_time: Duration::ZERO,
        })
    }
}
