//! `--max-standby-backlog-mib`, `--max-lag-epochs`, `--max-slowed-ms`: what a slow standby may
//! make the primary hold (DESIGN.md §6, bounds).

use std::time::Duration;

use ftvm_replication::primary::backpressure::Bounds;

/// The back-pressure bounds of a primary (also of a standby that becomes one).
#[derive(clap::Args, Clone)]
pub struct BoundsArgs {
    /// Bytes waiting in the socket for the standby plus guest output held for its acks, in
    /// MiB: past this the guest is slowed to the standby's pace.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_standby_backlog_mib: u64,
    /// Epochs shipped but not yet verified by the standby: past this the guest is slowed.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_lag_epochs: u64,
    /// A guest slowed this long (ms) without the standby catching up drops the standby and
    /// runs on unprotected.
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_slowed_ms: u64,
}

impl BoundsArgs {
    /// The bounds.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            backlog_bytes: self.max_standby_backlog_mib << 20,
            lag_epochs: self.max_lag_epochs,
            slowed_for: Duration::from_millis(self.max_slowed_ms),
        }
    }
}
