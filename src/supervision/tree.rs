//! The live supervision tree as operators see it (`GET /debug/actors`) and chaos tests
//! address it (`POST /debug/actors/{name}/kill`).
//!
//! Supervisors report every start, failure, restart and stop here; the view is read off
//! this record rather than by messaging actors, so it answers even while a supervisor is
//! busy restarting children. Each app instance owns its own `Tree`: names are unique per
//! instance, not per process (several instances share one process in tests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use ractor::ActorCell;
use serde::Serialize;

use super::spec::{ChildKind, Strategy};

/// Lifecycle state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Restarting,
    Stopped,
    Failed,
}

/// Reads a mailbox depth (queued + in-process messages) where it can be known.
pub type Gauge = Arc<dyn Fn() -> usize + Send + Sync>;

/// Reads an actor's own figures (the indexer's queue, failures and breaker, say).
pub type StatsFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

struct Record {
    parent: Option<String>,
    kind: ChildKind,
    strategy: Option<Strategy>,
    status: Status,
    restarts: u32,
    last_failure: Option<String>,
    started_at: Option<DateTime<Utc>>,
    /// For kill requests; `None` while not running.
    cell: Option<ActorCell>,
    mailbox: Option<Gauge>,
    stats: Option<StatsFn>,
    /// Start order among siblings.
    order: u64,
}

/// One node of `GET /debug/actors` (the SPEC's node shape).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ActorNode {
    pub name: String,
    pub kind: ChildKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    pub status: Status,
    pub restarts: u32,
    pub last_failure: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<usize>,
    /// The actor's own figures, where it reports any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
    pub children: Vec<ActorNode>,
}

impl ActorNode {
    /// Every name in this subtree, depth first.
    pub fn names(&self) -> Vec<String> {
        let mut out = vec![self.name.clone()];
        for c in &self.children {
            out.extend(c.names());
        }
        out
    }

    pub fn find(&self, name: &str) -> Option<&ActorNode> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct Tree {
    nodes: Arc<Mutex<HashMap<String, Record>>>,
    order: Arc<AtomicU64>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        // A panic while holding this lock cannot leave a record half-written in a way
        // that matters for a diagnostic view: keep serving it.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node is (re)started and running as `cell`; restarts and failure history stay.
    pub fn started(&self, name: &str, parent: Option<&str>, kind: ChildKind, cell: ActorCell) {
        let order = self.order.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.lock();
        let rec = nodes.entry(name.to_owned()).or_insert_with(|| Record {
            parent: parent.map(str::to_owned),
            kind,
            strategy: None,
            status: Status::Running,
            restarts: 0,
            last_failure: None,
            started_at: None,
            cell: None,
            mailbox: None,
            stats: None,
            order,
        });
        rec.status = Status::Running;
        rec.started_at = Some(Utc::now());
        rec.cell = Some(cell);
    }

    pub fn set_strategy(&self, name: &str, strategy: Strategy) {
        if let Some(r) = self.lock().get_mut(name) {
            r.strategy = Some(strategy);
        }
    }

    pub fn set_mailbox(&self, name: &str, gauge: Gauge) {
        if let Some(r) = self.lock().get_mut(name) {
            r.mailbox = Some(gauge);
        }
    }

    pub fn set_stats(&self, name: &str, stats: StatsFn) {
        if let Some(r) = self.lock().get_mut(name) {
            r.stats = Some(stats);
        }
    }

    /// The node crashed (or was killed) with `reason`.
    pub fn failed(&self, name: &str, reason: &str) {
        if let Some(r) = self.lock().get_mut(name) {
            r.status = Status::Failed;
            r.last_failure = Some(reason.to_owned());
            r.cell = None;
        }
    }

    /// A restart of the node is under way (counted now).
    pub fn restarting(&self, name: &str) {
        if let Some(r) = self.lock().get_mut(name) {
            r.status = Status::Restarting;
            r.restarts += 1;
            r.cell = None;
        }
    }

    pub fn stopped(&self, name: &str) {
        if let Some(r) = self.lock().get_mut(name) {
            r.status = Status::Stopped;
            r.cell = None;
        }
    }

    /// Forgets a node and its whole subtree.
    pub fn remove(&self, name: &str) {
        let mut nodes = self.lock();
        let mut doomed = vec![name.to_owned()];
        while let Some(n) = doomed.pop() {
            // Only a supervisor has children to look for: forgetting a worker (one of
            // thousands of tenant managers) must not scan the whole tree.
            if nodes.remove(&n).is_some_and(|r| r.kind == ChildKind::Worker) {
                continue;
            }
            doomed
                .extend(nodes.iter().filter(|(_, r)| r.parent.as_deref() == Some(n.as_str())).map(|(k, _)| k.clone()));
        }
    }

    /// Forgets everything below a node (its children died with it).
    pub fn remove_descendants(&self, name: &str) {
        let kids: Vec<String> = {
            let nodes = self.lock();
            nodes.iter().filter(|(_, r)| r.parent.as_deref() == Some(name)).map(|(k, _)| k.clone()).collect()
        };
        for k in kids {
            self.remove(&k);
        }
    }

    /// The running actor of that name, for kill requests.
    pub fn cell(&self, name: &str) -> Option<ActorCell> {
        self.lock().get(name).and_then(|r| r.cell.clone())
    }

    pub fn restarts(&self, name: &str) -> Option<u32> {
        self.lock().get(name).map(|r| r.restarts)
    }

    pub fn status(&self, name: &str) -> Option<Status> {
        self.lock().get(name).map(|r| r.status)
    }

    /// The tree under the parentless node (the root), children in start order.
    pub fn snapshot(&self) -> Option<ActorNode> {
        let nodes = self.lock();
        let root = nodes.iter().filter(|(_, r)| r.parent.is_none()).min_by_key(|(_, r)| r.order)?.0.clone();
        Some(build(&nodes, &root))
    }
}

fn build(nodes: &HashMap<String, Record>, name: &str) -> ActorNode {
    let r = &nodes[name];
    let mut kids: Vec<(&String, &Record)> = nodes.iter().filter(|(_, c)| c.parent.as_deref() == Some(name)).collect();
    kids.sort_by_key(|(_, c)| c.order);
    ActorNode {
        name: name.to_owned(),
        kind: r.kind,
        strategy: r.strategy,
        status: r.status,
        restarts: r.restarts,
        last_failure: r.last_failure.clone(),
        started_at: r.started_at,
        mailbox: r.mailbox.as_ref().map(|g| g()),
        stats: r.stats.as_ref().map(|s| s()),
        children: kids.into_iter().map(|(n, _)| build(nodes, n)).collect(),
    }
}
