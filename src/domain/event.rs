//! Domain events in the CloudEvents 1.0 JSON envelope.
//!
//! An event is built by the same code path that makes the change and is written to the
//! outbox in the same transaction, so "committed change" and "event exists" are one fact.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{ApiKey, Tenant, User};

/// Every event type Eventra emits. Consumers reject types not listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "tenant.created")]
    TenantCreated,
    #[serde(rename = "tenant.updated")]
    TenantUpdated,
    #[serde(rename = "tenant.deleted")]
    TenantDeleted,
    #[serde(rename = "api_key.created")]
    ApiKeyCreated,
    #[serde(rename = "user.created")]
    UserCreated,
    #[serde(rename = "user.updated")]
    UserUpdated,
    #[serde(rename = "user.deleted")]
    UserDeleted,
    #[serde(rename = "user.verified")]
    UserVerified,
    #[serde(rename = "webhook.disabled")]
    WebhookDisabled,
    /// Sent to one endpoint by `POST …/webhooks/{id}/test`; never in the outbox.
    #[serde(rename = "webhook.test")]
    WebhookTest,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::TenantCreated,
        EventType::TenantUpdated,
        EventType::TenantDeleted,
        EventType::ApiKeyCreated,
        EventType::UserCreated,
        EventType::UserUpdated,
        EventType::UserDeleted,
        EventType::UserVerified,
        EventType::WebhookDisabled,
        EventType::WebhookTest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::TenantCreated => "tenant.created",
            EventType::TenantUpdated => "tenant.updated",
            EventType::TenantDeleted => "tenant.deleted",
            EventType::ApiKeyCreated => "api_key.created",
            EventType::UserCreated => "user.created",
            EventType::UserUpdated => "user.updated",
            EventType::UserDeleted => "user.deleted",
            EventType::UserVerified => "user.verified",
            EventType::WebhookDisabled => "webhook.disabled",
            EventType::WebhookTest => "webhook.test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Who made a change: recorded on every event for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Actor {
    /// The platform admin token.
    PlatformAdmin,
    /// A tenant API key.
    ApiKey { id: Uuid, role: super::Role },
}

/// Request-scoped facts every event carries.
#[derive(Debug, Clone, PartialEq)]
pub struct EventContext {
    /// The request id, so an event can be traced back to the call that caused it.
    pub correlation_id: String,
    pub actor: Actor,
}

impl EventContext {
    /// Context for changes made by the system itself (tests, maintenance commands).
    pub fn system(correlation_id: impl Into<String>) -> Self {
        EventContext { correlation_id: correlation_id.into(), actor: Actor::PlatformAdmin }
    }
}

/// A CloudEvents 1.0 envelope; `tenantid`, `correlationid` and `actor` are extension attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    pub specversion: String,
    pub id: Uuid,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub time: DateTime<Utc>,
    pub subject: String,
    pub tenantid: Uuid,
    pub correlationid: String,
    pub datacontenttype: String,
    pub actor: Actor,
    pub data: Value,
}

impl DomainEvent {
    fn new(
        event_type: EventType,
        tenant_id: Uuid,
        subject: Uuid,
        time: DateTime<Utc>,
        ctx: &EventContext,
        data: Value,
    ) -> Self {
        DomainEvent {
            specversion: "1.0".into(),
            id: Uuid::now_v7(),
            source: format!("/eventra/tenants/{tenant_id}"),
            event_type,
            time,
            subject: subject.to_string(),
            tenantid: tenant_id,
            correlationid: ctx.correlation_id.clone(),
            datacontenttype: "application/json".into(),
            actor: ctx.actor.clone(),
            data,
        }
    }

    /// The tenant and the admin key created with it (never the key's secret).
    pub fn tenant_created(t: &Tenant, admin_key: &ApiKey, ctx: &EventContext) -> Self {
        Self::new(EventType::TenantCreated, t.id, t.id, t.created_at, ctx, json!({ "tenant": t, "api_key": admin_key }))
    }

    pub fn tenant_updated(before: &Tenant, after: &Tenant, ctx: &EventContext) -> Self {
        Self::new(
            EventType::TenantUpdated,
            after.id,
            after.id,
            after.updated_at,
            ctx,
            json!({ "before": before, "after": after }),
        )
    }

    pub fn tenant_deleted(t: &Tenant, at: DateTime<Utc>, ctx: &EventContext) -> Self {
        Self::new(EventType::TenantDeleted, t.id, t.id, at, ctx, json!({ "tenant": t }))
    }

    pub fn api_key_created(k: &ApiKey, ctx: &EventContext) -> Self {
        Self::new(EventType::ApiKeyCreated, k.tenant_id, k.id, k.created_at, ctx, json!({ "api_key": k }))
    }

    pub fn user_created(u: &User, ctx: &EventContext) -> Self {
        Self::new(EventType::UserCreated, u.tenant_id, u.id, u.created_at, ctx, json!({ "user": u }))
    }

    /// `kind` is `user.updated` or `user.verified`, as decided by `UserPatch::apply`.
    pub fn user_changed(kind: EventType, before: &User, after: &User, ctx: &EventContext) -> Self {
        Self::new(kind, after.tenant_id, after.id, after.updated_at, ctx, json!({ "before": before, "after": after }))
    }

    /// An endpoint was disabled by Eventra (410 Gone, or failing for 5 days).
    pub fn webhook_disabled(e: &super::webhook::WebhookEndpoint, ctx: &EventContext) -> Self {
        Self::new(EventType::WebhookDisabled, e.tenant_id, e.id, e.updated_at, ctx, json!({ "webhook": e }))
    }

    /// The event `POST …/webhooks/{id}/test` sends to one endpoint.
    pub fn webhook_test(e: &super::webhook::WebhookEndpoint, ctx: &EventContext) -> Self {
        let at = super::now();
        Self::new(
            EventType::WebhookTest,
            e.tenant_id,
            e.id,
            at,
            ctx,
            json!({ "webhook_id": e.id, "message": "a test event from Eventra" }),
        )
    }

    pub fn user_deleted(u: &User, at: DateTime<Utc>, ctx: &EventContext) -> Self {
        Self::new(EventType::UserDeleted, u.tenant_id, u.id, at, ctx, json!({ "user": u }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_cloudevents_fields() {
        let t = crate::domain::NewTenant::parse(
            crate::domain::tenant::NewTenantInput { name: "Acme".into(), slug: "acme".into(), max_users: None },
            Utc::now(),
        )
        .unwrap()
        .to_tenant();
        let key = crate::domain::NewApiKey::generate(t.id, crate::domain::Role::Admin, Utc::now());
        let e = DomainEvent::tenant_created(&t, &key.key, &EventContext::system("req-1"));
        assert!(!serde_json::to_string(&e).unwrap().contains(&key.secret));
        let v = serde_json::to_value(&e).unwrap();
        for field in ["specversion", "id", "source", "type", "time", "subject", "tenantid", "correlationid", "data"] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["type"], "tenant.created");
        assert_eq!(v["correlationid"], "req-1");
        let back: DomainEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("user.exploded"), None);
    }
}
