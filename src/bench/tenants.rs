//! `eventra bench tenants`: memory per active tenant. A real `eventra serve` (`api`
//! role, embedded stack) gets `--tenants` tenants, then one create in each (every
//! tenant's manager started once, within the idle window); its resident memory is read
//! before and after, with the managers still running. With the default limit
//! (`EVENTRA_MAX_TENANT_MANAGERS`) the least recently active managers are passivated
//! as new ones start; `--max-managers` changes the limit (a limit above `--tenants`
//! keeps every manager alive and shows what one costs).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use super::harness::{err, new_tenant, BenchResult, Run, ServiceUrls, Stack, Tenant};

#[derive(Debug, Clone, clap::Args)]
pub struct TenantsBenchArgs {
    /// Tenants to create and touch once each.
    #[arg(long, default_value_t = 100_000)]
    pub tenants: usize,
    /// `EVENTRA_MAX_TENANT_MANAGERS` for the server (default: the server's own).
    #[arg(long)]
    pub max_managers: Option<usize>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

#[derive(Debug)]
pub struct Report {
    pub tenants: usize,
    pub max_managers: Option<usize>,
    /// RSS (KiB) at start, after the tenants were created, after each was touched.
    pub rss_start: u64,
    pub rss_created: u64,
    pub rss_touched: u64,
    pub peak: u64,
    pub managers_running: usize,
    pub create_per_s: f64,
    pub touch_per_s: f64,
}

pub async fn run(args: TenantsBenchArgs) -> BenchResult<Report> {
    let urls = ServiceUrls { database_url: String::new(), amqp_url: String::new(), redis_url: String::new() };
    let run = Run::new(Stack::Embedded, urls, None)?;
    let mut env = Vec::new();
    if let Some(max) = args.max_managers {
        env.push(("EVENTRA_MAX_TENANT_MANAGERS", max.to_string()));
    }
    let server = run.spawn("api", &env)?;
    let rss = |s: &super::harness::Server| s.rss_kb().map(|(now, _)| now).unwrap_or(0);
    let rss_start = rss(&server);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
    let base = server.base.clone();

    eprintln!("creating {} tenants…", args.tenants);
    let started = Instant::now();
    let tenants: Vec<BenchResult<Tenant>> = futures_util::stream::iter(0..args.tenants)
        .map(|i| {
            let (client, base, token) = (client.clone(), base.clone(), run.token.clone());
            async move { new_tenant(&client, &base, &token, &format!("t{i}")).await }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let tenants: Vec<Tenant> = tenants.into_iter().collect::<Result<_, _>>()?;
    let create_per_s = tenants.len() as f64 / started.elapsed().as_secs_f64();
    let rss_created = rss(&server);

    eprintln!("one create in each tenant…");
    let started = Instant::now();
    let touched: Vec<Result<(), String>> = futures_util::stream::iter(tenants.iter().cloned())
        .map(|Tenant { id, key }| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let res = client
                    .post(format!("{base}/v1/tenants/{id}/users"))
                    .bearer_auth(key)
                    .json(&json!({"email": "first@bench.example", "name": "First"}))
                    .send()
                    .await
                    .map_err(err)?;
                if res.status() != reqwest::StatusCode::CREATED {
                    return Err(format!("create in {id}: {}", res.status()));
                }
                Ok(())
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    touched.into_iter().collect::<Result<Vec<()>, _>>()?;
    let touch_per_s = tenants.len() as f64 / started.elapsed().as_secs_f64();
    let rss_touched = rss(&server);
    let peak = server.rss_kb().map(|(_, peak)| peak).unwrap_or(0);
    let tree: serde_json::Value = client
        .get(format!("{base}/debug/actors"))
        .bearer_auth(&run.token)
        .send()
        .await
        .map_err(err)?
        .json()
        .await
        .map_err(err)?;
    let managers_running = find(&tree, "tenants").and_then(|n| n["children"].as_array()).map_or(0, |c| c.len());
    server.stop()?;
    Ok(Report {
        tenants: tenants.len(),
        max_managers: args.max_managers,
        rss_start,
        rss_created,
        rss_touched,
        peak,
        managers_running,
        create_per_s,
        touch_per_s,
    })
}

/// The node of that name in a `/debug/actors` tree.
fn find<'a>(node: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    if node["name"] == name {
        return Some(node);
    }
    node["children"].as_array()?.iter().find_map(|c| find(c, name))
}

pub fn table(r: &Report) -> String {
    let mb = |kb: u64| format!("{:.0} MB", kb as f64 / 1024.0);
    let limit = r.max_managers.map_or_else(|| "default".to_owned(), |m| m.to_string());
    format!(
        "| tenants | manager limit | RSS at start | after creating them | after one write each | peak | managers running | tenants created/s | first writes/s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
        r.tenants,
        limit,
        mb(r.rss_start),
        mb(r.rss_created),
        mb(r.rss_touched),
        mb(r.peak),
        r.managers_running,
        r.create_per_s,
        r.touch_per_s
    )
}
