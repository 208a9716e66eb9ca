//! A job worker: one of the `job-worker-N` actors under `jobs`. It runs one job per
//! `Poll` message and sends itself the next (at once after a job, after the idle wait
//! when the queues are empty), so its mailbox stays responsive to stop (which waits for
//! the batch in hand: draining on shutdown, after `Runner::drain` stopped new fetches) and to kill (which drops it mid-job; the
//! reaper returns that job once its lease lapses).
//!
//! Queue errors (Redis down…) do not crash the worker: it backs off and tries again,
//! so an outage does not burn the supervisor's restart intensity and take the process
//! down with it. Handler failures never reach the actor at all (see `jobs::runner`).

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::jobs::runner::SharedRunner;
use crate::supervision::spec::Backoff;

// Messages

pub enum JobWorkerMsg {
    /// Look for a job and run it.
    Poll,
}

// State

pub struct JobWorkerArgs {
    pub runner: SharedRunner,
    /// The tree name, also the worker name recorded on leased jobs.
    pub name: String,
}

pub struct JobWorkerState {
    runner: SharedRunner,
    name: String,
    /// Consecutive queue errors, for the backoff.
    errors: u32,
}

/// Backoff after queue errors: 100 ms doubling to 5 s, ±20 %.
const ERROR_BACKOFF: Backoff =
    Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5), jitter: 0.2 };

// Handling

pub struct JobWorker;

impl Actor for JobWorker {
    type Msg = JobWorkerMsg;
    type State = JobWorkerState;
    type Arguments = JobWorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(JobWorkerMsg::Poll)?;
        Ok(JobWorkerState { runner: args.runner, name: args.name, errors: 0 })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        JobWorkerMsg::Poll: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match state.runner.run_next(&state.name).await {
            Ok(true) => {
                state.errors = 0;
                myself.send_message(JobWorkerMsg::Poll)?;
            }
            Ok(false) => {
                // Wait outside the handler, so a stop is not held up by an idle worker.
                state.errors = 0;
                let runner = state.runner.clone();
                tokio::spawn(async move {
                    runner.idle().await;
                    let _ = myself.send_message(JobWorkerMsg::Poll);
                });
            }
            Err(e) => {
                state.errors = state.errors.saturating_add(1);
                let delay = ERROR_BACKOFF.delay(state.errors, rand::random::<f64>());
                tracing::warn!(worker = %state.name, error = %e, retry_in = ?delay, "job queue unavailable");
                myself.send_after(delay, || JobWorkerMsg::Poll);
            }
        }
        Ok(())
    }
}
