//! End-user authentication's domain (SPEC §8): passwords as they arrive and as they are
//! stored, sessions, and the claims of an access token. No I/O and no crypto here: the
//! hashing and signing live in `crate::auth`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validation::ValidationErrors;

/// Shortest and longest password accepted (characters).
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;

/// A password as a client sent it. Its `Debug` never shows it, so a logged request or
/// error cannot leak it; it is never serialized.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Checks the length rule, naming `field` in the error.
    pub fn check(&self, errors: &mut ValidationErrors, field: &str) {
        let n = self.0.chars().count();
        if !(PASSWORD_MIN..=PASSWORD_MAX).contains(&n) {
            errors.add(field, format!("must be {PASSWORD_MIN} to {PASSWORD_MAX} characters (got {n})"));
        }
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Self {
        Password(s.to_owned())
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(redacted)")
    }
}

/// A stored password: an Argon2id PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
/// Its `Debug` is redacted too.
#[derive(Clone, PartialEq)]
pub struct PasswordHash(String);

impl PasswordHash {
    pub fn new(phc: String) -> Self {
        PasswordHash(phc)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(redacted)")
    }
}

/// A new user's password on its way to the store: the API layer hashes it (off the
/// async runtime) before the write is sent; the store refuses a plain one.
#[derive(Debug, Clone, PartialEq)]
pub enum Credential {
    Plain(Password),
    Hashed(PasswordHash),
}

/// A signed-in session: one per sign-in, the family of its rotating refresh tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Session {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub user_agent: String,
    pub ip: String,
}

/// The claims of an access token (a JWT signed with Ed25519, `alg: EdDSA`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user's id.
    pub sub: Uuid,
    /// The tenant's id.
    pub tid: Uuid,
    pub exp: i64,
    pub iat: i64,
    pub jti: Uuid,
    /// The session (its revocation ends the token's use at once).
    pub sid: Uuid,
    pub email: String,
    pub email_verified: bool,
}

/// Body of `POST …/auth/login`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginInput {
    #[schema(max_length = 254)]
    pub email: String,
    #[schema(value_type = String, format = Password, max_length = 1024)]
    pub password: Password,
}

/// Body of `PUT …/users/{user_id}/password`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// The new password, 8-128 characters.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 128)]
    pub password: Password,
    /// Required with the user's own access token; not with a tenant key.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, max_length = 1024)]
    pub current_password: Option<Password>,
}

/// Body of `POST …/users/{user_id}/verification/confirm`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeInput {
    /// The 6 digits from the email.
    #[schema(max_length = 32)]
    pub code: String,
}

/// Body of `POST …/auth/password-reset`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    #[schema(max_length = 254)]
    pub email: String,
}

/// Body of `POST …/auth/password-reset/confirm`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    #[schema(max_length = 254)]
    pub email: String,
    #[schema(max_length = 32)]
    pub code: String,
    /// The new password, 8-128 characters.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 128)]
    pub password: Password,
}

/// What starting a verification answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CodeSent {
    /// When the emailed code stops being valid.
    pub expires_at: DateTime<Utc>,
}

/// Body of `POST …/auth/refresh`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshInput {
    #[schema(max_length = 256)]
    pub refresh_token: String,
}

/// What sign-in and refresh answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds the access token is valid.
    pub expires_in: i64,
    /// Opaque; spent by its first use (presenting it again revokes the session).
    pub refresh_token: String,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair").field("expires_in", &self.expires_in).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let p = Password::from("correct horse battery staple");
        let h = PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into());
        let shown = format!("{p:?} {h:?} {:?}", Credential::Plain(p.clone()));
        assert!(!shown.contains("horse") && !shown.contains("argon2id"), "{shown}");
    }

    #[test]
    fn password_length_is_checked_in_characters() {
        for (pw, ok) in [("1234567", false), ("12345678", true), ("ééééééé", false), ("éééééééé", true)]
        {
            let mut errors = ValidationErrors::new();
            Password::from(pw).check(&mut errors, "password");
            assert_eq!(errors.is_empty(), ok, "{pw}");
        }
        let mut errors = ValidationErrors::new();
        Password::from("x".repeat(129).as_str()).check(&mut errors, "password");
        assert!(!errors.is_empty());
    }
}
