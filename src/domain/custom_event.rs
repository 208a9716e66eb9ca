//! Tenants' own events (SPEC §9): the names of their event types, the JSON Schema each
//! type's `data` must satisfy, and what an ingested event must look like before it
//! becomes a CloudEvent in the outbox beside the domain events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::validation::ValidationErrors;
use super::{DomainEvent, EventContext, EventType};

/// Prefixes of Eventra's own events: a tenant cannot register types under them.
pub const RESERVED_PREFIXES: [&str; 5] = ["tenant.", "user.", "auth.", "webhook.", "api_key."];
/// The longest type name.
pub const MAX_TYPE_LEN: usize = 128;
/// Most events in one batch.
pub const MAX_BATCH: usize = 500;
/// The longest idempotency `id` a client may give an event.
pub const MAX_KEY_LEN: usize = 200;

/// `[a-z][a-z0-9_]*(\.[a-z0-9_]+)+`, at most [`MAX_TYPE_LEN`] characters, outside the
/// reserved prefixes; `Err` says what to fix.
pub fn check_type_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TYPE_LEN {
        return Err(format!("must be 1 to {MAX_TYPE_LEN} characters"));
    }
    let mut parts = name.split('.');
    let first = parts.next().unwrap_or_default();
    let well_formed = first.starts_with(|c: char| c.is_ascii_lowercase())
        && first.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.contains('.')
        && parts.all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    if !well_formed {
        return Err("must match [a-z][a-z0-9_]*(\\.[a-z0-9_]+)+, e.g. order.placed".into());
    }
    if let Some(prefix) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(format!("the prefix {prefix} is reserved for Eventra's own events"));
    }
    Ok(())
}

/// A tenant's event type.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventTypeDef {
    pub tenant_id: Uuid,
    #[schema(example = "order.placed")]
    pub name: String,
    pub description: String,
    /// A JSON Schema 2020-12 document that every event's `data` must satisfy.
    #[schema(value_type = serde_json::Value)]
    pub schema: Value,
    /// 1 at creation, +1 on every replacement (what the compiled-schema caches key on).
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PUT …/event-types/{type}`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventTypeInput {
    /// A JSON Schema 2020-12 document (no remote `$ref`).
    #[schema(value_type = serde_json::Value)]
    pub schema: Value,
    pub description: Option<String>,
}

/// A compiled schema, ready to validate events.
pub type Schema = jsonschema::Validator;

/// Compiles a type's schema; `Err` (on the `schema` field) says what is wrong with it.
/// Remote `$ref`s cannot be fetched (the crate is built without its resolvers).
pub fn compile(schema: &Value) -> Result<Schema, ValidationErrors> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(ValidationErrors::single("schema", "must be a JSON Schema: an object (or true/false)"));
    }
    jsonschema::draft202012::new(schema).map_err(|e| {
        let at = e.instance_path().as_str();
        let field = if at.is_empty() { "schema".to_owned() } else { format!("schema{at}") };
        ValidationErrors::single(&field, format!("not a valid JSON Schema 2020-12: {e}"))
    })
}

impl EventTypeDef {
    /// The type as `input` defines it at `now`, with its compiled schema (the store
    /// keeps `created_at` and bumps `version` when it replaces a type).
    pub fn parse(
        tenant_id: Uuid,
        name: &str,
        input: EventTypeInput,
        now: DateTime<Utc>,
    ) -> Result<(EventTypeDef, Schema), ValidationErrors> {
        let mut errors = ValidationErrors::new();
        if let Err(e) = check_type_name(name) {
            errors.add("type", e);
        }
        let description = input.description.unwrap_or_default();
        if description.chars().count() > 1000 {
            errors.add("description", "must be at most 1000 characters");
        }
        let compiled = match compile(&input.schema) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.errors.extend(e.errors);
                None
            }
        };
        let def = EventTypeDef {
            tenant_id,
            name: name.to_owned(),
            description,
            schema: input.schema,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        let compiled = errors.into_result(compiled)?;
        compiled.map(|c| (def, c)).ok_or_else(|| ValidationErrors::single("schema", "not a valid JSON Schema"))
    }
}

/// One event as a client sends it (`POST …/events`, or an item of a batch).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    /// A type the tenant registered.
    #[serde(rename = "type")]
    #[schema(example = "order.placed")]
    pub event_type: String,
    /// Validated against the type's schema.
    #[schema(value_type = serde_json::Value)]
    pub data: Value,
    /// The client's id for the event (any string of 1-200 characters): sending it again
    /// answers 200 with the original event's id and writes nothing.
    pub id: Option<String>,
    /// What the event is about (CloudEvents `subject`); the event id when absent.
    pub subject: Option<String>,
    /// When it happened (CloudEvents `time`); the time of acceptance when absent.
    pub time: Option<DateTime<Utc>>,
}

/// An event that passed its checks, ready for the outbox.
#[derive(Debug, Clone)]
pub struct NewCustomEvent {
    /// The client's idempotency id, if it gave one.
    pub key: Option<String>,
    pub event: DomainEvent,
}

impl NewCustomEvent {
    /// Checks `input` against its type's compiled schema (`None`: the type is not
    /// registered). Errors name the JSON pointer of each bad field of `data`.
    pub fn parse(
        tenant_id: Uuid,
        input: EventInput,
        schema: Option<&Schema>,
        ctx: &EventContext,
        now: DateTime<Utc>,
    ) -> Result<NewCustomEvent, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        if let Some(key) = &input.id {
            let n = key.chars().count();
            if n == 0 || n > MAX_KEY_LEN || key.chars().any(char::is_control) {
                errors.add("id", format!("must be 1 to {MAX_KEY_LEN} characters without control characters"));
            }
        }
        if let Some(subject) = &input.subject {
            if subject.chars().count() > 200 || subject.chars().any(char::is_control) {
                errors.add("subject", "must be at most 200 characters without control characters");
            }
        }
        match (check_type_name(&input.event_type), schema) {
            (Err(e), _) => errors.add("type", e),
            (Ok(()), None) => errors.add(
                "type",
                format!(
                    "{} is not a registered event type of this tenant (PUT …/event-types/{{type}})",
                    input.event_type
                ),
            ),
            (Ok(()), Some(schema)) => {
                for e in schema.iter_errors(&input.data).take(20) {
                    errors.add(&format!("data{}", e.instance_path().as_str()), e.to_string());
                }
            }
        }
        errors.into_result(())?;
        let event = DomainEvent::custom(
            EventType::Custom(std::sync::Arc::from(input.event_type.as_str())),
            tenant_id,
            input.subject,
            input.time.unwrap_or(now),
            ctx,
            input.data,
        );
        Ok(NewCustomEvent { key: input.id, event })
    }
}

/// What ingesting one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// The event's id (the original one when the client's id was seen before).
    pub id: Uuid,
    /// `false`: the client's id was seen before; nothing was written.
    pub new: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn type_names_follow_the_pattern_outside_reserved_prefixes() {
        for ok in ["order.placed", "a.b", "billing_v2.invoice.paid", "x1.y_2"] {
            assert_eq!(check_type_name(ok), Ok(()), "{ok}");
        }
        for bad in ["order", "Order.placed", "1a.b", "a..b", "a.", ".a", "a.B", "a-b.c", "a.b c", ""] {
            assert!(check_type_name(bad).is_err(), "{bad}");
        }
        for reserved in ["user.exploded", "tenant.x", "auth.login", "webhook.y", "api_key.z"] {
            assert!(check_type_name(reserved).unwrap_err().contains("reserved"), "{reserved}");
        }
        assert!(check_type_name(&format!("a.{}", "b".repeat(MAX_TYPE_LEN))).is_err());
    }

    #[test]
    fn schema_errors_name_the_json_pointer_of_the_bad_field() {
        let schema = compile(&json!({
            "type": "object",
            "required": ["amount"],
            "properties": {"amount": {"type": "integer"}, "items": {"type": "array", "items": {"type": "string"}}}
        }))
        .unwrap();
        let ctx = EventContext::system("t");
        let input = |data| EventInput { event_type: "order.placed".into(), data, id: None, subject: None, time: None };
        let now = crate::domain::now();
        let e = NewCustomEvent::parse(
            Uuid::now_v7(),
            input(json!({"amount": "ten", "items": ["a", 2]})),
            Some(&schema),
            &ctx,
            now,
        )
        .unwrap_err();
        let mut fields: Vec<&str> = e.errors.iter().map(|f| f.field.as_str()).collect();
        fields.sort();
        assert_eq!(fields, ["data/amount", "data/items/1"]);
        let ok = NewCustomEvent::parse(Uuid::now_v7(), input(json!({"amount": 10})), Some(&schema), &ctx, now).unwrap();
        assert_eq!(ok.event.event_type.as_str(), "order.placed");
        assert_eq!(ok.event.subject, ok.event.id.to_string());
        let unknown = NewCustomEvent::parse(Uuid::now_v7(), input(json!({})), None, &ctx, now).unwrap_err();
        assert!(unknown.errors[0].message.contains("not a registered event type"));
    }

    #[test]
    fn invalid_schemas_are_refused_and_remote_refs_are_not_fetched() {
        assert!(compile(&json!({"type": "no-such-type"})).is_err());
        assert!(compile(&json!({"minimum": "five"})).is_err());
        assert!(compile(&json!("a string")).is_err());
        assert!(compile(&json!({"$ref": "https://example.com/schema.json"})).is_err());
        assert!(compile(&json!({"type": "object"})).is_ok());
    }
}
