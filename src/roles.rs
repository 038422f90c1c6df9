//! A pair process's roles: what it keeps across role changes (a switchover swaps primary and
//! standby on the same connection, a standby that takes over becomes the primary) and the
//! loop that plays one role after the other until the guest ends.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use ftvm_primary::{pair, EpochPolicy};
use ftvm_replication::{ChannelOptions, Position};
use ftvm_secondary::standby::StandbyEnd;
use ftvm_vmm::live::NetRx;
use ftvm_vmm::output_stream::Demux;
use ftvm_vmm::Vm;

use crate::{stop_status, CliError};

/// What a pair process keeps across role changes (`ftvm switchover` swaps primary and
/// standby on the same connection; each process may change roles several times).
pub(crate) struct Roles {
    pub(crate) header: ftvm_proto::log::LogHeader,
    pub(crate) kernel: Vec<u8>,
    pub(crate) initrd: Option<Vec<u8>>,
    pub(crate) options: ChannelOptions,
    pub(crate) input: Option<crossbeam_channel::Receiver<Vec<u8>>>,
    pub(crate) accept: Option<TcpListener>,
    /// The recorder's latency bound whenever this process is the primary.
    pub(crate) latency_bound: Duration,
    /// The recorder's longest epoch whenever this process is the primary.
    pub(crate) max_epoch: Duration,
    /// The guest's network card's host side (`--net`): the TAP, and the frames its reader
    /// thread receives.
    pub(crate) net: Option<(ftvm_vmm::tap::Tap, NetRx)>,
}

/// The role a pair process plays now.
pub(crate) enum Role {
    /// Recording from `at`, shipping to `link`.
    Primary {
        vm: Vm,
        link: Result<ftvm_replication::Link, String>,
        at: pair::StartAt,
    },
    /// Following the primary on `link` from `at` (the end of the last epoch both verified).
    Standby {
        vm: Vm,
        link: ftvm_replication::Link,
        at: Position,
    },
}

impl Roles {
    /// Where released guest output goes: stdout, and for a VM with a network card the
    /// frames to the TAP (the output is then the two-kind stream).
    pub(crate) fn out(&self) -> Result<Box<dyn std::io::Write + Send>, CliError> {
        Ok(match &self.net {
            None => Box::new(std::io::stdout()),
            Some((tap, _)) => Box::new(Demux::new(
                std::io::stdout(),
                tap.try_clone()
                    .map_err(|e| CliError::Usage(format!("TAP {}: {e}", tap.name())))?,
            )),
        })
    }

    pub(crate) fn net_rx(&self) -> Option<NetRx> {
        self.net.as_ref().map(|(_, rx)| rx.clone())
    }

    /// Plays `role`, then whatever role a switchover gives this process, until the guest
    /// ends. Returns the guest's exit status.
    pub(crate) fn run(mut self, mut role: Role) -> Result<u8, CliError> {
        loop {
            role = match role {
                Role::Primary { mut vm, link, at } => {
                    let policy = EpochPolicy {
                        interrupt_windows: self.header.interrupt_windows,
                        latency_bound: self.latency_bound,
                        max_epoch: self.max_epoch,
                        stream_interval: ftvm_primary::pair_stream_interval(self.latency_bound),
                        ..EpochPolicy::default()
                    };
                    let options = self.options.try_clone().map_err(CliError::Control)?;
                    let end = pair::run_primary(
                        &mut vm,
                        policy,
                        link,
                        options,
                        pair::start_message(
                            self.header.clone(),
                            &self.kernel,
                            self.initrd.as_deref(),
                            true,
                        ),
                        self.accept.take(),
                        at,
                        self.input.clone(),
                        self.net_rx(),
                        self.out()?,
                    )
                    .map_err(|source| match source {
                        ftvm_primary::RecordError::Vm(e) => CliError::Vm(e),
                        ftvm_primary::RecordError::Live(e) => CliError::Live(e),
                        source => CliError::Record {
                            path: PathBuf::from("the pair channel"),
                            source,
                        },
                    })?;
                    match end {
                        pair::PrimaryEnd::Stopped(stop, report) => {
                            tracing::info!(
                                epochs = report.epochs,
                                verified = report.verified_epoch,
                                repairs = report.repairs,
                                divergences = report.divergences,
                                checkpoint_required = report.checkpoint_required,
                                syncs = report.syncs,
                                protected_to_end = report.protected_to_end,
                                "protected run complete"
                            );
                            return Ok(stop_status(stop));
                        }
                        pair::PrimaryEnd::HandedOver(h, _) => Role::Standby {
                            vm,
                            link: h.link,
                            at: h.at,
                        },
                    }
                }
                Role::Standby { vm, link, at } => {
                    let options = self.options.try_clone().map_err(CliError::Control)?;
                    let end = ftvm_secondary::standby::follow(
                        vm,
                        self.header.clone(),
                        self.kernel.clone(),
                        self.initrd.clone(),
                        link,
                        options,
                        at,
                        self.input.clone(),
                        self.net_rx(),
                        self.out()?,
                    )?;
                    match self.standby_ended(end) {
                        Ok(status) => return Ok(status),
                        Err(role) => *role,
                    }
                }
            };
        }
    }

    /// The guest's status when the standby's run is over, or the primary role it took over.
    pub(crate) fn standby_ended(&mut self, end: StandbyEnd) -> Result<u8, Box<Role>> {
        match end {
            StandbyEnd::Completed(stop) | StandbyEnd::WentLive(stop) => Ok(stop_status(stop)),
            StandbyEnd::TookOver(t) => {
                let t = *t;
                self.header = t.header;
                self.kernel = t.kernel;
                self.initrd = t.initrd;
                let at = pair::StartAt {
                    after: t.at,
                    clock_ns: t.clock_ns,
                };
                Err(Box::new(Role::Primary {
                    vm: t.vm,
                    link: t.link,
                    at,
                }))
            }
        }
    }
}

/// The host side of a pair process's network card: the TAP and a reader thread on it.
pub(crate) fn attach_net(
    tap: Option<ftvm_vmm::tap::Tap>,
    mac: Option<ftvm_vmm::devices::virtio::net::MacAddr>,
) -> Result<Option<(ftvm_vmm::tap::Tap, NetRx)>, CliError> {
    let (Some(tap), Some(mac)) = (tap, mac) else {
        return Ok(None);
    };
    let rx = tap.spawn_reader().map_err(|e| {
        CliError::Usage(format!(
            "TAP {}: cannot start its reader thread: {e}",
            tap.name()
        ))
    })?;
    Ok(Some((tap, NetRx { mac, rx })))
}
