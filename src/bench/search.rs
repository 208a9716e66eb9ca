//! `eventra bench search` and `eventra bench reindex`: user search and index rebuilds on
//! the embedded stack (SQLite + tantivy in a fresh temp data dir), beside the index
//! answering the same queries in-process, in one invocation.
//!
//! - Seeding: `users` users of one tenant written through the store (the same
//!   transaction as the API, outbox included), with names from common first and last
//!   names so prefixes have realistic hit counts.
//! - `search`: the index is built by `reindex`; then a server (`api` role only, so no
//!   pipeline competes for the cores) answers `GET /v1/tenants/{id}/users/search` for a
//!   query mix (1–3 letter prefixes, whole names, two words, exact emails, misses),
//!   one client at a time (latency) and `concurrency` at a time (throughput). The
//!   in-process row runs the same queries on the same index (`TantivyIndex`, no HTTP, no
//!   database read of the hits).
//! - `reindex`: the index is first fed the way the index jobs feed it (batches of
//!   upserts in creation order), a query set's full result sets are recorded, then
//!   `reindex` rebuilds it in place and into an empty directory; both must give the same
//!   result sets, and the union of the single-character queries must be exactly the
//!   database's users. Raw rows: reading the users from the database alone, and tantivy
//!   indexing the same documents in one commit.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use uuid::Uuid;

use crate::config::Config;
use crate::domain::{EventContext, NewApiKey, NewTenant, NewUser, Page, PageRequest, Role};
use crate::search::{reindex::reindex, IndexOp, SearchIndex, TantivyIndex, UserDoc};
use crate::store::Store;

#[derive(Debug, Clone, clap::Args)]
pub struct SearchBenchArgs {
    /// Users in the tenant searched.
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Queries per measured run.
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// Concurrent clients of the throughput run.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Hits per page.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReindexBenchArgs {
    /// Users in the database.
    #[arg(long, default_value_t = 50_000)]
    pub users: usize,
}

type BenchResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Lisa",
    "Daniel",
    "Nancy",
    "Matthew",
    "Betty",
    "Anthony",
    "Margaret",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Ken",
    "Dennis",
    "Margaret",
    "Tim",
    "Radia",
    "Leslie",
    "Frances",
    "Donald",
    "Niklaus",
    "Zoë",
    "Renée",
    "José",
    "Chloé",
    "Björn",
    "Søren",
];

const LAST: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Thompson",
    "Ritchie",
    "Hamilton",
    "Berners-Lee",
    "Perlman",
    "Lamport",
    "Allen",
    "Knuth",
    "Wirth",
    "Müller",
    "Østergaard",
    "O'Brien",
    "García-Márquez",
];

const DOMAINS: &[&str] = &["example.com", "mail.example", "corp.example", "uni.example", "dev.example"];

/// The i-th generated user: (name, email).
fn person(i: usize) -> (String, String) {
    let first = FIRST[i % FIRST.len()];
    let last = LAST[(i / FIRST.len()) % LAST.len()];
    let domain = DOMAINS[(i / 7) % DOMAINS.len()];
    let local: String = format!("{first}.{last}{i}")
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    (format!("{first} {last}"), format!("{local}@{domain}"))
}

/// A fresh temp data dir with `users` users in one tenant; returns (dir, store, tenant id,
/// the tenant's admin key).
async fn seed(users: usize) -> BenchResult<(PathBuf, Arc<dyn Store>, Uuid, String)> {
    let dir = std::env::temp_dir().join(format!("eventra-bench-search-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).map_err(err)?;
    let store = crate::store::connect(&crate::config::default_sqlite_url(&dir), 8).await.map_err(err)?;
    store.migrate().await.map_err(err)?;
    let ctx = EventContext::system("bench-search");
    let input = crate::domain::tenant::NewTenantInput {
        name: "Bench".into(),
        slug: "bench".into(),
        max_users: None,
        rate_limit_per_second: None,
    };
    let tenant = NewTenant::parse(input, crate::domain::now()).map_err(|e| format!("{e:?}"))?;
    let key = NewApiKey::generate(tenant.id, Role::Admin, crate::domain::now());
    let secret = key.secret.clone();
    let tenant = store.create_tenant(&tenant, &key, &ctx).await.map_err(err)?;
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(users as u64);
    let results: Vec<BenchResult<()>> = futures_util::stream::iter(0..users)
        .map(|i| {
            let (store, ctx, bar) = (store.clone(), ctx.clone(), bar.clone());
            async move {
                let (name, email) = person(i);
                let input = crate::domain::user::NewUserInput { email, name, attributes: None, password: None };
                let user = NewUser::parse(tenant.id, input, crate::domain::now()).map_err(|e| format!("{e:?}"))?;
                store.create_user(&user, None, &ctx).await.map_err(err)?;
                bar.inc(1);
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    bar.finish_and_clear();
    results.into_iter().collect::<BenchResult<Vec<()>>>()?;
    eprintln!("seeded {users} users in {:.1} s", started.elapsed().as_secs_f64());
    Ok((dir, store, tenant.id, secret))
}

/// The query mix: for sampled users, 1–3 letter prefixes of the first name, the whole
/// first name, first name + last-name prefix, the exact email; and misses.
fn query_mix(users: usize, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        // A spread of users (a large odd stride walks all of them).
        let u = (i * 7919) % users.max(1);
        let (name, email) = person(u);
        let mut words = name.split(' ');
        let first = words.next().unwrap_or_default().to_lowercase();
        let last = words.next().unwrap_or_default().to_lowercase();
        let q = match i % 8 {
            0 => first.chars().take(1).collect(),
            1 => first.chars().take(2).collect(),
            2 | 3 => first.chars().take(3).collect(),
            4 => first.clone(),
            5 => format!("{first} {}", last.chars().take(3).collect::<String>()),
            6 => email,
            _ => format!("zq{}x", u),
        };
        out.push(q);
        i += 1;
    }
    out
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
}

/// One engine's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub engine: String,
    pub what: String,
    pub per_s: f64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

fn latency_row(engine: &str, what: &str, mut lat: Vec<Duration>, elapsed: Duration) -> Row {
    lat.sort();
    Row {
        engine: engine.into(),
        what: what.into(),
        per_s: lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50: Some(percentile(&lat, 0.50)),
        p99: Some(percentile(&lat, 0.99)),
    }
}

fn rate_row(engine: &str, what: &str, count: usize, elapsed: Duration) -> Row {
    Row {
        engine: engine.into(),
        what: what.into(),
        per_s: count as f64 / elapsed.as_secs_f64().max(1e-9),
        p50: None,
        p99: None,
    }
}

fn open_index(dir: &Path) -> BenchResult<Arc<dyn SearchIndex>> {
    Ok(Arc::new(Arc::new(TantivyIndex::open(dir).map_err(err)?)))
}

pub async fn search(args: SearchBenchArgs) -> BenchResult<Vec<Row>> {
    let (dir, store, tenant, key) = seed(args.users).await?;
    let mut rows = Vec::new();
    {
        let index = open_index(&dir.join("index"))?;
        let done = reindex(&store, &index, None, true).await?;
        rows.push(rate_row(
            "eventra reindex",
            &format!("{} users indexed", done.users),
            done.users as usize,
            done.elapsed,
        ));
    }
    let queries = query_mix(args.users, args.queries);

    // Through the HTTP API.
    let token = format!("bench-{}", Uuid::new_v4().simple());
    let mut config = Config::embedded(&dir, &token);
    config.roles = vec!["api".into()];
    let config = Arc::new(config);
    let server = super::InProcessServer::start(config).await?;
    let (client, base) = (server.client.clone(), server.base.clone());
    let url = format!("{base}/v1/tenants/{tenant}/users/search");
    let one = |q: String| {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        let limit = args.limit;
        async move {
            let t = Instant::now();
            let res = client
                .get(&url)
                .bearer_auth(key)
                .query(&[("q", q.as_str()), ("limit", &limit.to_string())])
                .send()
                .await
                .map_err(err)?;
            if res.status() != reqwest::StatusCode::OK {
                return Err(format!("search {q:?}: {}", res.status()));
            }
            let body: serde_json::Value = res.json().await.map_err(err)?;
            Ok::<_, String>((t.elapsed(), body["items"].as_array().map_or(0, Vec::len)))
        }
    };
    // Warm up (page cache, connections), then one client at a time.
    for q in queries.iter().take(200) {
        one(q.clone()).await?;
    }
    let started = Instant::now();
    let mut lat = Vec::with_capacity(queries.len());
    let mut hits = 0;
    for q in &queries {
        let (d, n) = one(q.clone()).await?;
        lat.push(d);
        hits += n;
    }
    rows.push(latency_row("eventra HTTP API", "1 client", lat, started.elapsed()));
    let started = Instant::now();
    let results: Vec<BenchResult<(Duration, usize)>> =
        futures_util::stream::iter(queries.iter().cloned().map(one)).buffer_unordered(args.concurrency).collect().await;
    let lat = results.into_iter().map(|r| r.map(|(d, _)| d)).collect::<BenchResult<Vec<_>>>()?;
    rows.push(latency_row("eventra HTTP API", &format!("{} clients", args.concurrency), lat, started.elapsed()));
    server.stop().await?;

    // The same queries on the same index, in-process.
    let index = open_index(&dir.join("index"))?;
    let mut raw_hits = 0;
    let started = Instant::now();
    let mut lat = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        raw_hits += index.search_users(tenant, q, 0, args.limit).await.map_err(err)?.items.len();
        lat.push(t.elapsed());
    }
    rows.push(latency_row("tantivy in-process", "1 client", lat, started.elapsed()));
    if raw_hits != hits {
        return Err(format!("the API returned {hits} hits, the index {raw_hits}: they must agree"));
    }
    let started = Instant::now();
    let results: Vec<BenchResult<Duration>> = futures_util::stream::iter(queries.iter().cloned().map(|q| {
        let index = index.clone();
        let limit = args.limit;
        async move {
            let t = Instant::now();
            index.search_users(tenant, &q, 0, limit).await.map_err(err)?;
            Ok(t.elapsed())
        }
    }))
    .buffer_unordered(args.concurrency)
    .collect()
    .await;
    let lat = results.into_iter().collect::<BenchResult<Vec<_>>>()?;
    rows.push(latency_row("tantivy in-process", &format!("{} clients", args.concurrency), lat, started.elapsed()));
    eprintln!("{} queries, {hits} hits per run (mean {:.1})", queries.len(), hits as f64 / queries.len() as f64);
    drop(index);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// Every hit of every query (all pages), as user-id sets.
async fn result_sets(
    index: &Arc<dyn SearchIndex>,
    tenant: Uuid,
    queries: &[String],
) -> BenchResult<HashMap<String, BTreeSet<Uuid>>> {
    let mut out = HashMap::new();
    for q in queries {
        let mut set = BTreeSet::new();
        let mut offset = Some(0);
        while let Some(o) = offset {
            let page = index.search_users(tenant, q, o, 1000).await.map_err(err)?;
            set.extend(page.items.into_iter().map(|u| u.user_id));
            offset = page.next_offset;
        }
        out.insert(q.clone(), set);
    }
    Ok(out)
}

pub async fn reindex_bench(args: ReindexBenchArgs) -> BenchResult<Vec<Row>> {
    let (dir, store, tenant, _) = seed(args.users).await?;
    let mut rows = Vec::new();
    // The database's users (also the raw read figure).
    let started = Instant::now();
    let mut users = Vec::with_capacity(args.users);
    let mut page = PageRequest { after: None, limit: 500 };
    loop {
        let Page { items, next_cursor } = store.list_users(tenant, page).await.map_err(err)?;
        let last = items.last().map(|u| u.id);
        users.extend(items);
        match (next_cursor, last) {
            (Some(_), Some(id)) => page = PageRequest { after: Some(crate::domain::Cursor(id)), limit: 500 },
            _ => break,
        }
    }
    rows.push(rate_row("raw: database read", "users read in pages of 500", users.len(), started.elapsed()));
    let docs: Vec<UserDoc> = users
        .iter()
        .map(|u| UserDoc {
            tenant_id: u.tenant_id,
            user_id: u.id,
            email: u.email.clone(),
            name: u.name.clone(),
            version: u.version,
        })
        .collect();

    // Fed as the index jobs feed it.
    let live = dir.join("index-live");
    let index = open_index(&live)?;
    let started = Instant::now();
    for chunk in docs.chunks(500) {
        index.apply(&chunk.iter().cloned().map(IndexOp::UpsertUser).collect::<Vec<_>>()).await.map_err(err)?;
    }
    rows.push(rate_row("eventra incremental", "upserts in batches of 500", docs.len(), started.elapsed()));
    let mut queries: Vec<String> = ('a'..='z').chain('0'..='9').map(String::from).collect();
    let single = queries.len();
    queries.extend(query_mix(args.users, 300));
    queries.sort();
    queries.dedup();
    let before = result_sets(&index, tenant, &queries).await?;

    // Rebuilt in place.
    let done = reindex(&store, &index, None, true).await?;
    rows.push(rate_row("eventra reindex", "in place (rewrite, then prune)", done.users as usize, done.elapsed));
    let in_place = result_sets(&index, tenant, &queries).await?;
    drop(index);
    // Rebuilt from nothing.
    let fresh_dir = dir.join("index-fresh");
    let fresh = open_index(&fresh_dir)?;
    let done = reindex(&store, &fresh, None, true).await?;
    rows.push(rate_row("eventra reindex", "into an empty index", done.users as usize, done.elapsed));
    let rebuilt = result_sets(&fresh, tenant, &queries).await?;
    drop(fresh);

    // Raw tantivy: the same documents, one writer, one commit.
    let raw_dir = dir.join("index-raw");
    let started = Instant::now();
    raw_tantivy(&raw_dir, &docs)?;
    rows.push(rate_row("raw: tantivy", "same documents, one commit", docs.len(), started.elapsed()));

    let mut differing = 0;
    for q in &queries {
        if before[q] != in_place[q] || before[q] != rebuilt[q] {
            differing += 1;
            eprintln!(
                "query {q:?}: before {} hits, in place {}, rebuilt {}",
                before[q].len(),
                in_place[q].len(),
                rebuilt[q].len()
            );
        }
    }
    let every: BTreeSet<Uuid> = users.iter().map(|u| u.id).collect();
    let covered: BTreeSet<Uuid> =
        ('a'..='z').chain('0'..='9').flat_map(|c| rebuilt[&c.to_string()].iter().copied()).collect();
    let hits: usize = rebuilt.values().map(BTreeSet::len).sum();
    eprintln!(
        "{} queries ({single} single characters), {hits} hits in all: {differing} result sets differ; \
         single-character union = {} users, database = {} users, equal: {}",
        queries.len(),
        covered.len(),
        every.len(),
        covered == every
    );
    let _ = std::fs::remove_dir_all(&dir);
    if differing > 0 || covered != every {
        return Err("the rebuilt index does not give the same result sets".into());
    }
    Ok(rows)
}

/// Indexes `docs` with a bare tantivy writer: the engine's own speed for the same fields.
fn raw_tantivy(dir: &Path, docs: &[UserDoc]) -> BenchResult<()> {
    use tantivy::doc;
    use tantivy::schema::{Schema, STORED, STRING};
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut b = Schema::builder();
    let (tenant, user, name, email, prefix) = (
        b.add_text_field("tenant_id", STRING | STORED),
        b.add_text_field("user_id", STRING | STORED),
        b.add_text_field("name", STORED),
        b.add_text_field("email", STORED),
        b.add_text_field("prefix", STRING),
    );
    let index = tantivy::Index::create_in_dir(dir, b.build()).map_err(err)?;
    let mut writer: tantivy::IndexWriter = index.writer(50_000_000).map_err(err)?;
    for d in docs {
        let mut doc = doc!(
            tenant => d.tenant_id.to_string(), user => d.user_id.to_string(),
            name => d.name.clone(), email => d.email.clone(),
        );
        for w in crate::search::words(&format!("{} {}", d.name, d.email)) {
            for p in crate::search::prefixes(&w) {
                doc.add_text(prefix, &p);
            }
        }
        writer.add_document(doc).map_err(err)?;
    }
    writer.commit().map_err(err)?;
    Ok(())
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let ms = |d: Option<Duration>| d.map_or("–".to_owned(), |d| format!("{:.2} ms", d.as_secs_f64() * 1000.0));
    let mut out = String::from("| engine | run | per second | p50 | p99 |\n|---|---|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!("| {} | {} | {:.0} | {} | {} |\n", r.engine, r.what, r.per_s, ms(r.p50), ms(r.p99)));
    }
    out
}
