//! User search end to end: a write becomes searchable through the pipeline (outbox →
//! consumer → `index_user` job → index), waited for with a deadline.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::utils::app::{expect_problem, TestTenant};
use crate::utils::{wait_for, TestApp, TestDb};

async fn search(app: &TestApp, t: &TestTenant, q: &str) -> Vec<String> {
    let res = app.get(&format!("/v1/tenants/{}/users/search?q={}", t.id, q), &t.admin_key).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    body["items"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap().to_owned()).collect()
}

async fn until_names(app: &TestApp, t: &TestTenant, q: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("search {q:?} to give {want:?}"), Duration::from_secs(20), || {
        let want = want.clone();
        async move { (search(app, t, q).await == want).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_searchable_as_they_change_and_only_in_their_tenant() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let a = app.tenant("search-a", 0).await;
    let b = app.tenant("search-b", 0).await;
    let created: Value = app
        .post(
            &format!("/v1/tenants/{}/users", a.id),
            &a.admin_key,
            json!({"email": "countess@analytical.org", "name": "Ada Lovelace"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/v1/tenants/{}/users", b.id),
        &b.admin_key,
        json!({"email": "ada@b.example", "name": "Ada Bee"}),
    )
    .await;

    // Created: found by prefixes of its name and email, as people type.
    until_names(&app, &a, "ad", &["Ada Lovelace"]).await;
    assert_eq!(search(&app, &a, "love").await, ["Ada Lovelace"]);
    assert_eq!(search(&app, &a, "analytical.org").await, ["Ada Lovelace"]);
    // Tenant A never sees B's user, and the other way round.
    until_names(&app, &b, "ada", &["Ada Bee"]).await;
    assert_eq!(search(&app, &a, "bee").await, Vec::<String>::new());
    expect_problem(
        app.get(&format!("/v1/tenants/{}/users/search?q=ada", a.id), &b.admin_key).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Renamed: found by its new name only.
    let res =
        app.patch(&format!("/v1/tenants/{}/users/{id}", a.id), &a.admin_key, json!({"name": "Augusta King"})).await;
    assert_eq!(res.status(), StatusCode::OK);
    until_names(&app, &a, "augusta", &["Augusta King"]).await;
    assert_eq!(search(&app, &a, "lovelace ada").await, Vec::<String>::new(), "not by the old name");

    // Deleted: gone.
    let res = app.delete(&format!("/v1/tenants/{}/users/{id}", a.id), &a.admin_key).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    until_names(&app, &a, "augusta", &[]).await;

    // The indexer shows its figures in the tree view; its queue drains (audit entries
    // may still be on their way through it, so wait for that with a deadline).
    let indexer = wait_for("the indexer's queue drained", Duration::from_secs(30), || async {
        let tree: Value = app.get("/debug/actors", crate::utils::app::ADMIN_TOKEN).await.json().await.unwrap();
        let indexer = crate::utils::find_actor(&tree, "indexer").expect("the indexer in the tree").clone();
        (indexer["stats"]["queue"].as_u64() == Some(0)).then_some(indexer)
    })
    .await;
    assert_eq!((indexer["status"].as_str(), indexer["mailbox"].as_u64()), (Some("running"), Some(0)), "{indexer}");
    let stats = &indexer["stats"];
    assert!(stats["changes"].as_u64().unwrap_or(0) >= 3, "created, renamed, deleted went through it: {stats}");
    assert_eq!(
        (stats["queue"].as_u64(), stats["failures"].as_u64(), stats["breaker"].as_str()),
        (Some(0), Some(0), Some("closed"))
    );

    // Bad input: 422 that says what to fix.
    for q in ["", "q=&limit=0", "q=x&cursor=abc", "q=x&cursor=9990&limit=20"] {
        let path = if q.is_empty() {
            format!("/v1/tenants/{}/users/search", a.id)
        } else {
            format!("/v1/tenants/{}/users/search?{q}", a.id)
        };
        expect_problem(app.get(&path, &a.admin_key).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    app.stop().await;
}
