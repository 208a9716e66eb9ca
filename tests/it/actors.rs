//! The actor layer below HTTP: tenant managers start on demand and stop when idle.

use std::time::Duration;

use eventra::actors::Tenants;
use eventra::domain::tenant::NewTenantInput;
use eventra::domain::user::NewUserInput;
use eventra::domain::{EventContext, NewTenant, NewUser};
use eventra::supervision::root::RootDeps;
use eventra::supervision::Root;

use crate::utils::{wait_for, TestDb};

fn ctx() -> EventContext {
    EventContext::system("actors-test")
}

#[tokio::test]
async fn tenant_managers_start_on_demand_and_stop_when_idle() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let deps = RootDeps {
        store: store.clone(),
        api: true,
        tenant_idle_timeout: Duration::from_millis(200),
        max_tenant_managers: 100,
        jobs: None,
        pipeline: None,
        indexer: None,
        metrics_history: None,
    };
    let root = Root::start(deps).await.unwrap();
    let tenants = Tenants::new(root.tenants.clone(), store, Duration::from_secs(10), 100);

    let input =
        NewTenantInput { name: "Idle".into(), slug: "idle".into(), max_users: None, rate_limit_per_second: None };
    let (tenant, _) =
        tenants.create_tenant(NewTenant::parse(input, eventra::domain::now()).unwrap(), ctx()).await.unwrap();
    assert!(tenants.managers().await.unwrap().is_empty(), "creating a tenant starts no manager");

    let user = |email: &str| {
        let input = NewUserInput { email: email.into(), name: "U".into(), attributes: None, password: None };
        NewUser::parse(tenant.id, input, eventra::domain::now()).unwrap()
    };
    tenants.create_user(user("a@x.io"), None, ctx()).await.unwrap();
    let running = tenants.managers().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].tenant_id, tenant.id);
    let first_actor = running[0].actor_id;

    wait_for("the idle manager to stop", Duration::from_secs(10), || {
        let t = tenants.clone();
        async move { t.managers().await.ok().filter(|m| m.is_empty()) }
    })
    .await;

    // The next write starts a fresh manager and succeeds.
    tenants.create_user(user("b@x.io"), None, ctx()).await.unwrap();
    let running = tenants.managers().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_ne!(running[0].actor_id, first_actor, "a new actor, not the stopped one");

    // Unknown tenants get no actor.
    let ghost = NewUser::parse(
        uuid::Uuid::now_v7(),
        NewUserInput { email: "g@x.io".into(), name: "G".into(), attributes: None, password: None },
        eventra::domain::now(),
    )
    .unwrap();
    assert!(matches!(tenants.create_user(ghost, None, ctx()).await, Err(eventra::error::Error::NotFound("tenant"))));
    assert_eq!(tenants.managers().await.unwrap().len(), 1);

    root.actor.stop_and_wait(None, Some(Duration::from_secs(10))).await.unwrap();
}
