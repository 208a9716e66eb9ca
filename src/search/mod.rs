//! Search: tenant-scoped full-text search over users and the audit log, behind one
//! [`SearchIndex`] trait. tantivy on disk under `data/index/` is the embedded default
//! ([`TantivyIndex`]); OpenSearch ([`OpenSearchIndex`]) is the scale-out engine.
//!
//! Matching is "as people type": every word of a name or email (or of an audit entry's
//! text) is indexed with all its prefixes (up to [`MAX_PREFIX`] characters), and every
//! word of the query must prefix a word of the document. Whole-word and exact-email
//! matches rank first. Every document carries its tenant id and every query is filtered
//! by it.

mod opensearch;
pub mod reindex;
mod tantivy_index;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::domain::{AuditEntry, Page, PageRequest};
use crate::store::AuditFilter;

pub use self::opensearch::OpenSearchIndex;
pub use tantivy_index::TantivyIndex;

/// Longest indexed prefix of a word; longer query words are cut to it.
pub const MAX_PREFIX: usize = 20;

/// A user as the index holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserDoc {
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    /// The user's version: an index never goes back to an older one.
    pub version: i64,
}

/// One change to the index.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexOp {
    UpsertUser(UserDoc),
    DeleteUser {
        tenant_id: Uuid,
        user_id: Uuid,
    },
    /// Removes the tenant's users. Its audit entries stay: the trail outlives the tenant.
    DeleteTenant {
        tenant_id: Uuid,
    },
    /// Removes the tenant's user documents last written before `before` (what a reindex
    /// that started then did not rewrite: users gone from the database).
    PruneTenant {
        tenant_id: Uuid,
        before: chrono::DateTime<chrono::Utc>,
    },
    /// Adds an audit entry (idempotent by event id: entries never change).
    UpsertAudit(AuditEntry),
}

/// A page of hits, best first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hits<T> {
    pub items: Vec<T>,
    /// Where the next page starts, if there may be one.
    pub next_offset: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search index: {0}")]
    Backend(String),
}

impl From<::opensearch::Error> for SearchError {
    fn from(e: ::opensearch::Error) -> Self {
        SearchError::Backend(format!("opensearch: {e}"))
    }
}

impl From<tantivy::TantivyError> for SearchError {
    fn from(e: tantivy::TantivyError) -> Self {
        SearchError::Backend(e.to_string())
    }
}

pub type SearchResult<T> = Result<T, SearchError>;

#[async_trait]
pub trait SearchIndex: Send + Sync + 'static {
    /// `tantivy` or `opensearch`.
    fn backend(&self) -> &'static str;
    /// Applies a batch of changes (one bulk request / one commit); visible to searches
    /// when this returns.
    async fn apply(&self, ops: &[IndexOp]) -> SearchResult<()>;
    /// Users of `tenant_id` matching every word of `q` as a prefix, best first.
    async fn search_users(&self, tenant_id: Uuid, q: &str, offset: u32, limit: u32) -> SearchResult<Hits<UserDoc>>;
    /// Audit entries of `tenant_id` that pass `filter` (its `text`: every word must prefix
    /// a word of the entry's [`audit_text`]), oldest first (by event id), paged by cursor.
    async fn search_audit(
        &self,
        tenant_id: Uuid,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> SearchResult<Page<AuditEntry>>;
    /// Whether the engine answers (readiness).
    async fn ping(&self) -> SearchResult<()> {
        Ok(())
    }
}

/// Opens the configured engine: OpenSearch when `opensearch_url` is set (index names
/// under `namespace`), else tantivy under `<data dir>/index`, to write it (`writes`: the
/// process with the `indexer` role) or to follow the writes of the process that does.
pub async fn open(
    opensearch_url: Option<&str>,
    namespace: &str,
    data_dir: &Path,
    writes: bool,
) -> SearchResult<Arc<dyn SearchIndex>> {
    match opensearch_url {
        Some(url) => {
            let index = OpenSearchIndex::connect(url, namespace)?;
            if let Err(e) = index.ensure_indices().await {
                // Not fatal: the first write or search tries again.
                tracing::warn!(error = %e, "OpenSearch is not reachable yet; indices will be created on first use");
            }
            Ok(Arc::new(index))
        }
        None if writes => Ok(Arc::new(Arc::new(TantivyIndex::open(&data_dir.join("index"))?))),
        None => Ok(Arc::new(Arc::new(TantivyIndex::follow(&data_dir.join("index"))?))),
    }
}

/// The text an audit entry is found by: its type, subject, actor and every string or
/// number in its before/after states.
pub fn audit_text(entry: &AuditEntry) -> String {
    fn leaves(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|i| leaves(i, out)),
            Value::Object(map) => map.values().for_each(|i| leaves(i, out)),
            Value::Bool(_) | Value::Null => {}
        }
    }
    let mut out = vec![entry.event_type.clone(), entry.subject.clone()];
    if let Ok(actor) = serde_json::to_value(&entry.actor) {
        leaves(&actor, &mut out);
    }
    for state in [&entry.before, &entry.after].into_iter().flatten() {
        leaves(state, &mut out);
    }
    out.join(" ")
}

/// The words of a text as the index sees them: lowercased runs of letters and digits.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// Every prefix of `word` up to [`MAX_PREFIX`] characters.
pub fn prefixes(word: &str) -> impl Iterator<Item = String> + '_ {
    word.char_indices().map(|(i, c)| i + c.len_utf8()).take(MAX_PREFIX).map(move |end| word[..end].to_owned())
}

/// A query word as matched against indexed prefixes.
pub fn query_prefix(word: &str) -> String {
    word.chars().take(MAX_PREFIX).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_prefixes() {
        assert_eq!(
            words("Ada Lovelace-Byron <ADA@Example.com>"),
            ["ada", "lovelace", "byron", "ada", "example", "com"]
        );
        assert_eq!(prefixes("zoë").collect::<Vec<_>>(), ["z", "zo", "zoë"]);
        assert_eq!(prefixes(&"a".repeat(30)).count(), MAX_PREFIX);
        assert_eq!(query_prefix(&"b".repeat(30)).len(), MAX_PREFIX);
    }
}
