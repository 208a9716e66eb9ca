//! The `Store` conformance suite: the same functions run against SQLite and PostgreSQL.
//!
//! The outbox invariant is checked after every operation: a committed change adds
//! exactly one event (of the right type, in per-tenant order), a refused change adds none.

use std::sync::Arc;

use eventra::domain::tenant::NewTenantInput;
use eventra::domain::user::NewUserInput;
use eventra::domain::{
    DomainEvent, EventContext, EventType, NewApiKey, NewTenant, NewUser, PageRequest, Role, Tenant, TenantPatch,
    UserPatch,
};
use eventra::store::{IdempotencyRequest, OutboxRecord, Store, StoreError, TenantWrite, WriteOutcome};
use uuid::Uuid;

fn ctx() -> EventContext {
    EventContext::system(format!("req-{}", Uuid::now_v7()))
}

async fn outbox(s: &Arc<dyn Store>) -> Vec<OutboxRecord> {
    s.outbox_after(0, 100_000).await.expect("outbox")
}

/// Runs `op` and asserts it added exactly `n` outbox rows; returns the new rows.
async fn expect_events(s: &Arc<dyn Store>, n: usize, before: usize) -> Vec<OutboxRecord> {
    let rows = outbox(s).await;
    assert_eq!(rows.len(), before + n, "outbox rows: expected {n} new");
    rows[before..].to_vec()
}

async fn tenant(s: &Arc<dyn Store>, slug: &str, max_users: u32) -> Tenant {
    let input = NewTenantInput {
        name: slug.to_uppercase(),
        slug: slug.into(),
        max_users: Some(max_users),
        rate_limit_per_second: None,
    };
    let t = NewTenant::parse(input, eventra::domain::now()).expect("valid tenant");
    let key = NewApiKey::generate(t.id, Role::Admin, eventra::domain::now());
    s.create_tenant(&t, &key, &ctx()).await.expect("create tenant")
}

fn new_user(tenant_id: Uuid, email: &str) -> NewUser {
    let input = NewUserInput { email: email.into(), name: "Someone".into(), attributes: None, password: None };
    NewUser::parse(tenant_id, input, eventra::domain::now()).expect("valid user")
}

/// Email claims (`claim_emails`): one attempt at a time sends an email. A claim is its
/// holder's to renew, free again once released by its holder or lapsed, and ends when
/// the email is recorded, after which no one can claim that email.
pub async fn email_claims_let_one_attempt_send(s: Arc<dyn Store>) {
    use std::collections::HashSet;
    let t = tenant(&s, "claims", 0).await;
    let key = |n: &str| format!("welcome:{}-{n}", Uuid::now_v7());
    let (a, b, c, d) = (key("a"), key("b"), key("c"), key("d"));
    let set = |keys: &[&String]| keys.iter().map(|k| (*k).clone()).collect::<HashSet<String>>();
    let long = std::time::Duration::from_secs(30);
    let claim = |keys: &[&String], holder: &'static str, ttl| {
        let (s, keys) = (s.clone(), keys.iter().map(|k| (*k).clone()).collect::<Vec<_>>());
        async move { s.claim_emails(&keys, holder, ttl).await.unwrap() }
    };
    assert_eq!(claim(&[&a, &b, &a], "h1", long).await, set(&[&a, &b]), "a key twice is claimed once");
    assert_eq!(claim(&[&a, &c], "h2", long).await, set(&[&c]), "a is h1's");
    assert_eq!(claim(&[&a], "h1", long).await, set(&[&a]), "its holder renews it");
    s.release_emails(&[a.clone()], "h2").await.unwrap();
    assert!(claim(&[&a], "h2", long).await.is_empty(), "only its holder releases it");
    s.release_emails(&[a.clone()], "h1").await.unwrap();
    assert_eq!(claim(&[&a], "h2", long).await, set(&[&a]), "released");
    assert_eq!(claim(&[&d], "h3", std::time::Duration::ZERO).await, set(&[&d]));
    assert_eq!(claim(&[&d], "h4", long).await, set(&[&d]), "lapsed");

    let sent = eventra::store::SentEmail {
        key: b.clone(),
        tenant_id: t.id,
        recipient: "b@x.io".into(),
        message_id: "b@eventra".into(),
        sent_at: eventra::domain::now(),
    };
    assert_eq!(s.record_emails(&[sent]).await.unwrap(), 1);
    assert!(claim(&[&b], "h1", long).await.is_empty(), "recorded: no one claims it, its sender neither");
    assert!(claim(&[&b], "h5", std::time::Duration::ZERO).await.is_empty());
    assert_eq!(s.emails_sent(&[b.clone()]).await.unwrap(), set(&[&b]));
}

/// The webhook delivery log: one success per (endpoint, event); the failing streak
/// starts after the last success; old rows are pruned.
pub async fn the_delivery_log_knows_failing_streaks_and_prunes(s: Arc<dyn Store>) {
    use eventra::domain::webhook::{DeliveryAttempt, NewEndpoint, NewEndpointInput};
    let t = tenant(&s, "hooks", 0).await;
    let input = NewEndpointInput { url: "https://hooks.example.com/x".into(), event_types: None, description: None };
    let e = NewEndpoint::parse(t.id, input, false, eventra::domain::now()).unwrap();
    let e = s.create_webhook(&e).await.unwrap();
    let now = chrono::Utc::now();
    let attempt = |event: Uuid, n: i32, ok: bool, days_ago: i64| {
        let at = eventra::domain::now() - chrono::Duration::days(days_ago);
        DeliveryAttempt {
            id: Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, at.timestamp() as u64, 0)),
            endpoint_id: e.id,
            event_id: event,
            event_type: "user.created".into(),
            attempt: n,
            status: if ok { "succeeded" } else { "failed" }.into(),
            response_status: Some(if ok { 200 } else { 500 }),
            duration_ms: 3,
            error: None,
            at,
        }
    };
    let (e1, e2) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(s.failing_since(e.id).await.unwrap(), None, "no attempts");
    let logged = s.record_deliveries(&[attempt(e1, 1, false, 40), attempt(e1, 2, true, 39)]).await.unwrap();
    assert_eq!(logged, [true, true]);
    let e3 = Uuid::now_v7();
    let gone = DeliveryAttempt { endpoint_id: Uuid::now_v7(), ..attempt(e3, 1, true, 38) };
    let again = s
        .record_deliveries(&[attempt(e1, 3, true, 38), attempt(e3, 1, true, 38), gone, attempt(e3, 2, true, 38)])
        .await
        .unwrap();
    assert_eq!(
        again,
        [false, true, false, false],
        "a second success is not logged, not even in the same statement; nor is an attempt of a deleted endpoint; the rest is"
    );
    assert_eq!(s.failing_since(e.id).await.unwrap(), None, "the latest attempt succeeded");
    let failures = s.record_deliveries(&[attempt(e2, 1, false, 6), attempt(e2, 2, false, 1)]).await.unwrap();
    assert_eq!(failures, [true, true], "failures are all logged");
    let since = s.failing_since(e.id).await.unwrap().expect("failing");
    assert!((now - since).num_days() >= 5, "{since}: the first failure after the last success");
    let delivered = s.delivered(&[(e.id, e1), (e.id, e2), (e.id, e3), (Uuid::now_v7(), e1)]).await.unwrap();
    assert_eq!(delivered, [(e.id, e1), (e.id, e3)].into_iter().collect());
    let health = s.webhook_health(chrono::Utc::now() - chrono::Duration::days(60), 10).await.unwrap();
    let seen: Vec<(Uuid, i64, i64)> = health.iter().map(|h| (h.endpoint_id, h.attempts, h.failed)).collect();
    assert_eq!(seen, [(e.id, 5, 3)], "five attempts logged, three failed");
    assert_eq!(health[0].slug, "hooks");
    let recent = s.webhook_health(chrono::Utc::now() - chrono::Duration::days(3), 10).await.unwrap();
    assert_eq!((recent[0].attempts, recent[0].failed), (1, 1), "only the window's attempts");
    let cutoff = chrono::Utc::now() - chrono::Duration::days(30);
    assert_eq!(s.prune_deliveries(cutoff, 100).await.unwrap(), 3, "the three attempts from 38-40 days ago");
    let left = s.list_deliveries(e.id, None, eventra::domain::PageRequest::parse(None, None).unwrap()).await.unwrap();
    assert_eq!(left.items.len(), 2);
}

/// The busiest tenants by events since a time (the dashboard's tenants panel): counted
/// from the outbox, busiest first, with user counts; nothing from before `since`.
pub async fn tenant_activity_counts_recent_events(s: Arc<dyn Store>) {
    let quiet = tenant(&s, "quiet", 0).await;
    let busy = tenant(&s, "busy", 0).await;
    for i in 0..3 {
        s.create_user(&new_user(busy.id, &format!("u{i}@x.io")), None, &ctx()).await.unwrap();
    }
    let since = chrono::Utc::now() - chrono::Duration::minutes(1);
    let activity = s.tenant_activity(since, 10).await.unwrap();
    let seen: Vec<(Uuid, i64, i64)> = activity.iter().map(|a| (a.tenant_id, a.events, a.user_count)).collect();
    assert_eq!(seen, [(busy.id, 4, 3), (quiet.id, 1, 0)], "tenant.created + 3 user.created, then 1");
    assert_eq!(activity[0].slug, "busy");
    assert_eq!(s.tenant_activity(since, 1).await.unwrap().len(), 1, "the limit holds");
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    assert!(s.tenant_activity(later, 10).await.unwrap().is_empty(), "nothing since a later time");
}

pub async fn tenant_changes_write_one_event_each(s: Arc<dyn Store>) {
    let t = tenant(&s, "acme", 0).await;
    let rows = expect_events(&s, 1, 0).await;
    assert_eq!((rows[0].event.event_type.clone(), rows[0].tenant_seq), (EventType::TenantCreated, 1));
    assert_eq!(rows[0].event.data["tenant"]["slug"], "acme");
    assert!(rows[0].published_at.is_none());

    let renamed = s
        .update_tenant(
            t.id,
            &TenantPatch { name: Some("Acme Inc".into()), max_users: None, rate_limit_per_second: None },
            &ctx(),
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, "Acme Inc");
    let rows = expect_events(&s, 1, 1).await;
    assert_eq!(rows[0].event.event_type, EventType::TenantUpdated);
    assert_eq!(rows[0].event.data["before"]["name"], "ACME");

    // A patch that changes nothing writes nothing.
    s.update_tenant(
        t.id,
        &TenantPatch { name: Some("Acme Inc".into()), max_users: None, rate_limit_per_second: None },
        &ctx(),
    )
    .await
    .unwrap();
    expect_events(&s, 0, 2).await;

    let key = NewApiKey::generate(t.id, Role::Reader, eventra::domain::now());
    s.create_api_key(&key, &ctx()).await.unwrap();
    let rows = expect_events(&s, 1, 2).await;
    assert_eq!(rows[0].event.event_type, EventType::ApiKeyCreated);
    assert!(!serde_json::to_string(&rows[0].event).unwrap().contains(&key.secret), "secret never in an event");
    assert_eq!(s.find_api_key(&key.hash).await.unwrap().map(|k| k.role), Some(Role::Reader));

    let u = s.create_user(&new_user(t.id, "a@x.io"), None, &ctx()).await.unwrap().value;
    s.delete_tenant(t.id, &ctx()).await.unwrap();
    let rows = expect_events(&s, 2, 3).await;
    assert_eq!(rows[1].event.event_type, EventType::TenantDeleted);
    assert!(matches!(s.get_tenant(t.id).await, Err(StoreError::NotFound("tenant"))));
    assert!(matches!(s.get_user(t.id, u.id).await, Err(StoreError::NotFound(_))), "users go with the tenant");
    assert_eq!(s.find_api_key(&key.hash).await.unwrap(), None, "keys go with the tenant");
    let seqs: Vec<i64> = outbox(&s).await.iter().map(|r| r.tenant_seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "per-tenant sequence is gap-free");
}

pub async fn user_changes_write_one_event_each(s: Arc<dyn Store>) {
    let t = tenant(&s, "users", 0).await;
    let c = ctx();
    let created = s.create_user(&new_user(t.id, "Ada@Example.com"), None, &c).await.unwrap();
    assert!(!created.replayed);
    let u = created.value;
    let rows = expect_events(&s, 1, 1).await;
    let e = &rows[0].event;
    assert_eq!((e.event_type.clone(), e.subject.clone(), e.tenantid), (EventType::UserCreated, u.id.to_string(), t.id));
    assert_eq!(e.correlationid, c.correlation_id);
    assert_eq!(e.data["user"]["email"], "Ada@Example.com");
    assert_eq!(s.get_tenant(t.id).await.unwrap().user_count, 1);

    let patch = UserPatch { name: Some("Ada Lovelace".into()), ..Default::default() };
    let u2 = s.update_user(t.id, u.id, Some(1), &patch, &ctx()).await.unwrap();
    assert_eq!((u2.version, u2.name.as_str()), (2, "Ada Lovelace"));
    let rows = expect_events(&s, 1, 2).await;
    assert_eq!(rows[0].event.event_type, EventType::UserUpdated);
    assert_eq!(
        (rows[0].event.data["before"]["version"].clone(), rows[0].event.data["after"]["version"].clone()),
        (1.into(), 2.into())
    );

    let verify = UserPatch { email_verified: Some(true), ..Default::default() };
    let u3 = s.update_user(t.id, u.id, None, &verify, &ctx()).await.unwrap();
    assert!(u3.email_verified);
    assert_eq!(expect_events(&s, 1, 3).await[0].event.event_type, EventType::UserVerified);

    // No-op patch: same version, no event.
    let same = s.update_user(t.id, u.id, Some(3), &verify, &ctx()).await.unwrap();
    assert_eq!(same.version, 3);
    expect_events(&s, 0, 4).await;
    assert_eq!(s.get_user(t.id, u.id).await.unwrap(), u3);
    // Many at once: in the order asked, unknown and other tenants' ids left out.
    let missing = uuid::Uuid::now_v7();
    assert_eq!(s.get_users(t.id, &[missing, u.id, u.id]).await.unwrap(), [u3.clone(), u3.clone()]);
    assert!(s.get_users(uuid::Uuid::now_v7(), &[u.id]).await.unwrap().is_empty(), "scoped to the tenant");
    assert!(s.get_users(t.id, &[]).await.unwrap().is_empty());

    s.delete_user(t.id, u.id, Some(3), &ctx()).await.unwrap();
    assert_eq!(expect_events(&s, 1, 4).await[0].event.event_type, EventType::UserDeleted);
    assert!(matches!(s.get_user(t.id, u.id).await, Err(StoreError::NotFound("user"))));
    assert_eq!(s.get_tenant(t.id).await.unwrap().user_count, 0);
    let seqs: Vec<i64> = outbox(&s).await.iter().map(|r| r.tenant_seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

pub async fn failed_changes_write_nothing(s: Arc<dyn Store>) {
    let t = tenant(&s, "limits", 2).await;
    let a = s.create_user(&new_user(t.id, "a@x.io"), None, &ctx()).await.unwrap().value;
    // Duplicate email, compared case-insensitively (while the tenant still has room).
    let dup = s.create_user(&new_user(t.id, "A@X.IO"), None, &ctx()).await;
    assert!(matches!(dup, Err(StoreError::Conflict(ref m)) if m.contains("A@X.IO")), "{dup:?}");
    expect_events(&s, 0, 2).await;
    let b = s.create_user(&new_user(t.id, "b@x.io"), None, &ctx()).await.unwrap().value;
    let n = outbox(&s).await.len();
    assert_eq!(n, 3);
    // Over max_users (the tenant is full now; raise the limit later to prove the count).
    let full = s.create_user(&new_user(t.id, "c@x.io"), None, &ctx()).await;
    assert!(matches!(full, Err(StoreError::TenantFull { max_users: 2 })), "{full:?}");
    // Stale version on update and delete.
    let patch = UserPatch { name: Some("New".into()), ..Default::default() };
    let stale = s.update_user(t.id, a.id, Some(7), &patch, &ctx()).await;
    assert!(matches!(stale, Err(StoreError::StaleVersion { expected: 7, current: 1 })), "{stale:?}");
    assert!(matches!(s.delete_user(t.id, a.id, Some(2), &ctx()).await, Err(StoreError::StaleVersion { .. })));
    // Changing an email onto another user's.
    let clash = UserPatch { email: Some("B@x.io".into()), ..Default::default() };
    assert!(matches!(s.update_user(t.id, a.id, None, &clash, &ctx()).await, Err(StoreError::Conflict(_))));
    // Unknown user / tenant, and a duplicate slug.
    assert!(matches!(
        s.update_user(t.id, Uuid::now_v7(), None, &patch, &ctx()).await,
        Err(StoreError::NotFound("user"))
    ));
    assert!(matches!(
        s.create_user(&new_user(Uuid::now_v7(), "z@x.io"), None, &ctx()).await,
        Err(StoreError::NotFound("tenant"))
    ));
    let again = NewTenant::parse(
        NewTenantInput { name: "x".into(), slug: "limits".into(), max_users: None, rate_limit_per_second: None },
        eventra::domain::now(),
    )
    .unwrap();
    let key = NewApiKey::generate(again.id, Role::Admin, eventra::domain::now());
    assert!(matches!(s.create_tenant(&again, &key, &ctx()).await, Err(StoreError::Conflict(_))));

    expect_events(&s, 0, n).await;
    assert_eq!(s.get_user(t.id, a.id).await.unwrap(), a, "refused changes leave the row as it was");
    assert_eq!(s.get_user(t.id, b.id).await.unwrap(), b);
    assert_eq!(s.get_tenant(t.id).await.unwrap().user_count, 2);
    assert_eq!(s.find_api_key(&key.hash).await.unwrap(), None, "no key row from the refused tenant");

    // The sequence stayed gap-free through the refusals.
    s.update_tenant(t.id, &TenantPatch { max_users: Some(3), ..Default::default() }, &ctx()).await.unwrap();
    s.create_user(&new_user(t.id, "c@x.io"), None, &ctx()).await.unwrap();
    let seqs: Vec<i64> = outbox(&s).await.iter().map(|r| r.tenant_seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

pub async fn idempotent_create_replays(s: Arc<dyn Store>) {
    let t = tenant(&s, "idem", 0).await;
    let other = tenant(&s, "idem-other", 0).await;
    let req = IdempotencyRequest { key: "k-1".into(), request_hash: "h1".into() };
    let first = s.create_user(&new_user(t.id, "a@x.io"), Some(&req), &ctx()).await.unwrap();
    // A retry builds a new NewUser (new id): the stored answer must win.
    let retry = s.create_user(&new_user(t.id, "a@x.io"), Some(&req), &ctx()).await.unwrap();
    assert!(retry.replayed && !first.replayed);
    assert_eq!(retry.value, first.value);
    let mismatch = IdempotencyRequest { key: "k-1".into(), request_hash: "h2".into() };
    assert!(matches!(
        s.create_user(&new_user(t.id, "b@x.io"), Some(&mismatch), &ctx()).await,
        Err(StoreError::IdempotencyMismatch)
    ));
    // Keys are per tenant.
    let elsewhere = s.create_user(&new_user(other.id, "a@x.io"), Some(&req), &ctx()).await.unwrap();
    assert!(!elsewhere.replayed);
    let created: Vec<_> =
        outbox(&s).await.into_iter().filter(|r| r.event.event_type == EventType::UserCreated).collect();
    assert_eq!(created.len(), 2, "one event per real creation");
    assert_eq!(s.list_users(t.id, PageRequest::first()).await.unwrap().items.len(), 1);
}

pub async fn idempotency_records_can_be_purged(s: Arc<dyn Store>) {
    let t = tenant(&s, "purge", 0).await;
    let req = IdempotencyRequest { key: "k".into(), request_hash: "h".into() };
    let first = s.create_user(&new_user(t.id, "a@x.io"), Some(&req), &ctx()).await.unwrap().value;
    assert_eq!(
        s.purge_idempotency_keys(eventra::domain::now() - chrono::Duration::hours(1)).await.unwrap(),
        0,
        "fresh records stay"
    );
    assert!(s.create_user(&new_user(t.id, "a@x.io"), Some(&req), &ctx()).await.unwrap().replayed);
    assert_eq!(s.purge_idempotency_keys(eventra::domain::now() + chrono::Duration::seconds(1)).await.unwrap(), 1);
    // The key is free again: the same request is now a new create (and a duplicate email).
    let again = s.create_user(&new_user(t.id, "a@x.io"), Some(&req), &ctx()).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(s.get_user(t.id, first.id).await.unwrap(), first);
}

pub async fn lists_page_by_cursor_within_a_tenant(s: Arc<dyn Store>) {
    let t = tenant(&s, "pages", 0).await;
    let other = tenant(&s, "pages-other", 0).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s.create_user(&new_user(t.id, &format!("u{i}@x.io")), None, &ctx()).await.unwrap().value.id);
        s.create_user(&new_user(other.id, &format!("u{i}@x.io")), None, &ctx()).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut page = PageRequest::parse(Some(2), None).unwrap();
    let mut sizes = Vec::new();
    loop {
        let p = s.list_users(t.id, page).await.unwrap();
        sizes.push(p.items.len());
        assert!(p.items.iter().all(|u| u.tenant_id == t.id), "only this tenant's users");
        seen.extend(p.items.iter().map(|u| u.id));
        match p.next_cursor {
            Some(c) => page = PageRequest::parse(Some(2), Some(&c)).unwrap(),
            None => break,
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(seen, ids, "every user once, in creation order");
    let tenants = s.list_tenants(PageRequest::parse(Some(1), None).unwrap()).await.unwrap();
    assert_eq!(tenants.items.len(), 1);
    assert!(tenants.next_cursor.is_some());
}

pub async fn tenants_cannot_touch_each_other(s: Arc<dyn Store>) {
    let a = tenant(&s, "tenant-a", 0).await;
    let b = tenant(&s, "tenant-b", 0).await;
    let ua = s.create_user(&new_user(a.id, "same@x.io"), None, &ctx()).await.unwrap().value;
    // The same email is fine in another tenant.
    let ub = s.create_user(&new_user(b.id, "same@x.io"), None, &ctx()).await.unwrap().value;
    let n = outbox(&s).await.len();
    let patch = UserPatch { name: Some("Hijacked".into()), ..Default::default() };
    assert!(matches!(s.get_user(b.id, ua.id).await, Err(StoreError::NotFound(_))));
    assert!(matches!(s.update_user(b.id, ua.id, None, &patch, &ctx()).await, Err(StoreError::NotFound(_))));
    assert!(matches!(s.delete_user(a.id, ub.id, None, &ctx()).await, Err(StoreError::NotFound(_))));
    expect_events(&s, 0, n).await;
    assert_eq!(s.get_user(a.id, ua.id).await.unwrap(), ua);
    assert_eq!(s.get_user(b.id, ub.id).await.unwrap(), ub);
}

/// Instantiates every conformance function once per backend.
pub async fn audit_and_email_logs_are_idempotent(s: Arc<dyn Store>) {
    let t = tenant(&s, "audit", 0).await;
    let before = outbox(&s).await.len();
    s.create_user(&new_user(t.id, "a@x.io"), None, &ctx()).await.unwrap();
    let events = expect_events(&s, 1, before).await;
    let event = events[0].event.clone();
    let entry = eventra::domain::AuditEntry::from_event(&event);
    assert_eq!(s.append_audit_many(std::slice::from_ref(&entry)).await.unwrap(), 1, "first write");
    assert_eq!(s.append_audit_many(std::slice::from_ref(&entry)).await.unwrap(), 0, "a redelivery writes nothing");
    assert_eq!(s.get_audit(event.id).await.unwrap(), Some(entry.clone()), "reads back as written");
    assert_eq!(s.count_audit(t.id).await.unwrap(), 1);
    assert_eq!(s.count_audit(Uuid::now_v7()).await.unwrap(), 0);
    assert_eq!(s.get_audit(Uuid::now_v7()).await.unwrap(), None);

    let sent = eventra::store::SentEmail {
        key: format!("welcome:{}", entry.subject),
        tenant_id: t.id,
        recipient: "a@x.io".into(),
        message_id: "m@eventra".into(),
        sent_at: eventra::domain::now(),
    };
    assert!(!s.email_sent(&sent.key).await.unwrap());
    assert!(s.record_email(&sent).await.unwrap());
    assert!(!s.record_email(&sent).await.unwrap(), "one record per key");
    assert!(s.email_sent(&sent.key).await.unwrap());
}

pub async fn the_relay_reads_unpublished_rows_and_leases(s: Arc<dyn Store>) {
    let t = tenant(&s, "relay", 0).await;
    for i in 0..3 {
        s.create_user(&new_user(t.id, &format!("u{i}@x.io")), None, &ctx()).await.unwrap();
    }
    let pending = s.unpublished_outbox(100).await.unwrap();
    assert_eq!(pending.len(), 4, "tenant.created and three user.created");
    let seqs: Vec<i64> = pending.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");
    let tenant_seqs: Vec<i64> = pending.iter().map(|r| r.tenant_seq).collect();
    assert_eq!(tenant_seqs, [1, 2, 3, 4], "a tenant's commit order");
    assert!(s.oldest_unpublished().await.unwrap().is_some());
    // Marking is fenced by the relay lease: without it, nothing is marked.
    assert_eq!(s.mark_published(&seqs, "relay-test", "r1").await.unwrap(), 0, "no lease, no mark");
    let ttl = std::time::Duration::from_secs(30);
    assert!(s.try_lease("relay-test", "r1", ttl).await.unwrap());
    assert_eq!(s.mark_published(&seqs[..2], "relay-test", "r2").await.unwrap(), 0, "another holder's lease");
    assert_eq!(s.mark_published(&seqs[..2], "relay-test", "r1").await.unwrap(), 2);
    let left = s.unpublished_outbox(100).await.unwrap();
    assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs[2..]);
    assert_eq!(s.mark_published(&seqs, "relay-test", "r1").await.unwrap(), 2, "only the unpublished ones");
    assert!(s.unpublished_outbox(100).await.unwrap().is_empty());
    assert_eq!(s.oldest_unpublished().await.unwrap(), None);
    let published = s.outbox_after(0, 100).await.unwrap();
    assert!(published.iter().all(|r| r.published_at.is_some()));

    // One holder at a time; the holder renews; a lapsed lease can be taken over.
    let later = std::time::Duration::from_secs(30);
    assert!(s.try_lease("outbox-relay", "a", later).await.unwrap());
    assert!(!s.try_lease("outbox-relay", "b", later).await.unwrap(), "a holds it");
    assert!(s.try_lease("outbox-relay", "a", later).await.unwrap(), "a renews");
    // A renewal for no time at all: lapsed as soon as the database's clock moves on.
    assert!(s.try_lease("outbox-relay", "a", std::time::Duration::ZERO).await.unwrap());
    assert!(s.try_lease("outbox-relay", "b", later).await.unwrap(), "b takes over a lapsed lease");
    assert!(!s.try_lease("outbox-relay", "a", later).await.unwrap());
    s.release_lease("outbox-relay", "a").await.unwrap();
    assert!(!s.try_lease("outbox-relay", "a", later).await.unwrap(), "only the holder releases");
    s.release_lease("outbox-relay", "b").await.unwrap();
    assert!(s.try_lease("outbox-relay", "a", later).await.unwrap(), "released: free to take");

    // Retention: published rows past it go, unpublished rows never do.
    s.create_user(&new_user(t.id, "late@x.io"), None, &ctx()).await.unwrap();
    assert_eq!(s.prune_outbox(std::time::Duration::from_secs(3600), 100).await.unwrap(), 0, "all are recent");
    let pruned = s.prune_outbox(std::time::Duration::ZERO, 3).await.unwrap();
    assert_eq!(pruned, 3, "a chunk of the published rows");
    assert_eq!(s.prune_outbox(std::time::Duration::ZERO, 100).await.unwrap(), 1, "the last published row");
    let left = outbox(&s).await;
    assert!(left.iter().all(|r| r.published_at.is_none()), "only the unpublished row stays");
    assert_eq!(s.unpublished_outbox(10).await.unwrap().len(), 1);
}

/// Custom events (SPEC §9): types are versioned on replacement; accepted events go to the
/// outbox in one transaction with gap-free tenant_seq; a client id seen before (earlier,
/// or earlier in the same batch) writes nothing and answers with the original id.
pub async fn custom_events_are_written_once_per_client_id(s: Arc<dyn Store>) {
    use eventra::domain::custom_event::{EventInput, EventTypeDef, EventTypeInput, NewCustomEvent};
    let t = tenant(&s, "custom", 0).await;
    let now = eventra::domain::now();
    let input = EventTypeInput { schema: serde_json::json!({"type": "object"}), description: None };
    let (def, _) = EventTypeDef::parse(t.id, "order.placed", input.clone(), now).unwrap();
    let stored = s.put_event_type(&def).await.unwrap();
    assert_eq!(stored.version, 1);
    let replaced = s.put_event_type(&def).await.unwrap();
    assert_eq!((replaced.version, replaced.created_at), (2, stored.created_at));
    assert_eq!(
        s.event_type_versions(t.id, &["order.placed".into(), "nope.x".into()]).await.unwrap(),
        [("order.placed".into(), 2)]
    );
    assert_eq!(s.list_event_types(t.id).await.unwrap().len(), 1);
    let ghost = EventTypeDef { tenant_id: Uuid::now_v7(), ..def.clone() };
    assert!(matches!(s.put_event_type(&ghost).await, Err(eventra::store::StoreError::NotFound(_))));

    let schema = eventra::domain::custom_event::compile(&def.schema).unwrap();
    let event = |key: Option<&str>| {
        let input = EventInput {
            event_type: "order.placed".into(),
            data: serde_json::json!({"n": 1}),
            id: key.map(str::to_owned),
            subject: None,
            time: None,
        };
        NewCustomEvent::parse(t.id, input, Some(&schema), &ctx(), now).unwrap()
    };
    let before = outbox(&s).await.len();
    let batch = [event(Some("a")), event(None), event(Some("a")), event(Some("b"))];
    let out = s.ingest_events(t.id, &batch).await.unwrap();
    let news: Vec<bool> = out.iter().map(|o| o.new).collect();
    assert_eq!(news, [true, true, false, true]);
    assert_eq!(out[2].id, out[0].id, "the same client id in one batch: the first event's id");
    let again = s.ingest_events(t.id, &[event(Some("b")), event(Some("c"))]).await.unwrap();
    assert_eq!((again[0].id, again[0].new, again[1].new), (out[3].id, false, true));
    let rows = expect_events(&s, 4, before).await;
    let seqs: Vec<i64> = rows.iter().map(|r| r.tenant_seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gap-free: {seqs:?}");
    assert!(rows.iter().all(|r| r.event.event_type.as_str() == "order.placed"));
    assert!(matches!(
        s.ingest_events(Uuid::now_v7(), &[event(None)]).await,
        Err(eventra::store::StoreError::NotFound(_))
    ));
    s.delete_event_type(t.id, "order.placed").await.unwrap();
    assert!(s.get_event_type(t.id, "order.placed").await.unwrap().is_none());
    assert!(matches!(s.delete_event_type(t.id, "order.placed").await, Err(eventra::store::StoreError::NotFound(_))));
}

/// What batched jobs use: many audit entries in one statement (idempotent by event id),
/// which emails of a batch were sent, users found by id whatever their tenant.
pub async fn batched_effects_reads_and_writes(s: Arc<dyn Store>) {
    let t = tenant(&s, "batch", 0).await;
    let before = outbox(&s).await.len();
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(s.create_user(&new_user(t.id, &format!("b{i}@x.io")), None, &ctx()).await.unwrap().value);
    }
    let events = expect_events(&s, 5, before).await;
    let entries: Vec<_> = events.iter().map(|r| eventra::domain::AuditEntry::from_event(&r.event)).collect();
    assert_eq!(s.append_audit_many(&entries[..1]).await.unwrap(), 1);
    assert_eq!(s.append_audit_many(&entries).await.unwrap(), 4, "the one already there is skipped");
    assert_eq!(s.append_audit_many(&entries).await.unwrap(), 0, "a redelivered batch writes nothing");
    assert_eq!(s.count_audit(t.id).await.unwrap(), 5);
    // Counted in the analytics with the entries, exactly once, at every grain.
    use eventra::domain::analytics::Grain;
    let (from, to) = (chrono::Utc::now() - chrono::Duration::days(2), chrono::Utc::now() + chrono::Duration::days(1));
    for grain in Grain::ALL {
        let rows = s.event_stats(t.id, grain, from, to, Some("user.created")).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.count).sum::<i64>(), 5, "{grain:?}: the five users");
        let none = s.event_stats(t.id, grain, from, to, Some("order.placed")).await.unwrap();
        assert!(none.is_empty());
    }
    assert!(s.event_stats(Uuid::now_v7(), Grain::Minute, from, to, None).await.unwrap().is_empty(), "per tenant");
    for e in &entries {
        assert_eq!(s.get_audit(e.event_id).await.unwrap().as_ref(), Some(e), "reads back as written");
    }
    assert_eq!(s.append_audit_many(&[]).await.unwrap(), 0);

    let sent = eventra::store::SentEmail {
        key: "welcome:b1".into(),
        tenant_id: t.id,
        recipient: "b1@x.io".into(),
        message_id: "m@eventra".into(),
        sent_at: eventra::domain::now(),
    };
    assert!(s.record_email(&sent).await.unwrap());
    let keys: Vec<String> = ["welcome:b0", "welcome:b1", "welcome:b2"].map(String::from).to_vec();
    let found = s.emails_sent(&keys).await.unwrap();
    assert_eq!(found.into_iter().collect::<Vec<_>>(), ["welcome:b1"]);
    let more: Vec<_> = ["welcome:b1", "welcome:b2", "welcome:b3"]
        .iter()
        .map(|k| eventra::store::SentEmail { key: k.to_string(), ..sent.clone() })
        .collect();
    assert_eq!(s.record_emails(&more).await.unwrap(), 2, "b1 was recorded already");
    assert_eq!(s.emails_sent(&keys).await.unwrap().len(), 2);

    let other = tenant(&s, "batch-other", 0).await;
    let theirs = s.create_user(&new_user(other.id, "o@x.io"), None, &ctx()).await.unwrap().value;
    let mut ids: Vec<Uuid> = users.iter().map(|u| u.id).collect();
    ids.push(theirs.id);
    ids.push(Uuid::now_v7());
    let mut found: Vec<Uuid> = s.find_users(&ids).await.unwrap().into_iter().map(|u| u.id).collect();
    found.sort();
    let mut want: Vec<Uuid> = ids[..6].to_vec();
    want.sort();
    assert_eq!(found, want, "every existing user, whatever its tenant; unknown ids left out");
}

fn create(user: &NewUser, key: Option<(&str, &str)>) -> TenantWrite {
    let idempotency = key.map(|(k, h)| IdempotencyRequest { key: k.into(), request_hash: h.into() });
    TenantWrite::CreateUser { user: user.clone(), idempotency, ctx: ctx() }
}

fn created(o: &Result<WriteOutcome, StoreError>) -> Option<(Uuid, bool)> {
    match o {
        Ok(WriteOutcome::UserCreated(c)) => Some((c.value.id, c.replayed)),
        _ => None,
    }
}

/// Group commit: several tenants' writes in ONE transaction, each write with the
/// outcome it would have had alone, in order: email uniqueness within the batch (any
/// case), `max_users` exact, idempotent replays of a key used earlier in the same batch,
/// a mismatched key refused, updates and deletes of users created earlier in the batch,
/// a missing tenant; events only for what committed, with gap-free `tenant_seq`.
pub async fn batched_writes_keep_every_rule(s: Arc<dyn Store>) {
    let a = tenant(&s, "batch-a", 3).await;
    let b = tenant(&s, "batch-b", 0).await;
    let before = outbox(&s).await.len();
    let a1 = new_user(a.id, "one@x.io");
    let a1_again = new_user(a.id, "ONE@x.io");
    let a2 = new_user(a.id, "two@x.io");
    let a2_replay = new_user(a.id, "two@x.io");
    let a2_other = new_user(a.id, "other@x.io");
    let a3 = new_user(a.id, "three@x.io");
    let a4 = new_user(a.id, "four@x.io");
    let b1 = new_user(b.id, "one@x.io"); // the same email in another tenant is fine
    let b2 = new_user(b.id, "two@x.io");
    let b1_again = new_user(b.id, "one@x.io");
    let ghost = new_user(Uuid::now_v7(), "ghost@x.io");
    let rename = UserPatch { name: Some("Renamed".into()), ..UserPatch::default() };
    let steal = UserPatch { email: Some("two@x.io".into()), ..UserPatch::default() };
    let a_writes = vec![
        create(&a1, None),
        create(&a1_again, None), // 409: same email, other case, same batch
        create(&a2, Some(("k2", "h2"))),
        create(&a2_replay, Some(("k2", "h2"))),   // replays a2
        create(&a2_other, Some(("k2", "other"))), // 422: key reused with another body
        create(&a3, None),                        // the third user: tenant now full
        create(&a4, None),                        // 409: full
    ];
    let b_writes = vec![
        create(&b1, None),
        TenantWrite::UpdateUser { user_id: b1.0.id, expected_version: Some(1), patch: rename, ctx: ctx() },
        create(&b2, None),
        TenantWrite::UpdateUser { user_id: b1.0.id, expected_version: Some(2), patch: steal, ctx: ctx() }, // 409
        TenantWrite::UpdateUser {
            user_id: b1.0.id,
            expected_version: Some(1),
            patch: UserPatch::default(),
            ctx: ctx(),
        }, // 412
        TenantWrite::DeleteUser { user_id: b1.0.id, expected_version: None, ctx: ctx() },
        create(&b1_again, None), // the deleted user's email is free again
    ];
    let ghost_writes = vec![create(&ghost, None)];
    let out =
        s.write_batches(&[(a.id, &a_writes), (b.id, &b_writes), (ghost.0.tenant_id, &ghost_writes)], &|| ()).await;
    assert_eq!(out.len(), 3);
    let (oa, ob, og) = (&out[0], &out[1], &out[2]);

    assert_eq!(created(&oa[0]), Some((a1.0.id, false)));
    assert!(matches!(&oa[1], Err(StoreError::Conflict(m)) if m.contains("ONE@x.io")), "{:?}", oa[1]);
    assert_eq!(created(&oa[2]), Some((a2.0.id, false)));
    assert_eq!(created(&oa[3]), Some((a2.0.id, true)), "the second identical key replays the first");
    assert!(matches!(oa[4], Err(StoreError::IdempotencyMismatch)), "{:?}", oa[4]);
    assert_eq!(created(&oa[5]), Some((a3.0.id, false)));
    assert!(matches!(oa[6], Err(StoreError::TenantFull { max_users: 3 })), "{:?}", oa[6]);

    assert_eq!(created(&ob[0]), Some((b1.0.id, false)));
    assert!(matches!(&ob[1], Ok(WriteOutcome::UserUpdated(u)) if u.name == "Renamed" && u.version == 2));
    assert_eq!(created(&ob[2]), Some((b2.0.id, false)));
    assert!(matches!(&ob[3], Err(StoreError::Conflict(_))), "{:?}", ob[3]);
    assert!(matches!(ob[4], Err(StoreError::StaleVersion { expected: 1, current: 2 })), "{:?}", ob[4]);
    assert!(matches!(ob[5], Ok(WriteOutcome::UserDeleted)), "{:?}", ob[5]);
    assert_eq!(created(&ob[6]), Some((b1_again.0.id, false)));

    assert!(matches!(og[0], Err(StoreError::NotFound("tenant"))), "{:?}", og[0]);

    // The database says the same.
    assert_eq!(s.get_tenant(a.id).await.unwrap().user_count, 3, "max_users is exact");
    assert_eq!(s.get_tenant(b.id).await.unwrap().user_count, 2);
    let b_users: Vec<_> =
        s.list_users(b.id, PageRequest::first()).await.unwrap().items.into_iter().map(|u| u.id).collect();
    assert_eq!(b_users.len(), 2);
    assert!(b_users.contains(&b2.0.id) && b_users.contains(&b1_again.0.id));
    // Events: one per committed change, per tenant gap-free and in the writes' order.
    let rows = expect_events(&s, 3 + 5, before).await;
    let of = |t: Uuid| -> Vec<(i64, EventType, String)> {
        rows.iter()
            .filter(|r| r.tenant_id == t)
            .map(|r| (r.tenant_seq, r.event.event_type.clone(), r.event.subject.clone()))
            .collect()
    };
    let a_events = of(a.id);
    assert_eq!(a_events.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(
        a_events.iter().map(|e| e.2.clone()).collect::<Vec<_>>(),
        vec![a1.0.id.to_string(), a2.0.id.to_string(), a3.0.id.to_string()]
    );
    let b_events = of(b.id);
    assert_eq!(b_events.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
    assert_eq!(
        b_events.iter().map(|e| e.1.clone()).collect::<Vec<_>>(),
        vec![
            EventType::UserCreated,
            EventType::UserUpdated,
            EventType::UserCreated,
            EventType::UserDeleted,
            EventType::UserCreated
        ]
    );
    // The keyed create's answer is stored: a later retry (another transaction) replays it.
    let again = s
        .create_user(&a2_replay, Some(&IdempotencyRequest { key: "k2".into(), request_hash: "h2".into() }), &ctx())
        .await
        .unwrap();
    assert_eq!((again.value.id, again.replayed), (a2.0.id, true));
}

/// A write that passes every check and still fails in the database (here: a user id
/// that already exists, which no check looks for) aborts its transaction: the batch is
/// applied again write by write, so only that write fails and the others commit.
pub async fn one_failing_statement_fails_only_its_write(s: Arc<dyn Store>) {
    let a = tenant(&s, "abort-a", 0).await;
    let b = tenant(&s, "abort-b", 0).await;
    let existing = new_user(b.id, "taken-id@x.io");
    s.create_user(&existing, None, &ctx()).await.unwrap();
    let before = outbox(&s).await.len();
    let mut clash = new_user(a.id, "clash@x.io");
    clash.0.id = existing.0.id; // the primary key is taken
    let ok1 = new_user(a.id, "ok1@x.io");
    let ok2 = new_user(a.id, "ok2@x.io");
    let ok3 = new_user(b.id, "ok3@x.io");
    let a_writes = vec![create(&ok1, None), create(&clash, None), create(&ok2, None)];
    let b_writes = vec![create(&ok3, None)];
    let out = s.write_batches(&[(a.id, &a_writes), (b.id, &b_writes)], &|| ()).await;
    assert_eq!(created(&out[0][0]), Some((ok1.0.id, false)));
    assert!(out[0][1].is_err(), "the clashing write fails: {:?}", out[0][1]);
    assert_eq!(created(&out[0][2]), Some((ok2.0.id, false)));
    assert_eq!(created(&out[1][0]), Some((ok3.0.id, false)));
    let rows = expect_events(&s, 3, before).await;
    assert!(rows.iter().all(|r| r.tenant_id != a.id || r.event.subject != clash.0.id.to_string()), "no event for it");
    let a_seqs: Vec<i64> = rows.iter().filter(|r| r.tenant_id == a.id).map(|r| r.tenant_seq).collect();
    assert_eq!(a_seqs, vec![2, 3], "gap-free: the failed write took no number");
    assert_eq!(s.get_tenant(a.id).await.unwrap().user_count, 2);
}

/// A tenant row changed by another writer between two of this store's batches (here
/// `update_tenant`, as another process or path would): the next batch still decides on
/// the row as it is. (PostgreSQL sends a hot tenant's creates decided on the row its
/// last batch left, guarded: this one's guess is stale on `max_users` and the event
/// sequence, and it must be written again, locking first.) A taken email found only by
/// the database fails its write alone, and a guess that holds commits.
pub async fn a_row_changed_between_batches_is_seen(s: Arc<dyn Store>) {
    let t = tenant(&s, "moved", 4).await;
    let first = new_user(t.id, "first@x.io");
    assert!(created(&s.write_batch(t.id, &[create(&first, None)]).await[0]).is_some());
    let patch = TenantPatch { max_users: Some(3), ..TenantPatch::default() };
    s.update_tenant(t.id, &patch, &ctx()).await.unwrap();
    let before = outbox(&s).await.len();
    let (two, three, four) = (new_user(t.id, "two@x.io"), new_user(t.id, "three@x.io"), new_user(t.id, "four@x.io"));
    let first_again = new_user(t.id, "FIRST@x.io");
    let out = s
        .write_batch(t.id, &[create(&two, None), create(&first_again, None), create(&three, None), create(&four, None)])
        .await;
    assert_eq!(created(&out[0]), Some((two.0.id, false)));
    assert!(matches!(&out[1], Err(StoreError::Conflict(m)) if m.contains("FIRST@x.io")), "{:?}", out[1]);
    assert_eq!(created(&out[2]), Some((three.0.id, false)));
    assert!(matches!(out[3], Err(StoreError::TenantFull { max_users: 3 })), "the lowered limit holds: {:?}", out[3]);
    // A guess from this batch's row: the tenant is full, then it is not.
    let five = new_user(t.id, "five@x.io");
    assert!(matches!(s.write_batch(t.id, &[create(&five, None)]).await[0], Err(StoreError::TenantFull { .. })));
    s.update_tenant(t.id, &TenantPatch { max_users: Some(0), ..TenantPatch::default() }, &ctx()).await.unwrap();
    let (six, seven) = (new_user(t.id, "six@x.io"), new_user(t.id, "seven@x.io"));
    let out = s.write_batch(t.id, &[create(&six, None), create(&seven, None)]).await;
    assert_eq!((created(&out[0]), created(&out[1])), (Some((six.0.id, false)), Some((seven.0.id, false))));
    let out = s.write_batch(t.id, &[create(&new_user(t.id, "six@X.io"), None), create(&five, None)]).await;
    assert!(matches!(&out[0], Err(StoreError::Conflict(_))), "taken, found by the database: {:?}", out[0]);
    assert_eq!(created(&out[1]), Some((five.0.id, false)));
    let eight = new_user(t.id, "eight@x.io");
    assert_eq!(created(&s.write_batch(t.id, &[create(&eight, None)]).await[0]), Some((eight.0.id, false)));

    assert_eq!(s.get_tenant(t.id).await.unwrap().user_count, 7);
    let rows = expect_events(&s, 7, before).await;
    let mine: Vec<(i64, EventType)> =
        rows.iter().filter(|r| r.tenant_id == t.id).map(|r| (r.tenant_seq, r.event.event_type.clone())).collect();
    let created_at = |seq| (seq, EventType::UserCreated);
    assert_eq!(
        mine,
        vec![
            created_at(4),
            created_at(5),
            (6, EventType::TenantUpdated),
            created_at(7),
            created_at(8),
            created_at(9),
            created_at(10)
        ],
        "gap-free, one event per change"
    );
}

/// Text is stored exactly as given, however a backend puts it on the wire (PostgreSQL's
/// batches write values as SQL literals): quotes, backslashes, SQL-looking text,
/// dollar quotes and characters beyond ASCII, in emails, names, attributes (keys and
/// values), idempotency keys and the events' payloads.
pub async fn awkward_text_is_stored_exactly(s: Arc<dyn Store>) {
    let t = tenant(&s, "awkward", 0).await;
    let before = outbox(&s).await.len();
    let names = [
        "O'Neil",
        "it''s ''",
        r"back\slash \' \",
        "'); DELETE FROM users; --",
        "$$ dollar $1 $tag$ ?",
        "Zoë 名前 🦀",
        r#"E'\n' "quoted" \u0041"#,
    ];
    let users: Vec<NewUser> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut attributes = serde_json::Map::new();
            attributes.insert(format!("k'{i}\\"), serde_json::json!({ "v": name, "n": [1, "x'y", r"\'"] }));
            let input = NewUserInput {
                email: format!("o'neil+{i}@x.io"),
                name: (*name).into(),
                attributes: Some(attributes),
                password: None,
            };
            NewUser::parse(t.id, input, eventra::domain::now()).expect("valid user")
        })
        .collect();
    let (key, hash) = (r"key 'with' quotes \ and ; COMMIT; --", "h'1");
    let writes: Vec<TenantWrite> =
        users.iter().enumerate().map(|(i, u)| create(u, (i == 0).then_some((key, hash)))).collect();
    let out = s.write_batch(t.id, &writes).await;
    for (o, u) in out.iter().zip(&users) {
        assert_eq!(created(o), Some((u.0.id, false)), "{o:?}");
    }
    for u in &users {
        let got = s.get_user(t.id, u.0.id).await.unwrap();
        assert_eq!((&got.email, &got.name, &got.attributes), (&u.0.email, &u.0.name, &u.0.attributes));
    }
    let rows = expect_events(&s, users.len(), before).await;
    for (r, u) in rows.iter().zip(&users) {
        assert_eq!(r.event.subject, u.0.id.to_string());
        let payload = serde_json::to_value(&r.event.data).unwrap();
        let stored = serde_json::to_string(&payload).unwrap();
        for text in [&u.0.name, &u.0.email] {
            assert!(stored.contains(&serde_json::to_string(text).unwrap()), "{text:?} in {stored}");
        }
    }
    let again = s
        .create_user(&users[0], Some(&IdempotencyRequest { key: key.into(), request_hash: hash.into() }), &ctx())
        .await
        .unwrap();
    assert_eq!((again.value.id, again.replayed), (users[0].0.id, true), "the stored key is the key given");
}

/// Sessions: refresh tokens rotate once, a spent one revokes the session (with its
/// event), revocation is scoped to its user, codes count tries and redeem once, and
/// ended sessions and dead codes are purged.
pub async fn sessions_refresh_tokens_and_codes(s: Arc<dyn Store>) {
    use eventra::domain::auth::Session;
    use eventra::store::{CodeOutcome, RefreshUse};
    let t = tenant(&s, "auth", 0).await;
    let u = s.create_user(&new_user(t.id, "a@x.io"), None, &ctx()).await.unwrap().value;
    let now = eventra::domain::now();
    let session = Session {
        id: Uuid::now_v7(),
        tenant_id: t.id,
        user_id: u.id,
        created_at: now,
        last_used_at: now,
        expires_at: now + chrono::Duration::days(30),
        user_agent: "test".into(),
        ip: "192.0.2.1".into(),
    };
    let before = outbox(&s).await.len();
    s.create_session(&session, "h1", &DomainEvent::auth_login_succeeded(&session, &ctx())).await.unwrap();
    expect_events(&s, 1, before).await;
    assert!(s.session_active(t.id, session.id).await.unwrap());
    assert_eq!(s.sessions_of(t.id, u.id).await.unwrap(), vec![session.clone()]);
    // Rotation, then reuse of the spent token, then the successor is dead too.
    match s.use_refresh_token(t.id, "h1", "h2", "r").await.unwrap() {
        RefreshUse::Rotated { session: got, user } => {
            assert_eq!((got.id, user.id), (session.id, u.id));
        }
        other => panic!("{other:?}"),
    }
    let other = tenant(&s, "auth-other", 0).await;
    assert_eq!(s.use_refresh_token(other.id, "h2", "x", "r").await.unwrap(), RefreshUse::Invalid, "another tenant's");
    let before = outbox(&s).await.len();
    assert!(matches!(s.use_refresh_token(t.id, "h1", "h3", "r").await.unwrap(), RefreshUse::Reused(_)));
    let reuse = expect_events(&s, 1, before).await;
    assert_eq!(reuse[0].event.event_type.as_str(), "auth.refresh_reuse_detected");
    assert_eq!(s.use_refresh_token(t.id, "h2", "h4", "r").await.unwrap(), RefreshUse::Invalid);
    assert!(!s.session_active(t.id, session.id).await.unwrap());
    assert!(s.sessions_of(t.id, u.id).await.unwrap().is_empty());
    // Revocation: only the session's own user's scope, once.
    let second = Session { id: Uuid::now_v7(), ..session.clone() };
    s.create_session(&second, "g1", &DomainEvent::auth_login_succeeded(&second, &ctx())).await.unwrap();
    assert!(s.revoke_session(t.id, second.id, Some(Uuid::now_v7()), "x", &ctx()).await.unwrap().is_none());
    assert!(s.revoke_session(t.id, second.id, Some(u.id), "logout", &ctx()).await.unwrap().is_some());
    assert!(s.revoke_session(t.id, second.id, None, "logout", &ctx()).await.unwrap().is_none());
    // Codes: a wrong one spends a try; the right one verifies the email, once.
    s.put_code(t.id, u.id, "verify", "c1", now + chrono::Duration::minutes(15), 5).await.unwrap();
    assert_eq!(
        s.redeem_code(t.id, u.id, "verify", "bad", None, &ctx()).await.unwrap(),
        CodeOutcome::Wrong { tries_left: 4 }
    );
    match s.redeem_code(t.id, u.id, "verify", "c1", None, &ctx()).await.unwrap() {
        CodeOutcome::Redeemed(user) => assert!(user.email_verified && user.version == u.version + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.redeem_code(t.id, u.id, "verify", "c1", None, &ctx()).await.unwrap(), CodeOutcome::NoCode);
    // Purge: ended sessions (and their tokens) and dead codes.
    s.put_code(t.id, u.id, "reset", "c2", now - chrono::Duration::minutes(1), 5).await.unwrap();
    let live = Session { id: Uuid::now_v7(), ..session.clone() };
    s.create_session(&live, "k1", &DomainEvent::auth_login_succeeded(&live, &ctx())).await.unwrap();
    let purged = s.purge_auth(eventra::domain::now() + chrono::Duration::seconds(1)).await.unwrap();
    assert_eq!(purged, 2 + 3 + 1, "two ended sessions, their three tokens, one dead code");
    assert!(s.session_active(t.id, live.id).await.unwrap(), "a live session stays");
    assert!(matches!(s.use_refresh_token(t.id, "k1", "k2", "r").await.unwrap(), RefreshUse::Rotated { .. }));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = crate::utils::TestDb::sqlite();
                    super::$name(db.store().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = crate::utils::TestDb::postgres(concat!("store_conformance::postgres::", stringify!($name))).await else { return };
                    super::$name(db.store().await).await;
                }
            )*
        }
    };
}

conformance!(
    tenant_changes_write_one_event_each,
    user_changes_write_one_event_each,
    failed_changes_write_nothing,
    idempotent_create_replays,
    idempotency_records_can_be_purged,
    lists_page_by_cursor_within_a_tenant,
    tenants_cannot_touch_each_other,
    audit_and_email_logs_are_idempotent,
    the_relay_reads_unpublished_rows_and_leases,
    batched_effects_reads_and_writes,
    batched_writes_keep_every_rule,
    one_failing_statement_fails_only_its_write,
    awkward_text_is_stored_exactly,
    a_row_changed_between_batches_is_seen,
    tenant_activity_counts_recent_events,
    the_delivery_log_knows_failing_streaks_and_prunes,
    custom_events_are_written_once_per_client_id,
    sessions_refresh_tokens_and_codes,
    email_claims_let_one_attempt_send,
);

/// Processes starting together on one SQLite file (roles split over processes) take
/// turns migrating it: each sees the schema whole, none applies a migration twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_of_one_sqlite_file_take_turns() {
    for _ in 0..3 {
        let db = crate::utils::TestDb::sqlite();
        let mut starts = Vec::new();
        for _ in 0..4 {
            let url = db.url().to_owned();
            starts.push(tokio::spawn(async move {
                let store = eventra::store::SqliteStore::connect(&url, 2).await?;
                eventra::store::Store::migrate(&store).await
            }));
        }
        for s in starts {
            s.await.unwrap().expect("every process migrates (or finds the schema migrated)");
        }
    }
}
