//! Webhooks end to end (SPEC §7) with a real HTTP receiver on loopback: every
//! subscribed event arrives once, signed (checked here with an independent HMAC), with
//! `webhook-id` = the event id on every attempt; filters and tenant isolation; retries
//! then success in the delivery log; 410 disables; secret rotation signs twice;
//! recover; and the SSRF refusals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::utils::app::TestTenant;
use crate::utils::app::{expect_problem, ADMIN_TOKEN};
use crate::utils::{wait_for, TestApp, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A loopback HTTP receiver: `POST /hook/{name}` records the request and answers the
/// next planned status for `name` (200 when none is planned).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<HashMap<String, Vec<Received>>>>,
    plans: Arc<Mutex<HashMap<String, Vec<u16>>>>,
    /// Planned status 0: the request hangs until this is notified (then answers 200).
    release: Arc<tokio::sync::Notify>,
    base: String,
}

async fn hook(
    State(r): State<Receiver>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let status = {
        let mut plans = r.plans.lock().unwrap();
        let plan = plans.entry(name.clone()).or_default();
        if plan.is_empty() {
            200
        } else {
            plan.remove(0)
        }
    };
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let got = Received {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: body.to_vec(),
        answered: status,
    };
    r.got.lock().unwrap().entry(name).or_default().push(got);
    if status == 0 {
        r.release.notified().await;
        return StatusCode::OK;
    }
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver { base: format!("http://{}", listener.local_addr().unwrap()), ..Default::default() };
        let app = axum::Router::new().route("/hook/{name}", axum::routing::post(hook)).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    fn url(&self, name: &str) -> String {
        format!("{}/hook/{name}", self.base)
    }

    fn plan(&self, name: &str, statuses: &[u16]) {
        self.plans.lock().unwrap().insert(name.to_owned(), statuses.to_vec());
    }

    fn got(&self, name: &str) -> Vec<Received> {
        self.got.lock().unwrap().get(name).cloned().unwrap_or_default()
    }

    /// Waits until `name` got `n` requests answered 2xx, and returns all it got.
    async fn wait_for_successes(&self, name: &str, n: usize) -> Vec<Received> {
        wait_for(&format!("{n} successful deliveries to {name}"), WAIT, || async {
            let got = self.got(name);
            (got.iter().filter(|g| (200..300).contains(&g.answered)).count() >= n).then_some(got)
        })
        .await
    }
}

/// Standard Webhooks verification, written here from the spec (not Eventra's code).
fn verifies(secret: &str, r: &Received) -> Vec<bool> {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", r.id, r.timestamp).as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    r.signature.split(' ').map(|s| s == expected).collect()
}

/// The Python `standardwebhooks` library verifies a delivery (when it is installed; CI
/// installs it). `None`: not installed here.
async fn python_verifies(secret: &str, r: &Received) -> Option<bool> {
    let script = "import sys\nfrom standardwebhooks.webhooks import Webhook\n\
                  s, i, t, g = sys.argv[1:5]\n\
                  Webhook(s).verify(sys.stdin.buffer.read(), {'webhook-id': i, 'webhook-timestamp': t, 'webhook-signature': g})\n";
    let probe = tokio::process::Command::new("python3").args(["-c", "import standardwebhooks"]).output().await.ok()?;
    if !probe.status.success() {
        assert!(!crate::utils::in_ci(), "python3 standardwebhooks is missing on CI (`.ci/run` installs it)");
        eprintln!("NOT RUN: the standardwebhooks check (pip install standardwebhooks)");
        return None;
    }
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", script, secret, &r.id, &r.timestamp, &r.signature])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    use tokio::io::AsyncWriteExt;
    child.stdin.take()?.write_all(&r.body).await.ok()?;
    let out = child.wait_with_output().await.ok()?;
    if !out.status.success() {
        eprintln!("standardwebhooks refused: {}", String::from_utf8_lossy(&out.stderr));
    }
    Some(out.status.success())
}

async fn app(db: &TestDb) -> TestApp {
    TestApp::start_with(db.url(), |c| {
        c.webhook_allow_private = true;
        // SPEC §7's schedule ÷ 100: retries after 50 ms, then 3 s.
        c.jobs.time_scale = 100.0;
        c.jobs.jitter = false;
    })
    .await
}

async fn endpoint(app: &TestApp, t: &TestTenant, url: &str, types: &[&str]) -> (String, String) {
    let res = app
        .post(&format!("/v1/tenants/{}/webhooks", t.id), &t.admin_key, json!({"url": url, "event_types": types}))
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert!(body["secret"].as_str().unwrap().starts_with("whsec_"));
    (body["id"].as_str().unwrap().to_owned(), body["secret"].as_str().unwrap().to_owned())
}

async fn deliveries(app: &TestApp, t: &TestTenant, id: &str) -> Vec<Value> {
    let page: Value = app
        .get(&format!("/v1/tenants/{}/webhooks/{id}/deliveries?limit=200", t.id), &t.admin_key)
        .await
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_events_arrive_once_signed_filtered_and_isolated() {
    subscribed_events(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_subscribed_events_arrive_once_signed_filtered_and_isolated() {
    let Some(db) =
        TestDb::postgres("webhooks::postgres_subscribed_events_arrive_once_signed_filtered_and_isolated").await
    else {
        return;
    };
    subscribed_events(db).await;
}

async fn subscribed_events(db: TestDb) {
    let app = app(&db).await;
    let rx = Receiver::start().await;
    let a = app.tenant("hooks-a", 0).await;
    let b = app.tenant("hooks-b", 0).await;
    let (users_hook, users_secret) = endpoint(&app, &a, &rx.url("a-users"), &["user.*"]).await;
    let (_, _) = endpoint(&app, &a, &rx.url("a-tenant"), &["tenant.updated"]).await;
    let (_, b_secret) = endpoint(&app, &b, &rx.url("b-all"), &[]).await;
    // The secret is never shown again.
    let shown: Value =
        app.get(&format!("/v1/tenants/{}/webhooks/{users_hook}", a.id), &a.admin_key).await.json().await.unwrap();
    assert!(shown.get("secret").is_none(), "{shown}");
    // B's key cannot see A's endpoints.
    let res = app.get(&format!("/v1/tenants/{}/webhooks/{users_hook}", a.id), &b.admin_key).await;
    expect_problem(res, StatusCode::NOT_FOUND).await;

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.user(&a, &format!("u{i}@a.example")).await["id"].as_str().unwrap().to_owned());
    }
    app.user(&b, "only@b.example").await;
    let res = app.patch(&format!("/v1/tenants/{}", a.id), ADMIN_TOKEN, json!({"name": "Renamed"})).await;
    assert_eq!(res.status(), StatusCode::OK);

    let got = rx.wait_for_successes("a-users", 3).await;
    let tenant_got = rx.wait_for_successes("a-tenant", 1).await;
    let b_got = rx.wait_for_successes("b-all", 1).await;
    for r in &got {
        let body = r.json();
        assert_eq!(body["type"], "user.created");
        assert_eq!(r.id, body["id"].as_str().unwrap(), "webhook-id is the event id");
        assert_eq!(verifies(&users_secret, r), [true], "the signature verifies");
        assert!(!verifies(&b_secret, r)[0], "another endpoint's secret does not");
    }
    let mut subjects: Vec<String> = got.iter().map(|r| r.json()["subject"].as_str().unwrap().to_owned()).collect();
    subjects.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(subjects, expected, "each new user once");
    // An independent implementation agrees (and refuses a tampered body).
    if let Some(ok) = python_verifies(&users_secret, &got[0]).await {
        assert!(ok, "standardwebhooks verifies Eventra's signature");
        let mut tampered = got[0].clone();
        tampered.body.push(b' ');
        assert_eq!(python_verifies(&users_secret, &tampered).await, Some(false));
    }
    assert_eq!(tenant_got[0].json()["type"], "tenant.updated");
    assert!(b_got.iter().all(|r| r.json()["tenantid"] == b.id.to_string()), "B sees only B's events");
    assert!(b_got.iter().any(|r| r.json()["type"] == "user.created"));

    // The log: one success per event, first attempt.
    let log = deliveries(&app, &a, &users_hook).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|d| d["status"] == "succeeded" && d["attempt"] == 1 && d["response_status"] == 200));

    // Nothing more arrives: no duplicates after the pipeline is idle.
    let settled = wait_for("the pipeline to go idle", WAIT, || async {
        let jobs: Value = app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.ok()?;
        let c = &jobs["counts"];
        (c["ready"] == 0 && c["running"] == 0 && c["retry"] == 0).then_some(())
    });
    settled.await;
    assert_eq!(rx.got("a-users").len(), 3, "each event exactly once");

    // The test event reaches the endpoint.
    let res = app.post(&format!("/v1/tenants/{}/webhooks/{users_hook}/test", a.id), &a.admin_key, json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let got = rx.wait_for_successes("a-users", 4).await;
    assert_eq!(got.last().unwrap().json()["type"], "webhook.test");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_the_same_id_410_disables_and_rotation_signs_twice() {
    failures_and_rotation(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failures_retry_410_disables_and_rotation_signs_twice() {
    let Some(db) = TestDb::postgres("webhooks::postgres_failures_retry_410_disables_and_rotation_signs_twice").await
    else {
        return;
    };
    failures_and_rotation(db).await;
}

async fn failures_and_rotation(db: TestDb) {
    let app = app(&db).await;
    let rx = Receiver::start().await;
    let t = app.tenant("hooks-retry", 0).await;
    let (flaky, flaky_secret) = endpoint(&app, &t, &rx.url("flaky"), &["user.created"]).await;
    let (gone, _) = endpoint(&app, &t, &rx.url("gone"), &["user.created"]).await;
    rx.plan("flaky", &[500, 503]);
    rx.plan("gone", &[410]);
    let user = app.user(&t, "retry@x.example").await;

    // Two failures, then success; the same webhook-id every time.
    let got = rx.wait_for_successes("flaky", 1).await;
    assert_eq!(got.iter().map(|g| g.answered).collect::<Vec<_>>(), [500, 503, 200]);
    assert!(got.iter().all(|g| g.id == got[0].id && g.json()["subject"] == user["id"]));
    assert!(got.iter().all(|g| verifies(&flaky_secret, g) == [true]));
    let log = wait_for("three attempts logged", WAIT, || async {
        let log = deliveries(&app, &t, &flaky).await;
        (log.len() == 3).then_some(log)
    })
    .await;
    let summary: Vec<(i64, &str, i64)> = log
        .iter()
        .map(|d| {
            (d["attempt"].as_i64().unwrap(), d["status"].as_str().unwrap(), d["response_status"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(summary, [(1, "failed", 500), (2, "failed", 503), (3, "succeeded", 200)]);
    let failed: Value = app
        .get(&format!("/v1/tenants/{}/webhooks/{flaky}/deliveries?status=failed", t.id), &t.admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(failed["items"].as_array().unwrap().len(), 2);
    // Each endpoint's attempts by outcome, for failure rates in /metrics (counted just
    // after the log row is written).
    wait_for("the endpoint's attempts in /metrics: 2 failed, 1 succeeded", WAIT, || async {
        let metrics = app.get("/metrics", ADMIN_TOKEN).await.text().await.ok()?;
        let attempts = |status: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("eventra_webhook_endpoint_attempts_total{")
                        && l.contains(&format!("endpoint_id=\"{flaky}\""))
                        && l.contains(&format!("status=\"{status}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        ((attempts("failed"), attempts("succeeded")) == (Some(2.0), Some(1.0))).then_some(())
    })
    .await;

    // 410 Gone: disabled at once, with a reason, and audited.
    let disabled = wait_for("the 410 endpoint disabled", WAIT, || async {
        let e: Value =
            app.get(&format!("/v1/tenants/{}/webhooks/{gone}", t.id), &t.admin_key).await.json().await.ok()?;
        (e["status"] == "disabled").then_some(e)
    })
    .await;
    assert!(disabled["disabled_reason"].as_str().unwrap().contains("410"), "{disabled}");
    assert_eq!(rx.got("gone").len(), 1, "no retry after 410");
    wait_for("webhook.disabled in the audit log", WAIT, || async {
        let page: Value = app
            .get(&format!("/v1/tenants/{}/audit?type=webhook.disabled", t.id), &t.admin_key)
            .await
            .json()
            .await
            .ok()?;
        (page["items"].as_array()?.len() == 1).then_some(())
    })
    .await;

    // Rotation: the next delivery carries two signatures, new then old.
    let rotated: Value = app
        .post(&format!("/v1/tenants/{}/webhooks/{flaky}/rotate-secret", t.id), &t.admin_key, json!({}))
        .await
        .json()
        .await
        .unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, flaky_secret);
    app.user(&t, "after-rotation@x.example").await;
    let got = rx.wait_for_successes("flaky", 2).await;
    let last = got.last().unwrap();
    assert_eq!(verifies(&new_secret, last), [true, false]);
    assert_eq!(verifies(&flaky_secret, last), [false, true]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_resends_what_failed_and_the_log_keeps_one_success() {
    recover(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recover_resends_what_failed() {
    let Some(db) = TestDb::postgres("webhooks::postgres_recover_resends_what_failed").await else { return };
    recover(db).await;
}

async fn recover(db: TestDb) {
    let app = app(&db).await;
    let rx = Receiver::start().await;
    let t = app.tenant("hooks-recover", 0).await;
    let (hook, _) = endpoint(&app, &t, &rx.url("down"), &["user.created"]).await;
    // Down for the first attempt and its first retry (the next one is 3 s away).
    rx.plan("down", &[502, 502]);
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    app.user(&t, "recover@x.example").await;
    wait_for("two failed attempts", WAIT, || async { (deliveries(&app, &t, &hook).await.len() >= 2).then_some(()) })
        .await;
    let pending_path = format!("/v1/tenants/{}/webhooks/{hook}/deliveries?status=pending", t.id);
    let pending = || async {
        let page: Value = app.get(&pending_path, &t.admin_key).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap().iter();
        items.map(|d| (d["attempt"].as_i64().unwrap(), d["status"].clone())).collect::<Vec<_>>()
    };
    // The third attempt is 3 s away: the event waits for it.
    assert_eq!(pending().await, [(2, json!("pending"))], "the latest failed attempt, with another due");
    let res = app
        .post(
            &format!(
                "/v1/tenants/{}/webhooks/{hook}/recover?since={}",
                t.id,
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            &t.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["resent"], 1);
    rx.wait_for_successes("down", 1).await;
    // The pending retry finds the success and sends nothing.
    wait_for("the queue to drain", WAIT, || async {
        let jobs: Value = app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.ok()?;
        let c = &jobs["counts"];
        (c["ready"] == 0 && c["running"] == 0 && c["retry"] == 0).then_some(())
    })
    .await;
    let log = deliveries(&app, &t, &hook).await;
    assert_eq!(log.iter().filter(|d| d["status"] == "succeeded").count(), 1, "{log:?}");
    assert_eq!(rx.got("down").iter().filter(|g| g.answered == 200).count(), 1);
    assert_eq!(pending().await, [], "delivered: nothing pending");
    app.stop().await;
}

/// SPEC §7's exactly-once: the worker delivering is killed mid-request (its lease
/// lapses, another worker takes the job), then the event is redelivered by the bus. The
/// receiver sees the one unavoidable resend (the same `webhook-id`: the first request
/// never got its answer back), and the log shows exactly one success; the redelivered
/// event adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_delivery_and_a_redelivered_event_log_one_success() {
    let db = TestDb::sqlite();
    let app = TestApp::start_with(db.url(), |c| {
        c.webhook_allow_private = true;
        c.chaos = true;
        c.jobs.time_scale = 100.0;
        c.jobs.jitter = false;
    })
    .await;
    let rx = Receiver::start().await;
    let t = app.tenant("hooks-kill", 0).await;
    let (hook, _) = endpoint(&app, &t, &rx.url("slow"), &["user.created"]).await;
    rx.plan("slow", &[0]);
    let user = app.user(&t, "kill@x.example").await;
    wait_for("the first request to arrive and hang", WAIT, || async { (rx.got("slow").len() == 1).then_some(()) })
        .await;
    let running: Value = app.get("/v1/admin/jobs/running?q=webhook_delivery", ADMIN_TOKEN).await.json().await.unwrap();
    let holder = running["items"][0]["worker"].as_str().expect("the delivering worker");
    let worker = holder.split('@').next().unwrap_or_default().to_owned();
    let res = app.post(&format!("/debug/actors/{worker}/kill"), ADMIN_TOKEN, json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED, "kill {worker}");
    // The lease lapses, the reaper hands the job on, the next try succeeds.
    let got = rx.wait_for_successes("slow", 1).await;
    rx.release.notify_waiters();
    assert_eq!(got.len(), 2, "the resend after the kill: {got:?}");
    assert!(got.iter().all(|g| g.id == got[0].id && g.json()["subject"] == user["id"]), "the same webhook-id");

    // The bus delivers the same event again: it becomes no second job.
    let store = eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap();
    let event_id: uuid::Uuid = got[0].id.parse().unwrap();
    let event = eventra::store::Store::outbox_event(&store, event_id).await.unwrap().expect("in the outbox");
    let bus = eventra::bus::SqliteBus::new(store.pools(), eventra::bus::BusConfig::default());
    let again = eventra::bus::BusMessage {
        id: event_id.to_string(),
        routing_key: event.event_type.as_str().into(),
        body: serde_json::to_vec(&event).unwrap(),
    };
    eventra::bus::EventBus::publish(&bus, &[again]).await.unwrap();
    let pool = store.pool().clone();
    wait_for("the redelivered event consumed", WAIT, || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM bus_messages WHERE state <> 'parked'").fetch_one(&pool).await.ok()?;
        (n == 0).then_some(())
    })
    .await;
    wait_for("the queue to drain", WAIT, || async {
        let jobs: Value = app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.ok()?;
        let c = &jobs["counts"];
        (c["ready"] == 0 && c["running"] == 0 && c["retry"] == 0).then_some(())
    })
    .await;
    assert_eq!(rx.got("slow").len(), 2, "nothing more after the redelivery");
    let log = deliveries(&app, &t, &hook).await;
    assert_eq!(log.iter().filter(|d| d["status"] == "succeeded").count(), 1, "{log:?}");
    eprintln!("killed mid-delivery: the receiver saw {} requests for 1 event (1 resend), the log 1 success", got.len());
    app.stop().await;
}

/// An endpoint whose every attempt has failed for 5 days is disabled at its next failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_five_days_is_disabled() {
    let db = TestDb::sqlite();
    let app = app(&db).await;
    let rx = Receiver::start().await;
    let t = app.tenant("hooks-5days", 0).await;
    let (hook, secret) = endpoint(&app, &t, &rx.url("dead"), &["user.created"]).await;
    rx.plan("dead", &[500; 8]);
    // The secret is encrypted at rest: the row holds neither it nor its key bytes.
    let pool = eventra::store::SqliteStore::connect(db.url(), 1).await.unwrap().pool().clone();
    let (stored,): (String,) = sqlx::query_as("SELECT secret FROM webhook_endpoints WHERE id = $1")
        .bind(hook.parse::<uuid::Uuid>().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(stored.starts_with("enc1:") && !stored.contains(&secret[6..]), "{stored}");
    // Its failing streak began six days ago.
    let store = db.store().await;
    let at = eventra::domain::now() - chrono::Duration::days(6);
    let old = eventra::domain::webhook::DeliveryAttempt {
        id: uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, at.timestamp() as u64, 0)),
        endpoint_id: hook.parse().unwrap(),
        event_id: uuid::Uuid::now_v7(),
        event_type: "user.created".into(),
        attempt: 1,
        status: "failed".into(),
        response_status: Some(500),
        duration_ms: 1,
        error: Some("down".into()),
        at,
    };
    assert_eq!(store.record_deliveries(&[old]).await.unwrap(), [true]);
    app.user(&t, "five-days@x.example").await;
    let disabled = wait_for("the endpoint disabled after its next failure", WAIT, || async {
        let e: Value =
            app.get(&format!("/v1/tenants/{}/webhooks/{hook}", t.id), &t.admin_key).await.json().await.ok()?;
        (e["status"] == "disabled").then_some(e)
    })
    .await;
    assert!(disabled["disabled_reason"].as_str().unwrap().starts_with("every attempt failed since"), "{disabled}");
    assert_eq!(rx.got("dead").len(), 1, "no retry once disabled");
    app.stop().await;
}

/// Without `EVENTRA_WEBHOOK_ALLOW_PRIVATE`, inside addresses are refused with 422.
#[tokio::test]
async fn urls_to_inside_addresses_are_refused() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("hooks-ssrf", 0).await;
    for url in [
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
        "https://100.64.0.1/hook",
        "http://example.com/hook",
    ] {
        let res = app.post(&format!("/v1/tenants/{}/webhooks", t.id), &t.admin_key, json!({"url": url})).await;
        let problem = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(problem["errors"][0]["field"], "url", "{url}: {problem}");
    }
    let res = app
        .post(
            &format!("/v1/tenants/{}/webhooks", t.id),
            &t.admin_key,
            json!({"url": "https://x.example", "event_types": ["User.Created"]}),
        )
        .await;
    let problem = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem["errors"][0]["field"], "event_types/0");
    app.stop().await;
}
