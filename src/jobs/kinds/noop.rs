//! `noop`: does nothing. For benchmarks and for checking a deployment's workers end to
//! end; `{"sleep_ms": n}` makes it take `n` ms (at most a minute), like a slow job.

use std::time::Duration;

use async_trait::async_trait;

use super::{JobFailure, JobKind};
use crate::jobs::Job;

pub struct Noop;

#[async_trait]
impl JobKind for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }

    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        if let Some(ms) = job.args.get("sleep_ms").and_then(|v| v.as_u64()) {
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        }
        Ok(())
    }
}
