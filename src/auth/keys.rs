//! The signing keys of access tokens, shared by every process through the database:
//! the newest unretired key signs; every key that may still have unexpired tokens
//! verifies and is published in the JWKS (`/.well-known/jwks.json`).
//!
//! Private keys are sealed at rest with AES-256-GCM under `EVENTRA_SECRET_KEY` (the
//! `SecretBox` webhook secrets use): a database dump does not hand out the power to
//! mint tokens. Every process must share that key, as it must for webhooks.
//!
//! Each process caches the keys and reloads them every [`RELOAD`], and at once (at most
//! once a second) when a token names a key it does not know: a key made by another
//! process (a rotation, or the first key) is found without a restart. The first process
//! that needs to sign and finds no key makes one; two that race each make one, and both
//! stay valid.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::Serialize;
use tokio::sync::RwLock;

use crate::store::{Store, StoreError, StoredKey};
use crate::webhooks::secret_box::SecretBox;

/// How often the cache is refreshed from the database.
const RELOAD: Duration = Duration::from_secs(30);
/// Least time between two reloads caused by an unknown key id.
const UNKNOWN_RELOAD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing key {0} is unreadable (not an Ed25519 PKCS#8 document)")]
    Corrupt(String),
    #[error("no signing key could be made: {0}")]
    Generate(String),
}

struct Loaded {
    keys: Vec<StoredKey>,
    /// The key that signs (the newest unretired one) and its id.
    signer: Option<(String, Arc<Ed25519KeyPair>)>,
    at: Instant,
    last_unknown: Option<Instant>,
}

/// One key of the JWKS (RFC 8037: an `OKP` key on `Ed25519`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Jwk {
    pub kty: &'static str,
    pub crv: &'static str,
    /// The public key, base64url.
    pub x: String,
    pub kid: String,
    pub alg: &'static str,
    #[serde(rename = "use")]
    pub use_: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Clone)]
pub struct KeyRing {
    store: Arc<dyn Store>,
    sealer: Arc<SecretBox>,
    /// How long a token lives: a retired key is published this long after retirement.
    token_ttl: chrono::Duration,
    loaded: Arc<RwLock<Option<Loaded>>>,
}

impl KeyRing {
    pub fn new(store: Arc<dyn Store>, sealer: Arc<SecretBox>, token_ttl: Duration) -> Self {
        KeyRing {
            store,
            sealer,
            token_ttl: chrono::Duration::from_std(token_ttl).unwrap_or(chrono::Duration::hours(1)),
            loaded: Arc::new(RwLock::new(None)),
        }
    }

    /// The signing key and its id (making the first key if there is none).
    pub async fn signer(&self) -> Result<(String, Arc<Ed25519KeyPair>), KeyError> {
        if let Some(s) = self.fresh(|l| l.signer.clone()).await {
            return Ok(s);
        }
        let loaded = self.reload().await?;
        if let Some(s) = loaded {
            return Ok(s);
        }
        self.store.add_signing_key(&generate(&self.sealer)?, false).await?;
        self.reload().await?.ok_or_else(|| KeyError::Generate("the new key is not in the store".into()))
    }

    /// The public key (32 bytes) of `kid`, if it may verify tokens now.
    pub async fn public_key(&self, kid: &str) -> Result<Option<Vec<u8>>, KeyError> {
        let find = |l: &Loaded| l.keys.iter().find(|k| k.kid == kid).map(|k| k.public_key.clone());
        if let Some(found) = self.fresh(|l| find(l)).await {
            return Ok(Some(found));
        }
        // Unknown here: maybe made by another process since the last load.
        let may_reload = {
            let guard = self.loaded.read().await;
            guard.as_ref().is_none_or(|l| l.last_unknown.is_none_or(|t| t.elapsed() >= UNKNOWN_RELOAD))
        };
        if !may_reload {
            return Ok(None);
        }
        self.reload().await?;
        let mut guard = self.loaded.write().await;
        Ok(guard.as_mut().and_then(|l| {
            l.last_unknown = Some(Instant::now());
            find(l)
        }))
    }

    /// The keys that may verify tokens now.
    pub async fn jwks(&self) -> Result<Jwks, KeyError> {
        self.signer().await?;
        let guard = self.loaded.read().await;
        let keys = guard.as_ref().map(|l| l.keys.as_slice()).unwrap_or_default();
        Ok(Jwks {
            keys: keys
                .iter()
                .map(|k| Jwk {
                    kty: "OKP",
                    crv: "Ed25519",
                    x: URL_SAFE_NO_PAD.encode(&k.public_key),
                    kid: k.kid.clone(),
                    alg: "EdDSA",
                    use_: "sig",
                })
                .collect(),
        })
    }

    /// A new signing key; the others are retired (published until their tokens expired).
    pub async fn rotate(&self) -> Result<String, KeyError> {
        let key = generate(&self.sealer)?;
        let kid = key.kid.clone();
        self.store.add_signing_key(&key, true).await?;
        self.reload().await?;
        tracing::info!(kid = %kid, "signing key rotated");
        Ok(kid)
    }

    /// `f` of the cache, if it is loaded and not older than [`RELOAD`].
    async fn fresh<T>(&self, f: impl FnOnce(&Loaded) -> Option<T>) -> Option<T> {
        let guard = self.loaded.read().await;
        guard.as_ref().filter(|l| l.at.elapsed() < RELOAD).and_then(f)
    }

    /// Loads the keys that may verify now; returns the signer.
    async fn reload(&self) -> Result<Option<(String, Arc<Ed25519KeyPair>)>, KeyError> {
        let now = crate::domain::now();
        let keys: Vec<StoredKey> = self
            .store
            .signing_keys()
            .await?
            .into_iter()
            .filter(|k| k.retired_at.is_none_or(|r| r + self.token_ttl > now))
            .collect();
        let signer = match keys.iter().find(|k| k.retired_at.is_none()) {
            Some(k) => Some((k.kid.clone(), Arc::new(unseal(&self.sealer, k)?))),
            None => None,
        };
        let mut guard = self.loaded.write().await;
        let last_unknown = guard.as_ref().and_then(|l| l.last_unknown);
        *guard = Some(Loaded { keys, signer: signer.clone(), at: Instant::now(), last_unknown });
        Ok(signer)
    }
}

/// The key pair of a stored key.
fn unseal(sealer: &SecretBox, k: &StoredKey) -> Result<Ed25519KeyPair, KeyError> {
    let corrupt = || KeyError::Corrupt(k.kid.clone());
    let sealed = std::str::from_utf8(&k.private_key).map_err(|_| corrupt())?;
    let pkcs8 = base64::engine::general_purpose::STANDARD
        .decode(sealer.open(sealed).map_err(|e| KeyError::Corrupt(format!("{}: {e}", k.kid)))?)
        .map_err(|_| corrupt())?;
    Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| corrupt())
}

/// A new Ed25519 key pair, its id random, its private half sealed.
fn generate(sealer: &SecretBox) -> Result<StoredKey, KeyError> {
    let rng = SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Generate(e.to_string()))?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| KeyError::Generate(e.to_string()))?;
    let mut id = [0u8; 12];
    ring::rand::SecureRandom::fill(&rng, &mut id).map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok(StoredKey {
        kid: URL_SAFE_NO_PAD.encode(id),
        private_key: sealer.seal(&base64::engine::general_purpose::STANDARD.encode(doc.as_ref())).into_bytes(),
        public_key: pair.public_key().as_ref().to_vec(),
        created_at: crate::domain::now(),
        retired_at: None,
    })
}
