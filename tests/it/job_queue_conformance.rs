//! The `JobQueue` conformance suite: the same functions run against every backend
//! (embedded SQLite; Redis when `REDIS_URL` is set, as in CI).

use std::sync::Arc;
use std::time::Duration;

use eventra::jobs::{
    Acted, Enqueued, Failed, Job, JobError, JobQueue, JobSet, JobState, NewJob, QueueConfig, RetrySchedule,
};
use serde_json::json;
use uuid::Uuid;

use crate::utils::wait_for;

/// A queue with `config` on a fresh backend; the guard keeps the backend alive.
type Make = fn(QueueConfig) -> futures::future::BoxFuture<'static, (Box<dyn std::any::Any + Send>, Arc<dyn JobQueue>)>;

fn fast() -> QueueConfig {
    // 100× faster and without jitter: retry 1 after 150 ms, retry 2 after 160 ms, retry 3
    // after 310 ms: the production code path, exact times.
    QueueConfig { schedule: RetrySchedule { time_scale: 100.0, jitter: false }, ..QueueConfig::default() }
}

fn job(key: &str) -> NewJob {
    NewJob::new("test", key, json!({ "key": key }))
}

fn new_id(e: Enqueued) -> uuid::Uuid {
    match e {
        Enqueued::New(id) => id,
        Enqueued::Duplicate(id) => panic!("expected a new job, got duplicate {id}"),
    }
}

async fn promoted(q: &Arc<dyn JobQueue>, what: &str) {
    wait_for(what, Duration::from_secs(10), || async { (q.promote_due().await.unwrap() > 0).then_some(()) }).await;
}

fn lease(j: &Job) -> Uuid {
    j.lease.expect("a fetched job carries its lease")
}

async fn take(q: &Arc<dyn JobQueue>, worker: &str) -> Job {
    q.fetch("default", worker, Duration::from_secs(30)).await.unwrap().expect("a ready job")
}

pub async fn enqueue_is_idempotent_by_key(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    let id = new_id(q.enqueue(job("welcome:1")).await.unwrap());
    assert_eq!(q.enqueue(job("welcome:1")).await.unwrap(), Enqueued::Duplicate(id));
    assert_eq!(q.count(JobState::Ready).await.unwrap(), 1);
    // Still a duplicate while running and after it is done (within the retention).
    let j = take(&q, "w1").await;
    assert_eq!(q.enqueue(job("welcome:1")).await.unwrap(), Enqueued::Duplicate(id));
    q.ack(j.id, lease(&j)).await.unwrap();
    assert_eq!(q.enqueue(job("welcome:1")).await.unwrap(), Enqueued::Duplicate(id));
    assert_eq!(q.get(id).await.unwrap().unwrap().state, JobState::Done);
    assert_eq!(q.count(JobState::Done).await.unwrap(), 1);

    // Ten enqueues of one new key at once: exactly one job.
    let results = futures::future::join_all((0..10).map(|_| q.enqueue(job("burst")))).await;
    let new: Vec<_> = results.iter().filter(|r| matches!(r, Ok(Enqueued::New(_)))).collect();
    assert_eq!(new.len(), 1, "{results:?}");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");

    // With no retention, a finished key is free again.
    let (_g2, q2) = make(QueueConfig { done_retention: Duration::ZERO, ..QueueConfig::default() }).await;
    let first = new_id(q2.enqueue(job("k")).await.unwrap());
    let j = take(&q2, "w").await;
    q2.ack(j.id, lease(&j)).await.unwrap();
    wait_for("the retention to pass", Duration::from_secs(5), || {
        let q2 = q2.clone();
        async move {
            match q2.enqueue(job("k")).await.unwrap() {
                Enqueued::New(id) => Some(id),
                Enqueued::Duplicate(_) => None,
            }
        }
    })
    .await;
    assert!(q2.get(first).await.unwrap().is_none(), "the old done job made way");
}

/// `head`: the next job to run and its age, as the API's effect-lag monitor reads it.
pub async fn head_is_the_next_job_and_its_age(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    assert_eq!(q.head("default").await.unwrap(), None);
    let first = new_id(q.enqueue(job("head:1")).await.unwrap());
    let second = new_id(q.enqueue(job("head:2")).await.unwrap());
    let aged = wait_for("the first job to age", Duration::from_secs(5), || {
        let q = q.clone();
        async move { q.head("default").await.unwrap().filter(|(_, age)| *age >= Duration::from_millis(20)) }
    })
    .await;
    assert_eq!(aged.0, first, "the oldest ready job is next");
    let j = take(&q, "w").await;
    assert_eq!(j.id, first);
    assert_eq!(q.head("default").await.unwrap().map(|(id, _)| id), Some(second), "the head moved on");
    assert_eq!(q.head("elsewhere").await.unwrap(), None);
}

pub async fn fetch_leases_one_job_to_one_worker(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    let a = new_id(q.enqueue(job("a")).await.unwrap());
    let b = new_id(q.enqueue(job("b")).await.unwrap());
    let other = q.enqueue(NewJob { queue: "mail".into(), ..job("c") }).await.unwrap();
    let j = take(&q, "w1").await;
    assert_eq!((j.id, j.state, j.worker.as_deref()), (a, JobState::Running, Some("w1")), "oldest first");
    assert_eq!(j.args, json!({"key": "a"}));
    let j2 = take(&q, "w2").await;
    assert_eq!(j2.id, b);
    assert!(q.fetch("default", "w3", Duration::from_secs(30)).await.unwrap().is_none(), "queues are separate");
    assert!(matches!(other, Enqueued::New(_)));
    assert!(matches!(q.ack(a, lease(&j2)).await, Err(JobError::NotLeased(_))), "only the lease holder acks");
    assert!(q.heartbeat(a, lease(&j), Duration::from_secs(30)).await.unwrap());
    assert!(!q.heartbeat(a, lease(&j2), Duration::from_secs(30)).await.unwrap());
    q.ack(a, lease(&j)).await.unwrap();
    assert!(matches!(q.ack(a, lease(&j)).await, Err(JobError::NotLeased(_))), "acked once");
    assert_eq!(q.count(JobState::Done).await.unwrap(), 1);

    // Eight workers race for three jobs: each job goes to exactly one.
    for k in ["p", "q", "r"] {
        q.enqueue(NewJob { queue: "race".into(), ..job(k) }).await.unwrap();
    }
    let got = futures::future::join_all((0..8).map(|i| {
        let q = q.clone();
        async move { q.fetch("race", &format!("racer-{i}"), Duration::from_secs(30)).await.unwrap() }
    }))
    .await;
    let ids: Vec<Uuid> = got.into_iter().flatten().map(|j| j.id).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 3, "no job leased twice");
}

pub async fn failures_retry_at_growing_delays_then_die(make: Make) {
    let (_g, q) = make(fast()).await;
    let id = new_id(q.enqueue(NewJob { max_attempts: Some(3), ..job("flaky") }).await.unwrap());
    let mut delays = Vec::new();
    for attempt in 1..=2u32 {
        let j = take(&q, "w").await;
        // The failure is stamped somewhere between `before` and `after`, so the real
        // delay lies in [at - after, at - before], however slow this machine is today.
        let before = chrono::Utc::now();
        let outcome = q.fail(j.id, lease(&j), &format!("boom {attempt}")).await.unwrap();
        let after = chrono::Utc::now();
        let Failed::Retry { at, failures } = outcome else { panic!("died after {attempt} failures of 3") };
        assert_eq!(failures, attempt);
        delays.push(((at - after).num_milliseconds(), (at - before).num_milliseconds()));
        let stored = q.get(id).await.unwrap().unwrap();
        assert_eq!((stored.state, stored.failures, stored.run_at), (JobState::Retry, attempt, at));
        assert_eq!(stored.last_error.as_deref(), Some(format!("boom {attempt}").as_str()));
        let failed_at = stored.failed_at.expect("a failed job records when");
        assert!(before <= failed_at && failed_at <= after, "{before} <= {failed_at} <= {after}");
        assert!(q.fetch("default", "w", Duration::from_secs(30)).await.unwrap().is_none(), "not ready before its time");
        promoted(&q, "the retry to come due").await;
        assert!(chrono::Utc::now() >= at, "promoted no earlier than its retry time");
    }
    // Sidekiq's schedule ÷ 100 without jitter: 150 ms, then 160 ms. Each bracket must
    // contain the exact delay (1 ms of rounding allowed).
    let holds = |(lo, hi): (i64, i64), exact: i64| lo - 1 <= exact && exact <= hi + 1;
    assert!(holds(delays[0], 150) && holds(delays[1], 160), "{delays:?}");
    let j = take(&q, "w").await;
    assert_eq!(q.fail(j.id, lease(&j), "final").await.unwrap(), Failed::Dead);
    let dead = q.get(id).await.unwrap().unwrap();
    assert_eq!((dead.state, dead.failures, dead.last_error.as_deref()), (JobState::Dead, 3, Some("final")));
    assert_eq!(q.promote_due().await.unwrap(), 0, "the dead stay dead");
    assert_eq!(
        q.enqueue(NewJob { max_attempts: Some(3), ..job("flaky") }).await.unwrap(),
        Enqueued::Duplicate(id),
        "a dead job holds its key"
    );
}

pub async fn dead_set_is_capped(make: Make) {
    let (_g, q) = make(QueueConfig { dead_max_jobs: 3, ..QueueConfig::default() }).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(new_id(q.enqueue(NewJob { max_attempts: Some(1), ..job(&format!("d{i}")) }).await.unwrap()));
        let j = take(&q, "w").await;
        assert_eq!(q.fail(j.id, lease(&j), "no").await.unwrap(), Failed::Dead);
    }
    assert_eq!(q.count(JobState::Dead).await.unwrap(), 3);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(q.get(*id).await.unwrap().is_some(), i >= 2, "dead job {i}: the oldest go first");
    }
    // A trimmed job's key is free again; a buried one's is not.
    assert!(matches!(q.enqueue(NewJob { max_attempts: Some(1), ..job("d0") }).await.unwrap(), Enqueued::New(_)));
    assert_eq!(q.enqueue(job("d4")).await.unwrap(), Enqueued::Duplicate(ids[4]));
}

pub async fn scheduled_jobs_wait_for_their_time(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let id = new_id(q.enqueue(NewJob { run_at: Some(at), ..job("later") }).await.unwrap());
    assert_eq!(q.get(id).await.unwrap().unwrap().state, JobState::Scheduled);
    assert_eq!(q.enqueue(job("later")).await.unwrap(), Enqueued::Duplicate(id), "a scheduled job holds its key");
    assert!(q.fetch("default", "w", Duration::from_secs(30)).await.unwrap().is_none());
    promoted(&q, "the scheduled job to come due").await;
    assert!(chrono::Utc::now() >= at, "promoted no earlier than its time");
    assert_eq!(q.fetch("default", "w", Duration::from_secs(30)).await.unwrap().map(|j| j.id), Some(id));
}

pub async fn reaper_returns_jobs_of_dead_workers(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    let id = new_id(q.enqueue(job("orphan")).await.unwrap());
    let stale = q.fetch("default", "w1", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(q.reap_expired().await.unwrap(), 0, "the lease still holds");
    // Shorten the lease to 100 ms (a worker that stopped heartbeating).
    assert!(q.heartbeat(id, lease(&stale), Duration::from_millis(100)).await.unwrap());
    wait_for("the expired lease to be reaped", Duration::from_secs(10), || {
        let q = q.clone();
        async move { (q.reap_expired().await.unwrap() == 1).then_some(()) }
    })
    .await;
    // The same worker name takes it again (a restarted process): a fresh lease.
    let again = take(&q, "w1").await;
    assert_eq!(again.id, id);
    assert_ne!(again.lease, stale.lease);
    assert!(matches!(q.ack(id, lease(&stale)).await, Err(JobError::NotLeased(_))), "the lapsed lease cannot ack");
    assert!(matches!(q.fail(id, lease(&stale), "late").await, Err(JobError::NotLeased(_))), "nor fail");
    assert!(!q.heartbeat(id, lease(&stale), Duration::from_secs(30)).await.unwrap(), "nor extend");
    q.ack(id, lease(&again)).await.unwrap();
}

pub async fn batches_lease_a_fair_share_and_ack_together(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    for i in 0..12 {
        new_id(q.enqueue(job(&format!("b{i}"))).await.unwrap());
    }
    // 12 ready, 4 workers: a fair share is 3, leased together under one lease.
    let first = q.fetch_many("default", "w1", Duration::from_secs(30), 10, 4).await.unwrap();
    assert_eq!(first.len(), 3, "a fair share");
    assert!(first
        .iter()
        .all(|j| j.state == JobState::Running && j.lease.is_some() && j.worker.as_deref() == Some("w1")));
    assert!(first.iter().all(|j| j.lease == first[0].lease), "one lease for the batch");
    assert_eq!(keys(&first), ["b0", "b1", "b2"], "oldest first");
    // One heartbeat extends the batch; a job of another lease does not count.
    assert!(q.heartbeat(first[2].id, lease(&first[0]), Duration::from_secs(30)).await.unwrap());
    assert!(!q.heartbeat(first[2].id, Uuid::new_v4(), Duration::from_secs(30)).await.unwrap());
    let mut taken: Vec<Job> = first;
    while let Some(more) =
        Some(q.fetch_many("default", "w2", Duration::from_secs(30), 10, 1).await.unwrap()).filter(|m| !m.is_empty())
    {
        taken.extend(more);
    }
    let ids: std::collections::HashSet<Uuid> = taken.iter().map(|j| j.id).collect();
    assert_eq!((taken.len(), ids.len()), (12, 12), "every job once");
    assert_eq!(keys(&taken[..1]), ["b0"], "oldest first");

    // Ack all but one under their leases, plus one stale lease: only the held count.
    let mut pairs: Vec<(Uuid, Uuid)> = taken[..11].iter().map(|j| (j.id, lease(j))).collect();
    pairs.push((taken[11].id, Uuid::new_v4()));
    let acked = q.ack_many(&pairs).await.unwrap();
    assert_eq!(acked, pairs[..11].iter().map(|p| p.0).collect::<Vec<_>>(), "the held ones, in order");
    assert_eq!(q.count(JobState::Done).await.unwrap(), 11);
    assert_eq!(q.get(taken[11].id).await.unwrap().unwrap().state, JobState::Running);
    assert!(q.ack_many(&pairs).await.unwrap().is_empty(), "acked once");
    assert!(q.ack_many(&[]).await.unwrap().is_empty());
}

pub async fn a_job_that_keeps_losing_its_worker_is_buried(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    let id = new_id(q.enqueue(job("poison")).await.unwrap());
    for round in 1..=eventra::jobs::MAX_REAPS {
        let j = take(&q, "w").await;
        // The worker dies: its lease runs out at once.
        assert!(q.heartbeat(id, lease(&j), Duration::ZERO).await.unwrap());
        wait_for("the lapsed lease to be reaped", Duration::from_secs(10), || {
            let q = q.clone();
            async move { (q.reap_expired().await.unwrap() == 1).then_some(()) }
        })
        .await;
        let state = q.get(id).await.unwrap().unwrap().state;
        let expected = if round < eventra::jobs::MAX_REAPS { JobState::Ready } else { JobState::Dead };
        assert_eq!(state, expected, "after {round} lapses");
    }
    let dead = q.get(id).await.unwrap().unwrap();
    assert_eq!(dead.failures, 0, "lapses are not failed attempts");
    assert!(dead.last_error.unwrap().contains("worker died under it"));
    assert_eq!(q.count(JobState::Running).await.unwrap(), 0);
}

pub async fn permanent_failures_skip_the_retries(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    let id = new_id(q.enqueue(job("hopeless")).await.unwrap());
    let j = take(&q, "w");
    let j = j.await;
    assert_eq!(j.max_attempts, 25, "the default attempts");
    q.bury(id, lease(&j), "bad address").await.unwrap();
    let dead = q.get(id).await.unwrap().unwrap();
    assert_eq!((dead.state, dead.failures, dead.last_error.as_deref()), (JobState::Dead, 1, Some("bad address")));
    assert!(matches!(q.bury(id, lease(&j), "again").await, Err(JobError::NotLeased(_))), "only under the lease");
    assert_eq!(q.list(&JobSet::Dead, None, 0, 10).await.unwrap().items.len(), 1);
}

/// Buries a new job with `key` (one attempt, failed).
async fn bury(q: &Arc<dyn JobQueue>, key: &str) -> Uuid {
    let id = new_id(q.enqueue(NewJob { max_attempts: Some(1), queue: "graveyard".into(), ..job(key) }).await.unwrap());
    let j = q.fetch("graveyard", "w", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(q.fail(j.id, lease(&j), &format!("{key} failed")).await.unwrap(), Failed::Dead);
    id
}

fn keys(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|j| j.idempotency_key.as_str()).collect()
}

pub async fn operators_list_filter_and_page(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    for k in ["alpha-0", "alpha-1", "alpha-2", "beta-0", "beta-1"] {
        new_id(q.enqueue(job(k)).await.unwrap());
    }
    new_id(q.enqueue(NewJob { queue: "mail".into(), ..job("mail-0") }).await.unwrap());
    let stats = q.queues().await.unwrap();
    let size = |name: &str| stats.iter().find(|s| s.name == name).map(|s| s.size);
    assert_eq!((size("default"), size("mail")), (Some(5), Some(1)), "{stats:?}");
    let default = stats.iter().find(|s| s.name == "default").unwrap();
    wait_for("the oldest job to age", Duration::from_secs(5), || {
        let q = q.clone();
        async move {
            let s = q.queues().await.unwrap();
            s.iter().find(|s| s.name == "default").is_some_and(|s| s.latency >= Duration::from_millis(20)).then_some(())
        }
    })
    .await;
    assert!(default.latency < Duration::from_secs(60), "{default:?}");

    // Pages of two, next to run first, until the end.
    let mut seen = Vec::new();
    let mut offset = Some(0);
    while let Some(o) = offset {
        let page = q.list(&JobSet::Queue("default".into()), None, o, 2).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|j| j.idempotency_key.clone()));
        offset = page.next_offset;
    }
    assert_eq!(seen, ["alpha-0", "alpha-1", "alpha-2", "beta-0", "beta-1"]);
    let betas = q.list(&JobSet::Queue("default".into()), Some("BETA"), 0, 10).await.unwrap();
    assert_eq!((keys(&betas.items), betas.next_offset), (vec!["beta-0", "beta-1"], None));
    let one = q.list(&JobSet::Queue("default".into()), Some("beta"), 0, 1).await.unwrap();
    let rest = q.list(&JobSet::Queue("default".into()), Some("beta"), one.next_offset.unwrap(), 1).await.unwrap();
    assert_eq!((keys(&one.items), keys(&rest.items)), (vec!["beta-0"], vec!["beta-1"]), "filtered pages");

    // Scheduled soonest first; dead newest first; running by lease.
    let soon = chrono::Utc::now() + chrono::Duration::hours(1);
    new_id(q.enqueue(NewJob { run_at: Some(soon + chrono::Duration::hours(1)), ..job("later") }).await.unwrap());
    new_id(q.enqueue(NewJob { run_at: Some(soon), ..job("sooner") }).await.unwrap());
    assert_eq!(keys(&q.list(&JobSet::Scheduled, None, 0, 10).await.unwrap().items), ["sooner", "later"]);
    bury(&q, "first-dead").await;
    bury(&q, "second-dead").await;
    assert_eq!(keys(&q.list(&JobSet::Dead, None, 0, 10).await.unwrap().items), ["second-dead", "first-dead"]);
    let dead = q.list(&JobSet::Dead, Some("FIRST-dead failed"), 0, 10).await.unwrap();
    assert_eq!(keys(&dead.items), ["first-dead"], "the filter reads the last error too");
    let running = take(&q, "w9").await;
    assert_eq!(keys(&q.list(&JobSet::Running, None, 0, 10).await.unwrap().items), [running.idempotency_key.as_str()]);
    assert!(q.list(&JobSet::Retry, None, 0, 10).await.unwrap().items.is_empty());
}

pub async fn operators_retry_kill_and_delete(make: Make) {
    let (_g, q) = make(QueueConfig::default()).await;
    // A dead job, retried now, runs again; one more failure buries it again (its
    // attempts are spent), as in Sidekiq.
    let dead = bury(&q, "dead").await;
    assert_eq!(q.retry_now(dead).await.unwrap(), Acted::Done);
    let again = q.fetch("graveyard", "w", Duration::from_secs(30)).await.unwrap().expect("retried now");
    assert_eq!((again.id, again.state), (dead, JobState::Running));
    // A running job says since when; the stored job says the same.
    let since = again.started_at.expect("a running job has started_at");
    assert!((chrono::Utc::now() - since).num_seconds().abs() < 5, "{since}");
    let stored = q.get(dead).await.unwrap().unwrap().started_at.expect("stored started_at");
    assert!((stored - since).num_milliseconds().abs() < 1000, "{stored} vs {since}");
    assert_eq!(q.count(JobState::Dead).await.unwrap(), 0);
    assert_eq!(q.fail(dead, lease(&again), "still broken").await.unwrap(), Failed::Dead);
    assert_eq!(q.get(dead).await.unwrap().unwrap().started_at, None, "only while running");

    // A snoozed job waits without spending an attempt; a stale lease cannot snooze.
    let napper = new_id(q.enqueue(job("napper")).await.unwrap());
    let j = take(&q, "w").await;
    assert_eq!(j.id, napper);
    assert!(matches!(q.snooze(napper, Uuid::now_v7(), Duration::from_secs(60)).await, Err(JobError::NotLeased(_))));
    q.snooze(napper, lease(&j), Duration::from_secs(3600)).await.unwrap();
    let napping = q.get(napper).await.unwrap().unwrap();
    assert_eq!((napping.state, napping.failures), (JobState::Retry, 0), "no attempt counted");
    assert!(napping.run_at > chrono::Utc::now() + chrono::Duration::minutes(59));
    assert_eq!(q.delete(napper).await.unwrap(), Acted::Done);

    // A job waiting for its first retry (15 s or more away) runs now.
    let flaky = new_id(q.enqueue(job("flaky")).await.unwrap());
    let j = take(&q, "w").await;
    assert!(matches!(q.fail(flaky, lease(&j), "boom").await.unwrap(), Failed::Retry { .. }));
    assert_eq!(q.retry_now(flaky).await.unwrap(), Acted::Done);
    assert_eq!(take(&q, "w").await.id, flaky);
    // Running jobs refuse every action; missing ones are not found.
    for act in [q.retry_now(flaky).await, q.kill(flaky).await, q.delete(flaky).await] {
        assert_eq!(act.unwrap(), Acted::Refused(JobState::Running));
    }
    for act in [q.retry_now(Uuid::now_v7()).await, q.kill(Uuid::now_v7()).await, q.delete(Uuid::now_v7()).await] {
        assert_eq!(act.unwrap(), Acted::NotFound);
    }

    // Kill a scheduled and a ready job: dead, with a reason; killing again changes nothing.
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    let scheduled = new_id(q.enqueue(NewJob { run_at: Some(at), ..job("scheduled") }).await.unwrap());
    let ready = new_id(q.enqueue(job("ready")).await.unwrap());
    for id in [scheduled, ready, scheduled] {
        assert_eq!(q.kill(id).await.unwrap(), Acted::Done);
        let j = q.get(id).await.unwrap().unwrap();
        assert_eq!((j.state, j.last_error.as_deref()), (JobState::Dead, Some("killed by an operator")));
    }
    assert_eq!(q.count(JobState::Scheduled).await.unwrap(), 0);
    assert!(q.fetch("default", "w", Duration::from_secs(30)).await.unwrap().is_none(), "the killed job left its queue");
    assert_eq!(q.count(JobState::Dead).await.unwrap(), 3);

    // Deleting a dead job frees its key.
    assert_eq!(q.delete(ready).await.unwrap(), Acted::Done);
    assert!(q.get(ready).await.unwrap().is_none());
    assert!(matches!(q.enqueue(job("ready")).await.unwrap(), Enqueued::New(_)));

    // Kill every scheduled job (two) and nothing else; the dead set cannot be killed.
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut later = Vec::new();
    for key in ["later-1", "later-2"] {
        later.push(new_id(q.enqueue(NewJob { run_at: Some(at), ..job(key) }).await.unwrap()));
    }
    assert_eq!(q.kill_all(&JobSet::Scheduled).await.unwrap(), 2);
    assert_eq!((q.count(JobState::Scheduled).await.unwrap(), q.count(JobState::Dead).await.unwrap()), (0, 4));
    assert_eq!(q.kill_all(&JobSet::Dead).await.unwrap(), 0);
    for id in later {
        let killed = q.get(id).await.unwrap().unwrap();
        assert_eq!((killed.state, killed.last_error.as_deref()), (JobState::Dead, Some("killed by an operator")));
        assert_eq!(q.delete(id).await.unwrap(), Acted::Done);
    }

    // Retry all the dead (2), then delete a whole queue.
    assert_eq!(q.retry_all(&JobSet::Dead).await.unwrap(), 2);
    assert_eq!((q.count(JobState::Dead).await.unwrap(), q.count(JobState::Ready).await.unwrap()), (0, 3));
    assert_eq!(q.delete_all(&JobSet::Queue("default".into())).await.unwrap(), 2);
    assert_eq!(q.count(JobState::Ready).await.unwrap(), 1, "only the graveyard queue's job is left");
    assert!(matches!(q.enqueue(job("scheduled")).await.unwrap(), Enqueued::New(_)), "deleted keys are free");
    assert_eq!(q.delete_all(&JobSet::Queue("graveyard".into())).await.unwrap(), 1);
}

/// Instantiates every conformance function once per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;

            fn make(config: QueueConfig) -> futures::future::BoxFuture<'static, (Box<dyn std::any::Any + Send>, Arc<dyn JobQueue>)> {
                Box::pin(async move {
                    let db = crate::utils::TestDb::sqlite();
                    let store = eventra::store::SqliteStore::connect(db.url(), 4).await.expect("sqlite");
                    eventra::store::Store::migrate(&store).await.expect("migrate");
                    let q: Arc<dyn JobQueue> = Arc::new(eventra::jobs::SqliteJobQueue::new(store.pools(), config));
                    (Box::new(db) as Box<dyn std::any::Any + Send>, q)
                })
            }

            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(make).await;
                }
            )*
        }

        mod redis {
            use super::*;

            fn make(config: QueueConfig) -> futures::future::BoxFuture<'static, (Box<dyn std::any::Any + Send>, Arc<dyn JobQueue>)> {
                Box::pin(async move {
                    let url = std::env::var("REDIS_URL").expect("checked by the test");
                    let ns = crate::utils::RedisNamespace::new(&url);
                    let q = eventra::jobs::RedisJobQueue::connect(&url, &ns.ns, config).await.expect("connect to Redis at REDIS_URL");
                    (Box::new(ns) as Box<dyn std::any::Any + Send>, Arc::new(q) as Arc<dyn JobQueue>)
                })
            }

            $(
                #[tokio::test]
                async fn $name() {
                    if crate::utils::service_url("REDIS_URL", concat!("job_queue_conformance::redis::", stringify!($name))).is_none() {
                        return;
                    }
                    super::$name(make).await;
                }
            )*
        }
    };
}

conformance!(
    enqueue_is_idempotent_by_key,
    head_is_the_next_job_and_its_age,
    fetch_leases_one_job_to_one_worker,
    failures_retry_at_growing_delays_then_die,
    dead_set_is_capped,
    scheduled_jobs_wait_for_their_time,
    reaper_returns_jobs_of_dead_workers,
    batches_lease_a_fair_share_and_ack_together,
    permanent_failures_skip_the_retries,
    a_job_that_keeps_losing_its_worker_is_buried,
    operators_list_filter_and_page,
    operators_retry_kill_and_delete,
);

/// Redis forgets cached scripts on restart (or `SCRIPT FLUSH`): the queue must reload them.
#[tokio::test]
async fn redis_queue_survives_a_script_flush() {
    let Some(url) =
        crate::utils::service_url("REDIS_URL", "job_queue_conformance::redis_queue_survives_a_script_flush")
    else {
        return;
    };
    use fred::prelude::*;
    let ns = crate::utils::RedisNamespace::new(&url);
    let q = eventra::jobs::RedisJobQueue::connect(&url, &ns.ns, QueueConfig::default()).await.unwrap();
    new_id(q.enqueue(job("before")).await.unwrap());
    let admin = Builder::from_config(Config::from_url(&url).unwrap()).build().unwrap();
    admin.init().await.unwrap();
    let _: () = admin.script_flush(false).await.unwrap();
    new_id(q.enqueue(job("after")).await.unwrap());
    let first = q.fetch("default", "w", Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(first.idempotency_key, "before");
    q.ack(first.id, first.lease.unwrap()).await.unwrap();
}
