//! The REST API over real HTTP: status codes, problem bodies, tenant isolation on every
//! user route, idempotent retries and request-id propagation. Embedded SQLite backend.

use eventra::domain::EventType;
use eventra::store;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::utils::app::{expect_problem, ADMIN_TOKEN};
use crate::utils::{outbox_count, TestApp, TestDb};

#[tokio::test]
async fn authentication_and_tenant_admin() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;

    // 401: no token, wrong scheme, unknown token.
    expect_problem(app.req(Method::GET, "/v1/tenants", None).send().await.unwrap(), StatusCode::UNAUTHORIZED).await;
    let basic = app.req(Method::GET, "/v1/tenants", None).header("authorization", "Basic abc").send().await.unwrap();
    expect_problem(basic, StatusCode::UNAUTHORIZED).await;
    let res = app.get("/v1/tenants", "evk_not-a-real-key").await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    expect_problem(res, StatusCode::UNAUTHORIZED).await;

    // 201 with the tenant and a one-time admin key.
    let res = app.post("/v1/tenants", ADMIN_TOKEN, json!({"name": "Acme", "slug": "acme"})).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["tenant"]["slug"], "acme");
    assert_eq!(body["tenant"]["max_users"], 0);
    assert_eq!(body["api_key"]["role"], "admin");
    let key = body["api_key"]["key"].as_str().unwrap().to_owned();
    let id = body["tenant"]["id"].as_str().unwrap().to_owned();

    // 409 duplicate slug, 422 invalid fields (each named), 400 malformed JSON,
    // 415 wrong content type, 413 oversized body, 422 unknown field.
    let p = expect_problem(
        app.post("/v1/tenants", ADMIN_TOKEN, json!({"name": "A2", "slug": "acme"})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("acme"));
    let p = expect_problem(
        app.post("/v1/tenants", ADMIN_TOKEN, json!({"name": "", "slug": "No!"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let fields: Vec<&str> = p["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["name", "slug"]);
    let raw = app
        .req(Method::POST, "/v1/tenants", Some(ADMIN_TOKEN))
        .header("content-type", "application/json")
        .body("{\"name\":");
    expect_problem(raw.send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    let text = app.req(Method::POST, "/v1/tenants", Some(ADMIN_TOKEN)).body("name=x");
    expect_problem(text.send().await.unwrap(), StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let huge = json!({"name": "x".repeat(100_000), "slug": "huge"});
    expect_problem(app.post("/v1/tenants", ADMIN_TOKEN, huge).await, StatusCode::PAYLOAD_TOO_LARGE).await;
    let p = expect_problem(
        app.post("/v1/tenants", ADMIN_TOKEN, json!({"name": "X", "slug": "xyz", "plan": "gold"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("plan"), "names the unknown field: {p}");
    let p = expect_problem(
        app.post("/v1/tenants", ADMIN_TOKEN, json!({"name": "X", "slug": "xyz", "max_users": -1})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("max_users"), "{p}");

    // Listing: admin yes, tenant key no (403); bad paging input is a 4xx.
    let list: Value = app.get("/v1/tenants", ADMIN_TOKEN).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["next_cursor"], Value::Null);
    expect_problem(app.get("/v1/tenants", &key).await, StatusCode::FORBIDDEN).await;
    expect_problem(app.get("/v1/tenants?limit=0", ADMIN_TOKEN).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    expect_problem(app.get("/v1/tenants?limit=ten", ADMIN_TOKEN).await, StatusCode::BAD_REQUEST).await;
    expect_problem(app.get("/v1/tenants?cursor=garbage", ADMIN_TOKEN).await, StatusCode::UNPROCESSABLE_ENTITY).await;

    // A tenant key reads its own tenant; PATCH/DELETE are platform-admin only.
    assert_eq!(app.get(&format!("/v1/tenants/{id}"), &key).await.status(), StatusCode::OK);
    expect_problem(app.patch(&format!("/v1/tenants/{id}"), &key, json!({"name": "Mine"})).await, StatusCode::FORBIDDEN)
        .await;
    let patched: Value =
        app.patch(&format!("/v1/tenants/{id}"), ADMIN_TOKEN, json!({"max_users": 5})).await.json().await.unwrap();
    assert_eq!(patched["max_users"], 5);
    expect_problem(
        app.patch(&format!("/v1/tenants/{id}"), ADMIN_TOKEN, json!({"slug": "new"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect_problem(app.get("/v1/tenants/not-a-uuid", ADMIN_TOKEN).await, StatusCode::BAD_REQUEST).await;
    expect_problem(app.get(&format!("/v1/tenants/{}", Uuid::now_v7()), ADMIN_TOKEN).await, StatusCode::NOT_FOUND).await;

    // Routing problems are problems too.
    expect_problem(app.get("/v1/nothing-here", ADMIN_TOKEN).await, StatusCode::NOT_FOUND).await;
    expect_problem(
        app.req(Method::PUT, "/v1/tenants", Some(ADMIN_TOKEN)).send().await.unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;

    // Delete: 204, then the tenant and its key are gone.
    expect_problem(app.delete(&format!("/v1/tenants/{id}"), &key).await, StatusCode::FORBIDDEN).await;
    assert_eq!(app.delete(&format!("/v1/tenants/{id}"), ADMIN_TOKEN).await.status(), StatusCode::NO_CONTENT);
    expect_problem(app.get(&format!("/v1/tenants/{id}"), ADMIN_TOKEN).await, StatusCode::NOT_FOUND).await;
    expect_problem(app.get(&format!("/v1/tenants/{id}"), &key).await, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

#[tokio::test]
async fn user_lifecycle_and_status_codes() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("users", 0).await;
    let users = format!("/v1/tenants/{}/users", t.id);

    // 201 with ETag and Location.
    let res = app
        .post(&users, &t.admin_key, json!({"email": "Ada@Example.com", "name": " Ada ", "attributes": {"plan": "pro"}}))
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["etag"], "\"1\"");
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let u: Value = res.json().await.unwrap();
    assert_eq!(
        (u["name"].as_str(), u["status"].as_str(), u["version"].as_i64()),
        (Some("Ada"), Some("active"), Some(1))
    );
    assert_eq!(u["attributes"]["plan"], "pro");
    assert_eq!(location, format!("{users}/{}", u["id"].as_str().unwrap()));

    // 200 GET with ETag.
    let res = app.get(&location, &t.admin_key).await;
    assert_eq!((res.status(), res.headers()["etag"].to_str().unwrap()), (StatusCode::OK, "\"1\""));
    assert_eq!(res.json::<Value>().await.unwrap(), u);

    // 409 duplicate email (case-insensitive), 422 invalid input.
    let p = expect_problem(
        app.post(&users, &t.admin_key, json!({"email": "ADA@example.COM", "name": "Other"})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("already exists"));
    let p = expect_problem(
        app.post(&users, &t.admin_key, json!({"email": "not-an-email", "name": "X"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "email");
    expect_problem(app.post(&users, &t.admin_key, json!({"email": "x@y.io"})).await, StatusCode::UNPROCESSABLE_ENTITY)
        .await;
    expect_problem(
        app.post(&users, &t.admin_key, json!({"email": "x@y.io", "name": "X", "attributes": [1]})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;

    // PATCH with If-Match: 200 + new ETag; the same stale If-Match again: 412.
    let res = app
        .req(Method::PATCH, &location, Some(&t.admin_key))
        .header("if-match", "\"1\"")
        .json(&json!({"name": "Ada L."}))
        .send()
        .await
        .unwrap();
    assert_eq!((res.status(), res.headers()["etag"].to_str().unwrap()), (StatusCode::OK, "\"2\""));
    let res = app
        .req(Method::PATCH, &location, Some(&t.admin_key))
        .header("if-match", "\"1\"")
        .json(&json!({"name": "Lost update"}))
        .send()
        .await
        .unwrap();
    let p = expect_problem(res, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(p["current_version"], 2);
    let res = app
        .req(Method::PATCH, &location, Some(&t.admin_key))
        .header("if-match", "yesterday")
        .json(&json!({"name": "X"}))
        .send()
        .await
        .unwrap();
    expect_problem(res, StatusCode::BAD_REQUEST).await;
    expect_problem(
        app.patch(&location, &t.admin_key, json!({"status": "banished"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let current: Value = app.get(&location, &t.admin_key).await.json().await.unwrap();
    assert_eq!(
        (current["name"].as_str(), current["version"].as_i64()),
        (Some("Ada L."), Some(2)),
        "refused patches changed nothing"
    );

    // Roles: a reader reads but cannot write; a writer cannot mint keys.
    let reader = app.key(&t, "reader").await;
    let writer = app.key(&t, "writer").await;
    assert_eq!(app.get(&users, &reader).await.status(), StatusCode::OK);
    expect_problem(app.post(&users, &reader, json!({"email": "r@x.io", "name": "R"})).await, StatusCode::FORBIDDEN)
        .await;
    expect_problem(app.delete(&location, &reader).await, StatusCode::FORBIDDEN).await;
    assert_eq!(app.post(&users, &writer, json!({"email": "w@x.io", "name": "W"})).await.status(), StatusCode::CREATED);
    expect_problem(
        app.post(&format!("/v1/tenants/{}/api-keys", t.id), &writer, json!({"role": "admin"})).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    expect_problem(
        app.post(&format!("/v1/tenants/{}/api-keys", t.id), &t.admin_key, json!({"role": "root"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;

    // Bad ids and paging.
    expect_problem(app.get(&format!("{users}/123"), &t.admin_key).await, StatusCode::BAD_REQUEST).await;
    expect_problem(app.get(&format!("{users}/{}", Uuid::now_v7()), &t.admin_key).await, StatusCode::NOT_FOUND).await;
    expect_problem(app.get(&format!("{users}?limit=1000"), &t.admin_key).await, StatusCode::UNPROCESSABLE_ENTITY).await;

    // Pagination over HTTP.
    let first: Value = app.get(&format!("{users}?limit=1"), &t.admin_key).await.json().await.unwrap();
    assert_eq!(first["items"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"].as_str().expect("more pages");
    let second: Value = app.get(&format!("{users}?limit=1&cursor={cursor}"), &t.admin_key).await.json().await.unwrap();
    assert_eq!(second["items"][0]["email"], "w@x.io");
    assert_eq!(second["next_cursor"], Value::Null);

    // DELETE with a stale If-Match: 412; then 204; then 404.
    let res = app.req(Method::DELETE, &location, Some(&t.admin_key)).header("if-match", "\"1\"").send().await.unwrap();
    expect_problem(res, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(app.delete(&location, &writer).await.status(), StatusCode::NO_CONTENT);
    expect_problem(app.get(&location, &t.admin_key).await, StatusCode::NOT_FOUND).await;
    expect_problem(app.delete(&location, &t.admin_key).await, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

#[tokio::test]
async fn tenant_max_users_answers_409_and_writes_nothing() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("small", 1).await;
    app.user(&t, "one@x.io").await;
    let p = expect_problem(
        app.post(&format!("/v1/tenants/{}/users", t.id), &t.admin_key, json!({"email": "two@x.io", "name": "Two"}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(p["type"], "urn:eventra:problem:tenant-user-limit");
    let tenant: Value = app.get(&format!("/v1/tenants/{}", t.id), &t.admin_key).await.json().await.unwrap();
    assert_eq!(tenant["user_count"], 1);
    let list: Value = app.get(&format!("/v1/tenants/{}/users", t.id), &t.admin_key).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "no user row from the refused create");
    let s = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(outbox_count(&*s, EventType::UserCreated).await, 1, "no event from the refused create");

    // Attributes the database could not store, or consumers could not read back: 422.
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "k": deep });
    }
    let big = app.tenant("roomy", 0).await;
    let roomy = format!("/v1/tenants/{}/users", big.id);
    expect_problem(
        app.post(&roomy, &big.admin_key, json!({"email": "d@x.io", "name": "D", "attributes": deep})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect_problem(
        app.post(&roomy, &big.admin_key, json!({"email": "n@x.io", "name": "N", "attributes": {"a": "x\u{0}y"}})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    app.stop().await;
}

/// Every user route, called with tenant X's key on tenant Y's resources, answers 404 and
/// changes nothing, in both directions.
#[tokio::test]
async fn tenant_isolation_on_every_user_route() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let a = app.tenant("iso-a", 0).await;
    let b = app.tenant("iso-b", 0).await;
    let ua = app.user(&a, "a@x.io").await;
    let ub = app.user(&b, "b@x.io").await;

    for (me, other, other_user) in [(&a, &b, &ub), (&b, &a, &ua)] {
        let other_id = other_user["id"].as_str().unwrap();
        let k = &me.admin_key;
        // Through the other tenant's path…
        let theirs = format!("/v1/tenants/{}/users", other.id);
        expect_problem(app.get(&theirs, k).await, StatusCode::NOT_FOUND).await;
        expect_problem(
            app.post(&theirs, k, json!({"email": "intruder@x.io", "name": "I"})).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        expect_problem(app.get(&format!("{theirs}/{other_id}"), k).await, StatusCode::NOT_FOUND).await;
        expect_problem(
            app.patch(&format!("{theirs}/{other_id}"), k, json!({"name": "Owned"})).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        expect_problem(app.delete(&format!("{theirs}/{other_id}"), k).await, StatusCode::NOT_FOUND).await;
        expect_problem(
            app.post(&format!("/v1/tenants/{}/api-keys", other.id), k, json!({"role": "admin"})).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        expect_problem(app.get(&format!("/v1/tenants/{}", other.id), k).await, StatusCode::NOT_FOUND).await;
        // …and through my own path with their user's id.
        let mine = format!("/v1/tenants/{}/users", me.id);
        expect_problem(app.get(&format!("{mine}/{other_id}"), k).await, StatusCode::NOT_FOUND).await;
        expect_problem(
            app.patch(&format!("{mine}/{other_id}"), k, json!({"name": "Owned"})).await,
            StatusCode::NOT_FOUND,
        )
        .await;
        expect_problem(app.delete(&format!("{mine}/{other_id}"), k).await, StatusCode::NOT_FOUND).await;
        let list: Value = app.get(&mine, k).await.json().await.unwrap();
        assert!(list["items"].as_array().unwrap().iter().all(|u| u["tenant_id"] == me.id.to_string()));
    }
    // Nothing changed on either side.
    for (t, u) in [(&a, &ua), (&b, &ub)] {
        let now: Value = app
            .get(&format!("/v1/tenants/{}/users/{}", t.id, u["id"].as_str().unwrap()), &t.admin_key)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(&now, u);
        let list: Value = app.get(&format!("/v1/tenants/{}/users", t.id), &t.admin_key).await.json().await.unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
    }
    app.stop().await;
}

#[tokio::test]
async fn idempotent_post_retries_return_the_first_answer() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("idem", 0).await;
    let users = format!("/v1/tenants/{}/users", t.id);
    let post = |key: &'static str, body: Value| {
        app.req(Method::POST, &users, Some(&t.admin_key)).header("idempotency-key", key).json(&body).send()
    };

    let first = post("retry-1", json!({"email": "a@x.io", "name": "A"})).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    // Same key, same body (keys in another order): same answer, marked as a replay.
    let again = post("retry-1", json!({"name": "A", "email": "a@x.io"})).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["etag"], "\"1\"");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    // Same key, other body: 422.
    let p = expect_problem(
        post("retry-1", json!({"email": "b@x.io", "name": "B"})).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["type"], "urn:eventra:problem:idempotency-key-reused");

    // Ten concurrent retries of one new request: one creation, ten identical answers.
    let results =
        futures::future::join_all((0..10).map(|_| post("burst", json!({"email": "c@x.io", "name": "C"})))).await;
    let mut ids = std::collections::HashSet::new();
    for r in results {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.insert(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "all retries got the same user");
    let list: Value = app.get(&users, &t.admin_key).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);

    let store = store::connect(db.url(), 2).await.unwrap();
    assert_eq!(outbox_count(&*store, EventType::UserCreated).await, 2, "replays emit no events");
    app.stop().await;
}

#[tokio::test]
async fn request_id_is_echoed_and_becomes_the_correlation_id() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("corr", 0).await;
    let res = app
        .req(Method::POST, &format!("/v1/tenants/{}/users", t.id), Some(&t.admin_key))
        .header("x-request-id", "trace-abc-123")
        .json(&json!({"email": "c@x.io", "name": "C"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-abc-123");
    let user: Value = res.json().await.unwrap();
    // An unusable id is replaced, not echoed.
    let res =
        app.req(Method::GET, "/health/live", None).header("x-request-id", "bad id with spaces").send().await.unwrap();
    assert_ne!(res.headers()["x-request-id"], "bad id with spaces");

    let store = store::connect(db.url(), 2).await.unwrap();
    let event = store
        .outbox_after(0, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.event.event_type == EventType::UserCreated)
        .expect("user.created event")
        .event;
    assert_eq!(event.correlationid, "trace-abc-123");
    assert_eq!(event.subject, user["id"].as_str().unwrap());
    assert_eq!(serde_json::to_value(&event.actor).unwrap()["kind"], "api_key");
    app.stop().await;
}

#[tokio::test]
async fn health_endpoints_report_dependencies() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let live = app.req(Method::GET, "/health/live", None).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let ready = app.req(Method::GET, "/health/ready", None).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"]["status"], "up");
    assert_eq!(body["checks"]["database"]["backend"], "sqlite");
    assert_eq!(body["checks"]["actors"]["status"], "up");
    app.stop().await;
}

/// SIGTERM, for load balancers: readiness answers 503 at once while requests are still
/// served for the grace; then new connections are refused, and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_readiness_503_first_then_closes_the_listener() {
    let db = TestDb::sqlite();
    let mut app = TestApp::start_with(db.url(), |c| c.drain_grace = std::time::Duration::from_millis(1500)).await;
    // A client with no pooled connection, so each request opens its own.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let base = app.base.clone();
    let url = |p: &str| format!("{base}{p}");
    let before = fresh().get(url("/health/ready")).send().await.unwrap();
    assert_eq!(before.status(), StatusCode::OK);
    assert!(before.headers().get("connection").is_none(), "kept alive before the drain");
    let began = std::time::Instant::now();
    app.begin_stop();
    let draining = crate::utils::wait_for("readiness 503", std::time::Duration::from_secs(5), || async {
        let res = fresh().get(url("/health/ready")).send().await.ok()?;
        (res.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(res)
    })
    .await;
    assert!(draining.headers().contains_key("retry-after"));
    assert_eq!(draining.json::<Value>().await.unwrap()["status"], "draining");
    // Still serving during the grace: liveness and the API, on new connections.
    assert!(began.elapsed() < std::time::Duration::from_millis(1000), "checked within the grace");
    assert_eq!(fresh().get(url("/health/live")).send().await.unwrap().status(), StatusCode::OK);
    let res = fresh().get(url("/v1/tenants")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // …each answer asking the client not to reuse the connection.
    assert_eq!(res.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"));
    // Then the listener closes.
    crate::utils::wait_for("new connections refused", std::time::Duration::from_secs(10), || async {
        fresh().get(url("/health/live")).send().await.err().filter(|e| e.is_connect()).map(|_| ())
    })
    .await;
    assert!(began.elapsed() >= std::time::Duration::from_millis(1500), "not before the grace");
    app.stop().await;
}

/// A client that sends its whole (oversized) body before reading the answer, as Python's
/// urllib does, still reads the 413 problem instead of a connection reset.
#[tokio::test]
async fn an_oversized_body_sent_whole_still_gets_its_413() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let addr = app.base.strip_prefix("http://").unwrap().to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_write_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        let body = vec![b' '; 5 * 1024 * 1024];
        let head = format!(
            "POST /v1/tenants HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(|e| format!("writing the head: {e}"))?;
        s.write_all(&body).map_err(|e| format!("writing the body: {e}"))?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                        break;
                    }
                }
                Err(e) if answer.is_empty() => return Err(format!("reading the answer: {e}")),
                Err(_) => break,
            }
        }
        Ok::<_, String>(String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .unwrap()
    .expect("the client reads an answer");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    app.stop().await;
}
