//! The README's first command, for real: the `eventra` binary serves on embedded
//! defaults with nothing configured, prints its URL and admin token, and exits 0 on
//! SIGTERM after draining.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// Kills the server if the test fails before it sends SIGTERM: no orphans.
struct Reap(Option<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn serve_on_embedded_defaults_then_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventra"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        // Nothing configured: scrub what CI exports so the embedded defaults are used.
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env_remove("REDIS_URL")
        .env_remove("EVENTRA_ADMIN_TOKEN")
        .env_remove("EVENTRA_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn eventra");
    let stdout = child.stdout.take().unwrap();
    let mut child = Reap(Some(child));
    // The first two lines are the URL and the token; the rest is JSON logs.
    let (url, token) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let url = lines.next().unwrap().unwrap();
        let token = lines.next().unwrap().unwrap();
        std::thread::spawn(move || for _ in lines {}); // keep the pipe drained
        (url, token)
    })
    .await
    .unwrap();
    let base = url.strip_prefix("Eventra listening on ").expect("url line").to_owned();
    let token = token.rsplit(": ").next().unwrap().to_owned();
    let stored = std::fs::read_to_string(dir.path().join("data/admin_token")).expect("token persisted under ./data");
    assert_eq!(stored.trim(), token);

    eventra::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    let res = crate::utils::wait_for("binary to accept requests", Duration::from_secs(30), || {
        let req = client
            .post(format!("{base}/v1/tenants"))
            .bearer_auth(&token)
            .json(&json!({"name": "Bin", "slug": "bin"}))
            .send();
        async move { req.await.ok() }
    })
    .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["tenant"]["slug"], "bin");
    assert!(dir.path().join("data/eventra.db").exists(), "SQLite database under ./data");
    // The container health check: `eventra health` against it succeeds, against a closed
    // port fails.
    let addr = base.trim_start_matches("http://").to_owned();
    let probe = |listen: String| {
        Command::new(env!("CARGO_BIN_EXE_eventra"))
            .args(["health", "--listen", &listen])
            .env_remove("EVENTRA_LISTEN")
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || probe(addr)
    })
    .await
    .unwrap());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    assert!(!tokio::task::spawn_blocking(move || probe(closed)).await.unwrap(), "a closed port is unhealthy");

    let mut server = child.0.take().unwrap();
    let pid = server.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || server.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

/// An empty variable means unset (SPEC §1): `SMTP_URL=` and friends start the embedded
/// defaults instead of failing on a "relative URL without a base".
#[tokio::test]
async fn empty_variables_mean_unset() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = crate::utils::process::Spawn::new(dir.path())
        .env("SMTP_URL", "")
        .env("AMQP_URL", "")
        .env("REDIS_URL", "")
        .env("OPENSEARCH_URL", "")
        .env("DATABASE_URL", "")
        .env("EVENTRA_ADMIN_TOKEN", "")
        .env("EVENTRA_WORKERS", "")
        .start();
    eventra::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    let ready: Value = crate::utils::wait_for("the server to be ready", Duration::from_secs(30), || {
        let req = client.get(format!("{}/health/ready", server.base)).send();
        async move { req.await.ok()?.json().await.ok() }
    })
    .await;
    assert_eq!(ready["checks"]["job_queue"]["backend"], "sqlite", "{ready}");
    assert_eq!(ready["checks"]["event_bus"]["backend"], "sqlite", "{ready}");
    assert!(server.token.starts_with("eva_"), "a generated token: {}", server.token);
    let status = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(30))).await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Runs `eventra <args>` in a scratch directory (5 minutes at most) and returns its
/// standard output, asserting it succeeded.
async fn run_command(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_eventra"))
            .args(args)
            .current_dir(dir.path())
            .env("EVENTRA_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("eventra {args:?} finished within 5 minutes"))
    .expect("the command ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The benchmark's short version (CI): `eventra bench e2e` in drain mode on the embedded
/// stack runs end to end and reports a drain rate. (Targets live in BENCHMARKS.md, not
/// here: this checks the command works, every effect included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_e2e_drain_runs_on_embedded() {
    let stdout = run_command(&["bench", "e2e", "--stack", "embedded", "--drain", "300", "--no-raw"]).await;
    let line = stdout.lines().find(|l| l.starts_with("Drain (embedded")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("300 events, every effect done"), "{line}");
    assert!(stdout.contains("Stages, last event done"), "{stdout}");
}

/// `eventra bench writes`, short (CI): wrk drives creates into one and two tenants of an
/// embedded server, with the half-rate run and the raw SQLite baseline (before and after
/// each row); every answered create is stored (the command checks it). Needs Debian's
/// `wrk` (`.ci/run` installs
/// it); without it, and outside CI, it prints NOT RUN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_writes_runs_on_embedded() {
    let has_wrk = std::process::Command::new("wrk").arg("--version").output().is_ok();
    if !has_wrk {
        assert!(!crate::utils::in_ci(), "wrk is missing on CI (Debian package `wrk`)");
        eprintln!("NOT RUN: binary::bench_writes_runs_on_embedded (no wrk)");
        return;
    }
    let stdout = run_command(&["bench", "writes", "--stack", "embedded", "--tenants", "1,2", "--seconds", "2"]).await;
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let raw: Vec<f64> = cells[2].split(", ").map(|r| r.parse().unwrap_or(0.0)).collect();
        assert!(raw.len() == 2 && raw.iter().all(|r| *r > 0.0), "the raw engine ran before and after: {row}");
        let rate: f64 = cells[3].parse().unwrap_or(0.0);
        assert!(rate > 0.0, "creates were answered: {row}");
        assert_eq!(cells[8], "0", "no non-2xx: {row}");
    }
}

/// `eventra bench ingest`, short (CI): custom events in batches and one by one into an
/// embedded server, every accepted event processed (the command waits for the
/// analytics to count them all), with the raw SQLite baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ingest_runs_on_embedded() {
    let stdout = run_command(&["bench", "ingest", "--events", "2000", "--batch", "250", "--single", "200"]).await;
    let row = stdout.lines().find(|l| l.starts_with("| Embedded |")).unwrap_or_else(|| panic!("{stdout}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(cells[2], "2000", "every event accepted once: {row}");
    assert_eq!(cells[9], "200", "every single event accepted: {row}");
    assert!(cells[12].contains("rows/s"), "the raw baseline ran: {row}");
}

/// A combination that cannot work is refused at start, with what to do: one process
/// writes an embedded index, so a second `indexer` on the same data dir is refused,
/// while an `api` process there follows the index (it starts, and searches).
#[tokio::test]
async fn a_second_indexer_on_one_embedded_index_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spawn = |roles: &str| {
        crate::utils::process::Spawn::new(dir.path())
            .env("EVENTRA_DATA_DIR", data.display().to_string())
            .env("EVENTRA_ADMIN_TOKEN", crate::utils::app::ADMIN_TOKEN)
            .env("EVENTRA_ROLES", roles)
    };
    eventra::tls::install_crypto_provider();
    // The listening line comes before the process opens its stores and index: live
    // (the tree up, serving) is when it holds the index.
    let live = |base: String| async move {
        crate::utils::wait_for("the process to serve", std::time::Duration::from_secs(60), || {
            let url = format!("{base}/health/live");
            async move { reqwest::get(url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await
    };
    let indexer = spawn("indexer").start();
    live(indexer.base.clone()).await;
    let mut follower = spawn("api").start();
    live(follower.base.clone()).await;
    for roles in ["indexer", "api,worker,indexer"] {
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventra"))
            .args(["serve", "--listen", "127.0.0.1:0", "--roles", roles])
            .current_dir(dir.path())
            .env("EVENTRA_DATA_DIR", &data)
            .env("EVENTRA_ADMIN_TOKEN", crate::utils::app::ADMIN_TOKEN)
            .env_remove("OPENSEARCH_URL")
            .env_remove("DATABASE_URL")
            .env_remove("EVENTRA_ROLES")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("{roles} must be refused at start, not serve"))
            .unwrap();
        assert!(!out.status.success(), "{roles} must be refused");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("written by another process") && text.contains("OPENSEARCH_URL"), "{roles}: {text}");
    }
    let ready = reqwest::get(format!("{}/health/live", follower.base)).await.unwrap();
    assert!(ready.status().is_success(), "the follower serves");
    assert!(follower.terminate(std::time::Duration::from_secs(30)).is_some_and(|s| s.success()));
}

/// `eventra bench auth`, short (CI): sign-ins and token checks through an embedded
/// server with cheap Argon2 parameters, and the raw argon2 and ring runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_auth_runs_on_embedded() {
    let stdout =
        run_command(&["bench", "auth", "--users", "8", "--seconds", "1", "--memory-kib", "8192", "--iterations", "1"])
            .await;
    assert!(stdout.contains("Argon2id m=8192 KiB, t=1, p=1"), "{stdout}");
    for what in ["| Eventra sign-ins", "| raw Argon2id", "| Eventra token checks", "| raw EdDSA"] {
        let row = stdout.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("{what}: {stdout}"));
        let rate: f64 = row.split('|').nth(2).map(str::trim).and_then(|c| c.parse().ok()).unwrap_or(0.0);
        assert!(rate > 0.0, "{row}");
    }
}

/// `eventra bench tenants`, short (CI): 300 tenants touched once with a limit of 100
/// managers: at most 100 run afterwards (the others were passivated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_tenants_passivates_past_the_limit() {
    let stdout = run_command(&["bench", "tenants", "--tenants", "300", "--max-managers", "100"]).await;
    let row = stdout.lines().find(|l| l.starts_with("| 300 |")).unwrap_or_else(|| panic!("{stdout}"));
    let running: usize = row.split('|').map(str::trim).nth(7).and_then(|c| c.parse().ok()).unwrap_or(usize::MAX);
    assert!((1..=100).contains(&running), "at most the limit runs: {row}");
}

/// The chaos command's short version (CI): 20 s of load, an actor killed every 100 ms
/// and a dependency restart every 5 s on private services, then the invariant check.
/// `eventra chaos` exits non-zero when an invariant fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_runs_short_and_its_invariants_hold() {
    const TEST: &str = "binary::chaos_runs_short_and_its_invariants_hold";
    if !eventra::chaos::harness::Harness::available() {
        assert!(!crate::utils::in_ci(), "{TEST}: CI=true but redis-server, PostgreSQL or RabbitMQ is not installed");
        use std::io::Write;
        let _ =
            writeln!(std::io::stderr(), "NOT RUN: {TEST}: needs redis-server, PostgreSQL server binaries and RabbitMQ");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("chaos.json");
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_eventra"))
            .args(["chaos", "--minutes", "0.34", "--fault-every-secs", "5", "--rate", "30", "--json"])
            .arg(&json)
            .env("EVENTRA_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chaos finished within 10 minutes")
    .expect("chaos ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(report["kills"].as_u64().unwrap() >= 20, "{report}");
    assert!(report["faults"].as_array().unwrap().len() >= 2, "{report}");
    assert!(report["users_acknowledged"].as_u64().unwrap() >= 50, "{report}");
    let inv = &report["invariants"];
    for must_be_zero in [
        "acknowledged_but_missing",
        "audit_missing",
        "emails_missing",
        "index_wrong",
        "parked",
        "dead_jobs",
        "cross_tenant_leaks",
    ] {
        assert_eq!(inv[must_be_zero], 0, "{must_be_zero}: {report}");
    }
    let sigkills = report["faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.as_str().is_some_and(|f| f.contains("Eventra SIGKILL")))
        .count();
    assert!(
        inv["emails_resent"].as_u64().unwrap() <= 16 * sigkills as u64,
        "resends without an Eventra SIGKILL: {report}"
    );
}

/// `docker/docker-compose.yml` is a valid compose file (`docker-compose config`, with
/// the two secrets it refuses to start without). Needs Debian's `docker-compose`
/// (`.ci/run` installs it); without it, and outside CI, it prints NOT RUN.
#[test]
fn the_compose_file_validates() {
    let compose = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/docker-compose.yml");
    let out = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .arg("config")
        .env("EVENTRA_ADMIN_TOKEN", "ci-admin-token")
        .env("EVENTRA_SECRET_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .output();
    let Ok(out) = out else {
        assert!(!crate::utils::in_ci(), "docker-compose is missing on CI (Debian package `docker-compose`)");
        eprintln!("NOT RUN: binary::the_compose_file_validates (no docker-compose)");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for service in ["api:", "relay:", "consumer:", "worker:", "postgres:", "rabbitmq:", "redis:", "opensearch:"] {
        assert!(text.lines().any(|l| l.trim() == service), "{service} in {text}");
    }
    // Without its secrets the file refuses to start rather than run with defaults.
    let bare = std::process::Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .arg("config")
        .env_remove("EVENTRA_ADMIN_TOKEN")
        .env_remove("EVENTRA_SECRET_KEY")
        .output()
        .expect("docker-compose ran once already");
    assert!(!bare.status.success(), "the admin token and secret key are mandatory");
}

/// `docker/ecs/`: one task definition per role, each running `serve` with its roles, the
/// binary's own health check and a stop timeout longer than the drain; the scaling
/// policies name the services they scale, on the signals the README gives.
#[test]
fn the_ecs_examples_are_consistent() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/ecs");
    let read = |f: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap() };
    for (file, roles) in
        [("api.json", "api"), ("relay.json", "relay"), ("consumer.json", "consumer"), ("worker.json", "worker,indexer")]
    {
        let td = read(file);
        let c = &td["containerDefinitions"][0];
        assert_eq!(c["command"], json!(["serve"]), "{file}");
        let env = c["environment"].as_array().unwrap();
        let var = |n: &str| env.iter().find(|e| e["name"] == n).map(|e| e["value"].clone());
        assert_eq!(var("EVENTRA_ROLES"), Some(json!(roles)), "{file}");
        for role in roles.split(',') {
            assert!(eventra::config::ROLES.contains(&role), "{file}: {role}");
        }
        assert_eq!(c["healthCheck"]["command"], json!(["CMD", "/usr/local/bin/eventra", "health"]), "{file}");
        assert!(c["stopTimeout"].as_u64().unwrap() >= 35, "{file}");
        let secrets: Vec<&str> = c["secrets"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
        for s in ["DATABASE_URL", "AMQP_URL", "REDIS_URL", "EVENTRA_ADMIN_TOKEN", "EVENTRA_SECRET_KEY"] {
            assert!(secrets.contains(&s), "{file}: secret {s}");
        }
    }
    for (file, service) in [
        ("scaling-api.json", "eventra-api"),
        ("scaling-consumer.json", "eventra-consumer"),
        ("scaling-worker.json", "eventra-worker"),
    ] {
        let p = read(file);
        assert_eq!(p["ResourceId"], format!("service/eventra/{service}"), "{file}");
        assert_eq!(p["PolicyType"], "TargetTrackingScaling");
    }
    assert_eq!(
        read("scaling-worker.json")["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
            ["MetricName"],
        "effect_lag_seconds"
    );
}
