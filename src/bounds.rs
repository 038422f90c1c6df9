//! `--max-standby-backlog-mib`, `--max-lag-ms`, `--max-slowed-ms` (and the deprecated
//! `--max-lag-epochs`): what a slow standby may make the primary hold (DESIGN.md §6, bounds).

use std::time::Duration;

use ftvm_replication::primary::backpressure::{Bounds, DEFAULT_MAX_LAG_MS};

/// The back-pressure bounds of a primary (also of a standby that becomes one).
#[derive(clap::Args, Clone)]
pub struct BoundsArgs {
    /// Bytes waiting in the socket for the standby plus guest output held for its acks, in
    /// MiB: past this the guest is slowed to the standby's pace.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_standby_backlog_mib: u64,
    /// Age (ms) of the oldest epoch shipped and not yet verified by the standby: past this
    /// the guest is slowed. It bounds how much guest time a failover replays; a repair the
    /// standby installs verifies every epoch it covers.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_MAX_LAG_MS, value_parser = clap::value_parser!(u64).range(1..))]
    max_lag_ms: u64,
    /// Deprecated: use --max-lag-ms. Epochs shipped but not yet verified: past this the
    /// guest is slowed too (no such bound unless given).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_lag_epochs: Option<u64>,
    /// A guest slowed this long (ms) without the standby catching up drops the standby and
    /// runs on unprotected.
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_slowed_ms: u64,
}

impl BoundsArgs {
    /// The bounds; says so once if the deprecated `--max-lag-epochs` is given.
    pub fn bounds(&self) -> Bounds {
        if let Some(n) = self.max_lag_epochs {
            tracing::warn!(
                "--max-lag-epochs {n} is deprecated: the standby's lag is bounded by the age of \
                 the oldest unverified epoch (--max-lag-ms, {} ms now); the epoch count is \
                 still applied as an extra bound",
                self.max_lag_ms
            );
        }
        Bounds {
            backlog_bytes: self.max_standby_backlog_mib << 20,
            lag: Duration::from_millis(self.max_lag_ms),
            lag_epochs: self.max_lag_epochs,
            slowed_for: Duration::from_millis(self.max_slowed_ms),
        }
    }
}
