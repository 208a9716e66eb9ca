//! A supervisor with Erlang/OTP semantics on ractor.
//!
//! - children start in table order (a child that fails to start fails the supervisor)
//!   and stop in reverse order, each within its shutdown time, then killed;
//! - on a child's exit the restart type decides whether to restart (permanent: always;
//!   transient: after a crash or kill; temporary: never) and the strategy decides
//!   what restarts with it (one-for-one, one-for-all, rest-for-one);
//! - every restart counts against the restart intensity; one too many and the
//!   supervisor stops its children and fails, so its own parent decides (escalation);
//! - an optional backoff delays restarts of a crash-looping child;
//! - dynamic children (Erlang's `start_child`/`terminate_child`): started on demand,
//!   forgotten when they exit for good, and, with [`Passivation`], drained when idle or
//!   when there are too many (least recently active first). The `tenants` supervisor
//!   runs one such child per active tenant.
//!
//! Poison messages are not the supervisor's business: consumers park invalid or
//! crashing events in the bus's DLQ, job workers bury poison jobs in the dead set.
//! Every restart and escalation is a structured log line and a metric.

use std::time::Duration;

use tokio::time::Instant;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::intensity::RestartWindow;
use super::spec::{ChildSpec, Intensity, Passivation, Restart, StartCtx, Strategy, SupervisorSpec};
use super::tree::Tree;

/// What a supervisor does besides reacting to its children.
pub enum SupervisorMsg {
    /// The backoff of a restart group has passed: start its children.
    RestartGroup { generation: u64 },
    /// The running children in start order, with their actor ids (for tests and tools).
    Children(RpcReplyPort<Vec<(String, Option<ractor::ActorId>)>>),
    /// Start a dynamic child from this spec; when a child of that name runs already,
    /// answer it instead (OTP's `already_started`).
    StartChild(ChildSpec, RpcReplyPort<Result<StartedChild, String>>),
    /// Stop a child (within its shutdown time) and forget it; answers whether it ran.
    StopChild(String, RpcReplyPort<bool>),
    /// Timer tick: passivate idle dynamic children.
    Passivate,
}

/// A dynamic child as `StartChild` answers it: the running one, with the activity its
/// callers must record (the running child's, which may not be the one just offered).
pub struct StartedChild {
    pub cell: ActorCell,
    pub activity: Option<std::sync::Arc<super::spec::Activity>>,
}

/// Startup arguments.
pub struct SupervisorArgs {
    pub spec: SupervisorSpec,
    pub tree: Tree,
    /// The supervisor's own parent in the tree view (`None` for the root).
    pub parent_name: Option<String>,
}

struct Child {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    /// Started by `StartChild`: forgotten once it exits for good or is passivated.
    dynamic: bool,
    /// Restarts since the child last ran for a whole intensity period (drives backoff).
    streak: u32,
    last_start: Instant,
}

pub struct SupervisorState {
    spec: SupervisorSpec,
    tree: Tree,
    children: Vec<Child>,
    window: RestartWindow,
    /// Children waiting out a backoff before they start again, and the group's id:
    /// a newer failure supersedes an older pending group.
    pending: Option<(u64, Vec<String>)>,
    generation: u64,
}

pub struct Supervisor;

/// How a child ended, read off a supervision event.
pub struct ChildExit {
    pub cell: ActorCell,
    /// A crash (error or panic) or a kill: OTP's abnormal exits.
    pub abnormal: bool,
    /// The failure, `killed`, the stop reason, or `normal`.
    pub reason: String,
}

impl ChildExit {
    /// `None` for events that are not a child's exit.
    pub fn of(event: SupervisionEvent) -> Option<Self> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                Some(ChildExit { cell, abnormal: true, reason: err.to_string() })
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // A kill is an abnormal exit (OTP's `killed`), whatever the actor was doing.
                let abnormal = reason.as_deref() == Some("killed");
                Some(ChildExit { cell, abnormal, reason: reason.unwrap_or_else(|| "normal".into()) })
            }
            _ => None,
        }
    }
}

impl Supervisor {
    /// Starts a supervisor (and, synchronously, its children) linked to `parent`.
    pub async fn start(
        spec: SupervisorSpec,
        tree: Tree,
        parent: Option<(ActorCell, String)>,
    ) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), ractor::SpawnErr> {
        let (cell, parent_name) = match parent {
            Some((c, n)) => (Some(c), Some(n)),
            None => (None, None),
        };
        let args = SupervisorArgs { spec, tree, parent_name };
        // Registration in the tree happens in `pre_start`, before the children start.
        match cell {
            Some(c) => Actor::spawn_linked(None, Supervisor, args, c).await,
            None => Actor::spawn(None, Supervisor, args).await,
        }
    }

    /// A child spec that runs `spec` as a sub-supervisor.
    pub fn child(spec: SupervisorSpec) -> ChildSpec {
        let name = spec.name.clone();
        let start: super::StartFn = std::sync::Arc::new(move |ctx: StartCtx| {
            let spec = spec.clone();
            Box::pin(async move {
                let (actor, _) = Supervisor::start(spec, ctx.tree.clone(), Some((ctx.parent, ctx.parent_name))).await?;
                Ok(actor.get_cell())
            })
        });
        ChildSpec::worker(name, start).supervisor().shutdown(Duration::from_secs(30))
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let SupervisorArgs { spec, tree, parent_name } = args;
        // Register before the children so they appear under this node.
        tree.started(&spec.name, parent_name.as_deref(), super::ChildKind::Supervisor, myself.get_cell());
        tree.set_strategy(&spec.name, spec.strategy);
        let mut state = SupervisorState {
            window: RestartWindow::new(spec.intensity),
            children: spec
                .children
                .iter()
                .map(|c| Child { spec: c.clone(), cell: None, dynamic: false, streak: 0, last_start: Instant::now() })
                .collect(),
            spec,
            tree,
            pending: None,
            generation: 0,
        };
        for i in 0..state.children.len() {
            if let Err(e) = start_child(&myself, &mut state, i).await {
                let n = state.children.len();
                stop_children(&mut state, 0..n).await;
                return Err(format!("child {} failed to start: {e}", state.children[i].spec.name).into());
            }
        }
        if let Some(p) = state.spec.passivation {
            let tick = (p.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
            myself.send_interval(tick, || SupervisorMsg::Passivate);
        }
        tracing::info!(supervisor = %state.spec.name, strategy = state.spec.strategy.as_str(), children = state.children.len(), "supervisor started");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::RestartGroup { generation } => {
                let Some((g, names)) = state.pending.take() else { return Ok(()) };
                if g != generation {
                    state.pending = Some((g, names)); // superseded by a newer failure
                    return Ok(());
                }
                restart_group(&myself, state, names).await?;
            }
            SupervisorMsg::Children(reply) => {
                let list =
                    state.children.iter().map(|c| (c.spec.name.clone(), c.cell.as_ref().map(|c| c.get_id()))).collect();
                let _ = reply.send(list);
            }
            SupervisorMsg::StartChild(spec, reply) => {
                let _ = reply.send(start_dynamic(&myself, state, spec).await);
            }
            SupervisorMsg::StopChild(name, reply) => {
                let _ = reply.send(stop_dynamic(state, &name).await);
            }
            SupervisorMsg::Passivate => passivate_idle(state),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(ChildExit { cell, abnormal, reason }) = ChildExit::of(event) else { return Ok(()) };
        let Some(i) = state.children.iter().position(|c| c.cell.as_ref().is_some_and(|c| c.get_id() == cell.get_id()))
        else {
            return Ok(()); // a child we stopped on purpose, or an older incarnation
        };
        on_child_exit(&myself, state, i, abnormal, reason).await
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        stop_dynamic_children(state).await;
        let n = state.children.len();
        stop_children(state, 0..n).await;
        state.tree.stopped(&state.spec.name);
        tracing::info!(supervisor = %state.spec.name, "supervisor stopped; children stopped in reverse order");
        Ok(())
    }
}

async fn start_child(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    i: usize,
) -> Result<(), ractor::SpawnErr> {
    let spec = state.children[i].spec.clone();
    let ctx = StartCtx {
        parent: myself.get_cell(),
        parent_name: state.spec.name.clone(),
        name: spec.name.clone(),
        tree: state.tree.clone(),
    };
    let cell = (spec.start)(ctx).await?;
    state.tree.started(&spec.name, Some(&state.spec.name), spec.kind, cell.clone());
    if let Some(activity) = spec.activity.clone() {
        state.tree.set_mailbox(&spec.name, std::sync::Arc::new(move || activity.in_flight()));
    }
    if let Some(stats) = spec.stats.clone() {
        state.tree.set_stats(&spec.name, stats);
    }
    let child = &mut state.children[i];
    child.cell = Some(cell);
    child.last_start = Instant::now();
    Ok(())
}

/// Drains every dynamic child at once (each finishes what it has queued), then waits
/// for them together within the longest of their shutdown times; stragglers are
/// killed. Thousands of tenant managers stop in one shutdown time, not in a sum of them.
async fn stop_dynamic_children(state: &mut SupervisorState) {
    let dynamic: Vec<Child> = {
        let (dynamic, fixed) = std::mem::take(&mut state.children).into_iter().partition(|c| c.dynamic);
        state.children = fixed;
        dynamic
    };
    let Some(within) = dynamic.iter().map(|c| c.spec.shutdown).max() else { return };
    for c in &dynamic {
        if let Some(cell) = &c.cell {
            let _ = cell.drain();
        }
    }
    let deadline = Instant::now() + within;
    for c in dynamic {
        if let Some(cell) = c.cell {
            let left = deadline.saturating_duration_since(Instant::now());
            if cell.wait(Some(left)).await.is_err() {
                tracing::warn!(supervisor = %state.spec.name, child = %c.spec.name, "child did not drain in time; killed");
                cell.kill();
            }
        }
        state.tree.remove(&c.spec.name);
    }
}

/// Stops the running children in `range`, last first, each within its shutdown time.
async fn stop_children(state: &mut SupervisorState, range: std::ops::Range<usize>) {
    for i in range.rev() {
        let Some(cell) = state.children[i].cell.take() else { continue };
        let c = &state.children[i].spec;
        if cell.stop_and_wait(Some("supervisor shutdown".into()), Some(c.shutdown)).await.is_err() {
            tracing::warn!(supervisor = %state.spec.name, child = %c.name, "child did not stop in time; killed");
            cell.kill();
        }
        state.tree.stopped(&c.name);
    }
}

async fn on_child_exit(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    i: usize,
    abnormal: bool,
    reason: String,
) -> Result<(), ActorProcessingErr> {
    let sup = state.spec.name.clone();
    let name = state.children[i].spec.name.clone();
    state.children[i].cell = None;
    // A dead supervisor's children died with it (ractor stops them; a kill skips their
    // cleanup), so their records go; the restarted supervisor registers new ones.
    state.tree.remove_descendants(&name);
    if abnormal {
        tracing::warn!(supervisor = %sup, child = %name, %reason, "child failed");
        state.tree.failed(&name, &reason);
    } else {
        tracing::info!(supervisor = %sup, child = %name, %reason, "child stopped");
        state.tree.stopped(&name);
    }

    let restart = match state.children[i].spec.restart {
        Restart::Permanent => true,
        Restart::Transient => abnormal,
        Restart::Temporary => false,
    };
    if !restart {
        if state.children[i].spec.restart == Restart::Temporary || state.children[i].dynamic {
            state.tree.remove(&name);
            state.children.remove(i);
            scale_intensity(state);
        }
        return Ok(());
    }

    if !state.window.allow(Instant::now()) {
        let limit = state.spec.intensity;
        tracing::error!(
            supervisor = %sup, child = %name, max_restarts = limit.max_restarts, period_ms = limit.period.as_millis() as u64,
            "restart intensity exceeded; stopping children and escalating to the parent"
        );
        metrics::counter!("eventra_supervisor_escalations_total", "supervisor" => sup.clone()).increment(1);
        let n = state.children.len();
        stop_children(state, 0..n).await;
        let why = format!(
            "restart intensity exceeded: more than {} restarts in {:?} (last: {name}: {reason})",
            limit.max_restarts, limit.period
        );
        state.tree.failed(&sup, &why);
        return Err(why.into());
    }

    // The restart group, in start order.
    let group: Vec<usize> = match state.spec.strategy {
        Strategy::OneForOne => vec![i],
        Strategy::OneForAll => (0..state.children.len()).collect(),
        Strategy::RestForOne => (i..state.children.len()).collect(),
    };
    // Siblings in the group stop first, last-started first.
    for &j in group.iter().rev().filter(|&&j| j != i) {
        if let Some(cell) = state.children[j].cell.take() {
            let c = &state.children[j].spec;
            if cell.stop_and_wait(Some(format!("restart with {name}")), Some(c.shutdown)).await.is_err() {
                cell.kill();
            }
            state.tree.stopped(&c.name);
            state.tree.remove_descendants(&c.name);
        }
    }
    let mut names = Vec::new();
    for &j in &group {
        let child = &mut state.children[j];
        if child.spec.restart == Restart::Temporary && j != i {
            continue; // temporary siblings are not brought back
        }
        if child.last_start.elapsed() > state.spec.intensity.period {
            child.streak = 0;
        }
        child.streak += 1;
        state.tree.restarting(&child.spec.name);
        metrics::counter!("eventra_actor_restarts_total", "supervisor" => sup.clone(), "child" => child.spec.name.clone()).increment(1);
        names.push(child.spec.name.clone());
    }
    // Drop temporary siblings that were stopped for the group.
    let dropped: Vec<String> = group
        .iter()
        .filter(|&&j| j != i && state.children[j].spec.restart == Restart::Temporary)
        .map(|&j| state.children[j].spec.name.clone())
        .collect();
    for n in &dropped {
        state.tree.remove(n);
    }
    state.children.retain(|c| !dropped.contains(&c.spec.name));

    let streak = state.children.iter().find(|c| c.spec.name == name).map(|c| c.streak).unwrap_or(1);
    let delay = state.spec.backoff.map(|b| b.delay(streak, rand::random::<f64>())).unwrap_or(Duration::ZERO);
    tracing::warn!(supervisor = %sup, child = %name, restarting = ?names, delay_ms = delay.as_millis() as u64, strategy = state.spec.strategy.as_str(), "restarting");
    state.generation += 1;
    if delay.is_zero() {
        restart_group(myself, state, names).await
    } else {
        // A group already waiting out its backoff is merged, not replaced: every child
        // in either group must come back.
        let generation = state.generation;
        if let Some((_, waiting)) = state.pending.take() {
            let merged: Vec<String> = state
                .children
                .iter()
                .map(|c| c.spec.name.clone())
                .filter(|n| waiting.contains(n) || names.contains(n))
                .collect();
            state.pending = Some((generation, merged));
        } else {
            state.pending = Some((generation, names));
        }
        myself.send_after(delay, move || SupervisorMsg::RestartGroup { generation });
        Ok(())
    }
}

/// Starts a dynamic child, or answers the running one of that name.
async fn start_dynamic(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    spec: ChildSpec,
) -> Result<StartedChild, String> {
    let started = |c: &Child| c.cell.clone().map(|cell| StartedChild { cell, activity: c.spec.activity.clone() });
    if let Some(c) = state.children.iter().find(|c| c.spec.name == spec.name) {
        return started(c).ok_or_else(|| format!("{} is restarting", spec.name));
    }
    let name = spec.name.clone();
    state.children.push(Child { spec, cell: None, dynamic: true, streak: 0, last_start: Instant::now() });
    let i = state.children.len() - 1;
    if let Err(e) = start_child(myself, state, i).await {
        state.children.remove(i);
        state.tree.remove(&name);
        return Err(format!("{name} failed to start: {e}"));
    }
    scale_intensity(state);
    if let Some(p) = state.spec.passivation {
        let running = state.children.iter().filter(|c| c.dynamic && c.cell.is_some()).count();
        if running > p.max_children {
            passivate_least_active(state, (p.max_children / 8).max(running - p.max_children), &name);
        }
    }
    state.children.iter().find(|c| c.spec.name == name).and_then(started).ok_or_else(|| format!("{name} stopped"))
}

/// Stops a child and forgets it; `false` when none of that name runs.
async fn stop_dynamic(state: &mut SupervisorState, name: &str) -> bool {
    let Some(i) = state.children.iter().position(|c| c.spec.name == name) else { return false };
    let child = state.children.remove(i);
    scale_intensity(state);
    state.tree.remove(name);
    let Some(cell) = child.cell else { return false };
    if cell.stop_and_wait(Some("stopped by its supervisor".into()), Some(child.spec.shutdown)).await.is_err() {
        tracing::warn!(supervisor = %state.spec.name, child = %name, "child did not stop in time; killed");
        cell.kill();
    }
    true
}

/// Drains the dynamic children idle for longer than the passivation's `idle`.
fn passivate_idle(state: &mut SupervisorState) {
    let Some(p) = state.spec.passivation else { return };
    let idle: Vec<usize> = (0..state.children.len())
        .filter(|&i| {
            let c = &state.children[i];
            c.dynamic
                && c.cell.is_some()
                && c.spec.activity.as_ref().and_then(|a| a.idle_for()).is_some_and(|d| d >= p.idle)
        })
        .collect();
    passivate(state, idle, "idle");
}

/// Drains the `n` least recently active dynamic children (never `keep`, the one just
/// started); those with calls in flight go last.
fn passivate_least_active(state: &mut SupervisorState, n: usize, keep: &str) {
    let mut candidates: Vec<(bool, u64, usize)> = state
        .children
        .iter()
        .enumerate()
        .filter(|(_, c)| c.dynamic && c.cell.is_some() && c.spec.name != keep)
        .map(|(i, c)| {
            let a = c.spec.activity.as_deref();
            (a.is_some_and(|a| a.in_flight() > 0), a.map_or(0, |a| a.last_active_ms()), i)
        })
        .collect();
    candidates.sort_unstable();
    let chosen = candidates.into_iter().take(n).map(|(_, _, i)| i).collect();
    passivate(state, chosen, "too many running");
}

/// Drains the children at these indices (queued messages are still handled; later
/// sends fail at once, so callers start a fresh child) and forgets them now, so a
/// `StartChild` for the same name does not wait for the drain.
fn passivate(state: &mut SupervisorState, mut indices: Vec<usize>, why: &str) {
    if indices.is_empty() {
        return;
    }
    indices.sort_unstable();
    for &i in indices.iter().rev() {
        let child = state.children.remove(i);
        state.tree.remove(&child.spec.name);
        if let Some(cell) = child.cell {
            tracing::debug!(supervisor = %state.spec.name, child = %child.spec.name, why, "passivating");
            let _ = cell.drain();
        }
    }
    metrics::counter!("eventra_supervisor_passivations_total", "supervisor" => state.spec.name.clone())
        .increment(indices.len() as u64);
    scale_intensity(state);
}

/// A supervisor of dynamic children scales its restart budget with them.
fn scale_intensity(state: &mut SupervisorState) {
    if state.spec.passivation.is_some_and(|p: Passivation| p.intensity_per_child) {
        let limit = Intensity::per_child(state.children.len());
        state.spec.intensity = limit;
        state.window.set_limit(limit);
    }
}

async fn restart_group(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    names: Vec<String>,
) -> Result<(), ActorProcessingErr> {
    for name in names {
        let Some(i) = state.children.iter().position(|c| c.spec.name == name) else { continue };
        if state.children[i].cell.is_some() {
            continue;
        }
        if let Err(e) = start_child(myself, state, i).await {
            // A child that cannot start counts as another failure of it.
            let reason = format!("restart failed: {e}");
            return Box::pin(on_child_exit(myself, state, i, true, reason)).await;
        }
        tracing::info!(supervisor = %state.spec.name, child = %name, "child restarted");
    }
    Ok(())
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
