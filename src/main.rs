//! The `eventra` binary: `serve` and `migrate`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use eventra::config::{Config, DataArgs, ServeArgs, TokenSource};
use eventra::{app, store, telemetry};

/// mimalloc: the pipeline allocates and frees a great deal (JSON at every hop), and
/// glibc's allocator showed as a quarter of the server's CPU samples under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "eventra", version, about = "Event-driven, multi-tenant user management")]
struct Cli {
    /// Log human-readable lines instead of JSON.
    #[arg(long, global = true, env = "EVENTRA_LOG_PRETTY", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pretty_logs: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (all roles by default).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DataArgs),
    /// Rebuild the search index from the database (stop the server first).
    Reindex {
        #[command(flatten)]
        data: DataArgs,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<uuid::Uuid>,
        /// Rebuild this OpenSearch cluster's indices instead of the embedded index.
        #[arg(long, env = "OPENSEARCH_URL", hide_env_values = true)]
        opensearch_url: Option<String>,
        /// Prefix of the OpenSearch index names.
        #[arg(long, env = "EVENTRA_NAMESPACE", default_value = "eventra")]
        namespace: String,
    },
    /// Probes a running server's readiness (for container health checks: the runtime
    /// image has no curl): exit 0 when `/health/ready` answers 2xx within 2 s.
    Health {
        /// The server's address, as it was given to `serve` (port taken from it; an
        /// unspecified host means this host).
        #[arg(long, env = "EVENTRA_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// `ready` (load balancers) or `live` (restart only a stuck process).
        #[arg(long, default_value = "ready", value_parser = ["ready", "live"])]
        check: String,
    },
    /// Benchmarks against the raw engines (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(Bench),
    /// Load, actor kills and dependency restarts on private services, then an invariant
    /// check (see RELIABILITY.md).
    Chaos(eventra::chaos::ChaosArgs),
}

#[derive(Subcommand)]
enum Bench {
    /// No-op jobs/s: Eventra's Redis queue and workers vs raw Redis vs Sidekiq.
    Jobs(eventra::bench::jobs::JobsBenchArgs),
    /// Commit → last effect done, and events/s, through the whole pipeline (load at
    /// fixed rates, or a full outbox drained), beside the raw engines.
    E2e(eventra::bench::e2e::E2eBenchArgs),
    /// Creates/s into one tenant and into many through the HTTP API (wrk), p99 at half
    /// that rate, beside pgbench (or SQLite) doing the same INSERTs one transaction each.
    Writes(eventra::bench::writes::WritesBenchArgs),
    /// Resident memory with many tenants touched once (managers started, passivated
    /// past the limit).
    Tenants(eventra::bench::tenants::TenantsBenchArgs),
    /// Webhook deliveries/s to a local receiver (and with a dead endpoint beside), vs a
    /// raw reqwest POST loop.
    Webhooks(eventra::bench::webhooks::WebhooksBenchArgs),
    /// Custom events accepted/s (batches and single) and processed/s, vs the raw engine inserting the same rows
    Ingest(eventra::bench::ingest::IngestBenchArgs),
    /// Sign-ins/s (Argon2id at the server's parameters) and access-token checks/s
    /// through the API, vs raw argon2 and ring in this process.
    Auth(eventra::bench::auth::AuthBenchArgs),
    /// User search latency (embedded): the HTTP API vs the index in-process.
    Search(eventra::bench::search::SearchBenchArgs),
    /// `reindex` throughput and an identical result set, vs raw reads and raw tantivy.
    Reindex(eventra::bench::search::ReindexBenchArgs),
}

/// Variables outside the `EVENTRA_` prefix that configure Eventra.
const SERVICE_VARIABLES: &[&str] = &["DATABASE_URL", "AMQP_URL", "REDIS_URL", "OPENSEARCH_URL", "SMTP_URL"];

/// SPEC §1: an empty value means unset. Done before flags are parsed (while the process
/// has one thread), so every flag falls back to its default or stays unset.
fn drop_empty_variables() {
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(k, v)| {
            v.is_empty() && k.to_str().is_some_and(|k| k.starts_with("EVENTRA_") || SERVICE_VARIABLES.contains(&k))
        })
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}

/// glibc gives every thread that allocates its own arena (up to 8 per core), and freed
/// memory stays in the arena it came from: with the runtime's, the database's and the
/// index's threads all allocating, resident memory grows several times over what is in
/// use. Two arenas keep it close to the live heap at no measurable cost here.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    drop_empty_variables();
    let cli = Cli::parse();
    // `serve` logs to stdout (twelve-factor); every other command keeps it for its output.
    telemetry::init(!cli.pretty_logs, !matches!(cli.command, Command::Serve(_)));
    eventra::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Health { listen, check } => health(listen, &check).await,
            Command::Reindex { data, tenant, opensearch_url, namespace } => {
                reindex(data, tenant, opensearch_url, namespace).await
            }
            Command::Bench(Bench::Search(args)) => {
                let rows = eventra::bench::search::search(args).await?;
                println!("{}", eventra::bench::search::table(&rows));
                Ok(())
            }
            Command::Bench(Bench::Reindex(args)) => {
                let rows = eventra::bench::search::reindex_bench(args).await?;
                println!("{}", eventra::bench::search::table(&rows));
                Ok(())
            }
            Command::Chaos(args) => {
                let report = eventra::chaos::run(args).await?;
                println!("{}", eventra::chaos::summary(&report));
                if report.invariants.hold() {
                    Ok(())
                } else {
                    Err("invariants violated".to_owned())
                }
            }
            Command::Bench(Bench::Auth(args)) => {
                let report = eventra::bench::auth::run(args).await?;
                println!("{}", eventra::bench::auth::table(&report));
                Ok(())
            }
            Command::Bench(Bench::Ingest(args)) => {
                let report = eventra::bench::ingest::run(args).await?;
                println!("{}", eventra::bench::ingest::table(&report));
                Ok(())
            }
            Command::Bench(Bench::Webhooks(args)) => {
                let report = eventra::bench::webhooks::run(args).await?;
                println!("{}", eventra::bench::webhooks::table(&report));
                Ok(())
            }
            Command::Bench(Bench::Tenants(args)) => {
                let report = eventra::bench::tenants::run(args).await?;
                println!("{}", eventra::bench::tenants::table(&report));
                Ok(())
            }
            Command::Bench(Bench::Writes(args)) => {
                let report = eventra::bench::writes::run(args).await?;
                println!("{}", eventra::bench::writes::table(&report));
                Ok(())
            }
            Command::Bench(Bench::E2e(args)) => {
                let report = eventra::bench::e2e::run(args).await?;
                println!("{}", eventra::bench::e2e::tables(&report));
                Ok(())
            }
            Command::Bench(Bench::Jobs(args)) => {
                let rows = eventra::bench::jobs::run(args).await?;
                println!("{}", eventra::bench::jobs::table(&rows));
                Ok(())
            }
        }
    });
    // Tasks still running (a blocking index commit, a client's reconnect loop) get a
    // moment, then the process exits: shutdown is bounded whatever is down.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let config = Config::from_args(args).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("Eventra listening on http://{addr}");
    match config.admin_token_source {
        TokenSource::Configured => println!("Admin token: from EVENTRA_ADMIN_TOKEN"),
        source => {
            let note = if source == TokenSource::Generated { "generated" } else { "stored" };
            println!(
                "Admin token ({note}, in {}): {}",
                config.data_dir.join("admin_token").display(),
                config.admin_token.expose()
            );
        }
    }
    app::run(Arc::new(config), listener, app::shutdown_signal()).await.map_err(|e| e.to_string())
}

async fn reindex(
    args: DataArgs,
    tenant: Option<uuid::Uuid>,
    opensearch_url: Option<String>,
    namespace: String,
) -> Result<(), String> {
    let url = args.database_url();
    let store = store::connect(&url, 4).await.map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    let index = eventra::search::open(opensearch_url.as_deref(), &namespace, &args.data_dir, true)
        .await
        .map_err(|e| format!("{e} (stop the process with the indexer role on this data dir first)"))?;
    let done = eventra::search::reindex::reindex(&store, &index, tenant, true).await?;
    println!(
        "reindexed {} users and {} audit entries of {} tenants into {} in {:.1} s ({:.0} users/s)",
        done.users,
        done.audit_entries,
        done.tenants,
        index.backend(),
        done.elapsed.as_secs_f64(),
        done.users as f64 / done.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

async fn migrate(args: DataArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.data_dir).map_err(|e| format!("cannot create {}: {e}", args.data_dir.display()))?;
    let url = args.database_url();
    let s = store::connect(&url, 2).await.map_err(|e| e.to_string())?;
    s.migrate().await.map_err(|e| e.to_string())?;
    println!("migrations applied to {}", store::redact_url(&url));
    Ok(())
}

/// `eventra health`: GET `/health/<check>` on this host's server, 2 s at most.
async fn health(listen: std::net::SocketAddr, check: &str) -> Result<(), String> {
    let host = if listen.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { listen.ip() };
    let url = format!("http://{}/health/{check}", std::net::SocketAddr::new(host, listen.port()));
    eventra::tls::install_crypto_provider();
    let client =
        reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build().map_err(|e| e.to_string())?;
    let res = client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url}: {}", res.status()))
    }
}
