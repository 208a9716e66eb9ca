//! `eventra bench jobs`: no-op jobs per second through Eventra's Redis queue and worker
//! actors, beside, on the same Redis in the same invocation:
//! - raw Redis: `LPUSH` the same number of small payloads, then the same number of
//!   concurrent clients `RPOP` them until empty (the floor of any Redis-list queue);
//! - Sidekiq (Debian's `ruby-sidekiq`), pushing with `push_bulk` and draining with a
//!   `sidekiq` process of the same concurrency.
//!
//! How each drain is timed:
//! - Eventra: from starting the `jobs` subtree (real `job-worker-N` actors) until every
//!   job is acked (`done`).
//! - Sidekiq: from the first job leaving its queue (Ruby's boot excluded) until the
//!   queue is empty (at most `concurrency` jobs are still finishing then, which can
//!   only flatter Sidekiq).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures_util::StreamExt;

use crate::jobs::{JobClient, JobQueue, JobState, Kinds, NewJob, QueueConfig, RedisJobQueue, Runner, RunnerConfig};
use crate::supervision::root::{jobs_spec, JobsDeps};
use crate::supervision::{Supervisor, Tree};

#[derive(Debug, Clone, clap::Args)]
pub struct JobsBenchArgs {
    /// Redis to run on (keys go under a fresh `eventra-bench-…` namespace, deleted after).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// No-op jobs per engine.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Worker actors (Eventra), Sidekiq concurrency and raw-Redis clients.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Concurrent enqueues (Eventra).
    #[arg(long, default_value_t = 32)]
    pub enqueue_concurrency: usize,
    /// Most jobs an Eventra worker leases at once (`EVENTRA_JOB_BATCH`; 1 = one by one).
    #[arg(long, default_value_t = 25)]
    pub batch: u32,
    /// Skip Sidekiq (e.g. where Ruby is not installed).
    #[arg(long)]
    pub no_sidekiq: bool,
}

/// One engine's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub engine: String,
    pub enqueue_per_s: Option<f64>,
    pub drain_per_s: f64,
    pub drain: Duration,
    /// Redis server CPU seconds used while draining, per 10,000 jobs.
    pub redis_cpu_per_10k: f64,
}

type BenchResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub async fn run(args: JobsBenchArgs) -> BenchResult<Vec<Row>> {
    let mut rows = vec![eventra(&args).await?, raw_redis(&args).await?];
    if !args.no_sidekiq {
        rows.push(sidekiq(&args).await?);
    }
    Ok(rows)
}

async fn client(url: &str) -> BenchResult<Client> {
    let client = Builder::from_config(Config::from_url(url).map_err(err)?).build().map_err(err)?;
    client.init().await.map_err(err)?;
    Ok(client)
}

/// The Redis server's CPU seconds so far (`INFO cpu`: user + sys).
async fn redis_cpu(client: &Client) -> BenchResult<f64> {
    let cmd = fred::types::CustomCommand::new_static("INFO", None, false);
    let info: String = client.custom(cmd, vec!["cpu".to_owned()]).await.map_err(err)?;
    Ok(info
        .lines()
        .filter_map(|l| l.strip_prefix("used_cpu_sys:").or_else(|| l.strip_prefix("used_cpu_user:")))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

fn per_10k(cpu: f64, jobs: usize) -> f64 {
    cpu * 10_000.0 / jobs.max(1) as f64
}

async fn delete_keys(client: &Client, pattern: &str) -> BenchResult<()> {
    let script =
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) n = n + 1 end return n";
    let _: i64 = client.eval(script, Vec::<String>::new(), vec![pattern.to_owned()]).await.map_err(err)?;
    Ok(())
}

async fn eventra(args: &JobsBenchArgs) -> BenchResult<Row> {
    let ns = format!("eventra-bench-{}", uuid::Uuid::now_v7().simple());
    let queue: Arc<dyn JobQueue> =
        Arc::new(RedisJobQueue::connect(&args.redis_url, &ns, QueueConfig::default()).await.map_err(err)?);
    let kinds = Kinds::default().with(Arc::new(crate::jobs::kinds::Noop));
    let jobs = JobClient::new(queue.clone(), &kinds);

    let started = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..args.jobs)
        .map(|i| {
            let jobs = jobs.clone();
            async move { jobs.enqueue(NewJob::new("noop", format!("bench:{i}"), serde_json::json!({ "i": i }))).await }
        })
        .buffer_unordered(args.enqueue_concurrency.max(1))
        .collect()
        .await;
    let enqueue = started.elapsed();
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(format!("enqueue: {e}"));
    }

    let runner = Arc::new(Runner::new(jobs, kinds, {
        RunnerConfig {
            idle_poll: Duration::from_millis(50),
            batch: args.batch,
            workers: u32::try_from(args.concurrency).unwrap_or(u32::MAX),
            ..RunnerConfig::default()
        }
    }));
    let deps = JobsDeps {
        runner,
        workers: args.concurrency,
        webhook_runner: None,
        webhook_workers: 0,
        scheduler_every: Duration::from_secs(1),
        process: "bench".into(),
    };
    let probe = client(&args.redis_url).await?;
    let cpu0 = redis_cpu(&probe).await?;
    let started = Instant::now();
    let (sup, _) = Supervisor::start(jobs_spec(&deps), Tree::new(), None).await.map_err(err)?;
    let target = args.jobs as u64;
    loop {
        if queue.count(JobState::Done).await.map_err(err)? >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = started.elapsed();
    let cpu = redis_cpu(&probe).await? - cpu0;
    let _ = sup.stop_and_wait(None, Some(Duration::from_secs(10))).await;
    delete_keys(&probe, &format!("{ns}:*")).await?;
    Ok(Row {
        engine: format!("Eventra (Redis queue, {} worker actors, batch {})", args.concurrency, args.batch),
        enqueue_per_s: Some(args.jobs as f64 / enqueue.as_secs_f64()),
        drain_per_s: args.jobs as f64 / drain.as_secs_f64(),
        drain,
        redis_cpu_per_10k: per_10k(cpu, args.jobs),
    })
}

async fn raw_redis(args: &JobsBenchArgs) -> BenchResult<Row> {
    let key = format!("eventra-bench-raw-{}", uuid::Uuid::now_v7().simple());
    let c = client(&args.redis_url).await?;
    let payload = serde_json::json!({ "kind": "noop", "args": {} }).to_string();
    let started = Instant::now();
    let pushes: Vec<Result<i64, _>> = futures_util::stream::iter(0..args.jobs)
        .map(|_| c.lpush::<i64, _, _>(&key, payload.clone()))
        .buffer_unordered(args.enqueue_concurrency.max(1))
        .collect()
        .await;
    let enqueue = started.elapsed();
    if let Some(e) = pushes.into_iter().find_map(Result::err) {
        return Err(format!("LPUSH: {e}"));
    }
    let cpu0 = redis_cpu(&c).await?;
    let started = Instant::now();
    let consumers = (0..args.concurrency.max(1)).map(|_| {
        let (c, key) = (c.clone(), key.clone());
        async move {
            loop {
                let item: Option<String> = c.rpop(&key, None).await?;
                if item.is_none() {
                    return Ok::<(), fred::error::Error>(());
                }
            }
        }
    });
    for r in futures_util::future::join_all(consumers).await {
        r.map_err(err)?;
    }
    let drain = started.elapsed();
    let cpu = redis_cpu(&c).await? - cpu0;
    let _: i64 = c.del(&key).await.map_err(err)?;
    Ok(Row {
        engine: format!("raw Redis (LPUSH, then RPOP by {} clients)", args.concurrency),
        enqueue_per_s: Some(args.jobs as f64 / enqueue.as_secs_f64()),
        drain_per_s: args.jobs as f64 / drain.as_secs_f64(),
        drain,
        redis_cpu_per_10k: per_10k(cpu, args.jobs),
    })
}

const SIDEKIQ_WORKER: &str = r#"
require "sidekiq"
class NoopJob
  include Sidekiq::Worker
  def perform(i); end
end
"#;

const SIDEKIQ_PUSH: &str = r#"
require "sidekiq"
require_relative "noop_job"
n, queue = ARGV[0].to_i, ARGV[1]
t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
(0...n).each_slice(1000) do |slice|
  Sidekiq::Client.push_bulk("class" => NoopJob, "queue" => queue, "args" => slice.map { |i| [i] })
end
puts Process.clock_gettime(Process::CLOCK_MONOTONIC) - t
"#;

async fn sidekiq(args: &JobsBenchArgs) -> BenchResult<Row> {
    let dir = tempfile_dir()?;
    std::fs::write(dir.join("noop_job.rb"), SIDEKIQ_WORKER).map_err(err)?;
    std::fs::write(dir.join("push.rb"), SIDEKIQ_PUSH).map_err(err)?;
    let queue = format!("eventra-bench-sidekiq-{}", uuid::Uuid::now_v7().simple());
    let push = tokio::process::Command::new("ruby")
        .arg(dir.join("push.rb"))
        .arg(args.jobs.to_string())
        .arg(&queue)
        .env("REDIS_URL", &args.redis_url)
        .output()
        .await
        .map_err(|e| format!("ruby (install Debian's ruby-sidekiq): {e}"))?;
    if !push.status.success() {
        return Err(format!("Sidekiq push failed: {}", String::from_utf8_lossy(&push.stderr)));
    }
    let push_secs: f64 = String::from_utf8_lossy(&push.stdout).trim().parse().map_err(err)?;

    let c = client(&args.redis_url).await?;
    let key = format!("queue:{queue}");
    let mut child = tokio::process::Command::new("sidekiq")
        .arg("-r")
        .arg(dir.join("noop_job.rb"))
        .arg("-c")
        .arg(args.concurrency.to_string())
        .arg("-q")
        .arg(&queue)
        .env("REDIS_URL", &args.redis_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("sidekiq: {e}"))?;
    let total = args.jobs as i64;
    let mut cpu0 = redis_cpu(&c).await?;
    let boot_deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        let len: i64 = c.llen(&key).await.map_err(err)?;
        if len < total {
            break Instant::now();
        }
        cpu0 = redis_cpu(&c).await?;
        if Instant::now() > boot_deadline {
            return Err("Sidekiq did not start taking jobs within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    loop {
        let len: i64 = c.llen(&key).await.map_err(err)?;
        if len == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain = started.elapsed();
    let cpu = redis_cpu(&c).await? - cpu0;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _: i64 = c.del(&key).await.map_err(err)?;
    let _: i64 = c.srem("queues", &queue).await.map_err(err)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Row {
        engine: format!("Sidekiq {} (concurrency {})", sidekiq_version().await, args.concurrency),
        enqueue_per_s: Some(args.jobs as f64 / push_secs),
        drain_per_s: args.jobs as f64 / drain.as_secs_f64(),
        drain,
        redis_cpu_per_10k: per_10k(cpu, args.jobs),
    })
}

async fn sidekiq_version() -> String {
    let out = tokio::process::Command::new("ruby")
        .args(["-e", "require 'sidekiq'; print Sidekiq::VERSION"])
        .output()
        .await
        .ok()
        .filter(|o| o.status.success());
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_else(|| "?".into())
}

fn tempfile_dir() -> BenchResult<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("eventra-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).map_err(err)?;
    Ok(dir)
}

/// The rows as a Markdown table, with each engine's drain rate relative to Eventra's.
pub fn table(rows: &[Row]) -> String {
    let base = rows.first().map(|r| r.drain_per_s).unwrap_or(1.0);
    let mut out = String::from(
        "| engine | enqueue (jobs/s) | run (jobs/s) | drain time | Redis CPU s / 10k jobs | Eventra ÷ engine |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} s | {:.3} | {:.1}× |\n",
            r.engine,
            r.enqueue_per_s.map_or("–".into(), |e| format!("{e:.0}")),
            r.drain_per_s,
            r.drain.as_secs_f64(),
            r.redis_cpu_per_10k,
            base / r.drain_per_s,
        ));
    }
    out
}
