//! The `SearchIndex` conformance suite: the same functions run against every backend
//! (tantivy here; the OpenSearch adapter joins when it exists and `OPENSEARCH_URL` is set).

use std::sync::Arc;

use eventra::search::{IndexOp, SearchIndex, TantivyIndex, UserDoc};
use uuid::Uuid;

type Make = fn() -> (Box<dyn std::any::Any + Send>, Arc<dyn SearchIndex>);

fn user(tenant: Uuid, name: &str, email: &str) -> UserDoc {
    UserDoc { tenant_id: tenant, user_id: Uuid::now_v7(), email: email.into(), name: name.into(), version: 1 }
}

async fn names(ix: &Arc<dyn SearchIndex>, tenant: Uuid, q: &str) -> Vec<String> {
    ix.search_users(tenant, q, 0, 50).await.unwrap().items.into_iter().map(|u| u.name).collect()
}

pub async fn finds_users_by_prefixes_of_name_and_email(make: Make) {
    let (_g, ix) = make();
    let t = Uuid::now_v7();
    let docs = [
        user(t, "Ada Lovelace", "ada@analytical.org"),
        user(t, "Adam Smith", "adam@wealth.example"),
        user(t, "Grace Hopper", "grace@navy.mil"),
    ];
    ix.apply(&docs.iter().cloned().map(IndexOp::UpsertUser).collect::<Vec<_>>()).await.unwrap();
    // As people type: "a", "ad", "ada"…
    let mut a = names(&ix, t, "ad").await;
    a.sort();
    assert_eq!(a, ["Ada Lovelace", "Adam Smith"]);
    // A whole-word match ranks before a prefix-only one.
    assert_eq!(names(&ix, t, "ada").await, ["Ada Lovelace", "Adam Smith"]);
    assert_eq!(names(&ix, t, "adam").await, ["Adam Smith"]);
    // Every word must match; any case; email words too.
    assert_eq!(names(&ix, t, "LOVE ad").await, ["Ada Lovelace"]);
    assert_eq!(names(&ix, t, "navy").await, ["Grace Hopper"]);
    assert_eq!(names(&ix, t, "grace@navy.mil").await, ["Grace Hopper"]);
    assert!(names(&ix, t, "zebra").await.is_empty());
    assert!(names(&ix, t, "  ").await.is_empty(), "an empty query matches nothing");
}

pub async fn tenants_never_see_each_other(make: Make) {
    let (_g, ix) = make();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    ix.apply(&[
        IndexOp::UpsertUser(user(a, "Shared Name", "same@example.com")),
        IndexOp::UpsertUser(user(b, "Shared Name", "same@example.com")),
        IndexOp::UpsertUser(user(b, "Only B", "b@example.com")),
    ])
    .await
    .unwrap();
    let hits_a = ix.search_users(a, "shared", 0, 50).await.unwrap().items;
    assert_eq!(hits_a.len(), 1);
    assert!(hits_a.iter().all(|u| u.tenant_id == a));
    assert!(names(&ix, a, "only").await.is_empty(), "A never sees B's users");
    assert_eq!(names(&ix, b, "only").await, ["Only B"]);
    assert_eq!(ix.search_users(b, "shared", 0, 50).await.unwrap().items.len(), 1);
}

pub async fn updates_replace_and_deletes_remove(make: Make) {
    let (_g, ix) = make();
    let t = Uuid::now_v7();
    let mut u = user(t, "Old Name", "person@example.com");
    ix.apply(&[IndexOp::UpsertUser(u.clone())]).await.unwrap();
    u.name = "New Name".into();
    u.version = 2;
    ix.apply(&[IndexOp::UpsertUser(u.clone())]).await.unwrap();
    assert_eq!(names(&ix, t, "new").await, ["New Name"]);
    assert!(names(&ix, t, "old").await.is_empty(), "found by its new name only");
    // A late, older version does not win.
    let stale = UserDoc { name: "Stale Name".into(), version: 1, ..u.clone() };
    ix.apply(&[IndexOp::UpsertUser(stale)]).await.unwrap();
    assert_eq!(names(&ix, t, "name").await, ["New Name"]);
    ix.apply(&[IndexOp::DeleteUser { tenant_id: t, user_id: u.user_id }]).await.unwrap();
    assert!(names(&ix, t, "new").await.is_empty());
    // Deleting a tenant removes all its users, and only its users.
    let other = Uuid::now_v7();
    ix.apply(&[
        IndexOp::UpsertUser(user(t, "Gone One", "g1@example.com")),
        IndexOp::UpsertUser(user(t, "Gone Two", "g2@example.com")),
        IndexOp::UpsertUser(user(other, "Gone Not", "g3@example.com")),
        IndexOp::DeleteTenant { tenant_id: t },
    ])
    .await
    .unwrap();
    assert!(names(&ix, t, "gone").await.is_empty());
    assert_eq!(names(&ix, other, "gone").await, ["Gone Not"]);
}

pub async fn pages_through_hits(make: Make) {
    let (_g, ix) = make();
    let t = Uuid::now_v7();
    let ops: Vec<_> =
        (0..25).map(|i| IndexOp::UpsertUser(user(t, &format!("Member {i}"), &format!("m{i}@x.io")))).collect();
    ix.apply(&ops).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut offset = Some(0);
    let mut pages = 0;
    while let Some(o) = offset {
        let page = ix.search_users(t, "member", o, 10).await.unwrap();
        assert!(page.items.len() <= 10);
        for u in page.items {
            assert!(seen.insert(u.user_id), "no user on two pages");
        }
        offset = page.next_offset;
        pages += 1;
    }
    assert_eq!((seen.len(), pages), (25, 3));
}

pub async fn concurrent_changes_are_all_applied(make: Make) {
    let (_g, ix) = make();
    let t = Uuid::now_v7();
    let docs: Vec<UserDoc> = (0..40).map(|i| user(t, &format!("Parallel {i}"), &format!("p{i}@x.io"))).collect();
    let writes = docs.iter().cloned().map(|d| {
        let ix = ix.clone();
        async move { ix.apply(&[IndexOp::UpsertUser(d)]).await }
    });
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    // Each apply returned only once its change was searchable.
    assert_eq!(ix.search_users(t, "parallel", 0, 100).await.unwrap().items.len(), 40);
    // Within one batch, a stale version after a newer one does not win either.
    let mut u = docs[0].clone();
    u.version = 5;
    u.name = "Fifth".into();
    let stale = UserDoc { version: 4, name: "Fourth".into(), ..u.clone() };
    ix.apply(&[IndexOp::UpsertUser(u), IndexOp::UpsertUser(stale)]).await.unwrap();
    assert_eq!(names(&ix, t, "fifth").await, ["Fifth"]);
    assert!(names(&ix, t, "fourth").await.is_empty());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod tantivy {
            use super::*;

            fn make() -> (Box<dyn std::any::Any + Send>, Arc<dyn SearchIndex>) {
                let dir = tempfile::tempdir().expect("temp dir");
                let ix = Arc::new(TantivyIndex::open(dir.path()).expect("open index"));
                (Box::new(dir), Arc::new(ix) as Arc<dyn SearchIndex>)
            }

            $( #[tokio::test] async fn $name() { super::$name(make).await; } )*
        }
    };
}

conformance!(
    finds_users_by_prefixes_of_name_and_email,
    tenants_never_see_each_other,
    updates_replace_and_deletes_remove,
    pages_through_hits,
    concurrent_changes_are_all_applied,
);

/// The on-disk index keeps what was committed across a reopen.
#[tokio::test]
async fn tantivy_index_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let t = Uuid::now_v7();
    {
        let ix: Arc<dyn SearchIndex> = Arc::new(Arc::new(TantivyIndex::open(dir.path()).unwrap()));
        ix.apply(&[IndexOp::UpsertUser(user(t, "Persisted Person", "p@x.io"))]).await.unwrap();
    }
    let ix: Arc<dyn SearchIndex> = Arc::new(Arc::new(TantivyIndex::open(dir.path()).unwrap()));
    assert_eq!(names(&ix, t, "pers").await, ["Persisted Person"]);
}

/// `reindex` rebuilds the index from the database: an index that lost everything (or
/// holds stale documents) answers like one fed by the pipeline.
#[tokio::test]
async fn reindex_rebuilds_the_index_from_the_database() {
    let db = crate::utils::TestDb::sqlite();
    let store = db.store().await;
    let ctx = eventra::domain::EventContext::system("reindex-test");
    let input =
        eventra::domain::tenant::NewTenantInput { name: "Re".into(), slug: "reindex-t".into(), max_users: None };
    let t = eventra::domain::NewTenant::parse(input, eventra::domain::now()).unwrap();
    let key = eventra::domain::NewApiKey::generate(t.id, eventra::domain::Role::Admin, eventra::domain::now());
    let tenant = store.create_tenant(&t, &key, &ctx).await.unwrap();
    for i in 0..1200 {
        let input = eventra::domain::user::NewUserInput {
            email: format!("member{i}@example.com"),
            name: format!("Member {i}"),
            attributes: None,
        };
        let u = eventra::domain::NewUser::parse(tenant.id, input, eventra::domain::now()).unwrap();
        store.create_user(&u, None, &ctx).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let ix: Arc<dyn SearchIndex> = Arc::new(Arc::new(TantivyIndex::open(dir.path()).unwrap()));
    // A stale document the database no longer has.
    ix.apply(&[IndexOp::UpsertUser(user(tenant.id, "Member Ghost", "ghost@example.com"))]).await.unwrap();
    let done = eventra::search::reindex::reindex(&store, &ix, None, false).await.unwrap();
    assert_eq!((done.tenants, done.users), (1, 1200));
    let mut found = std::collections::HashSet::new();
    let mut offset = Some(0);
    while let Some(o) = offset {
        let page = ix.search_users(tenant.id, "member", o, 100).await.unwrap();
        found.extend(page.items.into_iter().map(|u| u.email));
        offset = page.next_offset;
    }
    let expected: std::collections::HashSet<String> = (0..1200).map(|i| format!("member{i}@example.com")).collect();
    assert_eq!(found, expected, "exactly the database's users");
}
