//! Event analytics (SPEC §9): counts per tenant, type and time bucket, and the commit →
//! processed latency as a histogram whose buckets add up across minutes, hours, days and
//! processes.
//!
//! The latency buckets are log-scale, four per doubling (each ≤ 19 % wide): bucket `b`
//! holds latencies up to `2^((b+1)/4) - 1` ms. A percentile is the upper edge of the
//! bucket it falls in.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The highest bucket (about 4.6 hours and beyond).
pub const MAX_BUCKET: i16 = 95;

/// The bucket of a latency.
pub fn latency_bucket(ms: f64) -> i16 {
    if !ms.is_finite() || ms <= 0.0 {
        return 0;
    }
    ((ms + 1.0).log2() * 4.0).floor().clamp(0.0, f64::from(MAX_BUCKET)) as i16
}

/// The largest latency (ms) bucket `b` holds.
pub fn bucket_upper_ms(b: i16) -> f64 {
    (f64::from(b + 1) / 4.0).exp2() - 1.0
}

/// Time buckets: the stats are written at every grain, so a query reads one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Grain {
    Minute,
    Hour,
    Day,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    pub fn code(self) -> i16 {
        match self {
            Grain::Minute => 0,
            Grain::Hour => 1,
            Grain::Day => 2,
        }
    }

    pub fn span(self) -> TimeDelta {
        match self {
            Grain::Minute => TimeDelta::minutes(1),
            Grain::Hour => TimeDelta::hours(1),
            Grain::Day => TimeDelta::days(1),
        }
    }

    /// The start of the bucket `at` falls in.
    pub fn start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        at.duration_trunc(self.span()).unwrap_or(at)
    }

    pub fn parse(s: &str) -> Option<Grain> {
        match s {
            "minute" => Some(Grain::Minute),
            "hour" => Some(Grain::Hour),
            "day" => Some(Grain::Day),
            _ => None,
        }
    }
}

/// One stored count: events of a type in a bucket whose latency fell in one bucket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatKey {
    pub tenant_id: Uuid,
    pub grain: i16,
    pub bucket_start: DateTime<Utc>,
    pub event_type: String,
    pub latency_bucket: i16,
}

/// The grain of each (tenant, type)'s all-time count (one bucket, starting at the
/// epoch, latency bucket 0): what a tenant's backlog is measured against.
pub const ALL_TIME: i16 = 3;

/// What processed events add to the stats: one count per (grain, bucket, type, latency
/// bucket), sorted (writers take row locks in this order, so they cannot deadlock).
pub fn stat_increments<'a>(
    processed: impl IntoIterator<Item = (Uuid, &'a str, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> BTreeMap<StatKey, i64> {
    let mut out = BTreeMap::new();
    for (tenant_id, event_type, committed) in processed {
        let ms = (now - committed).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
        let latency_bucket = latency_bucket(ms);
        for grain in Grain::ALL {
            let key = StatKey {
                tenant_id,
                grain: grain.code(),
                bucket_start: grain.start(committed),
                event_type: event_type.to_owned(),
                latency_bucket,
            };
            *out.entry(key).or_insert(0) += 1;
        }
        let all_time = StatKey {
            tenant_id,
            grain: ALL_TIME,
            bucket_start: DateTime::UNIX_EPOCH,
            event_type: event_type.to_owned(),
            latency_bucket: 0,
        };
        *out.entry(all_time).or_insert(0) += 1;
    }
    out
}

/// A stored row, as read back.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StatRow {
    pub bucket_start: DateTime<Utc>,
    pub event_type: String,
    pub latency_bucket: i16,
    pub count: i64,
}

/// Percentiles of commit → processed latency.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TypeSummary {
    #[serde(rename = "type")]
    pub event_type: String,
    pub count: i64,
    pub events_per_second: f64,
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BucketCount {
    pub start: DateTime<Utc>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub count: i64,
}

/// `GET …/analytics/events`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventAnalytics {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub bucket: Grain,
    pub types: Vec<TypeSummary>,
    pub items: Vec<BucketCount>,
}

/// The `q`-quantile's bucket edge of a histogram (bucket → count).
fn percentile(hist: &BTreeMap<i16, i64>, total: i64, q: f64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (b, n) in hist {
        seen += n;
        if seen >= rank {
            return (bucket_upper_ms(*b) * 10.0).round() / 10.0;
        }
    }
    hist.keys().next_back().map_or(0.0, |b| bucket_upper_ms(*b))
}

impl EventAnalytics {
    /// Sums the rows of `[from, to)` at `grain`.
    pub fn from_rows(from: DateTime<Utc>, to: DateTime<Utc>, grain: Grain, rows: &[StatRow]) -> Self {
        let mut by_type: BTreeMap<&str, BTreeMap<i16, i64>> = BTreeMap::new();
        let mut items: BTreeMap<(DateTime<Utc>, &str), i64> = BTreeMap::new();
        for r in rows {
            *by_type.entry(&r.event_type).or_default().entry(r.latency_bucket).or_insert(0) += r.count;
            *items.entry((r.bucket_start, &r.event_type)).or_insert(0) += r.count;
        }
        let seconds = (to - from).num_milliseconds().max(1) as f64 / 1000.0;
        let types = by_type
            .into_iter()
            .map(|(t, hist)| {
                let count: i64 = hist.values().sum();
                TypeSummary {
                    event_type: t.to_owned(),
                    count,
                    events_per_second: (count as f64 / seconds * 1000.0).round() / 1000.0,
                    latency_ms: Latency {
                        p50: percentile(&hist, count, 0.50),
                        p95: percentile(&hist, count, 0.95),
                        p99: percentile(&hist, count, 0.99),
                    },
                }
            })
            .collect();
        let items = items
            .into_iter()
            .map(|((start, t), count)| BucketCount { start, event_type: t.to_owned(), count })
            .collect();
        EventAnalytics { from, to, bucket: grain, types, items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log_scale_and_cover_their_latencies() {
        for ms in [0.0, 0.5, 1.0, 3.0, 10.0, 99.0, 1000.0, 60_000.0] {
            let b = latency_bucket(ms);
            assert!(bucket_upper_ms(b) >= ms, "{ms} ms ≤ the upper edge of bucket {b}");
            if b > 0 {
                assert!(bucket_upper_ms(b - 1) <= ms, "{ms} ms > the edge below");
            }
        }
        assert_eq!(latency_bucket(f64::INFINITY), 0);
        assert_eq!(latency_bucket(1e12), MAX_BUCKET);
    }

    #[test]
    fn increments_count_each_event_at_every_grain_and_percentiles_merge() {
        let t = Uuid::now_v7();
        let now = chrono::Utc::now();
        let events: Vec<(Uuid, &str, DateTime<Utc>)> = (0..100)
            .map(|i| (t, if i < 90 { "order.placed" } else { "user.created" }, now - TimeDelta::milliseconds(i)))
            .collect();
        let inc = stat_increments(events, now);
        for grain in Grain::ALL {
            let n: i64 = inc.iter().filter(|(k, _)| k.grain == grain.code()).map(|(_, n)| n).sum();
            assert_eq!(n, 100, "{grain:?}");
        }
        let rows: Vec<StatRow> = inc
            .iter()
            .filter(|(k, _)| k.grain == Grain::Hour.code())
            .map(|(k, n)| StatRow {
                bucket_start: k.bucket_start,
                event_type: k.event_type.clone(),
                latency_bucket: k.latency_bucket,
                count: *n,
            })
            .collect();
        let a = EventAnalytics::from_rows(now - TimeDelta::hours(1), now, Grain::Hour, &rows);
        let orders = a.types.iter().find(|t| t.event_type == "order.placed").unwrap();
        assert_eq!(orders.count, 90);
        assert!(orders.latency_ms.p50 >= 44.0 && orders.latency_ms.p50 <= 60.0, "{:?}", orders.latency_ms);
        assert!(orders.latency_ms.p99 >= 89.0 && orders.latency_ms.p99 <= 110.0, "{:?}", orders.latency_ms);
        assert_eq!(a.items.iter().map(|i| i.count).sum::<i64>(), 100);
    }
}
