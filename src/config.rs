//! Configuration: command-line flags, each mirroring an environment variable (SPEC §1),
//! validated once at start into [`Config`] and shared as `Arc<Config>`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;

/// The processes's roles (SPEC §1). `api` serves HTTP and owns the tenant actors;
/// `worker` runs the job workers, scheduler and reaper; `relay` the outbox relay;
/// `consumer` the broker consumers. `indexer` is accepted so deployments can name it.
pub const ROLES: &[&str] = &["api", "relay", "consumer", "worker", "indexer"];

/// Default for `EVENTRA_MAX_TENANT_MANAGERS`: ~13 KB each (measured: `eventra bench
/// tenants`), so ~130 MB at the limit.
pub const DEFAULT_MAX_TENANT_MANAGERS: usize = 10_000;

/// Flags of `eventra serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTP address to listen on.
    #[arg(long, env = "EVENTRA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub data: DataArgs,
    /// Platform admin bearer token; generated and stored under the data dir when unset.
    #[arg(long, env = "EVENTRA_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// `1` enables `POST /debug/actors/{name}/kill`.
    #[arg(long, env = "EVENTRA_CHAOS", default_value = "0", value_parser = parse_flag)]
    pub chaos: bool,
    /// Prefix for exchanges, queues, Redis keys and index names.
    #[arg(long, env = "EVENTRA_NAMESPACE", default_value = "eventra")]
    pub namespace: String,
    /// Comma-separated roles this process runs.
    #[arg(long, env = "EVENTRA_ROLES", value_delimiter = ',', default_value = "api,relay,consumer,worker,indexer")]
    pub roles: Vec<String>,
    /// RabbitMQ URL; unset selects the embedded event bus.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Redis URL; unset selects the embedded job queue.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// OpenSearch URL; unset selects the embedded tantivy index.
    #[arg(long, env = "OPENSEARCH_URL", hide_env_values = true)]
    pub opensearch_url: Option<String>,
    /// SMTP URL; unset writes `.eml` files under the data dir.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Seconds a tenant manager may idle before it is stopped.
    #[arg(long, env = "EVENTRA_TENANT_IDLE_SECS", default_value_t = 300)]
    pub tenant_idle_secs: u64,
    /// Most tenant managers running at once; past it the least recently active are
    /// passivated (their next write starts a fresh one).
    #[arg(long, env = "EVENTRA_MAX_TENANT_MANAGERS", default_value_t = DEFAULT_MAX_TENANT_MANAGERS)]
    pub max_tenant_managers: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "EVENTRA_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Writes are refused (503, `Retry-After`) while the job workers are this many
    /// milliseconds behind and still working (see `jobs::lag`); 0 turns it off.
    #[arg(long, env = "EVENTRA_MAX_EFFECT_LAG_MS", default_value_t = 2_000)]
    pub max_effect_lag_ms: u64,
    /// On SIGTERM, how long readiness answers 503 while requests are still served, so a
    /// load balancer stops sending new ones before the listener closes (at most 5000:
    /// with the HTTP and actor drains, SIGTERM still exits within 30 s).
    #[arg(long, env = "EVENTRA_DRAIN_GRACE_MS", default_value_t = 3_000)]
    pub drain_grace_ms: u64,
    /// Custom-event ingestion answers 429 (`Retry-After`) while this many of a tenant's
    /// events are accepted and not yet processed; 0 turns it off.
    #[arg(long, env = "EVENTRA_INGEST_MAX_BACKLOG", default_value_t = 100_000)]
    pub ingest_max_backlog: u64,
    /// `1` lets webhooks call `http://` and private, loopback and link-local addresses
    /// (local development and tests only: it turns the SSRF protection off).
    #[arg(long, env = "EVENTRA_WEBHOOK_ALLOW_PRIVATE", default_value = "0", value_parser = parse_flag)]
    pub webhook_allow_private: bool,
    /// The key webhook signing secrets are encrypted with at rest: 32 bytes, base64
    /// (`openssl rand -base64 32`); every process must share it. Unset: generated once
    /// and kept in `<data dir>/secret_key` (fine for one process).
    #[arg(long, env = "EVENTRA_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// How long a webhook receiver has to answer 2xx, in milliseconds.
    #[arg(long, env = "EVENTRA_WEBHOOK_TIMEOUT_MS", default_value_t = 15_000)]
    pub webhook_timeout_ms: u64,
    /// Workers that deliver webhooks (their own queue, so a slow receiver never holds
    /// other jobs), with the `worker` role.
    #[arg(long, env = "EVENTRA_WEBHOOK_WORKERS", default_value_t = 32)]
    pub webhook_workers: usize,
    #[command(flatten)]
    pub jobs: JobArgs,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Flags of end-user authentication (SPEC §8).
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// `iss` of access tokens (and what verification expects).
    #[arg(long, env = "EVENTRA_JWT_ISSUER", default_value = "eventra")]
    pub jwt_issuer: String,
    /// Seconds an access token is valid.
    #[arg(long, env = "EVENTRA_ACCESS_TOKEN_TTL_SECS", default_value_t = 900)]
    pub access_token_ttl_secs: u64,
    /// Days a session (its refresh tokens) lives.
    #[arg(long, env = "EVENTRA_REFRESH_TOKEN_TTL_DAYS", default_value_t = 30)]
    pub refresh_token_ttl_days: u64,
    /// Argon2id memory per hash, KiB (OWASP baseline: 19456).
    #[arg(long, env = "EVENTRA_ARGON2_MEMORY_KIB", default_value_t = 19_456)]
    pub argon2_memory_kib: u32,
    /// Argon2id passes.
    #[arg(long, env = "EVENTRA_ARGON2_ITERATIONS", default_value_t = 2)]
    pub argon2_iterations: u32,
    /// Sign-in (and verification and reset) attempts a minute, per (tenant, email) and
    /// per client IP, successful or not.
    #[arg(long, env = "EVENTRA_AUTH_ATTEMPTS_PER_MINUTE", default_value_t = 10)]
    pub auth_attempts_per_minute: u32,
    /// Proxies whose `X-Forwarded-For` is believed (comma-separated IPs or CIDRs, e.g.
    /// `10.0.0.0/8`); otherwise the client IP is the socket's peer.
    #[arg(long, env = "EVENTRA_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
}

impl AuthArgs {
    fn validate(self) -> Result<AuthConfig, ConfigError> {
        if self.jwt_issuer.is_empty() {
            return Err(ConfigError::Invalid("EVENTRA_JWT_ISSUER must not be empty".into()));
        }
        if !(60..=86_400).contains(&self.access_token_ttl_secs) {
            return Err(ConfigError::Invalid("EVENTRA_ACCESS_TOKEN_TTL_SECS must be 60 to 86400".into()));
        }
        if !(1..=365).contains(&self.refresh_token_ttl_days) {
            return Err(ConfigError::Invalid("EVENTRA_REFRESH_TOKEN_TTL_DAYS must be 1 to 365".into()));
        }
        if !(8_192..=1_048_576).contains(&self.argon2_memory_kib) || !(1..=10).contains(&self.argon2_iterations) {
            return Err(ConfigError::Invalid(
                "EVENTRA_ARGON2_MEMORY_KIB must be 8192 to 1048576 and EVENTRA_ARGON2_ITERATIONS 1 to 10".into(),
            ));
        }
        if !(1..=10_000).contains(&self.auth_attempts_per_minute) {
            return Err(ConfigError::Invalid("EVENTRA_AUTH_ATTEMPTS_PER_MINUTE must be 1 to 10000".into()));
        }
        let mut trusted_proxies = Vec::new();
        for p in self.trusted_proxies.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let net = p
                .parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| ConfigError::Invalid(format!("EVENTRA_TRUSTED_PROXIES: {p:?} is not an IP or a CIDR")))?;
            trusted_proxies.push(net);
        }
        Ok(AuthConfig {
            attempts_per_minute: self.auth_attempts_per_minute,
            trusted_proxies,
            issuer: self.jwt_issuer,
            access_ttl: std::time::Duration::from_secs(self.access_token_ttl_secs),
            refresh_ttl: std::time::Duration::from_secs(self.refresh_token_ttl_days * 86_400),
            hash_cost: crate::auth::password::HashCost {
                memory_kib: self.argon2_memory_kib,
                iterations: self.argon2_iterations,
                lanes: 1,
            },
        })
    }
}

/// Validated authentication settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub attempts_per_minute: u32,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub issuer: String,
    pub access_ttl: std::time::Duration,
    pub refresh_ttl: std::time::Duration,
    pub hash_cost: crate::auth::password::HashCost,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            attempts_per_minute: 10,
            trusted_proxies: Vec::new(),
            issuer: "eventra".into(),
            access_ttl: std::time::Duration::from_secs(900),
            refresh_ttl: std::time::Duration::from_secs(30 * 86_400),
            hash_cost: crate::auth::password::HashCost::default(),
        }
    }
}

/// Flags of the event pipeline (the `relay` and `consumer` roles).
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Broker-consumer actors in this process (0 runs none).
    #[arg(long, env = "EVENTRA_CONSUMERS", default_value_t = 2)]
    pub consumers: usize,
    /// Most unacked deliveries per consumer (also its largest batch: one audit insert,
    /// one job enqueue and one ack per batch). 100 left RabbitMQ consumers ~9,100
    /// events/s, behind a 10,000/s load on 2 cores; 300 kept pace.
    #[arg(long, env = "EVENTRA_PREFETCH", default_value_t = 300)]
    pub prefetch: u16,
    /// Deliveries after which an unacked event is parked in the DLQ (a backstop: it
    /// counts returns by connection losses and process crashes; consumer restarts
    /// return nothing, and invalid events are parked at once).
    #[arg(long, env = "EVENTRA_MAX_DELIVERIES", default_value_t = 20)]
    pub max_deliveries: u32,
    /// The outbox relay's poll period, in milliseconds (it also wakes on new rows).
    #[arg(long, env = "EVENTRA_RELAY_POLL_MS", default_value_t = 500)]
    pub relay_poll_ms: u64,
    /// The active relay's lease, in milliseconds: a standby takes over this long after
    /// the active one died.
    #[arg(long, env = "EVENTRA_RELAY_LEASE_MS", default_value_t = 5_000)]
    pub relay_lease_ms: u64,
    /// Hours a published outbox row is kept (0 keeps them forever).
    #[arg(long, env = "EVENTRA_OUTBOX_RETENTION_HOURS", default_value_t = 168)]
    pub outbox_retention_hours: u64,
}

/// Validated pipeline settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub consumers: usize,
    pub prefetch: u16,
    pub max_deliveries: u32,
    pub relay_poll: std::time::Duration,
    pub relay_lease: std::time::Duration,
    /// Rows per publish.
    pub relay_batch: u32,
    /// Embedded bus: how long an unsettled delivery stays with a vanished consumer.
    pub visibility: std::time::Duration,
    /// Published outbox rows older than this are deleted (`None`: kept).
    pub outbox_retention: Option<std::time::Duration>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            consumers: 2,
            prefetch: 300,
            max_deliveries: 20,
            relay_poll: std::time::Duration::from_millis(500),
            relay_lease: std::time::Duration::from_secs(5),
            relay_batch: 500,
            visibility: std::time::Duration::from_secs(60),
            outbox_retention: Some(std::time::Duration::from_secs(168 * 3600)),
        }
    }
}

impl PipelineArgs {
    fn validate(self) -> Result<PipelineConfig, ConfigError> {
        if self.consumers > 100 {
            return Err(ConfigError::Invalid("EVENTRA_CONSUMERS must be at most 100".into()));
        }
        if self.max_deliveries == 0 || self.max_deliveries > 1000 {
            return Err(ConfigError::Invalid("EVENTRA_MAX_DELIVERIES must be between 1 and 1000".into()));
        }
        if self.relay_lease_ms < 300 {
            return Err(ConfigError::Invalid("EVENTRA_RELAY_LEASE_MS must be at least 300".into()));
        }
        if self.relay_poll_ms.saturating_mul(3) > self.relay_lease_ms {
            return Err(ConfigError::Invalid(
                "EVENTRA_RELAY_POLL_MS must be at most a third of EVENTRA_RELAY_LEASE_MS (the active relay renews its lease every poll)".into(),
            ));
        }
        Ok(PipelineConfig {
            consumers: self.consumers,
            prefetch: self.prefetch.max(1),
            max_deliveries: self.max_deliveries,
            relay_poll: std::time::Duration::from_millis(self.relay_poll_ms.clamp(10, 60_000)),
            relay_lease: std::time::Duration::from_millis(self.relay_lease_ms),
            outbox_retention: (self.outbox_retention_hours > 0)
                .then(|| std::time::Duration::from_secs(self.outbox_retention_hours.saturating_mul(3600))),
            ..PipelineConfig::default()
        })
    }
}

/// Flags of the job system (the `worker` role).
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Job worker actors in this process (0 runs none). A worker waits for its whole
    /// leased batch, and a batch with index changes waits for the next index commit, so
    /// the pool is sized for that wait: 20 drained 20-30 % more events/s than 10.
    #[arg(long, env = "EVENTRA_WORKERS", default_value_t = 20)]
    pub workers: usize,
    /// Longest a job may run before the attempt counts as failed, in seconds.
    #[arg(long, env = "EVENTRA_JOB_TIMEOUT_SECS", default_value_t = 300)]
    pub job_timeout_secs: u64,
    /// Lease of a running job, in milliseconds: a dead worker's job runs again after it.
    #[arg(long, env = "EVENTRA_JOB_LEASE_MS", default_value_t = 30_000)]
    pub job_lease_ms: u64,
    /// How often the scheduler promotes due jobs, in milliseconds.
    #[arg(long, env = "EVENTRA_JOB_POLL_MS", default_value_t = 1_000)]
    pub job_poll_ms: u64,
    /// Divides every retry delay (tests run the real schedule fast with e.g. 100).
    #[arg(long, env = "EVENTRA_JOB_TIME_SCALE", default_value_t = 1.0)]
    pub job_time_scale: f64,
    /// Most jobs a worker leases at once (never more than its fair share of the
    /// queue); 1 turns batching off.
    #[arg(long, env = "EVENTRA_JOB_BATCH", default_value_t = 100)]
    pub job_batch: u32,
    /// `0` turns off the random part of retry delays (tests that check exact delays).
    #[arg(long, env = "EVENTRA_JOB_JITTER", default_value = "1", value_parser = parse_flag)]
    pub job_jitter: bool,
    /// Sender of Eventra's emails.
    #[arg(long, env = "EVENTRA_MAIL_FROM", default_value = "Eventra <no-reply@eventra.invalid>")]
    pub mail_from: String,
}

/// Validated job settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JobsConfig {
    pub workers: usize,
    pub timeout: std::time::Duration,
    pub lease: std::time::Duration,
    pub poll: std::time::Duration,
    pub time_scale: f64,
    pub jitter: bool,
    pub batch: u32,
    pub mail_from: String,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 20,
            timeout: std::time::Duration::from_secs(300),
            lease: std::time::Duration::from_secs(30),
            poll: std::time::Duration::from_secs(1),
            time_scale: 1.0,
            jitter: true,
            batch: 100,
            mail_from: "Eventra <no-reply@eventra.invalid>".into(),
        }
    }
}

impl JobArgs {
    fn validate(self) -> Result<JobsConfig, ConfigError> {
        if self.workers > 1000 {
            return Err(ConfigError::Invalid("EVENTRA_WORKERS must be at most 1000".into()));
        }
        if self.job_lease_ms < 300 {
            return Err(ConfigError::Invalid("EVENTRA_JOB_LEASE_MS must be at least 300".into()));
        }
        if !(self.job_time_scale.is_finite() && self.job_time_scale > 0.0) {
            return Err(ConfigError::Invalid("EVENTRA_JOB_TIME_SCALE must be a positive number".into()));
        }
        if self.mail_from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "EVENTRA_MAIL_FROM {:?} is not an email address (e.g. \"Eventra <no-reply@example.com>\")",
                self.mail_from
            )));
        }
        Ok(JobsConfig {
            workers: self.workers,
            timeout: std::time::Duration::from_secs(self.job_timeout_secs.max(1)),
            lease: std::time::Duration::from_millis(self.job_lease_ms),
            poll: std::time::Duration::from_millis(self.job_poll_ms.clamp(10, 60_000)),
            time_scale: self.job_time_scale,
            jitter: self.job_jitter,
            batch: self.job_batch.clamp(1, 1000),
            mail_from: self.mail_from,
        })
    }
}

/// Flags shared by every command that opens the database.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Embedded databases, index, mail and the generated admin token live here.
    #[arg(long, env = "EVENTRA_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; default `sqlite://<data dir>/eventra.db`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Most database connections this process opens (PostgreSQL's own limit is
    /// shared by every process: keep the sum below it).
    #[arg(long, env = "EVENTRA_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

impl DataArgs {
    /// The database URL, with the embedded default filled in.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| default_sqlite_url(&self.data_dir))
    }
}

pub fn default_sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("eventra.db").display())
}

/// A value that must never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where the admin token came from, so `serve` can tell the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Configured,
    Generated,
    Stored,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub db_max_connections: u32,
    pub admin_token: Secret,
    pub admin_token_source: TokenSource,
    pub chaos: bool,
    pub namespace: String,
    pub roles: Vec<String>,
    pub amqp_url: Option<String>,
    pub redis_url: Option<String>,
    pub opensearch_url: Option<String>,
    pub smtp_url: Option<String>,
    pub tenant_idle_timeout: std::time::Duration,
    pub max_tenant_managers: usize,
    pub max_body_bytes: usize,
    /// See `EVENTRA_MAX_EFFECT_LAG_MS` (zero: off).
    pub max_effect_lag: std::time::Duration,
    /// See `EVENTRA_DRAIN_GRACE_MS`.
    pub drain_grace: std::time::Duration,
    /// See `EVENTRA_INGEST_MAX_BACKLOG` (zero: off).
    pub ingest_max_backlog: u64,
    /// See `EVENTRA_WEBHOOK_ALLOW_PRIVATE`.
    pub webhook_allow_private: bool,
    pub webhook_timeout: std::time::Duration,
    pub webhook_workers: usize,
    /// See `EVENTRA_SECRET_KEY` (base64 of 32 bytes, checked).
    pub secret_key: Secret,
    pub jobs: JobsConfig,
    pub pipeline: PipelineConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot use data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
}

impl Config {
    /// Validates flags and resolves the admin token (creating the data dir if needed).
    pub fn from_args(a: ServeArgs) -> Result<Self, ConfigError> {
        if a.namespace.is_empty()
            || a.namespace.len() > 40
            || !a.namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::Invalid(
                "EVENTRA_NAMESPACE must be 1-40 characters of a-z, 0-9, '-' and '_'".into(),
            ));
        }
        if let Some(bad) = a.roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
            return Err(ConfigError::Invalid(format!("unknown role '{bad}'; roles are {}", ROLES.join(","))));
        }
        if a.drain_grace_ms > 5_000 {
            return Err(ConfigError::Invalid("EVENTRA_DRAIN_GRACE_MS must be at most 5000".into()));
        }
        if a.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid("EVENTRA_MAX_BODY_BYTES must be at least 1024".into()));
        }
        let data_dir = a.data.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| ConfigError::DataDir { path: data_dir.clone(), source })?;
        let secret_key = match a.secret_key.clone().filter(|k| !k.is_empty()) {
            Some(k) => {
                crate::webhooks::secret_box::SecretBox::from_base64(&k)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                Secret::new(k)
            }
            None => load_or_generate_secret_key(&data_dir)?,
        };
        let (admin_token, admin_token_source) = match a.admin_token.filter(|t| !t.is_empty()) {
            Some(t) if t.len() < 16 => {
                return Err(ConfigError::Invalid("EVENTRA_ADMIN_TOKEN must be at least 16 characters".into()))
            }
            Some(t) => (Secret::new(t), TokenSource::Configured),
            None => load_or_generate_token(&data_dir)?,
        };
        Ok(Config {
            listen: a.listen,
            database_url: a.data.database_url(),
            db_max_connections: a.data.db_max_connections.max(1),
            data_dir,
            admin_token,
            admin_token_source,
            chaos: a.chaos,
            namespace: a.namespace,
            roles: a.roles,
            amqp_url: a.amqp_url,
            redis_url: a.redis_url,
            opensearch_url: a.opensearch_url,
            smtp_url: a.smtp_url,
            tenant_idle_timeout: std::time::Duration::from_secs(a.tenant_idle_secs.max(1)),
            max_tenant_managers: a.max_tenant_managers.max(1),
            max_body_bytes: a.max_body_bytes,
            max_effect_lag: std::time::Duration::from_millis(a.max_effect_lag_ms),
            drain_grace: std::time::Duration::from_millis(a.drain_grace_ms),
            ingest_max_backlog: a.ingest_max_backlog,
            webhook_allow_private: a.webhook_allow_private,
            webhook_timeout: std::time::Duration::from_millis(a.webhook_timeout_ms.clamp(100, 120_000)),
            webhook_workers: a.webhook_workers.min(1000),
            secret_key,
            jobs: a.jobs.validate()?,
            pipeline: a.pipeline.validate()?,
            auth: a.auth.validate()?,
        })
    }

    /// Embedded defaults rooted at `data_dir`, for tests and tools.
    pub fn embedded(data_dir: impl Into<PathBuf>, admin_token: &str) -> Self {
        let data_dir = data_dir.into();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: default_sqlite_url(&data_dir),
            db_max_connections: 16,
            data_dir,
            admin_token: Secret::new(admin_token),
            admin_token_source: TokenSource::Configured,
            chaos: false,
            namespace: "eventra".into(),
            roles: ROLES.iter().map(|r| r.to_string()).collect(),
            amqp_url: None,
            redis_url: None,
            opensearch_url: None,
            smtp_url: None,
            tenant_idle_timeout: std::time::Duration::from_secs(300),
            max_tenant_managers: DEFAULT_MAX_TENANT_MANAGERS,
            max_body_bytes: 64 * 1024,
            max_effect_lag: std::time::Duration::from_secs(2),
            // Tests and tools stop at once; `serve` defaults to 3 s.
            drain_grace: std::time::Duration::ZERO,
            ingest_max_backlog: 100_000,
            webhook_allow_private: false,
            webhook_timeout: std::time::Duration::from_secs(15),
            webhook_workers: 4,
            secret_key: Secret::new(crate::webhooks::secret_box::SecretBox::generate_key()),
            jobs: JobsConfig::default(),
            pipeline: PipelineConfig::default(),
            auth: AuthConfig::default(),
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Reads `<data dir>/admin_token`, or creates it (mode 0600) with a fresh random token.
fn load_or_generate_token(dir: &Path) -> Result<(Secret, TokenSource), ConfigError> {
    let path = dir.join("admin_token");
    let io = |source| ConfigError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok((Secret::new(s.trim()), TokenSource::Stored)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let token = crate::domain::NewApiKey::generate(uuid::Uuid::nil(), crate::domain::Role::Admin, crate::domain::now())
        .secret
        .replacen(crate::domain::api_key::KEY_PREFIX, "eva_", 1);
    write_private(&path, &token).map_err(io)?;
    Ok((Secret::new(token), TokenSource::Generated))
}

/// Reads `<data dir>/secret_key`, or creates it (mode 0600) with a fresh key.
fn load_or_generate_secret_key(dir: &Path) -> Result<Secret, ConfigError> {
    let path = dir.join("secret_key");
    let io = |source| ConfigError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            crate::webhooks::secret_box::SecretBox::from_base64(s.trim())
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
            return Ok(Secret::new(s.trim()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let key = crate::webhooks::secret_box::SecretBox::generate_key();
    write_private(&path, &key).map_err(io)?;
    Ok(Secret::new(key))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("expected 0 or 1, got '{s}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("eventra-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, src_a) = load_or_generate_token(&dir).unwrap();
        let (b, src_b) = load_or_generate_token(&dir).unwrap();
        assert_eq!((src_a, src_b), (TokenSource::Generated, TokenSource::Stored));
        assert_eq!(a, b);
        assert!(!format!("{a:?}").contains(a.expose()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flags_parse() {
        assert_eq!(parse_flag("1"), Ok(true));
        assert_eq!(parse_flag("0"), Ok(false));
        assert!(parse_flag("maybe").is_err());
    }
}
