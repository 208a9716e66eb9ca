//! Supervisor semantics, one behaviour per test: strategies, restart types, intensity
//! escalation, restart backoff and shutdown order.
//!
//! Timing tests run on tokio's paused clock: virtual time advances only when every task
//! is idle, so "3 crashes spread over 10 s" takes no real time and cannot flake.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};

use super::*;
use crate::supervision::spec::{Backoff, ChildSpec, Intensity, Restart, StartCtx, StartFn, Strategy, SupervisorSpec};
use crate::supervision::tree::{Status, Tree};

type Log = Arc<Mutex<Vec<String>>>;

fn log_of(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// A test worker: records its start and orderly stop; crashes, panics or stops on command.
struct Probe;

enum ProbeMsg {
    Crash,
    Panic,
    Stop,
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = (String, Log);
    type Arguments = (String, Log);

    async fn pre_start(&self, _: ActorRef<ProbeMsg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        args.1.lock().unwrap().push(format!("start:{}", args.0));
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<ProbeMsg>,
        msg: ProbeMsg,
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProbeMsg::Crash => Err("crash requested".into()),
            ProbeMsg::Panic => panic!("panic requested"),
            ProbeMsg::Stop => {
                myself.stop(Some("done".into()));
                Ok(())
            }
        }
    }

    async fn post_stop(&self, _: ActorRef<ProbeMsg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        state.1.lock().unwrap().push(format!("stop:{}", state.0));
        Ok(())
    }
}

fn probe(name: &str, log: &Log) -> ChildSpec {
    let log = log.clone();
    let start: StartFn = Arc::new(move |ctx: StartCtx| {
        let log = log.clone();
        Box::pin(async move {
            let (a, _) = Actor::spawn_linked(None, Probe, (ctx.name.clone(), log), ctx.parent).await?;
            Ok(a.get_cell())
        })
    });
    ChildSpec::worker(name, start).shutdown(Duration::from_secs(1))
}

fn spec(name: &str, strategy: Strategy, children: Vec<ChildSpec>) -> SupervisorSpec {
    SupervisorSpec::new(name, strategy, children)
}

async fn children(sup: &ActorRef<SupervisorMsg>) -> Vec<(String, Option<ActorId>)> {
    match sup.call(SupervisorMsg::Children, Some(Duration::from_secs(5))).await {
        Ok(CallResult::Success(c)) => c,
        _ => panic!("supervisor did not answer"),
    }
}

fn id_of(list: &[(String, Option<ActorId>)], name: &str) -> Option<ActorId> {
    list.iter().find(|(n, _)| n == name).and_then(|(_, id)| *id)
}

/// Sends `msg` to the running child `name` (looked up in the tree).
fn send(tree: &Tree, name: &str, msg: ProbeMsg) {
    let cell = tree.cell(name).unwrap_or_else(|| panic!("{name} is not running"));
    cell.send_message(msg).unwrap_or_else(|_| panic!("send to {name}"));
}

/// Polls `cond` until it holds, failing after `secs` seconds (virtual or real).
async fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until child `name` runs as an actor other than `old`.
async fn restarted(sup: &ActorRef<SupervisorMsg>, name: &str, old: Option<ActorId>) -> ActorId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = id_of(&children(sup).await, name);
        if let Some(id) = now.filter(|id| Some(*id) != old) {
            return id;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} was not restarted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn start(s: SupervisorSpec, tree: &Tree) -> (ActorRef<SupervisorMsg>, ractor::concurrency::JoinHandle<()>) {
    Supervisor::start(s, tree.clone(), None).await.expect("supervisor starts")
}

/// A supervisor with children a, b, c (started in that order) under `strategy`.
async fn abc(strategy: Strategy) -> (ActorRef<SupervisorMsg>, Log, Tree) {
    let (log, tree) = (Log::default(), Tree::new());
    let (sup, _) =
        start(spec("sup", strategy, vec![probe("a", &log), probe("b", &log), probe("c", &log)]), &tree).await;
    (sup, log, tree)
}

#[tokio::test]
async fn one_for_one_restarts_only_the_failed_child() {
    let (sup, _log, tree) = abc(Strategy::OneForOne).await;
    let before = children(&sup).await;
    send(&tree, "b", ProbeMsg::Crash);
    restarted(&sup, "b", id_of(&before, "b")).await;
    let after = children(&sup).await;
    assert_eq!(id_of(&after, "a"), id_of(&before, "a"));
    assert_eq!(id_of(&after, "c"), id_of(&before, "c"));
    assert_eq!((tree.restarts("b"), tree.restarts("a")), (Some(1), Some(0)));
    assert_eq!(tree.status("b"), Some(Status::Running));
    let root = tree.snapshot().unwrap();
    assert!(root.find("b").unwrap().last_failure.as_deref().unwrap().contains("crash requested"));
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test]
async fn one_for_all_restarts_every_child_in_order() {
    let (sup, log, tree) = abc(Strategy::OneForAll).await;
    let before = children(&sup).await;
    log.lock().unwrap().clear();
    send(&tree, "b", ProbeMsg::Panic);
    restarted(&sup, "c", id_of(&before, "c")).await;
    let after = children(&sup).await;
    for n in ["a", "b", "c"] {
        assert_ne!(id_of(&after, n), id_of(&before, n), "{n} restarted");
        assert_eq!(tree.restarts(n), Some(1));
    }
    // The survivors stop last-started first; then all start in table order.
    assert_eq!(log_of(&log), ["stop:c", "stop:a", "start:a", "start:b", "start:c"]);
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let (sup, log, tree) = abc(Strategy::RestForOne).await;
    let before = children(&sup).await;
    log.lock().unwrap().clear();
    send(&tree, "b", ProbeMsg::Crash);
    restarted(&sup, "c", id_of(&before, "c")).await;
    let after = children(&sup).await;
    assert_eq!(id_of(&after, "a"), id_of(&before, "a"), "a is untouched");
    assert_ne!(id_of(&after, "b"), id_of(&before, "b"));
    assert_eq!(log_of(&log), ["stop:c", "start:b", "start:c"]);
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test]
async fn restart_types_decide_what_comes_back() {
    let (log, tree) = (Log::default(), Tree::new());
    let children_spec = vec![
        probe("perm", &log).restart(Restart::Permanent),
        probe("trans", &log).restart(Restart::Transient),
        probe("temp", &log).restart(Restart::Temporary),
    ];
    let mut s = spec("sup", Strategy::OneForOne, children_spec);
    s.intensity = Intensity { max_restarts: 100, period: Duration::from_secs(5) };
    let (sup, _) = start(s, &tree).await;
    let before = children(&sup).await;

    // Permanent: back even after a normal stop.
    send(&tree, "perm", ProbeMsg::Stop);
    restarted(&sup, "perm", id_of(&before, "perm")).await;

    // Transient: back after a crash, not after a normal stop.
    send(&tree, "trans", ProbeMsg::Crash);
    restarted(&sup, "trans", id_of(&before, "trans")).await;
    send(&tree, "trans", ProbeMsg::Stop);
    eventually("transient child to stay stopped", 5, || tree.status("trans") == Some(Status::Stopped)).await;
    assert_eq!(id_of(&children(&sup).await, "trans"), None);

    // Temporary: never back, and forgotten.
    send(&tree, "temp", ProbeMsg::Crash);
    eventually("temporary child to be forgotten", 5, || tree.status("temp").is_none()).await;
    let names: Vec<String> = children(&sup).await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["perm", "trans"]);
    assert_eq!(log_of(&log).iter().filter(|l| *l == "start:temp").count(), 1);
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn fourth_crash_within_the_period_escalates_to_the_parent() {
    let (log, tree) = (Log::default(), Tree::new());
    let inner = spec("inner", Strategy::OneForOne, vec![probe("w", &log)]);
    let mut outer = spec("outer", Strategy::OneForOne, vec![Supervisor::child(inner)]);
    outer.intensity = Intensity { max_restarts: 10, period: Duration::from_secs(5) };
    let (sup, _) = start(outer, &tree).await;
    for i in 1..=3 {
        let old = tree.cell("w").map(|c| c.get_id());
        send(&tree, "w", ProbeMsg::Crash);
        eventually("w to restart", 5, || tree.cell("w").is_some_and(|c| Some(c.get_id()) != old)).await;
        assert_eq!(tree.restarts("w"), Some(i));
        assert_eq!(tree.restarts("inner"), Some(0), "3 restarts are within the intensity");
    }
    send(&tree, "w", ProbeMsg::Crash);
    // The 4th crash within 5 s: `inner` gives up and its parent restarts it.
    eventually("inner to be restarted by outer", 5, || tree.restarts("inner") == Some(1)).await;
    eventually("inner running again", 5, || tree.status("inner") == Some(Status::Running) && tree.cell("w").is_some())
        .await;
    let node = tree.snapshot().unwrap();
    assert!(node.find("inner").unwrap().last_failure.as_deref().unwrap().contains("restart intensity exceeded"));
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn three_crashes_spread_over_ten_seconds_do_not_escalate() {
    let (log, tree) = (Log::default(), Tree::new());
    let inner = spec("inner", Strategy::OneForOne, vec![probe("w", &log)]);
    let (sup, join) = start(inner, &tree).await;
    for i in 1..=6 {
        let old = tree.cell("w").map(|c| c.get_id());
        send(&tree, "w", ProbeMsg::Crash);
        eventually("w to restart", 5, || tree.cell("w").is_some_and(|c| Some(c.get_id()) != old)).await;
        assert_eq!(tree.restarts("w"), Some(i));
        tokio::time::sleep(Duration::from_secs(4)).await; // spread, in virtual time
    }
    assert!(!join.is_finished(), "the supervisor is still up after 6 crashes over 24 s");
    assert_eq!(tree.status("inner"), Some(Status::Running));
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_restarts_and_grows() {
    let (log, tree) = (Log::default(), Tree::new());
    let mut s = spec("sup", Strategy::OneForOne, vec![probe("w", &log)]);
    s.backoff = Some(Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), jitter: 0.0 });
    s.intensity = Intensity { max_restarts: 10, period: Duration::from_secs(5) };
    let (sup, _) = start(s, &tree).await;
    let mut waits = Vec::new();
    for _ in 0..3 {
        let old = tree.cell("w").map(|c| c.get_id());
        let crashed_at = tokio::time::Instant::now();
        send(&tree, "w", ProbeMsg::Crash);
        eventually("w to be restarting", 5, || tree.status("w") == Some(Status::Restarting)).await;
        eventually("w to restart", 5, || tree.cell("w").is_some_and(|c| Some(c.get_id()) != old)).await;
        waits.push(crashed_at.elapsed().as_millis());
    }
    for (w, expected) in waits.iter().zip([100u128, 200, 400]) {
        assert!(
            *w >= expected && *w < expected + 50,
            "restart waited {w} ms, expected about {expected} ms ({waits:?})"
        );
    }
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn overlapping_backoffs_restart_every_failed_child() {
    let (log, tree) = (Log::default(), Tree::new());
    let mut s = spec("sup", Strategy::OneForOne, vec![probe("a", &log), probe("b", &log)]);
    s.backoff = Some(Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), jitter: 0.0 });
    let (sup, _) = start(s, &tree).await;
    let before = children(&sup).await;
    send(&tree, "a", ProbeMsg::Crash);
    eventually("a to be restarting", 5, || tree.status("a") == Some(Status::Restarting)).await;
    // b fails while a still waits out its backoff: both must come back.
    send(&tree, "b", ProbeMsg::Crash);
    restarted(&sup, "a", id_of(&before, "a")).await;
    restarted(&sup, "b", id_of(&before, "b")).await;
    assert_eq!((tree.status("a"), tree.status("b")), (Some(Status::Running), Some(Status::Running)));
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test]
async fn children_start_in_order_and_stop_in_reverse() {
    let (log, tree) = (Log::default(), Tree::new());
    let inner = spec("inner", Strategy::OneForOne, vec![probe("x", &log), probe("y", &log)]);
    let root = spec("root", Strategy::OneForOne, vec![probe("a", &log), Supervisor::child(inner), probe("c", &log)]);
    let (sup, join) = start(root, &tree).await;
    assert_eq!(log_of(&log), ["start:a", "start:x", "start:y", "start:c"]);
    let names = tree.snapshot().unwrap().names();
    assert_eq!(names, ["root", "a", "inner", "x", "y", "c"]);
    log.lock().unwrap().clear();
    sup.stop_and_wait(None, Some(Duration::from_secs(10))).await.unwrap();
    join.await.unwrap();
    assert_eq!(log_of(&log), ["stop:c", "stop:y", "stop:x", "stop:a"]);
}
