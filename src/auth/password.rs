//! Password hashing with Argon2id (the `argon2` crate). The parameters travel in each
//! PHC string, so they can be raised later: a hash made with older ones still verifies
//! and is upgraded at the user's next sign-in ([`Verified::needs_rehash`]).
//!
//! Hashing is slow on purpose (tens of milliseconds of CPU and `memory_kib` of RAM), so
//! it runs on the blocking pool, never on the async runtime, and at most `parallelism`
//! at a time: a burst of sign-ins queues here instead of starving every other request.
//! A sign-in for an unknown email verifies against a dummy hash made with the same
//! parameters, so the answer takes as long as for a wrong password.

use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash as Phc, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::domain::auth::{Password, PasswordHash};

/// Argon2id's cost: OWASP's baseline (19 MiB, 2 passes, 1 lane) by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub lanes: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        HashCost { memory_kib: 19_456, iterations: 2, lanes: 1 }
    }
}

impl std::fmt::Display for HashCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Argon2id m={} KiB, t={}, p={}", self.memory_kib, self.iterations, self.lanes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("invalid Argon2 parameters: {0}")]
    Params(String),
    #[error("password hashing failed: {0}")]
    Hashing(String),
    #[error("the hashing task did not finish: {0}")]
    Task(String),
}

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub ok: bool,
    /// The stored hash was made with other parameters (or another algorithm) than the
    /// current ones: store a new hash of the password that just verified.
    pub needs_rehash: bool,
}

#[derive(Clone)]
pub struct Hasher {
    cost: HashCost,
    params: Params,
    permits: Arc<Semaphore>,
    /// A hash of a random password: what an unknown email is verified against.
    dummy: Arc<String>,
}

impl Hasher {
    /// `parallelism`: hashes computed at once (the rest wait their turn).
    pub fn new(cost: HashCost, parallelism: usize) -> Result<Self, HashError> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.lanes, None)
            .map_err(|e| HashError::Params(e.to_string()))?;
        let salt = SaltString::generate(&mut OsRng);
        let random = SaltString::generate(&mut OsRng);
        let dummy = argon(&params)
            .hash_password(random.as_str().as_bytes(), &salt)
            .map_err(|e| HashError::Hashing(e.to_string()))?
            .to_string();
        Ok(Hasher { cost, params, permits: Arc::new(Semaphore::new(parallelism.max(1))), dummy: Arc::new(dummy) })
    }

    pub fn cost(&self) -> HashCost {
        self.cost
    }

    /// A new hash of `password` with the current parameters and a fresh salt.
    pub async fn hash(&self, password: &Password) -> Result<PasswordHash, HashError> {
        let params = self.params.clone();
        let password = password.clone();
        self.blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon(&params)
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|h| PasswordHash::new(h.to_string()))
                .map_err(|e| HashError::Hashing(e.to_string()))
        })
        .await?
    }

    /// Checks `password` against `stored` (constant time in the compare, inside
    /// argon2); `None` (no such user, or no password) spends the same work on the dummy
    /// hash and answers not ok.
    pub async fn verify(&self, password: &Password, stored: Option<&str>) -> Result<Verified, HashError> {
        let (hash, real) = match stored {
            Some(h) => (h.to_owned(), true),
            None => (self.dummy.as_str().to_owned(), false),
        };
        let password = password.clone();
        let current = self.params.clone();
        self.blocking(move || {
            let Ok(phc) = Phc::new(&hash) else {
                // Not a PHC string: nothing can match it (and it must be replaced).
                return Verified { ok: false, needs_rehash: real };
            };
            let ok = Argon2::default().verify_password(password.expose().as_bytes(), &phc).is_ok();
            let same = phc.algorithm.as_str() == "argon2id"
                && Params::try_from(&phc).is_ok_and(|p| {
                    p.m_cost() == current.m_cost() && p.t_cost() == current.t_cost() && p.p_cost() == current.p_cost()
                });
            Verified { ok: ok && real, needs_rehash: ok && real && !same }
        })
        .await
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, HashError> {
        let _permit = self.permits.acquire().await.map_err(|e| HashError::Task(e.to_string()))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| HashError::Task(e.to_string()))
    }
}

fn argon(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: HashCost = HashCost { memory_kib: 64, iterations: 1, lanes: 1 };

    #[tokio::test]
    async fn hashes_verify_and_old_parameters_ask_for_a_rehash() {
        let h = Hasher::new(CHEAP, 2).unwrap();
        let pw = Password::from("correct horse battery");
        let stored = h.hash(&pw).await.unwrap();
        assert!(stored.as_str().starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{stored:?}");
        assert_eq!(h.verify(&pw, Some(stored.as_str())).await.unwrap(), Verified { ok: true, needs_rehash: false });
        let wrong = Password::from("correct horse battery!");
        assert_eq!(h.verify(&wrong, Some(stored.as_str())).await.unwrap(), Verified { ok: false, needs_rehash: false });
        // Unknown user: never ok.
        assert!(!h.verify(&pw, None).await.unwrap().ok);
        // Raised parameters: the old hash still verifies, and asks to be replaced.
        let stronger = Hasher::new(HashCost { memory_kib: 128, ..CHEAP }, 2).unwrap();
        assert_eq!(
            stronger.verify(&pw, Some(stored.as_str())).await.unwrap(),
            Verified { ok: true, needs_rehash: true }
        );
        assert!(!stronger.verify(&pw, Some("not a hash")).await.unwrap().ok);
    }
}
