//! `/dashboard` in a real browser: Debian's chromium, driven through chromedriver by
//! fantoccini. Signs in through the page, reads the counts, retries a dead job and
//! replays a parked message by clicking, sees the tree; and checks the session cookie,
//! CSRF and that the page talks to no other host.
//!
//! Without chromedriver these print NOT RUN (and fail under `CI=true`; `.ci/run`
//! installs `chromium` and `chromium-driver`).

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventra::jobs::{Enqueued, JobQueue, Kinds, NewJob, QueueConfig};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::jobs::Flaky;
use crate::utils::app::{expect_problem, ADMIN_TOKEN};
use crate::utils::{in_ci, wait_for, TestApp, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// A headless chromium session; chromedriver dies with it.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
}

fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Starts chromedriver on a free port and a headless chromium session, or says the
/// test did not run.
async fn browser(test: &str) -> Option<Browser> {
    let Some(driver) = on_path("chromedriver") else {
        assert!(!in_ci(), "chromedriver is missing on CI (`.ci/run` installs chromium-driver)");
        eprintln!("NOT RUN: {test} (no chromedriver: apt-get install chromium chromium-driver)");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
    let child = tokio::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    eventra::tls::install_crypto_provider();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    wait_for("chromedriver to answer /status", WAIT, || async {
        let status: Value = http.get(format!("{url}/status")).send().await.ok()?.json().await.ok()?;
        status["value"]["ready"].as_bool().filter(|r| *r)
    })
    .await;
    let mut options = json!({
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1440,1000", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync"],
    });
    if let Some(chromium) = on_path("chromium") {
        options["binary"] = json!(chromium);
    }
    let caps = json!({ "browserName": "chrome", "goog:chromeOptions": options });
    let caps = caps.as_object().cloned().unwrap();
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector).capabilities(caps).connect(&url).await.expect("a browser session");
    Some(Browser { client, _driver: child })
}

/// The text of the first element matching `css`, if there is one.
async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Waits for an element and clicks it.
async fn click(c: &Client, css: &str) {
    let e = wait_for(&format!("{css} to appear"), WAIT, || async { c.find(Locator::Css(css)).await.ok() }).await;
    e.click().await.unwrap_or_else(|err| panic!("click {css}: {err}"));
}

async fn show(c: &Client, panel: &str) {
    c.execute("location.hash = arguments[0]; return null", vec![json!(panel)]).await.unwrap();
}

async fn job_state(app: &TestApp, id: Uuid) -> Option<String> {
    let job: Value = app.get(&format!("/v1/admin/jobs/{id}"), ADMIN_TOKEN).await.json().await.ok()?;
    job["state"].as_str().map(str::to_owned)
}

/// The dashboard's header as numbers (its `count-*` elements).
async fn header_counts(c: &Client) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    for name in ["processed", "busy", "enqueued", "retries", "scheduled", "dead"] {
        out.push(text(c, &format!("#count-{name}")).await?.replace(',', "").parse().ok()?);
    }
    Some(out)
}

/// The same figures from `GET /v1/admin/jobs`.
async fn api_counts(app: &TestApp) -> Option<Vec<u64>> {
    let s: Value = app.get("/v1/admin/jobs", ADMIN_TOKEN).await.json().await.ok()?;
    ["done", "running", "ready", "retry", "scheduled", "dead"].iter().map(|k| s["counts"][k].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_sees_the_counts_and_fixes_jobs_and_messages_by_clicking() {
    let Some(b) =
        browser("dashboard::an_operator_signs_in_sees_the_counts_and_fixes_jobs_and_messages_by_clicking").await
    else {
        return;
    };
    let c = &b.client;
    let db = TestDb::sqlite();
    let kind = Flaky::new("test_dashboard_broken", 0, true, 1);
    let app = TestApp::start_with_kinds(db.url(), Kinds::default().with(kind.clone()), |c| {
        c.chaos = true;
        c.webhook_allow_private = true;
    })
    .await;
    let tenant = app.tenant("dash", 0).await;
    // A webhook endpoint that refuses every delivery (405: GET-only), for the webhooks panel.
    let res = app
        .post(
            &format!("/v1/tenants/{}/webhooks", tenant.id),
            &tenant.admin_key,
            json!({"url": format!("{}/health/live", app.base), "event_types": ["user.created"]}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let hook: Value = res.json().await.unwrap();
    app.user(&tenant, "dash@example.com").await;

    // A dead job: one attempt, broken.
    let queue = eventra::jobs::SqliteJobQueue::open(db.url(), QueueConfig::default()).await.unwrap();
    let job = NewJob { max_attempts: Some(1), ..NewJob::new("test_dashboard_broken", "dash:1", json!({"n": 1})) };
    let Enqueued::New(job_id) = queue.enqueue(job).await.unwrap() else { panic!("a new job") };
    wait_for("the job in the dead set", WAIT, || async {
        (job_state(&app, job_id).await.as_deref() == Some("dead")).then_some(())
    })
    .await;
    // A parked message: an event type nobody knows.
    let bus = eventra::bus::SqliteBus::new(
        eventra::store::SqliteStore::connect(db.url(), 2).await.unwrap().pools(),
        eventra::bus::BusConfig::default(),
    );
    let poison = eventra::bus::BusMessage {
        id: Uuid::now_v7().to_string(),
        routing_key: "user.exploded".into(),
        body: serde_json::to_vec(&json!({"specversion": "1.0", "type": "user.exploded", "id": "x"})).unwrap(),
    };
    eventra::bus::EventBus::publish(&bus, std::slice::from_ref(&poison)).await.unwrap();
    let pool = eventra::store::SqliteStore::connect(db.url(), 1).await.unwrap().pool().clone();
    let parked_at = || async {
        let row: Option<(Option<i64>, String)> =
            sqlx::query_as("SELECT parked_at_us, state FROM bus_messages WHERE id = $1")
                .bind(&poison.id)
                .fetch_optional(&pool)
                .await
                .unwrap();
        row.and_then(|(at, state)| (state == "parked").then_some(at).flatten())
    };
    let first_parked = wait_for("the poison message parked", WAIT, || async { parked_at().await }).await;

    // Signed out, the dashboard sends the browser to the sign-in form; a wrong token says so.
    c.goto(&format!("{}/dashboard", app.base)).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/dashboard/login");
    c.wait().for_element(Locator::Css("#token")).await.unwrap().send_keys("not-the-token").await.unwrap();
    click(c, "#sign-in").await;
    wait_for("the sign-in page to say the token is wrong", WAIT, || async {
        c.find(Locator::Css("#login-error")).await.ok()?.is_displayed().await.ok()?.then_some(())
    })
    .await;
    c.find(Locator::Css("#token")).await.unwrap().send_keys(ADMIN_TOKEN).await.unwrap();
    click(c, "#sign-in").await;

    // The header shows what the API says.
    let (shown, expected) = wait_for("the header counts to equal GET /v1/admin/jobs", WAIT, || async {
        let shown = header_counts(c).await?;
        let expected = api_counts(&app).await?;
        (shown == expected).then_some((shown, expected))
    })
    .await;
    assert_eq!(shown[5], 1, "one dead job: {shown:?} vs {expected:?}");

    // Retry the dead job by clicking; once fixed, it runs and leaves the dead set.
    kind.broken.store(false, Ordering::SeqCst);
    show(c, "#dead").await;
    click(c, &format!("tr[data-job-id=\"{job_id}\"] button[data-action=\"retry\"]")).await;
    wait_for("the retried job to run and finish", WAIT, || async {
        (job_state(&app, job_id).await.as_deref() == Some("done")).then_some(())
    })
    .await;
    assert_eq!(kind.runs.load(Ordering::SeqCst), 2, "the click ran it again");
    wait_for("the dead row to go and the header to say 0 dead", WAIT, || async {
        let gone = c.find(Locator::Css(&format!("tr[data-job-id=\"{job_id}\"]"))).await.is_err();
        (gone && text(c, "#count-dead").await.as_deref() == Some("0")).then_some(())
    })
    .await;

    // Replay the parked message by clicking: it goes back on the bus, is consumed again
    // and (still unknown) parked again, later.
    show(c, "#pipeline").await;
    click(c, &format!("tr[data-message-id=\"{}\"] button[data-action=\"replay\"]", poison.id)).await;
    wait_for("the replayed message consumed and parked again", WAIT, || async {
        parked_at().await.filter(|at| *at > first_parked)
    })
    .await;

    // The tree, with kill buttons (chaos is on).
    show(c, "#tree").await;
    for actor in ["root", "tenants", "jobs", "job-worker-1", "pipeline", "metrics-sampler"] {
        wait_for(&format!("{actor} in the tree"), WAIT, || async {
            c.find(Locator::Css(&format!("li[data-actor=\"{actor}\"]"))).await.ok()
        })
        .await;
    }
    assert!(c.find(Locator::Css("li[data-actor=\"job-worker-1\"] > button[data-action=\"kill\"]")).await.is_ok());

    // The busiest tenants: ours, with its user.
    show(c, "#tenants").await;
    wait_for("our tenant among the busiest, with one user", WAIT, || async {
        let row = text(c, "#tenant-activity tbody tr").await?;
        (row.starts_with("dash-") && row.contains(" 1 ")).then_some(())
    })
    .await;
    // Its analytics, picked by clicking it: the user's creation processed once (every
    // process's durable counts, not this process's metrics).
    click(c, &format!("#tenant-activity tr[data-tenant-id=\"{}\"]", tenant.id)).await;
    wait_for("the tenant's analytics: one user.created processed", WAIT, || async {
        let row = text(c, "#tenant-analytics tr[data-type=\"user.created\"]").await?;
        let slug = text(c, "#analytics-tenant").await?;
        (row.starts_with("user.created 1 ") && slug.starts_with("dash-")).then_some(())
    })
    .await;

    // The webhooks panel: our endpoint, every attempt failed.
    show(c, "#webhooks").await;
    wait_for("the failing endpoint in the webhooks panel", WAIT, || async {
        let row = text(c, &format!("tr[data-endpoint-id=\"{}\"]", hook["id"].as_str()?)).await?;
        row.contains("100.0 %").then_some(())
    })
    .await;

    // The session cookie is HttpOnly and SameSite=Strict; a change made with it but
    // without the CSRF token is refused, with it accepted.
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|k| k.name() == "eventra_session").expect("a session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(session.same_site().map(|s| s.to_string()).as_deref(), Some("Strict"));
    let cookie = format!("eventra_session={}", session.value());
    let page = app.client.get(format!("{}/dashboard", app.base)).header("cookie", &cookie).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    let csrf: Value =
        c.execute("return document.querySelector('meta[name=\"csrf-token\"]').content", vec![]).await.unwrap();
    let csrf = csrf.as_str().unwrap();
    let url = format!("{}/v1/admin/jobs/dead/retry", app.base);
    let res = app.client.post(&url).header("cookie", &cookie).send().await.unwrap();
    expect_problem(res, StatusCode::FORBIDDEN).await;
    let res = app.client.post(&url).header("cookie", &cookie).header("x-csrf-token", "forged").send().await.unwrap();
    expect_problem(res, StatusCode::FORBIDDEN).await;
    let res = app.client.post(&url).header("cookie", &cookie).header("x-csrf-token", csrf).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // Everything the page loaded or called came from this server.
    let urls: Value = c
        .execute("return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name))", vec![])
        .await
        .unwrap();
    let urls: Vec<&str> = urls.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(urls.len() > 5, "the page loaded its assets and polled: {urls:?}");
    for u in &urls {
        assert!(u.starts_with(&format!("{}/", app.base)), "a request to another host: {u}");
    }

    // Signing out ends the session in the browser.
    click(c, "#sign-out").await;
    c.wait().for_element(Locator::Css("#token")).await.unwrap();

    b.client.close().await.unwrap();
    app.stop().await;
}
