//! The audit log over HTTP: every domain event becomes an entry (through the pipeline),
//! filtered by type and time range, searched by text, paged by cursor, tenant-scoped.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::utils::app::{expect_problem, TestTenant};
use crate::utils::{wait_for, TestApp, TestDb};

async fn audit(app: &TestApp, t: &TestTenant, query: &str) -> Value {
    let res = app.get(&format!("/v1/tenants/{}/audit?{query}", t.id), &t.admin_key).await;
    assert_eq!(res.status(), StatusCode::OK, "{query}");
    res.json().await.unwrap()
}

/// The event ids of every page of `query`, following `next_cursor` to the end.
async fn every_page(app: &TestApp, t: &TestTenant, query: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let page = audit(app, t, &q).await;
        seen.extend(page["items"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return seen,
        }
    }
}

fn types(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

async fn audit_log_filters_and_pages(db: TestDb) {
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("audit", 0).await;
    let other = app.tenant("audit-other", 0).await;
    let mut ids = Vec::new();
    for who in ["alice", "bob", "carol"] {
        ids.push(app.user(&t, &format!("{who}@example.com")).await["id"].as_str().unwrap().to_owned());
    }
    let res = app
        .patch(&format!("/v1/tenants/{}/users/{}", t.id, ids[1]), &t.admin_key, json!({"name": "Robert Baker"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        app.delete(&format!("/v1/tenants/{}/users/{}", t.id, ids[2]), &t.admin_key).await.status(),
        StatusCode::NO_CONTENT
    );
    app.user(&other, "someone@else.example").await;
    // tenant.created, 3 × user.created, user.updated, user.deleted.
    let all = wait_for("every event audited", Duration::from_secs(30), || async {
        Some(audit(&app, &t, "limit=100").await).filter(|p| p["items"].as_array().unwrap().len() == 6)
    })
    .await;
    assert_eq!(
        types(&all),
        ["tenant.created", "user.created", "user.created", "user.created", "user.updated", "user.deleted"],
        "oldest first"
    );

    // By type, with before/after.
    let updated = audit(&app, &t, "type=user.updated").await;
    assert_eq!(types(&updated), ["user.updated"]);
    let e = &updated["items"][0];
    assert_eq!((e["before"]["name"].as_str(), e["after"]["name"].as_str()), (Some("Test User"), Some("Robert Baker")));
    assert_eq!(e["subject"], ids[1]);
    assert_eq!(e["actor"]["kind"], "api_key");

    // By time range: [from, to) around the third entry.
    let at = |i: usize| all["items"][i]["at"].as_str().unwrap().to_owned();
    let enc = |s: &str| s.replace('+', "%2B").replace(':', "%3A");
    let from3 = audit(&app, &t, &format!("limit=100&from={}", enc(&at(2)))).await;
    assert_eq!(from3["items"].as_array().unwrap().len(), 4, "from is inclusive");
    let before3 = audit(&app, &t, &format!("limit=100&to={}", enc(&at(2)))).await;
    assert_eq!(before3["items"].as_array().unwrap().len(), 2, "to is exclusive");

    // By text, through the search index (it follows the database shortly): every word
    // prefixes a word of the entry, any case.
    wait_for("the audit entries indexed", Duration::from_secs(30), || async {
        (types(&audit(&app, &t, "q=example").await).len() == 5).then_some(())
    })
    .await;
    assert_eq!(types(&audit(&app, &t, "q=ROBERT").await), ["user.updated"]);
    assert_eq!(types(&audit(&app, &t, "q=rob%20bak").await), ["user.updated"]);
    assert!(types(&audit(&app, &t, "q=nobody-by-this-name").await).is_empty());
    let searched = audit(&app, &t, "q=example&limit=100").await;
    assert_eq!(
        types(&searched),
        ["user.created", "user.created", "user.created", "user.updated", "user.deleted"],
        "oldest first"
    );
    assert_eq!(searched["items"][3], all["items"][4], "the index returns the whole entry");
    assert_eq!(types(&audit(&app, &t, "q=carol&type=user.deleted").await), ["user.deleted"]);
    let text_range = audit(&app, &t, &format!("q=example&limit=100&from={}&to={}", enc(&at(2)), enc(&at(4)))).await;
    assert_eq!(types(&text_range), ["user.created", "user.created"], "[from, to) in the index too");
    // Paged by cursor through the index: every match once, in order.
    let seen = every_page(&app, &t, "q=example&limit=2").await;
    let expected: Vec<String> =
        all["items"].as_array().unwrap()[1..].iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(seen, expected);

    // Paged by cursor: every entry once.
    let seen = every_page(&app, &t, "limit=4").await;
    let expected: Vec<String> =
        all["items"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(seen, expected);

    // Tenant-scoped both ways.
    expect_problem(app.get(&format!("/v1/tenants/{}/audit", t.id), &other.admin_key).await, StatusCode::NOT_FOUND)
        .await;
    let theirs = wait_for("the other tenant's entries", Duration::from_secs(30), || async {
        Some(audit(&app, &other, "limit=100").await).filter(|p| p["items"].as_array().unwrap().len() == 2)
    })
    .await;
    assert!(theirs["items"].as_array().unwrap().iter().all(|e| e["tenant_id"] == other.id.to_string()));
    let theirs = wait_for("the other tenant's entries indexed", Duration::from_secs(30), || async {
        Some(audit(&app, &other, "q=someone").await).filter(|p| p["items"].as_array().unwrap().len() == 1)
    })
    .await;
    assert_eq!(theirs["items"][0]["tenant_id"], other.id.to_string());
    assert!(types(&audit(&app, &t, "q=someone").await).is_empty(), "A's search never shows B's entries");
    assert!(types(&audit(&app, &other, "q=robert").await).is_empty(), "B's search never shows A's entries");
    assert!(types(&audit(&app, &other, "q=alice").await).is_empty());
    assert_eq!(types(&audit(&app, &t, "q=alice").await), ["user.created"]);

    // Bad input says what to fix.
    for q in ["type=user.exploded", "from=yesterday", "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "cursor=zz"]
    {
        expect_problem(
            app.get(&format!("/v1/tenants/{}/audit?{q}", t.id), &t.admin_key).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_on_sqlite() {
    audit_log_filters_and_pages(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_on_postgres() {
    let Some(db) = TestDb::postgres("audit::audit_log_on_postgres").await else { return };
    audit_log_filters_and_pages(db).await;
}

/// An `audit` job in the shape older versions enqueued (one per event, its args the
/// event, the entry not yet written) still runs after an upgrade: its entry is written
/// and indexed. The current shape (a consumed batch's entries, already written) is
/// indexed only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_jobs_of_the_older_shape_still_write_and_index_their_entry() {
    use eventra::domain::{DomainEvent, EventContext, NewUser};
    use eventra::jobs::{JobQueue, NewJob, QueueConfig, SqliteJobQueue};
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("audit-upgrade", 0).await;
    let input = serde_json::from_value(json!({"email": "zebedee@example.com", "name": "Zebedee Legacy"})).unwrap();
    let user = NewUser::parse(t.id, input, eventra::domain::now()).unwrap().0;
    let event = DomainEvent::user_created(&user, &EventContext::system("upgrade-test"));
    let queue = SqliteJobQueue::open(db.url(), QueueConfig::default()).await.unwrap();
    queue.enqueue(NewJob::new("audit", format!("audit:{}", event.id), json!(event))).await.unwrap();
    let found = wait_for("the older job's entry written and searchable", Duration::from_secs(30), || async {
        let hits = audit(&app, &t, "q=zebedee").await;
        let ids: Vec<String> =
            hits["items"].as_array()?.iter().filter_map(|e| e["event_id"].as_str().map(str::to_owned)).collect();
        (ids == [event.id.to_string()]).then_some(hits)
    })
    .await;
    assert_eq!(found["items"][0]["type"], "user.created");
    // The database of record has it too (no `q`: read from `audit_log`).
    let listed = audit(&app, &t, "type=user.created").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    app.stop().await;
}
