//! `audit`: records the audit entry of one domain event (the job's args are the event):
//! first in the database of record, then in the search index. Idempotent by event id: a
//! redelivered event finds its entry already there, and a retry after an index failure
//! only indexes.
//!
//! A leased batch is written together: one multi-row insert (`ON CONFLICT (event_id) DO
//! NOTHING`) and one index change set, so the cost of a round trip and of an index
//! commit is shared by every entry of the batch.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{JobContext, JobFailure, JobKind};
use crate::domain::{AuditEntry, DomainEvent};
use crate::jobs::Job;
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

fn entry_of(job: &Job) -> Result<AuditEntry, JobFailure> {
    let event: DomainEvent = DomainEvent::deserialize(&job.args)
        .map_err(|e| JobFailure::permanent(format!("args are not a domain event: {e}")))?;
    Ok(AuditEntry::from_event(&event))
}

#[async_trait]
impl JobKind for Audit {
    fn name(&self) -> &'static str {
        "audit"
    }

    async fn run_batch(&self, jobs: &[&Job], _ctx: &JobContext) -> Vec<Result<(), JobFailure>> {
        let parsed: Vec<Result<AuditEntry, JobFailure>> = jobs.iter().map(|j| entry_of(j)).collect();
        let entries: Vec<AuditEntry> = parsed.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
        let written = async {
            if entries.is_empty() {
                return Ok(());
            }
            let new = self.store.append_audit_many(&entries).await.map_err(JobFailure::new)?;
            if new < entries.len() as u64 {
                tracing::debug!(already = entries.len() as u64 - new, "audit entries already recorded (redeliveries)");
            }
            let ops: Vec<IndexOp> = entries.iter().cloned().map(IndexOp::UpsertAudit).collect();
            self.index.apply(&ops).await.map_err(JobFailure::new)
        }
        .await;
        super::outcomes(parsed, &written)
    }
}
