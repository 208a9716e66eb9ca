//! Search: tenant-scoped full-text search over users, behind one [`SearchIndex`] trait.
//! tantivy on disk under `data/` is the embedded default ([`TantivyIndex`]); the
//! OpenSearch adapter and the audit-log index come with the rest of the search issue.
//!
//! Matching is "as people type": every word of a name or email is indexed with all its
//! prefixes (up to [`MAX_PREFIX`] characters), and every word of the query must prefix a
//! word of the document. Whole-word and exact-email matches rank first. Every document
//! carries its tenant id and every query is filtered by it.

pub mod reindex;
mod tantivy_index;

use async_trait::async_trait;
use serde::Serialize;
use uuid::Uuid;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOp {
    UpsertUser(UserDoc),
    DeleteUser { tenant_id: Uuid, user_id: Uuid },
    DeleteTenant { tenant_id: Uuid },
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
