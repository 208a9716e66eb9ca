//! The job system end to end, through a running server: workers killed mid-job,
//! retries and the dead set as the admin API shows them, and one welcome email per
//! user however often its event arrives. Each runs on the embedded SQLite queue and,
//! when `REDIS_URL` is set (as in CI), on Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventra::config::Config;
use eventra::domain::{DomainEvent, EventType};
use eventra::jobs::{Enqueued, Job, JobFailure, JobKind, JobQueue, JobState, Kinds, NewJob, QueueConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::mailer_conformance::smtp_server;
use crate::utils::app::ADMIN_TOKEN;
use crate::utils::{wait_for, TestApp, TestDb};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Redis,
}

/// A server on a fresh SQLite database whose jobs live in `backend`, and the same queue
/// as the test sees it (to enqueue as a broker consumer would).
struct Setup {
    app: TestApp,
    queue: Arc<dyn JobQueue>,
    _db: TestDb,
    _redis: Option<crate::utils::RedisNamespace>,
}

async fn setup(backend: Backend, test: &str, kinds: Kinds, tweak: impl FnOnce(&mut Config)) -> Option<Setup> {
    let db = TestDb::sqlite();
    let redis = match backend {
        Backend::Sqlite => None,
        Backend::Redis => Some(crate::utils::service_url("REDIS_URL", test)?),
    };
    let guard = redis.as_deref().map(crate::utils::RedisNamespace::new);
    // SQLite runs need a namespace too (the config requires one); nothing to clean up.
    let ns = guard.as_ref().map_or_else(|| "eventra-test".to_owned(), |g| g.ns.clone());
    let app = TestApp::start_with_kinds(db.url(), kinds, |c| {
        c.redis_url = redis.clone();
        c.namespace = ns.clone();
        tweak(c);
    })
    .await;
    let config = QueueConfig::default();
    let queue: Arc<dyn JobQueue> = match &redis {
        Some(url) => Arc::new(eventra::jobs::RedisJobQueue::connect(url, &ns, config).await.expect("redis")),
        None => Arc::new(eventra::jobs::SqliteJobQueue::open(db.url(), config).await.expect("sqlite queue")),
    };
    Some(Setup { app, queue, _db: db, _redis: guard })
}

async fn enqueue(q: &Arc<dyn JobQueue>, job: NewJob) -> Uuid {
    match q.enqueue(job).await.expect("enqueue") {
        Enqueued::New(id) => id,
        Enqueued::Duplicate(id) => panic!("duplicate {id}"),
    }
}

async fn admin_job(app: &TestApp, id: Uuid) -> Value {
    let res = app.get(&format!("/v1/admin/jobs/{id}"), ADMIN_TOKEN).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json().await.expect("json")
}

async fn job_in_state(app: &TestApp, id: Uuid, state: &str, within: Duration) -> Value {
    wait_for(&format!("job {id} to be {state}"), within, || async move {
        Some(admin_job(app, id).await).filter(|j| j["state"] == state)
    })
    .await
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a time: {v}"))
}

/// The first run hangs (until its worker is killed); later runs do the effect.
#[derive(Default)]
struct HangsOnce {
    runs: AtomicU32,
    effects: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl JobKind for HangsOnce {
    fn name(&self) -> &'static str {
        "test_hangs_once"
    }
    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            std::future::pending::<()>().await;
        }
        *self.effects.lock().unwrap().entry(job.idempotency_key.clone()).or_default() += 1;
        Ok(())
    }
}

async fn worker_killed_mid_job(backend: Backend, test: &str) {
    let kind = Arc::new(HangsOnce::default());
    let Some(s) = setup(backend, test, Kinds::default().with(kind.clone()), |c| c.chaos = true).await else { return };
    let id = enqueue(&s.queue, NewJob::new("test_hangs_once", "hang:1", json!({}))).await;
    let running = job_in_state(&s.app, id, "running", Duration::from_secs(10)).await;
    wait_for("the first run to start", Duration::from_secs(10), || async {
        (kind.runs.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let holder = running["worker"].as_str().expect("a running job names its worker");
    // `job-worker-N@host:port`: the tree name and the process.
    let (worker, process) = holder.split_once('@').expect("worker@process");
    assert!(
        worker.starts_with("job-worker-") && process.ends_with(&s.app.base[s.app.base.rfind(':').unwrap()..]),
        "{holder}"
    );
    let worker = worker.to_owned();

    let res = s.app.post(&format!("/debug/actors/{worker}/kill"), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    // The lease (1.5 s in tests) lapses, the reaper puts the job back, a worker runs it.
    let done = job_in_state(&s.app, id, "done", Duration::from_secs(20)).await;
    assert_eq!(kind.runs.load(Ordering::SeqCst), 2, "ran again after the kill");
    assert_eq!(kind.effects.lock().unwrap().get("hang:1"), Some(&1), "its effect once");
    assert_eq!(done["attempts"], 0, "a killed worker is not a failed attempt");
    let tree: Value = s.app.get("/debug/actors", ADMIN_TOKEN).await.json().await.unwrap();
    let node = crate::utils::find_actor(&tree, &worker).expect("the worker is back in the tree");
    assert_eq!((node["status"].as_str(), node["restarts"].as_u64()), (Some("running"), Some(1)));
    s.app.stop().await;
}

/// Fails while `broken`, or for its first `fail_first` runs.
pub(crate) struct Flaky {
    name: &'static str,
    fail_first: u32,
    pub(crate) broken: AtomicBool,
    pub(crate) max_attempts: u32,
    pub(crate) runs: AtomicU32,
}

impl Flaky {
    pub(crate) fn new(name: &'static str, fail_first: u32, broken: bool, max_attempts: u32) -> Arc<Self> {
        Arc::new(Flaky { name, fail_first, broken: AtomicBool::new(broken), max_attempts, runs: AtomicU32::new(0) })
    }
}

#[async_trait]
impl JobKind for Flaky {
    fn name(&self) -> &'static str {
        self.name
    }
    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    async fn run(&self, _job: &Job) -> Result<(), JobFailure> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= self.fail_first || self.broken.load(Ordering::SeqCst) {
            return Err(JobFailure::new(format!("run {n} failed on purpose")));
        }
        Ok(())
    }
}

/// Sidekiq's schedule ÷ 10, without jitter: retry 1 after 1.5 s, retry 2 after 1.6 s.
fn tenfold(c: &mut Config) {
    c.jobs.time_scale = 10.0;
    c.jobs.jitter = false;
}

async fn retries_show_in_the_admin_api(backend: Backend, test: &str) {
    let kind_name = match backend {
        Backend::Sqlite => "test_flaky_sqlite",
        Backend::Redis => "test_flaky_redis",
    };
    let kind = Flaky::new(kind_name, 2, false, 25);
    let Some(s) = setup(backend, test, Kinds::default().with(kind.clone()), tenfold).await else { return };
    let id = enqueue(&s.queue, NewJob::new(kind_name, "flaky:1", json!({"n": 1}))).await;

    // Watch the retry set: each failure shows with its attempt count and next run.
    let seen: Mutex<Vec<(u64, i64)>> = Mutex::new(Vec::new());
    wait_for("two retries, then success", Duration::from_secs(20), || {
        let (app, seen) = (&s.app, &seen);
        async move {
            let page: Value =
                app.get(&format!("/v1/admin/jobs/retries?q={id}"), ADMIN_TOKEN).await.json().await.ok()?;
            if let Some(j) = page["items"].as_array().and_then(|items| items.first()) {
                let attempts = j["attempts"].as_u64().unwrap_or(0);
                let delay = (time(&j["run_at"]) - time(&j["failed_at"])).num_milliseconds();
                let mut seen = seen.lock().unwrap();
                if seen.last().map(|l| l.0) != Some(attempts) {
                    seen.push((attempts, delay));
                }
            }
            (admin_job(app, id).await["state"] == "done").then_some(())
        }
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen, [(1, 1500), (2, 1600)], "two retries at Sidekiq's growing delays (÷10)");
    let done = admin_job(&s.app, id).await;
    assert_eq!((done["attempts"].as_u64(), done["last_error"].as_str()), (Some(2), Some("run 2 failed on purpose")));
    assert_eq!(kind.runs.load(Ordering::SeqCst), 3);
    let metrics = s.app.client.get(format!("{}/metrics", s.app.base)).send().await.unwrap().text().await.unwrap();
    for (name, n) in [("retried", 2), ("succeeded", 1), ("started", 3)] {
        let line = format!("eventra_jobs_{name}_total{{kind=\"{kind_name}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "missing {line:?}");
    }
    s.app.stop().await;
}

async fn dead_jobs_retry_now(backend: Backend, test: &str) {
    let kind = Flaky::new("test_broken", 0, true, 2);
    let tweak = |c: &mut Config| {
        c.jobs.time_scale = 100.0;
        c.jobs.jitter = false;
    };
    let Some(s) = setup(backend, test, Kinds::default().with(kind.clone()), tweak).await else { return };
    let job = NewJob { max_attempts: Some(kind.max_attempts), ..NewJob::new("test_broken", "broken:1", json!({})) };
    let id = enqueue(&s.queue, job).await;
    job_in_state(&s.app, id, "dead", Duration::from_secs(20)).await;
    assert_eq!(kind.runs.load(Ordering::SeqCst), 2, "two attempts, then the dead set");
    let dead: Value = s.app.get("/v1/admin/jobs/dead?q=broken:1", ADMIN_TOKEN).await.json().await.unwrap();
    assert_eq!(dead["items"][0]["id"], id.to_string(), "{dead}");
    assert_eq!(dead["items"][0]["last_error"], "run 2 failed on purpose");

    kind.broken.store(false, Ordering::SeqCst);
    let res = s.app.post(&format!("/v1/admin/jobs/{id}/retry"), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    job_in_state(&s.app, id, "done", Duration::from_secs(20)).await;
    assert_eq!(kind.runs.load(Ordering::SeqCst), 3, "retry now ran it again");
    // A done job refuses the actions; unknown ids are 404; bad segments are 400.
    let res = s.app.post(&format!("/v1/admin/jobs/{id}/kill"), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let res = s.app.post(&format!("/v1/admin/jobs/{}/retry", Uuid::now_v7()), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // Whole sets: retries and scheduled can be killed (none here), the dead set cannot.
    let killed: Value = s.app.post("/v1/admin/jobs/retries/kill", ADMIN_TOKEN, json!({})).await.json().await.unwrap();
    assert_eq!(killed["killed"], 0, "{killed}");
    let res = s.app.post("/v1/admin/jobs/dead/kill", ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let res = s.app.get("/v1/admin/jobs/graveyard", ADMIN_TOKEN).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = s.app.get("/v1/admin/jobs/dead?cursor=abc", ADMIN_TOKEN).await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let res = s.app.get("/v1/admin/jobs/queues/Bad:Name", ADMIN_TOKEN).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = s.app.get("/v1/admin/jobs", "not-the-admin-token").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let summary: Value = s.app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.unwrap();
    assert_eq!(
        (summary["counts"]["done"].as_u64(), summary["counts"]["dead"].as_u64()),
        (Some(1), Some(0)),
        "{summary}"
    );
    assert_eq!(summary["queues"][0]["name"], "default", "{summary}");
    s.app.stop().await;
}

/// Takes 400 ms and counts its runs per job.
#[derive(Default)]
struct Slow(Mutex<HashMap<String, u32>>);

#[async_trait]
impl JobKind for Slow {
    fn name(&self) -> &'static str {
        "test_slow"
    }
    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        tokio::time::sleep(Duration::from_millis(400)).await; // the job's own work, not a wait
        *self.0.lock().unwrap().entry(job.idempotency_key.clone()).or_default() += 1;
        Ok(())
    }
}

/// A batch longer than the lease (5 × 400 ms against 1.5 s), each job shorter than a
/// heartbeat period: the batch's heartbeat must keep every lease, or the reaper hands
/// the waiting jobs to the other worker and they run twice.
async fn long_batches_keep_their_leases(backend: Backend, test: &str) {
    let kind = Arc::new(Slow::default());
    let Some(s) = setup(backend, test, Kinds::default().with(kind.clone()), |_| {}).await else { return };
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(enqueue(&s.queue, NewJob::new("test_slow", format!("slow:{i}"), json!({}))).await);
    }
    for id in ids {
        job_in_state(&s.app, id, "done", Duration::from_secs(30)).await;
    }
    let runs = kind.0.lock().unwrap().clone();
    assert_eq!(runs.len(), 10);
    assert!(runs.values().all(|n| *n == 1), "every job ran once: {runs:?}");
    s.app.stop().await;
}

/// Fails for good on its first run.
struct Hopeless(AtomicU32);

#[async_trait]
impl JobKind for Hopeless {
    fn name(&self) -> &'static str {
        "test_hopeless"
    }
    async fn run(&self, _job: &Job) -> Result<(), JobFailure> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(JobFailure::permanent("the address is refused"))
    }
}

async fn permanent_failures_skip_the_retries(backend: Backend, test: &str) {
    let kind = Arc::new(Hopeless(AtomicU32::new(0)));
    let Some(s) = setup(backend, test, Kinds::default().with(kind.clone()), |_| {}).await else { return };
    let id = enqueue(&s.queue, NewJob::new("test_hopeless", "hopeless:1", json!({}))).await;
    let dead = job_in_state(&s.app, id, "dead", Duration::from_secs(20)).await;
    assert_eq!((dead["attempts"].as_u64(), dead["last_error"].as_str()), (Some(1), Some("the address is refused")));
    assert_eq!(kind.0.load(Ordering::SeqCst), 1, "no retries");
    s.app.stop().await;
}

/// Creates a user through the API and returns its `user.created` event.
async fn user_created_event(s: &Setup, email: &str) -> DomainEvent {
    let t = s.app.tenant("mail", 0).await;
    let user = s.app.user(&t, email).await;
    let store = eventra::store::connect(&s.app.config.database_url, 2).await.unwrap();
    let rows = store.outbox_after(0, 1000).await.unwrap();
    rows.into_iter()
        .map(|r| r.event)
        .find(|e| e.event_type == EventType::UserCreated && e.subject == user["id"].as_str().unwrap())
        .expect("the user.created event")
}

/// The same event delivered three times, and a later welcome job for the same user
/// under another key: exactly one email.
/// A user created through the API gets its welcome email through the whole pipeline
/// (outbox → relay → bus → consumer → job → mailer); the same event delivered three
/// more times, and a later welcome job under another key, send nothing more.
async fn one_welcome_email(s: &Setup, inbox: impl Fn() -> Vec<String>) {
    let event = user_created_event(s, "welcome@example.com").await;
    let store = eventra::store::SqliteStore::connect(&s.app.config.database_url, 2).await.unwrap();
    let key = format!("welcome:{}", event.subject);
    wait_for("the welcome email to be sent and recorded", Duration::from_secs(20), || async {
        eventra::store::Store::email_sent(&store, &key).await.unwrap().then_some(())
    })
    .await;

    // Redeliveries of the same event, as an at-least-once bus may make.
    let bus = eventra::bus::SqliteBus::new(store.pools(), eventra::bus::BusConfig::default());
    let copy = eventra::bus::BusMessage {
        id: event.id.to_string(),
        routing_key: event.event_type.as_str().into(),
        body: serde_json::to_vec(&event).unwrap(),
    };
    eventra::bus::EventBus::publish(&bus, &[copy.clone(), copy.clone(), copy]).await.unwrap();
    wait_for("the redeliveries to be consumed", Duration::from_secs(20), || async {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM bus_messages").fetch_one(store.pool()).await.unwrap();
        (n == 0).then_some(())
    })
    .await;
    for job in eventra::jobs::jobs_for_event(&event).unwrap() {
        assert!(matches!(s.queue.enqueue(job).await.unwrap(), Enqueued::Duplicate(_)), "no second job for an event");
    }

    // Past the key's retention (or an operator re-enqueueing): the email log still holds.
    let before = inbox();
    let mut again = eventra::jobs::jobs_for_event(&event).unwrap().pop().unwrap();
    again.idempotency_key.push_str(":later");
    let id = enqueue(&s.queue, again).await;
    job_in_state(&s.app, id, "done", Duration::from_secs(20)).await;
    let mail = inbox();
    assert_eq!(mail, before, "nothing sent (or rewritten) by the later job");
    assert_eq!(mail.len(), 1, "{mail:?}");
    assert!(
        mail[0].contains("To: welcome@example.com") && mail[0].contains(&format!("welcome.{}@eventra", event.subject))
    );
    // Every event of the tenant (tenant.created, user.created) has one audit entry.
    let audit = eventra::store::Store::get_audit(&store, event.id).await.unwrap();
    assert_eq!(audit.map(|a| a.event_type), Some("user.created".to_owned()));
    wait_for("the tenant's audit entries", Duration::from_secs(20), || async {
        (eventra::store::Store::count_audit(&store, event.tenantid).await.unwrap() == 2).then_some(())
    })
    .await;
}

async fn welcome_email_over_smtp(backend: Backend, test: &str) {
    let (url, kept) = smtp_server::start();
    let Some(s) = setup(backend, test, Kinds::default(), |c| c.smtp_url = Some(url.clone())).await else { return };
    one_welcome_email(&s, || kept.lock().unwrap().clone()).await;
    s.app.stop().await;
}

async fn welcome_email_to_files(backend: Backend, test: &str) {
    let Some(s) = setup(backend, test, Kinds::default(), |_| {}).await else { return };
    let dir = s.app.config.data_dir.join("mail");
    let inbox = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                    .filter_map(|e| {
                        // The modification time too: a resend rewrites the same file.
                        let modified = e.metadata().and_then(|m| m.modified()).ok()?;
                        Some(format!("{}\n(modified {modified:?})", std::fs::read_to_string(e.path()).ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    one_welcome_email(&s, inbox).await;
    s.app.stop().await;
}

/// A real SMTP mailer whose first send waits at a gate until the test opens it (a
/// send that stalls: a slow server, a GC pause, a network hiccup); later sends pass.
struct GatedMailer {
    inner: Arc<dyn eventra::mail::Mailer>,
    entered: tokio::sync::Notify,
    open: tokio::sync::Notify,
    first: AtomicBool,
}

#[async_trait]
impl eventra::mail::Mailer for GatedMailer {
    fn kind(&self) -> &'static str {
        "smtp"
    }
    async fn send(&self, email: &eventra::mail::Email) -> Result<(), eventra::mail::MailError> {
        if !self.first.swap(true, Ordering::SeqCst) {
            let opened = self.open.notified();
            self.entered.notify_one();
            opened.await;
        }
        self.inner.send(email).await
    }
}

/// A real queue whose heartbeats fail for chosen leases, as they do through a Redis
/// blip or a stalled connection: the lease then lapses while its worker carries on.
struct Blips {
    inner: Arc<dyn JobQueue>,
    failing: Mutex<std::collections::HashSet<Uuid>>,
}

#[async_trait]
impl JobQueue for Blips {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> eventra::jobs::JobResult<()> {
        self.inner.ping().await
    }
    async fn enqueue(&self, job: NewJob) -> eventra::jobs::JobResult<Enqueued> {
        self.inner.enqueue(job).await
    }
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> eventra::jobs::JobResult<Vec<Enqueued>> {
        self.inner.enqueue_many(jobs).await
    }
    async fn fetch_many(
        &self,
        q: &str,
        w: &str,
        lease: Duration,
        max: u32,
        workers: u32,
    ) -> eventra::jobs::JobResult<Vec<Job>> {
        self.inner.fetch_many(q, w, lease, max, workers).await
    }
    async fn heartbeat(&self, id: Uuid, lease: Uuid, duration: Duration) -> eventra::jobs::JobResult<bool> {
        if self.failing.lock().unwrap().contains(&lease) {
            return Err(eventra::jobs::JobError::Backend("connection reset (a blip)".into()));
        }
        self.inner.heartbeat(id, lease, duration).await
    }
    async fn ack(&self, id: Uuid, lease: Uuid) -> eventra::jobs::JobResult<()> {
        self.inner.ack(id, lease).await
    }
    async fn ack_many(&self, leases: &[(Uuid, Uuid)]) -> eventra::jobs::JobResult<Vec<Uuid>> {
        self.inner.ack_many(leases).await
    }
    async fn fail(&self, id: Uuid, lease: Uuid, error: &str) -> eventra::jobs::JobResult<eventra::jobs::Failed> {
        self.inner.fail(id, lease, error).await
    }
    async fn fail_after(
        &self,
        id: Uuid,
        lease: Uuid,
        error: &str,
        delay: Duration,
    ) -> eventra::jobs::JobResult<eventra::jobs::Failed> {
        self.inner.fail_after(id, lease, error, delay).await
    }
    async fn snooze(&self, id: Uuid, lease: Uuid, delay: Duration) -> eventra::jobs::JobResult<()> {
        self.inner.snooze(id, lease, delay).await
    }
    async fn bury(&self, id: Uuid, lease: Uuid, error: &str) -> eventra::jobs::JobResult<()> {
        self.inner.bury(id, lease, error).await
    }
    async fn promote_due(&self) -> eventra::jobs::JobResult<u64> {
        self.inner.promote_due().await
    }
    async fn reap_expired(&self) -> eventra::jobs::JobResult<u64> {
        self.inner.reap_expired().await
    }
    async fn get(&self, id: Uuid) -> eventra::jobs::JobResult<Option<Job>> {
        self.inner.get(id).await
    }
    async fn find_by_key(&self, key: &str) -> eventra::jobs::JobResult<Option<Job>> {
        self.inner.find_by_key(key).await
    }
    async fn count(&self, state: JobState) -> eventra::jobs::JobResult<u64> {
        self.inner.count(state).await
    }
    async fn queues(&self) -> eventra::jobs::JobResult<Vec<eventra::jobs::QueueStats>> {
        self.inner.queues().await
    }
    async fn head(&self, queue: &str) -> eventra::jobs::JobResult<Option<(Uuid, Duration)>> {
        self.inner.head(queue).await
    }
    async fn scan(
        &self,
        set: &eventra::jobs::JobSet,
        offset: u64,
        limit: u32,
    ) -> eventra::jobs::JobResult<eventra::jobs::Scanned> {
        self.inner.scan(set, offset, limit).await
    }
    async fn retry_now(&self, id: Uuid) -> eventra::jobs::JobResult<eventra::jobs::Acted> {
        self.inner.retry_now(id).await
    }
    async fn kill(&self, id: Uuid) -> eventra::jobs::JobResult<eventra::jobs::Acted> {
        self.inner.kill(id).await
    }
    async fn delete(&self, id: Uuid) -> eventra::jobs::JobResult<eventra::jobs::Acted> {
        self.inner.delete(id).await
    }
    async fn retry_all(&self, set: &eventra::jobs::JobSet) -> eventra::jobs::JobResult<u64> {
        self.inner.retry_all(set).await
    }
    async fn delete_all(&self, set: &eventra::jobs::JobSet) -> eventra::jobs::JobResult<u64> {
        self.inner.delete_all(set).await
    }
    async fn kill_all(&self, set: &eventra::jobs::JobSet) -> eventra::jobs::JobResult<u64> {
        self.inner.kill_all(set).await
    }
}

/// One welcome-email job on a `backend` queue whose heartbeats can be made to fail
/// ([`Blips`]), with a runner holding 600 ms leases and retries due at once.
struct OneWelcome {
    db: TestDb,
    store: Arc<dyn eventra::store::Store>,
    blips: Arc<Blips>,
    queue: Arc<dyn JobQueue>,
    runner: Arc<eventra::jobs::Runner>,
    id: Uuid,
    user_id: Uuid,
    _ns: Option<crate::utils::RedisNamespace>,
}

impl OneWelcome {
    /// The runner of another process: a `WelcomeEmail` of its own, on the same store
    /// and queue.
    fn another_process(&self, mailer: Arc<dyn eventra::mail::Mailer>) -> Arc<eventra::jobs::Runner> {
        use eventra::jobs::{JobClient, Runner};
        let kinds = Kinds::default().with(Arc::new(eventra::jobs::kinds::WelcomeEmail::new(
            self.store.clone(),
            mailer,
            "Eventra <no-reply@example.com>".into(),
        )));
        let client = JobClient::new(self.queue.clone(), &kinds);
        Arc::new(Runner::new(client, kinds, welcome_runner_config()))
    }
}

/// 600 ms leases.
fn welcome_runner_config() -> eventra::jobs::RunnerConfig {
    eventra::jobs::RunnerConfig { lease: Duration::from_millis(600), ..Default::default() }
}

/// [`OneWelcome`], sending through `mailer`; `None` (NOT RUN) without the backend.
async fn one_welcome_job(backend: Backend, test: &str, mailer: Arc<dyn eventra::mail::Mailer>) -> Option<OneWelcome> {
    use eventra::jobs::{JobClient, Runner};
    let db = TestDb::sqlite();
    let store = db.store().await;
    let (real, ns): (Arc<dyn JobQueue>, _) = match backend {
        Backend::Sqlite => {
            let pools = eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pools();
            (Arc::new(eventra::jobs::SqliteJobQueue::new(pools, fast_retries())), None)
        }
        Backend::Redis => {
            let url = crate::utils::service_url("REDIS_URL", test)?;
            let ns = crate::utils::RedisNamespace::new(&url);
            let q = eventra::jobs::RedisJobQueue::connect(&url, &ns.ns, fast_retries()).await.unwrap();
            (Arc::new(q), Some(ns))
        }
    };
    let blips = Arc::new(Blips { inner: real, failing: Mutex::default() });
    let queue: Arc<dyn JobQueue> = blips.clone();
    let kinds = Kinds::default().with(Arc::new(eventra::jobs::kinds::WelcomeEmail::new(
        store.clone(),
        mailer,
        "Eventra <no-reply@example.com>".into(),
    )));
    let client = JobClient::new(queue.clone(), &kinds);
    let args = eventra::jobs::kinds::welcome_email::WelcomeArgs {
        tenant_id: Uuid::now_v7(),
        user_id: Uuid::now_v7(),
        email: "welcome@example.com".into(),
        name: "Welcome".into(),
    };
    let Enqueued::New(id) = client.enqueue(args.job()).await.unwrap() else { panic!("duplicate") };
    let runner = Arc::new(Runner::new(client, kinds, welcome_runner_config()));
    Some(OneWelcome { db, store, blips, queue, runner, id, user_id: args.user_id, _ns: ns })
}

/// SPEC §5: the welcome email is fenced on the job's lease. A worker whose send stalls
/// past its confirmed lease abandons it, so when the reaper hands the job to another
/// worker, only one of them ever delivers: one email, however long the first one hung.
/// (Without the bound on the send, A delivers too once its stall ends: two emails.)
async fn a_send_that_outlives_its_lease_is_abandoned(backend: Backend, test: &str) {
    let (smtp, inbox) = smtp_server::start();
    let mailer = Arc::new(GatedMailer {
        inner: eventra::mail::from_config(Some(&smtp), std::path::PathBuf::new()).unwrap(),
        entered: tokio::sync::Notify::new(),
        open: tokio::sync::Notify::new(),
        first: AtomicBool::new(false),
    });
    let Some(w) = one_welcome_job(backend, test, mailer.clone()).await else { return };
    let (blips, queue, runner, id) = (w.blips.clone(), w.queue.clone(), w.runner.clone(), w.id);

    // Worker A takes the job and stalls inside its send.
    let a = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run_next("worker-a").await.unwrap() }
    });
    tokio::time::timeout(Duration::from_secs(10), mailer.entered.notified()).await.expect("A reached its send");
    // Then A's heartbeats stop getting through: its lease lapses while it is still
    // sending. The job comes back (reaped, or retried after A gave up) and worker B
    // runs it to the end.
    let a_lease = queue.get(id).await.unwrap().and_then(|j| j.lease).expect("A holds the job");
    blips.failing.lock().unwrap().insert(a_lease);
    wait_for("worker B to finish the job", Duration::from_secs(20), || async {
        queue.reap_expired().await.unwrap();
        queue.promote_due().await.unwrap();
        runner.run_next("worker-b").await.unwrap();
        (queue.get(id).await.unwrap()?.state == JobState::Done).then_some(())
    })
    .await;
    // Now A's stalled send is let go, if A is still waiting on it.
    mailer.open.notify_one();
    tokio::time::timeout(Duration::from_secs(10), a).await.expect("A finished").unwrap();
    let mail = inbox.lock().unwrap().clone();
    assert_eq!(mail.len(), 1, "one welcome email, not one per worker: {mail:?}");
}

/// A welcome email sent, whose record is held up (the database refuses it), while the
/// attempt's lease lapses (its heartbeats stop getting through, as when its worker
/// actor is killed): the job comes back, and the next attempt, in the same process or
/// in another, must not send the email again while the first one's record is pending
/// (its claim holds). Once the record lands, the job finishes: one email. (Seen in a
/// chaos run: a worker kill and a PostgreSQL restart together resent six emails.)
async fn a_sent_email_whose_record_is_pending_is_not_sent_again(backend: Backend, test: &str) {
    record_pending_then_another_attempt(backend, test, false).await;
}

/// [`a_sent_email_whose_record_is_pending_is_not_sent_again`], the next attempt in
/// another process (its own memory, the same database and queue).
async fn another_process_does_not_resend_a_pending_email(backend: Backend, test: &str) {
    record_pending_then_another_attempt(backend, test, true).await;
}

async fn record_pending_then_another_attempt(backend: Backend, test: &str, another_process: bool) {
    let (smtp, inbox) = smtp_server::start();
    let mailer = eventra::mail::from_config(Some(&smtp), std::path::PathBuf::new()).unwrap();
    let Some(w) = one_welcome_job(backend, test, mailer.clone()).await else { return };
    let (db, store, blips, queue, runner, id) =
        (&w.db, &w.store, w.blips.clone(), w.queue.clone(), w.runner.clone(), w.id);
    let runner_b = if another_process { w.another_process(mailer) } else { runner.clone() };
    // The database takes no `email_log` row until the trigger goes.
    let raw = sqlx::SqlitePool::connect(db.url()).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER hold_email_log BEFORE INSERT ON email_log \
         BEGIN SELECT RAISE(ABORT, 'held up by the test'); END",
    )
    .execute(&raw)
    .await
    .unwrap();

    // Worker A sends, then retries its record.
    let a = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run_next("worker-a").await.unwrap() }
    });
    wait_for("A's email to arrive", Duration::from_secs(10), || async {
        (inbox.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    let a_lease = queue.get(id).await.unwrap().and_then(|j| j.lease).expect("A holds the job");
    blips.failing.lock().unwrap().insert(a_lease);
    // Worker B takes the job back, again and again, while A's record is pending.
    let stop = Arc::new(AtomicBool::new(false));
    let b = tokio::spawn({
        let (runner, queue, stop) = (runner_b, queue.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                queue.reap_expired().await.unwrap();
                queue.promote_due().await.unwrap();
                runner.run_next("worker-b").await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await; // a poll interval
            }
        }
    });
    wait_for("B's attempt to be refused (or to send again)", Duration::from_secs(20), || async {
        let job = queue.get(id).await.unwrap()?;
        let refused = job.last_error.as_deref().is_some_and(|e| e.contains("not sending it again"));
        (refused || inbox.lock().unwrap().len() > 1).then_some(())
    })
    .await;
    assert_eq!(inbox.lock().unwrap().len(), 1, "B sent the email again while A's record was pending");
    // The record lands; the job ends done, with one email.
    sqlx::query("DROP TRIGGER hold_email_log").execute(&raw).await.unwrap();
    wait_for("the job to be done", Duration::from_secs(20), || async {
        (queue.get(id).await.unwrap()?.state == JobState::Done).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), b).await.expect("B stopped").unwrap();
    tokio::time::timeout(Duration::from_secs(10), a).await.expect("A finished").unwrap();
    assert_eq!(inbox.lock().unwrap().len(), 1, "one welcome email");
    assert!(store.emails_sent(&[format!("welcome:{}", w.user_id)]).await.unwrap().len() == 1);
}

/// Retries due at once (the test's second worker takes them without waiting).
fn fast_retries() -> QueueConfig {
    QueueConfig {
        schedule: eventra::jobs::RetrySchedule { time_scale: 10_000.0, jitter: false },
        ..QueueConfig::default()
    }
}

macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::Sqlite, concat!("jobs::sqlite::", stringify!($name))).await; } )*
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::Redis, concat!("jobs::redis::", stringify!($name))).await; } )*
        }
    };
}

on_each_backend!(
    worker_killed_mid_job,
    retries_show_in_the_admin_api,
    dead_jobs_retry_now,
    permanent_failures_skip_the_retries,
    long_batches_keep_their_leases,
    welcome_email_over_smtp,
    welcome_email_to_files,
    a_send_that_outlives_its_lease_is_abandoned,
    a_sent_email_whose_record_is_pending_is_not_sent_again,
    another_process_does_not_resend_a_pending_email,
);

/// Load shedding: while the workers are working through a queue more than
/// `EVENTRA_MAX_EFFECT_LAG_MS` behind, writes are refused with 503 + `Retry-After` (the
/// backlog stops growing); once the queue is caught up they are taken again. With no
/// worker running the queue is stalled, not overloaded: writes go on (the queue and
/// outbox buffer), as during a Redis or RabbitMQ outage.
async fn writes_are_shed_while_the_workers_fall_behind(backend: Backend, test: &str) {
    let Some(s) = setup(backend, test, Kinds::default(), |c| {
        c.jobs.workers = 1;
        c.jobs.batch = 1;
        c.max_effect_lag = Duration::from_millis(600);
    })
    .await
    else {
        return;
    };
    let t = s.app.tenant("shed", 0).await;
    let path = format!("/v1/tenants/{}/users", t.id);
    // 30 jobs of 100 ms each, one at a time: about 3 s of work.
    for i in 0..30 {
        enqueue(&s.queue, NewJob::new("noop", format!("slow:{i}"), json!({"sleep_ms": 100}))).await;
    }
    let shed = wait_for("a write to be shed while the worker catches up", Duration::from_secs(10), || {
        let (app, path, key) = (&s.app, path.clone(), t.admin_key.clone());
        async move {
            let res = app.post(&path, &key, json!({"email": format!("{}@x.io", Uuid::now_v7()), "name": "S"})).await;
            (res.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(res)
        }
    })
    .await;
    assert_eq!(shed.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = shed.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("behind"), "{body}");
    // Caught up: writes are taken again.
    wait_for("writes to be taken once the queue is caught up", Duration::from_secs(30), || {
        let (app, path, key) = (&s.app, path.clone(), t.admin_key.clone());
        async move {
            let res = app.post(&path, &key, json!({"email": format!("{}@x.io", Uuid::now_v7()), "name": "S"})).await;
            (res.status() == StatusCode::CREATED).then_some(())
        }
    })
    .await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_writes_are_shed_while_the_workers_fall_behind() {
    writes_are_shed_while_the_workers_fall_behind(
        Backend::Sqlite,
        "jobs::sqlite_writes_are_shed_while_the_workers_fall_behind",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_writes_are_shed_while_the_workers_fall_behind() {
    writes_are_shed_while_the_workers_fall_behind(
        Backend::Redis,
        "jobs::redis_writes_are_shed_while_the_workers_fall_behind",
    )
    .await;
}

/// With no worker running, a queue far behind is stalled, not overloaded: writes are
/// taken (their effects wait in the queue until workers run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_workers_do_not_shed_writes() {
    let Some(s) = setup(Backend::Sqlite, "jobs::stalled_workers_do_not_shed_writes", Kinds::default(), |c| {
        c.jobs.workers = 0;
        c.max_effect_lag = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let t = s.app.tenant("stalled", 0).await;
    enqueue(&s.queue, NewJob::new("noop", "waiting", json!({}))).await;
    wait_for("the waiting job to age past the limit", Duration::from_secs(10), || async {
        s.queue.head("default").await.unwrap().filter(|(_, age)| *age > Duration::from_millis(400))
    })
    .await;
    // Past the limit for longer than a stall takes to be recognised: still taken.
    let stalled_for = eventra::jobs::lag::STALL + Duration::from_millis(500);
    let until = tokio::time::Instant::now() + stalled_for;
    let mut i = 0;
    while tokio::time::Instant::now() < until {
        let res = s
            .app
            .post(
                &format!("/v1/tenants/{}/users", t.id),
                &t.admin_key,
                json!({"email": format!("u{i}@x.io"), "name": "U"}),
            )
            .await;
        assert_eq!(res.status(), StatusCode::CREATED, "write {i} while the queue is stalled");
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.app.stop().await;
}
