//! Child and supervisor specifications: what a supervisor starts, how, and what it does
//! when a child dies. Modelled on Erlang's child specs, which `rabbit_sup.erl` keeps as
//! data in one table next to the supervisor; ours do the same (see `root.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
    /// How busy the child is, as its callers record it: a supervisor with
    /// [`Passivation`] stops dynamic children that are idle by it. Its calls in
    /// flight are the child's mailbox depth in the tree view.
    pub activity: Option<Arc<Activity>>,
    /// The child's own figures for the tree view (`stats`), if it has any.
    pub stats: Option<super::tree::StatsFn>,
}

impl ChildSpec {
    pub fn worker(name: impl Into<String>, start: StartFn) -> Self {
        ChildSpec {
            name: name.into(),
            kind: ChildKind::Worker,
            restart: Restart::Permanent,
            shutdown: Duration::from_secs(5),
            start,
            activity: None,
            stats: None,
        }
    }

    /// Shows these figures in the child's node of the tree view.
    pub fn stats(mut self, stats: super::tree::StatsFn) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Lets the supervisor passivate the child by its activity.
    pub fn activity(mut self, activity: Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
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
    /// For a supervisor of dynamic children (started on demand with
    /// `SupervisorMsg::StartChild`): when they are stopped for being idle or too many.
    pub passivation: Option<Passivation>,
}

impl SupervisorSpec {
    pub fn new(name: impl Into<String>, strategy: Strategy, children: Vec<ChildSpec>) -> Self {
        SupervisorSpec {
            name: name.into(),
            strategy,
            intensity: Intensity::default(),
            backoff: None,
            children,
            passivation: None,
        }
    }
}

/// When a supervisor stops (drains: queued messages are still handled) its dynamic
/// children: memory follows the active ones, not every one that was ever started.
/// A passivated child is forgotten; the next `StartChild` for it starts a fresh one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Passivation {
    /// A child with nothing in flight and no call for this long is passivated.
    pub idle: Duration,
    /// At most this many dynamic children run: starting one more passivates the least
    /// recently active ones (an eighth of the limit at once, so a sweep of new
    /// children does not pay a scan each).
    pub max_children: usize,
    /// Scale the restart intensity with the children ([`Intensity::per_child`]).
    pub intensity_per_child: bool,
}

/// A dynamic child's activity, recorded by whoever calls it: calls in flight, and when
/// the last one began. Shared by the callers, the supervisor (passivation) and the
/// tree view (the mailbox gauge).
#[derive(Debug, Default)]
pub struct Activity {
    /// Milliseconds since the process's activity epoch when the last call began.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// The instant all activity times count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Activity {
    pub fn new() -> Self {
        let a = Activity::default();
        a.touch();
        a
    }

    fn touch(&self) {
        let ms = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// A call begins; it counts as in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActivityGuard(self.clone())
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// How long since the last call began; `None` while one is in flight.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight() > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(epoch().elapsed().saturating_sub(last))
    }

    /// When the last call began, for least-recently-active ordering.
    pub fn last_active_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }
}

/// One call in flight (see [`Activity::begin`]).
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
