//! Webhook endpoints (SPEC §7): what a tenant subscribes, and the rules for it. The URL's
//! syntax and the event-type filters are checked here; whether the URL's host may be
//! called (SSRF) needs DNS and lives in `webhooks::ssrf`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validation::ValidationErrors;

/// Secrets are shown as `whsec_<base64 of 24 random bytes>` (Standard Webhooks).
pub const SECRET_PREFIX: &str = "whsec_";
const MAX_URL_LEN: usize = 2048;
const MAX_EVENT_TYPES: usize = 64;
const MAX_DESCRIPTION: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EndpointStatus {
    Enabled,
    Disabled,
}

impl EndpointStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointStatus::Enabled => "enabled",
            EndpointStatus::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(EndpointStatus::Enabled),
            "disabled" => Some(EndpointStatus::Disabled),
            _ => None,
        }
    }
}

/// An endpoint as the API shows it (never with its secret, except at create and rotation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookEndpoint {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub url: String,
    pub description: String,
    /// Exact event types or `prefix.*`; empty: every event of the tenant.
    pub event_types: Vec<String>,
    pub status: EndpointStatus,
    /// Why it was disabled (`410 Gone`, failures for 5 days, or by hand).
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// Whether this endpoint wants events of `event_type`.
    pub fn wants(&self, event_type: &str) -> bool {
        self.status == EndpointStatus::Enabled && filters_match(&self.event_types, event_type)
    }
}

/// The signing secrets of an endpoint: the current one and, during a rotation's overlap,
/// the previous one.
#[derive(Clone, PartialEq)]
pub struct Secrets {
    pub current: String,
    pub previous: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(…)")
    }
}

/// One delivery attempt, as the log shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    /// 1 for the first try.
    pub attempt: i32,
    /// `succeeded` or `failed`; `pending` in the `status=pending` listing (this
    /// attempt failed and another is due).
    pub status: String,
    /// The receiver's HTTP status, when it answered.
    pub response_status: Option<i32>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// `event_types` semantics: empty matches all; `a.b` matches exactly; `a.*` matches
/// every type that starts with `a.`.
pub fn filters_match(filters: &[String], event_type: &str) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| match f.strip_suffix('*') {
            Some(prefix) => event_type.starts_with(prefix),
            None => f == event_type,
        })
}

/// A fresh `whsec_…` secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

/// Body of `POST …/webhooks`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpointInput {
    /// `https://…` (or `http://` with `EVENTRA_WEBHOOK_ALLOW_PRIVATE=1`); must resolve to
    /// public addresses.
    #[schema(max_length = 2048)]
    pub url: String,
    /// Exact types (`user.created`) or prefixes (`user.*`); absent or empty: every event.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    #[schema(max_length = 500)]
    pub description: Option<String>,
}

/// Body of `PATCH …/webhooks/{id}`; absent fields stay.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    #[schema(max_length = 2048)]
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    #[schema(max_length = 500)]
    pub description: Option<String>,
    pub status: Option<EndpointStatus>,
}

/// A validated endpoint, ready to insert.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub endpoint: WebhookEndpoint,
    pub secret: String,
}

impl NewEndpoint {
    pub fn parse(
        tenant_id: Uuid,
        input: NewEndpointInput,
        allow_plain_http: bool,
        now: DateTime<Utc>,
    ) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let url = check_url(&mut errors, &input.url, allow_plain_http);
        let event_types = check_event_types(&mut errors, input.event_types.unwrap_or_default());
        let description = check_description(&mut errors, input.description.unwrap_or_default());
        errors.into_result(NewEndpoint {
            endpoint: WebhookEndpoint {
                id: Uuid::now_v7(),
                tenant_id,
                url,
                description,
                event_types,
                status: EndpointStatus::Enabled,
                disabled_reason: None,
                created_at: now,
                updated_at: now,
            },
            secret: new_secret(),
        })
    }
}

impl EndpointPatch {
    /// The endpoint after the change (validated).
    pub fn apply(
        self,
        before: &WebhookEndpoint,
        allow_plain_http: bool,
        now: DateTime<Utc>,
    ) -> Result<WebhookEndpoint, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let mut after = before.clone();
        if let Some(url) = self.url {
            after.url = check_url(&mut errors, &url, allow_plain_http);
        }
        if let Some(types) = self.event_types {
            after.event_types = check_event_types(&mut errors, types);
        }
        if let Some(d) = self.description {
            after.description = check_description(&mut errors, d);
        }
        if let Some(status) = self.status {
            if status != before.status {
                after.disabled_reason = (status == EndpointStatus::Disabled).then(|| "disabled by the tenant".into());
            }
            after.status = status;
        }
        after.updated_at = now;
        errors.into_result(after)
    }
}

fn check_url(errors: &mut ValidationErrors, raw: &str, allow_plain_http: bool) -> String {
    let raw = raw.trim();
    if raw.len() > MAX_URL_LEN {
        errors.add("url", format!("must be at most {MAX_URL_LEN} bytes"));
        return raw.to_owned();
    }
    match url::Url::parse(raw) {
        Err(e) => errors.add("url", format!("must be an absolute URL like https://example.com/hooks ({e})")),
        Ok(u) => {
            let scheme_ok = u.scheme() == "https" || (allow_plain_http && u.scheme() == "http");
            if !scheme_ok {
                errors.add("url", "must use https://");
            } else if u.host_str().is_none_or(str::is_empty) {
                errors.add("url", "must name a host");
            } else if !u.username().is_empty() || u.password().is_some() {
                errors.add("url", "must not carry credentials; authenticate with the webhook signature");
            } else if u.fragment().is_some() {
                errors.add("url", "must not have a #fragment");
            }
        }
    }
    raw.to_owned()
}

fn check_event_types(errors: &mut ValidationErrors, types: Vec<String>) -> Vec<String> {
    if types.len() > MAX_EVENT_TYPES {
        errors.add("event_types", format!("at most {MAX_EVENT_TYPES} entries"));
        return types;
    }
    for (i, t) in types.iter().enumerate() {
        if !is_filter(t) {
            errors.add(
                &format!("event_types/{i}"),
                "must be an event type like `user.created` or a prefix like `user.*`",
            );
        }
    }
    let mut types = types;
    types.sort();
    types.dedup();
    types
}

/// `a.b.c` (lowercase words of a-z, 0-9, `_`) or `a.b.*`.
fn is_filter(t: &str) -> bool {
    let body = t.strip_suffix(".*").unwrap_or(t);
    !body.is_empty()
        && t.len() <= 200
        && body.split('.').all(|w| {
            w.starts_with(|c: char| c.is_ascii_lowercase())
                && w.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn check_description(errors: &mut ValidationErrors, d: String) -> String {
    let d = d.trim().to_owned();
    if d.chars().count() > MAX_DESCRIPTION {
        errors.add("description", format!("must be at most {MAX_DESCRIPTION} characters"));
    } else if d.chars().any(char::is_control) {
        errors.add("description", "must not contain control characters");
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(url: &str, types: &[&str]) -> NewEndpointInput {
        NewEndpointInput {
            url: url.into(),
            event_types: Some(types.iter().map(|s| s.to_string()).collect()),
            description: None,
        }
    }

    #[test]
    fn filters_are_exact_or_prefixes() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(filters_match(&[], "user.created"));
        assert!(filters_match(&f(&["user.*"]), "user.created"));
        assert!(!filters_match(&f(&["user.*"]), "tenant.created"));
        assert!(!filters_match(&f(&["user.*"]), "username.x"), "the dot is part of the prefix");
        assert!(filters_match(&f(&["tenant.updated", "user.created"]), "user.created"));
        assert!(!filters_match(&f(&["user.created"]), "user.created.v2"));
    }

    #[test]
    fn urls_and_filters_are_checked() {
        let now = Utc::now();
        let t = Uuid::now_v7();
        assert!(NewEndpoint::parse(t, input("https://hooks.example.com/x", &["user.*"]), false, now).is_ok());
        for (url, allow) in [
            ("http://hooks.example.com/x", false),
            ("ftp://x.example.com", true),
            ("not a url", true),
            ("https://user:pw@x.example.com", false),
        ] {
            let e = NewEndpoint::parse(t, input(url, &[]), allow, now).unwrap_err();
            assert_eq!(e.errors[0].field, "url", "{url}");
        }
        assert!(NewEndpoint::parse(t, input("http://127.0.0.1:9/x", &[]), true, now).is_ok());
        let e =
            NewEndpoint::parse(t, input("https://x.example.com", &["user.*", "User.Created", "*", "a..b"]), false, now)
                .unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["event_types/1", "event_types/2", "event_types/3"]);
    }

    #[test]
    fn secrets_are_whsec_and_random() {
        let (a, b) = (new_secret(), new_secret());
        assert!(a.starts_with(SECRET_PREFIX) && a != b);
        assert_eq!(STANDARD.decode(&a[SECRET_PREFIX.len()..]).unwrap().len(), 24);
    }
}
