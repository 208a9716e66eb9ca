//! Access tokens: compact JWS (RFC 7515) with `alg: EdDSA` (Ed25519, RFC 8037), signed
//! and verified with `ring`. Small on purpose: ONE algorithm is accepted, named by the
//! key, never by the token, so `alg: none`, an HS256 token keyed with the public key,
//! and every other algorithm confusion are refused before any signature is checked.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::domain::auth::Claims;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a compact JWS")]
    Malformed,
    #[error("the token's algorithm is not EdDSA")]
    Algorithm,
    #[error("the token's key is unknown")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by someone else")]
    Issuer,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// `header.claims.signature`, signed by `key` (whose id is `kid`).
pub fn sign(claims: &Claims, kid: &str, key: &Ed25519KeyPair) -> String {
    let header = Header { alg: "EdDSA".into(), typ: Some("JWT".into()), kid: Some(kid.to_owned()) };
    // Serialising plain structs of strings and numbers cannot fail.
    let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
    let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let input = format!("{h}.{c}");
    let sig = URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()).as_ref());
    format!("{input}.{sig}")
}

/// The key id a token names (read before verification, only to pick the key).
pub fn kid(token: &str) -> Result<String, TokenError> {
    let (h, _, _) = parts(token)?;
    let header: Header = decode(h)?;
    if header.alg != "EdDSA" {
        return Err(TokenError::Algorithm);
    }
    header.kid.ok_or(TokenError::UnknownKey)
}

/// Verifies the signature with `public_key` (32 bytes), then the time and issuer
/// claims against `now` (Unix seconds, with `leeway` for clocks), and returns the claims.
pub fn verify(token: &str, public_key: &[u8], issuer: &str, now: i64, leeway: i64) -> Result<Claims, TokenError> {
    let (h, c, s) = parts(token)?;
    let header: Header = decode(h)?;
    if header.alg != "EdDSA" {
        return Err(TokenError::Algorithm);
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed)?;
    let signed = &token[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(&ED25519, public_key).verify(signed.as_bytes(), &sig).map_err(|_| TokenError::Signature)?;
    let claims: Claims = decode(c)?;
    if claims.exp <= now - leeway {
        return Err(TokenError::Expired);
    }
    if claims.iat > now + leeway {
        return Err(TokenError::NotYetValid);
    }
    if claims.iss != issuer {
        return Err(TokenError::Issuer);
    }
    Ok(claims)
}

fn parts(token: &str) -> Result<(&str, &str, &str), TokenError> {
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(h), Some(c), Some(s), None) if !h.is_empty() && !c.is_empty() && !s.is_empty() => Ok((h, c, s)),
        _ => Err(TokenError::Malformed),
    }
}

fn decode<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair as _;
    use uuid::Uuid;

    fn key() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "eventra".into(),
            sub: Uuid::now_v7(),
            tid: Uuid::now_v7(),
            exp: now + 900,
            iat: now,
            jti: Uuid::now_v7(),
            sid: Uuid::now_v7(),
            email: "a@example.com".into(),
            email_verified: false,
        }
    }

    #[test]
    fn signed_tokens_verify_and_every_alteration_is_refused() {
        let (k, other) = (key(), key());
        let public = k.public_key().as_ref().to_vec();
        let now = 1_800_000_000;
        let c = claims(now);
        let t = sign(&c, "k1", &k);
        assert_eq!(kid(&t).unwrap(), "k1");
        assert_eq!(verify(&t, &public, "eventra", now, 0).unwrap(), c);
        // Another key's signature, a changed claim, a wrong issuer, expiry, the future.
        assert_eq!(verify(&sign(&c, "k1", &other), &public, "eventra", now, 0), Err(TokenError::Signature));
        let (h, rest) = t.split_once('.').unwrap();
        let (_, s) = rest.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Claims { email_verified: true, ..c.clone() }).unwrap());
        assert_eq!(verify(&format!("{h}.{forged}.{s}"), &public, "eventra", now, 0), Err(TokenError::Signature));
        assert_eq!(verify(&t, &public, "someone", now, 0), Err(TokenError::Issuer));
        assert_eq!(verify(&t, &public, "eventra", now + 900, 0), Err(TokenError::Expired));
        assert_eq!(verify(&t, &public, "eventra", now - 120, 60), Err(TokenError::NotYetValid));
        // alg: none, and HS256: refused whatever the signature.
        for alg in ["none", "HS256", "ES256"] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
            let t2 = format!("{header}.{forged}.{s}");
            assert_eq!(verify(&t2, &public, "eventra", now, 0), Err(TokenError::Algorithm), "{alg}");
            assert_eq!(kid(&t2), Err(TokenError::Algorithm));
        }
        for bad in ["", "a.b", "a.b.c.d", "..", "a..c"] {
            assert_eq!(verify(bad, &public, "eventra", now, 0), Err(TokenError::Malformed), "{bad:?}");
        }
    }
}
