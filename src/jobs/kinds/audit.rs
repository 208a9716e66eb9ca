//! `audit`: records the audit entry of one domain event (the job's args are the event):
//! first in the database of record, then in the search index. Idempotent by event id: a
//! redelivered event finds its entry already there, and a retry after an index failure
//! only indexes.

use std::sync::Arc;

use async_trait::async_trait;

use super::{JobFailure, JobKind};
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

#[async_trait]
impl JobKind for Audit {
    fn name(&self) -> &'static str {
        "audit"
    }

    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let event: DomainEvent = serde_json::from_value(job.args.clone())
            .map_err(|e| JobFailure::permanent(format!("args are not a domain event: {e}")))?;
        let entry = AuditEntry::from_event(&event);
        let new = self.store.append_audit(&entry).await.map_err(JobFailure::new)?;
        if !new {
            tracing::debug!(event_id = %event.id, "audit entry already recorded");
        }
        self.index.apply(&[IndexOp::UpsertAudit(entry)]).await.map_err(JobFailure::new)?;
        Ok(())
    }
}
