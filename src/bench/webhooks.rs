//! `eventra bench webhooks`: webhook deliveries per second to a local receiver, beside a
//! raw reqwest POST loop to the same receiver with the same bodies.
//!
//! A real `eventra serve` (all roles) gets one tenant with `--endpoints` endpoints
//! subscribed to `user.created` (so each event is that many deliveries), then
//! `--events` users created through the API. The receiver (in this process) counts
//! deliveries and, from each body's `time`, commit → delivered latency. With
//! `--dead-endpoint` one more endpoint never answers (the receiver holds the request
//! until the server's timeout): the healthy endpoints' latency shows whether the dead
//! one holds them back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::harness::{err, new_tenant, BenchResult, Run, ServiceUrls, Stack};

#[derive(Debug, Clone, clap::Args)]
pub struct WebhooksBenchArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub stack: Stack,
    #[command(flatten)]
    pub urls: ServiceUrls,
    /// Users to create (events).
    #[arg(long, default_value_t = 2_000)]
    pub events: usize,
    /// Healthy endpoints subscribed to every event.
    #[arg(long, default_value_t = 4)]
    pub endpoints: usize,
    /// Add an endpoint that never answers.
    #[arg(long)]
    pub dead_endpoint: bool,
    /// Concurrent API clients creating the users.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Create users at this many per second (steady load; latency then shows delivery,
    /// not a backlog draining). Unset: as fast as the API takes them.
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(Debug)]
pub struct Report {
    pub stack: Stack,
    pub rate: Option<f64>,
    pub events: usize,
    pub endpoints: usize,
    pub dead_endpoint: bool,
    pub deliveries: usize,
    /// First create sent → last healthy delivery received.
    pub seconds: f64,
    pub deliveries_per_s: f64,
    pub latency_ms: (f64, f64, f64),
    pub raw_posts_per_s: f64,
}

#[derive(Default)]
struct Tally {
    /// (endpoint name, commit → received in ms) per healthy delivery.
    got: Vec<f64>,
}

async fn healthy(
    axum::extract::State(t): axum::extract::State<Arc<Mutex<Tally>>>,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let ms = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["time"].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()))
        .map(|at| {
            (chrono::Utc::now() - at.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0) as f64 / 1000.0
        });
    if let Some(ms) = ms {
        t.lock().unwrap_or_else(|e| e.into_inner()).got.push(ms);
    }
    axum::http::StatusCode::NO_CONTENT
}

async fn dead() -> axum::http::StatusCode {
    std::future::pending::<()>().await;
    axum::http::StatusCode::OK
}

async fn raw(_: axum::body::Bytes) -> axum::http::StatusCode {
    axum::http::StatusCode::NO_CONTENT
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

pub async fn run(args: WebhooksBenchArgs) -> BenchResult<Report> {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(err)?;
    let receiver = format!("http://{}", listener.local_addr().map_err(err)?);
    let app = axum::Router::new()
        .route("/healthy/{n}", axum::routing::post(healthy))
        .route("/dead", axum::routing::post(dead))
        .route("/raw", axum::routing::post(raw))
        .with_state(tally.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let urls = args.urls.clone();
    let run = Run::new(args.stack, urls, None)?;
    run.prepare().await?;
    let env = [
        ("EVENTRA_WEBHOOK_ALLOW_PRIVATE", "1".to_owned()),
        ("EVENTRA_WEBHOOK_TIMEOUT_MS", "5000".to_owned()),
        // The users are created as fast as the API takes them; the deliveries then drain.
        ("EVENTRA_MAX_EFFECT_LAG_MS", "0".to_owned()),
    ];
    let server = run.spawn("api,relay,consumer,worker,indexer", &env)?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
    let base = server.base.clone();
    let tenant = new_tenant(&client, &base, &run.token, "hooks").await?;
    let mut urls: Vec<String> = (0..args.endpoints).map(|n| format!("{receiver}/healthy/{n}")).collect();
    if args.dead_endpoint {
        urls.push(format!("{receiver}/dead"));
    }
    for url in &urls {
        let res = client
            .post(format!("{base}/v1/tenants/{}/webhooks", tenant.id))
            .bearer_auth(&tenant.key)
            .json(&json!({"url": url, "event_types": ["user.created"]}))
            .send()
            .await
            .map_err(err)?;
        if res.status() != reqwest::StatusCode::CREATED {
            return Err(format!("create endpoint: {}", res.status()));
        }
    }

    eprintln!("creating {} users, {} healthy deliveries each…", args.events, args.endpoints);
    let started = Instant::now();
    let rate = args.rate;
    let created: Vec<Result<(), String>> = futures_util::stream::iter(0..args.events)
        .then(|i| async move {
            if let Some(rate) = rate.filter(|r| *r > 0.0) {
                tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
            }
            i
        })
        .map(|i| {
            let (client, base, tenant) = (client.clone(), base.clone(), tenant.clone());
            async move {
                let body = json!({"email": format!("u{i}@bench.example"), "name": "Bench User"});
                super::harness::create_user(&client, &base, &tenant, body).await
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    created.into_iter().collect::<Result<Vec<()>, _>>()?;
    let expected = args.events * args.endpoints;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = tally.lock().unwrap_or_else(|e| e.into_inner()).got.len();
        if n >= expected {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{n} of {expected} deliveries after 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut tally.lock().unwrap_or_else(|e| e.into_inner()).got);
    lat.sort_by(f64::total_cmp);
    server.stop()?;
    run.cleanup().await;

    // The raw baseline: the same number of POSTs with a delivery-sized body, same receiver.
    let body = serde_json::to_vec(&json!({"specversion": "1.0", "type": "user.created", "data": {"user": {"email": "u0@bench.example", "name": "Bench User", "attributes": {}}}, "pad": "x".repeat(400)})).map_err(err)?;
    let raw_client = reqwest::Client::new();
    let raw_started = Instant::now();
    let posts: Vec<Result<(), String>> = futures_util::stream::iter(0..expected)
        .map(|_| {
            let (c, url, body) = (raw_client.clone(), format!("{receiver}/raw"), body.clone());
            async move {
                c.post(url).header("content-type", "application/json").body(body).send().await.map_err(err)?;
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    posts.into_iter().collect::<Result<Vec<()>, _>>()?;
    let raw_posts_per_s = expected as f64 / raw_started.elapsed().as_secs_f64();

    Ok(Report {
        stack: args.stack,
        rate: args.rate,
        events: args.events,
        endpoints: args.endpoints,
        dead_endpoint: args.dead_endpoint,
        deliveries: lat.len(),
        seconds,
        deliveries_per_s: lat.len() as f64 / seconds,
        latency_ms: (percentile(&lat, 0.5), percentile(&lat, 0.95), percentile(&lat, 0.99)),
        raw_posts_per_s,
    })
}

pub fn table(r: &Report) -> String {
    format!(
        "| stack | events | events/s sent | healthy endpoints | dead endpoint | deliveries | seconds | deliveries/s | commit → delivered p50 / p95 / p99 | raw reqwest POSTs/s |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---|---:|\n\
         | {:?} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} / {:.0} / {:.0} ms | {:.0} |\n",
        r.stack,
        r.events,
        r.rate.map_or_else(|| "max".to_owned(), |x| format!("{x:.0}")),
        r.endpoints,
        if r.dead_endpoint { "yes" } else { "no" },
        r.deliveries,
        r.seconds,
        r.deliveries_per_s,
        r.latency_ms.0,
        r.latency_ms.1,
        r.latency_ms.2,
        r.raw_posts_per_s
    )
}
