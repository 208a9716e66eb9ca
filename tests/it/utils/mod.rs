//! Test support: per-test databases, in-process servers on random ports, an HTTP
//! client, and waiting on conditions with a deadline.

pub mod app;
pub mod db;
pub mod process;

pub use app::TestApp;

pub use db::TestDb;
use eventra::domain::EventType;
use eventra::store::Store;

use std::future::Future;
use std::time::{Duration, Instant};

/// Waits until `check` yields `Some`, polling; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when running under CI, where every service must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// The URL of an external service from `var`, or `None` (with a NOT RUN line) when it
/// is unset outside CI. In CI a missing service fails the test.
pub fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(!in_ci(), "{test}: CI=true but {var} is not set");
            // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOT RUN: {test}: set {var} to run it");
            None
        }
    }
}

/// A private `redis-server` (AOF always) a test may crash, or `None` (with a NOT RUN
/// line) when `redis-server` is not installed outside CI; in CI it must be.
pub fn private_redis(test: &str) -> Option<eventra::chaos::services::PrivateRedis> {
    use eventra::chaos::services::PrivateRedis;
    if !PrivateRedis::available() {
        assert!(!in_ci(), "{test}: CI=true but redis-server is not installed");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "NOT RUN: {test}: needs redis-server on the PATH");
        return None;
    }
    Some(PrivateRedis::start().unwrap_or_else(|e| panic!("{test}: {e}")))
}

/// How many events of `kind` a store's outbox holds (test databases are small).
pub async fn outbox_count(store: &dyn Store, kind: EventType) -> usize {
    store.outbox_after(0, 100_000).await.expect("read the outbox").iter().filter(|r| r.event.event_type == kind).count()
}

/// A test's unique Redis namespace (`et-<uuid>`, short enough for `EVENTRA_NAMESPACE`), whose keys are deleted when
/// the test ends, passed or not.
pub struct RedisNamespace {
    pub url: String,
    pub ns: String,
}

impl RedisNamespace {
    pub fn new(url: &str) -> Self {
        RedisNamespace { url: url.to_owned(), ns: format!("et-{}", uuid::Uuid::now_v7().simple()) }
    }
}

impl Drop for RedisNamespace {
    fn drop(&mut self) {
        delete_redis_namespace(&self.url, &self.ns);
    }
}

/// Deletes every Redis key under `namespace` (a test's unique prefix). Runs on its own
/// thread and runtime so it can be called from `Drop`.
pub fn delete_redis_namespace(url: &str, namespace: &str) {
    let (url, pattern) = (url.to_owned(), format!("{namespace}:*"));
    let _ = std::thread::spawn(move || {
        use fred::prelude::*;
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let Ok(config) = Config::from_url(&url) else { return };
            let Ok(client) = Builder::from_config(config).build() else { return };
            if client.init().await.is_ok() {
                let script = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0";
                let _: Result<i64, _> = client.eval(script, Vec::<String>::new(), vec![pattern]).await;
            }
        });
    })
    .join();
}

/// Makes RabbitMQ close every connection whose name contains `needle` (the bus names
/// its connections after its namespace), as a broker restart or network cut would.
/// Returns how many it closed.
pub fn close_rabbitmq_connections(needle: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "name", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl list_connections");
    let listing = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<String> = listing
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for pid in &pids {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "eventra test: connection cut"])
            .output()
            .expect("rabbitmqctl close_connection");
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    }
    pids.len()
}

/// The node named `name` in a `/debug/actors` tree, if any.
pub fn find_actor<'a>(node: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    if node["name"] == name {
        return Some(node);
    }
    node["children"].as_array()?.iter().find_map(|c| find_actor(c, name))
}
