//! Two API servers on one database, hammered at once: the database, not the actors,
//! must hold email uniqueness and `max_users`.

use eventra::domain::{EventType, PageRequest};
use eventra::store;
use reqwest::StatusCode;
use serde_json::json;

use crate::utils::{outbox_count, TestApp, TestDb};

async fn same_email_race(db: &TestDb) {
    let (a, b) = (TestApp::start(db.url()).await, TestApp::start(db.url()).await);
    let t = a.tenant("race", 0).await;
    let path = format!("/v1/tenants/{}/users", t.id);
    let requests = (0..50).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        // Vary the case: uniqueness is case-insensitive.
        let email = if i % 3 == 0 { "Race@Example.com" } else { "race@example.com" };
        app.post(&path, &t.admin_key, json!({"email": email, "name": format!("R{i}")}))
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(requests).await.into_iter().map(|r| r.status()).collect();
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let conflicts = statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count();
    assert_eq!((created, conflicts), (1, 49), "{statuses:?}");

    let s = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(s.list_users(t.id, PageRequest::first()).await.unwrap().items.len(), 1);
    assert_eq!(outbox_count(&*s, EventType::UserCreated).await, 1);
    a.stop().await;
    b.stop().await;
}

async fn max_users_race(db: &TestDb) {
    let (a, b) = (TestApp::start(db.url()).await, TestApp::start(db.url()).await);
    let t = a.tenant("capped", 10).await;
    let path = format!("/v1/tenants/{}/users", t.id);
    let requests = (0..100).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.post(&path, &t.admin_key, json!({"email": format!("u{i}@example.com"), "name": format!("U{i}")}))
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(requests).await.into_iter().map(|r| r.status()).collect();
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count();
    assert_eq!((created, refused), (10, 90), "{statuses:?}");

    let s = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(s.list_users(t.id, PageRequest::parse(Some(200), None).unwrap()).await.unwrap().items.len(), 10);
    assert_eq!(s.get_tenant(t.id).await.unwrap().user_count, 10);
    let events = s.outbox_after(0, 10_000).await.unwrap();
    let mine: Vec<_> = events.iter().filter(|r| r.tenant_id == t.id).collect();
    assert_eq!(mine.iter().filter(|r| r.event.event_type == EventType::UserCreated).count(), 10);
    let seqs: Vec<i64> = mine.iter().map(|r| r.tenant_seq).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>(), "gap-free per-tenant order across both servers");
    a.stop().await;
    b.stop().await;
}

/// The same keyed request, retried at once through two servers: the database decides.
async fn idempotent_retries_across_servers(db: &TestDb) {
    let (a, b) = (TestApp::start(db.url()).await, TestApp::start(db.url()).await);
    let t = a.tenant("idem-two", 0).await;
    let path = format!("/v1/tenants/{}/users", t.id);
    let requests = (0..20).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.req(reqwest::Method::POST, &path, Some(&t.admin_key))
            .header("idempotency-key", "same-request")
            .json(&json!({"email": "once@example.com", "name": "Once"}))
            .send()
    });
    let mut ids = std::collections::HashSet::new();
    for r in futures::future::join_all(requests).await {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.insert(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every retry got the one user");
    let s = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(s.list_users(t.id, PageRequest::first()).await.unwrap().items.len(), 1);
    assert_eq!(outbox_count(&*s, EventType::UserCreated).await, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_servers_idempotent_retries_create_once() {
    let Some(db) = TestDb::postgres("concurrency::postgres_two_servers_idempotent_retries_create_once").await else {
        return;
    };
    idempotent_retries_across_servers(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_servers_idempotent_retries_create_once() {
    idempotent_retries_across_servers(&TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_servers_one_email_exactly_one_wins() {
    let Some(db) = TestDb::postgres("concurrency::postgres_two_servers_one_email_exactly_one_wins").await else {
        return;
    };
    same_email_race(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_servers_max_users_holds() {
    let Some(db) = TestDb::postgres("concurrency::postgres_two_servers_max_users_holds").await else { return };
    max_users_race(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_servers_one_email_exactly_one_wins() {
    same_email_race(&TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_servers_max_users_holds() {
    max_users_race(&TestDb::sqlite()).await;
}
