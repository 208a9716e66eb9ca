//! Audit entries: every domain event, as an operator reads it back (who, what, when,
//! before/after). Built from the event alone, so writing one is idempotent by event id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Actor, DomainEvent};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// The event's id: one entry per event.
    pub event_id: Uuid,
    pub tenant_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The entity the event is about.
    pub subject: String,
    pub actor: Actor,
    pub correlation_id: String,
    pub at: DateTime<Utc>,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

impl AuditEntry {
    /// Updates carry `before` and `after`; a deletion's entity is the `before` state; a
    /// creation's is the `after` state (with anything created alongside it).
    pub fn from_event(e: &DomainEvent) -> Self {
        let (before, after) = if e.event_type.is_custom() {
            // A tenant's own event: its data as sent.
            (None, Some(e.data.clone()))
        } else if e.data.get("before").is_some() || e.data.get("after").is_some() {
            (e.data.get("before").cloned(), e.data.get("after").cloned())
        } else {
            let entity = match e.data.as_object() {
                Some(o) if o.len() == 1 => o.values().next().cloned(),
                _ => Some(e.data.clone()),
            };
            if e.event_type.as_str().ends_with(".deleted") {
                (entity, None)
            } else {
                (None, entity)
            }
        };
        AuditEntry {
            event_id: e.id,
            tenant_id: e.tenantid,
            event_type: e.event_type.as_str().to_owned(),
            subject: e.subject.clone(),
            actor: e.actor.clone(),
            correlation_id: e.correlationid.clone(),
            at: e.time,
            before,
            after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventContext, EventType, NewUser, User};

    fn user() -> User {
        let input = serde_json::from_value(serde_json::json!({"email": "a@x.io", "name": "A"})).unwrap();
        NewUser::parse(Uuid::now_v7(), input, crate::domain::now()).unwrap().0
    }

    #[test]
    fn before_and_after_follow_the_event() {
        let ctx = EventContext::system("req-9");
        let u = user();
        let created = AuditEntry::from_event(&DomainEvent::user_created(&u, &ctx));
        assert_eq!((created.before, created.after), (None, Some(serde_json::to_value(&u).unwrap())));
        assert_eq!((created.correlation_id.as_str(), created.event_type.as_str()), ("req-9", "user.created"));
        let mut v2 = u.clone();
        v2.name = "B".into();
        let updated = AuditEntry::from_event(&DomainEvent::user_changed(EventType::UserUpdated, &u, &v2, &ctx));
        assert_eq!(updated.before.unwrap()["name"], "A");
        assert_eq!(updated.after.unwrap()["name"], "B");
        let deleted = AuditEntry::from_event(&DomainEvent::user_deleted(&u, crate::domain::now(), &ctx));
        assert_eq!((deleted.before.map(|b| b["email"].clone()), deleted.after), (Some("a@x.io".into()), None));
    }
}
