//! An Eventra server running in-process on a random port, and a client for it.

use std::sync::Arc;
use std::time::Duration;

use eventra::config::Config;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    /// The configuration the server runs with.
    #[allow(dead_code)]
    pub config: Arc<Config>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), eventra::app::StartupError>>>,
    _data_dir: tempfile::TempDir,
}

/// A tenant made for a test: its id and admin key.
pub struct TestTenant {
    pub id: Uuid,
    pub admin_key: String,
}

impl TestApp {
    /// A server on `database_url` (embedded data dir in a temp folder).
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(database_url, |_| {}).await
    }

    pub async fn start_with(database_url: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_kinds(database_url, eventra::jobs::Kinds::default(), tweak).await
    }

    /// [`start_with`](Self::start_with), with extra job kinds beside the standard ones.
    pub async fn start_with_kinds(
        database_url: &str,
        kinds: eventra::jobs::Kinds,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::embedded(dir.path(), ADMIN_TOKEN);
        config.database_url = database_url.to_owned();
        // Tests run in parallel against one PostgreSQL (max_connections = 100).
        config.db_max_connections = 6;
        // Few workers, a fast scheduler and short leases: the real code paths, quickly.
        config.jobs.workers = 2;
        config.jobs.poll = Duration::from_millis(20);
        config.jobs.lease = Duration::from_millis(1500);
        config.pipeline.consumers = 1;
        config.pipeline.relay_poll = Duration::from_millis(100);
        tweak(&mut config);
        let config = Arc::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(eventra::app::run_with(
            config.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
            kinds,
        ));
        eventra::tls::install_crypto_provider();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let app = TestApp { base, client, config, stop: Some(stop), task: Some(task), _data_dir: dir };
        let url = format!("{}/health/live", app.base);
        super::wait_for("server to answer /health/live", Duration::from_secs(30), || {
            let c = app.client.clone();
            let url = url.clone();
            async move { c.get(&url).send().await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
        app
    }

    /// Starts the graceful shutdown (SIGTERM's effect) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Stops the server (graceful shutdown) and returns what `run` returned.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(30), t).await.expect("server stops in time");
            r.expect("server task").expect("server exits cleanly");
        }
    }

    /// Waits for the server to exit by itself and returns what `run` returned.
    pub async fn exited(mut self) -> Result<(), eventra::app::StartupError> {
        let t = self.task.take().expect("server task");
        tokio::time::timeout(Duration::from_secs(30), t).await.expect("server exits in time").expect("server task")
    }

    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut r = self.client.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.req(Method::GET, path, Some(token)).send().await.expect("GET")
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.req(Method::POST, path, Some(token)).json(&body).send().await.expect("POST")
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> Response {
        self.req(Method::PATCH, path, Some(token)).json(&body).send().await.expect("PATCH")
    }

    pub async fn delete(&self, path: &str, token: &str) -> Response {
        self.req(Method::DELETE, path, Some(token)).send().await.expect("DELETE")
    }

    /// Creates a tenant through the API.
    pub async fn tenant(&self, slug_prefix: &str, max_users: u32) -> TestTenant {
        let slug = format!("{slug_prefix}-{}", &Uuid::now_v7().simple().to_string()[20..]);
        let res =
            self.post("/v1/tenants", ADMIN_TOKEN, json!({"name": slug, "slug": slug, "max_users": max_users})).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let body: Value = res.json().await.expect("json");
        TestTenant {
            id: body["tenant"]["id"].as_str().and_then(|s| s.parse().ok()).expect("tenant id"),
            admin_key: body["api_key"]["key"].as_str().expect("key").to_owned(),
        }
    }

    /// Mints a key with `role` for a tenant.
    pub async fn key(&self, tenant: &TestTenant, role: &str) -> String {
        let res =
            self.post(&format!("/v1/tenants/{}/api-keys", tenant.id), &tenant.admin_key, json!({"role": role})).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let body: Value = res.json().await.expect("json");
        body["key"].as_str().expect("key").to_owned()
    }

    /// Creates a user and returns its JSON.
    pub async fn user(&self, tenant: &TestTenant, email: &str) -> Value {
        let res = self
            .post(
                &format!("/v1/tenants/{}/users", tenant.id),
                &tenant.admin_key,
                json!({"email": email, "name": "Test User"}),
            )
            .await;
        assert_eq!(res.status(), StatusCode::CREATED, "create {email}");
        res.json().await.expect("json")
    }
}

/// Asserts a problem+json answer with `status` and returns its body.
pub async fn expect_problem(res: Response, status: StatusCode) -> Value {
    assert_eq!(res.status(), status, "status of {}", res.url());
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(ct, "application/problem+json", "content type of a {status} answer");
    let body: Value = res.json().await.expect("problem body");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().is_some_and(|t| t.starts_with("urn:eventra:problem:")));
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "problem has a detail");
    body
}
