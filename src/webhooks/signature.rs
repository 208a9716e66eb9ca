//! Standard Webhooks signatures: `v1,<base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}"))>`,
//! where the secret is the base64 after `whsec_`. Two secrets sign during a rotation's
//! overlap, separated by a space, so a receiver that knows either accepts.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::webhook::{Secrets, SECRET_PREFIX};

/// The bytes a `whsec_…` secret stands for (or the raw string's bytes, if it is not one).
fn key_bytes(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix(SECRET_PREFIX)
        .and_then(|b| STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// One `v1,…` signature of exactly `body`.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    // An HMAC key can be any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key_bytes(secret)).unwrap_or_else(|_| unreachable!());
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header: the current secret's signature, then the previous
/// secret's while it still signs.
pub fn signature_header(secrets: &Secrets, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut header = sign(&secrets.current, msg_id, timestamp, body);
    if let Some(previous) = &secrets.previous {
        header.push(' ');
        header.push_str(&sign(previous, msg_id, timestamp, body));
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector the Standard Webhooks libraries share.
    #[test]
    fn the_standard_webhooks_test_vector() {
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn both_secrets_sign_during_a_rotation() {
        let s =
            Secrets { current: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(), previous: Some("whsec_AAAA".into()) };
        let h = signature_header(&s, "id", 1, b"{}");
        let parts: Vec<&str> = h.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], sign(&s.current, "id", 1, b"{}"));
        assert_eq!(parts[1], sign("whsec_AAAA", "id", 1, b"{}"));
    }
}
