//! Logging: structured JSON lines on stdout, filtered by `EVENTRA_LOG` (or `RUST_LOG`).

use tracing_subscriber::{fmt, EnvFilter};

const DEFAULT_FILTER: &str = "info,sqlx=warn,ractor=warn";

/// Installs the global subscriber. `json = false` gives human-readable lines;
/// `to_stderr` keeps stdout for a command's own output (benchmarks, chaos, reindex).
pub fn init(json: bool, to_stderr: bool) {
    let filter = std::env::var("EVENTRA_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let builder = fmt().with_env_filter(filter).with_target(true);
    let builder = builder.with_writer(move || -> Box<dyn std::io::Write> {
        if to_stderr {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        }
    });
    let result = if json {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) of every duration histogram: from a millisecond to a minute.
const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Bucket bounds of the indexer's batch sizes.
const BATCH_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0];
/// How often histogram samples are folded into their buckets. The recorder keeps raw
/// samples until then: without upkeep they pile up for as long as nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide Prometheus recorder (installed on first use; every app instance in
/// a process shares it, as they share the process). Histograms are Prometheus
/// histograms with fixed buckets, folded every [`UPKEEP_EVERY`] by a thread of its own.
pub fn metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(DURATION_BUCKETS).and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("eventra_indexer_batch_changes".into()),
                    BATCH_BUCKETS,
                )
            });
            let installed =
                builder.map_err(|e| e.to_string()).and_then(|b| b.install_recorder().map_err(|e| e.to_string()));
            match installed {
                Ok(h) => {
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    });
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}
