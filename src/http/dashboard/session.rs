//! Dashboard sessions: a signed cookie instead of a server-side session table, so every
//! process that shares the admin token accepts the same session, and nothing has to be
//! stored or expired.
//!
//! The cookie value is `v1.<expires unix secs>.<nonce>.<mac>`, the MAC an HMAC-SHA256 of
//! the first three parts under a key derived from the admin token. Changing the admin
//! token therefore signs every session out. The CSRF token is a second HMAC over the
//! cookie value: a page gets it in a `<meta>` tag, and a state-changing request made
//! with the cookie must echo it in `X-CSRF-Token`.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "eventra_session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a sign-in lasts.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);

type HmacSha256 = Hmac<Sha256>;

/// Issues and checks sessions for one admin token.
pub struct Sessions {
    key: [u8; 32],
}

impl Sessions {
    pub fn new(admin_token: &str) -> Self {
        let key = Sha256::new().chain_update(b"eventra dashboard session v1\0").chain_update(admin_token).finalize();
        Sessions { key: key.into() }
    }

    /// A fresh session cookie value that expires `LIFETIME` after `now` (unix secs).
    pub fn issue(&self, now: u64) -> String {
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let body = format!("v1.{}.{}", now + LIFETIME.as_secs(), URL_SAFE_NO_PAD.encode(nonce));
        let mac = self.mac(b"session", body.as_bytes());
        format!("{body}.{mac}")
    }

    /// Whether `value` is a cookie this key issued that has not expired at `now`.
    pub fn verify(&self, value: &str, now: u64) -> bool {
        let Some((body, mac)) = value.rsplit_once('.') else { return false };
        let mut parts = body.split('.');
        let (Some("v1"), Some(expires), Some(_nonce), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let fresh = expires.parse::<u64>().is_ok_and(|e| e > now);
        let expected = self.mac(b"session", body.as_bytes());
        fresh && bool::from(expected.as_bytes().ct_eq(mac.as_bytes()))
    }

    /// The CSRF token that goes with a session cookie value.
    pub fn csrf(&self, session: &str) -> String {
        self.mac(b"csrf", session.as_bytes())
    }

    /// Whether `token` is the CSRF token of `session` (constant time).
    pub fn csrf_matches(&self, session: &str, token: &str) -> bool {
        bool::from(self.csrf(session).as_bytes().ct_eq(token.as_bytes()))
    }

    fn mac(&self, purpose: &[u8], data: &[u8]) -> String {
        // An HMAC key can be any length: this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        m.update(purpose);
        m.update(b"\0");
        m.update(data);
        URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    }
}

/// The session cookie's value in a `Cookie` header, if any.
pub fn from_cookie_header(header: &str) -> Option<&str> {
    header.split(';').map(str::trim).find_map(|c| c.strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')))
}

/// `Set-Cookie` for a new session: HttpOnly, SameSite=Strict, scoped to the whole site
/// (the dashboard calls the admin API with it). `secure` adds `Secure` (behind HTTPS).
pub fn set_cookie(value: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", LIFETIME.as_secs())
}

/// `Set-Cookie` that removes the session.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_verifies_until_it_expires_and_only_under_its_token() {
        let s = Sessions::new("token-a");
        let v = s.issue(1_000);
        assert!(s.verify(&v, 1_001));
        assert!(!s.verify(&v, 1_000 + LIFETIME.as_secs()), "expired");
        assert!(!Sessions::new("token-b").verify(&v, 1_001), "another admin token");
        let forged = v.replacen(&format!("{}", 1_000 + LIFETIME.as_secs()), "99999999999", 1);
        assert!(!s.verify(&forged, 1_001), "a changed expiry breaks the MAC");
        assert!(!s.verify("v1.1.2", 0) && !s.verify("", 0) && !s.verify("a.b.c.d.e", 0));
    }

    #[test]
    fn the_csrf_token_belongs_to_one_session() {
        let s = Sessions::new("token-a");
        let (a, b) = (s.issue(0), s.issue(0));
        assert!(s.csrf_matches(&a, &s.csrf(&a)));
        assert!(!s.csrf_matches(&a, &s.csrf(&b)));
        assert!(!s.csrf_matches(&a, ""));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(from_cookie_header("a=1; eventra_session=xyz; b=2"), Some("xyz"));
        assert_eq!(from_cookie_header("eventra_sessionx=1"), None);
        assert!(set_cookie("v", false).contains("HttpOnly; SameSite=Strict"));
    }
}
