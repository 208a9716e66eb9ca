//! Webhook secrets at rest: AES-256-GCM under `EVENTRA_SECRET_KEY` (or the key the
//! embedded default keeps in `<data dir>/secret_key`), so a database dump does not hand
//! out the tenants' signing secrets.
//!
//! A stored value is `enc1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`; the key id (the
//! first 8 hex digits of the key's SHA-256) makes "encrypted under another key" a clear
//! error, not garbage. A value without the prefix is a secret stored before encryption
//! and is read as it is.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::{Digest, Sha256};

const PREFIX: &str = "enc1:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretBoxError {
    #[error("EVENTRA_SECRET_KEY must be 32 bytes, base64-encoded (openssl rand -base64 32)")]
    BadKey,
    #[error("this secret was encrypted under another EVENTRA_SECRET_KEY (key {0}); every process must share one key")]
    OtherKey(String),
    #[error("a stored secret is damaged")]
    Damaged,
}

/// Seals and opens webhook secrets.
pub struct SecretBox {
    key: LessSafeKey,
    id: String,
}

impl SecretBox {
    /// From the base64 of 32 random bytes.
    pub fn from_base64(key: &str) -> Result<Self, SecretBoxError> {
        let bytes = STANDARD.decode(key.trim()).map_err(|_| SecretBoxError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretBoxError::BadKey);
        }
        let id = Sha256::digest(&bytes).iter().take(4).map(|b| format!("{b:02x}")).collect();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SecretBoxError::BadKey)?);
        Ok(SecretBox { key, id })
    }

    /// A fresh random key, base64.
    pub fn generate_key() -> String {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        STANDARD.encode(bytes)
    }

    pub fn seal(&self, secret: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let mut buf = secret.as_bytes().to_vec();
        // Sealing only fails for inputs past GCM's size limit (gigabytes).
        if self
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(self.id.as_bytes()), &mut buf)
            .is_err()
        {
            unreachable!("a webhook secret is a few dozen bytes");
        }
        let mut out = nonce.to_vec();
        out.extend(buf);
        format!("{PREFIX}{}:{}", self.id, STANDARD.encode(out))
    }

    pub fn open(&self, stored: &str) -> Result<String, SecretBoxError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else { return Ok(stored.to_owned()) };
        let (id, data) = rest.split_once(':').ok_or(SecretBoxError::Damaged)?;
        if id != self.id {
            return Err(SecretBoxError::OtherKey(id.to_owned()));
        }
        let data = STANDARD.decode(data).map_err(|_| SecretBoxError::Damaged)?;
        if data.len() < NONCE_LEN {
            return Err(SecretBoxError::Damaged);
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretBoxError::Damaged)?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(self.id.as_bytes()), &mut buf)
            .map_err(|_| SecretBoxError::Damaged)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretBoxError::Damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_other_keys_are_named() {
        let a = SecretBox::from_base64(&SecretBox::generate_key()).unwrap();
        let b = SecretBox::from_base64(&SecretBox::generate_key()).unwrap();
        let sealed = a.seal("whsec_abc");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("whsec_abc"));
        assert_ne!(a.seal("whsec_abc"), sealed, "a fresh nonce each time");
        assert_eq!(a.open(&sealed).unwrap(), "whsec_abc");
        assert!(matches!(b.open(&sealed), Err(SecretBoxError::OtherKey(_))));
        assert_eq!(a.open("whsec_legacy").unwrap(), "whsec_legacy", "stored before encryption");
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(a.open(&tampered), Err(SecretBoxError::Damaged));
        assert_eq!(SecretBox::from_base64("c2hvcnQ=").err(), Some(SecretBoxError::BadKey));
    }
}
