//! End-user authentication over HTTP (SPEC §8): passwords, sign-in, access tokens
//! checked by an independent verifier (the `jsonwebtoken` crate with the JWKS), every
//! forged token refused, refresh rotation with reuse revoking the family (also across
//! two processes on one PostgreSQL), sessions, key rotation, and no secret in the
//! outbox.

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::utils::app::{expect_problem, TestTenant, ADMIN_TOKEN};
use crate::utils::{TestApp, TestDb};

const PASSWORD: &str = "correct horse battery staple";

async fn post_anon(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.req(Method::POST, path, None).json(&body).send().await.unwrap()
}

async fn login(app: &TestApp, t: &TestTenant, email: &str, password: &str) -> reqwest::Response {
    post_anon(app, &format!("/v1/tenants/{}/auth/login", t.id), json!({"email": email, "password": password})).await
}

async fn signed_in(app: &TestApp, t: &TestTenant, email: &str) -> Value {
    let res = login(app, t, email, PASSWORD).await;
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn user_with_password(app: &TestApp, t: &TestTenant, email: &str) -> Value {
    let res = app
        .post(
            &format!("/v1/tenants/{}/users", t.id),
            &t.admin_key,
            json!({"email": email, "name": "Signing In", "password": PASSWORD}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let user: Value = res.json().await.unwrap();
    assert!(user.get("password").is_none() && user.get("password_hash").is_none(), "{user}");
    user
}

async fn me(app: &TestApp, t: &TestTenant, token: &str) -> reqwest::Response {
    app.get(&format!("/v1/tenants/{}/me", t.id), token).await
}

/// The claims, checked by `jsonwebtoken` against the served JWKS.
async fn verified_independently(app: &TestApp, token: &str) -> Value {
    let jwks: jsonwebtoken::jwk::JwkSet =
        app.req(Method::GET, "/.well-known/jwks.json", None).send().await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("the token's key is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_issuer(&["eventra"]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).expect("verifies").claims
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

async fn sign_in_tokens_sessions_and_refusals(db: TestDb) {
    // Many sign-ins from one IP here: the rate limits have their own tests.
    let app = TestApp::start_with(db.url(), |c| c.auth.attempts_per_minute = 1000).await;
    let t = app.tenant("auth", 0).await;
    let other = app.tenant("auth-other", 0).await;
    let user = user_with_password(&app, &t, "ada@example.com").await;
    let user_id = user["id"].as_str().unwrap().to_owned();

    // Password rules: 8 to 128 characters, named in the 422.
    let res = app
        .post(
            &format!("/v1/tenants/{}/users", t.id),
            &t.admin_key,
            json!({"email": "b@example.com", "name": "B", "password": "short"}),
        )
        .await;
    let problem = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem["errors"][0]["field"], "password", "{problem}");

    // Every refusal is one 401 with one body.
    app.user(&t, "nopassword@example.com").await;
    let disabled = user_with_password(&app, &t, "gone@example.com").await;
    let res = app
        .patch(
            &format!("/v1/tenants/{}/users/{}", t.id, disabled["id"].as_str().unwrap()),
            &t.admin_key,
            json!({"status": "disabled"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut bodies = Vec::new();
    for (email, pw) in [
        ("ada@example.com", "wrong password!"),
        ("nobody@example.com", PASSWORD),
        ("nopassword@example.com", PASSWORD),
        ("gone@example.com", PASSWORD),
    ] {
        let mut p = expect_problem(login(&app, &t, email, pw).await, StatusCode::UNAUTHORIZED).await;
        p.as_object_mut().unwrap().remove("request_id");
        p.as_object_mut().unwrap().remove("instance");
        bodies.push(p);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    // Another tenant does not know the user.
    expect_problem(login(&app, &other, "ada@example.com", PASSWORD).await, StatusCode::UNAUTHORIZED).await;

    // Sign-in: the pair, `/me`, and claims an independent verifier accepts.
    let pair = signed_in(&app, &t, "ADA@example.com").await;
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    let access = pair["access_token"].as_str().unwrap().to_owned();
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    let claims = verified_independently(&app, &access).await;
    assert_eq!(claims["sub"], user_id.as_str());
    assert_eq!(claims["tid"], t.id.to_string());
    assert_eq!(claims["email"], "ada@example.com");
    assert_eq!(claims["email_verified"], false);
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);
    let me_res = me(&app, &t, &access).await;
    assert_eq!(me_res.status(), StatusCode::OK);
    assert_eq!(me_res.json::<Value>().await.unwrap()["id"], user_id.as_str());
    // Not a key of any kind elsewhere: another tenant's routes, the tenant API.
    expect_problem(me(&app, &other, &access).await, StatusCode::UNAUTHORIZED).await;
    expect_problem(app.get(&format!("/v1/tenants/{}/users", t.id), &access).await, StatusCode::UNAUTHORIZED).await;

    // Forged tokens: a changed claim, alg none, HS256 keyed with the public key, a key
    // Eventra does not know, and an expired token signed with a key it does know.
    let parts: Vec<&str> = access.split('.').collect();
    let mut forged_claims = claims.clone();
    forged_claims["sub"] = json!(Uuid::now_v7());
    let tampered = format!("{}.{}.{}", parts[0], b64(&forged_claims), parts[2]);
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), parts[1]);
    let header = jsonwebtoken::decode_header(&access).unwrap();
    let jwks: Value = app.req(Method::GET, "/.well-known/jwks.json", None).send().await.unwrap().json().await.unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    let public = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(x).unwrap();
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = header.kid.clone();
    let hs256 = jsonwebtoken::encode(&hs, &claims, &jsonwebtoken::EncodingKey::from_secret(&public)).unwrap();
    let stranger = ring_key();
    let mut claims_struct: eventra::domain::auth::Claims = serde_json::from_value(claims.clone()).unwrap();
    let unknown_kid = eventra::auth::jwt::sign(&claims_struct, "not-a-key-of-ours", &stranger);
    // A key the store has (older, not the signer), and a token of it that expired.
    let store = db.store().await;
    let sealer = eventra::webhooks::secret_box::SecretBox::from_base64(app.config.secret_key.expose()).unwrap();
    let (old_kid, old_key) = stored_key(&*store, &sealer).await;
    claims_struct.exp = chrono::Utc::now().timestamp() - 120;
    claims_struct.iat = claims_struct.exp - 900;
    let expired = eventra::auth::jwt::sign(&claims_struct, &old_kid, &old_key);
    for (what, token) in [
        ("tampered", &tampered),
        ("alg none", &none),
        ("HS256", &hs256),
        ("unknown kid", &unknown_kid),
        ("expired", &expired),
    ] {
        let p = expect_problem(me(&app, &t, token).await, StatusCode::UNAUTHORIZED).await;
        assert!(p["detail"].as_str().unwrap_or("").contains("access token"), "{what}: {p}");
    }

    // Sessions: listed for the admin key and the user, with where they came from.
    let sessions_path = format!("/v1/tenants/{}/users/{user_id}/sessions", t.id);
    let listed: Value = app.get(&sessions_path, &t.admin_key).await.json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], claims["sid"]);
    assert_eq!(listed[0]["ip"], "127.0.0.1");
    assert_eq!(app.get(&sessions_path, &access).await.status(), StatusCode::OK);
    let reader = app.key(&t, "reader").await;
    expect_problem(app.get(&sessions_path, &reader).await, StatusCode::FORBIDDEN).await;

    // Refresh rotates; presenting the spent token again revokes the whole family.
    let res = post_anon(&app, &format!("/v1/tenants/{}/auth/refresh", t.id), json!({"refresh_token": refresh})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let second: Value = res.json().await.unwrap();
    let second_access = second["access_token"].as_str().unwrap().to_owned();
    assert_ne!(second["refresh_token"], refresh.as_str());
    assert_eq!(me(&app, &t, &second_access).await.status(), StatusCode::OK);
    let reuse = post_anon(&app, &format!("/v1/tenants/{}/auth/refresh", t.id), json!({"refresh_token": refresh})).await;
    expect_problem(reuse, StatusCode::UNAUTHORIZED).await;
    let after = post_anon(
        &app,
        &format!("/v1/tenants/{}/auth/refresh", t.id),
        json!({"refresh_token": second["refresh_token"]}),
    )
    .await;
    expect_problem(after, StatusCode::UNAUTHORIZED).await;
    expect_problem(me(&app, &t, &second_access).await, StatusCode::UNAUTHORIZED).await;
    expect_problem(me(&app, &t, &access).await, StatusCode::UNAUTHORIZED).await;

    // Logout ends its session at once; revoking by id too (the user's own token).
    let third = signed_in(&app, &t, "ada@example.com").await;
    let third_access = third["access_token"].as_str().unwrap();
    let res =
        app.req(Method::POST, &format!("/v1/tenants/{}/auth/logout", t.id), Some(third_access)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    expect_problem(me(&app, &t, third_access).await, StatusCode::UNAUTHORIZED).await;
    let fourth = signed_in(&app, &t, "ada@example.com").await;
    let fourth_access = fourth["access_token"].as_str().unwrap();
    let sid = verified_independently(&app, fourth_access).await["sid"].as_str().unwrap().to_owned();
    assert_eq!(app.delete(&format!("{sessions_path}/{sid}"), fourth_access).await.status(), StatusCode::NO_CONTENT);
    expect_problem(me(&app, &t, fourth_access).await, StatusCode::UNAUTHORIZED).await;
    expect_problem(app.delete(&format!("{sessions_path}/{sid}"), &t.admin_key).await, StatusCode::NOT_FOUND).await;

    // Key rotation: new tokens carry the new key; the old key's tokens still verify.
    let fifth = signed_in(&app, &t, "ada@example.com").await;
    let fifth_access = fifth["access_token"].as_str().unwrap();
    let res = app.req(Method::POST, "/v1/admin/signing-keys/rotate", Some(ADMIN_TOKEN)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let new_kid = res.json::<Value>().await.unwrap()["kid"].as_str().unwrap().to_owned();
    expect_problem(
        app.req(Method::POST, "/v1/admin/signing-keys/rotate", Some(&t.admin_key)).send().await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(me(&app, &t, fifth_access).await.status(), StatusCode::OK);
    let sixth = signed_in(&app, &t, "ada@example.com").await;
    let sixth_access = sixth["access_token"].as_str().unwrap();
    assert_eq!(jsonwebtoken::decode_header(sixth_access).unwrap().kid.as_deref(), Some(new_kid.as_str()));
    verified_independently(&app, sixth_access).await;
    verified_independently(&app, fifth_access).await;

    // The events, and no secret anywhere in the outbox.
    let outbox = store.outbox_after(0, u32::MAX).await.unwrap();
    let types: Vec<&str> = outbox.iter().filter(|r| r.tenant_id == t.id).map(|r| r.event.event_type.as_str()).collect();
    for expected in ["auth.login_succeeded", "auth.login_failed", "auth.refresh_reuse_detected", "auth.session_revoked"]
    {
        assert!(types.contains(&expected), "{expected} in {types:?}");
    }
    let failed: Vec<_> = outbox.iter().filter(|r| r.event.event_type.as_str() == "auth.login_failed").collect();
    // Known users only (wrong password, disabled): unknown emails write nothing.
    assert_eq!(failed.len(), 2, "{failed:?}");
    let everything = serde_json::to_string(&outbox.iter().map(|r| &r.event).collect::<Vec<_>>()).unwrap();
    for secret in [PASSWORD, refresh.as_str(), access.as_str(), second["refresh_token"].as_str().unwrap(), "argon2"] {
        assert!(!everything.contains(secret), "a secret in the outbox");
    }
    app.stop().await;
}

fn ring_key() -> ring::signature::Ed25519KeyPair {
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

/// A key added to the store the way Eventra stores them (sealed), dated an hour ago,
/// so it verifies but does not sign.
async fn stored_key(
    store: &dyn eventra::store::Store,
    sealer: &eventra::webhooks::secret_box::SecretBox,
) -> (String, ring::signature::Ed25519KeyPair) {
    use ring::signature::KeyPair as _;
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    let kid = format!("test-{}", Uuid::now_v7().simple());
    let key = eventra::store::StoredKey {
        kid: kid.clone(),
        private_key: sealer.seal(&base64::engine::general_purpose::STANDARD.encode(doc.as_ref())).into_bytes(),
        public_key: pair.public_key().as_ref().to_vec(),
        created_at: eventra::domain::now() - chrono::Duration::hours(1),
        retired_at: None,
    };
    store.add_signing_key(&key, false).await.unwrap();
    (kid, pair)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_tokens_sessions_and_refusals_on_sqlite() {
    sign_in_tokens_sessions_and_refusals(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_tokens_sessions_and_refusals_on_postgres() {
    let Some(db) = TestDb::postgres("auth::sign_in_tokens_sessions_and_refusals_on_postgres").await else { return };
    sign_in_tokens_sessions_and_refusals(db).await;
}

/// Two processes on one PostgreSQL: a token signed by one verifies at the other, and a
/// refresh token spent at one and presented again at the other revokes the family in
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refresh_reuse_revokes_the_family_across_two_processes() {
    let Some(db) = TestDb::postgres("auth::postgres_refresh_reuse_revokes_the_family_across_two_processes").await
    else {
        return;
    };
    let a = TestApp::start(db.url()).await;
    let secret = a.config.secret_key.clone();
    let b = TestApp::start_with(db.url(), |c| c.secret_key = secret).await;
    let t = a.tenant("auth-two", 0).await;
    user_with_password(&a, &t, "two@example.com").await;
    let first = signed_in(&a, &t, "two@example.com").await;
    assert_eq!(me(&b, &t, first["access_token"].as_str().unwrap()).await.status(), StatusCode::OK);
    let refresh_path = format!("/v1/tenants/{}/auth/refresh", t.id);
    let res = post_anon(&b, &refresh_path, json!({"refresh_token": first["refresh_token"]})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let second: Value = res.json().await.unwrap();
    // The spent token again, at the first process.
    expect_problem(
        post_anon(&a, &refresh_path, json!({"refresh_token": first["refresh_token"]})).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    expect_problem(
        post_anon(&b, &refresh_path, json!({"refresh_token": second["refresh_token"]})).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    for app in [&a, &b] {
        expect_problem(me(app, &t, second["access_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED).await;
    }
    b.stop().await;
    a.stop().await;
}

/// A login from `ip` (the test's trusted proxy forwards it).
async fn login_from(app: &TestApp, tenant: Uuid, email: &str, ip: &str) -> reqwest::Response {
    app.req(Method::POST, &format!("/v1/tenants/{tenant}/auth/login"), None)
        .header("x-forwarded-for", ip)
        .json(&json!({"email": email, "password": "not the password"}))
        .send()
        .await
        .unwrap()
}

/// In one process: attempts per email and per IP, successful or not, each up to the
/// limit; the refusal is a 429 problem with `Retry-After` and the `RateLimit` headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_attempts_are_limited_per_email_and_per_ip() {
    let db = TestDb::sqlite();
    let app = TestApp::start_with(db.url(), |c| {
        c.auth.attempts_per_minute = 3;
        c.auth.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let t = app.tenant("limits", 0).await;
    user_with_password(&app, &t, "limited@example.com").await;
    // Per email: three attempts from three IPs, the fourth refused (a right password too).
    for i in 0..3 {
        let res = login_from(&app, t.id, "limited@example.com", &format!("198.51.100.{i}")).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let res = app
        .req(Method::POST, &format!("/v1/tenants/{}/auth/login", t.id), None)
        .header("x-forwarded-for", "198.51.100.200")
        .json(&json!({"email": "limited@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let retry_after: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(res.headers()["ratelimit-policy"], "3;w=60");
    assert!(res.headers()["ratelimit"].to_str().unwrap().starts_with("limit=3, remaining=0, reset="));
    let p = expect_problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(p["type"], "urn:eventra:problem:rate-limited");
    // Per IP: other emails from one address, the fourth refused.
    for i in 0..3 {
        let res = login_from(&app, t.id, &format!("spray{i}@example.com"), "203.0.113.7").await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let res = login_from(&app, t.id, "spray9@example.com", "203.0.113.7").await;
    expect_problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    // A refused attempt writes no event: the three allowed wrong passwords of the known
    // user wrote one each, the refused attempt and the unknown emails none.
    let outbox = db.store().await.outbox_after(0, u32::MAX).await.unwrap();
    let failed = outbox.iter().filter(|r| r.event.event_type.as_str() == "auth.login_failed").count();
    assert_eq!(failed, 3, "one event per allowed attempt of a known user, none for refused ones");
    app.stop().await;
}

/// Two processes sharing Redis share the limit: 10 attempts a minute for an email in
/// all, not 10 per process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_limits_hold_across_two_processes_sharing_redis() {
    const TEST: &str = "auth::sign_in_limits_hold_across_two_processes_sharing_redis";
    let Some(redis) = crate::utils::service_url("REDIS_URL", TEST) else { return };
    let Some(db) = TestDb::postgres(TEST).await else { return };
    let ns = crate::utils::RedisNamespace::new(&redis);
    let tweak = |c: &mut eventra::config::Config| {
        c.redis_url = Some(redis.clone());
        c.namespace = ns.ns.clone();
        c.auth.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    };
    let a = TestApp::start_with(db.url(), tweak).await;
    let secret = a.config.secret_key.clone();
    let b = TestApp::start_with(db.url(), |c| {
        tweak(c);
        c.secret_key = secret;
    })
    .await;
    let t = a.tenant("limits-two", 0).await;
    let started = std::time::Instant::now();
    let mut allowed = 0;
    for i in 0..40 {
        let app = if i % 2 == 0 { &a } else { &b };
        // A new IP each time: only the email's limit applies.
        match login_from(app, t.id, "target@example.com", &format!("198.51.100.{i}")).await.status() {
            StatusCode::UNAUTHORIZED => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    // GCRA refills one attempt every 6 s.
    let refilled = started.elapsed().as_secs() / 6;
    assert!(allowed >= 10 && allowed <= 10 + refilled, "{allowed} attempts allowed in {:?}", started.elapsed());
    b.stop().await;
    a.stop().await;
}

/// `PUT …/password`: the user with their current password keeps their own session and
/// ends the others; a writer key sets it without one and ends every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_password_revokes_the_other_sessions() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let t = app.tenant("pw", 0).await;
    let user = user_with_password(&app, &t, "pw@example.com").await;
    let path = format!("/v1/tenants/{}/users/{}/password", t.id, user["id"].as_str().unwrap());
    let mine = signed_in(&app, &t, "pw@example.com").await;
    let other = signed_in(&app, &t, "pw@example.com").await;
    let my_token = mine["access_token"].as_str().unwrap();
    let put = |token: &str, body: Value| app.req(Method::PUT, &path, Some(token)).json(&body).send();
    // Without, or with a wrong, current password: refused.
    let p = expect_problem(
        put(my_token, json!({"password": "a brand new one"})).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "current_password");
    let wrong = json!({"password": "a brand new one", "current_password": "not it at all"});
    expect_problem(put(my_token, wrong).await.unwrap(), StatusCode::FORBIDDEN).await;
    // Another user's token may not.
    let stranger = user_with_password(&app, &t, "stranger@example.com").await;
    assert_ne!(stranger["id"], user["id"]);
    let stranger_token = signed_in(&app, &t, "stranger@example.com").await["access_token"].as_str().unwrap().to_owned();
    let body = json!({"password": "a brand new one", "current_password": PASSWORD});
    expect_problem(put(&stranger_token, body.clone()).await.unwrap(), StatusCode::FORBIDDEN).await;
    // Right: 204; this session lives on, the other one ends; only the new password works.
    assert_eq!(put(my_token, body).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(me(&app, &t, my_token).await.status(), StatusCode::OK);
    expect_problem(me(&app, &t, other["access_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED).await;
    expect_problem(login(&app, &t, "pw@example.com", PASSWORD).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(login(&app, &t, "pw@example.com", "a brand new one").await.status(), StatusCode::OK);
    // A writer key: no current password, and every session ends (the caller's too).
    let writer = app.key(&t, "writer").await;
    assert_eq!(put(&writer, json!({"password": "set by support"})).await.unwrap().status(), StatusCode::NO_CONTENT);
    expect_problem(me(&app, &t, my_token).await, StatusCode::UNAUTHORIZED).await;
    let reader = app.key(&t, "reader").await;
    expect_problem(put(&reader, json!({"password": "set by a reader"})).await.unwrap(), StatusCode::FORBIDDEN).await;
    // Two events, and no password in the outbox.
    let outbox = db.store().await.outbox_after(0, u32::MAX).await.unwrap();
    let changed = outbox.iter().filter(|r| r.event.event_type.as_str() == "user.password_changed").count();
    assert_eq!(changed, 2);
    let everything = serde_json::to_string(&outbox.iter().map(|r| &r.event).collect::<Vec<_>>()).unwrap();
    for secret in [PASSWORD, "a brand new one", "set by support"] {
        assert!(!everything.contains(secret));
    }
    app.stop().await;
}

/// The code in the newest message to `to` about `subject`, once it arrived.
async fn emailed_code(
    inbox: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    to: &str,
    subject: &str,
    seen: usize,
) -> String {
    crate::utils::wait_for("the code email", std::time::Duration::from_secs(20), || async {
        let mails = inbox.lock().unwrap().clone();
        let mine: Vec<&String> = mails.iter().filter(|m| m.contains(to) && m.contains(subject)).collect();
        let newest = mine.get(seen)?;
        let at = newest.find(" is ")? + 4;
        let code: String = newest[at..].chars().take(6).collect();
        (code.len() == 6 && code.chars().all(|c| c.is_ascii_digit())).then_some(code)
    })
    .await
}

/// Email verification and password reset with emailed 6-digit codes: wrong codes count
/// down, the right one changes the user in one transaction, the reset never tells
/// whether an email exists, and no code reaches the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_and_password_reset_by_emailed_codes() {
    let db = TestDb::sqlite();
    let (smtp, inbox) = crate::mailer_conformance::smtp_server::start();
    let app = TestApp::start_with(db.url(), |c| {
        c.smtp_url = Some(smtp.clone());
        c.auth.attempts_per_minute = 1000;
    })
    .await;
    let t = app.tenant("codes", 0).await;
    let user = user_with_password(&app, &t, "codes@example.com").await;
    let uid = user["id"].as_str().unwrap();
    let verify = format!("/v1/tenants/{}/users/{uid}/verification", t.id);

    // Verification: a code by email; a wrong one counts down; the right one verifies.
    let res = app.post(&verify, &t.admin_key, json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(res.json::<Value>().await.unwrap()["expires_at"].is_string());
    let code = emailed_code(&inbox, "codes@example.com", "verification code", 0).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let p = expect_problem(
        app.post(&format!("{verify}/confirm"), &t.admin_key, json!({"code": wrong})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(p["errors"][0]["message"].as_str().unwrap().contains("4 tries left"), "{p}");
    let res = app.post(&format!("{verify}/confirm"), &t.admin_key, json!({"code": code})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let verified: Value = res.json().await.unwrap();
    assert_eq!(verified["email_verified"], true);
    assert_eq!(verified["version"], 2);
    // Spent; and nothing left to verify.
    expect_problem(
        app.post(&format!("{verify}/confirm"), &t.admin_key, json!({"code": code})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect_problem(app.post(&verify, &t.admin_key, json!({})).await, StatusCode::CONFLICT).await;

    // Five tries, then even the right code is refused.
    let other = user_with_password(&app, &t, "tries@example.com").await;
    let other_verify = format!("/v1/tenants/{}/users/{}/verification", t.id, other["id"].as_str().unwrap());
    assert_eq!(app.post(&other_verify, &t.admin_key, json!({})).await.status(), StatusCode::ACCEPTED);
    let other_code = emailed_code(&inbox, "tries@example.com", "verification code", 0).await;
    let wrong = if other_code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        let res = app.post(&format!("{other_verify}/confirm"), &t.admin_key, json!({"code": wrong})).await;
        expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let res = app.post(&format!("{other_verify}/confirm"), &t.admin_key, json!({"code": other_code})).await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;

    // Reset: 202 for every email; a code only to the real one.
    let session = signed_in(&app, &t, "codes@example.com").await;
    let reset = format!("/v1/tenants/{}/auth/password-reset", t.id);
    for email in ["codes@example.com", "nobody@example.com"] {
        assert_eq!(post_anon(&app, &reset, json!({"email": email})).await.status(), StatusCode::ACCEPTED);
    }
    let reset_code = emailed_code(&inbox, "codes@example.com", "password reset code", 0).await;
    let confirm = format!("{reset}/confirm");
    let wrong = if reset_code == "000000" { "111111" } else { "000000" };
    let mut refusals = Vec::new();
    for (email, code) in [("codes@example.com", wrong), ("nobody@example.com", reset_code.as_str())] {
        let res = post_anon(&app, &confirm, json!({"email": email, "code": code, "password": "after the reset"})).await;
        let mut p = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        p.as_object_mut().unwrap().remove("request_id");
        p.as_object_mut().unwrap().remove("instance");
        refusals.push(p);
    }
    assert_eq!(refusals[0], refusals[1], "a wrong code and an unknown email answer alike");
    let res = post_anon(
        &app,
        &confirm,
        json!({"email": "codes@example.com", "code": reset_code, "password": "after the reset"}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    expect_problem(me(&app, &t, session["access_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED).await;
    expect_problem(login(&app, &t, "codes@example.com", PASSWORD).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(login(&app, &t, "codes@example.com", "after the reset").await.status(), StatusCode::OK);

    // Events, and no code in the outbox.
    let outbox = db.store().await.outbox_after(0, u32::MAX).await.unwrap();
    let types: Vec<&str> = outbox.iter().map(|r| r.event.event_type.as_str()).collect();
    assert!(types.contains(&"user.verified") && types.contains(&"user.password_changed"), "{types:?}");
    let everything = serde_json::to_string(&outbox.iter().map(|r| &r.event).collect::<Vec<_>>()).unwrap();
    for secret in [code.as_str(), other_code.as_str(), reset_code.as_str(), "after the reset"] {
        assert!(!everything.contains(&format!("\"{secret}\"")), "a secret in the outbox");
    }
    app.stop().await;
}

/// Must-show 5: the real binary, logging at `debug`, through sign-in, refresh, reuse,
/// a password change, verification and a reset: no password, code or token in any log
/// line, in the outbox or in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_an_event_or_the_audit_log() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let token = "log-test-admin-token-0123456789";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_eventra"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env_remove("REDIS_URL")
        .env_remove("EVENTRA_DATA_DIR")
        .env("EVENTRA_ADMIN_TOKEN", token)
        .env("EVENTRA_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn eventra");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        let _ = tx.send(first.clone());
        sink.lock().unwrap().push(first);
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let sink = logs.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let base = rx.await.unwrap().strip_prefix("Eventra listening on ").expect("url line").to_owned();
    eventra::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let call = |m: Method, path: &str, bearer: Option<&str>, body: Option<Value>| {
        let mut r = http.request(m, format!("{base}{path}"));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    let created: Value = crate::utils::wait_for("the binary answers", std::time::Duration::from_secs(30), || async {
        let res =
            call(Method::POST, "/v1/tenants", Some(token), Some(json!({"name": "Logs", "slug": "logs"}))).await.ok()?;
        res.json().await.ok()
    })
    .await;
    let tid = created["tenant"]["id"].as_str().unwrap().to_owned();
    let key = created["api_key"]["key"].as_str().unwrap().to_owned();
    let user: Value = call(
        Method::POST,
        &format!("/v1/tenants/{tid}/users"),
        Some(&key),
        Some(json!({"email": "logs@example.com", "name": "Logs", "password": PASSWORD})),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let uid = user["id"].as_str().unwrap().to_owned();
    let login_body = json!({"email": "logs@example.com", "password": PASSWORD});
    let pair: Value = call(Method::POST, &format!("/v1/tenants/{tid}/auth/login"), None, Some(login_body))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wrong = json!({"email": "logs@example.com", "password": "a wrong guess 123"});
    assert_eq!(
        call(Method::POST, &format!("/v1/tenants/{tid}/auth/login"), None, Some(wrong)).await.unwrap().status(),
        401
    );
    let access = pair["access_token"].as_str().unwrap().to_owned();
    let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    let second: Value =
        call(Method::POST, &format!("/v1/tenants/{tid}/auth/refresh"), None, Some(json!({"refresh_token": refresh})))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        call(Method::POST, &format!("/v1/tenants/{tid}/auth/refresh"), None, Some(json!({"refresh_token": refresh})))
            .await
            .unwrap()
            .status(),
        401
    );
    let change = json!({"password": "a changed password"});
    assert_eq!(
        call(Method::PUT, &format!("/v1/tenants/{tid}/users/{uid}/password"), Some(&key), Some(change))
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        call(Method::POST, &format!("/v1/tenants/{tid}/users/{uid}/verification"), Some(&key), None)
            .await
            .unwrap()
            .status(),
        202
    );
    // The embedded mailer writes `.eml` files: the code is read from there.
    let mail_dir = dir.path().join("data/mail");
    let code = crate::utils::wait_for("the code email", std::time::Duration::from_secs(30), || async {
        let entries = std::fs::read_dir(&mail_dir).ok()?;
        entries.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("code.")).find_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let at = text.find(" is ")? + 4;
            Some(text[at..at + 6].to_owned())
        })
    })
    .await;
    let res = call(
        Method::POST,
        &format!("/v1/tenants/{tid}/users/{uid}/verification/confirm"),
        Some(&key),
        Some(json!({"code": code})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    // Every event audited: then the audit log is read back whole.
    let audit: Value =
        crate::utils::wait_for("the auth events audited", std::time::Duration::from_secs(30), || async {
            let page: Value = call(Method::GET, &format!("/v1/tenants/{tid}/audit?limit=100"), Some(&key), None)
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let types: Vec<String> =
                page["items"].as_array()?.iter().filter_map(|e| e["type"].as_str().map(str::to_owned)).collect();
            [
                "auth.login_succeeded",
                "auth.login_failed",
                "auth.refresh_reuse_detected",
                "user.password_changed",
                "user.verified",
            ]
            .iter()
            .all(|t| types.iter().any(|x| x == t))
            .then_some(page)
        })
        .await;
    let lines = logs.lock().unwrap().clone();
    assert!(lines.len() > 50, "debug logs captured: {}", lines.len());
    let audit_text = audit.to_string();
    let secrets = [
        PASSWORD,
        "a wrong guess 123",
        "a changed password",
        access.as_str(),
        refresh.as_str(),
        second["refresh_token"].as_str().unwrap(),
        second["access_token"].as_str().unwrap(),
    ];
    for secret in secrets {
        assert!(!lines.iter().any(|l| l.contains(secret)), "a secret in the logs");
        assert!(!audit_text.contains(secret), "a secret in the audit log");
    }
    let quoted = format!("\"{code}\"");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains(&quoted) || l.contains(&format!("code {code}")) || l.contains(&format!("={code}"))),
        "the code in the logs"
    );
    assert!(!audit_text.contains(&quoted), "the code in the audit log");
    // The refresh token's first characters (a prefix could be logged as an "id").
    assert!(!lines.iter().any(|l| l.contains(&refresh[..16])));
}

/// A tenant's `rate_limit_per_second` limits each of its API keys; 0 lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_keys_are_limited_to_its_rate() {
    let db = TestDb::sqlite();
    let app = TestApp::start(db.url()).await;
    let res = app
        .post("/v1/tenants", ADMIN_TOKEN, json!({"name": "Rated", "slug": "rated", "rate_limit_per_second": 2}))
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["tenant"]["rate_limit_per_second"], 2);
    let (tid, key) =
        (body["tenant"]["id"].as_str().unwrap().to_owned(), body["api_key"]["key"].as_str().unwrap().to_owned());
    let other = app.tenant("unrated", 0).await;
    let path = format!("/v1/tenants/{tid}/users");
    // Ten at once: two pass (plus one for each half second the burst took), the rest 429.
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..10).map(|_| app.get(&path, &key))).await;
    let refills = (started.elapsed().as_millis() / 500) as usize;
    let ok = answers.iter().filter(|r| r.status() == StatusCode::OK).count();
    assert!(ok >= 2 && ok <= 2 + refills, "{ok} passed in {:?}", started.elapsed());
    let limited = answers.iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).expect("some refused");
    assert_eq!(limited.headers()["ratelimit-policy"], "2;w=1");
    assert!(limited.headers().contains_key("retry-after"));
    // Another tenant's key is not limited by it.
    for _ in 0..5 {
        assert_eq!(
            app.get(&format!("/v1/tenants/{}/users", other.id), &other.admin_key).await.status(),
            StatusCode::OK
        );
    }
    // Out of range: 422; 0 lifts the limit.
    let bad = app.patch(&format!("/v1/tenants/{tid}"), ADMIN_TOKEN, json!({"rate_limit_per_second": 2_000_000})).await;
    expect_problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await;
    let res = app.patch(&format!("/v1/tenants/{tid}"), ADMIN_TOKEN, json!({"rate_limit_per_second": 0})).await;
    assert_eq!(res.status(), StatusCode::OK);
    for _ in 0..5 {
        assert_eq!(app.get(&path, &key).await.status(), StatusCode::OK);
    }
    app.stop().await;
}

/// Raising the Argon2 parameters: an older hash still signs its user in, and is
/// replaced by one with the new parameters at that sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_made_with_older_parameters_is_upgraded_at_sign_in() {
    use eventra::auth::password::HashCost;
    let db = TestDb::sqlite();
    let cheap = HashCost { memory_kib: 8_192, iterations: 1, lanes: 1 };
    let app = TestApp::start_with(db.url(), |c| c.auth.hash_cost = cheap).await;
    let secret = app.config.secret_key.clone();
    let t = app.tenant("rehash", 0).await;
    user_with_password(&app, &t, "old@example.com").await;
    app.stop().await;
    let store = db.store().await;
    let hash_of = || async {
        store.user_credentials(t.id, "old@example.com").await.unwrap().and_then(|(_, h)| h).expect("a hash")
    };
    assert!(hash_of().await.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"));
    let app = TestApp::start_with(db.url(), |c| {
        c.secret_key = secret;
        c.auth.hash_cost = HashCost::default();
    })
    .await;
    signed_in(&app, &t, "old@example.com").await;
    assert!(hash_of().await.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "upgraded");
    signed_in(&app, &t, "old@example.com").await;
    app.stop().await;
}
