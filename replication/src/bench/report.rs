//! What `ftvm bench` measured, as a table (with a histogram) or as JSON.

use std::time::Duration;

/// Latency percentiles of one series, in microseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    /// Samples taken.
    pub samples: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Counts per power-of-two bucket of microseconds (`[lo, 2 lo)`), for the histogram.
    #[serde(skip)]
    pub histogram: Vec<(f64, usize)>,
}

impl Latency {
    pub(super) fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| -> f64 {
            if n == 0 {
                return 0.0;
            }
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[i].as_secs_f64() * 1e6
        };
        let mut histogram: Vec<(f64, usize)> = Vec::new();
        for s in &samples {
            let us = s.as_secs_f64() * 1e6;
            let lo = if us < 1.0 {
                0.0
            } else {
                2f64.powi(us.log2().floor() as i32)
            };
            match histogram.last_mut() {
                Some((l, c)) if *l == lo => *c += 1,
                _ => histogram.push((lo, 1)),
            }
        }
        Self {
            samples: n,
            p50_us: at(0.5),
            p99_us: at(0.99),
            p999_us: at(0.999),
            histogram,
        }
    }
}

/// Everything `ftvm bench` measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchReport {
    /// The responder.
    pub peer: String,
    /// Raw TCP round trip of a 64-byte message.
    pub raw_rtt: Latency,
    /// Raw TCP throughput, MiB/s.
    pub raw_mib_per_s: f64,
    /// A one-record batch (an epoch end) to its ack.
    pub ack_small: Latency,
    /// A batch of `large_records` records to its ack.
    pub ack_large: Latency,
    /// Records in the large batch.
    pub large_records: usize,
    /// Log throughput over the channel (large batches, each acked), MiB/s of frames.
    pub log_mib_per_s: f64,
    /// The same over the encrypted channel, one entry per cipher (none without a key).
    pub encrypted: Vec<Sealed>,
}

/// The channel's figures when it is encrypted with one cipher.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sealed {
    /// The cipher (`ChaChaPoly`, `AES-GCM`).
    pub cipher: String,
    /// A one-record batch to its ack.
    pub ack_small: Latency,
    /// A large batch to its ack.
    pub ack_large: Latency,
    /// Log throughput, MiB/s of frames.
    pub log_mib_per_s: f64,
}

impl BenchReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = self.raw_rtt.p50_us.max(1e-9);
        writeln!(f, "ftvm bench: logging channel to {}", self.peer)?;
        writeln!(
            f,
            "{:<34} {:>10} {:>10} {:>10} {:>9}",
            "", "p50 µs", "p99 µs", "p99.9 µs", "p50 / raw"
        )?;
        for (name, l) in [
            ("raw TCP round trip (64 B)", &self.raw_rtt),
            ("channel ack, 1-record batch", &self.ack_small),
            (
                &*format!("channel ack, {}-record batch", self.large_records),
                &self.ack_large,
            ),
        ] {
            writeln!(
                f,
                "{name:<34} {:>10.1} {:>10.1} {:>10.1} {:>8.2}x",
                l.p50_us,
                l.p99_us,
                l.p999_us,
                l.p50_us / base
            )?;
        }
        for e in &self.encrypted {
            for (name, l) in [
                (format!("{}: ack, 1-record batch", e.cipher), &e.ack_small),
                (
                    format!("{}: ack, {}-record", e.cipher, self.large_records),
                    &e.ack_large,
                ),
            ] {
                writeln!(
                    f,
                    "{name:<34} {:>10.1} {:>10.1} {:>10.1} {:>8.2}x",
                    l.p50_us,
                    l.p99_us,
                    l.p999_us,
                    l.p50_us / base
                )?;
            }
        }
        let raw = self.raw_mib_per_s.max(1e-9);
        writeln!(
            f,
            "{:<34} {:>10.0} MiB/s   (raw TCP {:.0} MiB/s, {:.2}x)",
            "log throughput",
            self.log_mib_per_s,
            self.raw_mib_per_s,
            self.log_mib_per_s / raw
        )?;
        for e in &self.encrypted {
            writeln!(
                f,
                "{:<34} {:>10.0} MiB/s   ({:.2}x raw, {:.2}x unencrypted)",
                format!("log throughput, {}", e.cipher),
                e.log_mib_per_s,
                e.log_mib_per_s / raw,
                e.log_mib_per_s / self.log_mib_per_s.max(1e-9)
            )?;
        }
        if self.encrypted.is_empty() {
            writeln!(f, "(no --key: the encrypted channel was not measured)")?;
        }
        writeln!(f, "channel ack latency, 1-record batch (µs):")?;
        let most = self
            .ack_small
            .histogram
            .iter()
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(1);
        for (lo, count) in &self.ack_small.histogram {
            let bar = "#".repeat((count * 50).div_ceil(most.max(1)));
            writeln!(f, "  {:>8.0} .. {:<8.0} {:>7} {bar}", lo, lo * 2.0, count)?;
        }
        Ok(())
    }
}
