//! A periodic task as an actor: the job scheduler (`job-scheduler`: due scheduled and
//! retrying jobs become ready) and the reaper (`job-reaper`: jobs whose lease lapsed go
//! back to their queue) are both this actor with a different task.
//!
//! A failing task is logged and tried again next tick, never a crash: the backend being
//! down is not a bug in the actor, and restarting it would not help.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

// Messages

pub enum PeriodicMsg {
    Tick,
}

// State

/// One run of the task: how many items it handled, or why it could not.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>;
pub type Task = Arc<dyn Fn() -> TaskFuture + Send + Sync>;

pub struct PeriodicArgs {
    /// The tree name, for logs.
    pub name: String,
    pub every: Duration,
    pub task: Task,
}

// Handling

pub struct Periodic;

impl Actor for Periodic {
    type Msg = PeriodicMsg;
    type State = PeriodicArgs;
    type Arguments = PeriodicArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(PeriodicMsg::Tick)?;
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        PeriodicMsg::Tick: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match (state.task)().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(actor = %state.name, handled = n, "periodic task"),
            Err(e) => tracing::warn!(actor = %state.name, error = %e, "periodic task failed; trying again next tick"),
        }
        myself.send_after(state.every, || PeriodicMsg::Tick);
        Ok(())
    }
}
