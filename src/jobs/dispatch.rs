//! Which jobs a domain event causes. The broker consumers call [`jobs_for_event`] and
//! enqueue the result before they ack; every job's idempotency key derives from the
//! event (or its user), so a redelivered event adds no second job.

use super::kinds::index::IndexArgs;
use super::kinds::welcome_email::WelcomeArgs;
use super::NewJob;
use crate::domain::{ApiKey, DomainEvent, EventType, Tenant, User};

/// The part of an event's `data` that must be there, in the shape its type promises.
fn part<T: serde::de::DeserializeOwned>(event: &DomainEvent, key: &str) -> Result<T, String> {
    let value = event.data.get(key).ok_or_else(|| format!("{} data has no `{key}`", event.event_type.as_str()))?;
    T::deserialize(value)
        .map_err(|e| format!("{} data: `{key}` is not in the expected shape: {e}", event.event_type.as_str()))
}

/// A new user gets a welcome email; user changes keep the search index in step. (Every
/// event's audit entry is written by the consumer itself, with one `audit` job per
/// consumed batch to index the entries: see `actors::event_consumer`.)
///
/// An event whose `data` lacks what its type promises is refused as a whole (the
/// consumer parks it with the reason): enqueueing only the jobs that could be made
/// would ack the event with some of its effects silently missing.
pub fn jobs_for_event(event: &DomainEvent) -> Result<Vec<NewJob>, String> {
    let mut jobs = Vec::new();
    match &event.event_type {
        EventType::UserCreated => {
            let user: User = part(event, "user")?;
            jobs.push(IndexArgs::index_user(user.tenant_id, user.id, user.version));
            jobs.push(
                WelcomeArgs { tenant_id: user.tenant_id, user_id: user.id, email: user.email, name: user.name }.job(),
            );
        }
        EventType::UserUpdated | EventType::UserVerified => {
            let _: User = part(event, "before")?;
            let user: User = part(event, "after")?;
            jobs.push(IndexArgs::index_user(user.tenant_id, user.id, user.version));
        }
        EventType::UserDeleted => {
            let user: User = part(event, "user")?;
            jobs.push(IndexArgs::unindex_user(user.tenant_id, user.id));
        }
        EventType::TenantDeleted => {
            let _: Tenant = part(event, "tenant")?;
            jobs.push(IndexArgs::unindex_tenant(event.tenantid));
        }
        EventType::TenantCreated => {
            let _: Tenant = part(event, "tenant")?;
            let _: ApiKey = part(event, "api_key")?;
        }
        EventType::TenantUpdated => {
            let _: Tenant = part(event, "before")?;
            let _: Tenant = part(event, "after")?;
        }
        EventType::ApiKeyCreated => {
            let _: ApiKey = part(event, "api_key")?;
        }
        EventType::WebhookTest => {
            return Err("webhook.test events go to one endpoint directly, never through the bus".into());
        }
        EventType::WebhookDisabled => {
            let _: crate::domain::webhook::WebhookEndpoint = part(event, "webhook")?;
        }
        EventType::AuthLoginSucceeded | EventType::AuthRefreshReuseDetected => {
            let _: crate::domain::auth::Session = part(event, "session")?;
        }
        EventType::AuthSessionRevoked => {
            let _: crate::domain::auth::Session = part(event, "session")?;
            let _: String = part(event, "reason")?;
        }
        EventType::AuthLoginFailed => {
            let _: serde_json::Value = part(event, "attempt")?;
        }
        EventType::UserPasswordChanged => {
            let _: User = part(event, "user")?;
        }
        // A tenant's own event: its data was validated against its type's schema when it
        // was accepted; it is audited (and counted) like the others.
        EventType::Custom(_) => {}
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventContext, NewUser};

    #[test]
    fn a_new_user_gets_its_index_entry_and_one_welcome_email() {
        let input = serde_json::from_value(serde_json::json!({"email": "a@x.io", "name": "A"})).unwrap();
        let u = NewUser::parse(uuid::Uuid::now_v7(), input, crate::domain::now()).unwrap().0;
        let e = DomainEvent::user_created(&u, &EventContext::system("r"));
        let jobs = jobs_for_event(&e).unwrap();
        let keys: Vec<_> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
        assert_eq!(keys, [format!("index_user:{}:1", u.id), format!("welcome_email:{}", u.id)]);
        assert_eq!(jobs[1].args["email"], "a@x.io");
        // The same event again: the same keys (so the queue drops the duplicates).
        assert_eq!(jobs_for_event(&e).unwrap(), jobs);
        let deleted = DomainEvent::user_deleted(&u, crate::domain::now(), &EventContext::system("r"));
        let kinds: Vec<_> = jobs_for_event(&deleted).unwrap().into_iter().map(|j| j.kind).collect();
        assert_eq!(kinds, ["unindex_user"]);
    }
}

#[cfg(test)]
mod malformed {
    use super::*;
    use crate::domain::{EventContext, NewUser};

    #[test]
    fn an_event_without_the_data_its_type_promises_is_refused() {
        let input = serde_json::from_value(serde_json::json!({"email": "a@x.io", "name": "A"})).unwrap();
        let u = NewUser::parse(uuid::Uuid::now_v7(), input, crate::domain::now()).unwrap().0;
        let mut e = DomainEvent::user_created(&u, &EventContext::system("r"));
        e.data = serde_json::json!({"user": {"id": 1}});
        assert!(jobs_for_event(&e).unwrap_err().contains("`user`"));
        e.data = serde_json::json!({});
        assert!(jobs_for_event(&e).unwrap_err().contains("no `user`"));
    }
}
