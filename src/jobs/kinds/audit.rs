//! `audit`: makes a batch of audit entries searchable. The broker consumer writes the
//! entries of each batch it takes to the database of record itself (counted in the
//! analytics in the same transaction, see `actors::event_consumer`) and enqueues ONE
//! `audit` job with those entries, so the job system carries one job per consumed
//! batch, not one per event.
//!
//! Args: `{"entries": [AuditEntry, …]}`. The index write is an upsert by event id, so a
//! redelivered batch (or two batches that overlap) indexes an entry again, harmlessly.
//!
//! A job in the older shape (its args one domain event, from a version that wrote the
//! entry in the job) is still run: the entry is written, then indexed. Both writes are
//! idempotent by event id.
//!
//! A leased batch of jobs is written together: one index change set (and, for older
//! jobs, one multi-row insert), so a round trip and an index commit are shared.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{JobContext, JobFailure, JobKind};
use crate::domain::{AuditEntry, DomainEvent};
use crate::jobs::{Job, NewJob};
use crate::search::{IndexOp, SearchIndex};
use crate::store::Store;

pub struct Audit {
    store: Arc<dyn Store>,
    index: Arc<dyn SearchIndex>,
}

impl Audit {
    pub fn new(store: Arc<dyn Store>, index: Arc<dyn SearchIndex>) -> Self {
        Audit { store, index }
    }
}

/// The args of an `audit` job.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditArgs {
    pub entries: Vec<AuditEntry>,
}

impl AuditArgs {
    /// The job that indexes `entries` (already written). Its key names the batch by its
    /// first event and size: a redelivery of the same batch adds no second job.
    pub fn job(entries: &[AuditEntry]) -> Option<NewJob> {
        let first = entries.first()?;
        let key = format!("audit:{}+{}", first.event_id, entries.len());
        let args = serde_json::to_value(AuditArgs { entries: entries.to_vec() }).ok()?;
        let mut job = NewJob::new("audit", key, args);
        job.queue = super::index::QUEUE.into();
        Some(job)
    }
}

/// What one job asks: entries to index, and whether they still need writing.
struct Parsed {
    entries: Vec<AuditEntry>,
    written: bool,
}

fn parse(job: &Job) -> Result<Parsed, JobFailure> {
    if job.args.get("entries").is_some() {
        let args = AuditArgs::deserialize(&job.args)
            .map_err(|e| JobFailure::permanent(format!("args are not audit entries: {e}")))?;
        return Ok(Parsed { entries: args.entries, written: true });
    }
    let event = DomainEvent::deserialize(&job.args)
        .map_err(|e| JobFailure::permanent(format!("args are neither audit entries nor a domain event: {e}")))?;
    Ok(Parsed { entries: vec![AuditEntry::from_event(&event)], written: false })
}

#[async_trait]
impl JobKind for Audit {
    fn name(&self) -> &'static str {
        "audit"
    }

    async fn run_batch(&self, jobs: &[&Job], _ctx: &JobContext) -> Vec<Result<(), JobFailure>> {
        let parsed: Vec<Result<Parsed, JobFailure>> = jobs.iter().map(|j| parse(j)).collect();
        let unwritten: Vec<AuditEntry> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .filter(|p| !p.written)
            .flat_map(|p| p.entries.iter().cloned())
            .collect();
        let ops: Vec<IndexOp> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .flat_map(|p| p.entries.iter().cloned().map(IndexOp::UpsertAudit))
            .collect();
        let done = async {
            if !unwritten.is_empty() {
                self.store.append_audit_many(&unwritten).await.map_err(JobFailure::new)?;
            }
            if ops.is_empty() {
                return Ok(());
            }
            self.index.apply(&ops).await.map_err(JobFailure::new)
        }
        .await;
        super::outcomes(parsed, &done)
    }
}
