//! The standby of a protected pair (`ftvm standby`): accept a primary, build the VM it
//! describes, replay its log in lockstep as it streams in, answer each epoch, and when the
//! primary is gone, replay everything received and **go live** (DESIGN.md §5).

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use ftvm_proto::channel::{message::Body, Ack, Diverged, Message, Role};
use ftvm_proto::log::RecordBatch;
use ftvm_replication::link::{self, body_name};
use ftvm_replication::standby::{FromReplayer, StandbyChannel, ToReplayer};
use ftvm_replication::ChannelOptions;
use ftvm_replication::{ChannelError, Link};
use ftvm_vmm::devices::StopRequest;
use ftvm_vmm::live::LiveHook;
use ftvm_vmm::{RunEnd, Vm};

use crate::{config_from_header, replay, LogError, LogSource, ReplayError, Replayer};

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
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::Error),
    /// The replay cannot follow the primary (until checkpoints exist, the standby stops).
    #[error("{0}; this standby cannot take over without a checkpoint (not implemented yet), so it stops")]
    Diverged(String),
    /// The log the primary sent is unusable.
    #[error("the primary sent a bad log: {0}")]
    Log(#[source] LogError),
    /// A thread could not be started.
    #[error("cannot start the channel thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The log as it streams in from the channel thread.
pub struct ChannelSource {
    rx: Receiver<ToReplayer>,
    batches: u64,
    lost: Option<String>,
}

impl LogSource for ChannelSource {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError> {
        match self.rx.recv() {
            Ok(ToReplayer::Batch(b)) => {
                self.batches += 1;
                Ok(Some(b))
            }
            Ok(ToReplayer::PrimaryLost(why)) => {
                self.lost = Some(why);
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }

    fn offset(&self) -> u64 {
        self.batches
    }
}

/// The replayed guest's output, kept from the primary's last known release on: after go-live
/// exactly that part is emitted again.
pub struct ReplayedOutput {
    released: Arc<AtomicU64>,
    /// Output sequence number of `pending[0]`.
    base: u64,
    pending: Vec<u8>,
}

impl ReplayedOutput {
    fn trim(&mut self) {
        let released = self.released.load(Ordering::SeqCst);
        if released > self.base {
            let n = (released - self.base).min(self.pending.len() as u64);
            self.pending.drain(..n as usize);
            self.base += n;
        }
    }

    /// Output sequence number of the next byte.
    pub fn produced(&self) -> u64 {
        self.base + self.pending.len() as u64
    }

    /// The output the primary has not reported released: its first sequence number and the
    /// bytes.
    pub fn unreleased(&mut self) -> (u64, Vec<u8>) {
        self.trim();
        (self.base, std::mem::take(&mut self.pending))
    }
}

impl Write for ReplayedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.trim();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How the standby's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyEnd {
    /// The primary ran the guest to its end, verified to the last epoch.
    Completed(StopRequest),
    /// The primary was lost; the standby went live and ran the guest to its end.
    WentLive(StopRequest),
}

/// Accepts one primary on `listener` and protects its guest: lockstep replay, then go-live if
/// the primary is lost. Guest input after go-live comes from `input`; output (after go-live,
/// or output the primary never released) goes to `out`.
pub fn run_standby(
    listener: &TcpListener,
    options: ChannelOptions,
    input: impl FnOnce() -> Option<Receiver<Vec<u8>>>,
    mut out: impl Write,
) -> Result<StandbyEnd, StandbyError> {
    let (stream, addr) = listener.accept().map_err(StandbyError::Accept)?;
    let peer = addr.to_string();
    let mut h = link::handshake(stream, &peer, Role::Standby)?;
    let msg = link::recv_blocking(&mut h.stream, &peer, &mut h.rx_offset)?;
    let Some(Body::Start(start)) = msg.body else {
        return Err(ChannelError::Unexpected {
            peer,
            expected: "Start",
            got: body_name(&msg).into(),
        }
        .into());
    };
    let header = start.header.unwrap_or_default();
    if header.format_version != ftvm_proto::FORMAT_VERSION {
        return Err(StandbyError::Config(LogError::Version {
            offset: 0,
            found: header.format_version,
        }));
    }
    let built = config_from_header(&header, start.kernel, "the kernel the primary sent")
        .map_err(StandbyError::Config)
        .and_then(|config| Ok((Vm::new(&config)?, config)));
    // Tell the primary whether it can start the guest: Ack(0) when the VM is ready.
    let answer = match &built {
        Ok(_) => Body::Ack(Ack::default()),
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
        "primary connected; replaying"
    );

    let channel = StandbyChannel::spawn(Link::new(h)?, options).map_err(StandbyError::Thread)?;
    let source = ChannelSource {
        rx: channel.inbox(),
        batches: 0,
        lost: None,
    };
    let output = ReplayedOutput {
        released: channel.released(),
        base: 0,
        pending: Vec::new(),
    };
    let mut replayer = Replayer::new(source, &header, output);
    let result = replay(&mut vm, &mut replayer, &mut |epoch, exit_seq| {
        channel.tell(FromReplayer::Verified { epoch, exit_seq });
    });
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            let reason = e.to_string();
            channel.tell(FromReplayer::Diverged(Diverged {
                epoch: 0,
                exit_seq: vm.exit_seq().0,
                reason: reason.clone(),
                checkpoint_required: false,
            }));
            channel.shutdown();
            return Err(match e {
                ReplayError::Log(e) => StandbyError::Log(e),
                ReplayError::Vm(e) => StandbyError::Vm(e),
            });
        }
    };
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
    if let Some((epoch, exit_seq, reason, checkpoint_required)) = stop_reason {
        channel.tell(FromReplayer::Diverged(Diverged {
            epoch,
            exit_seq,
            reason: reason.clone(),
            checkpoint_required,
        }));
        channel.shutdown();
        let what = if checkpoint_required {
            "needs a checkpoint"
        } else {
            "diverged"
        };
        return Err(StandbyError::Diverged(format!(
            "epoch {epoch} {what} at exit {exit_seq}: {reason}"
        )));
    }

    if let Some(stop) = report.stop {
        // The guest ended in lockstep. Wait for the primary to release the last output; if
        // it dies first, what it did not release is ours to emit.
        let lost = loop {
            if channel.released().load(Ordering::SeqCst) >= replayer.output_mut().produced() {
                break None;
            }
            match channel.inbox().recv_timeout(Duration::from_millis(20)) {
                Ok(ToReplayer::PrimaryLost(why)) => break Some(why),
                Ok(ToReplayer::Batch(_)) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    break Some("channel closed".into())
                }
            }
        };
        let (seq, bytes) = replayer.output_mut().unreleased();
        if let (Some(why), false) = (lost, bytes.is_empty()) {
            tracing::warn!("{why}: the guest had ended; emitting the {} output bytes from sequence {seq} the primary did not release", bytes.len());
            write_out(&mut out, &bytes);
            channel.shutdown();
            return Ok(StandbyEnd::WentLive(stop));
        }
        channel.shutdown();
        return Ok(StandbyEnd::Completed(stop));
    }

    // The log ended: the primary is gone. Everything received has been replayed; go live.
    let seq = report.log_ended.unwrap_or(vm.exit_seq().0);
    let why = replayer
        .source
        .lost
        .clone()
        .unwrap_or_else(|| "the log ended".into());
    let (from, bytes) = replayer.output_mut().unreleased();
    tracing::warn!(
        "{why}: going live at exit {seq} after verified epoch {}; re-emitting output from sequence {from} ({} bytes)",
        replayer.epoch.saturating_sub(1),
        bytes.len()
    );
    channel.tell(FromReplayer::Live);
    write_out(&mut out, &bytes);
    let mut live = LiveHook::resume(input(), out, vm.clock_ns());
    let stop = loop {
        match vm.run(&mut live)? {
            RunEnd::Stopped(stop) => break stop,
            RunEnd::Paused(_) => {}
        }
    };
    channel.shutdown();
    Ok(StandbyEnd::WentLive(stop))
}

fn write_out(out: &mut impl Write, bytes: &[u8]) {
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        tracing::warn!("cannot write guest output: {e}");
    }
}
