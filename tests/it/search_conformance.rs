//! The `SearchIndex` conformance suite: the same functions run against every backend:
//! tantivy always, OpenSearch when `OPENSEARCH_URL` is set (no OpenSearch server runs on
//! our machines or in CI, so there it prints NOT RUN; the adapter's request bodies are
//! pinned by unit tests in `src/search/opensearch.rs`).

use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use eventra::domain::{Actor, AuditEntry, PageRequest};
use eventra::search::{IndexOp, OpenSearchIndex, SearchIndex, TantivyIndex, UserDoc};
use eventra::store::AuditFilter;
use serde_json::json;
use uuid::Uuid;

/// A backend under test and what keeps it alive (and cleans it up), or `None` (NOT RUN).
type Make = fn() -> Option<(Box<dyn std::any::Any + Send>, Arc<dyn SearchIndex>)>;

fn user(tenant: Uuid, name: &str, email: &str) -> UserDoc {
    UserDoc { tenant_id: tenant, user_id: Uuid::now_v7(), email: email.into(), name: name.into(), version: 1 }
}

async fn names(ix: &Arc<dyn SearchIndex>, tenant: Uuid, q: &str) -> Vec<String> {
    ix.search_users(tenant, q, 0, 50).await.unwrap().items.into_iter().map(|u| u.name).collect()
}

pub async fn finds_users_by_prefixes_of_name_and_email(make: Make) {
    let Some((_g, ix)) = make() else { return };
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
    let Some((_g, ix)) = make() else { return };
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
    let Some((_g, ix)) = make() else { return };
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

pub async fn a_prune_removes_what_was_not_rewritten(make: Make) {
    let Some((_g, ix)) = make() else { return };
    let (t, other) = (Uuid::now_v7(), Uuid::now_v7());
    let (kept, gone) = (user(t, "Kept Member", "kept@x.io"), user(t, "Gone Member", "gone@x.io"));
    let theirs = user(other, "Other Member", "other@x.io");
    ix.apply(&[
        IndexOp::UpsertUser(kept.clone()),
        IndexOp::UpsertUser(gone.clone()),
        IndexOp::UpsertUser(theirs.clone()),
    ])
    .await
    .unwrap();
    // A rebuild starts, rewrites what the database still has (same version), prunes.
    let started = chrono::Utc::now();
    ix.apply(&[IndexOp::UpsertUser(kept.clone())]).await.unwrap();
    ix.apply(&[IndexOp::PruneTenant { tenant_id: t, before: started }]).await.unwrap();
    assert_eq!(names(&ix, t, "member").await, ["Kept Member"]);
    assert_eq!(names(&ix, other, "member").await, ["Other Member"], "other tenants are untouched");
}

pub async fn pages_through_hits(make: Make) {
    let Some((_g, ix)) = make() else { return };
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
    let Some((_g, ix)) = make() else { return };
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

fn entry(tenant: Uuid, i: i64, event_type: &str, name: &str) -> AuditEntry {
    let base = Utc.with_ymd_and_hms(2026, 11, 1, 9, 0, 0).single().expect("a valid time");
    AuditEntry {
        event_id: Uuid::now_v7(),
        tenant_id: tenant,
        event_type: event_type.into(),
        subject: format!("subject-{i}"),
        actor: Actor::PlatformAdmin,
        correlation_id: format!("req-{i}"),
        at: base + Duration::minutes(i),
        before: None,
        after: Some(json!({"name": name, "email": format!("person{i}@audit.example"), "n": i})),
    }
}

async fn audit_ids(ix: &Arc<dyn SearchIndex>, tenant: Uuid, filter: &AuditFilter, limit: u32) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut page = PageRequest { after: None, limit };
    loop {
        let got = ix.search_audit(tenant, filter, page).await.unwrap();
        assert!(got.items.len() <= limit as usize);
        assert!(got.items.iter().all(|e| e.tenant_id == tenant));
        let last = got.items.last().map(|e| e.event_id);
        ids.extend(got.items.into_iter().map(|e| e.event_id));
        match (got.next_cursor, last) {
            (Some(_), Some(id)) => page = PageRequest { after: Some(eventra::domain::Cursor(id)), limit },
            _ => return ids,
        }
    }
}

pub async fn audit_entries_filter_by_type_time_and_text_and_page(make: Make) {
    let Some((_g, ix)) = make() else { return };
    let (t, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mine: Vec<AuditEntry> = (0..30)
        .map(|i| {
            let kind = if i % 2 == 0 { "user.created" } else { "user.updated" };
            entry(t, i, kind, &format!("Person Number{i}"))
        })
        .collect();
    let theirs = vec![entry(other, 5, "user.created", "Person Secretive")];
    let mut ops: Vec<IndexOp> = mine.iter().chain(&theirs).cloned().map(IndexOp::UpsertAudit).collect();
    // Entries are idempotent by event id: the same one twice is one entry.
    ops.push(IndexOp::UpsertAudit(mine[3].clone()));
    ix.apply(&ops).await.unwrap();
    let all: Vec<Uuid> = mine.iter().map(|e| e.event_id).collect();
    let text = |q: &str| AuditFilter { text: Some(q.into()), ..AuditFilter::default() };

    // Text: every word prefixes a word of the entry; oldest first; pages cover each once.
    assert_eq!(audit_ids(&ix, t, &text("person"), 7).await, all);
    assert_eq!(audit_ids(&ix, t, &text("PERS audit.exam"), 100).await, all);
    assert_eq!(
        audit_ids(&ix, t, &text("number1"), 100).await,
        [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19].map(|i| all[i])
    );
    assert_eq!(audit_ids(&ix, t, &text("person13@audit.example"), 100).await, [all[13]]);
    assert!(audit_ids(&ix, t, &text("nobody"), 100).await.is_empty());
    // No words: every entry passing the other filters.
    assert_eq!(audit_ids(&ix, t, &AuditFilter::default(), 100).await, all);

    // Type, time range [from, to), and all of them together.
    let updated = AuditFilter { event_type: Some("user.updated".into()), ..AuditFilter::default() };
    assert_eq!(
        audit_ids(&ix, t, &updated, 4).await,
        (0..30).filter(|i| i % 2 == 1).map(|i| all[i]).collect::<Vec<_>>()
    );
    let range = AuditFilter { from: Some(mine[10].at), to: Some(mine[20].at), ..AuditFilter::default() };
    assert_eq!(audit_ids(&ix, t, &range, 3).await, all[10..20]);
    let combined = AuditFilter { text: Some("number1".into()), event_type: Some("user.created".into()), ..range };
    assert_eq!(audit_ids(&ix, t, &combined, 2).await, [10, 12, 14, 16, 18].map(|i| all[i]));

    // The whole entry comes back.
    let first = ix.search_audit(t, &text("number0"), PageRequest { after: None, limit: 1 }).await.unwrap();
    assert_eq!(first.items, [mine[0].clone()]);

    // Tenant-scoped both ways.
    assert!(audit_ids(&ix, t, &text("secretive"), 100).await.is_empty(), "A never sees B's entries");
    assert_eq!(audit_ids(&ix, other, &text("person"), 100).await, [theirs[0].event_id]);
    // Deleting a tenant's users keeps its audit trail.
    ix.apply(&[IndexOp::DeleteTenant { tenant_id: t }]).await.unwrap();
    assert_eq!(audit_ids(&ix, t, &text("person"), 100).await.len(), 30);
}

fn tantivy() -> Option<(Box<dyn std::any::Any + Send>, Arc<dyn SearchIndex>)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let ix = Arc::new(TantivyIndex::open(dir.path()).expect("open index"));
    Some((Box::new(dir), Arc::new(ix) as Arc<dyn SearchIndex>))
}

/// Deletes a test's OpenSearch indices when the test ends, passed or not.
struct OpenSearchIndices {
    url: String,
    names: Vec<String>,
}

impl Drop for OpenSearchIndices {
    fn drop(&mut self) {
        let (url, names) = (self.url.clone(), self.names.clone());
        // Drop cannot await; a short-lived runtime on its own thread can.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                eventra::tls::install_crypto_provider();
                let client = reqwest::Client::new();
                for name in names {
                    let _ = client.delete(format!("{}/{name}", url.trim_end_matches('/'))).send().await;
                    let _ = client.delete(format!("{}/_index_template/{name}", url.trim_end_matches('/'))).send().await;
                }
            });
        })
        .join();
    }
}

fn opensearch() -> Option<(Box<dyn std::any::Any + Send>, Arc<dyn SearchIndex>)> {
    // Not `service_url`: no OpenSearch can run in CI, so CI=true does not require it.
    let url = std::env::var("OPENSEARCH_URL").ok().filter(|u| !u.is_empty());
    let Some(url) = url else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "NOT RUN: search_conformance::opensearch: set OPENSEARCH_URL to run it");
        return None;
    };
    let namespace = format!("eventra-test-{}", Uuid::now_v7().simple());
    let ix = OpenSearchIndex::connect(&url, &namespace).expect("an OpenSearch client");
    let names = ix.names();
    let guard = OpenSearchIndices { url, names: vec![names.users.clone(), names.audit.clone()] };
    Some((Box::new(guard), Arc::new(ix) as Arc<dyn SearchIndex>))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod tantivy {
            $( #[tokio::test] async fn $name() { super::$name(super::tantivy).await; } )*
        }
        mod opensearch {
            $( #[tokio::test] async fn $name() { super::$name(super::opensearch).await; } )*
        }
    };
}

conformance!(
    finds_users_by_prefixes_of_name_and_email,
    tenants_never_see_each_other,
    updates_replace_and_deletes_remove,
    pages_through_hits,
    concurrent_changes_are_all_applied,
    audit_entries_filter_by_type_time_and_text_and_page,
    a_prune_removes_what_was_not_rewritten,
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

/// One process writes an index directory; others follow it: they find what the writer
/// commits (their readers reload on its commits), cannot write, and a second writer on
/// the same directory is refused with a message that says why.
#[tokio::test]
async fn a_follower_finds_what_the_writer_commits_and_a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = Uuid::now_v7();
    let writer: Arc<dyn SearchIndex> = Arc::new(Arc::new(TantivyIndex::open(dir.path()).unwrap()));
    let follower = Arc::new(TantivyIndex::follow(dir.path()).unwrap());
    assert!(!follower.writes());
    let follower: Arc<dyn SearchIndex> = Arc::new(follower);
    assert!(names(&follower, t, "foll").await.is_empty());
    writer.apply(&[IndexOp::UpsertUser(user(t, "Followed Person", "f@x.io"))]).await.unwrap();
    crate::utils::wait_for("the follower to see the commit", std::time::Duration::from_secs(10), || async {
        (names(&follower, t, "foll").await == ["Followed Person"]).then_some(())
    })
    .await;
    let refused = follower.apply(&[IndexOp::UpsertUser(user(t, "Nope", "n@x.io"))]).await.unwrap_err().to_string();
    assert!(refused.contains("indexer"), "{refused}");
    let Err(second) = TantivyIndex::open(dir.path()) else { panic!("a second writer on one directory") };
    let second = second.to_string();
    assert!(second.contains("written by another process") && second.contains("OPENSEARCH_URL"), "{second}");
}

/// `reindex` rebuilds the index from the database: an index that lost everything (or
/// holds stale documents) answers like one fed by the pipeline.
#[tokio::test]
async fn reindex_rebuilds_the_index_from_the_database() {
    let db = crate::utils::TestDb::sqlite();
    let store = db.store().await;
    let ctx = eventra::domain::EventContext::system("reindex-test");
    let input = eventra::domain::tenant::NewTenantInput {
        name: "Re".into(),
        slug: "reindex-t".into(),
        max_users: None,
        rate_limit_per_second: None,
    };
    let t = eventra::domain::NewTenant::parse(input, eventra::domain::now()).unwrap();
    let key = eventra::domain::NewApiKey::generate(t.id, eventra::domain::Role::Admin, eventra::domain::now());
    let tenant = store.create_tenant(&t, &key, &ctx).await.unwrap();
    for i in 0..1200 {
        let input = eventra::domain::user::NewUserInput {
            email: format!("member{i}@example.com"),
            name: format!("Member {i}"),
            attributes: None,
            password: None,
        };
        let u = eventra::domain::NewUser::parse(tenant.id, input, eventra::domain::now()).unwrap();
        store.create_user(&u, None, &ctx).await.unwrap();
    }
    // Some events audited in the database (the audit job's first half).
    let events = store.outbox_after(0, 5).await.unwrap();
    for r in &events {
        store.append_audit_many(&[AuditEntry::from_event(&r.event)]).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let ix: Arc<dyn SearchIndex> = Arc::new(Arc::new(TantivyIndex::open(dir.path()).unwrap()));
    // A stale document the database no longer has.
    ix.apply(&[IndexOp::UpsertUser(user(tenant.id, "Member Ghost", "ghost@example.com"))]).await.unwrap();
    let done = eventra::search::reindex::reindex(&store, &ix, None, false).await.unwrap();
    assert_eq!((done.tenants, done.users, done.audit_entries), (1, 1200, events.len() as u64));
    let audited = ix.search_audit(tenant.id, &AuditFilter::default(), PageRequest { after: None, limit: 100 }).await;
    let audited: Vec<Uuid> = audited.unwrap().items.into_iter().map(|e| e.event_id).collect();
    assert_eq!(audited, events.iter().map(|r| r.event.id).collect::<Vec<_>>(), "the database's audit entries");
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
