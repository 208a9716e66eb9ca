//! Which jobs a domain event causes. The broker consumers call [`jobs_for_event`] and
//! enqueue the result before they ack; every job's idempotency key derives from the
//! event (or its user), so a redelivered event adds no second job.

use super::kinds::index::IndexArgs;
use super::kinds::welcome_email::WelcomeArgs;
use super::NewJob;
use crate::domain::{DomainEvent, EventType, User};

/// Every event gets an audit job; a new user also gets a welcome email; user changes
/// keep the search index in step.
pub fn jobs_for_event(event: &DomainEvent) -> Vec<NewJob> {
    let mut jobs = vec![NewJob::new("audit", format!("audit:{}", event.id), serde_json::json!(event))];
    let user_in = |key: &str| event.data.get(key).and_then(|u| serde_json::from_value::<User>(u.clone()).ok());
    match event.event_type {
        EventType::UserCreated => {
            if let Some(user) = user_in("user") {
                jobs.push(IndexArgs::index_user(user.tenant_id, user.id, user.version));
                jobs.push(
                    WelcomeArgs { tenant_id: user.tenant_id, user_id: user.id, email: user.email, name: user.name }
                        .job(),
                );
            }
        }
        EventType::UserUpdated | EventType::UserVerified => {
            if let Some(user) = user_in("after") {
                jobs.push(IndexArgs::index_user(user.tenant_id, user.id, user.version));
            }
        }
        EventType::UserDeleted => {
            if let Some(user) = user_in("user") {
                jobs.push(IndexArgs::unindex_user(user.tenant_id, user.id));
            }
        }
        EventType::TenantDeleted => jobs.push(IndexArgs::unindex_tenant(event.tenantid)),
        EventType::TenantCreated | EventType::TenantUpdated | EventType::ApiKeyCreated => {}
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventContext, NewUser};

    #[test]
    fn a_new_user_gets_an_audit_entry_and_one_welcome_email() {
        let input = serde_json::from_value(serde_json::json!({"email": "a@x.io", "name": "A"})).unwrap();
        let u = NewUser::parse(uuid::Uuid::now_v7(), input, crate::domain::now()).unwrap().0;
        let e = DomainEvent::user_created(&u, &EventContext::system("r"));
        let jobs = jobs_for_event(&e);
        let keys: Vec<_> = jobs.iter().map(|j| j.idempotency_key.clone()).collect();
        assert_eq!(
            keys,
            [format!("audit:{}", e.id), format!("index_user:{}:1", u.id), format!("welcome_email:{}", u.id)]
        );
        assert_eq!(jobs[2].args["email"], "a@x.io");
        // The same event again: the same keys (so the queue drops the duplicates).
        assert_eq!(jobs_for_event(&e), jobs);
        let deleted = DomainEvent::user_deleted(&u, crate::domain::now(), &EventContext::system("r"));
        let kinds: Vec<_> = jobs_for_event(&deleted).into_iter().map(|j| j.kind).collect();
        assert_eq!(kinds, ["audit", "unindex_user"]);
    }
}
