//! The scale-out search engine: OpenSearch through the `opensearch` crate (rustls via
//! reqwest, no OpenSSL).
//!
//! Two indices under the namespace, `{ns}-users` and `{ns}-audit`, each created from an
//! index template ([`users_template`], [`audit_template`]) when the adapter starts (or on
//! first use while the cluster is unreachable). Matching follows the tantivy index:
//! the `text` field is indexed as edge n-grams of its words (every prefix up to
//! [`MAX_PREFIX`] characters) and searched word by word, every word required; a whole-word
//! match and an exact email rank first. Every document carries `tenant_id`, and every
//! query filters by it.
//!
//! Writes are one `_bulk` request per batch (`refresh=wait_for`, so a change is
//! searchable when `apply` returns); user documents use external versioning, so an older
//! version never replaces a newer one. The request bodies are built by the pure functions
//! below, which the unit tests pin down exactly (no OpenSearch server runs in our CI).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use opensearch::auth::Credentials;
use opensearch::http::request::JsonBody;
use opensearch::http::response::Response;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::http::Url;
use opensearch::indices::{IndicesCreateParts, IndicesPutIndexTemplateParts};
use opensearch::params::Refresh;
use opensearch::{BulkParts, DeleteByQueryParts, OpenSearch, SearchParts};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{audit_text, words, Hits, IndexOp, SearchError, SearchIndex, SearchResult, UserDoc, MAX_PREFIX};
use crate::domain::{AuditEntry, Page, PageRequest};
use crate::store::AuditFilter;

/// Longest an OpenSearch request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct OpenSearchIndex {
    client: OpenSearch,
    names: IndexNames,
    /// Templates and indices exist (checked once per process, retried until it works).
    ready: AtomicBool,
}

/// The index (and template) names of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexNames {
    pub users: String,
    pub audit: String,
}

impl IndexNames {
    pub fn new(namespace: &str) -> Self {
        let ns = namespace.to_lowercase();
        IndexNames { users: format!("{ns}-users"), audit: format!("{ns}-audit") }
    }
}

fn backend(e: impl std::fmt::Display) -> SearchError {
    SearchError::Backend(format!("opensearch: {e}"))
}

impl OpenSearchIndex {
    /// A client for `url` (`https://user:password@host:9200`); credentials in the URL are
    /// sent as basic auth. Nothing is contacted yet.
    pub fn connect(url: &str, namespace: &str) -> SearchResult<Self> {
        crate::tls::install_crypto_provider();
        let mut url = Url::parse(url).map_err(|e| backend(format!("OPENSEARCH_URL is not a URL: {e}")))?;
        let credentials = (!url.username().is_empty())
            .then(|| Credentials::Basic(url.username().to_owned(), url.password().unwrap_or_default().to_owned()));
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url)).timeout(REQUEST_TIMEOUT);
        if let Some(c) = credentials {
            builder = builder.auth(c);
        }
        let transport = builder.build().map_err(backend)?;
        Ok(OpenSearchIndex {
            client: OpenSearch::new(transport),
            names: IndexNames::new(namespace),
            ready: false.into(),
        })
    }

    pub fn names(&self) -> &IndexNames {
        &self.names
    }

    /// Puts both index templates and creates both indices if missing.
    pub async fn ensure_indices(&self) -> SearchResult<()> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let indices = self.client.indices();
        for (name, template) in
            [(&self.names.users, users_template(&self.names)), (&self.names.audit, audit_template(&self.names))]
        {
            let r = indices.put_index_template(IndicesPutIndexTemplateParts::Name(name)).body(template).send().await?;
            ok(r).await?;
            let r = indices.create(IndicesCreateParts::Index(name)).send().await?;
            if r.status_code().as_u16() == 400 {
                let body: Value = r.json().await?;
                if body.pointer("/error/type").and_then(Value::as_str) != Some("resource_already_exists_exception") {
                    return Err(backend(format!("creating index {name}: {body}")));
                }
            } else {
                ok(r).await?;
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    async fn bulk(&self, lines: Vec<Value>) -> SearchResult<()> {
        let body: Vec<JsonBody<Value>> = lines.into_iter().map(JsonBody::new).collect();
        let r = self.client.bulk(BulkParts::None).refresh(Refresh::WaitFor).body(body).send().await?;
        let reply: Value = ok(r).await?.json().await?;
        bulk_errors(&reply).map_err(backend)
    }

    async fn delete_users(&self, body: Value) -> SearchResult<()> {
        let r = self
            .client
            .delete_by_query(DeleteByQueryParts::Index(&[&self.names.users]))
            .refresh(true)
            .conflicts(opensearch::params::Conflicts::Proceed)
            .body(body)
            .send()
            .await?;
        ok(r).await?;
        Ok(())
    }

    async fn search(&self, index: &str, body: Value) -> SearchResult<Vec<Value>> {
        self.ensure_indices().await?;
        let r = self.client.search(SearchParts::Index(&[index])).body(body).send().await?;
        let reply: Value = ok(r).await?.json().await?;
        Ok(reply.pointer("/hits/hits").and_then(Value::as_array).cloned().unwrap_or_default())
    }
}

/// The response, or its status and body as an error.
async fn ok(r: Response) -> SearchResult<Response> {
    if r.status_code().is_success() {
        return Ok(r);
    }
    let status = r.status_code();
    let body = r.text().await.unwrap_or_default();
    Err(backend(format!("{status}: {}", body.chars().take(500).collect::<String>())))
}

#[async_trait]
impl SearchIndex for OpenSearchIndex {
    fn backend(&self) -> &'static str {
        "opensearch"
    }

    async fn apply(&self, ops: &[IndexOp]) -> SearchResult<()> {
        self.ensure_indices().await?;
        for step in plan(&self.names, ops, chrono::Utc::now().timestamp_micros()) {
            match step {
                Step::Bulk(lines) => self.bulk(lines).await?,
                Step::DeleteUsers(body) => self.delete_users(body).await?,
            }
        }
        Ok(())
    }

    async fn search_users(&self, tenant_id: Uuid, q: &str, offset: u32, limit: u32) -> SearchResult<Hits<UserDoc>> {
        let limit = limit.max(1);
        if words(q).is_empty() {
            return Ok(Hits { items: Vec::new(), next_offset: None });
        }
        let hits = self.search(&self.names.users, user_query(tenant_id, q, offset, limit)).await?;
        let more = hits.len() > limit as usize;
        let mut items = Vec::with_capacity(hits.len());
        for hit in hits.into_iter().take(limit as usize) {
            let source: UserSource = serde_json::from_value(hit["_source"].clone()).map_err(backend)?;
            items.push(UserDoc {
                tenant_id: source.tenant_id,
                user_id: source.user_id,
                email: source.email,
                name: source.name,
                version: source.version,
            });
        }
        Ok(Hits { items, next_offset: more.then_some(offset + limit) })
    }

    async fn search_audit(
        &self,
        tenant_id: Uuid,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> SearchResult<Page<AuditEntry>> {
        let limit = page.limit.max(1);
        let hits = self.search(&self.names.audit, audit_query(tenant_id, filter, page)).await?;
        let mut rows = Vec::with_capacity(hits.len());
        for hit in hits {
            rows.push(serde_json::from_value::<AuditEntry>(hit["_source"]["entry"].clone()).map_err(backend)?);
        }
        Ok(Page::from_rows(rows, limit, |e| e.event_id))
    }

    async fn ping(&self) -> SearchResult<()> {
        ok(self.client.ping().send().await?).await?;
        Ok(())
    }
}

#[derive(Deserialize)]
struct UserSource {
    tenant_id: Uuid,
    user_id: Uuid,
    email: String,
    name: String,
    version: i64,
}

/// What `apply` sends, in order: bulk requests, split around tenant deletions and
/// prunes (a `_delete_by_query` on the users index with this body), so every change
/// applies in the order it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Bulk(Vec<Value>),
    DeleteUsers(Value),
}

/// The requests for `ops`; `now_us` stamps the user documents written (a reindex prunes
/// what it did not rewrite by that stamp).
pub fn plan(names: &IndexNames, ops: &[IndexOp], now_us: i64) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = Vec::new();
    for op in ops {
        match op {
            IndexOp::UpsertUser(u) => {
                lines.push(json!({"index": {
                    "_index": names.users, "_id": u.user_id,
                    "version": u.version, "version_type": "external_gte",
                }}));
                lines.push(user_source(u, now_us));
            }
            IndexOp::DeleteUser { user_id, .. } => {
                lines.push(json!({"delete": {"_index": names.users, "_id": user_id}}));
            }
            IndexOp::UpsertAudit(e) => {
                lines.push(json!({"index": {"_index": names.audit, "_id": e.event_id}}));
                lines.push(audit_source(e));
            }
            IndexOp::DeleteTenant { tenant_id } => {
                if !lines.is_empty() {
                    steps.push(Step::Bulk(std::mem::take(&mut lines)));
                }
                steps.push(Step::DeleteUsers(delete_tenant_body(*tenant_id)));
            }
            IndexOp::PruneTenant { tenant_id, before } => {
                if !lines.is_empty() {
                    steps.push(Step::Bulk(std::mem::take(&mut lines)));
                }
                steps.push(Step::DeleteUsers(prune_tenant_body(*tenant_id, before.timestamp_micros())));
            }
        }
    }
    if !lines.is_empty() {
        steps.push(Step::Bulk(lines));
    }
    steps
}

/// A user's document: what the API returns (`_source`) and what is searched (`text`).
pub fn user_source(u: &UserDoc, now_us: i64) -> Value {
    json!({
        "tenant_id": u.tenant_id,
        "user_id": u.user_id,
        "name": u.name,
        "email": u.email,
        "email_exact": u.email.to_lowercase(),
        "text": format!("{} {}", u.name, u.email),
        "version": u.version,
        "indexed_at_us": now_us,
    })
}

/// An audit entry's document: the entry itself (not indexed) and the fields it is
/// filtered, sorted and searched by.
pub fn audit_source(e: &AuditEntry) -> Value {
    json!({
        "tenant_id": e.tenant_id,
        "event_id": e.event_id,
        "type": e.event_type,
        "at_us": e.at.timestamp_micros(),
        "text": audit_text(e),
        "entry": e,
    })
}

/// The analysis settings both indices share: `eventra_prefix` indexes every prefix (1 to
/// 20 characters) of every run of letters and digits, lowercased; `eventra_word` splits a
/// query the same way and cuts long words to 20 characters.
fn analysis() -> Value {
    json!({
        "tokenizer": {
            "eventra_prefix": {
                "type": "edge_ngram", "min_gram": 1, "max_gram": MAX_PREFIX,
                "token_chars": ["letter", "digit"],
            },
            "eventra_words": {"type": "pattern", "pattern": "[^\\p{L}\\p{N}]+"},
        },
        "filter": {
            "eventra_cut": {"type": "truncate", "length": MAX_PREFIX},
        },
        "analyzer": {
            "eventra_prefix": {"type": "custom", "tokenizer": "eventra_prefix", "filter": ["lowercase"]},
            "eventra_query": {"type": "custom", "tokenizer": "eventra_words", "filter": ["lowercase", "eventra_cut"]},
            "eventra_word": {"type": "custom", "tokenizer": "eventra_words", "filter": ["lowercase"]},
        },
    })
}

fn prefix_text() -> Value {
    json!({
        "type": "text", "analyzer": "eventra_prefix", "search_analyzer": "eventra_query",
        "fields": {"word": {"type": "text", "analyzer": "eventra_word"}},
    })
}

/// `PUT _index_template/{ns}-users`.
pub fn users_template(names: &IndexNames) -> Value {
    json!({
        "index_patterns": [names.users],
        "template": {
            "settings": {"analysis": analysis()},
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "tenant_id": {"type": "keyword"},
                    "user_id": {"type": "keyword"},
                    "name": {"type": "keyword", "index": false},
                    "email": {"type": "keyword", "index": false},
                    "email_exact": {"type": "keyword"},
                    "text": prefix_text(),
                    "version": {"type": "long"},
                    "indexed_at_us": {"type": "long"},
                },
            },
        },
    })
}

/// `PUT _index_template/{ns}-audit`.
pub fn audit_template(names: &IndexNames) -> Value {
    json!({
        "index_patterns": [names.audit],
        "template": {
            "settings": {"analysis": analysis()},
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "tenant_id": {"type": "keyword"},
                    "event_id": {"type": "keyword"},
                    "type": {"type": "keyword"},
                    "at_us": {"type": "long"},
                    "text": {"type": "text", "analyzer": "eventra_prefix", "search_analyzer": "eventra_query"},
                    "entry": {"type": "object", "enabled": false},
                },
            },
        },
    })
}

/// `POST {ns}-users/_search`: the tenant's users matching every word as a prefix,
/// whole words and the exact email ranked first.
pub fn user_query(tenant_id: Uuid, q: &str, offset: u32, limit: u32) -> Value {
    json!({
        "from": offset,
        "size": limit + 1,
        "query": {"bool": {
            "filter": [{"term": {"tenant_id": tenant_id}}],
            "must": [{"match": {"text": {"query": q, "operator": "and"}}}],
            "should": [
                {"match": {"text.word": {"query": q, "boost": 2.0}}},
                {"term": {"email_exact": {"value": q.trim().to_lowercase(), "boost": 5.0}}},
            ],
        }},
        "sort": ["_score", {"user_id": "asc"}],
    })
}

/// `POST {ns}-audit/_search`: the tenant's entries passing the filter, oldest first
/// (by event id), after the cursor.
pub fn audit_query(tenant_id: Uuid, filter: &AuditFilter, page: PageRequest) -> Value {
    let mut conditions = vec![json!({"term": {"tenant_id": tenant_id}})];
    if let Some(t) = &filter.event_type {
        conditions.push(json!({"term": {"type": t}}));
    }
    if filter.from.is_some() || filter.to.is_some() {
        let mut range = serde_json::Map::new();
        if let Some(from) = filter.from {
            range.insert("gte".into(), from.timestamp_micros().into());
        }
        if let Some(to) = filter.to {
            range.insert("lt".into(), to.timestamp_micros().into());
        }
        conditions.push(json!({"range": {"at_us": range}}));
    }
    let mut body = json!({
        "size": page.limit.max(1) + 1,
        "query": {"bool": {"filter": conditions}},
        "sort": [{"event_id": "asc"}],
    });
    if let Some(q) = filter.text.as_deref().filter(|q| !words(q).is_empty()) {
        body["query"]["bool"]["must"] = json!([{"match": {"text": {"query": q, "operator": "and"}}}]);
    }
    if let Some(after) = page.after {
        body["search_after"] = json!([after.0]);
    }
    body
}

/// `POST {ns}-users/_delete_by_query`: every user of a tenant.
pub fn delete_tenant_body(tenant_id: Uuid) -> Value {
    json!({"query": {"term": {"tenant_id": tenant_id}}})
}

/// `POST {ns}-users/_delete_by_query`: the tenant's users last written before `before_us`.
pub fn prune_tenant_body(tenant_id: Uuid, before_us: i64) -> Value {
    json!({"query": {"bool": {"filter": [
        {"term": {"tenant_id": tenant_id}},
        {"range": {"indexed_at_us": {"lt": before_us}}},
    ]}}})
}

/// The failed items of a `_bulk` reply. An older user version refused by external
/// versioning (an `index` item's 409 `version_conflict_engine_exception`) and a delete
/// of a document already gone (a `delete` item's 404) are not failures; anything else is.
pub fn bulk_errors(reply: &Value) -> Result<(), String> {
    if reply.get("errors").and_then(Value::as_bool) != Some(true) {
        return Ok(());
    }
    let items = reply.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    let failed: Vec<String> = items
        .iter()
        .filter_map(|item| item.as_object()?.iter().next().map(|(action, r)| (action.clone(), r.clone())))
        .filter(|(action, r)| {
            let status = r.get("status").and_then(Value::as_u64).unwrap_or(0);
            let error = r.pointer("/error/type").and_then(Value::as_str);
            let stale = action == "index" && status == 409 && error == Some("version_conflict_engine_exception");
            let gone = action == "delete" && status == 404;
            !(200..300).contains(&status) && !stale && !gone
        })
        .map(|(action, r)| format!("{action} {} {}: {}", r["_index"], r["_id"], r["error"]))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} bulk items failed; first: {}", failed.len(), items.len(), failed[0]))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::http::{Method, StatusCode, Uri};
    use chrono::TimeZone;

    use super::*;
    use crate::domain::{Actor, Cursor};

    fn ids() -> (Uuid, Uuid) {
        (
            Uuid::parse_str("0194f1c2-0000-7000-8000-000000000001").unwrap(),
            Uuid::parse_str("0194f1c2-0000-7000-8000-000000000002").unwrap(),
        )
    }

    fn user() -> UserDoc {
        let (tenant_id, user_id) = ids();
        UserDoc { tenant_id, user_id, email: "Ada@Example.com".into(), name: "Ada Lovelace".into(), version: 3 }
    }

    fn audit_entry() -> AuditEntry {
        let (tenant_id, event_id) = ids();
        AuditEntry {
            event_id,
            tenant_id,
            event_type: "user.updated".into(),
            subject: "u-1".into(),
            actor: Actor::PlatformAdmin,
            correlation_id: "req-1".into(),
            at: chrono::Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).single().unwrap(),
            before: Some(json!({"name": "Ada"})),
            after: Some(json!({"name": "Ada Lovelace"})),
        }
    }

    #[test]
    fn user_query_filters_by_tenant_and_requires_every_word() {
        let (tenant, _) = ids();
        assert_eq!(
            user_query(tenant, " Ada LOVE ", 20, 10),
            json!({
                "from": 20,
                "size": 11,
                "query": {"bool": {
                    "filter": [{"term": {"tenant_id": "0194f1c2-0000-7000-8000-000000000001"}}],
                    "must": [{"match": {"text": {"query": " Ada LOVE ", "operator": "and"}}}],
                    "should": [
                        {"match": {"text.word": {"query": " Ada LOVE ", "boost": 2.0}}},
                        {"term": {"email_exact": {"value": "ada love", "boost": 5.0}}},
                    ],
                }},
                "sort": ["_score", {"user_id": "asc"}],
            })
        );
    }

    #[test]
    fn audit_query_carries_every_filter_and_the_cursor() {
        let (tenant, after) = ids();
        let from = chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().unwrap();
        let to = chrono::Utc.with_ymd_and_hms(2026, 11, 2, 0, 0, 0).single().unwrap();
        let filter = AuditFilter {
            event_type: Some("user.created".into()),
            from: Some(from),
            to: Some(to),
            text: Some("ada".into()),
        };
        let page = PageRequest { after: Some(Cursor(after)), limit: 25 };
        assert_eq!(
            audit_query(tenant, &filter, page),
            json!({
                "size": 26,
                "query": {"bool": {
                    "filter": [
                        {"term": {"tenant_id": "0194f1c2-0000-7000-8000-000000000001"}},
                        {"term": {"type": "user.created"}},
                        {"range": {"at_us": {"gte": 1_793_491_200_000_000_i64, "lt": 1_793_577_600_000_000_i64}}},
                    ],
                    "must": [{"match": {"text": {"query": "ada", "operator": "and"}}}],
                }},
                "sort": [{"event_id": "asc"}],
                "search_after": ["0194f1c2-0000-7000-8000-000000000002"],
            })
        );
        // No filters: the tenant only, from the start; a wordless text is no condition.
        let bare = AuditFilter { text: Some(" - ".into()), ..AuditFilter::default() };
        assert_eq!(
            audit_query(tenant, &bare, PageRequest { after: None, limit: 50 }),
            json!({
                "size": 51,
                "query": {"bool": {"filter": [{"term": {"tenant_id": "0194f1c2-0000-7000-8000-000000000001"}}]}},
                "sort": [{"event_id": "asc"}],
            })
        );
    }

    #[test]
    fn bulk_lines_are_versioned_and_split_around_tenant_deletes() {
        let names = IndexNames::new("acme");
        let (tenant, user_id) = ids();
        let e = audit_entry();
        let steps = plan(
            &names,
            &[
                IndexOp::UpsertUser(user()),
                IndexOp::DeleteUser { tenant_id: tenant, user_id },
                IndexOp::DeleteTenant { tenant_id: tenant },
                IndexOp::UpsertAudit(e.clone()),
                IndexOp::PruneTenant { tenant_id: tenant, before: e.at },
            ],
            42,
        );
        assert_eq!(
            steps,
            [
                Step::Bulk(vec![
                    json!({"index": {"_index": "acme-users", "_id": user_id, "version": 3, "version_type": "external_gte"}}),
                    json!({
                        "tenant_id": tenant, "user_id": user_id, "name": "Ada Lovelace", "email": "Ada@Example.com",
                        "email_exact": "ada@example.com", "text": "Ada Lovelace Ada@Example.com", "version": 3,
                        "indexed_at_us": 42,
                    }),
                    json!({"delete": {"_index": "acme-users", "_id": user_id}}),
                ]),
                Step::DeleteUsers(json!({"query": {"term": {"tenant_id": tenant}}})),
                Step::Bulk(vec![
                    json!({"index": {"_index": "acme-audit", "_id": e.event_id}}),
                    json!({
                        "tenant_id": tenant, "event_id": e.event_id, "type": "user.updated",
                        "at_us": 1_795_428_000_000_000_i64,
                        "text": "user.updated u-1 platform_admin Ada Ada Lovelace",
                        "entry": serde_json::to_value(&e).unwrap(),
                    }),
                ]),
                Step::DeleteUsers(json!({"query": {"bool": {"filter": [
                    {"term": {"tenant_id": tenant}},
                    {"range": {"indexed_at_us": {"lt": 1_795_428_000_000_000_i64}}},
                ]}}})),
            ]
        );
        assert_eq!(delete_tenant_body(tenant), json!({"query": {"term": {"tenant_id": tenant}}}));
    }

    #[test]
    fn templates_match_the_indices_and_analyse_prefixes() {
        let names = IndexNames::new("Acme");
        assert_eq!(names, IndexNames { users: "acme-users".into(), audit: "acme-audit".into() });
        let users = users_template(&names);
        assert_eq!(users["index_patterns"], json!(["acme-users"]));
        let tokenizer = &users["template"]["settings"]["analysis"]["tokenizer"]["eventra_prefix"];
        assert_eq!(
            tokenizer,
            &json!({"type": "edge_ngram", "min_gram": 1, "max_gram": 20, "token_chars": ["letter", "digit"]})
        );
        let props = &users["template"]["mappings"]["properties"];
        assert_eq!(props["tenant_id"], json!({"type": "keyword"}));
        assert_eq!(props["text"]["analyzer"], "eventra_prefix");
        assert_eq!(props["text"]["search_analyzer"], "eventra_query");
        assert_eq!(users["template"]["mappings"]["dynamic"], "strict");
        let audit = audit_template(&names);
        assert_eq!(audit["index_patterns"], json!(["acme-audit"]));
        let props = &audit["template"]["mappings"]["properties"];
        assert_eq!(
            (props["event_id"]["type"].as_str(), props["at_us"]["type"].as_str()),
            (Some("keyword"), Some("long"))
        );
        assert_eq!(props["entry"], json!({"type": "object", "enabled": false}));
    }

    #[test]
    fn bulk_replies_fail_only_on_real_item_errors() {
        assert_eq!(bulk_errors(&json!({"errors": false, "items": []})), Ok(()));
        let stale_and_gone = json!({"errors": true, "items": [
            {"index": {"_index": "x", "_id": "1", "status": 409, "error": {"type": "version_conflict_engine_exception"}}},
            {"delete": {"_index": "x", "_id": "2", "status": 404}},
            {"index": {"_index": "x", "_id": "3", "status": 201}},
        ]});
        assert_eq!(bulk_errors(&stale_and_gone), Ok(()));
        let broken = json!({"errors": true, "items": [
            {"index": {"_index": "x", "_id": "1", "status": 201}},
            {"index": {"_index": "x", "_id": "2", "status": 400, "error": {"type": "mapper_parsing_exception"}}},
        ]});
        let e = bulk_errors(&broken).unwrap_err();
        assert!(e.starts_with("1 of 2 bulk items failed") && e.contains("mapper_parsing_exception"), "{e}");
        // A 404 on an index item (the index is gone) is a failure, not a missing document.
        let no_index = json!({"errors": true, "items": [
            {"index": {"_index": "x", "_id": "1", "status": 404, "error": {"type": "index_not_found_exception"}}},
        ]});
        assert!(bulk_errors(&no_index).is_err());
    }

    /// One request the adapter sent: method, path, sorted query pairs, body.
    type Seen = (String, String, Vec<(String, String)>, String);

    /// A loopback HTTP server that records every request and answers like OpenSearch.
    async fn recorder() -> (String, Arc<Mutex<Vec<Seen>>>) {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let log = log.clone();
            async move {
                let mut query: Vec<(String, String)> = uri
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                query.sort();
                let path = uri.path().to_owned();
                log.lock().unwrap().push((
                    method.to_string(),
                    path.clone(),
                    query,
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                let (tenant_id, user_id) = ids();
                let (status, reply) = match (method.as_str(), path.as_str()) {
                    ("PUT", "/unit-audit") => (
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"type": "resource_already_exists_exception"}, "status": 400}),
                    ),
                    ("POST", "/_bulk") => (StatusCode::OK, json!({"took": 1, "errors": false, "items": []})),
                    ("POST", "/unit-users/_search") => (
                        StatusCode::OK,
                        json!({"hits": {"hits": [{"_source": {
                            "tenant_id": tenant_id, "user_id": user_id, "name": "Ada Lovelace",
                            "email": "ada@example.com", "email_exact": "ada@example.com",
                            "text": "Ada Lovelace ada@example.com", "version": 3,
                        }}]}}),
                    ),
                    ("POST", "/unit-audit/_search") => {
                        (StatusCode::OK, json!({"hits": {"hits": [{"_source": audit_source(&audit_entry())}]}}))
                    }
                    ("POST", "/unit-users/_delete_by_query") => (StatusCode::OK, json!({"deleted": 1})),
                    _ => (StatusCode::OK, json!({"acknowledged": true})),
                };
                (status, axum::Json(reply))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn ndjson(lines: &[Value]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    fn body_json(body: &str) -> Value {
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test]
    async fn the_adapter_sends_exactly_these_requests() {
        let (url, seen) = recorder().await;
        let ix = OpenSearchIndex::connect(&url, "unit").unwrap();
        let (tenant, _) = ids();
        let ops = [
            IndexOp::UpsertUser(user()),
            IndexOp::DeleteTenant { tenant_id: tenant },
            IndexOp::UpsertAudit(audit_entry()),
        ];
        ix.apply(&ops).await.unwrap();
        let hits = ix.search_users(tenant, "ada", 0, 10).await.unwrap();
        assert_eq!((hits.items.len(), hits.items[0].name.as_str(), hits.next_offset), (1, "Ada Lovelace", None));
        let filter = AuditFilter { text: Some("lovelace".into()), ..AuditFilter::default() };
        let page = ix.search_audit(tenant, &filter, PageRequest { after: None, limit: 10 }).await.unwrap();
        assert_eq!((page.items, page.next_cursor), (vec![audit_entry()], None));

        let seen = seen.lock().unwrap().clone();
        let names = IndexNames::new("unit");
        let request = |i: usize| (seen[i].0.as_str(), seen[i].1.as_str(), seen[i].2.clone());
        let q = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(seen.len(), 9, "{seen:#?}");
        // Templates, then the indices (an existing one is fine).
        assert_eq!(request(0), ("PUT", "/_index_template/unit-users", q(&[])));
        assert_eq!(body_json(&seen[0].3), users_template(&names));
        assert_eq!(request(1), ("PUT", "/unit-users", q(&[])));
        assert_eq!(request(2), ("PUT", "/_index_template/unit-audit", q(&[])));
        assert_eq!(body_json(&seen[2].3), audit_template(&names));
        assert_eq!(request(3), ("PUT", "/unit-audit", q(&[])));
        // The batch: bulk, tenant delete, bulk; each searchable before `apply` returns.
        // The stamp is the write's time: compare the lines without it.
        let unstamped = |body: &str| -> Vec<Value> {
            body.lines()
                .map(|l| {
                    let mut v: Value = serde_json::from_str(l).unwrap();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("indexed_at_us");
                    }
                    v
                })
                .collect()
        };
        let Step::Bulk(first) = &plan(&names, &ops[..1], 0)[0] else { panic!("a bulk step") };
        assert_eq!(request(4), ("POST", "/_bulk", q(&[("refresh", "wait_for")])));
        assert!(seen[4].3.ends_with('\n'), "NDJSON ends with a newline");
        assert_eq!(unstamped(&seen[4].3), unstamped(&ndjson(first)));
        assert_eq!(
            request(5),
            ("POST", "/unit-users/_delete_by_query", q(&[("conflicts", "proceed"), ("refresh", "true")]))
        );
        assert_eq!(body_json(&seen[5].3), delete_tenant_body(tenant));
        let Step::Bulk(third) = &plan(&names, &ops[2..], 0)[0] else { panic!("a bulk step") };
        assert_eq!(request(6), ("POST", "/_bulk", q(&[("refresh", "wait_for")])));
        assert_eq!(seen[6].3, ndjson(third));
        // Searches.
        assert_eq!(request(7), ("POST", "/unit-users/_search", q(&[])));
        assert_eq!(body_json(&seen[7].3), user_query(tenant, "ada", 0, 10));
        assert_eq!(request(8), ("POST", "/unit-audit/_search", q(&[])));
        assert_eq!(body_json(&seen[8].3), audit_query(tenant, &filter, PageRequest { after: None, limit: 10 }));
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_an_error_not_a_panic() {
        let ix = OpenSearchIndex::connect("http://127.0.0.1:9", "unit").unwrap();
        assert!(ix.apply(&[IndexOp::UpsertUser(user())]).await.is_err());
        assert!(ix.search_users(user().tenant_id, "ada", 0, 10).await.is_err());
        assert!(ix.ping().await.is_err());
        assert!(OpenSearchIndex::connect("not a url", "unit").is_err());
    }
}
