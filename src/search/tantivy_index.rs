//! The embedded search index: tantivy on disk, one index per document kind under
//! `<data dir>/index/`: `users` and `audit`.
//!
//! Users: `tenant_id` and `user_id` (raw, stored), `name` and `email` (stored), `prefix`
//! (every prefix of every word, raw), `word` (every whole word, raw; ranks whole-word
//! matches first), `email_exact` (the lowercased address), `version` (stored),
//! `indexed_at` (microseconds of the write, indexed: what a reindex prunes by).
//! Audit: `event_id` (raw, stored, fast: the sort key and cursor), `tenant_id`, `type`
//! (raw), `at` (microseconds, indexed and fast: time ranges), `word` (every whole word of
//! the entry's text) and `entry` (the whole entry as stored JSON). Audit entries are
//! many and wordy (ids, states), so they keep whole words only and a query word matches
//! by a term-range scan (`[w, w + U+10FFFF)`) instead of indexed prefixes: the same
//! "every query word prefixes a word" rule at a tenth of the terms to write and merge.
//! That index lives in `audit.v2` (the prefix index of earlier versions, `audit`, is
//! left alone; `eventra reindex` rebuilds the new one from the database).
//!
//! Writes go through the two `IndexWriter`s behind one mutex with group commit (changes
//! that arrive while a commit runs share the next one); the readers are reloaded after
//! each commit, so a change is searchable when `apply` returns.
//!
//! One process writes an index directory (tantivy's writer lock: a second writer is
//! refused at start). Other processes on the same directory *follow* it
//! ([`TantivyIndex::follow`]): they search only, and their readers reload when the
//! writer commits (tantivy watches `meta.json`, about every half second). That is how
//! `api` processes without the `indexer` role search an embedded index.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, NumericOptions, Schema, Value, FAST, STORED, STRING};
use tantivy::{doc, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term};
use uuid::Uuid;

use super::{
    audit_text, prefixes, query_prefix, words, Hits, IndexOp, SearchError, SearchIndex, SearchResult, UserDoc,
};
use crate::domain::{AuditEntry, Page, PageRequest};
use crate::store::AuditFilter;

/// Memory budget of each writer (one indexing thread each: tantivy's minimum arena is
/// 15 MB a thread, and batches are small, so more threads would only cost memory).
const WRITER_HEAP: usize = 20_000_000;
const WRITER_THREADS: usize = 1;

#[derive(Clone, Copy)]
struct UserFields {
    tenant_id: Field,
    user_id: Field,
    name: Field,
    email: Field,
    prefix: Field,
    word: Field,
    email_exact: Field,
    version: Field,
    indexed_at: Field,
}

#[derive(Clone, Copy)]
struct AuditFields {
    event_id: Field,
    tenant_id: Field,
    event_type: Field,
    at: Field,
    word: Field,
    entry: Field,
}

fn user_schema() -> (Schema, UserFields) {
    let mut b = Schema::builder();
    let fields = UserFields {
        tenant_id: b.add_text_field("tenant_id", STRING | STORED),
        user_id: b.add_text_field("user_id", STRING | STORED),
        name: b.add_text_field("name", STORED),
        email: b.add_text_field("email", STORED),
        prefix: b.add_text_field("prefix", STRING),
        word: b.add_text_field("word", STRING),
        email_exact: b.add_text_field("email_exact", STRING),
        version: b.add_i64_field("version", STORED),
        indexed_at: b.add_i64_field("indexed_at", NumericOptions::default().set_indexed()),
    };
    (b.build(), fields)
}

fn audit_schema() -> (Schema, AuditFields) {
    let mut b = Schema::builder();
    let fields = AuditFields {
        event_id: b.add_text_field("event_id", STRING | STORED | FAST),
        tenant_id: b.add_text_field("tenant_id", STRING),
        event_type: b.add_text_field("type", STRING),
        at: b.add_i64_field("at", NumericOptions::default().set_indexed().set_fast()),
        word: b.add_text_field("word", STRING),
        entry: b.add_text_field("entry", STORED),
    };
    (b.build(), fields)
}

/// One tantivy index: its reader (searches) and its writer (behind the commit lock).
struct Part {
    reader: IndexReader,
}

struct Writers {
    users: IndexWriter,
    audit: IndexWriter,
}

pub struct TantivyIndex {
    users: UserFields,
    audit: AuditFields,
    user_part: Part,
    audit_part: Part,
    /// `None` in a follower: another process writes.
    writers: Option<Mutex<Writers>>,
    /// Changes waiting for the next commit, and who waits for it (group commit).
    pending: Mutex<Pending>,
}

/// Group commit: concurrent `apply` calls queue their changes here; whoever holds the
/// writers next commits them all at once and tells every waiter, so a commit (an fsync)
/// is shared by everything that arrived while the previous one ran.
#[derive(Default)]
struct Pending {
    ops: Vec<IndexOp>,
    waiters: Vec<std::sync::mpsc::Sender<Result<(), String>>>,
}

fn backend(e: impl std::fmt::Display) -> SearchError {
    SearchError::Backend(e.to_string())
}

fn open_dir(dir: &Path, schema: Schema) -> SearchResult<Index> {
    std::fs::create_dir_all(dir).map_err(backend)?;
    let directory = tantivy::directory::MmapDirectory::open(dir).map_err(backend)?;
    Index::open_or_create(directory, schema).map_err(|e| match e {
        tantivy::TantivyError::SchemaError(_) => SearchError::Backend(format!(
            "the index in {} was written by another version of Eventra ({e}); delete that \
             directory and run `eventra reindex` to rebuild it from the database",
            dir.display()
        )),
        e => e.into(),
    })
}

/// Segments below this many documents still form levels by size. tantivy's default
/// (10,000) puts every small segment in one level, so each merge there rewrites the
/// growing result again: with a commit every 100 ms that is most of the indexing work.
/// Geometric levels from 100 documents up keep the rewriting logarithmic.
const MIN_LAYER_SIZE: u32 = 100;

fn writer(index: &Index, dir: &str) -> SearchResult<IndexWriter> {
    let writer: IndexWriter = index.writer_with_num_threads(WRITER_THREADS, WRITER_HEAP).map_err(|e| match e {
        tantivy::TantivyError::LockFailure(tantivy::directory::error::LockError::LockBusy, _) => {
            SearchError::Backend(format!(
                "the search index in {dir} is written by another process (one indexer writes an embedded index): \
                 run the indexer role in one process only, or set OPENSEARCH_URL"
            ))
        }
        e => e.into(),
    })?;
    let mut policy = tantivy::indexer::LogMergePolicy::default();
    policy.set_min_layer_size(MIN_LAYER_SIZE);
    writer.set_merge_policy(Box::new(policy));
    Ok(writer)
}

/// The writer reloads its readers itself after each commit; a follower's reload when
/// the writer's commit lands on disk.
fn part(index: &Index, policy: ReloadPolicy) -> SearchResult<Part> {
    Ok(Part { reader: index.reader_builder().reload_policy(policy).try_into()? })
}

fn text_term(field: Field, text: &str) -> Box<dyn Query> {
    Box::new(TermQuery::new(Term::from_field_text(field, text), IndexRecordOption::Basic))
}

impl TantivyIndex {
    /// Opens (or creates) the indices under `dir` (`dir/users`, `dir/audit.v2`) to write
    /// them. Refused while another process writes them.
    pub fn open(dir: &Path) -> SearchResult<Self> {
        if dir.join("audit").exists() && !dir.join("audit.v2").exists() {
            tracing::warn!(dir = %dir.display(),
                "the audit index moved to audit.v2 (whole words); run `eventra reindex` to add the entries written before");
        }
        let ((users, uf), (audit, af)) = Self::open_dirs(dir)?;
        let shown = dir.display().to_string();
        let writers = Writers { users: writer(&users, &shown)?, audit: writer(&audit, &shown)? };
        Self::with_indices(users, uf, audit, af, Some(writers))
    }

    /// Opens (or creates) the indices under `dir` to search only, following the
    /// commits of the process that writes them ([`open`](Self::open)).
    pub fn follow(dir: &Path) -> SearchResult<Self> {
        let ((users, uf), (audit, af)) = Self::open_dirs(dir)?;
        Self::with_indices(users, uf, audit, af, None)
    }

    fn open_dirs(dir: &Path) -> SearchResult<((Index, UserFields), (Index, AuditFields))> {
        let (us, uf) = user_schema();
        let (aus, af) = audit_schema();
        Ok(((open_dir(&dir.join("users"), us)?, uf), (open_dir(&dir.join("audit.v2"), aus)?, af)))
    }

    /// Indices in memory (tests, tools).
    pub fn in_memory() -> SearchResult<Self> {
        let (us, uf) = user_schema();
        let (aus, af) = audit_schema();
        let (users, audit) = (Index::create_in_ram(us), Index::create_in_ram(aus));
        let writers = Writers { users: writer(&users, "memory")?, audit: writer(&audit, "memory")? };
        Self::with_indices(users, uf, audit, af, Some(writers))
    }

    fn with_indices(
        users: Index,
        uf: UserFields,
        audit: Index,
        af: AuditFields,
        writers: Option<Writers>,
    ) -> SearchResult<Self> {
        let policy = if writers.is_some() { ReloadPolicy::Manual } else { ReloadPolicy::OnCommitWithDelay };
        Ok(TantivyIndex {
            users: uf,
            audit: af,
            user_part: part(&users, policy)?,
            audit_part: part(&audit, policy)?,
            writers: writers.map(Mutex::new),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Whether this process writes the index (or follows another's writes).
    pub fn writes(&self) -> bool {
        self.writers.is_some()
    }

    fn user_term(&self, user_id: Uuid) -> Term {
        Term::from_field_text(self.users.user_id, &user_id.to_string())
    }

    /// The stored version of a user, if indexed.
    fn indexed_version(&self, user_id: Uuid) -> SearchResult<Option<i64>> {
        let searcher = self.user_part.reader.searcher();
        let query = TermQuery::new(self.user_term(user_id), IndexRecordOption::Basic);
        let top = searcher.search(&query, &TopDocs::with_limit(1).order_by_score())?;
        let Some((_, address)) = top.first() else { return Ok(None) };
        let doc: TantivyDocument = searcher.doc(*address)?;
        Ok(doc.get_first(self.users.version).and_then(|v| v.as_i64()))
    }

    fn user_doc(&self, u: &UserDoc, now_us: i64) -> TantivyDocument {
        let f = self.users;
        let mut d = doc!(
            f.indexed_at => now_us,
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
        let mut seen = HashSet::new();
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

    fn audit_doc(&self, e: &AuditEntry) -> SearchResult<TantivyDocument> {
        let f = self.audit;
        let mut d = doc!(
            f.event_id => e.event_id.to_string(),
            f.tenant_id => e.tenant_id.to_string(),
            f.event_type => e.event_type.clone(),
            f.at => e.at.timestamp_micros(),
            f.entry => serde_json::to_string(e).map_err(backend)?,
        );
        let mut seen = HashSet::new();
        for w in words(&audit_text(e)) {
            if seen.insert(w.clone()) {
                d.add_text(f.word, &w);
            }
        }
        Ok(d)
    }

    fn apply_blocking(&self, ops: &[IndexOp]) -> SearchResult<()> {
        let Some(writers) = &self.writers else {
            return Err(SearchError::Backend(
                "this process follows an index another process writes: index changes go to the indexer role".into(),
            ));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut pending = self.pending.lock().map_err(|_| backend("index queue poisoned"))?;
            pending.ops.extend_from_slice(ops);
            pending.waiters.push(tx);
        }
        {
            let mut writers = writers.lock().map_err(|_| backend("index writer poisoned"))?;
            let batch = std::mem::take(&mut *self.pending.lock().map_err(|_| backend("index queue poisoned"))?);
            if !batch.waiters.is_empty() {
                let result = self.commit(&mut writers, &batch.ops).map_err(|e| e.to_string());
                for waiter in batch.waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        }
        // Ours was committed by us or by whoever held the writers before us.
        rx.recv().map_err(backend)?.map_err(SearchError::Backend)
    }

    /// Applies a batch and commits it; makes it visible to searches.
    fn commit(&self, writers: &mut Writers, ops: &[IndexOp]) -> SearchResult<()> {
        // The newest version seen per user in this batch (the index itself only shows
        // what was committed before it).
        let mut newest: HashMap<Uuid, i64> = HashMap::new();
        let now_us = chrono::Utc::now().timestamp_micros();
        let (mut users_changed, mut audit_changed) = (false, false);
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
                    writers.users.delete_term(self.user_term(u.user_id));
                    writers.users.add_document(self.user_doc(u, now_us))?;
                    users_changed = true;
                }
                IndexOp::DeleteUser { user_id, .. } => {
                    writers.users.delete_term(self.user_term(*user_id));
                    users_changed = true;
                }
                IndexOp::DeleteTenant { tenant_id } => {
                    writers.users.delete_term(Term::from_field_text(self.users.tenant_id, &tenant_id.to_string()));
                    users_changed = true;
                }
                IndexOp::PruneTenant { tenant_id, before } => {
                    let tenant = text_term(self.users.tenant_id, &tenant_id.to_string());
                    let older = RangeQuery::new(
                        Bound::Unbounded,
                        Bound::Excluded(Term::from_field_i64(self.users.indexed_at, before.timestamp_micros())),
                    );
                    let query = BooleanQuery::new(vec![(Occur::Must, tenant), (Occur::Must, Box::new(older))]);
                    writers.users.delete_query(Box::new(query))?;
                    users_changed = true;
                }
                IndexOp::UpsertAudit(entry) => {
                    writers.audit.delete_term(Term::from_field_text(self.audit.event_id, &entry.event_id.to_string()));
                    writers.audit.add_document(self.audit_doc(entry)?)?;
                    audit_changed = true;
                }
            }
        }
        if users_changed {
            writers.users.commit()?;
            self.user_part.reader.reload()?;
        }
        if audit_changed {
            writers.audit.commit()?;
            self.audit_part.reader.reload()?;
        }
        Ok(())
    }

    fn search_users_blocking(&self, tenant_id: Uuid, q: &str, offset: u32, limit: u32) -> SearchResult<Hits<UserDoc>> {
        let f = self.users;
        let query_words = words(q);
        if query_words.is_empty() {
            return Ok(Hits { items: Vec::new(), next_offset: None });
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> =
            vec![(Occur::Must, text_term(f.tenant_id, &tenant_id.to_string()))];
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
        let searcher = self.user_part.reader.searcher();
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

    fn search_audit_blocking(
        &self,
        tenant_id: Uuid,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> SearchResult<Page<AuditEntry>> {
        let f = self.audit;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> =
            vec![(Occur::Must, text_term(f.tenant_id, &tenant_id.to_string()))];
        if let Some(t) = &filter.event_type {
            clauses.push((Occur::Must, text_term(f.event_type, t)));
        }
        if filter.from.is_some() || filter.to.is_some() {
            let micros = |t: chrono::DateTime<chrono::Utc>| Term::from_field_i64(f.at, t.timestamp_micros());
            let lower = filter.from.map_or(Bound::Unbounded, |t| Bound::Included(micros(t)));
            let upper = filter.to.map_or(Bound::Unbounded, |t| Bound::Excluded(micros(t)));
            clauses.push((Occur::Must, Box::new(RangeQuery::new(lower, upper))));
        }
        if let Some(after) = page.after {
            let term = Term::from_field_text(f.event_id, &after.0.to_string());
            clauses.push((Occur::Must, Box::new(RangeQuery::new(Bound::Excluded(term), Bound::Unbounded))));
        }
        for w in words(filter.text.as_deref().unwrap_or_default()) {
            // Every indexed word that starts with the query word (cut like the prefixes
            // OpenSearch indexes, so both engines answer alike).
            let w = query_prefix(&w);
            let lower = Term::from_field_text(f.word, &w);
            let upper = Term::from_field_text(f.word, &format!("{w}{}", char::MAX));
            clauses.push((Occur::Must, Box::new(RangeQuery::new(Bound::Included(lower), Bound::Excluded(upper)))));
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.audit_part.reader.searcher();
        let top = searcher.search(
            &query,
            &TopDocs::with_limit(page.limit.max(1) as usize + 1).order_by_string_fast_field("event_id", Order::Asc),
        )?;
        let mut rows = Vec::with_capacity(top.len());
        for (_, address) in top {
            let d: TantivyDocument = searcher.doc(address)?;
            let json = d.get_first(f.entry).and_then(|v| v.as_str()).unwrap_or_default();
            rows.push(serde_json::from_str::<AuditEntry>(json).map_err(backend)?);
        }
        Ok(Page::from_rows(rows, page.limit.max(1), |e| e.event_id))
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
        tokio::task::spawn_blocking(move || index.search_users_blocking(tenant_id, &q, offset, limit))
            .await
            .map_err(backend)?
    }

    async fn search_audit(
        &self,
        tenant_id: Uuid,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> SearchResult<Page<AuditEntry>> {
        let (index, filter) = (self.clone(), filter.clone());
        tokio::task::spawn_blocking(move || index.search_audit_blocking(tenant_id, &filter, page))
            .await
            .map_err(backend)?
    }
}
