//! Domain events in the CloudEvents 1.0 JSON envelope.
//!
//! An event is built by the same code path that makes the change and is written to the
//! outbox in the same transaction, so "committed change" and "event exists" are one fact.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{ApiKey, Tenant, User};

/// Every event type: Eventra's own, and the types tenants register for their own
/// events (SPEC §9). Consumers reject types that are neither.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventType {
    TenantCreated,
    TenantUpdated,
    TenantDeleted,
    ApiKeyCreated,
    UserCreated,
    UserUpdated,
    UserDeleted,
    UserVerified,
    UserPasswordChanged,
    AuthLoginSucceeded,
    AuthLoginFailed,
    AuthSessionRevoked,
    AuthRefreshReuseDetected,
    WebhookDisabled,
    /// Sent to one endpoint by `POST …/webhooks/{id}/test`; never in the outbox.
    WebhookTest,
    /// A tenant's own type (`order.placed`): a name outside the reserved prefixes,
    /// checked by [`super::custom_event::check_type_name`].
    Custom(std::sync::Arc<str>),
}

impl EventType {
    /// Eventra's own types.
    pub const ALL: [EventType; 15] = [
        EventType::TenantCreated,
        EventType::TenantUpdated,
        EventType::TenantDeleted,
        EventType::ApiKeyCreated,
        EventType::UserCreated,
        EventType::UserUpdated,
        EventType::UserDeleted,
        EventType::UserVerified,
        EventType::UserPasswordChanged,
        EventType::AuthLoginSucceeded,
        EventType::AuthLoginFailed,
        EventType::AuthSessionRevoked,
        EventType::AuthRefreshReuseDetected,
        EventType::WebhookDisabled,
        EventType::WebhookTest,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            EventType::TenantCreated => "tenant.created",
            EventType::TenantUpdated => "tenant.updated",
            EventType::TenantDeleted => "tenant.deleted",
            EventType::ApiKeyCreated => "api_key.created",
            EventType::UserCreated => "user.created",
            EventType::UserUpdated => "user.updated",
            EventType::UserDeleted => "user.deleted",
            EventType::UserVerified => "user.verified",
            EventType::UserPasswordChanged => "user.password_changed",
            EventType::AuthLoginSucceeded => "auth.login_succeeded",
            EventType::AuthLoginFailed => "auth.login_failed",
            EventType::AuthSessionRevoked => "auth.session_revoked",
            EventType::AuthRefreshReuseDetected => "auth.refresh_reuse_detected",
            EventType::WebhookDisabled => "webhook.disabled",
            EventType::WebhookTest => "webhook.test",
            EventType::Custom(name) => name,
        }
    }

    /// One of Eventra's own types, by name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Eventra's own type by that name, or a well-formed custom one.
    pub fn parse_any(s: &str) -> Option<Self> {
        Self::parse(s).or_else(|| {
            super::custom_event::check_type_name(s).ok().map(|()| EventType::Custom(std::sync::Arc::from(s)))
        })
    }

    pub fn is_custom(&self) -> bool {
        matches!(self, EventType::Custom(_))
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        EventType::parse_any(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown event type {name:?}")))
    }
}

/// The time in a UUIDv7 (an event id: when the event was committed).
pub fn id_time(id: Uuid) -> Option<DateTime<Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

/// Who made a change: recorded on every event for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Actor {
    /// The platform admin token.
    PlatformAdmin,
    /// A tenant API key.
    ApiKey { id: Uuid, role: super::Role },
    /// A tenant's user, signed in (or signing in) themselves.
    User { id: Uuid },
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

    /// A tenant's own event (SPEC §9): `subject` defaults to the event id.
    pub fn custom(
        event_type: EventType,
        tenant_id: Uuid,
        subject: Option<String>,
        time: DateTime<Utc>,
        ctx: &EventContext,
        data: Value,
    ) -> Self {
        let mut e = Self::new(event_type, tenant_id, Uuid::nil(), time, ctx, data);
        e.subject = subject.unwrap_or_else(|| e.id.to_string());
        e
    }

    /// When the event was committed: its id is a UUIDv7 taken at the change (a custom
    /// event's `time` is the client's, so this, not `time`, starts latency clocks).
    pub fn committed_at(&self) -> DateTime<Utc> {
        id_time(self.id).unwrap_or(self.time)
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

    /// The user's password was set (never the password: the user as it is).
    pub fn user_password_changed(u: &User, ctx: &EventContext) -> Self {
        Self::new(EventType::UserPasswordChanged, u.tenant_id, u.id, super::now(), ctx, json!({ "user": u }))
    }

    /// A sign-in: the session it opened (never a password or token).
    pub fn auth_login_succeeded(s: &super::auth::Session, ctx: &EventContext) -> Self {
        Self::new(EventType::AuthLoginSucceeded, s.tenant_id, s.user_id, s.created_at, ctx, json!({ "session": s }))
    }

    /// A refused sign-in of a known user (`reason`: `wrong_password` or `disabled`).
    pub fn auth_login_failed(tenant_id: Uuid, user_id: Uuid, reason: &str, ip: &str, ctx: &EventContext) -> Self {
        let data = json!({ "attempt": { "user_id": user_id, "reason": reason, "ip": ip } });
        Self::new(EventType::AuthLoginFailed, tenant_id, user_id, super::now(), ctx, data)
    }

    pub fn auth_session_revoked(s: &super::auth::Session, reason: &str, ctx: &EventContext) -> Self {
        let data = json!({ "session": s, "reason": reason });
        Self::new(EventType::AuthSessionRevoked, s.tenant_id, s.user_id, super::now(), ctx, data)
    }

    /// A spent refresh token was presented again: its session (the family) is revoked.
    pub fn auth_refresh_reuse_detected(s: &super::auth::Session, ctx: &EventContext) -> Self {
        Self::new(
            EventType::AuthRefreshReuseDetected,
            s.tenant_id,
            s.user_id,
            super::now(),
            ctx,
            json!({ "session": s }),
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
            crate::domain::tenant::NewTenantInput {
                name: "Acme".into(),
                slug: "acme".into(),
                max_users: None,
                rate_limit_per_second: None,
            },
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
            assert_eq!(EventType::parse(t.as_str()), Some(t.clone()));
        }
        assert_eq!(EventType::parse("user.exploded"), None);
        assert_eq!(EventType::parse_any("user.exploded"), None, "reserved, and not ours");
        let custom = EventType::parse_any("order.placed").unwrap();
        assert!(custom.is_custom());
        let json = serde_json::to_value(&custom).unwrap();
        assert_eq!(json, "order.placed");
        assert_eq!(serde_json::from_value::<EventType>(json).unwrap(), custom);
        assert!(serde_json::from_value::<EventType>("user.exploded".into()).is_err());
    }
}
