//! End-user authentication (SPEC §8): sign-in with a password, short-lived access
//! tokens (JWT, EdDSA) that other services verify with the JWKS, and sessions whose
//! opaque refresh tokens rotate on every use; presenting a spent one revokes the
//! session (the whole family).
//!
//! [`Auth`] is the service the HTTP layer calls. Passwords are hashed in
//! [`password`], tokens signed and checked in [`jwt`] with the keys of [`keys`]. Every
//! change (a session opened, revoked, a reuse detected, a refused sign-in of a known
//! user) is written with its event in one transaction by the store.
//!
//! Secrets never travel further than they must: a password only to the hasher, a
//! refresh token only as its SHA-256, and none of them into an event, the audit log or
//! a log line (their `Debug` is redacted).

pub mod jwt;
pub mod keys;
pub mod password;
pub mod rate_limit;

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::AuthConfig;
use crate::domain::auth::{Claims, Credential, LoginInput, Session, TokenPair};
use crate::domain::user::normalize_email;
use crate::domain::{Actor, DomainEvent, EventContext, NewUser, User, UserStatus};
use crate::error::{Error, Result};
use crate::store::{RefreshUse, Store};

use keys::{Jwks, KeyRing};
use password::Hasher;

/// The one answer to every refused sign-in, whatever the reason.
const BAD_CREDENTIALS: &str = "the email or password is wrong, or the user cannot sign in";
/// Clock skew tolerated when checking `exp` and `iat`.
const LEEWAY_SECS: i64 = 30;

/// Who is signing in: recorded on the session.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub ip: String,
    pub user_agent: String,
}

#[derive(Clone)]
pub struct Auth {
    store: Arc<dyn Store>,
    hasher: Hasher,
    keys: KeyRing,
    attempts: rate_limit::Limiter,
    config: AuthConfig,
    /// Where code emails are enqueued.
    jobs: crate::jobs::JobClient,
    /// Seals codes on their way through the job queue.
    sealer: Arc<crate::webhooks::secret_box::SecretBox>,
    /// The HMAC key codes are stored under (from `EVENTRA_SECRET_KEY`).
    code_key: Arc<[u8]>,
}

/// How long a one-time code is valid, and how many tries it has.
pub const CODE_TTL_MINUTES: i64 = 15;
pub const CODE_TRIES: i32 = 5;

impl Auth {
    /// `redis`: the URL and namespace of the Redis that shares the rate limits between
    /// processes (in-process limits without it).
    pub fn new(
        store: Arc<dyn Store>,
        sealer: Arc<crate::webhooks::secret_box::SecretBox>,
        secret_key: &str,
        jobs: crate::jobs::JobClient,
        config: AuthConfig,
        redis: Option<(&str, &str)>,
    ) -> std::result::Result<Self, String> {
        let code_key: Arc<[u8]> = Arc::from(Sha256::digest(format!("eventra auth codes\0{secret_key}")).as_slice());
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = Hasher::new(config.hash_cost, parallelism).map_err(|e| e.to_string())?;
        let keys = KeyRing::new(store.clone(), sealer.clone(), config.access_ttl);
        let limit = rate_limit::Limit { burst: config.attempts_per_minute, period: std::time::Duration::from_secs(60) };
        let attempts = match redis {
            Some((url, ns)) => rate_limit::Limiter::redis(limit, url, ns)?,
            None => rate_limit::Limiter::local(limit),
        };
        // Idle keys of the in-process limiter are forgotten every minute.
        let sweep = attempts.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                sweep.forget_idle();
            }
        });
        Ok(Auth { store, hasher, keys, attempts, config, jobs, sealer, code_key })
    }

    /// Spends one request of a tenant API key whose tenant allows `per_second` (0: no
    /// limit); 429 past it. Shared through Redis like the sign-in limits.
    pub async fn api_key_request(&self, key_id: Uuid, per_second: i64) -> Result<()> {
        let Ok(burst) = u32::try_from(per_second) else { return Ok(()) };
        if burst == 0 {
            return Ok(());
        }
        let limit = rate_limit::Limit { burst, period: std::time::Duration::from_secs(1) };
        self.attempts.check_limit(&format!("key:{key_id}"), limit).await.map_err(|r| Error::RateLimited {
            limit: burst,
            window_secs: 1,
            retry_after_secs: r.retry_after.as_secs_f64().ceil().max(1.0) as u64,
        })
    }

    pub fn trusted_proxies(&self) -> &[ipnet::IpNet] {
        &self.config.trusted_proxies
    }

    /// Spends one attempt of each key (`kind` names the route: `login`, `verify`,
    /// `reset`); 429 when any is over the limit. The email is hashed: no address is
    /// kept in Redis's keys.
    async fn attempt(&self, kind: &str, tenant_id: Uuid, email: &str, ip: &str) -> Result<()> {
        let mut keys = vec![format!("{kind}:e:{tenant_id}:{}", token_hash(email))];
        if !ip.is_empty() {
            keys.push(format!("{kind}:ip:{ip}"));
        }
        for key in keys {
            if let Err(r) = self.attempts.check(&key).await {
                tracing::info!(tenant_id = %tenant_id, kind, by = if key.contains(":ip:") { "ip" } else { "email" },
                    "rate limit reached");
                return Err(Error::RateLimited {
                    limit: r.limit.burst,
                    window_secs: r.limit.period.as_secs(),
                    retry_after_secs: r.retry_after.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(())
    }

    pub fn hash_cost(&self) -> password::HashCost {
        self.hasher.cost()
    }

    /// A new user's password, hashed (off the runtime) before the write is sent.
    pub async fn hash_new_user(&self, mut user: NewUser) -> Result<NewUser> {
        if let Some(Credential::Plain(p)) = &user.1 {
            let hash = self.hasher.hash(p).await.map_err(|e| Error::Internal(e.to_string()))?;
            user.1 = Some(Credential::Hashed(hash));
        }
        Ok(user)
    }

    /// `POST …/auth/login`: a session and its first token pair. Every refusal is the
    /// same 401, after the same work.
    pub async fn login(
        &self,
        tenant_id: Uuid,
        input: LoginInput,
        client: &Client,
        request_id: &str,
    ) -> Result<TokenPair> {
        let email = normalize_email(input.email.trim());
        // Before any work: an attack is stopped here, before the hash and before it
        // could write an `auth.login_failed` event per attempt.
        self.attempt("login", tenant_id, &email, &client.ip).await?;
        let found = self.store.user_credentials(tenant_id, &email).await?;
        let (user, stored) = match found {
            Some((user, hash)) => (Some(user), hash),
            None => (None, None),
        };
        let verified =
            self.hasher.verify(&input.password, stored.as_deref()).await.map_err(|e| Error::Internal(e.to_string()))?;
        let Some(user) = user else { return Err(Error::Unauthorized(BAD_CREDENTIALS.into())) };
        let ctx = EventContext { correlation_id: request_id.to_owned(), actor: Actor::User { id: user.id } };
        let refused = if !verified.ok {
            // No password at all: like an unknown email, nothing to record.
            if stored.is_none() {
                return Err(Error::Unauthorized(BAD_CREDENTIALS.into()));
            }
            Some("wrong_password")
        } else if user.status != UserStatus::Active {
            Some("disabled")
        } else {
            None
        };
        if let Some(reason) = refused {
            let event = DomainEvent::auth_login_failed(tenant_id, user.id, reason, &client.ip, &ctx);
            if let Err(e) = self.store.append_event(&event).await {
                tracing::warn!(tenant_id = %tenant_id, error = %e, "could not record a refused sign-in");
            }
            return Err(Error::Unauthorized(BAD_CREDENTIALS.into()));
        }
        if verified.needs_rehash {
            match self.hasher.hash(&input.password).await {
                Ok(h) => {
                    if let Err(e) = self.store.rehash_password(tenant_id, user.id, h.as_str()).await {
                        tracing::warn!(user_id = %user.id, error = %e, "password hash upgrade failed; kept the old one");
                    }
                }
                Err(e) => tracing::warn!(user_id = %user.id, error = %e, "password hash upgrade failed"),
            }
        }
        let now = crate::domain::now();
        let session = Session {
            id: Uuid::now_v7(),
            tenant_id,
            user_id: user.id,
            created_at: now,
            last_used_at: now,
            expires_at: now + chrono::Duration::from_std(self.config.refresh_ttl).unwrap_or(chrono::Duration::days(30)),
            user_agent: client.user_agent.chars().take(512).collect(),
            ip: client.ip.clone(),
        };
        let refresh = new_refresh_token();
        self.store
            .create_session(&session, &token_hash(&refresh), &DomainEvent::auth_login_succeeded(&session, &ctx))
            .await?;
        tracing::info!(tenant_id = %tenant_id, user_id = %user.id, session_id = %session.id, "user signed in");
        self.pair(&user, session.id, refresh).await
    }

    /// `POST …/auth/refresh`: the token is spent and a new pair issued; a spent one
    /// revokes its session.
    pub async fn refresh(&self, tenant_id: Uuid, token: &str, request_id: &str) -> Result<TokenPair> {
        let next = new_refresh_token();
        match self.store.use_refresh_token(tenant_id, &token_hash(token), &token_hash(&next), request_id).await? {
            RefreshUse::Rotated { session, user } if user.status == UserStatus::Active => {
                self.pair(&user, session.id, next).await
            }
            RefreshUse::Rotated { .. } => Err(Error::Unauthorized("the user cannot sign in".into())),
            RefreshUse::Reused(session) => {
                tracing::warn!(tenant_id = %tenant_id, user_id = %session.user_id, session_id = %session.id,
                    "a spent refresh token was presented again; the session is revoked");
                Err(Error::Unauthorized("the refresh token was already used; the session is revoked".into()))
            }
            RefreshUse::Invalid => Err(Error::Unauthorized("the refresh token is not valid".into())),
        }
    }

    /// The claims of a valid access token of this tenant whose session is active.
    pub async fn authenticate(&self, tenant_id: Uuid, token: &str) -> Result<Claims> {
        let bad = |why: String| Error::Unauthorized(format!("the access token is not valid: {why}"));
        let kid = jwt::kid(token).map_err(|e| bad(e.to_string()))?;
        let key = self
            .keys
            .public_key(&kid)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?
            .ok_or_else(|| bad("its key is unknown".into()))?;
        let now = chrono::Utc::now().timestamp();
        let claims = jwt::verify(token, &key, &self.config.issuer, now, LEEWAY_SECS).map_err(|e| bad(e.to_string()))?;
        if claims.tid != tenant_id {
            return Err(bad("it belongs to another tenant".into()));
        }
        if !self.store.session_active(tenant_id, claims.sid).await? {
            return Err(bad("its session is revoked or expired".into()));
        }
        Ok(claims)
    }

    /// Sets a user's password. By the user (`by_user`: their token's claims), the
    /// current password must be right (an attempt counted like a sign-in) and their own
    /// session stays; by a key, every session of the user ends.
    pub async fn change_password(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        change: crate::domain::auth::PasswordChange,
        by_user: Option<&Claims>,
        client: &Client,
        ctx: &EventContext,
    ) -> Result<User> {
        let mut errors = crate::domain::ValidationErrors::new();
        change.password.check(&mut errors, "password");
        if by_user.is_some() && change.current_password.is_none() {
            errors.add("current_password", "is required when the user changes their own password");
        }
        errors.into_result(())?;
        let keep = match (by_user, &change.current_password) {
            (Some(claims), Some(current)) => {
                let (user, stored) = self.store.user_with_hash(tenant_id, user_id).await?;
                self.attempt("password", tenant_id, &normalize_email(&user.email), &client.ip).await?;
                let ok =
                    self.hasher.verify(current, stored.as_deref()).await.map_err(|e| Error::Internal(e.to_string()))?;
                if !ok.ok {
                    return Err(Error::Forbidden("current_password is wrong".into()));
                }
                Some(claims.sid)
            }
            _ => None,
        };
        let hash = self.hasher.hash(&change.password).await.map_err(|e| Error::Internal(e.to_string()))?;
        let user = self.store.set_password(tenant_id, user_id, hash.as_str(), keep, ctx).await?;
        tracing::info!(tenant_id = %tenant_id, user_id = %user_id, "password changed; the user's other sessions are revoked");
        Ok(user)
    }

    /// `POST …/users/{id}/verification`: a new code (replacing an earlier one), emailed
    /// through the job system. Returns when it expires.
    pub async fn start_verification(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        client: &Client,
    ) -> Result<chrono::DateTime<chrono::Utc>> {
        let user = self.store.get_user(tenant_id, user_id).await?;
        self.attempt("verify", tenant_id, &normalize_email(&user.email), &client.ip).await?;
        if user.email_verified {
            return Err(Error::Conflict("the email is verified already".into()));
        }
        self.send_code(&user, "verify").await
    }

    /// `POST …/users/{id}/verification/confirm`: the right code marks the email verified
    /// (`user.verified`).
    pub async fn confirm_verification(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        code: &str,
        client: &Client,
        ctx: &EventContext,
    ) -> Result<User> {
        let user = self.store.get_user(tenant_id, user_id).await?;
        self.attempt("verify", tenant_id, &normalize_email(&user.email), &client.ip).await?;
        let hash = self.code_hash(user_id, "verify", code);
        match self.store.redeem_code(tenant_id, user_id, "verify", &hash, None, ctx).await? {
            crate::store::CodeOutcome::Redeemed(user) => Ok(user),
            other => Err(code_refused(other, true)),
        }
    }

    /// `POST …/auth/password-reset`: answered at once, the same for every email; the
    /// code (for an active user that exists) is made and sent after the answer, so the
    /// time taken tells nothing either.
    pub async fn request_reset(&self, tenant_id: Uuid, email: &str, client: &Client) -> Result<()> {
        let email = normalize_email(email.trim());
        self.attempt("reset", tenant_id, &email, &client.ip).await?;
        let auth = self.clone();
        tokio::spawn(async move {
            match auth.store.user_credentials(tenant_id, &email).await {
                Ok(Some((user, _))) if user.status == UserStatus::Active => {
                    if let Err(e) = auth.send_code(&user, "reset").await {
                        tracing::warn!(tenant_id = %tenant_id, user_id = %user.id, error = %e, "password reset code not sent");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(tenant_id = %tenant_id, error = %e, "password reset look-up failed"),
            }
        });
        Ok(())
    }

    /// `POST …/auth/password-reset/confirm`: the right code sets the password and ends
    /// every session. An unknown email and a wrong code get the same answer.
    pub async fn confirm_reset(
        &self,
        tenant_id: Uuid,
        email: &str,
        code: &str,
        password: &crate::domain::auth::Password,
        client: &Client,
        request_id: &str,
    ) -> Result<()> {
        let email = normalize_email(email.trim());
        self.attempt("reset", tenant_id, &email, &client.ip).await?;
        let mut errors = crate::domain::ValidationErrors::new();
        password.check(&mut errors, "password");
        errors.into_result(())?;
        // Hashed first, whatever follows: an unknown email takes as long as a known one.
        let hash = self.hasher.hash(password).await.map_err(|e| Error::Internal(e.to_string()))?;
        let Some((user, _)) = self.store.user_credentials(tenant_id, &email).await? else {
            return Err(code_refused(crate::store::CodeOutcome::NoCode, false));
        };
        let ctx = EventContext { correlation_id: request_id.to_owned(), actor: Actor::User { id: user.id } };
        let code_hash = self.code_hash(user.id, "reset", code);
        match self.store.redeem_code(tenant_id, user.id, "reset", &code_hash, Some(hash.as_str()), &ctx).await? {
            crate::store::CodeOutcome::Redeemed(_) => {
                tracing::info!(tenant_id = %tenant_id, user_id = %user.id, "password reset; every session revoked");
                Ok(())
            }
            // No tries count shown: it would tell that the email exists.
            other => Err(code_refused(other, false)),
        }
    }

    /// Makes, stores (its HMAC) and emails (sealed, through the job system) a code.
    async fn send_code(&self, user: &User, purpose: &str) -> Result<chrono::DateTime<chrono::Utc>> {
        let code = format!("{:06}", rand::random_range(0..1_000_000u32));
        let expires_at = crate::domain::now() + chrono::Duration::minutes(CODE_TTL_MINUTES);
        let hash = self.code_hash(user.id, purpose, &code);
        self.store.put_code(user.tenant_id, user.id, purpose, &hash, expires_at, CODE_TRIES).await?;
        let args = crate::jobs::kinds::auth_code_email::AuthCodeArgs {
            tenant_id: user.tenant_id,
            user_id: user.id,
            email: user.email.clone(),
            purpose: purpose.to_owned(),
            code_id: Uuid::now_v7(),
            sealed_code: self.sealer.seal(&code),
            expires_at,
        };
        self.jobs.enqueue(args.job()).await.map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(expires_at)
    }

    fn code_hash(&self, user_id: Uuid, purpose: &str, code: &str) -> String {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.code_key).expect("HMAC takes a key of any length");
        mac.update(format!("{user_id}:{purpose}:{}", code.trim()).as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// The user of a verified token.
    pub async fn me(&self, claims: &Claims) -> Result<User> {
        Ok(self.store.get_user(claims.tid, claims.sub).await?)
    }

    /// Ends a session (logout, or an operator's revocation); `user_id` limits it to
    /// that user's sessions.
    pub async fn revoke(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        user_id: Option<Uuid>,
        reason: &str,
        ctx: &EventContext,
    ) -> Result<Session> {
        self.store.revoke_session(tenant_id, session_id, user_id, reason, ctx).await?.ok_or(Error::NotFound("session"))
    }

    pub async fn sessions(&self, tenant_id: Uuid, user_id: Uuid) -> Result<Vec<Session>> {
        self.store.get_user(tenant_id, user_id).await?;
        Ok(self.store.sessions_of(tenant_id, user_id).await?)
    }

    pub async fn jwks(&self) -> Result<Jwks> {
        self.keys.jwks().await.map_err(|e| Error::Unavailable(e.to_string()))
    }

    pub async fn rotate_keys(&self) -> Result<String> {
        self.keys.rotate().await.map_err(|e| Error::Unavailable(e.to_string()))
    }

    async fn pair(&self, user: &User, session_id: Uuid, refresh: String) -> Result<TokenPair> {
        let (kid, key) = self.keys.signer().await.map_err(|e| Error::Unavailable(e.to_string()))?;
        let now = chrono::Utc::now().timestamp();
        let ttl = self.config.access_ttl.as_secs() as i64;
        let claims = Claims {
            iss: self.config.issuer.clone(),
            sub: user.id,
            tid: user.tenant_id,
            exp: now + ttl,
            iat: now,
            jti: Uuid::now_v7(),
            sid: session_id,
            email: user.email.clone(),
            email_verified: user.email_verified,
        };
        Ok(TokenPair {
            access_token: jwt::sign(&claims, &kid, &key),
            token_type: "Bearer",
            expires_in: ttl,
            refresh_token: refresh,
        })
    }
}

/// The 422 of a code that did not redeem (the same whether the user exists or not).
/// `detailed` adds the tries left (only to callers who know the user exists).
fn code_refused(outcome: crate::store::CodeOutcome, detailed: bool) -> Error {
    let why = match outcome {
        crate::store::CodeOutcome::Wrong { tries_left } if tries_left > 0 && detailed => {
            format!("is wrong ({tries_left} tries left)")
        }
        _ => "is wrong or expired, or was tried too often: ask for a new one".to_owned(),
    };
    Error::Validation(crate::domain::ValidationErrors::single("code", why))
}

/// 256 random bits, base64url: opaque to clients.
fn new_refresh_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("rt_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// What is stored of a refresh token.
fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
