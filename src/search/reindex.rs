//! `eventra reindex [--tenant ID]`: rebuilds the search index from the database of
//! record, tenant by tenant: rewrites every user and every audit entry in pages, then
//! prunes the tenant's user documents it did not rewrite (users gone from the database),
//! with a progress bar on stderr. Nothing is dropped first: searches keep answering
//! during a rebuild, and OpenSearch's external versions accept the rewrite (a delete
//! would leave a newer tombstone version behind). Run it with the server stopped when
//! the index is the embedded one (it has one writer).

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{IndexOp, SearchIndex, UserDoc};
use crate::domain::{Cursor, Page, PageRequest, Tenant};
use crate::store::{AuditFilter, Store};

/// Users (and audit entries) per page read and index batch (one commit each).
const BATCH: u32 = 2000;

/// What a reindex did.
#[derive(Debug, Clone, PartialEq)]
pub struct Reindexed {
    pub tenants: u64,
    pub users: u64,
    pub audit_entries: u64,
    pub elapsed: Duration,
}

pub async fn reindex(
    store: &Arc<dyn Store>,
    index: &Arc<dyn SearchIndex>,
    tenant: Option<Uuid>,
    progress: bool,
) -> Result<Reindexed, String> {
    let started = Instant::now();
    let tenants = match tenant {
        Some(id) => vec![store.get_tenant(id).await.map_err(|e| e.to_string())?],
        None => all_tenants(store).await?,
    };
    let total: u64 = tenants.iter().map(|t| u64::try_from(t.user_count).unwrap_or(0)).sum();
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} users ({per_sec}, eta {eta})")
        {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (mut users, mut audit_entries) = (0, 0);
    for t in &tenants {
        let tenant_started = chrono::Utc::now();
        let mut page = PageRequest { after: None, limit: BATCH };
        loop {
            let Page { items, next_cursor } = store.list_users(t.id, page).await.map_err(|e| e.to_string())?;
            let ops: Vec<IndexOp> = items
                .iter()
                .map(|u| {
                    IndexOp::UpsertUser(UserDoc {
                        tenant_id: u.tenant_id,
                        user_id: u.id,
                        email: u.email.clone(),
                        name: u.name.clone(),
                        version: u.version,
                    })
                })
                .collect();
            index.apply(&ops).await.map_err(|e| e.to_string())?;
            users += ops.len() as u64;
            bar.inc(ops.len() as u64);
            match (next_cursor, items.last()) {
                (Some(_), Some(last)) => page = PageRequest { after: Some(Cursor(last.id)), limit: BATCH },
                _ => break,
            }
        }
        index
            .apply(&[IndexOp::PruneTenant { tenant_id: t.id, before: tenant_started }])
            .await
            .map_err(|e| e.to_string())?;
        // Audit entries never change or go away: upserting them all is a rebuild.
        let mut page = PageRequest { after: None, limit: BATCH };
        loop {
            let Page { items, next_cursor } =
                store.list_audit(t.id, &AuditFilter::default(), page).await.map_err(|e| e.to_string())?;
            let last = items.last().map(|e| e.event_id);
            audit_entries += items.len() as u64;
            let ops: Vec<IndexOp> = items.into_iter().map(IndexOp::UpsertAudit).collect();
            index.apply(&ops).await.map_err(|e| e.to_string())?;
            match (next_cursor, last) {
                (Some(_), Some(id)) => page = PageRequest { after: Some(Cursor(id)), limit: BATCH },
                _ => break,
            }
        }
    }
    bar.finish_and_clear();
    Ok(Reindexed { tenants: tenants.len() as u64, users, audit_entries, elapsed: started.elapsed() })
}

async fn all_tenants(store: &Arc<dyn Store>) -> Result<Vec<Tenant>, String> {
    let mut out = Vec::new();
    let mut page = PageRequest { after: None, limit: 100 };
    loop {
        let Page { items, next_cursor } = store.list_tenants(page).await.map_err(|e| e.to_string())?;
        let last = items.last().map(|t| t.id);
        out.extend(items);
        match (next_cursor, last) {
            (Some(_), Some(id)) => page = PageRequest { after: Some(crate::domain::Cursor(id)), limit: 100 },
            _ => return Ok(out),
        }
    }
}
