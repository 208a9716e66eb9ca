//! `eventra bench ingest`: custom events accepted per second through the HTTP API (in
//! batches and one by one), and processed per second to the end of the pipeline (each
//! event audited and counted in the analytics), beside the raw engine inserting the same
//! outbox rows in the same run (pgbench on PostgreSQL, one SQLite writer embedded).
//!
//! A real `eventra serve` (all roles) gets one tenant with one event type. `--events`
//! events go in batches of `--batch` from `--concurrency` clients, each with a client
//! id; then `--single` events one request each. Processed: from the first batch sent to
//! the analytics counting every accepted event (polled through the API).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::harness::{err, new_tenant, pgbench_tps, BenchResult, Run, ServiceUrls, Stack};

#[derive(Debug, Clone, clap::Args)]
pub struct IngestBenchArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub stack: Stack,
    #[command(flatten)]
    pub urls: ServiceUrls,
    /// Events sent in batches.
    #[arg(long, default_value_t = 50_000)]
    pub events: usize,
    /// Events per batch request (at most 500).
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Concurrent clients sending batches.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Events then sent one request each (by 16 clients).
    #[arg(long, default_value_t = 5_000)]
    pub single: usize,
    /// Send the batches at this many events per second (steady load: the drain after
    /// the last batch then shows whether processing keeps pace). Unset: as fast as they
    /// are accepted.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Skip the raw engine's run.
    #[arg(long)]
    pub no_raw: bool,
}

#[derive(Debug)]
pub struct Report {
    pub stack: Stack,
    pub rate: Option<f64>,
    pub events: usize,
    pub batch: usize,
    /// Batch phase: events accepted per second (first request sent → last answered).
    pub accepted_per_s: f64,
    /// First batch sent → every accepted event counted in the analytics.
    pub processed_per_s: f64,
    /// Last batch answered → every event counted (the backlog left at the end).
    pub drain_s: f64,
    pub batch_latency_ms: (f64, f64),
    pub single: usize,
    pub single_per_s: f64,
    pub single_latency_ms: (f64, f64),
    /// The raw engine inserting the same outbox rows in transactions of `batch`.
    pub raw: Option<(String, f64)>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn event(i: usize) -> Value {
    json!({"type": "page.viewed", "id": format!("e-{i}"), "subject": format!("session-{}", i % 1000),
           "data": {"path": format!("/products/{}", i % 5000), "ms": i % 900, "referrer": "https://search.example/q"}})
}

pub async fn run(args: IngestBenchArgs) -> BenchResult<Report> {
    let batch = args.batch.clamp(1, 500);
    let urls = args.urls.clone();
    let run = Run::new(args.stack, urls, None)?;
    run.prepare().await?;
    // Ingestion as fast as it is accepted: the backlog limit is far away, and shedding
    // (which would slow the clients down to the processing rate) is off.
    let env = [("EVENTRA_MAX_EFFECT_LAG_MS", "0".to_owned()), ("EVENTRA_INGEST_MAX_BACKLOG", "0".to_owned())];
    let server = run.spawn("api,relay,consumer,worker,indexer", &env)?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
    let base = server.base.clone();
    let tenant = new_tenant(&client, &base, &run.token, "ingest").await?;
    let res = client
        .put(format!("{base}/v1/tenants/{}/event-types/page.viewed", tenant.id))
        .bearer_auth(&tenant.key)
        .json(&json!({"schema": {"type": "object", "required": ["path", "ms"],
            "properties": {"path": {"type": "string"}, "ms": {"type": "integer", "minimum": 0}, "referrer": {"type": "string", "format": "uri"}}}}))
        .send()
        .await
        .map_err(err)?;
    if res.status() != reqwest::StatusCode::CREATED {
        return Err(format!("create event type: {}", res.status()));
    }

    eprintln!("ingesting {} events in batches of {batch}…", args.events);
    let started = Instant::now();
    let batches: Vec<Vec<Value>> =
        (0..args.events).collect::<Vec<_>>().chunks(batch).map(|c| c.iter().map(|i| event(*i)).collect()).collect();
    let rate = args.rate.filter(|r| *r > 0.0);
    let sent: Vec<Result<(usize, f64), String>> = futures_util::stream::iter(batches.into_iter().enumerate())
        .then(|(n, events)| async move {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64((n * batch) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            events
        })
        .map(|events| {
            let (client, base, tenant) = (client.clone(), base.clone(), tenant.clone());
            async move {
                let t0 = Instant::now();
                let res = client
                    .post(format!("{base}/v1/tenants/{}/events/batch", tenant.id))
                    .bearer_auth(&tenant.key)
                    .json(&json!({ "events": events }))
                    .send()
                    .await
                    .map_err(err)?;
                if res.status() != reqwest::StatusCode::OK {
                    return Err(format!("batch: {}", res.status()));
                }
                let out: Value = res.json().await.map_err(err)?;
                let accepted = out["items"].as_array().map_or(0, |i| i.iter().filter(|i| i["status"] == 202).count());
                Ok((accepted, t0.elapsed().as_secs_f64() * 1000.0))
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let sent = sent.into_iter().collect::<Result<Vec<_>, _>>()?;
    let batch_secs = started.elapsed().as_secs_f64();
    let accepted: usize = sent.iter().map(|(n, _)| n).sum();
    let mut batch_lat: Vec<f64> = sent.iter().map(|(_, ms)| *ms).collect();
    batch_lat.sort_by(f64::total_cmp);
    let sent_at = Instant::now();

    // Processed: the analytics count every accepted event.
    let deadline = Instant::now() + Duration::from_secs(600);
    let analytics = format!("{base}/v1/tenants/{}/analytics/events?bucket=day&type=page.viewed", tenant.id);
    loop {
        let a: Value =
            client.get(&analytics).bearer_auth(&tenant.key).send().await.map_err(err)?.json().await.map_err(err)?;
        let counted = a["types"].as_array().and_then(|t| t.first()).and_then(|t| t["count"].as_u64()).unwrap_or(0);
        if counted as usize >= accepted {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{counted} of {accepted} events processed after 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let processed_secs = started.elapsed().as_secs_f64();
    let drain_s = sent_at.elapsed().as_secs_f64();

    eprintln!("ingesting {} events one by one…", args.single);
    let single_started = Instant::now();
    let singles: Vec<Result<f64, String>> = futures_util::stream::iter(0..args.single)
        .map(|i| {
            let (client, base, tenant) = (client.clone(), base.clone(), tenant.clone());
            async move {
                let t0 = Instant::now();
                let res = client
                    .post(format!("{base}/v1/tenants/{}/events", tenant.id))
                    .bearer_auth(&tenant.key)
                    .json(&event(args.events + i))
                    .send()
                    .await
                    .map_err(err)?;
                if res.status() != reqwest::StatusCode::ACCEPTED {
                    return Err(format!("event: {}", res.status()));
                }
                Ok(t0.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut single_lat = singles.into_iter().collect::<Result<Vec<_>, _>>()?;
    let single_secs = single_started.elapsed().as_secs_f64();
    single_lat.sort_by(f64::total_cmp);
    server.stop()?;
    run.cleanup().await;

    let raw = if args.no_raw {
        None
    } else {
        Some(match args.stack {
            Stack::Services => raw_pgbench_batches(&args.urls.database_url, batch, args.concurrency).await?,
            Stack::Embedded => {
                let dir = std::env::temp_dir().join(format!("eventra-rawingest-{}", uuid::Uuid::now_v7().simple()));
                std::fs::create_dir_all(&dir).map_err(err)?;
                let raw = raw_sqlite_batches(&dir, args.events, batch).await;
                let _ = std::fs::remove_dir_all(&dir);
                raw?
            }
        })
    };

    Ok(Report {
        stack: args.stack,
        rate: args.rate,
        events: accepted,
        batch,
        accepted_per_s: accepted as f64 / batch_secs,
        processed_per_s: accepted as f64 / processed_secs,
        drain_s,
        batch_latency_ms: (percentile(&batch_lat, 0.5), percentile(&batch_lat, 0.99)),
        single: single_lat.len(),
        single_per_s: single_lat.len() as f64 / single_secs,
        single_latency_ms: (percentile(&single_lat, 0.5), percentile(&single_lat, 0.99)),
        raw,
    })
}

/// A custom event as the outbox stores it.
fn sample_payload() -> BenchResult<String> {
    let ctx = crate::domain::EventContext::system("raw");
    let e = crate::domain::DomainEvent::custom(
        crate::domain::EventType::Custom("page.viewed".into()),
        uuid::Uuid::now_v7(),
        Some("session-1".into()),
        crate::domain::now(),
        &ctx,
        json!({"path": "/products/1", "ms": 1, "referrer": "https://search.example/q"}),
    );
    serde_json::to_string(&e).map_err(err)
}

/// pgbench: transactions of `batch` outbox rows (one multi-row INSERT each, the
/// project's schema), `clients` clients for 10 s; rows per second.
async fn raw_pgbench_batches(admin_url: &str, batch: usize, clients: usize) -> BenchResult<(String, f64)> {
    let name = format!("eventra_rawingest_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let admin = crate::store::PgStore::connect(admin_url, 1).await.map_err(err)?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(admin.pool()).await.map_err(err)?;
    let url = crate::store::with_database(admin_url, &name);
    let result = async {
        let store = crate::store::PgStore::connect(&url, 2).await.map_err(err)?;
        crate::store::Store::migrate(&store).await.map_err(err)?;
        store.pool().close().await;
        let payload = sample_payload()?.replace('\'', "''");
        let script = format!(
            "\\set n random(1, 1000000000)\n\
             INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) \
             SELECT gen_random_uuid(), '00000000-0000-7000-8000-000000000001', (:n::bigint * 1000 + :client_id) * 1000 + g, 'page.viewed', '{payload}', now() \
             FROM generate_series(1, {batch}) g;\n"
        );
        let tps = pgbench_tps(&url, &script, clients, 10).await?;
        Ok((format!("pgbench: {batch} outbox rows a transaction, {clients} clients"), tps * batch as f64))
    }
    .await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(admin.pool()).await;
    result
}

/// SQLite inserting the same outbox rows in transactions of `batch` (multi-row
/// INSERTs) on one writer connection; rows per second.
async fn raw_sqlite_batches(dir: &std::path::Path, n: usize, batch: usize) -> BenchResult<(String, f64)> {
    let url = format!("sqlite://{}", dir.join("raw.db").display());
    let store = crate::store::SqliteStore::connect(&url, 1).await.map_err(err)?;
    crate::store::Store::migrate(&store).await.map_err(err)?;
    let writer = store.pools().write;
    let payload = sample_payload()?;
    let tenant = uuid::Uuid::now_v7();
    let started = Instant::now();
    let mut seq = 0i64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch) {
        let mut tx = writer.begin().await.map_err(err)?;
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) ",
        );
        q.push_values(chunk, |mut row, _| {
            seq += 1;
            row.push_bind(uuid::Uuid::now_v7())
                .push_bind(tenant)
                .push_bind(seq)
                .push_bind("page.viewed")
                .push_bind(payload.clone())
                .push_bind(crate::domain::now());
        });
        q.build().execute(&mut *tx).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    store.pools().write.close().await;
    Ok((format!("SQLite: {batch} outbox rows a transaction, one writer"), rate))
}

pub fn table(r: &Report) -> String {
    let raw = r.raw.as_ref().map_or_else(|| "not run".to_owned(), |(what, n)| format!("{n:.0} rows/s ({what})"));
    format!(
        "| stack | events | sent at | batch | accepted/s | processed/s (send → counted) | drain after the last batch | batch request p50 / p99 | single events | single accepted/s | single p50 / p99 | raw engine, same rows |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|\n\
         | {:?} | {} | {} | {} | {:.0} | {:.0} | {:.1} s | {:.0} / {:.0} ms | {} | {:.0} | {:.1} / {:.1} ms | {} |\n",
        r.stack,
        r.events,
        r.rate.map_or_else(|| "max".to_owned(), |x| format!("{x:.0}/s")),
        r.batch,
        r.accepted_per_s,
        r.processed_per_s,
        r.drain_s,
        r.batch_latency_ms.0,
        r.batch_latency_ms.1,
        r.single,
        r.single_per_s,
        r.single_latency_ms.0,
        r.single_latency_ms.1,
        raw
    )
}
