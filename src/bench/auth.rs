//! `eventra bench auth`: what sign-in costs, and how fast tokens verify.
//!
//! - **Sign-ins/s** through a real `eventra serve` (this binary, a child process, the
//!   `api` role, the chosen stack): `--users` users with passwords, then `--seconds` of
//!   closed-loop `POST …/auth/login` from `--concurrency` clients, each sign-in a real
//!   Argon2id verification at the server's parameters (named in the output), plus the
//!   session and its event written. The rate limits are raised out of the way.
//! - **Token checks/s** through the same server: `GET …/me` with access tokens (the
//!   signature, the claims, the session's liveness in the database, the user read).
//! - **Raw, in the same run**: this process hashes with `argon2` at the same
//!   parameters (on as many threads as the machine has cores), and verifies the same
//!   tokens' EdDSA signatures with `ring`, with no HTTP and no database.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::harness::{create_user, err, new_tenant, BenchResult, Run, ServiceUrls, Stack};
use crate::auth::password::{HashCost, Hasher};
use crate::domain::auth::Password;

#[derive(Debug, Clone, clap::Args)]
pub struct AuthBenchArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub stack: Stack,
    #[command(flatten)]
    pub urls: ServiceUrls,
    /// Users with passwords to sign in as.
    #[arg(long, default_value_t = 64)]
    pub users: usize,
    /// Seconds of each closed-loop run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Argon2id memory (KiB) and passes of the server (and the raw run).
    #[arg(long, default_value_t = HashCost::default().memory_kib)]
    pub memory_kib: u32,
    #[arg(long, default_value_t = HashCost::default().iterations)]
    pub iterations: u32,
}

#[derive(Debug)]
pub struct Report {
    pub stack: Stack,
    pub cost: HashCost,
    pub concurrency: usize,
    pub sign_ins: Run1,
    pub checks: Run1,
    pub raw_hashes_per_sec: f64,
    pub raw_verifies_per_sec: f64,
}

/// One closed-loop run: rate and latency percentiles (ms).
#[derive(Debug)]
pub struct Run1 {
    pub per_sec: f64,
    pub p50: f64,
    pub p99: f64,
}

fn run1(mut lat: Vec<f64>, secs: f64) -> Run1 {
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| lat.get(((lat.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    Run1 { per_sec: lat.len() as f64 / secs, p50: at(0.5), p99: at(0.99) }
}

/// `concurrency` clients calling `call(i)` in a loop for `seconds`; latencies in ms.
async fn closed_loop<F, Fut>(seconds: u64, concurrency: usize, call: F) -> BenchResult<Run1>
where
    F: Fn(usize) -> Fut + Clone,
    Fut: std::future::Future<Output = BenchResult<()>>,
{
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let lats = futures_util::stream::iter(0..concurrency)
        .map(|c| {
            let call = call.clone();
            async move {
                let mut lat = Vec::new();
                let mut i = c;
                while Instant::now() < until {
                    let t0 = Instant::now();
                    call(i).await?;
                    lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    i += concurrency;
                }
                Ok::<_, String>(lat)
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let mut all = Vec::new();
    for l in lats {
        all.extend(l?);
    }
    Ok(run1(all, started.elapsed().as_secs_f64()))
}

pub async fn run(args: AuthBenchArgs) -> BenchResult<Report> {
    let cost = HashCost { memory_kib: args.memory_kib, iterations: args.iterations, lanes: 1 };
    let run = Run::new(args.stack, args.urls.clone(), None)?;
    run.prepare().await?;
    let env = [
        ("EVENTRA_AUTH_ATTEMPTS_PER_MINUTE", "10000".to_owned()),
        ("EVENTRA_ARGON2_MEMORY_KIB", cost.memory_kib.to_string()),
        ("EVENTRA_ARGON2_ITERATIONS", cost.iterations.to_string()),
    ];
    let server = run.spawn("api", &env)?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(err)?;
    let base = server.base.clone();
    let tenant = new_tenant(&client, &base, &run.token, "auth").await?;
    let password = "bench password 0123";
    eprintln!("creating {} users with passwords ({cost})…", args.users);
    let users = args.users.max(1);
    futures_util::stream::iter(0..users)
        .map(|i| {
            let (client, base, tenant) = (client.clone(), base.clone(), tenant.clone());
            async move {
                let body =
                    json!({"email": format!("u{i}@bench.example"), "name": format!("U {i}"), "password": password});
                create_user(&client, &base, &tenant, body).await
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;

    eprintln!("signing in for {} s with {} clients…", args.seconds, args.concurrency);
    let tokens = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = tokens.clone();
    let (c2, b2, t2) = (client.clone(), base.clone(), tenant.clone());
    let sign_ins = closed_loop(args.seconds, args.concurrency, move |i| {
        let (client, base, tenant, sink) = (c2.clone(), b2.clone(), t2.clone(), sink.clone());
        async move {
            let res = client
                .post(format!("{base}/v1/tenants/{}/auth/login", tenant.id))
                .json(&json!({"email": format!("u{}@bench.example", i % users), "password": password}))
                .send()
                .await
                .map_err(err)?;
            if res.status() != reqwest::StatusCode::OK {
                return Err(format!("login: {}", res.status()));
            }
            let pair: Value = res.json().await.map_err(err)?;
            if let Some(t) = pair["access_token"].as_str() {
                if let Ok(mut s) = sink.lock() {
                    if s.len() < 1000 {
                        s.push(t.to_owned());
                    }
                }
            }
            Ok(())
        }
    })
    .await?;
    let tokens: Vec<String> = tokens.lock().map(|t| t.clone()).unwrap_or_default();
    if tokens.is_empty() {
        return Err("no access token to check".into());
    }

    eprintln!("checking tokens (GET /me) for {} s…", args.seconds);
    let (c3, b3, t3, tok3) = (client.clone(), base.clone(), tenant.clone(), std::sync::Arc::new(tokens.clone()));
    let checks = closed_loop(args.seconds, args.concurrency, move |i| {
        let (client, base, tenant, tokens) = (c3.clone(), b3.clone(), t3.clone(), tok3.clone());
        async move {
            let res = client
                .get(format!("{base}/v1/tenants/{}/me", tenant.id))
                .bearer_auth(&tokens[i % tokens.len()])
                .send()
                .await
                .map_err(err)?;
            if res.status() != reqwest::StatusCode::OK {
                return Err(format!("me: {}", res.status()));
            }
            Ok(())
        }
    })
    .await?;
    let jwks: Value =
        client.get(format!("{base}/.well-known/jwks.json")).send().await.map_err(err)?.json().await.map_err(err)?;
    drop(server);

    eprintln!("raw argon2 and ring, in this process…");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hasher = Hasher::new(cost, cores).map_err(err)?;
    let pw = Password::from(password);
    let stored = hasher.hash(&pw).await.map_err(err)?;
    let started = Instant::now();
    let mut n = 0usize;
    while started.elapsed() < Duration::from_secs(args.seconds.min(5)) {
        let rounds =
            futures_util::future::join_all((0..cores).map(|_| hasher.verify(&pw, Some(stored.as_str())))).await;
        n += rounds.len();
    }
    let raw_hashes_per_sec = n as f64 / started.elapsed().as_secs_f64();
    let raw_verifies_per_sec = raw_verifies(&tokens, &jwks, Duration::from_secs(args.seconds.min(5)))?;
    Ok(Report {
        stack: args.stack,
        cost,
        concurrency: args.concurrency,
        sign_ins,
        checks,
        raw_hashes_per_sec,
        raw_verifies_per_sec,
    })
}

/// Signature and claim checks of the same tokens, one thread, for `time`.
fn raw_verifies(tokens: &[String], jwks: &Value, time: Duration) -> BenchResult<f64> {
    use base64::Engine as _;
    let keys: Vec<(String, Vec<u8>)> = jwks["keys"]
        .as_array()
        .ok_or("no keys in the JWKS")?
        .iter()
        .filter_map(|k| {
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(k["x"].as_str()?).ok()?;
            Some((k["kid"].as_str()?.to_owned(), x))
        })
        .collect();
    let now = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let mut n = 0usize;
    while started.elapsed() < time {
        for t in tokens {
            let kid = crate::auth::jwt::kid(t).map_err(err)?;
            let key = &keys.iter().find(|(k, _)| *k == kid).ok_or("token key not in the JWKS")?.1;
            crate::auth::jwt::verify(t, key, "eventra", now, 60).map_err(err)?;
            n += 1;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub fn table(r: &Report) -> String {
    format!(
        "Argon2id parameters: {cost} · {c} clients · stack {stack:?}\n\n\
         | what | per second | p50 ms | p99 ms |\n|---|---:|---:|---:|\n\
         | Eventra sign-ins (`POST …/auth/login`) | {si:.0} | {sp50:.1} | {sp99:.1} |\n\
         | raw Argon2id verifications, {cores} threads | {rh:.0} | – | – |\n\
         | Eventra token checks (`GET …/me`) | {ch:.0} | {cp50:.1} | {cp99:.1} |\n\
         | raw EdDSA verifications (ring), 1 thread | {rv:.0} | – | – |\n",
        cost = r.cost,
        c = r.concurrency,
        stack = r.stack,
        si = r.sign_ins.per_sec,
        sp50 = r.sign_ins.p50,
        sp99 = r.sign_ins.p99,
        cores = std::thread::available_parallelism().map_or(2, |n| n.get()),
        rh = r.raw_hashes_per_sec,
        ch = r.checks.per_sec,
        cp50 = r.checks.p50,
        cp99 = r.checks.p99,
        rv = r.raw_verifies_per_sec,
    )
}
