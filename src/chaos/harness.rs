//! What `eventra chaos` and the fault tests run: Eventra as a separate process on
//! private dependencies ([`super::services`]), a load of writes and cross-tenant reads
//! through its HTTP API, a readiness probe, and the invariant check at the end.
//!
//! The load retries every write with the same `Idempotency-Key` until it gets an
//! answer, as a careful client does, so a write whose answer was lost to a crash is not
//! made twice; it records what the API acknowledged. Given several API processes it
//! sends round-robin, and a retry goes to the next one; it tells refused connections
//! (no process listening: what a client may retry elsewhere) from failed requests (a
//! process took the request and did not answer it well). The check then reads the truth
//! from the database and the SMTP sink: every committed change has exactly one event,
//! every event its audit entry, every new user exactly one welcome email, the search
//! index agrees with the database, nothing is parked or dead, and nothing the API
//! acknowledged is missing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use super::services::{free_port, PrivatePostgres, PrivateRabbit, PrivateRedis, SmtpSink};

type Result<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Private dependencies and an Eventra process on them.
pub struct Harness {
    pub redis: PrivateRedis,
    pub postgres: PrivatePostgres,
    pub rabbit: PrivateRabbit,
    pub smtp: SmtpSink,
    /// The URL Eventra answers on (a fixed port, the same across its restarts).
    pub base: String,
    pub token: String,
    pub database_url: String,
    exe: PathBuf,
    dir: PathBuf,
    listen: String,
    extra_env: Vec<(String, String)>,
    eventra: Option<Child>,
    /// How many times Eventra was started.
    pub starts: u32,
}

impl Harness {
    /// Whether every private dependency can be started on this machine.
    pub fn available() -> bool {
        PrivateRedis::available() && PrivatePostgres::available() && PrivateRabbit::available()
    }

    /// Starts the dependencies (not Eventra yet). `exe` is the `eventra` binary;
    /// `extra_env` is added to its environment.
    pub async fn start(exe: &Path, extra_env: &[(&str, &str)]) -> Result<Self> {
        crate::tls::install_crypto_provider();
        let redis = PrivateRedis::start()?;
        let postgres = tokio::task::spawn_blocking(PrivatePostgres::start).await.map_err(err)??;
        let rabbit = tokio::task::spawn_blocking(PrivateRabbit::start).await.map_err(err)??;
        let smtp = SmtpSink::start().await?;
        let port = free_port()?;
        let dir = super::services::scratch_dir("eventra-chaos")?;
        let database_url = postgres.url_of("eventra");
        let admin = crate::store::PgStore::connect(&postgres.url(), 1).await.map_err(err)?;
        sqlx::query("CREATE DATABASE eventra").execute(admin.pool()).await.map_err(err)?;
        admin.pool().close().await;
        Ok(Harness {
            redis,
            postgres,
            rabbit,
            smtp,
            base: format!("http://127.0.0.1:{port}"),
            token: format!("chaos-{}", Uuid::new_v4().simple()),
            database_url,
            exe: exe.to_path_buf(),
            dir,
            listen: format!("127.0.0.1:{port}"),
            extra_env: extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            eventra: None,
            starts: 0,
        })
    }

    /// Starts Eventra (all roles, chaos on) on the same data and waits until it answers.
    pub async fn start_eventra(&mut self) -> Result<()> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("eventra.log")).map_err(err)?;
        let out = log.try_clone().map_err(err)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["serve", "--listen", &self.listen])
            .current_dir(&self.dir)
            .env("EVENTRA_DATA_DIR", self.dir.join("data"))
            .env("EVENTRA_ADMIN_TOKEN", &self.token)
            .env("EVENTRA_CHAOS", "1")
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", self.rabbit.url())
            .env("REDIS_URL", self.redis.url())
            .env("SMTP_URL", self.smtp.url())
            .env("EVENTRA_NAMESPACE", "chaos")
            .env_remove("OPENSEARCH_URL")
            .env_remove("EVENTRA_ROLES")
            .env("EVENTRA_LOG", "warn");
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(out).stderr(log).stdin(Stdio::null()).spawn().map_err(err)?;
        self.eventra = Some(child);
        self.starts += 1;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(err)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/health/live", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self.exited() {
                let log = std::fs::read_to_string(self.dir.join("eventra.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!("eventra exited at start ({status}); its last log lines:\n{}", tail.join("\n")));
            }
            if Instant::now() > deadline {
                return Err("eventra did not answer within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status, if Eventra has exited (it stops when its tree fails past the
    /// root: an orchestrator starts it again).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.eventra.as_mut()?.try_wait().ok()??;
        self.eventra = None;
        Some(status)
    }

    /// SIGKILL: the process dies mid-whatever.
    pub fn kill_eventra(&mut self) {
        if let Some(mut c) = self.eventra.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and how it exited (`None` if it did not within `within`; it is then
    /// killed).
    pub async fn terminate_eventra(&mut self, within: Duration) -> Option<(ExitStatus, Duration)> {
        let mut child = self.eventra.take()?;
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        while started.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                return Some((status, started.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("eventra.log")
    }

    pub fn client(&self) -> Result<reqwest::Client> {
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(err)
    }

    /// Where [`settle`] and [`check`] look.
    pub fn target(&self) -> Target<'_> {
        Target { database_url: &self.database_url, base: &self.base, token: &self.token, smtp: &self.smtp }
    }
}

/// A deployment to settle and check: its database, an API process (or one with the
/// operator surface: the admin job and DLQ views), the admin token, and the SMTP sink
/// its mail goes to.
pub struct Target<'a> {
    pub database_url: &'a str,
    pub base: &'a str,
    pub token: &'a str,
    pub smtp: &'a SmtpSink,
}

impl Target<'_> {
    fn client(&self) -> Result<reqwest::Client> {
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(err)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_eventra();
        super::services::remove_dir(&self.dir);
    }
}

// ---- load ----------------------------------------------------------------------------

/// A tenant the load writes to.
#[derive(Debug, Clone)]
pub struct LoadTenant {
    pub id: Uuid,
    pub key: String,
}

/// What the API acknowledged, and how the requests went.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub tenants: Vec<LoadTenant>,
    /// Users the API answered 201 for.
    pub created: Vec<(Uuid, Uuid)>,
    /// Users the API answered 204 for a delete.
    pub deleted: HashSet<Uuid>,
    pub updates: u64,
    /// Cross-tenant reads (a key of one tenant asking for another tenant's user).
    pub cross_tenant_reads: u64,
    /// …that did not answer 404: a tenant leak.
    pub cross_tenant_leaks: u64,
    /// Attempts that failed (503, connection refused or reset, timeouts) and were retried.
    pub retried_attempts: u64,
    /// …of which the connection was refused (no process listening there).
    pub refused_attempts: u64,
    /// …of which reached a process: 5xx answers, resets, timeouts.
    pub failed_requests: u64,
    /// The first failed requests, described.
    pub failures: Vec<String>,
    /// The slowest failed attempt: writes must fail fast while a dependency is down.
    pub slowest_failure: Duration,
    /// Operations that never got an answer before the load stopped.
    pub unanswered: u64,
}

struct Shared {
    report: Mutex<LoadReport>,
    /// Users that exist as far as the load knows (created, not deleted), by tenant.
    live: Mutex<Vec<(usize, Uuid)>>,
    stop: AtomicBool,
    seq: AtomicU64,
    in_flight: AtomicUsize,
}

/// A running load.
pub struct Load {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// Most operations in flight at once (while Eventra is down, retries pile up).
const MAX_IN_FLIGHT: usize = 2_000;

impl Load {
    /// Creates `tenants` tenants, then offers `rate` operations a second: 80 % creates,
    /// 10 % renames, 10 % deletes, and a cross-tenant read every tenth operation,
    /// round-robin over `bases` (the API processes).
    pub async fn start(bases: &[String], token: &str, tenants: usize, rate: f64) -> Result<Load> {
        crate::tls::install_crypto_provider();
        let base = bases.first().ok_or("no API to load")?.clone();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(err)?;
        let mut made = Vec::new();
        for i in 0..tenants.max(2) {
            let slug = format!("chaos-{i}-{}", &Uuid::new_v4().simple().to_string()[..8]);
            let body = json!({"name": slug, "slug": slug});
            let res = retry_until_answered(
                &client,
                || client.post(format!("{base}/v1/tenants")).bearer_auth(token).json(&body),
                Duration::from_secs(60),
            )
            .await?;
            let v: Value = res.1;
            made.push(LoadTenant {
                id: v["tenant"]["id"].as_str().and_then(|s| s.parse().ok()).ok_or("no tenant id")?,
                key: v["api_key"]["key"].as_str().ok_or("no key")?.to_owned(),
            });
        }
        let shared = Arc::new(Shared {
            report: Mutex::new(LoadReport { tenants: made.clone(), ..LoadReport::default() }),
            live: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let bases: Arc<Vec<String>> = Arc::new(bases.to_vec());
        let task = tokio::spawn(async move {
            let every = Duration::from_secs_f64(1.0 / rate.max(0.1));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let tenants = Arc::new(made);
            while !s.stop.load(Ordering::SeqCst) {
                tick.tick().await;
                if s.in_flight.load(Ordering::SeqCst) >= MAX_IN_FLIGHT {
                    continue;
                }
                let n = s.seq.fetch_add(1, Ordering::SeqCst);
                let (s, client, bases, tenants) = (s.clone(), client.clone(), bases.clone(), tenants.clone());
                s.in_flight.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    one_op(&s, &client, &bases, &tenants, n).await;
                    s.in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Load { shared, task })
    }

    /// Operations started so far.
    pub fn started(&self) -> u64 {
        self.shared.seq.load(Ordering::SeqCst)
    }

    /// Stops offering new operations, lets those in flight finish (up to `grace`), and
    /// reports.
    pub async fn stop(self, grace: Duration) -> LoadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let deadline = Instant::now() + grace;
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let unanswered = self.shared.in_flight.load(Ordering::SeqCst) as u64;
        let mut report = std::mem::take(&mut *self.shared.report.lock().unwrap_or_else(|e| e.into_inner()));
        report.unanswered = unanswered;
        report
    }
}

/// Sends (and re-sends) a request until it gets an answer that is not a 503; returns
/// the status and body. Failed attempts are counted by the caller's report.
async fn retry_until_answered(
    _client: &reqwest::Client,
    make: impl Fn() -> reqwest::RequestBuilder,
    within: Duration,
) -> Result<(u16, Value)> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(res) = make().send().await {
            let status = res.status().as_u16();
            if status != 503 {
                let body = res.json().await.unwrap_or(Value::Null);
                return Ok((status, body));
            }
        }
        if Instant::now() > deadline {
            return Err("no answer".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long an operation keeps retrying before it gives up (Eventra down for longer).
const OP_PATIENCE: Duration = Duration::from_secs(120);

/// Failed requests described in the report (the first ones: enough to diagnose).
const FAILURES_KEPT: usize = 20;

async fn attempt(s: &Shared, req: reqwest::RequestBuilder) -> Option<(u16, Value)> {
    let started = Instant::now();
    let failure = match req.send().await {
        Ok(res) if res.status().as_u16() < 500 => {
            let (status, url) = (res.status().as_u16(), res.url().clone());
            match res.bytes().await {
                Ok(body) => return Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null))),
                Err(e) => Some(format!("{url}: {status}, then the body failed: {e}")),
            }
        }
        Ok(res) => {
            let (status, url) = (res.status(), res.url().clone());
            let body = res.text().await.unwrap_or_default();
            Some(format!("{url}: answered {status}: {}", body.chars().take(300).collect::<String>()))
        }
        Err(e) if e.is_connect() => None,
        Err(e) => Some(format!("{}: {e:?}", e.url().map(|u| u.as_str()).unwrap_or("?"))),
    };
    let took = started.elapsed();
    let mut r = s.report.lock().unwrap_or_else(|e| e.into_inner());
    r.retried_attempts += 1;
    r.slowest_failure = r.slowest_failure.max(took);
    match failure {
        None => r.refused_attempts += 1,
        Some(f) => {
            r.failed_requests += 1;
            if r.failures.len() < FAILURES_KEPT {
                r.failures.push(f);
            }
        }
    }
    None
}

async fn one_op(s: &Shared, client: &reqwest::Client, bases: &[String], tenants: &[LoadTenant], n: u64) {
    // Round-robin; each retry goes to the next API.
    let tries = AtomicUsize::new(n as usize);
    let base = || bases[tries.fetch_add(1, Ordering::Relaxed) % bases.len()].as_str();
    let t = (n as usize) % tenants.len();
    let tenant = &tenants[t];
    let deadline = Instant::now() + OP_PATIENCE;
    let pick = || {
        let live = s.live.lock().unwrap_or_else(|e| e.into_inner());
        let mine: Vec<Uuid> = live.iter().filter(|(lt, _)| *lt == t).map(|(_, u)| *u).collect();
        (!mine.is_empty()).then(|| mine[(n as usize * 7919) % mine.len()])
    };
    if n % 10 == 9 {
        // A key of the next tenant asks for one of this tenant's users: must be 404.
        if let Some(user) = pick() {
            let other = &tenants[(t + 1) % tenants.len()];
            let url = format!("{}/v1/tenants/{}/users/{user}", base(), tenant.id);
            if let Some((status, _)) = attempt(s, client.get(url).bearer_auth(&other.key)).await {
                let mut r = s.report.lock().unwrap_or_else(|e| e.into_inner());
                r.cross_tenant_reads += 1;
                if status != 404 {
                    r.cross_tenant_leaks += 1;
                }
            }
        }
    }
    let kind = n % 10;
    if kind == 7 || kind == 8 {
        let Some(user) = pick() else { return };
        while Instant::now() < deadline {
            let url = format!("{}/v1/tenants/{}/users/{user}", base(), tenant.id);
            let req = if kind == 7 {
                client.patch(&url).bearer_auth(&tenant.key).json(&json!({"name": format!("Renamed {n}")}))
            } else {
                client.delete(&url).bearer_auth(&tenant.key)
            };
            if let Some((status, _)) = attempt(s, req).await {
                let mut r = s.report.lock().unwrap_or_else(|e| e.into_inner());
                match (kind, status) {
                    (7, 200) => r.updates += 1,
                    (8, 204) => {
                        r.deleted.insert(user);
                        s.live.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, u)| *u != user);
                    }
                    _ => {}
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        return;
    }
    let key = Uuid::now_v7().to_string();
    let body = json!({"email": format!("u{n}@chaos.example"), "name": format!("Chaos User {n}")});
    while Instant::now() < deadline {
        let req = client
            .post(format!("{}/v1/tenants/{}/users", base(), tenant.id))
            .bearer_auth(&tenant.key)
            .header("Idempotency-Key", &key)
            .json(&body);
        if let Some((status, v)) = attempt(s, req).await {
            if status == 201 {
                if let Some(id) = v["id"].as_str().and_then(|i| i.parse::<Uuid>().ok()) {
                    s.report.lock().unwrap_or_else(|e| e.into_inner()).created.push((tenant.id, id));
                    s.live.lock().unwrap_or_else(|e| e.into_inner()).push((t, id));
                }
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- readiness ---------------------------------------------------------------------

/// Polls `/health/ready` every 250 ms with a 2 s deadline and records how it answered.
pub struct ReadinessProbe {
    stats: Arc<Mutex<ReadinessStats>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default, Clone)]
pub struct ReadinessStats {
    pub probes: u64,
    /// Probes that got no answer within 2 s while the process was up.
    pub late: u64,
    pub slowest: Duration,
    /// Probes answered 503, with the dependencies named down.
    pub not_ready: u64,
    pub down_seen: HashSet<String>,
}

impl ReadinessProbe {
    /// `paused` makes probes not count (while the process itself is down on purpose).
    pub fn start(base: &str, paused: Arc<AtomicBool>) -> Result<Self> {
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().map_err(err)?;
        let stats: Arc<Mutex<ReadinessStats>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, url) = (stats.clone(), stop.clone(), format!("{base}/health/ready"));
        let task = tokio::spawn(async move {
            while !sp.load(Ordering::SeqCst) {
                if !paused.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let res = client.get(&url).send().await;
                    let took = started.elapsed();
                    if !paused.load(Ordering::SeqCst) {
                        let (answered, down) = match res {
                            Ok(r) if r.status().as_u16() == 503 => {
                                let v = r.json::<Value>().await.unwrap_or(Value::Null);
                                let down: Vec<String> = v["checks"]
                                    .as_object()
                                    .into_iter()
                                    .flatten()
                                    .filter(|(_, c)| c["status"] == "down")
                                    .map(|(n, _)| n.clone())
                                    .collect();
                                (true, Some(down))
                            }
                            Ok(_) => (true, None),
                            Err(_) => (false, None),
                        };
                        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                        s.probes += 1;
                        s.slowest = s.slowest.max(took);
                        if !answered {
                            s.late += 1;
                        }
                        if let Some(down) = down {
                            s.not_ready += 1;
                            s.down_seen.extend(down);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(ReadinessProbe { stats, stop, task })
    }

    pub async fn stop(self) -> ReadinessStats {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s
    }
}

// ---- the check -----------------------------------------------------------------------

/// What the check found. Every field but the counts of what exists must be zero
/// ([`hold`](Invariants::hold)); `emails_resent` may be non-zero only when Eventra was
/// killed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Invariants {
    pub events: u64,
    pub users_created: u64,
    pub users_now: u64,
    /// Changes the API acknowledged that the database does not have.
    pub acknowledged_but_missing: u64,
    /// Events without their audit entry.
    pub audit_missing: u64,
    /// New users without a welcome email.
    pub emails_missing: u64,
    /// New users whose welcome email (one `Message-ID`) was delivered more than once:
    /// what a process killed between the mail server's acceptance and the `email_log`
    /// row causes (SPEC §5's one unavoidable window: the resend is recognisable by its
    /// `Message-ID`). Zero unless Eventra itself was killed.
    pub emails_resent: u64,
    /// Users the search index disagrees about (missing, stale, or deleted but found).
    pub index_wrong: u64,
    /// Messages in the event bus's DLQ, and jobs in the dead set.
    pub parked: u64,
    pub dead_jobs: u64,
    pub cross_tenant_leaks: u64,
}

impl Invariants {
    pub fn hold(&self) -> bool {
        self.acknowledged_but_missing == 0
            && self.audit_missing == 0
            && self.emails_missing == 0
            && self.index_wrong == 0
            && self.parked == 0
            && self.dead_jobs == 0
            && self.cross_tenant_leaks == 0
    }
}

/// Waits until the pipeline is idle (every event published, audited, no job waiting),
/// up to `within`.
pub async fn settle(h: &Target<'_>, within: Duration) -> Result<()> {
    let pool = sqlx::PgPool::connect(h.database_url).await.map_err(err)?;
    let client = h.client()?;
    let deadline = Instant::now() + within;
    loop {
        let (unpublished,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .map_err(err)?;
        let (unaudited,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.event_id = o.event_id)",
        )
        .fetch_one(&pool)
        .await
        .map_err(err)?;
        let jobs: Value = match client.get(format!("{}/v1/admin/jobs", h.base)).bearer_auth(h.token).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let busy = ["ready", "running", "retry", "scheduled"]
            .iter()
            .map(|k| jobs["counts"][*k].as_u64().unwrap_or(u64::MAX))
            .fold(0u64, |a, b| a.saturating_add(b));
        if unpublished == 0 && unaudited == 0 && busy == 0 {
            pool.close().await;
            return Ok(());
        }
        if Instant::now() > deadline {
            pool.close().await;
            return Err(format!(
                "not settled after {within:?}: {unpublished} unpublished, {unaudited} not audited, {busy} jobs busy"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks every invariant against the database, the SMTP sink and the API.
pub async fn check(h: &Target<'_>, load: &LoadReport) -> Result<Invariants> {
    let pool = sqlx::PgPool::connect(h.database_url).await.map_err(err)?;
    let mut inv = Invariants { cross_tenant_leaks: load.cross_tenant_leaks, ..Invariants::default() };
    let (events,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox").fetch_one(&pool).await.map_err(err)?;
    inv.events = events as u64;
    let (unaudited,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.event_id = o.event_id)",
    )
    .fetch_one(&pool)
    .await
    .map_err(err)?;
    inv.audit_missing = unaudited as u64;
    // Every user ever created, from its event (deleted ones included).
    let created: Vec<(String,)> =
        sqlx::query_as("SELECT payload->>'subject' FROM outbox WHERE event_type = 'user.created'")
            .fetch_all(&pool)
            .await
            .map_err(err)?;
    inv.users_created = created.len() as u64;
    let deliveries = h.smtp.deliveries.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (user,) in &created {
        match deliveries.get(&format!("welcome.{user}@eventra")).copied().unwrap_or(0) {
            0 => inv.emails_missing += 1,
            1 => {}
            _ => inv.emails_resent += 1,
        }
    }
    let ever: HashSet<Uuid> = created.iter().filter_map(|(u,)| u.parse().ok()).collect();
    inv.acknowledged_but_missing = load.created.iter().filter(|(_, u)| !ever.contains(u)).count() as u64;
    // The index against the database: every user found under its current name, every
    // deleted one gone.
    let now: Vec<(Uuid, Uuid, String, String)> =
        sqlx::query_as("SELECT id, tenant_id, email, name FROM users").fetch_all(&pool).await.map_err(err)?;
    inv.users_now = now.len() as u64;
    let keys: HashMap<Uuid, String> = load.tenants.iter().map(|t| (t.id, t.key.clone())).collect();
    let client = h.client()?;
    let existing: HashSet<Uuid> = now.iter().map(|u| u.0).collect();
    let mut probes: Vec<(Uuid, Uuid, String, Option<String>)> =
        now.iter().map(|(id, t, email, name)| (*id, *t, email.clone(), Some(name.clone()))).collect();
    let gone: Vec<(Uuid, Uuid)> =
        load.created.iter().filter(|(_, u)| !existing.contains(u)).map(|(t, u)| (*t, *u)).collect();
    // A deleted user's email, from its creation event.
    let emails: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT payload->>'subject', payload->'data'->'user'->>'email' FROM outbox WHERE event_type = 'user.created'",
    )
    .fetch_all(&pool)
    .await
    .map_err(err)?
    .into_iter()
    .collect();
    for (t, u) in gone {
        if let Some(email) = emails.get(&u.to_string()) {
            probes.push((u, t, email.clone(), None));
        }
    }
    let wrong = futures_util::stream::iter(probes)
        .map(|(id, tenant, email, name)| {
            let (client, key, base) = (client.clone(), keys.get(&tenant).cloned(), h.base.to_owned());
            async move {
                let Some(key) = key else { return 0u64 };
                let q = email.split('@').next().unwrap_or_default().to_owned();
                let url = format!("{base}/v1/tenants/{tenant}/users/search?q={q}&limit=50");
                let Ok(res) = client.get(url).bearer_auth(key).send().await else { return 1 };
                let Ok(v) = res.json::<Value>().await else { return 1 };
                let hit =
                    v["items"].as_array().and_then(|items| items.iter().find(|i| i["id"] == id.to_string()).cloned());
                match (name, hit) {
                    (Some(name), Some(hit)) if hit["name"] == name.as_str() => 0,
                    (None, None) => 0,
                    _ => 1,
                }
            }
        })
        .buffer_unordered(8)
        .fold(0u64, |a, b| async move { a + b })
        .await;
    inv.index_wrong = wrong;
    let admin = |path: &str| {
        let request = client.get(format!("{}{path}", h.base)).bearer_auth(h.token);
        async move { request.send().await.map_err(err)?.json::<Value>().await.map_err(err) }
    };
    let dlq = admin("/v1/admin/dlq").await?;
    inv.parked = dlq["items"].as_array().map_or(0, |a| a.len() as u64);
    let jobs = admin("/v1/admin/jobs").await?;
    inv.dead_jobs = jobs["counts"]["dead"].as_u64().unwrap_or(0);
    pool.close().await;
    Ok(inv)
}

use futures_util::StreamExt;
