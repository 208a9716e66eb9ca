//! Tenant API keys: random bearer secrets, stored only as a SHA-256 digest and shown once.
//!
//! A fast hash is right here (unlike passwords): the secret is 256 random bits, so there
//! is nothing to brute-force, and every request has to look its key up.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Prefix that makes a leaked key recognisable to secret scanners.
pub const KEY_PREFIX: &str = "evk_";

/// What a key may do inside its tenant. Ordered: each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read users, search, audit.
    Reader,
    /// Also create, update and delete users.
    Writer,
    /// Also manage the tenant's API keys.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

/// A freshly generated key: the secret exists only in this value and the one response.
#[derive(Clone)]
pub struct NewApiKey {
    pub key: ApiKey,
    /// The bearer secret, returned to the client once and never stored.
    pub secret: String,
    /// What is stored and looked up.
    pub hash: String,
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey").field("key", &self.key).field("secret", &"<redacted>").finish()
    }
}

impl NewApiKey {
    pub fn generate(tenant_id: Uuid, role: Role, now: DateTime<Utc>) -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        let hash = hash_secret(&secret);
        NewApiKey { key: ApiKey { id: Uuid::now_v7(), tenant_id, role, created_at: now }, secret, hash }
    }
}

/// The lookup form of a bearer secret.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_prefixed_and_hash_matches() {
        let a = NewApiKey::generate(Uuid::now_v7(), Role::Reader, Utc::now());
        let b = NewApiKey::generate(Uuid::now_v7(), Role::Reader, Utc::now());
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(hash_secret(&a.secret), a.hash);
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Writer && Role::Writer > Role::Reader);
    }
}
