//! A short memory of `/metrics`, for the dashboard: rates and percentiles need two
//! points in time, and Prometheus (which would keep them) is not always there.
//!
//! The `metrics-sampler` actor calls [`MetricsHistory::sample`] every
//! [`SAMPLE_EVERY`]: it renders this process's Prometheus exposition, keeps the series
//! the dashboard reads (job outcomes and run times per kind, events consumed and their
//! commit → consumed latency per type, the pipeline's gauges) for [`WINDOW`], and folds
//! processed/failed jobs into per-minute totals kept for [`HISTORY`]. Everything derived
//! here is therefore also in `/metrics`: the dashboard shows nothing Prometheus cannot.
//!
//! The figures are this process's (like its `/metrics`); the history lives in memory
//! and starts again with the process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How far back samples are kept: the longest window a percentile can be asked for.
pub const WINDOW: Duration = Duration::from_secs(30 * 60);
/// How far back per-minute processed/failed totals are kept.
pub const HISTORY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The series kept from each exposition (by name prefix).
const KEPT: &[&str] = &[
    "eventra_jobs_succeeded_total",
    "eventra_jobs_failed_total",
    "eventra_job_duration_seconds_bucket",
    "eventra_events_consumed_total",
    "eventra_event_latency_seconds_bucket",
    "eventra_events_published_total",
    "eventra_events_parked_total",
    "eventra_relay_lag_seconds",
    "eventra_effect_lag_seconds",
];

/// One series: metric name and its labels (sorted), as in the exposition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
}

impl Series {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

struct Sample {
    at: DateTime<Utc>,
    values: HashMap<Series, f64>,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<Sample>,
    /// Per minute (unix minute): jobs processed (succeeded) and failed.
    minutes: VecDeque<(i64, f64, f64)>,
}

/// The shared history: the sampler writes, the stats endpoint reads.
#[derive(Clone)]
pub struct MetricsHistory {
    handle: PrometheusHandle,
    inner: Arc<Mutex<Inner>>,
}

/// Run-time or latency percentiles over a window, in milliseconds (`None`: no samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Percentiles {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One job kind over a window.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KindStats {
    pub kind: String,
    pub succeeded: u64,
    pub failed: u64,
    #[serde(flatten)]
    pub run_time: Percentiles,
}

/// One event type over a window.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventTypeStats {
    #[serde(rename = "type")]
    pub event_type: String,
    pub consumed: u64,
    pub per_second: f64,
    /// Commit → consumed: relayed, delivered by the bus, and its jobs enqueued.
    #[serde(flatten)]
    pub latency: Percentiles,
}

/// The pipeline now and over a window.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PipelineStats {
    pub relay_lag_seconds: Option<f64>,
    pub effect_lag_seconds: Option<f64>,
    pub published_per_second: f64,
    pub consumed_per_second: f64,
    pub parked_per_second: f64,
}

/// One point of the live chart: jobs per second between two samples.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RatePoint {
    pub at: DateTime<Utc>,
    pub processed_per_second: f64,
    pub failed_per_second: f64,
}

/// One hour of history.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HourTotals {
    pub hour: DateTime<Utc>,
    pub processed: u64,
    pub failed: u64,
}

/// What the dashboard reads, over one window.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Overview {
    pub window_seconds: u64,
    pub sampled_every_seconds: u64,
    /// Jobs failed in this process since it started (every attempt that failed).
    pub failed_total: u64,
    pub kinds: Vec<KindStats>,
    pub events: Vec<EventTypeStats>,
    pub pipeline: PipelineStats,
    pub series: Vec<RatePoint>,
    pub history: Vec<HourTotals>,
}

impl MetricsHistory {
    pub fn new(handle: PrometheusHandle) -> Self {
        MetricsHistory { handle, inner: Arc::new(Mutex::new(Inner::default())) }
    }

    /// Takes one sample now. Returns how many series it kept.
    pub fn sample(&self) -> usize {
        self.handle.run_upkeep();
        let text = self.handle.render();
        self.record(Utc::now(), &text)
    }

    fn record(&self, at: DateTime<Utc>, exposition: &str) -> usize {
        let values = parse(exposition);
        let kept = values.len();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = inner.samples.back() {
            let processed = delta(prev, &values, "eventra_jobs_succeeded_total");
            let failed = delta(prev, &values, "eventra_jobs_failed_total");
            let minute = at.timestamp().div_euclid(60);
            match inner.minutes.back_mut() {
                Some(last) if last.0 == minute => {
                    last.1 += processed;
                    last.2 += failed;
                }
                _ => inner.minutes.push_back((minute, processed, failed)),
            }
            let oldest_minute = minute - (HISTORY.as_secs() / 60) as i64;
            while inner.minutes.front().is_some_and(|m| m.0 < oldest_minute) {
                inner.minutes.pop_front();
            }
        }
        inner.samples.push_back(Sample { at, values });
        let oldest = at - chrono::Duration::from_std(WINDOW + SAMPLE_EVERY).unwrap_or_default();
        while inner.samples.front().is_some_and(|s| s.at < oldest) {
            inner.samples.pop_front();
        }
        kept
    }

    /// The figures over the last `window` (capped at [`WINDOW`]).
    pub fn overview(&self, window: Duration) -> Overview {
        let window = window.min(WINDOW);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let empty = Sample { at: Utc::now(), values: HashMap::new() };
        let last = inner.samples.back().unwrap_or(&empty);
        let since = last.at - chrono::Duration::from_std(window).unwrap_or_default();
        let first = inner.samples.iter().find(|s| s.at >= since).unwrap_or(last);
        let secs = (last.at - first.at).num_milliseconds() as f64 / 1000.0;
        let per_second = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };

        let by = |name: &str, label: &str| grouped_delta(first, last, name, label);
        let succeeded = by("eventra_jobs_succeeded_total", "kind");
        let failed = by("eventra_jobs_failed_total", "kind");
        let run_times = grouped_percentiles(first, last, "eventra_job_duration_seconds_bucket", "kind");
        let mut kind_names: Vec<&String> = succeeded.keys().chain(failed.keys()).chain(run_times.keys()).collect();
        kind_names.sort();
        kind_names.dedup();
        let kinds = kind_names
            .into_iter()
            .map(|k| KindStats {
                kind: k.clone(),
                succeeded: succeeded.get(k).copied().unwrap_or(0.0) as u64,
                failed: failed.get(k).copied().unwrap_or(0.0) as u64,
                run_time: run_times.get(k).copied().unwrap_or_default(),
            })
            .collect();

        let consumed = by("eventra_events_consumed_total", "type");
        let latencies = grouped_percentiles(first, last, "eventra_event_latency_seconds_bucket", "type");
        let events = consumed
            .iter()
            .map(|(t, n)| EventTypeStats {
                event_type: t.clone(),
                consumed: *n as u64,
                per_second: per_second(*n),
                latency: latencies.get(t).copied().unwrap_or_default(),
            })
            .collect();

        let total = |name: &str| by(name, "").values().sum::<f64>() + 0.0;
        let gauge = |name: &str| last.values.iter().find(|(s, _)| s.name == name).map(|(_, v)| *v);
        let pipeline = PipelineStats {
            relay_lag_seconds: gauge("eventra_relay_lag_seconds"),
            effect_lag_seconds: gauge("eventra_effect_lag_seconds"),
            published_per_second: per_second(total("eventra_events_published_total")),
            consumed_per_second: per_second(total("eventra_events_consumed_total")),
            parked_per_second: per_second(total("eventra_events_parked_total")),
        };

        let series = inner
            .samples
            .iter()
            .zip(inner.samples.iter().skip(1))
            .filter(|(a, _)| a.at >= since)
            .map(|(a, b)| {
                let dt = ((b.at - a.at).num_milliseconds() as f64 / 1000.0).max(0.001);
                RatePoint {
                    at: b.at,
                    processed_per_second: delta(a, &b.values, "eventra_jobs_succeeded_total") / dt,
                    failed_per_second: delta(a, &b.values, "eventra_jobs_failed_total") / dt,
                }
            })
            .collect();

        let mut hours: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
        for (minute, p, f) in &inner.minutes {
            let h = hours.entry(minute.div_euclid(60)).or_default();
            h.0 += p;
            h.1 += f;
        }
        let history = hours
            .into_iter()
            .filter_map(|(h, (p, f))| {
                Some(HourTotals { hour: DateTime::from_timestamp(h * 3600, 0)?, processed: p as u64, failed: f as u64 })
            })
            .collect();
        let failed_total =
            last.values.iter().filter(|(s, _)| s.name == "eventra_jobs_failed_total").map(|(_, v)| *v).sum::<f64>()
                + 0.0;

        Overview {
            window_seconds: window.as_secs(),
            sampled_every_seconds: SAMPLE_EVERY.as_secs(),
            failed_total: failed_total as u64,
            kinds,
            events,
            pipeline,
            series,
            history,
        }
    }
}

/// The kept series of a Prometheus text exposition.
fn parse(exposition: &str) -> HashMap<Series, f64> {
    let mut out = HashMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || !KEPT.iter().any(|k| line.starts_with(k)) {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Vec::new()),
        };
        out.insert(Series { name: name.to_owned(), labels }, value);
    }
    out
}

/// `a="x",b="y"` → sorted pairs. Label values here are kinds, types and bucket bounds:
/// no quotes or commas inside.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = s
        .split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect();
    labels.sort();
    labels
}

/// How much the series named `name` grew from `a` to `b`, summed (a reset counts from 0).
fn delta(a: &Sample, b: &HashMap<Series, f64>, name: &str) -> f64 {
    b.iter()
        .filter(|(s, _)| s.name == name)
        .map(|(s, v)| {
            let before = a.values.get(s).copied().unwrap_or(0.0);
            if *v >= before {
                v - before
            } else {
                *v
            }
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// Growth of `name` from `a` to `b`, per value of `label` (`""`: all in one group).
fn grouped_delta(a: &Sample, b: &Sample, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (s, v) in b.values.iter().filter(|(s, _)| s.name == name) {
        let before = a.values.get(s).copied().unwrap_or(0.0);
        let grown = if *v >= before { v - before } else { *v };
        *out.entry(s.label(label).unwrap_or("").to_owned()).or_insert(0.0) += grown;
    }
    out
}

/// Percentiles of a histogram's growth from `a` to `b`, per value of `label`.
fn grouped_percentiles(a: &Sample, b: &Sample, bucket_name: &str, label: &str) -> BTreeMap<String, Percentiles> {
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (s, v) in b.values.iter().filter(|(s, _)| s.name == bucket_name) {
        let le = match s.label("le") {
            Some("+Inf") => f64::INFINITY,
            Some(le) => match le.parse::<f64>() {
                Ok(le) => le,
                Err(_) => continue,
            },
            None => continue,
        };
        let before = a.values.get(s).copied().unwrap_or(0.0);
        let grown = if *v >= before { v - before } else { *v };
        buckets.entry(s.label(label).unwrap_or("").to_owned()).or_default().push((le, grown));
    }
    buckets
        .into_iter()
        .map(|(group, mut bs)| {
            bs.sort_by(|x, y| x.0.total_cmp(&y.0));
            let q = |q: f64| quantile(&bs, q).map(|s| (s * 1000.0 * 10.0).round() / 10.0);
            (group, Percentiles { p50_ms: q(0.50), p95_ms: q(0.95), p99_ms: q(0.99) })
        })
        .collect()
}

/// The `q` quantile of cumulative buckets `(upper bound, count)`, interpolated linearly
/// inside its bucket as Prometheus's `histogram_quantile` does; `None` without samples.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Past the last finite bound: the best answer is that bound.
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(succeeded: u64, failed: u64, fast: u64, slow: u64) -> String {
        format!(
            "# TYPE eventra_jobs_succeeded_total counter\n\
             eventra_jobs_succeeded_total{{kind=\"email\"}} {succeeded}\n\
             eventra_jobs_failed_total{{kind=\"email\"}} {failed}\n\
             eventra_job_duration_seconds_bucket{{kind=\"email\",le=\"0.01\"}} {fast}\n\
             eventra_job_duration_seconds_bucket{{kind=\"email\",le=\"0.1\"}} {}\n\
             eventra_job_duration_seconds_bucket{{kind=\"email\",le=\"+Inf\"}} {}\n\
             eventra_relay_lag_seconds 0.25\n\
             eventra_http_requests_total{{status=\"200\"}} 9\n",
            fast + slow,
            fast + slow
        )
    }

    #[test]
    fn rates_and_percentiles_come_from_the_growth_inside_the_window() {
        let h = MetricsHistory { handle: test_handle(), inner: Default::default() };
        let t0 = Utc::now();
        // Before the window: 1000 fast jobs that must not count.
        h.record(t0 - chrono::Duration::seconds(600), &exposition(1000, 0, 1000, 0));
        h.record(t0 - chrono::Duration::seconds(60), &exposition(1000, 0, 1000, 0));
        h.record(t0, &exposition(1100, 5, 1010, 90));
        let o = h.overview(Duration::from_secs(60));
        assert_eq!(o.kinds.len(), 1);
        let k = &o.kinds[0];
        assert_eq!((k.kind.as_str(), k.succeeded, k.failed), ("email", 100, 5));
        // 10 of 100 under 10 ms, 90 between 10 and 100 ms: the median is in the slow bucket.
        let p50 = k.run_time.p50_ms.unwrap();
        assert!((10.0..=100.0).contains(&p50), "{p50}");
        assert!(k.run_time.p99_ms.unwrap() > p50);
        assert_eq!(o.pipeline.relay_lag_seconds, Some(0.25));
        assert_eq!(o.series.len(), 1, "one interval inside the window");
        assert!((o.series[0].processed_per_second - 100.0 / 60.0).abs() < 1e-6);
        assert_eq!(o.history.iter().map(|h| h.processed).sum::<u64>(), 100);
        assert_eq!(o.failed_total, 5);
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let b = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(&b, 0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile(&b, 0.75).unwrap() - 0.15).abs() < 1e-9);
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }

    fn test_handle() -> PrometheusHandle {
        metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle()
    }
}
