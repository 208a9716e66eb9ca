//! `eventra chaos --minutes N`: Eventra under load while it is attacked, then checked.
//!
//! On private dependencies ([`services`]: its own Redis with AOF always, PostgreSQL
//! cluster, RabbitMQ node and an SMTP sink that counts deliveries), Eventra runs as a
//! child process with chaos on, and for N minutes:
//! - a load of creates, renames, deletes and cross-tenant reads ([`harness::Load`]);
//! - an actor killed every `--kill-every-ms` (a random worker of the live tree, through
//!   `POST /debug/actors/{name}/kill`);
//! - every `--fault-every-secs`, one dependency restart, in turn at random: Redis
//!   SIGKILLed and started again, RabbitMQ `stop_app`/`start_app`, PostgreSQL
//!   restarted, or Eventra itself SIGKILLed and started again on the same data.
//!
//! Like an orchestrator, it starts Eventra again whenever it exits (a tree that fails
//! past its root stops the process). Then the load stops, the pipeline settles, and
//! [`harness::check`] counts what must be zero: lost events or effects, doubled
//! effects, valid events in the DLQ, dead jobs, cross-tenant reads.

pub mod harness;
pub mod services;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// How long the attack lasts.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Operations offered per second.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Tenants the load writes to.
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// An actor is killed this often (0: none).
    #[arg(long, default_value_t = 100)]
    pub kill_every_ms: u64,
    /// A dependency is restarted this often (0: none).
    #[arg(long, default_value_t = 30)]
    pub fault_every_secs: u64,
    /// Write the figures as JSON here too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What a chaos run did and found.
#[derive(Debug, Default, serde::Serialize)]
pub struct ChaosReport {
    pub minutes: f64,
    pub operations: u64,
    pub users_acknowledged: u64,
    pub kills: u64,
    pub kill_refusals: u64,
    pub faults: Vec<String>,
    pub eventra_starts: u32,
    pub retried_attempts: u64,
    pub invariants: harness::Invariants,
    pub settle_seconds: f64,
}

/// The workers of a `/debug/actors` tree (supervisors and the root are left alone:
/// their children's restarts already test them, and intensity decides the rest).
fn workers(node: &Value, out: &mut Vec<String>) {
    if node["kind"] == "worker" {
        if let Some(n) = node["name"].as_str() {
            out.push(n.to_owned());
        }
    }
    for c in node["children"].as_array().into_iter().flatten() {
        workers(c, out);
    }
}

pub async fn run(args: ChaosArgs) -> Result<ChaosReport, String> {
    if !harness::Harness::available() {
        return Err("eventra chaos needs redis-server, PostgreSQL's server binaries (initdb, pg_ctl) and RabbitMQ (rabbitmq-server, rabbitmqctl) on this machine".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    eprintln!("starting private Redis, PostgreSQL and RabbitMQ…");
    let mut h = harness::Harness::start(&exe, &[("EVENTRA_JOB_LEASE_MS", "5000")]).await?;
    h.start_eventra().await?;
    eprintln!("eventra up at {}; attacking for {} minutes", h.base, args.minutes);
    let mut report = ChaosReport { minutes: args.minutes, ..ChaosReport::default() };
    let load = harness::Load::start(std::slice::from_ref(&h.base), &h.token, args.tenants, args.rate).await?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let mut next_kill = Instant::now();
    let mut next_fault = Instant::now() + Duration::from_secs(args.fault_every_secs.max(1));
    let mut rng = rand::rng();
    let mut names: Vec<String> = Vec::new();
    let mut names_at = Instant::now() - Duration::from_secs(10);
    let stopping = Arc::new(AtomicBool::new(false));
    while Instant::now() < until {
        if let Some(status) = h.exited() {
            eprintln!("eventra exited ({status}); starting it again, as an orchestrator would");
            report.faults.push(format!("eventra exited by itself ({status})"));
            h.start_eventra().await?;
        }
        if args.kill_every_ms > 0 && Instant::now() >= next_kill {
            next_kill = Instant::now() + Duration::from_millis(args.kill_every_ms);
            if names_at.elapsed() > Duration::from_secs(1) {
                if let Ok(r) = client.get(format!("{}/debug/actors", h.base)).bearer_auth(&h.token).send().await {
                    if let Ok(tree) = r.json::<Value>().await {
                        names.clear();
                        workers(&tree, &mut names);
                        names_at = Instant::now();
                    }
                }
            }
            if !names.is_empty() {
                let name = names[rng.random_range(0..names.len())].clone();
                match client.post(format!("{}/debug/actors/{name}/kill", h.base)).bearer_auth(&h.token).send().await {
                    Ok(r) if r.status().as_u16() == 202 => report.kills += 1,
                    _ => report.kill_refusals += 1,
                }
            }
        }
        if args.fault_every_secs > 0 && Instant::now() >= next_fault {
            next_fault = Instant::now() + Duration::from_secs(args.fault_every_secs);
            let fault = match rng.random_range(0..4) {
                0 => {
                    h.redis.kill();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    h.redis.start_again()?;
                    "Redis SIGKILL, down 3 s, started again"
                }
                1 => {
                    h.rabbit.stop_app()?;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    h.rabbit.start_app()?;
                    "RabbitMQ stop_app, down 3 s, start_app"
                }
                2 => {
                    h.postgres.restart()?;
                    "PostgreSQL restart"
                }
                _ => {
                    h.kill_eventra();
                    h.start_eventra().await?;
                    "Eventra SIGKILL, started again on the same data"
                }
            };
            eprintln!("fault: {fault}");
            report.faults.push(fault.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stopping.store(true, Ordering::SeqCst);
    report.operations = load.started();
    eprintln!("attack over; letting the last writes finish and the pipeline settle…");
    let load = load.stop(Duration::from_secs(120)).await;
    if let Some(status) = h.exited() {
        report.faults.push(format!("eventra exited by itself ({status})"));
        h.start_eventra().await?;
    }
    let settle_started = Instant::now();
    harness::settle(&h.target(), Duration::from_secs(300)).await?;
    report.settle_seconds = settle_started.elapsed().as_secs_f64();
    report.users_acknowledged = load.created.len() as u64;
    report.retried_attempts = load.retried_attempts;
    report.invariants = harness::check(&h.target(), &load).await?;
    report.eventra_starts = h.starts;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| e.to_string())?;
    }
    let _ = h.terminate_eventra(Duration::from_secs(30)).await;
    Ok(report)
}

/// The report as Markdown.
pub fn summary(r: &ChaosReport) -> String {
    let i = &r.invariants;
    let mut out = format!(
        "| figure | value |\n|---|---:|\n\
         | minutes under attack | {:.1} |\n| operations offered | {} |\n| users the API acknowledged | {} |\n\
         | actors killed | {} |\n| dependency restarts | {} |\n| Eventra starts | {} |\n| retried attempts | {} |\n\
         | events | {} |\n| users created / left | {} / {} |\n| settle time after the attack | {:.1} s |\n\
         | **acknowledged but missing** | **{}** |\n| **events without audit entry** | **{}** |\n\
         | **welcome emails missing** | **{}** |\n| welcome emails resent after an Eventra kill (same Message-ID) | {} |\n\
         | **search index wrong** | **{}** |\n| **events in the DLQ** | **{}** |\n| **dead jobs** | **{}** |\n\
         | **cross-tenant reads answered** | **{}** |\n",
        r.minutes,
        r.operations,
        r.users_acknowledged,
        r.kills,
        r.faults.len(),
        r.eventra_starts,
        r.retried_attempts,
        i.events,
        i.users_created,
        i.users_now,
        r.settle_seconds,
        i.acknowledged_but_missing,
        i.audit_missing,
        i.emails_missing,
        i.emails_resent,
        i.index_wrong,
        i.parked,
        i.dead_jobs,
        i.cross_tenant_leaks
    );
    out.push_str(&format!("\nInvariants {}.\n", if i.hold() { "hold" } else { "VIOLATED" }));
    out
}
