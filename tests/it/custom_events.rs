//! Custom events and analytics (SPEC §9) through the HTTP API: event types with JSON
//! Schema, validated and idempotent ingestion (one and in batches), tenant isolation,
//! the audit log and analytics counting every event exactly once, and backpressure.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::utils::app::{expect_problem, TestTenant};
use crate::utils::{wait_for, TestApp, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn order_schema() -> Value {
    json!({
        "type": "object",
        "required": ["order_id", "amount"],
        "properties": {
            "order_id": {"type": "string"},
            "amount": {"type": "integer", "minimum": 0},
            "lines": {"type": "array", "items": {"type": "object", "required": ["sku"]}}
        }
    })
}

pub(crate) async fn put_type(app: &TestApp, t: &TestTenant, name: &str, schema: Value) -> reqwest::Response {
    app.req(Method::PUT, &format!("/v1/tenants/{}/event-types/{name}", t.id), Some(&t.admin_key))
        .json(&json!({"schema": schema, "description": "test"}))
        .send()
        .await
        .unwrap()
}

async fn analytics(app: &TestApp, t: &TestTenant, query: &str) -> Value {
    let res = app.get(&format!("/v1/tenants/{}/analytics/events?{query}", t.id), &t.admin_key).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json().await.unwrap()
}

fn count_of(a: &Value, event_type: &str) -> i64 {
    a["types"].as_array().unwrap().iter().find(|t| t["type"] == event_type).map_or(0, |t| t["count"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_types_are_named_validated_versioned_and_deleted() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("types", 0).await;
    let res = put_type(&app, &t, "order.placed", order_schema()).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    assert_eq!((created["name"].as_str(), created["version"].as_i64()), (Some("order.placed"), Some(1)));
    let res = put_type(&app, &t, "order.placed", json!({"type": "object"})).await;
    assert_eq!(res.status(), StatusCode::OK, "replaced");
    assert_eq!(res.json::<Value>().await.unwrap()["version"], 2);

    // Invalid schemas and names say what is wrong.
    let p = expect_problem(
        put_type(&app, &t, "order.bad", json!({"type": "no-such-type"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p["errors"][0]["field"].as_str().unwrap().starts_with("schema"), "{p}");
    let p = expect_problem(
        put_type(&app, &t, "order.remote", json!({"$ref": "https://example.com/s.json"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p["errors"][0]["field"].as_str().unwrap().starts_with("schema"), "{p}");
    for (name, says) in [
        ("user.exploded", "reserved"),
        ("auth.thing", "reserved"),
        ("webhook.x", "reserved"),
        ("Order.Placed", "must match"),
        ("order", "must match"),
    ] {
        let p = expect_problem(put_type(&app, &t, name, order_schema()).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(p["errors"][0]["field"], "type", "{name}");
        assert!(p["errors"][0]["message"].as_str().unwrap().contains(says), "{name}: {p}");
    }

    // Reading needs a reader key; writing types needs admin.
    let reader = app.key(&t, "reader").await;
    let list: Value = app.get(&format!("/v1/tenants/{}/event-types", t.id), &reader).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let res = app
        .req(Method::PUT, &format!("/v1/tenants/{}/event-types/order.x", t.id), Some(&reader))
        .json(&json!({"schema": {}}))
        .send()
        .await
        .unwrap();
    expect_problem(res, StatusCode::FORBIDDEN).await;
    let one = app.get(&format!("/v1/tenants/{}/event-types/order.placed", t.id), &reader).await;
    assert_eq!(one.status(), StatusCode::OK);

    // Another tenant sees none of it.
    let other = app.tenant("types-other", 0).await;
    let res = app.get(&format!("/v1/tenants/{}/event-types", t.id), &other.admin_key).await;
    expect_problem(res, StatusCode::NOT_FOUND).await;
    let theirs: Value =
        app.get(&format!("/v1/tenants/{}/event-types", other.id), &other.admin_key).await.json().await.unwrap();
    assert_eq!(theirs["items"], json!([]));

    let res = app.delete(&format!("/v1/tenants/{}/event-types/order.placed", t.id), &t.admin_key).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = app.get(&format!("/v1/tenants/{}/event-types/order.placed", t.id), &t.admin_key).await;
    expect_problem(res, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_validated_idempotent_batched_audited_and_counted_once() {
    ingestion(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_are_validated_idempotent_batched_audited_and_counted_once() {
    let Some(db) = TestDb::postgres("custom_events::postgres_events_are_validated").await else { return };
    ingestion(db).await;
}

async fn ingestion(db: TestDb) {
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("ingest", 0).await;
    let other = app.tenant("ingest-other", 0).await;
    assert_eq!(put_type(&app, &t, "order.placed", order_schema()).await.status(), StatusCode::CREATED);
    let writer = app.key(&t, "writer").await;
    let events = format!("/v1/tenants/{}/events", t.id);

    // One event: accepted, then the same client id again answers the original.
    let res = app
        .post(&events, &writer, json!({"type": "order.placed", "id": "o-1", "data": {"order_id": "o-1", "amount": 5}}))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let first: Value = res.json().await.unwrap();
    let res = app
        .post(
            &events,
            &writer,
            json!({"type": "order.placed", "id": "o-1", "data": {"order_id": "o-1", "amount": 999}}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK, "seen before");
    assert_eq!(res.json::<Value>().await.unwrap()["id"], first["id"]);

    // Invalid data names the JSON pointer of each bad field.
    let res = app
        .post(&events, &writer, json!({"type": "order.placed", "data": {"amount": -1, "lines": [{"sku": "a"}, {}]}}))
        .await;
    let p = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    let mut fields: Vec<&str> = p["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    fields.sort();
    assert_eq!(fields, ["data", "data/amount", "data/lines/1"], "{p}");
    let res = app.post(&events, &writer, json!({"type": "order.unknown", "data": {}})).await;
    let p = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(p["errors"][0]["message"].as_str().unwrap().contains("not a registered event type"), "{p}");
    let res = app.post(&events, &writer, json!({"type": "user.created", "data": {}})).await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    let reader = app.key(&t, "reader").await;
    expect_problem(
        app.post(&events, &reader, json!({"type": "order.placed", "data": {}})).await,
        StatusCode::FORBIDDEN,
    )
    .await;

    // A batch: each item's outcome; the good ones are written, the bad ones are not.
    let batch = json!({"events": [
        {"type": "order.placed", "id": "o-2", "data": {"order_id": "o-2", "amount": 1}},
        {"type": "order.placed", "data": {"order_id": "o-3"}},
        {"type": "order.placed", "id": "o-1", "data": {"order_id": "o-1", "amount": 5}},
        {"type": "order.placed", "id": "o-2", "data": {"order_id": "o-2", "amount": 1}},
        {"typo": "order.placed"},
        {"type": "order.placed", "data": {"order_id": "o-4", "amount": 4}, "subject": "cart-9", "time": "2026-01-01T00:00:00Z"}
    ]});
    let res = app.post(&format!("{events}/batch"), &writer, batch).await;
    assert_eq!(res.status(), StatusCode::OK);
    let out: Value = res.json().await.unwrap();
    let statuses: Vec<i64> = out["items"].as_array().unwrap().iter().map(|i| i["status"].as_i64().unwrap()).collect();
    assert_eq!(statuses, [202, 422, 200, 200, 422, 202]);
    assert_eq!(out["items"][2]["id"], first["id"], "seen before: the original");
    assert_eq!(out["items"][3]["id"], out["items"][0]["id"], "twice in one batch: the first");
    assert_eq!(out["items"][1]["errors"][0]["field"], "data");
    let too_many = json!({"events": vec![json!({"type": "order.placed", "data": {}}); 501]});
    expect_problem(app.post(&format!("{events}/batch"), &writer, too_many).await, StatusCode::UNPROCESSABLE_ENTITY)
        .await;

    // Tenant isolation: the other tenant has no such type, and cannot post here.
    let res = app
        .post(
            &format!("/v1/tenants/{}/events", other.id),
            &other.admin_key,
            json!({"type": "order.placed", "data": {"order_id": "x", "amount": 1}}),
        )
        .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    expect_problem(
        app.post(&events, &other.admin_key, json!({"type": "order.placed", "data": {}})).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Processed like domain events: audited (with the data), and counted exactly once.
    let audited = wait_for("the custom events in the audit log", WAIT, || async {
        let page: Value =
            app.get(&format!("/v1/tenants/{}/audit?type=order.placed", t.id), &t.admin_key).await.json().await.ok()?;
        (page["items"].as_array()?.len() == 3).then_some(page)
    })
    .await;
    let with_subject =
        audited["items"].as_array().unwrap().iter().find(|e| e["subject"] == "cart-9").expect("the batch's last event");
    assert_eq!(with_subject["after"]["order_id"], "o-4");
    let a = wait_for("analytics to count the 3 accepted events", WAIT, || async {
        let a = analytics(&app, &t, "bucket=minute").await;
        (count_of(&a, "order.placed") == 3).then_some(a)
    })
    .await;
    assert_eq!(count_of(&a, "tenant.created"), 1, "domain events are counted too: {a}");
    let orders = a["types"].as_array().unwrap().iter().find(|t| t["type"] == "order.placed").unwrap();
    assert!(orders["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{orders}");
    assert!(orders["events_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(
        a["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "order.placed")
            .map(|i| i["count"].as_i64().unwrap())
            .sum::<i64>(),
        3
    );
    for bucket in ["hour", "day"] {
        assert_eq!(count_of(&analytics(&app, &t, &format!("bucket={bucket}")).await, "order.placed"), 3, "{bucket}");
    }
    let only = analytics(&app, &t, "type=order.placed").await;
    assert_eq!(only["types"].as_array().unwrap().len(), 1);
    assert_eq!(count_of(&analytics(&app, &other, "").await, "order.placed"), 0, "per tenant");
    let res = app.get(&format!("/v1/tenants/{}/analytics/events?bucket=week", t.id), &t.admin_key).await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    let res = app
        .get(
            &format!("/v1/tenants/{}/analytics/events?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", t.id),
            &t.admin_key,
        )
        .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;

    // A deleted type refuses new events; those accepted were processed.
    app.delete(&format!("/v1/tenants/{}/event-types/order.placed", t.id), &t.admin_key).await;
    let res =
        app.post(&events, &writer, json!({"type": "order.placed", "data": {"order_id": "o-9", "amount": 1}})).await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    app.stop().await;
}

/// With nothing processing, ingestion turns to 429 (`Retry-After`) at the tenant's
/// backlog limit; what it accepted is all processed once consumers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingestion_pushes_back_at_the_backlog_limit_and_loses_nothing() {
    let db = TestDb::sqlite();
    let app = TestApp::start_with(db.url(), |c| {
        c.roles = vec!["api".into(), "relay".into()];
        c.ingest_max_backlog = 20;
    })
    .await;
    let t = app.tenant("backlog", 0).await;
    assert_eq!(put_type(&app, &t, "order.placed", order_schema()).await.status(), StatusCode::CREATED);
    let batch = json!({"events": vec![json!({"type": "order.placed", "data": {"order_id": "x", "amount": 1}}); 5]});
    let mut accepted = 0;
    let refused = loop {
        let res = app.post(&format!("/v1/tenants/{}/events/batch", t.id), &t.admin_key, batch.clone()).await;
        if res.status() == StatusCode::OK {
            let out: Value = res.json().await.unwrap();
            accepted += out["items"].as_array().unwrap().iter().filter(|i| i["status"] == 202).count() as i64;
            assert!(accepted <= 25, "past the limit by more than one batch: {accepted}");
            continue;
        }
        break res;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let p = expect_problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(p["detail"].as_str().unwrap().contains("not yet processed"), "{p}");
    assert!(accepted >= 15, "accepted up to the limit (the tenant's own created event counts): {accepted}");
    app.stop().await;

    // Consumers and workers run again: every accepted event is processed, none twice.
    let app = TestApp::start(db.url()).await;
    let a = wait_for("every accepted event processed", WAIT, || async {
        let a = analytics(&app, &t, "bucket=day").await;
        (count_of(&a, "order.placed") >= accepted).then_some(a)
    })
    .await;
    assert_eq!(count_of(&a, "order.placed"), accepted);
    let res = app.post(&format!("/v1/tenants/{}/events/batch", t.id), &t.admin_key, batch).await;
    assert_eq!(res.status(), StatusCode::OK, "the backlog drained: accepted again");
    app.stop().await;
}

/// An unknown tenant is a 404, whether or not the backlog limit (which reads the
/// tenant) is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_an_unknown_tenant_are_a_404() {
    let db = TestDb::sqlite();
    for limit in [0, 100] {
        let app = TestApp::start_with(db.url(), |c| c.ingest_max_backlog = limit).await;
        let ghost = uuid::Uuid::now_v7();
        let one = json!({"type": "order.placed", "data": {}});
        let res = app.post(&format!("/v1/tenants/{ghost}/events"), crate::utils::app::ADMIN_TOKEN, one.clone()).await;
        expect_problem(res, StatusCode::NOT_FOUND).await;
        let batch = json!({"events": [one]});
        let res = app.post(&format!("/v1/tenants/{ghost}/events/batch"), crate::utils::app::ADMIN_TOKEN, batch).await;
        expect_problem(res, StatusCode::NOT_FOUND).await;
        app.stop().await;
    }
}

/// An event an operator discards from the dead-letter queue will never be processed:
/// it leaves its tenant's backlog, so the backlog limit does not stay reached for good.
/// Discarding is counted once (a second discard of the id is a 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_dead_letter_leaves_its_tenants_backlog() {
    use eventra::bus::{BusConfig, EventBus, SqliteBus};
    use eventra::store::Store;
    let db = TestDb::sqlite();
    // No consumer: the relay puts the events on the bus, and there they stay.
    let app = TestApp::start_with(db.url(), |c| {
        c.roles = vec!["api".into(), "relay".into()];
        c.ingest_max_backlog = 3;
    })
    .await;
    let t = app.tenant("dropped", 0).await;
    assert_eq!(put_type(&app, &t, "order.placed", order_schema()).await.status(), StatusCode::CREATED);
    let one = json!({"type": "order.placed", "data": {"order_id": "x", "amount": 1}});
    let events = format!("/v1/tenants/{}/events", t.id);
    let refused = loop {
        let res = app.post(&events, &t.admin_key, one.clone()).await;
        if res.status() != StatusCode::ACCEPTED {
            break res;
        }
    };
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let store = eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap();
    let before = store.tenant_backlog(t.id).await.unwrap().unwrap();
    assert!(before >= 3, "{before}");

    // A consumer that cannot process them parks the order events.
    let bus = SqliteBus::new(store.pools(), BusConfig::default());
    let mut consumer = bus.consume("test-parker", 50).await.unwrap();
    let mut parked = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while parked.len() < 2 && std::time::Instant::now() < deadline {
        for d in consumer.next_batch(50, Duration::from_millis(200)).await.unwrap() {
            if d.message.routing_key == "order.placed" {
                consumer.park(&d, "test: this consumer cannot process it").await.unwrap();
                parked.push(d.message.id.clone());
            }
        }
    }
    assert!(parked.len() >= 2, "order events on the bus: {parked:?}");

    let admin = crate::utils::app::ADMIN_TOKEN;
    let res = app.delete(&format!("/v1/admin/dlq/{}", parked[0]), admin).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(store.tenant_backlog(t.id).await.unwrap(), Some(before - 1), "out of the backlog");
    let res = app.delete(&format!("/v1/admin/dlq/{}", parked[0]), admin).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(store.tenant_backlog(t.id).await.unwrap(), Some(before - 1), "counted once");
    // Below the limit again: ingestion accepts (once the process reads the backlog anew).
    wait_for("ingestion accepted again", WAIT, || async {
        (app.post(&events, &t.admin_key, one.clone()).await.status() == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    app.stop().await;
}
