//! Child and supervisor specifications: what a supervisor starts, how, and what it does
//! when a child dies. Modelled on Erlang's child specs, which `rabbit_sup.erl` keeps as
//! data in one table next to the supervisor; ours do the same (see `root.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorCell, SpawnErr};
use serde::Serialize;

use super::tree::Tree;

/// Whether a child supervises others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildKind {
    Worker,
    Supervisor,
}

/// When a dead child is restarted (OTP restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always, whether it crashed or stopped normally.
    Permanent,
    /// Only after an abnormal exit (a crash or a kill), not after a normal stop.
    Transient,
    /// Never; the child is forgotten when it exits.
    Temporary,
}

/// Which children restart together (OTP strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the dead child.
    OneForOne,
    /// Every child: the others are stopped (in reverse order) and all start again in order.
    OneForAll,
    /// The dead child and every child started after it.
    RestForOne,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        }
    }
}

/// Restart intensity: more than `max_restarts` restarts within `period` and the
/// supervisor gives up: it stops its children and fails, escalating to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub max_restarts: usize,
    pub period: Duration,
}

impl Default for Intensity {
    /// OTP's classic 3 restarts in 5 seconds.
    fn default() -> Self {
        Intensity { max_restarts: 3, period: Duration::from_secs(5) }
    }
}

/// Restarts each child of a production supervisor may use in [`Intensity::per_child`]'s
/// 5 s window, on average.
pub const RESTARTS_PER_CHILD: usize = 5;

impl Intensity {
    /// A budget that grows with the children: [`RESTARTS_PER_CHILD`] each in 5 s. For a
    /// pool of independent workers (job workers, consumers, tenant managers) a fixed 3
    /// would turn unrelated single failures of different members into an escalation
    /// (under `eventra chaos`, an actor killed every 100 ms, the process restarted every
    /// few seconds). A real crash loop (a child that fails as it starts) still spends
    /// any such budget within moments and escalates.
    pub fn per_child(children: usize) -> Self {
        Intensity { max_restarts: RESTARTS_PER_CHILD * children.max(1), period: Duration::from_secs(5) }
    }
}

/// Exponential restart delay with jitter: `initial · 2^(n-1)`, capped at `max`, then
/// scaled by a random factor in `[1 - jitter, 1 + jitter]`; `n` counts restarts of the
/// child since it last ran for a whole intensity period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// 0.0 ..= 1.0
    pub jitter: f64,
}

/// What a start function gets: where to link, under which name, and the tree to report to.
#[derive(Clone)]
pub struct StartCtx {
    /// The supervisor: spawn the child linked to it.
    pub parent: ActorCell,
    /// The supervisor's name (the child's parent in the tree view).
    pub parent_name: String,
    /// The child's unique name.
    pub name: String,
    pub tree: Tree,
}

pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;
/// Starts (or restarts) a child and returns its cell, linked to `ctx.parent`.
pub type StartFn = Arc<dyn Fn(StartCtx) -> StartFuture + Send + Sync>;

/// One row of a supervisor's child table.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique, stable name: shown in `/debug/actors`, used by kill requests and logs.
    pub name: String,
    pub kind: ChildKind,
    pub restart: Restart,
    /// How long an orderly stop may take before the child is killed.
    pub shutdown: Duration,
    pub start: StartFn,
}

impl ChildSpec {
    pub fn worker(name: impl Into<String>, start: StartFn) -> Self {
        ChildSpec {
            name: name.into(),
            kind: ChildKind::Worker,
            restart: Restart::Permanent,
            shutdown: Duration::from_secs(5),
            start,
        }
    }

    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    pub fn shutdown(mut self, shutdown: Duration) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub fn supervisor(mut self) -> Self {
        self.kind = ChildKind::Supervisor;
        self
    }
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

/// Everything a supervisor needs to run.
#[derive(Clone)]
pub struct SupervisorSpec {
    pub name: String,
    pub strategy: Strategy,
    pub intensity: Intensity,
    pub backoff: Option<Backoff>,
    /// Started in this order, stopped in reverse.
    pub children: Vec<ChildSpec>,
}

impl SupervisorSpec {
    pub fn new(name: impl Into<String>, strategy: Strategy, children: Vec<ChildSpec>) -> Self {
        SupervisorSpec { name: name.into(), strategy, intensity: Intensity::default(), backoff: None, children }
    }
}
