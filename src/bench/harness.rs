//! What the benchmarks share: a run's scratch space and servers (this binary's `serve`
//! as a child process on the chosen stack), tenants made through the API, and the raw
//! engines' baselines (pgbench, SQLite) doing the same inserts as the API.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::jobs::QueueConfig;
use crate::store::Store;

pub type BenchResult<T> = Result<T, String>;

pub fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stack {
    /// SQLite, the embedded bus and job queue, tantivy, `.eml` files: `serve` with nothing set.
    Embedded,
    /// PostgreSQL, RabbitMQ and Redis (tantivy and `.eml` files, or `--smtp-url`).
    Services,
}

/// Where the services are (used on the services stack): the benches' shared flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceUrls {
    /// An admin connection: each run creates and drops its own database beside it.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
}

/// One benchmark run's scratch space: a data dir, a namespace, an admin token, and (on
/// services) its own PostgreSQL database, broker topology and Redis keys.
pub struct Run {
    pub stack: Stack,
    pub urls: ServiceUrls,
    pub smtp_url: Option<String>,
    pub dir: PathBuf,
    pub ns: String,
    pub token: String,
}

impl Run {
    pub fn new(stack: Stack, urls: ServiceUrls, smtp_url: Option<String>) -> BenchResult<Self> {
        let ns = format!("bench-{}", &Uuid::now_v7().simple().to_string()[20..]);
        let dir = std::env::temp_dir().join(format!("eventra-{ns}"));
        std::fs::create_dir_all(&dir).map_err(err)?;
        Ok(Run { stack, urls, smtp_url, dir, ns, token: format!("bench-{}", Uuid::new_v4().simple()) })
    }

    /// The database the server uses (the embedded file, or a fresh PostgreSQL database).
    pub fn database_url(&self) -> String {
        match self.stack {
            Stack::Embedded => crate::config::default_sqlite_url(&self.dir.join("data")),
            Stack::Services => crate::store::with_database(&self.urls.database_url, &self.db_name()),
        }
    }

    /// The bench's own PostgreSQL database (services), created by [`prepare`].
    ///
    /// [`prepare`]: Run::prepare
    pub fn db_name(&self) -> String {
        format!("eventra_{}", self.ns.replace('-', "_"))
    }

    /// Starts this binary's `serve` with `roles` (and `env` on top) on a loopback port.
    /// Every process of a run shares its data dir: with embedded search the one with
    /// `indexer` writes the index and `api` processes follow it.
    pub fn spawn(&self, roles: &str, env: &[(&str, String)]) -> BenchResult<Server> {
        let exe = std::env::current_exe().map_err(err)?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(&self.dir)
            .env("EVENTRA_DATA_DIR", self.dir.join("data"))
            .env("EVENTRA_ADMIN_TOKEN", &self.token)
            .env("EVENTRA_NAMESPACE", &self.ns)
            .env("EVENTRA_ROLES", roles)
            .env("EVENTRA_LOG", "warn")
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .env_remove("REDIS_URL")
            .env_remove("OPENSEARCH_URL")
            .env_remove("SMTP_URL");
        if self.stack == Stack::Services {
            cmd.env("DATABASE_URL", self.database_url())
                .env("AMQP_URL", &self.urls.amqp_url)
                .env("REDIS_URL", &self.urls.redis_url);
        }
        if let Some(smtp) = &self.smtp_url {
            cmd.env("SMTP_URL", smtp);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log")).map_err(err)?;
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().map_err(err)?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let log_path = self.dir.join("server.log");
        std::thread::spawn(move || {
            use std::io::Write;
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            let mut f = std::fs::OpenOptions::new().append(true).open(log_path).ok();
            for line in lines.map_while(Result::ok) {
                if let Some(f) = f.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .ok()
            .flatten()
            .ok_or_else(|| format!("the server did not start; see {}", self.dir.join("server.log").display()))?;
        let base = first.strip_prefix("Eventra listening on ").ok_or("unexpected first line")?.to_owned();
        Ok(Server { child, base, roles: roles.to_owned() })
    }

    pub async fn store(&self) -> BenchResult<Arc<dyn Store>> {
        crate::store::connect(&self.database_url(), 4).await.map_err(err)
    }

    /// A fresh database for the services stack (so every run starts empty).
    pub async fn prepare(&self) -> BenchResult<()> {
        if self.stack == Stack::Services {
            let name = self.db_name();
            let admin = crate::store::PgStore::connect(&self.urls.database_url, 1).await.map_err(err)?;
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(admin.pool()).await.map_err(err)?;
            admin.pool().close().await;
        }
        Ok(())
    }

    pub async fn cleanup(&self) {
        if self.stack == Stack::Services {
            if let Ok(bus) =
                crate::bus::RabbitBus::connect(&self.urls.amqp_url, &self.ns, crate::bus::BusConfig::default()).await
            {
                let _ = bus.delete_topology().await;
            }
            if let Ok(admin) = crate::store::PgStore::connect(&self.urls.database_url, 1).await {
                let name = self.db_name();
                let _ =
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(admin.pool()).await;
            }
            if let Ok(q) =
                crate::jobs::RedisJobQueue::connect(&self.urls.redis_url, &self.ns, QueueConfig::default()).await
            {
                let _ = q.delete_namespace().await;
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An `eventra serve` child process.
pub struct Server {
    child: Child,
    pub base: String,
    pub roles: String,
}

impl Server {
    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        Some(stat_cpu(&stat)?.1)
    }

    /// Its roles, CPU seconds and resident memory (MB), for a report.
    pub fn usage(&self) -> (String, f64, f64) {
        let rss = self.rss_kb().map_or(0.0, |(rss, _)| rss as f64 / 1024.0);
        (self.roles.clone(), self.cpu_secs().unwrap_or(0.0), rss)
    }

    /// Resident memory now and at its peak (VmRSS, VmHWM), in KiB.
    pub fn rss_kb(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field =
            |name: &str| status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok();
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> BenchResult<()> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().map_err(err)?;
        if !status.success() {
            return Err(format!("the server exited with {status}"));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU seconds a `/proc/<pid>/stat` line reports (user + system), and the command.
fn stat_cpu(stat: &str) -> Option<(String, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (user, system): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // Clock ticks of USER_HZ: 100 on every Linux architecture we run on.
    Some((comm, (user + system) / 100.0))
}

/// The engines whose CPU time a benchmark reports beside its own processes'.
const ENGINES: [(&str, &str); 3] = [("postgres", "PostgreSQL"), ("beam.smp", "RabbitMQ"), ("redis-server", "Redis")];

/// CPU seconds used so far by the engines on this host (each summed over its
/// processes) and by this benchmark process (its load generator and SMTP sink).
pub fn engines_cpu() -> Vec<(String, f64)> {
    let mut totals: Vec<(String, f64)> = ENGINES.iter().map(|(_, name)| (name.to_string(), 0.0)).collect();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((comm, secs)) = stat_cpu(&stat) else { continue };
        if let Some(i) = ENGINES.iter().position(|(c, _)| *c == comm) {
            totals[i].1 += secs;
        }
    }
    let own = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| stat_cpu(&s)).map_or(0.0, |(_, s)| s);
    totals.push(("this benchmark (load, SMTP sink)".into(), own));
    totals
}

/// What each engine used between two [`engines_cpu`] readings.
pub fn cpu_between(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    after.iter().zip(before).map(|((name, a), (_, b))| (name.clone(), (a - b).max(0.0))).collect()
}

/// A tenant made for one run: its id and admin key.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: Uuid,
    pub key: String,
}

/// Creates a user of `tenant` through the API (`body`: the create's JSON).
pub async fn create_user(
    client: &reqwest::Client,
    base: &str,
    tenant: &Tenant,
    body: serde_json::Value,
) -> BenchResult<()> {
    let res = client
        .post(format!("{base}/v1/tenants/{}/users", tenant.id))
        .bearer_auth(&tenant.key)
        .json(&body)
        .send()
        .await
        .map_err(err)?;
    if res.status() != reqwest::StatusCode::CREATED {
        return Err(format!("create user: {}", res.status()));
    }
    Ok(())
}

pub async fn new_tenant(client: &reqwest::Client, base: &str, token: &str, label: &str) -> BenchResult<Tenant> {
    let slug = format!("bench-{label}-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let res: serde_json::Value = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(token)
        .json(&json!({"name": slug, "slug": slug}))
        .send()
        .await
        .map_err(err)?
        .json()
        .await
        .map_err(err)?;
    Ok(Tenant {
        id: res["tenant"]["id"].as_str().and_then(|s| s.parse().ok()).ok_or("no tenant id")?,
        key: res["api_key"]["key"].as_str().ok_or("no key")?.to_owned(),
    })
}

/// pgbench, `clients` clients for `seconds`, each transaction one user INSERT and one outbox INSERT
/// into the project's own schema (its indexes and the outbox NOTIFY trigger).
pub async fn raw_pgbench(admin_url: &str, clients: usize, seconds: u64) -> BenchResult<(String, f64, String)> {
    let name = format!("eventra_rawpg_{}", &Uuid::now_v7().simple().to_string()[20..]);
    let admin = crate::store::PgStore::connect(admin_url, 1).await.map_err(err)?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(admin.pool()).await.map_err(err)?;
    let url = crate::store::with_database(admin_url, &name);
    let result = async {
        let store = crate::store::PgStore::connect(&url, 2).await.map_err(err)?;
        Store::migrate(&store).await.map_err(err)?;
        sqlx::query("INSERT INTO tenants (id, slug, name, max_users, user_count, event_seq, created_at, updated_at) VALUES ('00000000-0000-7000-8000-000000000001', 'raw', 'Raw', 0, 0, 0, now(), now())")
            .execute(store.pool())
            .await
            .map_err(err)?;
        store.pool().close().await;
        let (_, event) = sample_rows(1).pop().ok_or("no sample")?;
        let payload = serde_json::to_string(&event).map_err(err)?.replace('\'', "''");
        let script = format!(
            "\\set n random(1, 100000000)\n\
             BEGIN;\n\
             INSERT INTO users (id, tenant_id, email, email_normalized, name, status, email_verified, attributes, version, created_at, updated_at) \
             VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', 'u' || :n || '-' || :client_id || '@raw.example', 'u' || :n || '-' || :client_id || '@raw.example', 'Raw User', 'active', false, '{{}}', 1, now(), now()) ON CONFLICT DO NOTHING;\n\
             INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) \
             VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000001', :n::bigint * 100 + :client_id, 'user.created', '{payload}', now()) ON CONFLICT DO NOTHING;\n\
             END;\n"
        );
        let tps = pgbench_tps(&url, &script, clients, seconds).await?;
        Ok((
            format!("pgbench: INSERT user + INSERT outbox row, one transaction each, {clients} clients"),
            tps,
            "transactions/s".to_owned(),
        ))
    }
    .await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(admin.pool()).await;
    result
}

/// Runs pgbench with `script` (one transaction) against `url`: transactions per second.
pub async fn pgbench_tps(url: &str, script: &str, clients: usize, seconds: u64) -> BenchResult<f64> {
    let script_path = std::env::temp_dir().join(format!("eventra-pgbench-{}.sql", Uuid::now_v7().simple()));
    std::fs::write(&script_path, script).map_err(err)?;
    let pgbench =
        find_pgbench().ok_or("pgbench not found (Debian: postgresql-15 has /usr/lib/postgresql/15/bin/pgbench)")?;
    let out = tokio::process::Command::new(pgbench)
        .args(["-n", "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(&script_path)
        .arg(url)
        .output()
        .await
        .map_err(err);
    let _ = std::fs::remove_file(&script_path);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("pgbench said: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

pub fn find_pgbench() -> Option<PathBuf> {
    if Command::new("pgbench").arg("--version").stdout(Stdio::null()).status().is_ok() {
        return Some(PathBuf::from("pgbench"));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pgbench")))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// SQLite doing the API's inserts: the same user and outbox rows, one transaction
/// each, on one connection (the embedded store's one writer); rows per second.
pub async fn raw_sqlite_inserts(dir: &Path, n: usize) -> BenchResult<f64> {
    let rows = sample_rows(n);
    let url = format!("sqlite://{}", dir.join("raw.db").display());
    let store = crate::store::SqliteStore::connect(&url, 1).await.map_err(err)?;
    Store::migrate(&store).await.map_err(err)?;
    let writer = store.pools().write;
    let tenant = rows.first().map(|(u, _)| u.tenant_id).unwrap_or_default();
    sqlx::query("INSERT INTO tenants (id, slug, name, max_users, user_count, event_seq, created_at, updated_at) VALUES ($1, 'raw', 'Raw', 0, 0, 0, $2, $2)")
        .bind(tenant)
        .bind(crate::domain::now())
        .execute(&writer)
        .await
        .map_err(err)?;
    let started = Instant::now();
    for (i, (u, e)) in rows.iter().enumerate() {
        let mut tx = writer.begin().await.map_err(err)?;
        sqlx::query("INSERT INTO users (id, tenant_id, email, email_normalized, name, status, email_verified, attributes, version, created_at, updated_at) VALUES ($1, $2, $3, $3, $4, 'active', 0, '{}', 1, $5, $5)")
            .bind(u.id)
            .bind(u.tenant_id)
            .bind(&u.email)
            .bind(&u.name)
            .bind(u.created_at)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) VALUES ($1, $2, $3, 'user.created', $4, $5)")
            .bind(e.id)
            .bind(e.tenantid)
            .bind(i as i64 + 1)
            .bind(sqlx::types::Json(e))
            .bind(u.created_at)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
    }
    let rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    store.pools().write.close().await;
    Ok(rate)
}

/// `n` users of one made-up tenant with their `user.created` events.
pub fn sample_rows(n: usize) -> Vec<(crate::domain::User, crate::domain::DomainEvent)> {
    let tenant = Uuid::now_v7();
    (0..n)
        .filter_map(|i| {
            let input =
                serde_json::from_value(json!({"email": format!("u{i}@raw.example"), "name": format!("Raw User {i}")}))
                    .ok()?;
            let user = crate::domain::NewUser::parse(tenant, input, crate::domain::now()).ok()?.0;
            let event = crate::domain::DomainEvent::user_created(&user, &crate::domain::EventContext::system("raw"));
            Some((user, event))
        })
        .collect()
}
