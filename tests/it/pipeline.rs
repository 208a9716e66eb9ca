//! The event pipeline end to end: users created through the HTTP API while the relay,
//! a consumer and (on RabbitMQ) the broker connection are cut; every event must be
//! consumed and every effect happen exactly once, with the dead-letter queue empty.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::mailer_conformance::smtp_server;
use crate::utils::app::ADMIN_TOKEN;
use crate::utils::{wait_for, TestApp, TestDb};

/// Creates `n` users, `concurrency` at a time, each with an Idempotency-Key so a retry
/// after a 503 cannot make two; calls `at(i)` as user `i` is about to be created.
async fn create_users(
    app: &TestApp,
    tenant: &crate::utils::app::TestTenant,
    n: usize,
    concurrency: usize,
    at: impl Fn(usize) -> Option<futures::future::BoxFuture<'static, ()>>,
) {
    let created = futures::stream::iter(0..n)
        .map(|i| {
            let hook = at(i);
            async move {
                if let Some(h) = hook {
                    h.await;
                }
                let key = format!("user-{i}");
                loop {
                    let res = app
                        .req(
                            reqwest::Method::POST,
                            &format!("/v1/tenants/{}/users", tenant.id),
                            Some(&tenant.admin_key),
                        )
                        .header("Idempotency-Key", &key)
                        .json(&json!({"email": format!("u{i}@example.com"), "name": format!("User {i}")}))
                        .send()
                        .await
                        .expect("POST");
                    match res.status() {
                        StatusCode::CREATED => return,
                        StatusCode::SERVICE_UNAVAILABLE => continue,
                        other => panic!("user {i}: {other}"),
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    assert_eq!(created.len(), n);
}

/// A chaos kill through the API, as a hook to run mid-way.
fn kill(app: &TestApp, actor: &'static str) -> futures::future::BoxFuture<'static, ()> {
    let (client, url) = (app.client.clone(), format!("{}/debug/actors/{actor}/kill", app.base));
    Box::pin(async move {
        let res = client.post(url).bearer_auth(ADMIN_TOKEN).send().await.expect("kill");
        assert_eq!(res.status(), StatusCode::ACCEPTED, "kill {actor}");
    })
}

/// Waits for the pipeline to settle and checks every effect once: `n` welcome emails
/// received by the SMTP server (one per user, no resends), one audit entry per event,
/// nothing unpublished, nothing parked.
async fn assert_every_effect_once(
    app: &TestApp,
    store: &Arc<dyn eventra::store::Store>,
    bus: &Arc<dyn eventra::bus::EventBus>,
    tenant: Uuid,
    n: usize,
    inbox: &Arc<std::sync::Mutex<Vec<String>>>,
) {
    let events = n + 1; // tenant.created and one user.created per user
    wait_for("every event audited and every email sent", Duration::from_secs(180), || async {
        let audited = store.count_audit(tenant).await.ok()?;
        let mails = inbox.lock().ok()?.len();
        (audited == events as u64 && mails >= n).then_some(())
    })
    .await;
    assert!(store.unpublished_outbox(10).await.unwrap().is_empty(), "every row published");
    // Let stragglers show: no job may still be waiting or running before we count.
    wait_for("the job queue to go idle", Duration::from_secs(60), || async {
        let summary: serde_json::Value = app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.ok()?;
        let c = &summary["counts"];
        ["ready", "running", "retry", "scheduled"].iter().all(|k| c[*k] == 0).then_some(())
    })
    .await;
    let mail = inbox.lock().unwrap().clone();
    assert_eq!(mail.len(), n, "one welcome email per user, none twice");
    let mut recipients: Vec<String> =
        mail.iter().filter_map(|m| m.lines().find_map(|l| l.strip_prefix("To: ")).map(str::to_owned)).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), n, "every user got theirs");
    assert!(bus.parked(10).await.unwrap().is_empty(), "the DLQ is empty");
    let summary: serde_json::Value = app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.unwrap();
    assert_eq!(summary["counts"]["dead"], 0, "{summary}");
}

/// Must-show 4 (embedded defaults): SQLite store, embedded bus and job queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_pipeline_survives_killed_relay_and_consumer() {
    const N: usize = 2000;
    let db = TestDb::sqlite();
    let (smtp, inbox) = smtp_server::start();
    let app = TestApp::start_with(db.url(), |c| {
        c.chaos = true;
        c.smtp_url = Some(smtp.clone());
        c.pipeline.consumers = 2;
        c.jobs.workers = 4;
    })
    .await;
    let t = app.tenant("pipe", 0).await;
    create_users(&app, &t, N, 8, |i| match i {
        600 => Some(kill(&app, "outbox-relay")),
        1300 => Some(kill(&app, "event-consumer-1")),
        _ => None,
    })
    .await;
    let store = db.store().await;
    let bus: Arc<dyn eventra::bus::EventBus> = Arc::new(eventra::bus::SqliteBus::new(
        eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pools(),
        eventra::bus::BusConfig::default(),
    ));
    assert_every_effect_once(&app, &store, &bus, t.id, N, &inbox).await;
    let tree: serde_json::Value = app.get("/debug/actors", ADMIN_TOKEN).await.json().await.unwrap();
    for name in ["outbox-relay", "event-consumer-1"] {
        let node = crate::utils::find_actor(&tree, name).expect("in the tree");
        assert_eq!((node["status"].as_str(), node["restarts"].as_u64()), (Some("running"), Some(1)), "{name}");
    }
    app.stop().await;
}

/// A server on the production stack: PostgreSQL, RabbitMQ and Redis, under a fresh
/// namespace, with an SMTP server; `None` (NOT RUN) without the services.
struct Stack {
    app: TestApp,
    store: Arc<dyn eventra::store::Store>,
    bus: Arc<eventra::bus::RabbitBus>,
    ns: String,
    inbox: Arc<std::sync::Mutex<Vec<String>>>,
    _db: TestDb,
    _redis: crate::utils::RedisNamespace,
}

async fn production_stack(test: &str) -> Option<Stack> {
    production_stack_with(test, |_| {}).await
}

/// [`production_stack`], with the configuration changed by `tweak` last.
async fn production_stack_with(test: &str, tweak: impl FnOnce(&mut eventra::config::Config)) -> Option<Stack> {
    let amqp = crate::utils::service_url("AMQP_URL", test)?;
    let redis = crate::utils::service_url("REDIS_URL", test)?;
    let db = TestDb::postgres(test).await?;
    let redis_ns = crate::utils::RedisNamespace::new(&redis);
    let ns = redis_ns.ns.clone();
    let (smtp, inbox) = smtp_server::start();
    let app = TestApp::start_with(db.url(), |c| {
        c.chaos = true;
        c.smtp_url = Some(smtp.clone());
        c.amqp_url = Some(amqp.clone());
        c.redis_url = Some(redis.clone());
        c.namespace = ns.clone();
        c.pipeline.consumers = 2;
        c.pipeline.relay_lease = Duration::from_secs(2);
        c.jobs.workers = 4;
        // A killed worker's batch comes back after this (the reaper runs every third).
        c.jobs.lease = Duration::from_secs(3);
        tweak(c);
    })
    .await;
    let store = db.store().await;
    // A second client on the app's topology, to read its DLQ (declaring is idempotent:
    // same names, same arguments).
    let config = eventra::bus::BusConfig { max_deliveries: app.config.pipeline.max_deliveries, ..Default::default() };
    let bus = Arc::new(eventra::bus::RabbitBus::connect(&amqp, &ns, config).await.expect("probe connects"));
    Some(Stack { app, store, bus, ns, inbox, _db: db, _redis: redis_ns })
}

impl Stack {
    async fn finish(self) {
        self.app.stop().await;
        let _ = self.bus.delete_topology().await;
    }
}

/// Must-show 2a: PostgreSQL + RabbitMQ + Redis, the broker connections cut twice while
/// 2,000 users are created.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_pipeline_survives_broker_connection_cuts() {
    const N: usize = 2000;
    let Some(s) = production_stack("pipeline::production_pipeline_survives_broker_connection_cuts").await else {
        return;
    };
    let t = s.app.tenant("cut", 0).await;
    let ns = s.ns.clone();
    create_users(&s.app, &t, N, 8, |i| {
        // The app's connections are named after its namespace; the probe's too, which
        // only adds to the cut.
        let ns = ns.clone();
        matches!(i, 500 | 1400).then(|| -> futures::future::BoxFuture<'static, ()> {
            Box::pin(async move {
                let cut =
                    tokio::task::spawn_blocking(move || crate::utils::close_rabbitmq_connections(&ns)).await.unwrap();
                assert!(cut >= 1, "no connection to cut");
            })
        })
    })
    .await;
    let bus: Arc<dyn eventra::bus::EventBus> = s.bus.clone();
    assert_every_effect_once(&s.app, &s.store, &bus, t.id, N, &s.inbox).await;
    s.finish().await;
}

/// Must-show 2b: the same stack, the relay and a consumer killed mid-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_pipeline_survives_killed_relay_and_consumer() {
    const N: usize = 2000;
    let Some(s) = production_stack("pipeline::production_pipeline_survives_killed_relay_and_consumer").await else {
        return;
    };
    let t = s.app.tenant("kill", 0).await;
    create_users(&s.app, &t, N, 8, |i| match i {
        600 => Some(kill(&s.app, "outbox-relay")),
        1300 => Some(kill(&s.app, "event-consumer-2")),
        _ => None,
    })
    .await;
    let bus: Arc<dyn eventra::bus::EventBus> = s.bus.clone();
    assert_every_effect_once(&s.app, &s.store, &bus, t.id, N, &s.inbox).await;
    s.finish().await;
}

/// Workers and consumers killed mid-batch, on the production stack: users are created
/// while `job-worker-N` and `event-consumer-N` are killed in turn, one a second, until
/// every effect is done. A killed worker's leased batch goes back by the reaper
/// (a 3 s lease here); a killed consumer's successor settles the batch it held.
/// Every effect exactly once, no email twice (a send runs to its record even when its
/// worker dies), nothing parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_pipeline_survives_workers_and_consumers_killed_mid_batch() {
    const N: usize = 1500;
    const TEST: &str = "pipeline::production_pipeline_survives_workers_and_consumers_killed_mid_batch";
    let Some(s) = production_stack(TEST).await else { return };
    let t = s.app.tenant("midbatch", 0).await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (client, base, done) = (s.app.client.clone(), s.app.base.clone(), done.clone());
        tokio::spawn(async move {
            let targets = ["job-worker-1", "event-consumer-1", "job-worker-2", "event-consumer-2", "job-worker-3"];
            let mut kills = 0u32;
            let mut next = tokio::time::Instant::now();
            for i in 0.. {
                if done.load(std::sync::atomic::Ordering::SeqCst) || i >= 60 {
                    break;
                }
                // Pacing of the attack (one kill a second), not synchronisation.
                tokio::time::sleep_until(next).await;
                next += Duration::from_millis(1000);
                let url = format!("{base}/debug/actors/{}/kill", targets[i % targets.len()]);
                if let Ok(r) = client.post(url).bearer_auth(ADMIN_TOKEN).send().await {
                    kills += u32::from(r.status() == StatusCode::ACCEPTED);
                }
            }
            kills
        })
    };
    create_users(&s.app, &t, N, 8, |_| None).await;
    let bus: Arc<dyn eventra::bus::EventBus> = s.bus.clone();
    let store = s.store.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let audited = store.count_audit(t.id).await.unwrap_or(0);
        if audited == N as u64 + 1 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let jobs = s.app.get("/v1/admin/jobs", ADMIN_TOKEN).await.text().await.unwrap_or_default();
            let tree = s.app.get("/debug/actors", ADMIN_TOKEN).await.text().await.unwrap_or_default();
            panic!("after 180 s {audited} of {} events audited; jobs: {jobs}; tree: {tree}", N + 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer.await.unwrap();
    assert!(kills >= 5, "only {kills} kills landed");
    let metrics = s.app.get("/metrics", ADMIN_TOKEN).await.text().await.unwrap();
    let reaped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("eventra_jobs_reaped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(reaped > 0.0, "no killed worker held jobs (no lease was reaped): the kills missed every batch");
    assert_every_effect_once(&s.app, &s.store, &bus, t.id, N, &s.inbox).await;
    s.finish().await;
}

/// The port in a relay lease holder (`host:port/start`).
async fn relay_holder_port(db_url: &str) -> Option<u16> {
    let pool = sqlx::PgPool::connect(db_url).await.ok()?;
    let row: Option<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT holder, expires_at FROM leases WHERE name = 'outbox-relay'")
            .fetch_optional(&pool)
            .await
            .ok()?;
    pool.close().await;
    let (holder, expires) = row?;
    (expires > chrono::Utc::now()).then_some(())?;
    holder.split('/').next()?.rsplit(':').next()?.parse().ok()
}

fn port(app: &TestApp) -> u16 {
    app.base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
}

/// Must-show 3: two servers (two relays) on one PostgreSQL database and one broker: one
/// relay is active; kill it, a relay takes over after its lease lapses; stop the process
/// then holding the lease, the other takes over; no event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_takes_over() {
    let Some(Stack { app, store, bus, ns, inbox: _, _db, _redis }) =
        production_stack("pipeline::a_standby_relay_takes_over").await
    else {
        return;
    };
    let db_url = app.config.database_url.clone();
    let other = TestApp::start_with(&db_url, |c| {
        c.chaos = true;
        c.smtp_url = app.config.smtp_url.clone();
        c.amqp_url = app.config.amqp_url.clone();
        c.redis_url = app.config.redis_url.clone();
        c.namespace = ns.clone();
        c.pipeline.relay_lease = Duration::from_secs(2);
    })
    .await;
    let drained = || async {
        wait_for("the outbox to drain", Duration::from_secs(30), || async {
            store.unpublished_outbox(1).await.ok().filter(|r| r.is_empty())
        })
        .await
    };
    let holder = || wait_for("a relay holding the lease", Duration::from_secs(20), || relay_holder_port(&db_url));
    let mut tenants = Vec::new();

    let t1 = app.tenant("relays-a", 0).await;
    create_users(&app, &t1, 100, 4, |_| None).await;
    tenants.push((t1.id, 100));
    drained().await;
    let active = holder().await;
    assert!([port(&app), port(&other)].contains(&active), "{active}");
    let (first, second) = if active == port(&app) { (&app, &other) } else { (&other, &app) };

    // Kill the active relay: nothing renews its lease; once it lapses a relay (the
    // restarted one or the standby) takes over and publishes what piled up.
    kill(first, "outbox-relay").await;
    let t2 = second.tenant("relays-b", 0).await;
    create_users(second, &t2, 100, 4, |_| None).await;
    tenants.push((t2.id, 100));
    drained().await;

    // Stop the process that holds the lease now: the other one takes over.
    let now_active = holder().await;
    let (stopping, survivor) = if now_active == port(&app) { (app, other) } else { (other, app) };
    stopping.stop().await;
    let t3 = survivor.tenant("relays-c", 0).await;
    create_users(&survivor, &t3, 50, 4, |_| None).await;
    tenants.push((t3.id, 50));
    drained().await;
    assert_eq!(relay_holder_port(&db_url).await, Some(port(&survivor)), "the survivor took over");

    // No event lost: every event of every tenant reached its audit entry.
    for (tenant, users) in tenants {
        wait_for("every event audited", Duration::from_secs(60), || async {
            (store.count_audit(tenant).await.ok()? == users + 1).then_some(())
        })
        .await;
    }
    assert!(eventra::bus::EventBus::parked(bus.as_ref(), 10).await.unwrap().is_empty());
    survivor.stop().await;
    let _ = bus.delete_topology().await;
}

/// Invalid messages go to the DLQ at once with their reason; `/v1/admin/dlq` lists them
/// from the bus with reason and delivery count; replay puts one back on the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_parked_and_listed_in_the_admin_dlq() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let bus = eventra::bus::SqliteBus::new(
        eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pools(),
        eventra::bus::BusConfig::default(),
    );
    let bad_json = eventra::bus::BusMessage {
        id: Uuid::now_v7().to_string(),
        routing_key: "user.created".into(),
        body: b"{nope".to_vec(),
    };
    let unknown = eventra::bus::BusMessage {
        id: Uuid::now_v7().to_string(),
        routing_key: "user.exploded".into(),
        body: serde_json::to_vec(&json!({"specversion": "1.0", "type": "user.exploded", "id": "x"})).unwrap(),
    };
    eventra::bus::EventBus::publish(&bus, &[bad_json.clone(), unknown.clone()]).await.unwrap();
    let dlq = wait_for("both in GET /v1/admin/dlq", Duration::from_secs(20), || async {
        let page: serde_json::Value = app.get("/v1/admin/dlq", ADMIN_TOKEN).await.json().await.ok()?;
        (page["items"].as_array()?.len() == 2).then_some(page)
    })
    .await;
    let item = |id: &str| dlq["items"].as_array().unwrap().iter().find(|i| i["id"] == id).cloned().expect("listed");
    let (b, u) = (item(&bad_json.id), item(&unknown.id));
    assert_eq!((b["source"].as_str(), b["delivery_count"].as_u64()), (Some("event-bus"), Some(1)));
    assert!(b["reason"].as_str().unwrap().starts_with("not JSON"), "{b}");
    assert!(u["reason"].as_str().unwrap().contains("unknown type"), "{u}");
    assert_eq!(u["payload"]["type"], "user.exploded");

    // Replay: back on the bus, consumed again (and, still invalid, parked again: later).
    let pool = eventra::store::SqliteStore::connect(db.url(), 1).await.unwrap().pool().clone();
    let parked_at = || async {
        let row: Option<(Option<i64>, String)> =
            sqlx::query_as("SELECT parked_at_us, state FROM bus_messages WHERE id = $1")
                .bind(&unknown.id)
                .fetch_optional(&pool)
                .await
                .unwrap();
        row.and_then(|(at, state)| (state == "parked").then_some(at).flatten())
    };
    let first = parked_at().await.expect("parked");
    let res = app.post(&format!("/v1/admin/dlq/{}/replay", unknown.id), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for("the replayed message consumed and parked again", Duration::from_secs(20), || async {
        parked_at().await.filter(|at| *at > first)
    })
    .await;
    let res = app.post(&format!("/v1/admin/dlq/{}/replay", Uuid::now_v7()), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // Only the platform admin; discard drops a message for good.
    let res = app.get("/v1/admin/dlq", "evk_nope").await;
    crate::utils::app::expect_problem(res, StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        app.delete(&format!("/v1/admin/dlq/{}", bad_json.id), ADMIN_TOKEN).await.status(),
        StatusCode::NO_CONTENT
    );
    let res = app.delete(&format!("/v1/admin/dlq/{}", bad_json.id), ADMIN_TOKEN).await;
    crate::utils::app::expect_problem(res, StatusCode::NOT_FOUND).await;
    let page: serde_json::Value = app.get("/v1/admin/dlq", ADMIN_TOKEN).await.json().await.unwrap();
    assert!(page["items"].as_array().unwrap().iter().all(|i| i["id"] != bad_json.id), "{page}");
    app.stop().await;
}

/// A known event type whose `data` does not have that type's shape (a `user.created`
/// without a user) is parked at once with the reason, and none of its jobs is enqueued:
/// acking it with only some of its effects would lose the others silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_type_with_malformed_data_is_parked_with_none_of_its_jobs() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("malformed", 0).await;
    let pools = eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pools();
    let pool = pools.read.clone();
    let bus = eventra::bus::SqliteBus::new(pools, eventra::bus::BusConfig::default());
    let input = serde_json::from_value(json!({"email": "m@example.com", "name": "M"})).unwrap();
    let user = eventra::domain::NewUser::parse(t.id, input, eventra::domain::now()).unwrap().0;
    let mut event = eventra::domain::DomainEvent::user_created(&user, &eventra::domain::EventContext::system("t"));
    event.data = json!({"user": {"id": "not-a-user"}});
    let message = eventra::bus::BusMessage {
        id: event.id.to_string(),
        routing_key: "user.created".into(),
        body: serde_json::to_vec(&event).unwrap(),
    };
    eventra::bus::EventBus::publish(&bus, &[message]).await.unwrap();
    let parked = wait_for("the malformed event in the DLQ", Duration::from_secs(20), || async {
        let page: serde_json::Value = app.get("/v1/admin/dlq", ADMIN_TOKEN).await.json().await.ok()?;
        page["items"].as_array()?.iter().find(|i| i["id"] == event.id.to_string()).cloned()
    })
    .await;
    assert!(parked["reason"].as_str().unwrap().contains("data"), "{parked}");
    let (jobs,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE idempotency_key LIKE '%' || $1 || '%'")
        .bind(event.id.to_string())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no job of the parked event was enqueued");
    app.stop().await;
}

/// Unacked deliveries of a RabbitMQ queue, as the broker counts them.
fn rabbit_unacked(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "messages_unacknowledged", "-q"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut cols = l.split_whitespace();
        (cols.next()? == queue).then(|| cols.next()?.parse().ok()).flatten()
    })
}

/// Our own restarts must not spend a valid event's delivery attempts: with the job queue
/// down, a consumer holds its deliveries; killing it more times than the delivery limit
/// must not park them, and they all take effect once the queue is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_restarts_do_not_park_valid_events() {
    const TEST: &str = "pipeline::consumer_restarts_do_not_park_valid_events";
    let Some(amqp) = crate::utils::service_url("AMQP_URL", TEST) else { return };
    let Some(mut redis) = crate::utils::private_redis(TEST) else { return };
    let ns = format!("eventra-test-{}", Uuid::now_v7().simple());
    let db = TestDb::sqlite();
    let redis_url = redis.url();
    let app = TestApp::start_with(db.url(), |c| {
        c.chaos = true;
        c.amqp_url = Some(amqp.clone());
        c.redis_url = Some(redis_url);
        c.namespace = ns.clone();
        // The broker's delivery limit as low as it was when this test was written.
        c.pipeline.max_deliveries = 5;
    })
    .await;
    let store = db.store().await;
    let probe_config = eventra::bus::BusConfig { max_deliveries: 5, ..Default::default() };
    let probe = eventra::bus::RabbitBus::connect(&amqp, &ns, probe_config).await.unwrap();
    let t = app.tenant("restarts", 0).await;
    wait_for("the tenant's event audited", Duration::from_secs(20), || async {
        (store.count_audit(t.id).await.ok()? == 1).then_some(())
    })
    .await;
    redis.kill();
    create_users(&app, &t, 20, 4, |_| None).await;
    let work = format!("{ns}.events.work");
    let kills = app.config.pipeline.max_deliveries + 2;
    // Paced under the pipeline supervisor's restart intensity (3 in 5 s), so the kills
    // restart the consumer instead of escalating.
    let mut next_kill = tokio::time::Instant::now();
    for k in 0..kills {
        tokio::time::sleep_until(next_kill).await;
        // Generous: each look is a `rabbitmqctl` run (an Erlang VM start, listing every
        // queue of every test running), seconds each on a loaded machine.
        wait_for("the consumer to hold all 20 deliveries", Duration::from_secs(90), || {
            let work = work.clone();
            async move { tokio::task::spawn_blocking(move || rabbit_unacked(&work)).await.ok()?.filter(|n| *n == 20) }
        })
        .await;
        kill(&app, "event-consumer-1").await;
        next_kill = tokio::time::Instant::now() + Duration::from_millis(2500);
        wait_for("the consumer to run again", Duration::from_secs(20), || async {
            let tree: serde_json::Value = app.get("/debug/actors", ADMIN_TOKEN).await.json().await.ok()?;
            let node = crate::utils::find_actor(&tree, "event-consumer-1")?;
            (node["status"] == "running" && node["restarts"].as_u64()? > u64::from(k)).then_some(())
        })
        .await;
    }
    let parked = eventra::bus::EventBus::parked(&probe, 100).await.unwrap();
    assert!(parked.is_empty(), "{} valid events parked after {kills} consumer restarts", parked.len());
    redis.start_again().unwrap();
    wait_for("every event audited once Redis is back", Duration::from_secs(60), || async {
        (store.count_audit(t.id).await.ok()? == 21).then_some(())
    })
    .await;
    assert!(eventra::bus::EventBus::parked(&probe, 100).await.unwrap().is_empty());
    app.stop().await;
    let _ = probe.delete_topology().await;
}

/// SPEC §9's exactly-once counting: 10,000 custom events in batches of 500, while a
/// consumer is killed, the broker connections are cut and the other consumer is killed.
/// The analytics total equals exactly the accepted events, and so does the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_custom_events_are_counted_exactly_once_through_kills_and_cuts() {
    const BATCHES: usize = 20;
    const TEST: &str = "pipeline::production_custom_events_are_counted_exactly_once_through_kills_and_cuts";
    let Some(s) = production_stack(TEST).await else { return };
    let t = s.app.tenant("count", 0).await;
    let res = s
        .app
        .req(reqwest::Method::PUT, &format!("/v1/tenants/{}/event-types/page.viewed", t.id), Some(&t.admin_key))
        .json(&serde_json::json!({"schema": {"type": "object", "required": ["n"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let mut accepted = 0i64;
    for b in 0..BATCHES {
        match b {
            5 => kill(&s.app, "event-consumer-1").await,
            10 => {
                let ns = s.ns.clone();
                let cut =
                    tokio::task::spawn_blocking(move || crate::utils::close_rabbitmq_connections(&ns)).await.unwrap();
                assert!(cut >= 1, "no connection to cut");
            }
            15 => kill(&s.app, "event-consumer-2").await,
            _ => {}
        }
        let events: Vec<serde_json::Value> = (0..500)
            .map(|i| serde_json::json!({"type": "page.viewed", "id": format!("{b}-{i}"), "data": {"n": i}}))
            .collect();
        let body = serde_json::json!({ "events": events });
        // A client honouring backpressure: the same batch again after Retry-After (its
        // ids make a resend harmless).
        let out: serde_json::Value = wait_for("the batch accepted", Duration::from_secs(60), || async {
            let res = s.app.post(&format!("/v1/tenants/{}/events/batch", t.id), &t.admin_key, body.clone()).await;
            if res.status() == StatusCode::OK {
                return res.json().await.ok();
            }
            assert!(matches!(res.status().as_u16(), 429 | 503), "{}", res.status());
            None
        })
        .await;
        accepted += out["items"].as_array().unwrap().iter().filter(|i| i["status"] == 202).count() as i64;
    }
    assert_eq!(accepted, (BATCHES * 500) as i64, "every event accepted once (resent batches answer 200)");
    let day_path = format!("/v1/tenants/{}/analytics/events?bucket=day&type=page.viewed", t.id);
    let day = || async {
        let a: serde_json::Value = s.app.get(&day_path, &t.admin_key).await.json().await.ok()?;
        a["types"].as_array()?.first().and_then(|t| t["count"].as_i64()).or(Some(0))
    };
    wait_for("every event counted", Duration::from_secs(180), || async { (day().await? >= accepted).then_some(()) })
        .await;
    // Settled: nothing left to count twice.
    wait_for("the job queue drained", Duration::from_secs(60), || async {
        let jobs: serde_json::Value = s.app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.ok()?;
        let c = &jobs["counts"];
        (c["ready"] == 0 && c["running"] == 0 && c["retry"] == 0).then_some(())
    })
    .await;
    assert_eq!(day().await, Some(accepted), "counted exactly once");
    let audited: serde_json::Value = s
        .app
        .get(&format!("/v1/tenants/{}/audit?type=page.viewed&limit=1", t.id), &t.admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert!(audited["items"].as_array().is_some_and(|i| i.len() == 1), "{audited}");
    let total = s.store.count_audit(t.id).await.unwrap() as i64;
    assert_eq!(total, accepted + 1, "one audit entry per event (and the tenant's own)");
    s.finish().await;
}

/// A bus whose every publish takes `delay` longer (a broker slow to confirm), counting
/// how often each message id was published.
struct SlowBus {
    inner: Arc<dyn eventra::bus::EventBus>,
    delay: Duration,
    published: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

#[async_trait::async_trait]
impl eventra::bus::EventBus for SlowBus {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ping(&self) -> eventra::bus::BusResult<()> {
        self.inner.ping().await
    }
    async fn publish(&self, messages: &[eventra::bus::BusMessage]) -> eventra::bus::BusResult<()> {
        tokio::time::sleep(self.delay).await; // the slowness simulated, not a wait for anything
        self.inner.publish(messages).await?;
        let mut published = self.published.lock().unwrap();
        for m in messages {
            *published.entry(m.id.clone()).or_default() += 1;
        }
        Ok(())
    }
    async fn consume(&self, name: &str, prefetch: u16) -> eventra::bus::BusResult<Box<dyn eventra::bus::Consumer>> {
        self.inner.consume(name, prefetch).await
    }
    async fn parked(&self, limit: usize) -> eventra::bus::BusResult<Vec<eventra::bus::Parked>> {
        self.inner.parked(limit).await
    }
    async fn replay(&self, id: &str) -> eventra::bus::BusResult<bool> {
        self.inner.replay(id).await
    }
    async fn discard(&self, id: &str) -> eventra::bus::BusResult<Option<eventra::bus::BusMessage>> {
        self.inner.discard(id).await
    }
}

/// A relay working through a backlog behind a slow broker renews its lease in time:
/// it publishes for a third of its lease at most, then renews, so the fence never
/// refuses its marks and every row is published once. (It used to publish eight
/// batches between renewals; slower than the lease allowed, their marks were refused
/// and the batches published again, as the commit-order test saw under CI load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_behind_a_slow_broker_publishes_each_row_once() {
    use eventra::actors::outbox_relay::{OutboxRelay, RelayArgs};
    let db = TestDb::sqlite();
    // The backlog: written with no relay running.
    let app = TestApp::start_with(db.url(), |c| c.roles = vec!["api".into()]).await;
    let t = app.tenant("slow-broker", 0).await;
    let res = crate::custom_events::put_type(&app, &t, "step.done", json!({"type": "object"})).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    for b in 0..3 {
        let events: Vec<serde_json::Value> =
            (0..500).map(|i| json!({"type": "step.done", "data": {"b": b, "i": i}})).collect();
        let res =
            app.post(&format!("/v1/tenants/{}/events/batch", t.id), &t.admin_key, json!({"events": events})).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    app.stop().await;
    let store = db.store().await;
    let backlog = store.unpublished_outbox(10_000).await.unwrap().len();
    assert_eq!(backlog, 1_501, "the tenant's event and the custom ones");

    let pools = eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pools();
    let bus = Arc::new(SlowBus {
        inner: Arc::new(eventra::bus::SqliteBus::new(pools, eventra::bus::BusConfig::default())),
        delay: Duration::from_millis(200),
        published: Default::default(),
    });
    // Batches of 100 at 200 ms or more each: eight of them outlast the lease.
    let args = RelayArgs {
        store: store.clone(),
        bus: bus.clone(),
        holder: "slow-broker-test".into(),
        lease_ttl: Duration::from_millis(1_200),
        poll: Duration::from_millis(100),
        batch: 100,
        wake: Arc::default(),
        database_url: None,
        retention: None,
    };
    let (relay, handle) = ractor::Actor::spawn(None, OutboxRelay, args).await.unwrap();
    wait_for("the backlog published", Duration::from_secs(60), || async {
        store.unpublished_outbox(1).await.ok().filter(|r| r.is_empty())
    })
    .await;
    relay.stop(None);
    handle.await.unwrap();
    let published = bus.published.lock().unwrap().clone();
    assert_eq!(published.len(), backlog, "every row published");
    let again: Vec<_> = published.iter().filter(|(_, n)| **n > 1).collect();
    assert!(again.is_empty(), "{} rows published more than once, e.g. {:?}", again.len(), again.first());
}

/// The relay publishes each tenant's events in their commit order (`tenant_seq`) while
/// it overlaps a batch's mark with the next batch's read and publish: concurrent
/// writers on PostgreSQL (where `seq` is taken at insert, so rows of different tenants
/// become visible out of `seq` order), no consumers, then the queue read back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_relay_publishes_each_tenants_events_in_commit_order() {
    const TENANTS: usize = 6;
    const BATCHES: usize = 8;
    const PER_BATCH: usize = 100;
    const TEST: &str = "pipeline::production_relay_publishes_each_tenants_events_in_commit_order";
    let Some(s) = production_stack_with(TEST, |c| c.pipeline.consumers = 0).await else { return };
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        let t = s.app.tenant(&format!("order-{i}"), 0).await;
        let res = crate::custom_events::put_type(&s.app, &t, "step.done", json!({"type": "object"})).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        tenants.push(t);
    }
    // Every tenant's batches from two clients at once, all tenants together.
    let sends = futures::stream::iter((0..TENANTS * BATCHES).map(|k| {
        let (t, b) = (&tenants[k % TENANTS], k / TENANTS);
        let events: Vec<serde_json::Value> =
            (0..PER_BATCH).map(|i| json!({"type": "step.done", "data": {"b": b, "i": i}})).collect();
        let app = &s.app;
        async move {
            let res =
                app.post(&format!("/v1/tenants/{}/events/batch", t.id), &t.admin_key, json!({"events": events})).await;
            assert_eq!(res.status(), StatusCode::OK);
        }
    }))
    .buffer_unordered(12)
    .collect::<Vec<()>>();
    sends.await;
    let total = TENANTS * (BATCHES * PER_BATCH + 1);
    wait_for("every outbox row published", Duration::from_secs(60), || async {
        s.store.unpublished_outbox(1).await.ok().filter(|r| r.is_empty())
    })
    .await;
    let seq_of: std::collections::HashMap<String, (Uuid, i64)> = s
        .store
        .outbox_after(0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.event.id.to_string(), (r.tenant_id, r.tenant_seq)))
        .collect();
    assert_eq!(seq_of.len(), total);
    let mut sub = eventra::bus::EventBus::consume(&*s.bus, "order-reader", 500).await.unwrap();
    // The bus is at-least-once: a relay batch whose mark fails (a lapsed lease, a
    // publish confirm timed out on a loaded machine) goes out again. First deliveries
    // must be complete and in each tenant's commit order; redeliveries are counted.
    let mut first: std::collections::HashMap<Uuid, Vec<i64>> = std::collections::HashMap::new();
    let mut delivered = std::collections::HashSet::new();
    let mut redelivered = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delivered.len() < total && std::time::Instant::now() < deadline {
        let batch = sub.next_batch(500, Duration::from_millis(500)).await.unwrap();
        for d in &batch {
            let (tenant, seq) = seq_of[&d.message.id];
            if delivered.insert(d.message.id.clone()) {
                first.entry(tenant).or_default().push(seq);
            } else {
                redelivered += 1;
            }
        }
        sub.ack_many(&batch).await.unwrap();
    }
    assert_eq!(delivered.len(), total, "every event delivered");
    for (tenant, seqs) in &first {
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, &expected, "tenant {tenant}: events first delivered out of commit order");
    }
    assert_eq!(first.len(), TENANTS);
    // A failed mark resends at most the batches in flight, not the stream.
    assert!(redelivered <= total / 10, "{redelivered} of {total} events delivered again");
    s.finish().await;
}
