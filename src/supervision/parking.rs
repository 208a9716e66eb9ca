//! Poison-message parking.
//!
//! A worker that crashes on a message loses its mailbox with it, so a message that
//! must survive the crash cannot live in the mailbox. [`WorkQueue`] holds the messages
//! of a [`QueueWorker`] outside the actor and remembers which one is in flight. When the
//! worker dies, its supervisor asks the queue (through [`ParkingHook`]) whether the
//! in-flight message has now failed `max_failures` times: if so the supervisor parks it
//! in the dead-letter queue with the reason, and the restarted worker goes on with the
//! next message; if not, the restarted worker tries the same message again.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Default number of failures after which a message is parked.
pub const DEFAULT_MAX_FAILURES: u32 = 3;

/// A parked message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: Uuid,
    /// The actor (tree name) whose handler kept failing on it.
    pub source: String,
    /// The message's own id (event id, job id…), for idempotent replays.
    pub message_id: String,
    pub payload: Value,
    /// The last failure, as the supervisor saw it.
    pub reason: String,
    /// How many times it was delivered and failed.
    pub failures: u32,
    pub parked_at: DateTime<Utc>,
}

/// Where parked messages go (the store's `dead_letters` table today).
#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    async fn park(&self, letter: &DeadLetter) -> Result<(), String>;
}

/// What a message looks like to the dead-letter queue.
pub struct Poison {
    pub message_id: String,
    pub payload: Value,
    pub failures: u32,
}

/// Asked by a supervisor after its child failed.
pub trait ParkingHook: Send + Sync + 'static {
    /// Records a failure of the in-flight message; returns a copy of it when it has
    /// failed too often and must be parked. It stays in flight until [`parked`].
    ///
    /// [`parked`]: ParkingHook::parked
    fn on_failure(&self) -> Option<Poison>;
    /// The dead-letter queue has the message: drop it from the queue.
    fn parked(&self);
}

/// Messages a [`QueueWorker`] handles.
pub trait Work: Clone + Send + Sync + 'static {
    fn id(&self) -> String;
    /// The JSON stored in the dead-letter queue…
    fn payload(&self) -> Value;
    /// …and read back from it on replay.
    fn from_payload(payload: &Value) -> Option<Self>;
}

/// Puts a parked message back where it came from (`POST /v1/admin/dlq/{id}/replay`).
pub trait Replay: Send + Sync + 'static {
    fn replay(&self, letter: &DeadLetter) -> Result<(), String>;
}

/// Replay targets by source (tree name), registered by whoever runs parkable workers.
#[derive(Default)]
pub struct ReplayTargets {
    targets: Mutex<std::collections::HashMap<String, Arc<dyn Replay>>>,
}

impl ReplayTargets {
    pub fn register(&self, source: impl Into<String>, target: Arc<dyn Replay>) {
        self.targets.lock().unwrap_or_else(|p| p.into_inner()).insert(source.into(), target);
    }

    pub fn get(&self, source: &str) -> Option<Arc<dyn Replay>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner()).get(source).cloned()
    }
}

/// Handles one message; `Err` (or a panic) fails the worker actor.
#[async_trait]
pub trait WorkHandler<W: Work>: Send + Sync + 'static {
    async fn handle(&self, work: W) -> Result<(), String>;
}

struct QueueState<W> {
    queue: VecDeque<W>,
    /// The message being handled and how often it has failed so far.
    in_flight: Option<(W, u32)>,
    /// The current worker, woken on push; replaced on restart.
    worker: Option<ActorRef<WorkerMsg>>,
}

/// A worker's message queue that outlives the worker actor.
pub struct WorkQueue<W> {
    state: Mutex<QueueState<W>>,
    max_failures: u32,
}

impl<W: Work> WorkQueue<W> {
    pub fn new(max_failures: u32) -> Arc<Self> {
        Arc::new(WorkQueue {
            state: Mutex::new(QueueState { queue: VecDeque::new(), in_flight: None, worker: None }),
            max_failures: max_failures.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState<W>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a message and wakes the worker.
    pub fn push(&self, work: W) {
        let worker = {
            let mut s = self.lock();
            s.queue.push_back(work);
            s.worker.clone()
        };
        if let Some(w) = worker {
            let _ = w.cast(WorkerMsg::Poll);
        }
    }

    /// Queued plus in-flight messages.
    pub fn depth(&self) -> usize {
        let s = self.lock();
        s.queue.len() + usize::from(s.in_flight.is_some())
    }

    /// The message to handle next: the one that was in flight when the last worker died,
    /// else the head of the queue.
    fn next(&self) -> Option<W> {
        let mut s = self.lock();
        if let Some((w, _)) = &s.in_flight {
            return Some(w.clone());
        }
        let w = s.queue.pop_front()?;
        s.in_flight = Some((w.clone(), 0));
        Some(w)
    }

    fn done(&self) {
        self.lock().in_flight = None;
    }

    fn attach(&self, worker: ActorRef<WorkerMsg>) {
        self.lock().worker = Some(worker);
    }
}

impl<W: Work> ParkingHook for WorkQueue<W> {
    fn on_failure(&self) -> Option<Poison> {
        let mut s = self.lock();
        let (w, failures) = s.in_flight.as_mut()?;
        *failures += 1;
        if *failures < self.max_failures {
            return None;
        }
        Some(Poison { message_id: w.id(), payload: w.payload(), failures: *failures })
    }

    fn parked(&self) {
        self.lock().in_flight = None;
    }
}

impl<W: Work> Replay for WorkQueue<W> {
    fn replay(&self, letter: &DeadLetter) -> Result<(), String> {
        let work = W::from_payload(&letter.payload)
            .ok_or_else(|| format!("payload of {} is not a message of this queue", letter.id))?;
        self.push(work);
        Ok(())
    }
}

/// A worker's only message: "look at your queue".
pub enum WorkerMsg {
    Poll,
}

/// An actor that drains a [`WorkQueue`] one message at a time.
pub struct QueueWorker<W, H> {
    _work: PhantomData<fn() -> W>,
    _handler: PhantomData<fn() -> H>,
}

impl<W, H> Default for QueueWorker<W, H> {
    fn default() -> Self {
        QueueWorker { _work: PhantomData, _handler: PhantomData }
    }
}

/// The worker's queue and handler (its state, shared with the supervisor's start function).
pub struct QueueWorkerArgs<W, H> {
    pub queue: Arc<WorkQueue<W>>,
    pub handler: Arc<H>,
}

impl<W: Work, H: WorkHandler<W>> Actor for QueueWorker<W, H> {
    type Msg = WorkerMsg;
    type State = QueueWorkerArgs<W, H>;
    type Arguments = QueueWorkerArgs<W, H>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.queue.attach(myself.clone());
        // Pick up whatever is waiting, including a message whose handling crashed.
        myself.cast(WorkerMsg::Poll)?;
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let WorkerMsg::Poll = msg;
        let Some(work) = state.queue.next() else { return Ok(()) };
        let id = work.id();
        state.handler.handle(work).await.map_err(|e| format!("message {id}: {e}"))?;
        state.queue.done();
        if state.queue.depth() > 0 {
            myself.cast(WorkerMsg::Poll)?;
        }
        Ok(())
    }
}
