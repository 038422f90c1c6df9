//! What operators get besides stderr: `--metrics ADDR` and `--events FILE` on every pair
//! process and the witness, and `ftvm status --json` (docs/OPERATIONS.md).

use std::path::PathBuf;
use std::sync::Arc;

use ftvm_replication::telemetry::witness::WitnessMetrics;
use ftvm_replication::telemetry::Telemetry;

/// `--metrics`, `--events`.
#[derive(clap::Args, Default)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port): role, protection, lag,
    /// repairs, syncs, failovers, arbiter reachability (docs/OPERATIONS.md lists them).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Append a structured event log to FILE: one JSON object per line with a timestamp
    /// (role changes, protection lost and regained, divergences, repairs, syncs, failover,
    /// fencing, switchover).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
}

/// `ftvm status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The control address of a primary or standby (its `--control`).
    pub addr: String,
    /// Print one JSON object (the same fields as the text form, numbers as numbers,
    /// `protected` and `arbiter_reachable` as booleans).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub security: crate::security::SecurityArgs,
}

/// A failure to start the metrics endpoint or the event log.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the event log {path}: {source}")]
    Events {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The telemetry of a pair process, if it asked for any.
pub fn start(args: &TelemetryArgs) -> Result<Option<Arc<Telemetry>>, TelemetryError> {
    if args.metrics.is_none() && args.events.is_none() {
        return Ok(None);
    }
    let telemetry =
        Telemetry::new(args.events.as_deref()).map_err(|source| TelemetryError::Events {
            path: args.events.clone().unwrap_or_default(),
            source,
        })?;
    if let Some(addr) = &args.metrics {
        let err = |source| TelemetryError::Metrics {
            addr: addr.clone(),
            source,
        };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        telemetry.serve(listener).map_err(err)?;
        tracing::info!(addr, "serving metrics at /metrics");
    }
    Ok(Some(telemetry))
}

/// The witness's metrics (`ftvm witness --metrics ADDR`), if it asked for them.
pub fn start_witness(addr: Option<&str>) -> Result<Option<Arc<WitnessMetrics>>, TelemetryError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let err = |source| TelemetryError::Metrics {
        addr: addr.to_string(),
        source,
    };
    let metrics = Arc::new(WitnessMetrics::new());
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    let m = metrics.clone();
    ftvm_replication::telemetry::http::spawn(listener, move || m.render()).map_err(err)?;
    tracing::info!(addr, "serving witness metrics at /metrics");
    Ok(Some(metrics))
}

/// `ftvm status ADDR [--json]`: the report as the control socket gives it, or as JSON.
pub fn status(
    args: &StatusArgs,
    security: &ftvm_replication::link::Security,
) -> Result<String, ftvm_replication::status::QueryError> {
    let text = ftvm_replication::status::query(&args.addr, security)?;
    if args.json {
        return Ok(format!("{}\n", ftvm_replication::status::to_json(&text)));
    }
    Ok(text)
}
