//! Two API servers on one database, hammered at once: the database, not the actors,
//! must hold email uniqueness and `max_users`.

use eventra::domain::{EventType, PageRequest};
use eventra::store;
use futures::StreamExt;
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

/// A counter's value in `/metrics` (0 while it has not been counted). The recorder is
/// the test process's, shared by every app in it: other tests' writes can only add.
async fn counter(app: &TestApp, series: &str) -> f64 {
    let text = app.get("/metrics", crate::utils::app::ADMIN_TOKEN).await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// On PostgreSQL, a tenant's creates after its first write are decided on the row
/// that write left, and sent as one message (`eventra_write_guesses_total`); a write
/// by another server in between makes the next guess wrong, and that write is decided
/// again on the row as it is: here the tenant filled up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_creates_go_on_a_guess_and_a_stale_guess_is_caught() {
    const COMMITTED: &str = "eventra_write_guesses_total{outcome=\"committed\"}";
    const MISSED: &str = "eventra_write_guesses_total{outcome=\"missed\"}";
    let Some(db) = TestDb::postgres("concurrency::postgres_creates_go_on_a_guess_and_a_stale_guess_is_caught").await
    else {
        return;
    };
    let (a, b) = (TestApp::start(db.url()).await, TestApp::start(db.url()).await);
    let t = a.tenant("guess", 3).await;
    a.user(&t, "one@x.io").await;
    let committed = counter(&a, COMMITTED).await;
    a.user(&t, "two@x.io").await;
    assert!(counter(&a, COMMITTED).await >= committed + 1.0, "the second create went on a guess");
    b.user(&t, "three@x.io").await;
    let missed = counter(&a, MISSED).await;
    let path = format!("/v1/tenants/{}/users", t.id);
    let res = a.post(&path, &t.admin_key, json!({"email": "four@x.io", "name": "F"})).await;
    let problem = crate::utils::app::expect_problem(res, StatusCode::CONFLICT).await;
    assert!(problem["detail"].as_str().unwrap_or_default().contains('3'), "tenant full: {problem}");
    assert!(counter(&a, MISSED).await >= missed + 1.0, "a's guess (two users) was stale");

    let s = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(s.get_tenant(t.id).await.unwrap().user_count, 3);
    let events = s.outbox_after(0, 10_000).await.unwrap();
    let seqs: Vec<i64> = events.iter().filter(|r| r.tenant_id == t.id).map(|r| r.tenant_seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "gap-free: the refused write took no number");
    a.stop().await;
    b.stop().await;
}

/// One server alone never misses a guess (`eventra_write_guesses_total`): the rows it
/// guesses are those its own last transactions leave. That includes a tenant row whose
/// lock a locking transaction (here an update) still holds when the next batch of
/// creates is sent: that statement waits on the lock, and its snapshot, taken before,
/// does not show the row as the lock's holder committed it (`pg_guess.rs`). The server
/// runs as its own process, so the counters are its alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_server_alone_never_misses_a_guess() {
    const TEST: &str = "concurrency::postgres_a_server_alone_never_misses_a_guess";
    const TENANTS: usize = 3;
    const ROUNDS: usize = 40;
    const CREATES: usize = 6;
    let Some(db) = TestDb::postgres(TEST).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = crate::utils::process::Spawn::new(dir.path())
        .env("DATABASE_URL", db.url())
        .env("EVENTRA_ROLES", "api")
        .env("EVENTRA_ADMIN_TOKEN", crate::utils::app::ADMIN_TOKEN)
        .start();
    eventra::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: String, key: String, body: serde_json::Value| {
        client.request(method, format!("{}{path}", server.base)).bearer_auth(key).json(&body).send()
    };
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        let slug = format!("alone-{i}-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        let body = json!({"name": slug, "slug": slug, "max_users": 0});
        let res = send(reqwest::Method::POST, "/v1/tenants".into(), crate::utils::app::ADMIN_TOKEN.into(), body)
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let body: serde_json::Value = res.json().await.unwrap();
        let (id, key) = (body["tenant"]["id"].as_str().unwrap().to_owned(), body["api_key"]["key"].as_str().unwrap());
        let res = send(
            reqwest::Method::POST,
            format!("/v1/tenants/{id}/users"),
            key.into(),
            json!({"email": "first@x.io", "name": "F"}),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let user: serde_json::Value = res.json().await.unwrap();
        tenants.push((id, key.to_owned(), user["id"].as_str().unwrap().to_owned()));
    }
    // Every tenant at once: an update (the locking path) and creates right behind it,
    // round after round.
    let requests = (0..ROUNDS).flat_map(|r| {
        tenants.iter().flat_map(move |(id, key, user)| {
            let update = (
                reqwest::Method::PATCH,
                format!("/v1/tenants/{id}/users/{user}"),
                key.clone(),
                json!({"name": format!("R{r}")}),
            );
            let creates = (0..CREATES).map(move |c| {
                (
                    reqwest::Method::POST,
                    format!("/v1/tenants/{id}/users"),
                    key.clone(),
                    json!({"email": format!("u{r}-{c}@x.io"), "name": "U"}),
                )
            });
            std::iter::once(update).chain(creates)
        })
    });
    let statuses: Vec<StatusCode> = futures::stream::iter(requests.map(|(m, path, key, body)| {
        let send = &send;
        async move { send(m, path, key, body).await.unwrap().status() }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    assert!(statuses.iter().all(|s| s.is_success()), "{statuses:?}");

    let metrics = send(reqwest::Method::GET, "/metrics".into(), crate::utils::app::ADMIN_TOKEN.into(), json!(null))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let guesses = |outcome: &str| {
        let series = format!("eventra_write_guesses_total{{outcome=\"{outcome}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(series.as_str())).map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    assert!(guesses("committed") >= 10.0, "creates went on guesses:\n{metrics}");
    assert_eq!((guesses("missed"), guesses("unknown")), (0.0, 0.0), "no guess of a server alone misses");

    let s = store::connect(db.url(), 2).await.unwrap();
    let events = s.outbox_after(0, 100_000).await.unwrap();
    for (id, _, _) in &tenants {
        let id: uuid::Uuid = id.parse().unwrap();
        let seqs: Vec<i64> = events.iter().filter(|r| r.tenant_id == id).map(|r| r.tenant_seq).collect();
        // tenant.created, the first user, then an update and the creates each round.
        let expected: Vec<i64> = (1..=(2 + (1 + CREATES) * ROUNDS) as i64).collect();
        assert_eq!(seqs, expected, "tenant {id}: gap-free");
        assert_eq!(s.get_tenant(id).await.unwrap().user_count, 1 + (CREATES * ROUNDS) as i64);
    }
    drop(server);
}

/// The largest batch a tenant's manager has committed (its node's `stats` in
/// `/debug/actors`).
async fn largest_batch(app: &TestApp, tenant: uuid::Uuid) -> u64 {
    let res = app.get("/debug/actors", crate::utils::app::ADMIN_TOKEN).await;
    let root: serde_json::Value = res.json().await.unwrap();
    crate::utils::find_actor(&root, &format!("tenant-{tenant}"))
        .and_then(|n| n["stats"]["largest_batch"].as_u64())
        .unwrap_or(0)
}

/// Group commit under a burst of concurrent requests to two tenants at once: batches
/// form (asserted), and every rule holds as if each request had run alone: one winner
/// per email, `max_users` exact, one user per idempotency key (the other identical
/// requests replay it, a different body is refused), gap-free `tenant_seq`, and one
/// event per committed change.
async fn concurrent_burst_forms_batches_and_keeps_every_rule(db: &TestDb) {
    let app = TestApp::start(db.url()).await;
    let open = app.tenant("burst-open", 0).await;
    let capped = app.tenant("burst-capped", 10).await;
    let post = |t: &crate::utils::app::TestTenant, body: serde_json::Value, key: Option<&str>| {
        let mut req = app.req(reqwest::Method::POST, &format!("/v1/tenants/{}/users", t.id), Some(&t.admin_key));
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.json(&body).send()
    };
    let mut requests = Vec::new();
    // open: 20 × one email (any case), 10 × one key with one body, 5 × one key with two
    // bodies, 40 distinct emails.
    for i in 0..20 {
        let email = if i % 2 == 0 { "dup@x.io" } else { "DUP@x.io" };
        requests.push(("dup", post(&open, json!({"email": email, "name": format!("D{i}")}), None)));
    }
    for _ in 0..10 {
        requests.push(("same-key", post(&open, json!({"email": "keyed@x.io", "name": "K"}), Some("same"))));
    }
    for i in 0..5 {
        let body = json!({"email": format!("diff{}@x.io", i % 2), "name": "M"});
        requests.push(("diff-key", post(&open, body, Some("diff"))));
    }
    for i in 0..40 {
        requests.push(("unique", post(&open, json!({"email": format!("u{i}@x.io"), "name": "U"}), None)));
    }
    // capped: 40 distinct emails for 10 places.
    for i in 0..40 {
        requests.push(("capped", post(&capped, json!({"email": format!("c{i}@x.io"), "name": "C"}), None)));
    }
    let (labels, futures): (Vec<&str>, Vec<_>) = requests.into_iter().unzip();
    let mut answers: std::collections::HashMap<&str, Vec<(StatusCode, serde_json::Value)>> = Default::default();
    for (label, res) in labels.into_iter().zip(futures::future::join_all(futures).await) {
        let res = res.unwrap();
        let status = res.status();
        answers.entry(label).or_default().push((status, res.json().await.unwrap_or_default()));
    }
    let count = |label: &str, status: StatusCode| answers[label].iter().filter(|(s, _)| *s == status).count();

    assert_eq!((count("dup", StatusCode::CREATED), count("dup", StatusCode::CONFLICT)), (1, 19));
    let keyed: std::collections::HashSet<&str> = answers["same-key"]
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::CREATED);
            b["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(keyed.len(), 1, "ten identical keyed requests, one user");
    assert!(count("diff-key", StatusCode::CREATED) >= 1);
    let diff_users: std::collections::HashSet<&str> = answers["diff-key"]
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(diff_users.len(), 1, "one user for the key");
    assert_eq!(
        count("diff-key", StatusCode::CREATED) + count("diff-key", StatusCode::UNPROCESSABLE_ENTITY),
        5,
        "the key with another body is refused: {:?}",
        answers["diff-key"]
    );
    assert_eq!(count("unique", StatusCode::CREATED), 40);
    assert_eq!((count("capped", StatusCode::CREATED), count("capped", StatusCode::CONFLICT)), (10, 30));

    let batches = largest_batch(&app, open.id).await.max(largest_batch(&app, capped.id).await);
    assert!(batches > 1, "the burst must have formed batches (largest: {batches})");

    let s = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(s.get_tenant(open.id).await.unwrap().user_count, 43);
    assert_eq!(s.get_tenant(capped.id).await.unwrap().user_count, 10);
    let events = s.outbox_after(0, 100_000).await.unwrap();
    for (t, users) in [(open.id, 43), (capped.id, 10)] {
        let mine: Vec<_> = events.iter().filter(|r| r.tenant_id == t).collect();
        assert_eq!(mine.iter().filter(|r| r.event.event_type == EventType::UserCreated).count(), users);
        let seqs: Vec<i64> = mine.iter().map(|r| r.tenant_seq).collect();
        assert_eq!(seqs, (1..=users as i64 + 1).collect::<Vec<_>>(), "gap-free, in commit order");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_burst_forms_batches_and_keeps_every_rule() {
    concurrent_burst_forms_batches_and_keeps_every_rule(&TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_burst_forms_batches_and_keeps_every_rule() {
    let Some(db) = TestDb::postgres("concurrency::postgres_concurrent_burst_forms_batches_and_keeps_every_rule").await
    else {
        return;
    };
    concurrent_burst_forms_batches_and_keeps_every_rule(&db).await;
}
