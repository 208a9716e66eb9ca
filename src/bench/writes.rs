//! `eventra bench writes`: how fast the API commits creates, into one hot tenant and
//! spread over many, beside the database doing the same INSERTs one transaction each.
//!
//! - A real `eventra serve` (this binary, a child process, `api` role only, so nothing
//!   else competes for the two cores) on the chosen stack.
//! - **Maximum rate**: `wrk` (Debian's, with a generated Lua script) sends creates with
//!   unique emails over `--connections` keep-alive connections for `--seconds`, round
//!   robin over the tenants. Reported: creates/s (2xx), latency p50/p90/p99, non-2xx.
//!   Afterwards the users in the database are counted: at least every 2xx must be there.
//! - **Half rate**: creates offered open-loop at 50 % of that maximum for `--seconds`
//!   (each started at its own time whether or not earlier ones answered): p50/p95/p99.
//! - **Raw engine, same run, same work**: on services, pgbench with the same client
//!   count, INSERT user + INSERT outbox row, one transaction each, into the project's
//!   schema; embedded, SQLite doing the same on one connection. It runs right before
//!   and right after each tenant count's maximum-rate run, and that row's ratio is to
//!   the mean of the two: on a shared machine the engine's own rate drifts by tens of
//!   percent within minutes, so a figure taken once per report made the ratios noise.
//! - The server's own view: writes per transaction and a transaction's time, from
//!   `/metrics`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{err, new_tenant, raw_pgbench, raw_sqlite_inserts, BenchResult, Run, ServiceUrls, Stack, Tenant};

#[derive(Debug, Clone, clap::Args)]
pub struct WritesBenchArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub stack: Stack,
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub database_url: String,
    /// Tenant counts to run, one run each (creates go round robin over them).
    #[arg(long, value_delimiter = ',', default_value = "1,50")]
    pub tenants: Vec<usize>,
    /// Client connections (and pgbench clients).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Seconds of each measurement.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Leave out the half-rate latency runs.
    #[arg(long)]
    pub no_half_rate: bool,
}

/// One tenant count's figures.
#[derive(Debug, Clone)]
pub struct WritesRow {
    pub tenants: usize,
    pub creates_per_s: f64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub non_2xx: u64,
    /// Users in the database after the run, and the 2xx answers.
    pub stored: u64,
    pub answered: u64,
    pub mean_batch: f64,
    /// How long a batch's transaction took on average.
    pub mean_batch_ms: f64,
    /// The share of transactions sent as one message on guessed tenant rows (0..=1;
    /// `None`: the backend never guesses).
    pub one_message: Option<f64>,
    /// The raw engine's rate right before and right after the maximum-rate run.
    pub raw: (f64, f64),
    /// Open-loop at half the maximum: offered rate, p50/p95/p99, failures.
    pub half: Option<(f64, Duration, Duration, Duration, usize)>,
}

#[derive(Debug)]
pub struct Report {
    pub stack: Stack,
    pub connections: usize,
    pub rows: Vec<WritesRow>,
    /// What the raw engine does.
    pub raw: String,
}

impl WritesRow {
    /// Creates/s over the raw engine's rate (the mean of its runs before and after).
    pub fn ratio(&self) -> f64 {
        self.creates_per_s / ((self.raw.0 + self.raw.1) / 2.0).max(1.0)
    }
}

pub async fn run(args: WritesBenchArgs) -> BenchResult<Report> {
    let wrk = which("wrk").ok_or("wrk not found: apt-get install wrk")?;
    let urls =
        ServiceUrls { database_url: args.database_url.clone(), amqp_url: String::new(), redis_url: String::new() };
    let mut rows = Vec::new();
    let mut what = String::new();
    for &n in &args.tenants {
        let before;
        (what, before) = raw_rate(&args).await?;
        let run = Run::new(args.stack, urls.clone(), None)?;
        run.prepare().await?;
        let row = one_count(&args, &run, &wrk, n.max(1), before).await;
        run.cleanup().await;
        rows.push(row?);
    }
    Ok(Report { stack: args.stack, connections: args.connections, rows, raw: what })
}

/// The raw engine doing the same work: what it does, and its rate.
async fn raw_rate(args: &WritesBenchArgs) -> BenchResult<(String, f64)> {
    match args.stack {
        Stack::Services => {
            let (what, rate, _) = raw_pgbench(&args.database_url, args.connections, args.seconds.min(10)).await?;
            Ok((what, rate))
        }
        Stack::Embedded => {
            let dir = std::env::temp_dir().join(format!("eventra-raw-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).map_err(err)?;
            let rate = raw_sqlite_inserts(&dir, 20_000).await;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(("SQLite: INSERT user + INSERT outbox row, one transaction each, one connection".to_owned(), rate?))
        }
    }
}

async fn one_count(args: &WritesBenchArgs, run: &Run, wrk: &str, n: usize, raw_before: f64) -> BenchResult<WritesRow> {
    // The api role alone: the relay, consumers and workers would compete for the cores.
    let server = run.spawn("api", &[])?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
    let mut tenants = Vec::with_capacity(n);
    for i in 0..n {
        tenants.push(new_tenant(&client, &server.base, &run.token, &format!("w{i}")).await?);
    }
    eprintln!("{n} tenant(s): wrk, {} connections, {} s…", args.connections, args.seconds);
    let script = run.dir.join("creates.lua");
    std::fs::write(&script, wrk_script(&tenants)).map_err(err)?;
    let out = tokio::process::Command::new(wrk)
        .args(["-t", "2", "-c", &args.connections.to_string(), "-d", &format!("{}s", args.seconds), "-s"])
        .arg(&script)
        .arg(&server.base)
        .output()
        .await
        .map_err(err)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = text
        .lines()
        .find_map(|l| l.strip_prefix("EVENTRA "))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("wrk said: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
    let num = |k: &str| summary[k].as_u64().unwrap_or(0);
    let us = |k: &str| Duration::from_micros(num(k));
    let answered = num("requests").saturating_sub(num("status_errors"));
    let creates_per_s = answered as f64 / (num("duration_us").max(1) as f64 / 1e6);
    let non_2xx = num("status_errors");

    let store = run.store().await?;
    let mut stored = 0;
    for t in &tenants {
        stored += store.get_tenant(t.id).await.map_err(err)?.user_count.max(0) as u64;
    }
    if stored < answered {
        return Err(format!("{answered} creates were answered 2xx but only {stored} users are stored"));
    }
    let (mean_batch, mean_batch_ms, one_message) = batches(&client, &server.base).await.unwrap_or_default();
    // The raw engine again, while the server idles.
    let raw_after = raw_rate(args).await?.1;

    let half = if args.no_half_rate {
        None
    } else {
        let rate = creates_per_s / 2.0;
        eprintln!("{n} tenant(s): open loop at {rate:.0}/s for {} s…", args.seconds);
        Some(open_loop(&client, &server.base, &tenants, rate, Duration::from_secs(args.seconds)).await)
    };
    server.stop()?;
    Ok(WritesRow {
        tenants: n,
        creates_per_s,
        p50: us("p50_us"),
        p90: us("p90_us"),
        p99: us("p99_us"),
        non_2xx,
        stored,
        answered,
        mean_batch,
        mean_batch_ms,
        one_message,
        raw: (raw_before, raw_after),
        half,
    })
}

/// The wrk script: creates with unique emails (thread id, counter), round robin over
/// the tenants, and a JSON summary line at the end.
fn wrk_script(tenants: &[Tenant]) -> String {
    let list: Vec<String> = tenants
        .iter()
        .map(|t| format!("{{path = \"/v1/tenants/{}/users\", auth = \"Bearer {}\"}}", t.id, t.key))
        .collect();
    format!(
        r#"local tenants = {{ {list} }}
local next_id = 1
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end
local counter = 0
function request()
  counter = counter + 1
  local t = tenants[(counter % #tenants) + 1]
  local body = '{{"email":"w' .. tid .. '-' .. counter .. '@bench.example","name":"Bench User ' .. counter .. '"}}'
  return wrk.format("POST", t.path, {{["Content-Type"] = "application/json", ["Authorization"] = t.auth}}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('EVENTRA {{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"#,
        list = list.join(", ")
    )
}

/// Creates offered at `rate` per second for `time`, round robin over the tenants, each
/// started at its own time whether or not earlier ones answered.
async fn open_loop(
    client: &reqwest::Client,
    base: &str,
    tenants: &[Tenant],
    rate: f64,
    time: Duration,
) -> (f64, Duration, Duration, Duration, usize) {
    let total = (rate * time.as_secs_f64()).round() as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate.max(0.001))).await;
        let t = tenants[i % tenants.len()].clone();
        let (client, url) = (client.clone(), format!("{base}/v1/tenants/{}/users", t.id));
        tasks.push(tokio::spawn(async move {
            let began = Instant::now();
            let res = client
                .post(url)
                .bearer_auth(&t.key)
                .json(&json!({"email": format!("h{i}@bench.example"), "name": format!("Half Rate {i}")}))
                .send()
                .await;
            res.ok().filter(|r| r.status().is_success()).map(|_| began.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failed = 0;
    for task in tasks {
        match task.await.ok().flatten() {
            Some(d) => latencies.push(d),
            None => failed += 1,
        }
    }
    latencies.sort();
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    (rate, at(0.50), at(0.95), at(0.99), failed)
}

/// Writes per transaction and a transaction's time (ms), on average, from the server's
/// `eventra_write_transaction_writes` and `_seconds` histograms, and the share of
/// transactions that committed as one message (`eventra_write_guesses_total`).
async fn batches(client: &reqwest::Client, base: &str) -> Option<(f64, f64, Option<f64>)> {
    let text = client.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    let value = |name: &str| -> Option<f64> {
        text.lines().find(|l| l.starts_with(name))?.split_whitespace().last()?.parse().ok()
    };
    let count = value("eventra_write_transaction_writes_count")?.max(1.0);
    // Counted only where a backend guesses (PostgreSQL).
    let committed = text.contains("eventra_write_guesses_total{").then(|| {
        ["committed", "committed_after_waiting"]
            .iter()
            .filter_map(|o| value(&format!("eventra_write_guesses_total{{outcome=\"{o}\"}}")))
            .fold(0.0, |a, b| a + b)
    });
    Some((
        value("eventra_write_transaction_writes_sum")? / count,
        value("eventra_write_transaction_seconds_sum")? * 1000.0 / count,
        committed.map(|c| c / count),
    ))
}

fn which(program: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()).map(|p| p.display().to_string())
}

/// The report as a Markdown table.
pub fn table(r: &Report) -> String {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let stack = format!("{:?}", r.stack).to_lowercase();
    let mut out = format!(
        "Stack: {stack}, {} connections. Raw engine, same run, before and after each row: {}\n\n",
        r.connections, r.raw
    );
    out.push_str("| tenants | raw/s before, after | creates/s | × raw | p50 | p90 | p99 | non-2xx | stored ≥ 2xx | writes/txn | txn ms | one message | half rate: offered/s | p50 | p95 | p99 | failed |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut seen = HashSet::new();
    for row in &r.rows {
        if !seen.insert(row.tenants) {
            continue;
        }
        let half = match &row.half {
            Some((rate, p50, p95, p99, failed)) => {
                format!("{rate:.0} | {} | {} | {} | {failed}", ms(*p50), ms(*p95), ms(*p99))
            }
            None => "– | – | – | – | –".into(),
        };
        out.push_str(&format!(
            "| {} | {:.0}, {:.0} | {:.0} | {:.2}× | {} | {} | {} | {} | {} ≥ {} | {:.1} | {:.2} | {} | {half} |\n",
            row.tenants,
            row.raw.0,
            row.raw.1,
            row.creates_per_s,
            row.ratio(),
            ms(row.p50),
            ms(row.p90),
            ms(row.p99),
            row.non_2xx,
            row.stored,
            row.answered,
            row.mean_batch,
            row.mean_batch_ms,
            row.one_message.map_or_else(|| "–".to_owned(), |share| format!("{:.0} %", share * 100.0)),
        ));
    }
    out
}
