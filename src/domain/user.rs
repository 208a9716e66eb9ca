//! Users: the people a tenant manages. Email is unique per tenant, compared
//! case-insensitively; `version` starts at 1 and grows by one on every change.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::{Credential, Password, PasswordHash};
use super::event::EventType;
use super::validation::{check_name, ValidationErrors};

/// Largest `attributes` object accepted, serialized.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Deepest nesting accepted inside `attributes`. Events wrap the user in further levels
/// and JSON parsers stop at ~128, so an unbounded depth could store a row that no
/// consumer can read back.
pub const MAX_ATTRIBUTES_DEPTH: usize = 32;
/// RFC 5321 limit for an address.
const MAX_EMAIL_LEN: usize = 254;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Disabled,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(UserStatus::Active),
            "disabled" => Some(UserStatus::Disabled),
            _ => None,
        }
    }
}

/// A user as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub email: String,
    pub name: String,
    pub status: UserStatus,
    pub email_verified: bool,
    pub attributes: Map<String, Value>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl User {
    /// The key uniqueness is enforced on.
    pub fn email_key(&self) -> String {
        normalize_email(&self.email)
    }
}

/// Body of `POST /v1/tenants/{tenant_id}/users`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUserInput {
    /// Unique in the tenant, compared case-insensitively.
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    /// 1-200 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: String,
    #[serde(default)]
    pub attributes: Option<Map<String, Value>>,
    /// 8-128 characters. Lets the user sign in (`POST …/auth/login`); never returned,
    /// never in events, the audit log or logs.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, min_length = 8, max_length = 128)]
    pub password: Option<Password>,
}

/// A validated user, ready to insert (id and timestamps already assigned), with its
/// password if it has one (hashed before the write reaches the store).
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser(pub User, pub Option<Credential>);

impl NewUser {
    pub fn parse(tenant_id: Uuid, input: NewUserInput, now: DateTime<Utc>) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let email = check_email(&mut errors, &input.email);
        let name = check_name(&mut errors, "name", &input.name);
        let attributes = input.attributes.unwrap_or_default();
        check_attributes(&mut errors, &attributes);
        if let Some(p) = &input.password {
            p.check(&mut errors, "password");
        }
        let credential = input.password.map(Credential::Plain);
        errors.into_result(NewUser(
            User {
                id: Uuid::now_v7(),
                tenant_id,
                email,
                name,
                status: UserStatus::Active,
                email_verified: false,
                attributes,
                version: 1,
                created_at: now,
                updated_at: now,
            },
            credential,
        ))
    }

    /// The password as the store takes it: hashed, if there is one.
    pub fn password_hash(&self) -> Result<Option<&PasswordHash>, &'static str> {
        match &self.1 {
            None => Ok(None),
            Some(Credential::Hashed(h)) => Ok(Some(h)),
            Some(Credential::Plain(_)) => Err("a new user's password reached the store unhashed"),
        }
    }
}

/// Body of `PATCH /v1/tenants/{tenant_id}/users/{user_id}`; absent fields stay.
/// `attributes`, when present, replaces the whole object.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    #[schema(format = Email, max_length = 254)]
    pub email: Option<String>,
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: Option<String>,
    pub status: Option<UserStatus>,
    pub email_verified: Option<bool>,
    pub attributes: Option<Map<String, Value>>,
}

impl UserPatch {
    /// Normalizes and checks the fields that are present.
    pub fn validate(mut self) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        if let Some(email) = &self.email {
            self.email = Some(check_email(&mut errors, email));
        }
        if let Some(name) = &self.name {
            self.name = Some(check_name(&mut errors, "name", name));
        }
        if let Some(attrs) = &self.attributes {
            check_attributes(&mut errors, attrs);
        }
        errors.into_result(self)
    }

    /// The user after the patch and the event it amounts to, or `None` when nothing
    /// changes (a no-op PATCH writes nothing and emits nothing).
    ///
    /// Changing the email address un-verifies it unless the same patch says otherwise.
    /// A patch whose only effect is verifying the email is a `user.verified` event.
    pub fn apply(&self, before: &User, now: DateTime<Utc>) -> Option<(User, EventType)> {
        let mut after = before.clone();
        if let Some(email) = &self.email {
            if *email != before.email {
                after.email = email.clone();
                if normalize_email(email) != before.email_key() {
                    after.email_verified = false;
                }
            }
        }
        if let Some(name) = &self.name {
            after.name = name.clone();
        }
        if let Some(status) = self.status {
            after.status = status;
        }
        if let Some(verified) = self.email_verified {
            after.email_verified = verified;
        }
        if let Some(attrs) = &self.attributes {
            after.attributes = attrs.clone();
        }
        if after == *before {
            return None;
        }
        let only_verified = !before.email_verified && after.email_verified && {
            let mut unverified = after.clone();
            unverified.email_verified = false;
            unverified == *before
        };
        after.version = before.version + 1;
        after.updated_at = now;
        let kind = if only_verified { EventType::UserVerified } else { EventType::UserUpdated };
        Some((after, kind))
    }
}

/// The form emails are compared and made unique in.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

fn check_email(errors: &mut ValidationErrors, raw: &str) -> String {
    let email = raw.trim().to_owned();
    if email.is_empty() {
        errors.add("email", "must not be empty");
    } else if email.len() > MAX_EMAIL_LEN {
        errors.add("email", format!("must be at most {MAX_EMAIL_LEN} bytes"));
    } else if !email_address::EmailAddress::is_valid(&email)
        || !email.contains('@')
        || email.chars().any(char::is_control)
    {
        errors.add("email", "must be an email address like name@example.com");
    }
    email
}

fn check_attributes(errors: &mut ValidationErrors, attrs: &Map<String, Value>) {
    let size = serde_json::to_vec(attrs).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_ATTRIBUTES_BYTES {
        errors.add("attributes", format!("must serialize to at most {MAX_ATTRIBUTES_BYTES} bytes (got {size})"));
    } else if depth(attrs) > MAX_ATTRIBUTES_DEPTH {
        errors.add("attributes", format!("must nest at most {MAX_ATTRIBUTES_DEPTH} levels deep"));
    } else if has_nul(attrs) {
        // PostgreSQL's JSONB and TEXT cannot store U+0000.
        errors.add("attributes", "must not contain the NUL character (\\u0000) in keys or strings");
    }
}

/// Nesting depth of an object (1 for a flat one).
fn depth(attrs: &Map<String, Value>) -> usize {
    fn value_depth(v: &Value) -> usize {
        match v {
            Value::Object(m) => 1 + m.values().map(value_depth).max().unwrap_or(0),
            Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + attrs.values().map(value_depth).max().unwrap_or(0)
}

fn has_nul(attrs: &Map<String, Value>) -> bool {
    fn value_has(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || value_has(v)),
            Value::Array(a) => a.iter().any(value_has),
            _ => false,
        }
    }
    attrs.iter().any(|(k, v)| k.contains('\0') || value_has(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user() -> User {
        let input =
            NewUserInput { email: "Ada@Example.com".into(), name: "Ada".into(), attributes: None, password: None };
        NewUser::parse(Uuid::now_v7(), input, Utc::now()).unwrap().0
    }

    #[test]
    fn new_user_defaults() {
        let u = user();
        assert_eq!((u.version, u.status, u.email_verified), (1, UserStatus::Active, false));
        assert_eq!(u.email_key(), "ada@example.com");
    }

    #[test]
    fn rejects_bad_email_name_and_huge_attributes() {
        let mut attrs = Map::new();
        attrs.insert("blob".into(), json!("x".repeat(MAX_ATTRIBUTES_BYTES)));
        let input = NewUserInput { email: "nope".into(), name: "".into(), attributes: Some(attrs), password: None };
        let err = NewUser::parse(Uuid::now_v7(), input, Utc::now()).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["email", "name", "attributes"]);
    }

    #[test]
    fn rejects_deep_nesting_and_nul_in_attributes() {
        let parse = |attrs: Value| {
            let input = NewUserInput {
                email: "a@b.io".into(),
                name: "A".into(),
                attributes: attrs.as_object().cloned(),
                password: None,
            };
            NewUser::parse(Uuid::now_v7(), input, Utc::now())
        };
        let mut deep = json!(1);
        for _ in 0..=MAX_ATTRIBUTES_DEPTH {
            deep = json!({ "k": deep });
        }
        let err = parse(deep.clone()).unwrap_err();
        assert!(err.errors[0].message.contains("levels deep"), "{err:?}");
        assert!(parse(deep["k"].clone()).is_ok(), "exactly {MAX_ATTRIBUTES_DEPTH} levels is fine");
        assert!(parse(json!({"a": ["x\u{0}y"]})).is_err());
        assert!(parse(json!({"a\u{0}": 1})).is_err());
        assert!(parse(json!({"a": {"b": [1, "ok"]}})).is_ok());
    }

    #[test]
    fn patch_bumps_version_and_classifies_event() {
        let u = user();
        let verify = UserPatch { email_verified: Some(true), ..Default::default() };
        let (after, kind) = verify.apply(&u, Utc::now()).unwrap();
        assert_eq!((after.version, kind), (2, EventType::UserVerified));

        let rename = UserPatch { name: Some("Ada L".into()), email_verified: Some(true), ..Default::default() };
        assert_eq!(rename.apply(&u, Utc::now()).unwrap().1, EventType::UserUpdated);

        let noop = UserPatch { name: Some("Ada".into()), ..Default::default() };
        assert!(noop.apply(&u, Utc::now()).is_none());
    }

    #[test]
    fn changing_email_unverifies_but_case_change_does_not() {
        let mut u = user();
        u.email_verified = true;
        let case = UserPatch { email: Some("ADA@example.com".into()), ..Default::default() };
        assert!(case.apply(&u, Utc::now()).unwrap().0.email_verified);
        let other = UserPatch { email: Some("ada@other.org".into()), ..Default::default() };
        assert!(!other.apply(&u, Utc::now()).unwrap().0.email_verified);
    }
}
