//! `eventra bench …`: benchmarks that drive Eventra's real components and, in the
//! same run, the raw engines (and reference systems) doing the same work, so every
//! figure comes with its baseline. Results go to BENCHMARKS.md with the command.

pub mod auth;
pub mod e2e;
pub mod harness;
pub mod ingest;
pub mod jobs;
pub mod raw;
pub mod search;
pub mod tenants;
pub mod webhooks;
pub mod writes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;

/// A server run in the benchmark's own process on a loopback port, with an HTTP client.
pub struct InProcessServer {
    pub base: String,
    pub client: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crate::app::StartupError>>,
}

impl InProcessServer {
    /// Starts `app::run` with `config` and waits (up to 60 s) until it answers.
    pub async fn start(config: Arc<Config>) -> Result<Self, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let base = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::app::run(config, listener, async {
            let _ = stopped.await;
        }));
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let ready_by = Instant::now() + Duration::from_secs(60);
        while client.get(format!("{base}/health/live")).send().await.is_err() {
            if Instant::now() > ready_by {
                return Err("the server did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(InProcessServer { base, client, stop, task })
    }

    /// Stops it gracefully and returns how the server ended.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        self.task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }
}
