//! The application error: every subsystem error converts into it, and `crate::http::problem`
//! maps it to an RFC 9457 problem once, at the edge.

use crate::domain::ValidationErrors;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Field-level problems with the request body or query (422).
    #[error(transparent)]
    Validation(#[from] ValidationErrors),
    /// The request is malformed in a way that is not about one field (400).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The resource does not exist or belongs to another tenant (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("tenant has reached its limit of {max_users} users")]
    TenantFull { max_users: i64 },
    /// `If-Match` named a version that is no longer current (412).
    #[error("version {expected} is stale; the current version is {current}")]
    StaleVersion { expected: i64, current: i64 },
    #[error("Idempotency-Key was already used with a different request body; use a new key for a new request")]
    IdempotencyMismatch,
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The caller sends faster than its events are processed: back off (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// Over a rate limit of `limit` a `window_secs` (429 with `Retry-After` and the
    /// `RateLimit` headers).
    #[error("too many attempts: at most {limit} every {window_secs} s; retry in {retry_after_secs} s")]
    RateLimited { limit: u32, window_secs: u64, retry_after_secs: u64 },
    /// A component is down or restarting; retrying later may succeed (503).
    #[error("{0}")]
    Unavailable(String),
    /// A server fault; the detail is logged, not shown (500).
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Error::NotFound(what),
            StoreError::Conflict(msg) => Error::Conflict(msg),
            StoreError::TenantFull { max_users } => Error::TenantFull { max_users },
            StoreError::StaleVersion { expected, current } => Error::StaleVersion { expected, current },
            StoreError::IdempotencyMismatch => Error::IdempotencyMismatch,
            e if e.is_unreachable() => {
                Error::Unavailable(format!("the database is busy or unreachable ({e}); retry shortly"))
            }
            e @ (StoreError::Database(_)
            | StoreError::Migrate(_)
            | StoreError::Corrupt(_)
            | StoreError::Unavailable(_)) => Error::Internal(e.to_string()),
        }
    }
}
