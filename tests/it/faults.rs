//! Dependencies that come and go (SPEC §4): a Redis that crashes and comes back, hosts
//! whose clocks disagree. Each crashes only private instances (a `redis-server` of its
//! own, an `eventra` process of its own), never the shared services.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventra::jobs::{Enqueued, JobQueue, JobState, NewJob, QueueConfig, RedisJobQueue};
use serde_json::json;

use crate::utils::process::Spawn;
use crate::utils::{wait_for, TestApp, TestDb};

/// A Redis crash (SIGKILL) and restart: the queue's client reconnects by itself, calls
/// made while Redis is down fail within a bound instead of hanging, and what Redis
/// acknowledged before the crash is still there (AOF `appendfsync always`).
#[tokio::test]
async fn the_redis_queue_reconnects_after_a_crash_and_keeps_what_it_acknowledged() {
    const TEST: &str = "faults::the_redis_queue_reconnects_after_a_crash_and_keeps_what_it_acknowledged";
    let Some(mut redis) = crate::utils::private_redis(TEST) else { return };
    let q = RedisJobQueue::connect(&redis.url(), "eventra-fault", QueueConfig::default()).await.expect("connect");
    let Enqueued::New(before) = q.enqueue(NewJob::new("noop", "before-crash", json!({}))).await.unwrap() else {
        panic!("duplicate")
    };
    redis.kill();
    let started = Instant::now();
    assert!(q.enqueue(NewJob::new("noop", "while-down", json!({}))).await.is_err(), "Redis is down");
    assert!(started.elapsed() < Duration::from_secs(5), "a call to a dead Redis fails fast: {:?}", started.elapsed());
    redis.start_again().unwrap();
    wait_for("the client to reconnect by itself", Duration::from_secs(20), || async { q.ping().await.ok() }).await;
    let job = q.get(before).await.unwrap().expect("the job Redis acknowledged before the crash");
    assert_eq!(job.state, JobState::Ready);
    assert!(matches!(q.enqueue(NewJob::new("noop", "after-restart", json!({}))).await, Ok(Enqueued::New(_))));
}

/// Readiness answers within 2 s while Redis is down, says which dependency is down, and
/// turns ready again once Redis is back, without a restart of Eventra.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_within_two_seconds_while_redis_is_down() {
    const TEST: &str = "faults::readiness_answers_within_two_seconds_while_redis_is_down";
    let Some(mut redis) = crate::utils::private_redis(TEST) else { return };
    let db = TestDb::sqlite();
    let url = redis.url();
    let app = TestApp::start_with(db.url(), |c| c.redis_url = Some(url)).await;
    let ready = |app: &TestApp| {
        let req = app.req(reqwest::Method::GET, "/health/ready", None).timeout(Duration::from_secs(2));
        async move {
            let started = Instant::now();
            let res = req.send().await.expect("readiness answers within 2 s");
            let status = res.status();
            let body: serde_json::Value = res.json().await.expect("json");
            (status, body, started.elapsed())
        }
    };
    let (status, _, _) = ready(&app).await;
    assert_eq!(status, 200);
    redis.kill();
    for _ in 0..5 {
        let (status, body, took) = ready(&app).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["checks"]["job_queue"]["status"], "down", "{body}");
        assert_eq!(body["checks"]["database"]["status"], "up", "{body}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    redis.start_again().unwrap();
    wait_for("ready again after Redis came back", Duration::from_secs(20), || async {
        let (status, _, _) = ready(&app).await;
        (status == 200).then_some(())
    })
    .await;
    app.stop().await;
}

/// The lease holder in PostgreSQL's `leases` table: the port in `host:port/start`.
pub(crate) async fn relay_lease_port(pool: &sqlx::PgPool) -> Option<u16> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT holder FROM leases WHERE name = 'outbox-relay'").fetch_optional(pool).await.ok()?;
    row?.0.split('/').next()?.rsplit(':').next()?.parse().ok()
}

/// Two relays on one database, the second on a host whose clock runs 20 s ahead: the
/// lease is timed by the database's clock, so the skewed one stands by instead of
/// taking a live lease it thinks has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_a_fast_clock_does_not_take_a_live_lease() {
    const TEST: &str = "faults::a_relay_on_a_fast_clock_does_not_take_a_live_lease";
    let Some(db) = TestDb::postgres(TEST).await else { return };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fn env<'a>(s: Spawn<'a>, db: &str) -> Spawn<'a> {
        s.env("DATABASE_URL", db)
            .env("EVENTRA_ADMIN_TOKEN", crate::utils::app::ADMIN_TOKEN)
            .env("EVENTRA_RELAY_LEASE_MS", "3000")
            .env("EVENTRA_RELAY_POLL_MS", "200")
            .env("EVENTRA_ROLES", "api,relay,indexer")
    }
    let a = env(Spawn::new(dir_a.path()), db.url()).start();
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    let holder =
        wait_for("the first relay to hold the lease", Duration::from_secs(20), || relay_lease_port(&pool)).await;
    assert_eq!(holder, a.port());
    let Some(b) = env(Spawn::new(dir_b.path()), db.url()).skewed_clock("+20s", TEST) else { return };
    let b = b.start();
    // Several lease periods with both relays ticking: the lease never moves.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        assert_eq!(
            relay_lease_port(&pool).await,
            Some(a.port()),
            "the fast-clock relay (port {}) took the lease",
            b.port()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b));
    pool.close().await;
}

/// A worker on a host whose clock runs 40 s behind leases a job for 30 s: the lease is
/// timed by Redis's clock, so a reaper elsewhere does not see it as lapsed and the job
/// is not run a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_slow_clock_keeps_its_lease() {
    const TEST: &str = "faults::a_worker_on_a_slow_clock_keeps_its_lease";
    let Some(redis_url) = crate::utils::service_url("REDIS_URL", TEST) else { return };
    let ns = crate::utils::RedisNamespace::new(&redis_url);
    let dir = tempfile::tempdir().unwrap();
    let Some(worker) = Spawn::new(dir.path())
        .env("REDIS_URL", redis_url.clone())
        .env("EVENTRA_NAMESPACE", ns.ns.clone())
        .env("EVENTRA_ADMIN_TOKEN", crate::utils::app::ADMIN_TOKEN)
        .env("EVENTRA_ROLES", "api,worker,indexer")
        .env("EVENTRA_WORKERS", "1")
        .skewed_clock("-40s", TEST)
    else {
        return;
    };
    let _worker = worker.start();
    let q: Arc<dyn JobQueue> =
        Arc::new(RedisJobQueue::connect(&redis_url, &ns.ns, QueueConfig::default()).await.expect("connect"));
    let Enqueued::New(id) = q.enqueue(NewJob::new("noop", "slow", json!({"sleep_ms": 4000}))).await.unwrap() else {
        panic!("duplicate")
    };
    wait_for("the skewed worker to lease the job", Duration::from_secs(20), || async {
        (q.get(id).await.ok()??.state == JobState::Running).then_some(())
    })
    .await;
    // This process's reaper (a correct clock) runs while the job runs.
    let mut reaped = 0;
    while q.get(id).await.unwrap().is_some_and(|j| j.state == JobState::Running) {
        reaped += q.reap_expired().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reaped, 0, "the reaper took a live job from a worker whose clock is behind");
    let job = wait_for("the job done", Duration::from_secs(20), || async {
        q.get(id).await.ok()?.filter(|j| j.state == JobState::Done)
    })
    .await;
    assert_eq!(job.failures, 0);
}

/// The fault suite (SPEC §4, §5): Eventra as its own process on a private Redis (AOF
/// always), PostgreSQL cluster and RabbitMQ node, under a continuous load of about 50
/// operations a second, through one fault at a time: Redis SIGKILLed and started again,
/// RabbitMQ `stop_app`/`start_app`, PostgreSQL restarted, Eventra SIGKILLed and started
/// again on the same data. Readiness must answer within 2 s throughout (while Eventra
/// itself is up), writes during an outage succeed or fail fast, and afterwards every
/// committed change has every effect exactly once, nothing is parked or dead.
///
/// Then SIGTERM in every fault state: with each dependency down in turn, Eventra exits 0
/// within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dependency_fault_recovers_with_every_effect_once() {
    const TEST: &str = "faults::every_dependency_fault_recovers_with_every_effect_once";
    use eventra::chaos::harness::{check, settle, Harness, Load, ReadinessProbe};
    if !Harness::available() {
        assert!(!crate::utils::in_ci(), "{TEST}: CI=true but redis-server, PostgreSQL or RabbitMQ is not installed");
        use std::io::Write;
        let _ =
            writeln!(std::io::stderr(), "NOT RUN: {TEST}: needs redis-server, PostgreSQL server binaries and RabbitMQ");
        return;
    }
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_eventra"));
    let mut h = Harness::start(exe, &[("EVENTRA_JOB_LEASE_MS", "3000"), ("EVENTRA_RELAY_LEASE_MS", "2000")])
        .await
        .expect("private services");
    h.start_eventra().await.expect("eventra starts");
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = ReadinessProbe::start(&h.base, paused.clone()).unwrap();
    let load = Load::start(std::slice::from_ref(&h.base), &h.token, 2, 50.0).await.unwrap();
    let outage = Duration::from_secs(3);
    let between = || tokio::time::sleep(Duration::from_secs(3));

    between().await;
    h.redis.kill();
    tokio::time::sleep(outage).await;
    h.redis.start_again().unwrap();
    between().await;
    h.rabbit.stop_app().unwrap();
    tokio::time::sleep(outage).await;
    h.rabbit.start_app().unwrap();
    between().await;
    h.postgres.stop().unwrap();
    tokio::time::sleep(outage).await;
    h.postgres.start_again().unwrap();
    between().await;
    paused.store(true, std::sync::atomic::Ordering::SeqCst);
    h.kill_eventra();
    h.start_eventra().await.expect("eventra starts again on the same data");
    paused.store(false, std::sync::atomic::Ordering::SeqCst);
    between().await;

    let report = load.stop(Duration::from_secs(60)).await;
    let readiness = probe.stop().await;
    settle(&h.target(), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}; log: {}", h.log_path().display()));
    let inv = check(&h.target(), &report).await.unwrap();
    eprintln!(
        "fault suite: {inv:?}; readiness {readiness:?}; load: {} created, {} retried attempts, slowest failure {:?}",
        report.created.len(),
        report.retried_attempts,
        report.slowest_failure
    );
    assert!(report.created.len() > 300, "the load ran: {} users", report.created.len());
    assert!(inv.hold(), "invariants: {inv:?}");
    // One SIGKILL of Eventra: at most the sends it caught between the server's
    // acceptance and their record can go out again (the same Message-ID).
    assert!(inv.emails_resent <= 16, "{inv:?}");
    assert_eq!(readiness.late, 0, "readiness always answered within 2 s: {readiness:?}");
    assert!(readiness.slowest < Duration::from_secs(2), "{readiness:?}");
    for dep in ["job_queue", "event_bus", "database"] {
        assert!(readiness.down_seen.contains(dep), "readiness named {dep} down during its outage: {readiness:?}");
    }
    assert!(report.slowest_failure < Duration::from_secs(5), "writes failed fast: {:?}", report.slowest_failure);
    assert_eq!(report.unanswered, 0);

    // SIGTERM with each dependency down: a clean exit within 30 s, every time.
    for dep in ["redis", "rabbitmq", "postgres"] {
        match dep {
            "redis" => h.redis.kill(),
            "rabbitmq" => h.rabbit.stop_app().unwrap(),
            _ => h.postgres.stop().unwrap(),
        }
        let exit = h.terminate_eventra(Duration::from_secs(30)).await;
        let (status, took) = exit.unwrap_or_else(|| panic!("no exit within 30 s after SIGTERM with {dep} down"));
        assert!(status.success(), "SIGTERM with {dep} down: {status}");
        eprintln!("SIGTERM with {dep} down: exit 0 in {took:?}");
        match dep {
            "redis" => h.redis.start_again().unwrap(),
            "rabbitmq" => h.rabbit.start_app().unwrap(),
            _ => h.postgres.start_again().unwrap(),
        }
        h.start_eventra().await.expect("eventra starts again");
    }
    let exit = h.terminate_eventra(Duration::from_secs(30)).await;
    assert!(exit.is_some_and(|(s, _)| s.success()), "a clean stop");
}

/// A PostgreSQL restart cuts every connection, the group-commit lanes' too (which are
/// handed out without the pool's test round trip). The first write after it must not
/// fail for that: its transaction's first message meets the cut connection before
/// anything began, and is sent again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_after_a_postgres_restart_succeeds() {
    const TEST: &str = "faults::the_first_write_after_a_postgres_restart_succeeds";
    use eventra::chaos::services::PrivatePostgres;
    use eventra::domain::tenant::NewTenantInput;
    use eventra::domain::user::NewUserInput;
    use eventra::domain::{EventContext, NewApiKey, NewTenant, NewUser, Role};
    use eventra::store::{TenantWrite, WriteOutcome};
    if !PrivatePostgres::available() {
        assert!(!crate::utils::in_ci(), "{TEST}: CI=true but PostgreSQL's server binaries are not installed");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "NOT RUN: {TEST}: needs PostgreSQL's server binaries");
        return;
    }
    let mut pg = tokio::task::spawn_blocking(PrivatePostgres::start).await.unwrap().expect("a private PostgreSQL");
    let store = eventra::store::connect(&pg.url(), 4).await.unwrap();
    store.migrate().await.unwrap();
    let now = eventra::domain::now;
    let ctx = || EventContext::system("restart");
    let input =
        NewTenantInput { name: "R".into(), slug: "restart".into(), max_users: None, rate_limit_per_second: None };
    let tenant = NewTenant::parse(input, now()).unwrap();
    store.create_tenant(&tenant, &NewApiKey::generate(tenant.id, Role::Admin, now()), &ctx()).await.unwrap();
    let create = |email: &str| {
        let input = NewUserInput { email: email.into(), name: "R".into(), attributes: None, password: None };
        TenantWrite::CreateUser {
            user: NewUser::parse(tenant.id, input, now()).unwrap(),
            idempotency: None,
            ctx: ctx(),
        }
    };
    // Two batches at once: two lane connections open, then idle.
    let (one, two) = (vec![create("one@x.io")], vec![create("two@x.io")]);
    let (a, b) = tokio::join!(store.write_batch(tenant.id, &one), store.write_batch(tenant.id, &two));
    assert!(
        matches!((&a[0], &b[0]), (Ok(WriteOutcome::UserCreated(_)), Ok(WriteOutcome::UserCreated(_)))),
        "{a:?} {b:?}"
    );

    let mut pg = tokio::task::spawn_blocking(move || pg.restart().map(|()| pg)).await.unwrap().expect("restarted");
    let after = store.write_batch(tenant.id, &[create("three@x.io")]).await;
    assert!(matches!(&after[0], Ok(WriteOutcome::UserCreated(_))), "the write after the restart: {:?}", after[0]);
    assert_eq!(store.get_tenant(tenant.id).await.unwrap().user_count, 3);
    let _ = tokio::task::spawn_blocking(move || pg.stop()).await;
}
