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

/// An index that, the first time it is asked to upsert a user, first lets a deletion win
/// the race: the user (or the whole tenant) is deleted in the database and its unindex
/// change applied, as a concurrent delete and its job would, before the upsert lands.
struct DeleteWinsTheRace {
    inner: std::sync::Arc<eventra::search::TantivyIndex>,
    store: std::sync::Arc<dyn eventra::store::Store>,
    whole_tenant: bool,
    fired: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl eventra::search::SearchIndex for DeleteWinsTheRace {
    fn backend(&self) -> &'static str {
        "test"
    }
    async fn apply(&self, ops: &[eventra::search::IndexOp]) -> eventra::search::SearchResult<()> {
        use eventra::search::IndexOp;
        let upsert = ops.iter().find_map(|op| match op {
            IndexOp::UpsertUser(u) => Some(u.clone()),
            _ => None,
        });
        if let Some(u) = upsert.filter(|_| !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst)) {
            let ctx = eventra::domain::EventContext::system("race");
            let unindex = if self.whole_tenant {
                self.store.delete_tenant(u.tenant_id, &ctx).await.unwrap();
                IndexOp::DeleteTenant { tenant_id: u.tenant_id }
            } else {
                self.store.delete_user(u.tenant_id, u.user_id, None, &ctx).await.unwrap();
                IndexOp::DeleteUser { tenant_id: u.tenant_id, user_id: u.user_id }
            };
            self.inner.apply(&[unindex]).await?;
        }
        self.inner.apply(ops).await
    }
    async fn search_users(
        &self,
        tenant_id: uuid::Uuid,
        q: &str,
        offset: u32,
        limit: u32,
    ) -> eventra::search::SearchResult<eventra::search::Hits<eventra::search::UserDoc>> {
        self.inner.search_users(tenant_id, q, offset, limit).await
    }
    async fn search_audit(
        &self,
        tenant_id: uuid::Uuid,
        filter: &eventra::store::AuditFilter,
        page: eventra::domain::PageRequest,
    ) -> eventra::search::SearchResult<eventra::domain::Page<eventra::domain::AuditEntry>> {
        self.inner.search_audit(tenant_id, filter, page).await
    }
}

/// SPEC §5: a deleted user never reappears in search. The `index_user` job reads the
/// user, then upserts it; a delete (of the user, or of its tenant) and its unindex
/// change that land in between must not be undone by that upsert.
async fn a_deletion_that_wins_the_race_stays_deleted(whole_tenant: bool) {
    use eventra::jobs::{JobClient, JobQueue, Kinds, QueueConfig, Runner, RunnerConfig, SqliteJobQueue};
    use std::sync::Arc;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let ctx = eventra::domain::EventContext::system("race");
    let tenant = eventra::domain::NewTenant::parse(
        serde_json::from_value(json!({"name": "Race", "slug": format!("race-{}", whole_tenant)})).unwrap(),
        eventra::domain::now(),
    )
    .unwrap();
    let key = eventra::domain::NewApiKey::generate(tenant.id, eventra::domain::Role::Admin, eventra::domain::now());
    store.create_tenant(&tenant, &key, &ctx).await.unwrap();
    let input = serde_json::from_value(json!({"email": "grace@navy.mil", "name": "Grace Hopper"})).unwrap();
    let user = eventra::domain::NewUser::parse(tenant.id, input, eventra::domain::now()).unwrap();
    store.create_user(&user, None, &ctx).await.unwrap();

    let inner = Arc::new(eventra::search::TantivyIndex::in_memory().unwrap());
    let index: Arc<dyn eventra::search::SearchIndex> = Arc::new(DeleteWinsTheRace {
        inner: inner.clone(),
        store: store.clone(),
        whole_tenant,
        fired: Default::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let mailer = eventra::mail::from_config(None, dir.path().join("mail")).unwrap();
    let sealer =
        std::sync::Arc::new(
            eventra::webhooks::secret_box::SecretBox::from_base64(
                &eventra::webhooks::secret_box::SecretBox::generate_key(),
            )
            .unwrap(),
        );
    let kinds = Kinds::standard(store.clone(), mailer, "Eventra <no-reply@example.com>".into(), index, sealer);
    let queue: Arc<dyn JobQueue> = Arc::new(
        SqliteJobQueue::open(&format!("sqlite://{}", dir.path().join("jobs.db").display()), QueueConfig::default())
            .await
            .unwrap(),
    );
    let client = JobClient::new(queue.clone(), &kinds);
    client.enqueue(eventra::jobs::kinds::index::IndexArgs::index_user(tenant.id, user.0.id, 1)).await.unwrap();
    let config = RunnerConfig { queues: vec![eventra::jobs::kinds::index::QUEUE.into()], ..RunnerConfig::default() };
    let runner = Runner::new(client, kinds, config);
    assert!(runner.run_next("w").await.unwrap(), "the index job ran");
    let hits = eventra::search::SearchIndex::search_users(&inner, tenant.id, "grace", 0, 10).await.unwrap();
    assert!(hits.items.is_empty(), "the deleted user came back into the index: {:?}", hits.items);
}

#[tokio::test]
async fn a_user_deleted_while_being_indexed_stays_deleted() {
    a_deletion_that_wins_the_race_stays_deleted(false).await;
}

#[tokio::test]
async fn a_tenant_deleted_while_its_user_is_being_indexed_stays_deleted() {
    a_deletion_that_wins_the_race_stays_deleted(true).await;
}
