//! The witness's metrics (`ftvm witness --metrics ADDR`): requests by outcome and the VMs
//! it keeps terms for.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The label of `ftvm_witness_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    outcome: &'static str,
}

/// What the witness counts.
pub struct WitnessMetrics {
    registry: Registry,
    requests: Family<Outcome, Counter>,
    vms: Gauge,
    highest_term: Gauge,
}

impl WitnessMetrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ftvm_witness");
        let requests = Family::<Outcome, Counter>::default();
        let (vms, highest_term) = (Gauge::default(), Gauge::default());
        registry.register(
            "requests",
            "requests answered: a claim granted, a claim refused, a query, or an error",
            requests.clone(),
        );
        registry.register("vms", "protected VMs with a term here", vms.clone());
        registry.register(
            "highest_term",
            "the highest term of any VM",
            highest_term.clone(),
        );
        for outcome in ["granted", "refused", "query", "error"] {
            requests.get_or_create(&Outcome { outcome }).inc_by(0);
        }
        Self {
            registry,
            requests,
            vms,
            highest_term,
        }
    }

    /// One answer (`outcome`: granted, refused, query or error) and the state after it.
    pub fn answered(&self, outcome: &'static str, vms: usize, highest_term: u64) {
        self.requests.get_or_create(&Outcome { outcome }).inc();
        self.vms.set(i64::try_from(vms).unwrap_or(i64::MAX));
        self.highest_term
            .set(i64::try_from(highest_term).unwrap_or(i64::MAX));
    }

    /// The exposition (OpenMetrics text).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        text
    }
}

impl Default for WitnessMetrics {
    fn default() -> Self {
        Self::new()
    }
}
