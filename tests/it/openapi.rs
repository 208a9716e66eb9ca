//! The API's description: `/openapi.json` is OpenAPI 3.1, generated from the handlers,
//! and covers every route; `/docs` loads nothing from another host; schemathesis finds
//! no server error in any operation.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::utils::app::ADMIN_TOKEN;
use crate::utils::{in_ci, TestApp, TestDb};

/// Every route the API serves (SPEC §3, as implemented): each must be in the document.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/tenants"),
    ("get", "/v1/tenants"),
    ("get", "/v1/tenants/{tenant_id}"),
    ("patch", "/v1/tenants/{tenant_id}"),
    ("delete", "/v1/tenants/{tenant_id}"),
    ("post", "/v1/tenants/{tenant_id}/api-keys"),
    ("post", "/v1/tenants/{tenant_id}/users"),
    ("get", "/v1/tenants/{tenant_id}/users"),
    ("get", "/v1/tenants/{tenant_id}/users/{user_id}"),
    ("patch", "/v1/tenants/{tenant_id}/users/{user_id}"),
    ("delete", "/v1/tenants/{tenant_id}/users/{user_id}"),
    ("get", "/v1/tenants/{tenant_id}/users/search"),
    ("get", "/v1/tenants/{tenant_id}/audit"),
    ("get", "/v1/admin/jobs"),
    ("get", "/v1/admin/jobs/queues"),
    ("get", "/v1/admin/jobs/queues/{name}"),
    ("delete", "/v1/admin/jobs/queues/{name}"),
    ("get", "/v1/admin/jobs/{segment}"),
    ("delete", "/v1/admin/jobs/{segment}"),
    ("post", "/v1/admin/jobs/{segment}/retry"),
    ("post", "/v1/admin/jobs/{segment}/kill"),
    ("get", "/v1/admin/dlq"),
    ("post", "/v1/admin/dlq/{id}/replay"),
    ("delete", "/v1/admin/dlq/{id}"),
    ("get", "/debug/actors"),
    ("post", "/debug/actors/{name}/kill"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
    ("get", "/v1/admin/stats"),
    ("get", "/v1/tenants/{tenant_id}/event-types"),
    ("put", "/v1/tenants/{tenant_id}/event-types/{event_type}"),
    ("get", "/v1/tenants/{tenant_id}/event-types/{event_type}"),
    ("delete", "/v1/tenants/{tenant_id}/event-types/{event_type}"),
    ("post", "/v1/tenants/{tenant_id}/events"),
    ("post", "/v1/tenants/{tenant_id}/events/batch"),
    ("get", "/v1/tenants/{tenant_id}/analytics/events"),
    ("post", "/v1/tenants/{tenant_id}/webhooks"),
    ("get", "/v1/tenants/{tenant_id}/webhooks"),
    ("get", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}"),
    ("patch", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}"),
    ("delete", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}"),
    ("post", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/rotate-secret"),
    ("post", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/test"),
    ("get", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/deliveries"),
    ("post", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/deliveries/{event_id}/retry"),
    ("post", "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/recover"),
    ("get", "/v1/admin/stats/tenants"),
    ("get", "/v1/admin/stats/webhooks"),
    ("post", "/v1/tenants/{tenant_id}/auth/login"),
    ("post", "/v1/tenants/{tenant_id}/auth/refresh"),
    ("post", "/v1/tenants/{tenant_id}/auth/logout"),
    ("put", "/v1/tenants/{tenant_id}/users/{user_id}/password"),
    ("post", "/v1/tenants/{tenant_id}/users/{user_id}/verification"),
    ("post", "/v1/tenants/{tenant_id}/users/{user_id}/verification/confirm"),
    ("post", "/v1/tenants/{tenant_id}/auth/password-reset"),
    ("post", "/v1/tenants/{tenant_id}/auth/password-reset/confirm"),
    ("get", "/v1/tenants/{tenant_id}/me"),
    ("get", "/v1/tenants/{tenant_id}/users/{user_id}/sessions"),
    ("delete", "/v1/tenants/{tenant_id}/users/{user_id}/sessions/{session_id}"),
    ("get", "/.well-known/jwks.json"),
    ("post", "/v1/admin/signing-keys/rotate"),
    ("get", "/dashboard"),
    ("get", "/dashboard/login"),
    ("post", "/dashboard/login"),
    ("post", "/dashboard/logout"),
    ("get", "/dashboard/assets/{file}"),
];

async fn document(app: &TestApp) -> Value {
    let res = app.req(reqwest::Method::GET, "/openapi.json", None).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.json().await.unwrap()
}

/// The document is OpenAPI 3.1 and describes every route with its responses, the
/// problem responses pointing at the `Problem` schema; and every route of the code is
/// in it, because the routers only take described handlers.
#[tokio::test]
async fn the_document_describes_every_route() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let doc = document(&app).await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().expect("paths");
    let described: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().into_iter().flat_map(move |ops| ops.keys().map(move |m| (m.clone(), path.clone())))
        })
        .filter(|(m, _)| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(described, expected, "documented operations vs the API's routes");
    for (method, path) in &described {
        let op = &paths[path.as_str()][method.as_str()];
        let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
        assert!(
            responses.keys().any(|s| s.starts_with('2') || s.starts_with('3')),
            "{method} {path}: no success response"
        );
        assert!(op["summary"].is_string() || op["description"].is_string(), "{method} {path}: no description");
        for (status, r) in responses {
            if status.starts_with('4') {
                assert_eq!(
                    r["content"]["application/problem+json"]["schema"]["$ref"], "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
            }
        }
    }
    assert!(doc["components"]["schemas"]["User"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    app.stop().await;
}

/// A route cannot be added without a description: every router in `src/http` is an
/// `OpenApiRouter` whose routes come from `routes!(handler)` (which needs the handler's
/// `#[utoipa::path]`). A plain `.route(` would slip past the document.
#[test]
fn no_route_is_added_without_a_description() {
    let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http"))];
    let mut checked = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            checked += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                let plain_routers =
                    code.matches("Router::new()").count() - code.matches("OpenApiRouter::new()").count();
                assert!(
                    !code.contains(".route(") && plain_routers == 0,
                    "{}:{}: add routes with OpenApiRouter::routes(routes!(handler)) and #[utoipa::path], so /openapi.json describes them",
                    path.display(),
                    i + 1
                );
            }
        }
    }
    assert!(checked > 10, "read the HTTP sources");
}

/// `/docs` is Swagger UI served from the binary: its page and scripts come from this
/// server, and the online validator (which would call another host) is off.
#[tokio::test]
async fn docs_load_nothing_from_another_host() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let res = app.req(reqwest::Method::GET, "/docs/", None).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let html = res.text().await.unwrap();
    let loads: Vec<&str> =
        html.split(['"', '\'']).filter(|s| s.ends_with(".js") || s.ends_with(".css") || s.ends_with(".png")).collect();
    assert!(!loads.is_empty(), "{html}");
    for asset in loads {
        assert!(!asset.contains("//"), "{asset} is loaded from another host");
        let url =
            if asset.starts_with('/') { asset.to_owned() } else { format!("/docs/{}", asset.trim_start_matches("./")) };
        let res = app.req(reqwest::Method::GET, &url, None).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{url}");
    }
    let init =
        app.req(reqwest::Method::GET, "/docs/swagger-initializer.js", None).send().await.unwrap().text().await.unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
    assert!(init.replace(' ', "").contains("\"validatorUrl\":\"none\""), "the online validator is off: {init}");
    app.stop().await;
}

/// Runs a Python tool installed by `.ci/run` (`openapi-spec-validator`, `schemathesis`),
/// or says it did not run.
fn tool(name: &str, test: &str) -> Option<std::path::PathBuf> {
    let found =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()));
    if found.is_none() {
        assert!(!in_ci(), "{name} is missing on CI (`.ci/run` installs it from PyPI)");
        eprintln!("NOT RUN: {test} ({name} is not installed: pip install {name})");
    }
    found
}

/// An independent validator reads the document as OpenAPI 3.1.
#[tokio::test]
async fn the_document_validates_as_openapi_3_1() {
    let Some(validator) = tool("openapi-spec-validator", "openapi::the_document_validates_as_openapi_3_1") else {
        return;
    };
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let doc = document(&app).await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = tokio::process::Command::new(validator).arg(file.path()).output().await.unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    app.stop().await;
}

/// Schemathesis generates requests for every operation from the document (with the
/// admin token, and a real tenant and user for the path parameters, so the tenant routes
/// reach their logic instead of a 404) and checks that none gets a server error and that
/// every answer matches the document: its status, content type, headers and schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let Some(st) = tool("schemathesis", "openapi::schemathesis_finds_no_server_error") else { return };
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let tenant = app.tenant("fuzz", 0).await;
    let user = app.user(&tenant, "fuzz@example.com").await;
    // The deletes get their own tenant and user, so the others stay there to be fuzzed.
    let doomed_tenant = app.tenant("fuzz-doomed", 0).await;
    let doomed_user = app.user(&tenant, "doomed@example.com").await;
    let config = tempfile::NamedTempFile::new().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let toml = format!(
        "[parameters]\n\"path.tenant_id\" = \"{}\"\n\"path.user_id\" = \"{}\"\n\n\
         [[operations]]\ninclude-operation-id = \"deleteTenant\"\nparameters = {{ \"path.tenant_id\" = \"{}\" }}\n\n\
         [[operations]]\ninclude-operation-id = \"deleteUser\"\nparameters = {{ \"path.user_id\" = \"{}\" }}\n",
        tenant.id,
        user["id"].as_str().unwrap(),
        doomed_tenant.id,
        doomed_user["id"].as_str().unwrap(),
    );
    std::fs::write(config.path(), toml).unwrap();
    let checks = "not_a_server_error,status_code_conformance,content_type_conformance,\
                  response_headers_conformance,response_schema_conformance";
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(st)
            // Its cache (`.schemathesis/`) goes to a scratch directory, not the checkout.
            .current_dir(scratch.path())
            .arg("--config-file")
            .arg(config.path())
            .args(["run", &format!("{}/openapi.json", app.base), "--checks", checks])
            .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .args(["--max-examples", "30", "--no-color"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finished within 10 minutes")
    .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "schemathesis found failures:\n{report}");
    // Every operation of the document was exercised, not skipped.
    let tested =
        report.lines().find_map(|l| l.trim().strip_prefix("Tested: ")).and_then(|n| n.trim().parse::<usize>().ok());
    assert_eq!(tested, Some(ROUTES.len()), "operations schemathesis tested:\n{report}");
    app.stop().await;
}
