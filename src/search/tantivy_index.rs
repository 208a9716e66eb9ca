//! The embedded search index: tantivy on disk (`<data dir>/index/users`).
//!
//! Schema: `tenant_id` and `user_id` (raw, stored), `name` and `email` (stored),
//! `prefix` (every prefix of every word, raw), `word` (every whole word, raw; ranks
//! whole-word matches first), `email_exact` (the lowercased address), `version` (stored).
//! Writes go through one `IndexWriter` behind a mutex with group commit (changes that
//! arrive while a commit runs share the next one); the reader is reloaded after each
//! commit, so a change is searchable when `apply` returns.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, Value, STORED, STRING};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};
use uuid::Uuid;

use super::{prefixes, query_prefix, words, Hits, IndexOp, SearchError, SearchIndex, SearchResult, UserDoc};

#[derive(Clone, Copy)]
struct Fields {
    tenant_id: Field,
    user_id: Field,
    name: Field,
    email: Field,
    prefix: Field,
    word: Field,
    email_exact: Field,
    version: Field,
}

pub struct TantivyIndex {
    fields: Fields,
    reader: IndexReader,
    writer: Arc<Mutex<IndexWriter>>,
    /// Changes waiting for the next commit, and who waits for it (group commit).
    pending: Mutex<Pending>,
}

/// Group commit: concurrent `apply` calls queue their changes here; whoever holds the
/// writer next commits them all at once and tells every waiter, so a commit (an fsync)
/// is shared by everything that arrived while the previous one ran.
#[derive(Default)]
struct Pending {
    ops: Vec<IndexOp>,
    waiters: Vec<std::sync::mpsc::Sender<Result<(), String>>>,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let fields = Fields {
        tenant_id: b.add_text_field("tenant_id", STRING | STORED),
        user_id: b.add_text_field("user_id", STRING | STORED),
        name: b.add_text_field("name", STORED),
        email: b.add_text_field("email", STORED),
        prefix: b.add_text_field("prefix", STRING),
        word: b.add_text_field("word", STRING),
        email_exact: b.add_text_field("email_exact", STRING),
        version: b.add_i64_field("version", STORED),
    };
    (b.build(), fields)
}

fn backend(e: impl std::fmt::Display) -> SearchError {
    SearchError::Backend(e.to_string())
}

impl TantivyIndex {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path) -> SearchResult<Self> {
        std::fs::create_dir_all(dir).map_err(backend)?;
        let (schema, fields) = schema();
        let directory = tantivy::directory::MmapDirectory::open(dir).map_err(backend)?;
        let index = Index::open_or_create(directory, schema)?;
        Self::with_index(index, fields)
    }

    /// An index in memory (tests, tools).
    pub fn in_memory() -> SearchResult<Self> {
        let (schema, fields) = schema();
        Self::with_index(Index::create_in_ram(schema), fields)
    }

    fn with_index(index: Index, fields: Fields) -> SearchResult<Self> {
        let writer: IndexWriter = index.writer(50_000_000)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(TantivyIndex {
            fields,
            reader,
            writer: Arc::new(Mutex::new(writer)),
            pending: Mutex::new(Pending::default()),
        })
    }

    fn user_term(&self, user_id: Uuid) -> Term {
        Term::from_field_text(self.fields.user_id, &user_id.to_string())
    }

    /// The stored version of a user, if indexed.
    fn indexed_version(&self, user_id: Uuid) -> SearchResult<Option<i64>> {
        let searcher = self.reader.searcher();
        let query = TermQuery::new(self.user_term(user_id), IndexRecordOption::Basic);
        let top = searcher.search(&query, &TopDocs::with_limit(1).order_by_score())?;
        let Some((_, address)) = top.first() else { return Ok(None) };
        let doc: TantivyDocument = searcher.doc(*address)?;
        Ok(doc.get_first(self.fields.version).and_then(|v| v.as_i64()))
    }

    fn user_doc(&self, u: &UserDoc) -> TantivyDocument {
        let f = self.fields;
        let mut d = doc!(
            f.tenant_id => u.tenant_id.to_string(),
            f.user_id => u.user_id.to_string(),
            f.name => u.name.clone(),
            f.email => u.email.clone(),
            f.email_exact => u.email.to_lowercase(),
            f.version => u.version,
        );
        let mut all = words(&u.name);
        all.extend(words(&u.email));
        all.sort();
        all.dedup();
        let mut seen = std::collections::HashSet::new();
        for w in &all {
            d.add_text(f.word, w);
            for p in prefixes(w) {
                if seen.insert(p.clone()) {
                    d.add_text(f.prefix, &p);
                }
            }
        }
        d
    }

    fn apply_blocking(&self, ops: &[IndexOp]) -> SearchResult<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut pending = self.pending.lock().map_err(|_| backend("index queue poisoned"))?;
            pending.ops.extend_from_slice(ops);
            pending.waiters.push(tx);
        }
        {
            let mut writer = self.writer.lock().map_err(|_| backend("index writer poisoned"))?;
            let batch = std::mem::take(&mut *self.pending.lock().map_err(|_| backend("index queue poisoned"))?);
            if !batch.waiters.is_empty() {
                let result = self.commit(&mut writer, &batch.ops).map_err(|e| e.to_string());
                for waiter in batch.waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        }
        // Ours was committed by us or by whoever held the writer before us.
        rx.recv().map_err(backend)?.map_err(SearchError::Backend)
    }

    /// Applies a batch and commits it; makes it visible to searches.
    fn commit(&self, writer: &mut IndexWriter, ops: &[IndexOp]) -> SearchResult<()> {
        // The newest version seen per user in this batch (the index itself only shows
        // what was committed before it).
        let mut newest: std::collections::HashMap<Uuid, i64> = std::collections::HashMap::new();
        for op in ops {
            match op {
                IndexOp::UpsertUser(u) => {
                    // Never go back to an older version (events may arrive out of order).
                    let seen = newest.get(&u.user_id).copied();
                    let indexed = if seen.is_some() { seen } else { self.indexed_version(u.user_id)? };
                    if indexed.is_some_and(|v| v > u.version) {
                        continue;
                    }
                    newest.insert(u.user_id, u.version);
                    writer.delete_term(self.user_term(u.user_id));
                    writer.add_document(self.user_doc(u))?;
                }
                IndexOp::DeleteUser { user_id, .. } => {
                    writer.delete_term(self.user_term(*user_id));
                }
                IndexOp::DeleteTenant { tenant_id } => {
                    writer.delete_term(Term::from_field_text(self.fields.tenant_id, &tenant_id.to_string()));
                }
            }
        }
        writer.commit()?;
        self.reader.reload()?;
        Ok(())
    }

    fn search_blocking(&self, tenant_id: Uuid, q: &str, offset: u32, limit: u32) -> SearchResult<Hits<UserDoc>> {
        let f = self.fields;
        let query_words = words(q);
        if query_words.is_empty() {
            return Ok(Hits { items: Vec::new(), next_offset: None });
        }
        let tenant: Box<dyn Query> = Box::new(TermQuery::new(
            Term::from_field_text(f.tenant_id, &tenant_id.to_string()),
            IndexRecordOption::Basic,
        ));
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, tenant)];
        for w in &query_words {
            let prefix =
                TermQuery::new(Term::from_field_text(f.prefix, &query_prefix(w)), IndexRecordOption::WithFreqs);
            clauses.push((Occur::Must, Box::new(prefix)));
            let whole = TermQuery::new(Term::from_field_text(f.word, w), IndexRecordOption::WithFreqs);
            clauses.push((Occur::Should, Box::new(BoostQuery::new(Box::new(whole), 2.0))));
        }
        let exact =
            TermQuery::new(Term::from_field_text(f.email_exact, &q.trim().to_lowercase()), IndexRecordOption::Basic);
        clauses.push((Occur::Should, Box::new(BoostQuery::new(Box::new(exact), 5.0))));
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let limit = limit.max(1);
        let top = searcher
            .search(&query, &TopDocs::with_limit(limit as usize + 1).and_offset(offset as usize).order_by_score())?;
        let more = top.len() > limit as usize;
        let mut items = Vec::with_capacity(top.len().min(limit as usize));
        for (_, address) in top.into_iter().take(limit as usize) {
            let d: TantivyDocument = searcher.doc(address)?;
            let text = |field: Field| d.get_first(field).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            items.push(UserDoc {
                tenant_id: text(f.tenant_id).parse().map_err(backend)?,
                user_id: text(f.user_id).parse().map_err(backend)?,
                email: text(f.email),
                name: text(f.name),
                version: d.get_first(f.version).and_then(|v| v.as_i64()).unwrap_or_default(),
            });
        }
        Ok(Hits { items, next_offset: more.then_some(offset + limit) })
    }
}

#[async_trait]
impl SearchIndex for Arc<TantivyIndex> {
    fn backend(&self) -> &'static str {
        "tantivy"
    }

    async fn apply(&self, ops: &[IndexOp]) -> SearchResult<()> {
        let (index, ops) = (self.clone(), ops.to_vec());
        tokio::task::spawn_blocking(move || index.apply_blocking(&ops)).await.map_err(backend)?
    }

    async fn search_users(&self, tenant_id: Uuid, q: &str, offset: u32, limit: u32) -> SearchResult<Hits<UserDoc>> {
        let (index, q) = (self.clone(), q.to_owned());
        tokio::task::spawn_blocking(move || index.search_blocking(tenant_id, &q, offset, limit))
            .await
            .map_err(backend)?
    }
}
