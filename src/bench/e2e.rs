//! `eventra bench e2e`: does the pipeline keep pace with the API? Times what a user
//! waits for: from the commit of a change to the last of its effects done (welcome
//! email sent, audit entry and search entry written, each job acknowledged).
//!
//! - **Load** (default): a real `eventra serve` (this binary, a child process, all
//!   roles, on the chosen stack) takes creates through its HTTP API. First its maximum
//!   API rate is measured (closed loop, `--concurrency` clients, `--seconds`), then
//!   creates are offered open-loop at each of `--rates` percent of that maximum for
//!   `--seconds`. Reported per rate: commits/s and effects completed/s (both counted
//!   over the same window, from 5 s into the load to its end), the backlog at the end of the
//!   load (events not fully done), and commit → last effect p50/p95/p99. Commit time is
//!   the user's `created_at` (stamped in the writing transaction); an effect is done
//!   when its job was acknowledged (`finished_at`, Redis's or SQLite's clock, same host).
//! - **Drain** (`--drain N`): N events are put in the outbox by an `api`-only process,
//!   which then stops; a process with the pipeline roles only (`relay,consumer,worker,
//!   indexer`) is started and timed until every effect of every event is done: the
//!   pipeline's own ceiling.
//! - **Raw engines**, in the same run, doing the same work: on services, pgbench
//!   inserting the same user + outbox rows (one transaction each), lapin publishing the
//!   same events with confirms and consuming them, Redis pushing and popping the same
//!   job payloads; embedded, SQLite inserting the same rows one transaction each and
//!   tantivy indexing the same users.
//!
//! With `--split` (services stack) the roles run as separate processes, as a scaled-out
//! deployment does: `api`, `relay`, `consumer`, `worker` and `indexer` each in its own
//! (in drain mode the four pipeline ones). The report then says where the time went:
//! each process's CPU seconds and memory.
//!
//! The server's resident memory (VmRSS, and its peak VmHWM) is read from `/proc` after
//! the runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::json;
use uuid::Uuid;

pub use super::harness::Stack;
use super::harness::{
    cpu_between, engines_cpu, err, new_tenant, raw_pgbench, raw_sqlite_inserts, sample_rows, BenchResult, Run, Server,
    ServiceUrls, Tenant,
};
use crate::jobs::{JobQueue, JobState, QueueConfig};
use crate::store::Store;

#[derive(Debug, Clone, clap::Args)]
pub struct E2eBenchArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub stack: Stack,
    #[command(flatten)]
    pub urls: ServiceUrls,
    /// Send the welcome emails to this SMTP server instead of `.eml` files.
    #[arg(long)]
    pub smtp_url: Option<String>,
    /// Send the welcome emails over SMTP to a sink this command runs (it accepts and
    /// counts every message), instead of `.eml` files.
    #[arg(long, conflicts_with = "smtp_url")]
    pub smtp_sink: bool,
    /// Seconds of load per run (and of the maximum-rate measurement).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Offered rates, in percent of the measured maximum API rate.
    #[arg(long, value_delimiter = ',', default_value = "25,50,75,100")]
    pub rates: Vec<u32>,
    /// Clients of the maximum-rate measurement.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Drain mode: pre-fill the outbox with this many events, then time the pipeline.
    #[arg(long)]
    pub drain: Option<usize>,
    /// Leave out the raw-engine baselines.
    #[arg(long)]
    pub no_raw: bool,
    /// Run each role in a process of its own (services stack only).
    #[arg(long)]
    pub split: bool,
}

/// The pipeline's roles, one process each with `--split`.
const PIPELINE_ROLES: [&str; 4] = ["relay", "consumer", "worker", "indexer"];

/// One load run's figures.
#[derive(Debug, Clone)]
pub struct LoadRow {
    pub label: String,
    pub offered: f64,
    pub commits_per_s: f64,
    pub effects_per_s: f64,
    /// Events whose effects were not all done when the load stopped.
    pub backlog_events: usize,
    /// The same, in seconds of work at the commit rate.
    pub backlog_secs: f64,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub failed_requests: usize,
}

/// What a run reports: load rows, raw-engine rows, a drain row, memory.
#[derive(Debug, Default)]
pub struct Report {
    pub stack: String,
    pub load: Vec<LoadRow>,
    /// Events, and the time from the process serving (and from its exec) to the last
    /// effect done.
    pub drain: Option<Drained>,
    pub raw: Vec<(String, f64, String)>,
    pub rss_kb: Option<(u64, u64)>,
    pub usage: Usage,
}

/// Where the time went: each Eventra process (its roles, CPU seconds, resident MB) and
/// the engines' CPU seconds over the same runs (the drain: from the pipeline's start).
#[derive(Debug, Default)]
pub struct Usage {
    pub processes: Vec<(String, f64, f64)>,
    pub engines: Vec<(String, f64)>,
}

pub async fn run(mut args: E2eBenchArgs) -> BenchResult<Report> {
    let sink = if args.smtp_sink { Some(crate::chaos::services::SmtpSink::start().await?) } else { None };
    if let Some(s) = &sink {
        args.smtp_url = Some(s.url());
    }
    if args.split && args.stack != Stack::Services {
        return Err(
            "--split needs --stack services: the embedded stack's database, bus and queue are one process's".into()
        );
    }
    let mail = if args.smtp_url.is_some() { "SMTP" } else { ".eml files" };
    let layout = if args.split { "one process per role" } else { "one process" };
    let mut report =
        Report { stack: format!("{:?}, mail to {mail}, {layout}", args.stack).to_lowercase(), ..Report::default() };
    let bench = Bench::new(&args)?;
    if let Some(n) = args.drain {
        report.drain = Some(bench.drain(n, &mut report.usage).await?);
    } else {
        report.load = bench.load(&mut report.rss_kb, &mut report.usage).await?;
    }
    if !args.no_raw {
        let n = args.drain.unwrap_or(20_000);
        report.raw = match args.stack {
            Stack::Services => raw_services(&args, n).await?,
            Stack::Embedded => raw_embedded(&bench.run.dir, n).await?,
        };
    }
    Ok(report)
}

/// A run and its arguments.
struct Bench {
    args: E2eBenchArgs,
    run: Run,
}

impl Bench {
    fn new(args: &E2eBenchArgs) -> BenchResult<Self> {
        let urls = args.urls.clone();
        Ok(Bench { args: args.clone(), run: Run::new(args.stack, urls, args.smtp_url.clone())? })
    }

    async fn queue(&self) -> BenchResult<Arc<dyn JobQueue>> {
        Ok(match self.args.stack {
            Stack::Services => Arc::new(
                crate::jobs::RedisJobQueue::connect(&self.args.urls.redis_url, &self.run.ns, QueueConfig::default())
                    .await
                    .map_err(err)?,
            ),
            Stack::Embedded => {
                let s = crate::store::SqliteStore::connect(&self.run.database_url(), 2).await.map_err(err)?;
                Arc::new(crate::jobs::SqliteJobQueue::new(s.pools(), QueueConfig::default()))
            }
        })
    }

    /// The processes of the pipeline (with `extra` first): one with every role, or one
    /// per role.
    fn spawn_pipeline(&self, extra: Option<&str>) -> BenchResult<Vec<Server>> {
        if self.args.split {
            extra.into_iter().chain(PIPELINE_ROLES).map(|roles| self.run.spawn(roles, &[])).collect()
        } else {
            let roles: Vec<&str> = extra.into_iter().chain(PIPELINE_ROLES).collect();
            Ok(vec![self.run.spawn(&roles.join(","), &[])?])
        }
    }

    async fn load(&self, rss: &mut Option<(u64, u64)>, usage: &mut Usage) -> BenchResult<Vec<LoadRow>> {
        self.run.prepare().await?;
        let result = self.load_runs(rss, usage).await;
        self.run.cleanup().await;
        result
    }

    async fn load_runs(&self, rss: &mut Option<(u64, u64)>, usage: &mut Usage) -> BenchResult<Vec<LoadRow>> {
        let before = engines_cpu();
        let servers = self.spawn_pipeline(Some("api"))?;
        let server = servers.first().ok_or("no API process")?;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
        let store = self.run.store().await?;
        let queue = self.queue().await?;
        let secs = self.args.seconds.max(1);

        // The maximum API rate, closed loop.
        let tenant = new_tenant(&client, &server.base, &self.run.token, "max").await?;
        let created =
            closed_loop(&client, &server.base, &tenant, self.args.concurrency, Duration::from_secs(secs)).await;
        let max_rate = created.len() as f64 / secs as f64;
        eprintln!("maximum API rate: {max_rate:.0} creates/s ({} users in {secs} s)", created.len());
        wait_idle(&*store, &*queue, &tenant, created.len()).await?;

        let mut rows = Vec::new();
        for pct in &self.args.rates {
            let rate = max_rate * f64::from(*pct) / 100.0;
            let tenant = new_tenant(&client, &server.base, &self.run.token, &format!("r{pct}")).await?;
            eprintln!("{pct} %: offering {rate:.0} creates/s for {secs} s");
            let (done, failed, load_end) =
                open_loop(&client, &server.base, &tenant, rate, Duration::from_secs(secs)).await;
            let effects = settled_effect_times(&*store, &*queue, &tenant, &done, None).await?;
            rows.push(summarise(format!("{pct} % of max"), rate, &done, &effects, failed, load_end));
        }
        *rss = server.rss_kb();
        usage.processes.extend(servers.iter().map(Server::usage));
        usage.engines = cpu_between(&before, &engines_cpu());
        for s in servers {
            s.stop()?;
        }
        Ok(rows)
    }

    async fn drain(&self, n: usize, usage: &mut Usage) -> BenchResult<Drained> {
        self.run.prepare().await?;
        let result = self.drain_run(n, usage).await;
        self.run.cleanup().await;
        result
    }

    async fn drain_run(&self, n: usize, usage: &mut Usage) -> BenchResult<Drained> {
        let api = self.run.spawn("api", &[])?;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
        let tenant = new_tenant(&client, &api.base, &self.run.token, "drain").await?;
        eprintln!("filling the outbox with {n} events through an api-only process…");
        let created = fill(&client, &api.base, &tenant, n, self.args.concurrency).await?;
        api.stop()?;
        let store = self.run.store().await?;
        let queue = self.queue().await?;
        eprintln!("starting the pipeline roles on a full outbox…");
        let spawned_at = Utc::now();
        let before = engines_cpu();
        let pipeline = self.spawn_pipeline(None)?;
        // The clock starts when the processes serve (their trees are up), not at exec:
        // what is timed is the pipeline, not a process start.
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in &pipeline {
            while client
                .get(format!("{}/health/live", p.base))
                .send()
                .await
                .map(|r| !r.status().is_success())
                .unwrap_or(true)
            {
                if Instant::now() > deadline {
                    return Err(format!("the {} process did not come up", p.roles));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let ready_at = Utc::now();
        let mut stages = Stages::default();
        let effects = settled_effect_times(&*store, &*queue, &tenant, &created, Some(&mut stages)).await?;
        let last = effects.values().copied().max().unwrap_or(ready_at);
        let since_ready = |t: DateTime<Utc>| (t - ready_at).to_std().unwrap_or_default();
        let published = store
            .outbox_after(0, u32::MAX)
            .await
            .map_err(err)?
            .into_iter()
            .filter(|r| r.tenant_id == tenant.id)
            .filter_map(|r| r.published_at)
            .max()
            .unwrap_or(ready_at);
        let drained = Drained {
            events: n,
            from_ready: since_ready(last),
            from_exec: (last - spawned_at).to_std().unwrap_or_default(),
            published: since_ready(published),
            enqueued: since_ready(stages.enqueued),
            done: stages.done.iter().map(|(k, t)| (k.clone(), since_ready(*t))).collect(),
        };
        eprintln!(
            "drain: {:.1} s from ready, {:.1} s from exec",
            drained.from_ready.as_secs_f64(),
            drained.from_exec.as_secs_f64()
        );
        usage.processes.extend(pipeline.iter().map(Server::usage));
        usage.engines = cpu_between(&before, &engines_cpu());
        for p in pipeline {
            p.stop()?;
        }
        Ok(drained)
    }
}

/// A drain run's figures: its length, and when each stage finished its last event
/// (from the moment the pipeline process served).
#[derive(Debug, Clone)]
pub struct Drained {
    pub events: usize,
    pub from_ready: Duration,
    pub from_exec: Duration,
    /// The relay's last publish (its last outbox row marked published).
    pub published: Duration,
    /// The consumers' last enqueue.
    pub enqueued: Duration,
    /// Per job kind, its last job done.
    pub done: Vec<(String, Duration)>,
}

/// The latest enqueue and, per kind, the latest finish of the jobs looked at.
#[derive(Debug, Default)]
struct Stages {
    enqueued: DateTime<Utc>,
    done: Vec<(String, DateTime<Utc>)>,
}

impl Stages {
    fn saw(&mut self, job: &crate::jobs::Job, done: DateTime<Utc>) {
        self.enqueued = self.enqueued.max(job.enqueued_at);
        match self.done.iter_mut().find(|(k, _)| *k == job.kind) {
            Some((_, t)) => *t = (*t).max(done),
            None => self.done.push((job.kind.clone(), done)),
        }
    }
}

/// A created user: its id and commit time.
#[derive(Debug, Clone)]
struct Created {
    user: Uuid,
    at: DateTime<Utc>,
}

/// One create; `None` when it did not answer 201.
async fn create(client: &reqwest::Client, base: &str, t: &Tenant, i: usize) -> Option<Created> {
    let res = client
        .post(format!("{base}/v1/tenants/{}/users", t.id))
        .bearer_auth(&t.key)
        .json(&json!({"email": format!("u{i}@bench.example"), "name": format!("Bench User {i}")}))
        .send()
        .await
        .ok()?;
    if res.status() != reqwest::StatusCode::CREATED {
        return None;
    }
    let user: serde_json::Value = res.json().await.ok()?;
    Some(Created { user: user["id"].as_str()?.parse().ok()?, at: user["created_at"].as_str()?.parse().ok()? })
}

/// `concurrency` clients creating users back to back for `time`.
async fn closed_loop(
    client: &reqwest::Client,
    base: &str,
    t: &Tenant,
    concurrency: usize,
    time: Duration,
) -> Vec<Created> {
    let until = Instant::now() + time;
    let next = Arc::new(AtomicUsize::new(0));
    let workers = (0..concurrency.max(1)).map(|_| {
        let (client, base, t, next) = (client.clone(), base.to_owned(), t.clone(), next.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                let i = next.fetch_add(1, Ordering::Relaxed);
                out.extend(create(&client, &base, &t, i).await);
            }
            out
        })
    });
    let mut all = Vec::new();
    for w in futures_util::future::join_all(workers).await {
        all.extend(w.unwrap_or_default());
    }
    all
}

/// Creates offered at `rate` per second for `time`, each started at its own time
/// whether or not earlier ones have answered (open loop). Returns the created users,
/// the failures, and when the load ended.
async fn open_loop(
    client: &reqwest::Client,
    base: &str,
    t: &Tenant,
    rate: f64,
    time: Duration,
) -> (Vec<Created>, usize, DateTime<Utc>) {
    let total = (rate * time.as_secs_f64()).round() as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate.max(0.001))).await;
        let (client, base, t) = (client.clone(), base.to_owned(), t.clone());
        tasks.push(tokio::spawn(async move { create(&client, &base, &t, i).await }));
    }
    let mut created = Vec::with_capacity(total);
    let mut failed = 0;
    for task in tasks {
        match task.await.ok().flatten() {
            Some(c) => created.push(c),
            None => failed += 1,
        }
    }
    (created, failed, Utc::now())
}

/// `n` users created as fast as `concurrency` clients can.
async fn fill(
    client: &reqwest::Client,
    base: &str,
    t: &Tenant,
    n: usize,
    concurrency: usize,
) -> BenchResult<Vec<Created>> {
    let created: Vec<Option<Created>> = futures_util::stream::iter(0..n)
        .map(|i| create(client, base, t, i))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let ok: Vec<Created> = created.into_iter().flatten().collect();
    if ok.len() != n {
        return Err(format!("{} of {n} creates failed", n - ok.len()));
    }
    Ok(ok)
}

/// Waits until every event of the tenant has its audit entry and the job queue is idle.
async fn wait_idle(store: &dyn Store, queue: &dyn JobQueue, t: &Tenant, users: usize) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        // The observer must not load what it observes: the queue's counters are cheap,
        // the audit count (an index scan of the tenant's entries) runs only once the
        // queue looks idle.
        let mut busy = 0;
        for state in [JobState::Ready, JobState::Running, JobState::Scheduled, JobState::Retry] {
            busy += queue.count(state).await.map_err(err)?;
        }
        let audited = if busy == 0 { store.count_audit(t.id).await.map_err(err)? } else { 0 };
        if audited > users as u64 && busy == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("effects not done after 30 min ({busy} jobs still to run)"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`wait_idle`], then [`effect_times`]. The queue can look idle, every audit entry
/// written, in the moment between a consumer's audit write and its enqueue of that
/// batch's jobs: then a job is missing or not done yet, and both are asked again.
async fn settled_effect_times(
    store: &dyn Store,
    queue: &dyn JobQueue,
    t: &Tenant,
    created: &[Created],
    mut stages: Option<&mut Stages>,
) -> BenchResult<HashMap<Uuid, DateTime<Utc>>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        wait_idle(store, queue, t, created.len()).await?;
        match effect_times(store, queue, t, created, stages.as_deref_mut()).await {
            Ok(times) => return Ok(times),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Per user: when the last of its effects (welcome email, search entry) was done, by
/// its job's acknowledgement. Its audit entry is earlier: the consumer writes it before
/// it enqueues the event's jobs (and [`wait_idle`] checks that every event has
/// one, and that the batch jobs indexing them are done).
async fn effect_times(
    store: &dyn Store,
    queue: &dyn JobQueue,
    t: &Tenant,
    created: &[Created],
    mut stages: Option<&mut Stages>,
) -> BenchResult<HashMap<Uuid, DateTime<Utc>>> {
    let events: HashMap<String, Uuid> = store
        .outbox_after(0, u32::MAX)
        .await
        .map_err(err)?
        .into_iter()
        .filter(|r| r.tenant_id == t.id && r.event.event_type == crate::domain::EventType::UserCreated)
        .map(|r| (r.event.subject.clone(), r.event.id))
        .collect();
    let lookups = futures_util::stream::iter(created.iter().cloned())
        .map(|c| {
            let event = events.get(&c.user.to_string()).copied();
            async move {
                event.ok_or_else(|| format!("no user.created event for {}", c.user))?;
                let mut last: Option<DateTime<Utc>> = None;
                let mut jobs = Vec::with_capacity(2);
                for key in [format!("index_user:{}:1", c.user), format!("welcome_email:{}", c.user)] {
                    let job = queue.find_by_key(&key).await.map_err(err)?.ok_or_else(|| format!("no job {key}"))?;
                    let done = job
                        .finished_at
                        .filter(|_| job.state == JobState::Done)
                        .ok_or_else(|| format!("{key} is {:?}", job.state))?;
                    last = Some(last.map_or(done, |l| l.max(done)));
                    jobs.push((job, done));
                }
                Ok::<_, String>((c.user, last.unwrap_or(c.at), jobs))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut times = HashMap::with_capacity(lookups.len());
    for lookup in lookups {
        let (user, last, jobs) = lookup?;
        if let Some(stages) = stages.as_deref_mut() {
            for (job, done) in &jobs {
                stages.saw(job, *done);
            }
        }
        times.insert(user, last);
    }
    Ok(times)
}

fn percentiles(mut lat: Vec<Duration>) -> (Duration, Duration, Duration) {
    lat.sort();
    let at = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    (at(0.50), at(0.95), at(0.99))
}

fn summarise(
    label: String,
    offered: f64,
    created: &[Created],
    effects: &HashMap<Uuid, DateTime<Utc>>,
    failed: usize,
    load_end: DateTime<Utc>,
) -> LoadRow {
    let first = created.iter().map(|c| c.at).min().unwrap_or(load_end);
    let secs = |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).to_std().unwrap_or_default().as_secs_f64().max(1e-3);
    // Rates over the steady part of the load: from 5 s in (the pipeline has filled) to
    // the end of the load; commits and completed effects counted in the same window.
    let from = first + chrono::Duration::seconds(5).min(load_end - first);
    let in_window = |t: &DateTime<Utc>| *t >= from && *t <= load_end;
    let commits_per_s = created.iter().filter(|c| in_window(&c.at)).count() as f64 / secs(from, load_end);
    let effects_per_s = effects.values().filter(|t| in_window(t)).count() as f64 / secs(from, load_end);
    let backlog_events = effects.values().filter(|t| **t > load_end).count();
    let latencies: Vec<Duration> =
        created.iter().filter_map(|c| effects.get(&c.user).map(|e| (*e - c.at).to_std().unwrap_or_default())).collect();
    let (p50, p95, p99) = percentiles(latencies);
    LoadRow {
        label,
        offered,
        commits_per_s,
        effects_per_s,
        backlog_events,
        backlog_secs: backlog_events as f64 / commits_per_s.max(1e-3),
        p50,
        p95,
        p99,
        failed_requests: failed,
    }
}

// ---- raw engines -----------------------------------------------------------------

/// A user row and its outbox row as Eventra writes them (the same JSON).
async fn raw_services(args: &E2eBenchArgs, n: usize) -> BenchResult<Vec<(String, f64, String)>> {
    let mut rows = Vec::new();
    rows.push(raw_pgbench(&args.urls.database_url, 16, 10).await?);
    let events: Vec<(String, Vec<u8>)> = sample_rows(n)
        .into_iter()
        .map(|(_, e)| Ok((e.id.to_string(), serde_json::to_vec(&e).map_err(err)?)))
        .collect::<BenchResult<_>>()?;
    rows.push(super::raw::lapin_publish_consume(&args.urls.amqp_url, &events).await?);
    let jobs: Vec<Vec<u8>> = sample_rows(n)
        .into_iter()
        .flat_map(|(u, e)| {
            let payloads = [json!(e), json!({"tenant_id": u.tenant_id, "user_id": u.id}), json!(u)];
            payloads.into_iter().map(|p| p.to_string().into_bytes())
        })
        .collect();
    rows.push(super::raw::redis_push_pop(&args.urls.redis_url, &jobs).await?);
    Ok(rows)
}

async fn raw_embedded(dir: &Path, n: usize) -> BenchResult<Vec<(String, f64, String)>> {
    let sqlite_rate = raw_sqlite_inserts(dir, n).await?;
    let rows = sample_rows(n);
    // tantivy: the same users, written in batches of 500 (one commit each).
    let index = crate::search::TantivyIndex::open(&dir.join("raw-index")).map_err(err)?;
    let index = Arc::new(index);
    let docs: Vec<crate::search::IndexOp> = rows
        .iter()
        .map(|(u, _)| {
            crate::search::IndexOp::UpsertUser(crate::search::UserDoc {
                tenant_id: u.tenant_id,
                user_id: u.id,
                email: u.email.clone(),
                name: u.name.clone(),
                version: 1,
            })
        })
        .collect();
    let started = Instant::now();
    for chunk in docs.chunks(500) {
        crate::search::SearchIndex::apply(&index, chunk).await.map_err(err)?;
    }
    let tantivy_rate = docs.len() as f64 / started.elapsed().as_secs_f64();
    Ok(vec![
        (
            "SQLite: INSERT user + INSERT outbox row, one transaction each".to_owned(),
            sqlite_rate,
            "transactions/s".to_owned(),
        ),
        ("tantivy: index the same users, 500 per commit".to_owned(), tantivy_rate, "documents/s".to_owned()),
    ])
}

/// The report as Markdown tables.
pub fn tables(r: &Report) -> String {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let mut out = String::new();
    if !r.load.is_empty() {
        out.push_str(&format!("Stack: {}\n\n", r.stack));
        out.push_str("| offered | creates/s offered | commits/s | effects/s | backlog at end | commit → last effect p50 | p95 | p99 | failed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for l in &r.load {
            out.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.0} | {} events ({:.2} s) | {} | {} | {} | {} |\n",
                l.label,
                l.offered,
                l.commits_per_s,
                l.effects_per_s,
                l.backlog_events,
                l.backlog_secs,
                ms(l.p50),
                ms(l.p95),
                ms(l.p99),
                l.failed_requests
            ));
        }
    }
    if let Some(d) = &r.drain {
        let n = d.events;
        let (t, with_start) = (d.from_ready, d.from_exec);
        out.push_str(&format!(
            "\nDrain ({}): {n} events, every effect done {:.1} s after the pipeline process served: **{:.0} events/s** ({:.1} s and {:.0} events/s counting its start)\n",
            r.stack,
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64().max(1e-3),
            with_start.as_secs_f64(),
            n as f64 / with_start.as_secs_f64().max(1e-3)
        ));
        let mut stages = format!(
            "Stages, last event done (s after serving): relay published {:.1} · consumers enqueued {:.1}",
            d.published.as_secs_f64(),
            d.enqueued.as_secs_f64()
        );
        for (kind, at) in &d.done {
            stages.push_str(&format!(" · {kind} {:.1}", at.as_secs_f64()));
        }
        out.push_str(&stages);
        out.push('\n');
    }
    if let Some((rss, hwm)) = r.rss_kb {
        out.push_str(&format!(
            "\nServer memory after the runs: RSS {:.0} MB (peak {:.0} MB)\n",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        ));
    }
    if !r.usage.processes.is_empty() {
        out.push_str("\n| Eventra process (roles) | CPU seconds | RSS |\n|---|---:|---:|\n");
        for (roles, cpu, rss) in &r.usage.processes {
            out.push_str(&format!("| {roles} | {cpu:.1} | {rss:.0} MB |\n"));
        }
        for (name, cpu) in &r.usage.engines {
            out.push_str(&format!("| {name} | {cpu:.1} | |\n"));
        }
    }
    if !r.raw.is_empty() {
        out.push_str("\n| raw engine, same work | rate | unit |\n|---|---:|---|\n");
        for (what, rate, unit) in &r.raw {
            out.push_str(&format!("| {what} | {rate:.0} | {unit} |\n"));
        }
    }
    out
}
