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
        eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pool().clone(),
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
