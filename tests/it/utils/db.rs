//! A fresh database per test: a temp SQLite file, or a new PostgreSQL database created
//! from the `DATABASE_URL` admin connection and dropped afterwards.

use std::io::Write;
use std::sync::Arc;

use eventra::store::{self, Store};
use sqlx::Connection;
use uuid::Uuid;

pub enum TestDb {
    Sqlite { _dir: tempfile::TempDir, url: String },
    Postgres { admin_url: String, name: String, url: String },
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("eventra.db").display());
        TestDb::Sqlite { _dir: dir, url }
    }

    /// A new PostgreSQL database, or `None` (with a NOT RUN line) when `DATABASE_URL`
    /// is unset outside CI. In CI a missing or unreachable server fails the test.
    pub async fn postgres(test: &str) -> Option<Self> {
        let admin_url = match std::env::var("DATABASE_URL") {
            Ok(u) if u.starts_with("postgres") => u,
            _ => {
                assert!(!super::in_ci(), "{test}: CI=true but DATABASE_URL does not point at PostgreSQL");
                // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
                let _ = writeln!(std::io::stderr(), "NOT RUN: {test}: set DATABASE_URL=postgres://… to run it");
                return None;
            }
        };
        let name = format!("eventra_t_{}", Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("{test}: cannot reach PostgreSQL at DATABASE_URL: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create test database");
        let _ = conn.close().await;
        let url = eventra::store::with_database(&admin_url, &name);
        Some(TestDb::Postgres { admin_url, name, url })
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url,
        }
    }

    /// A migrated store on this database.
    pub async fn store(&self) -> Arc<dyn Store> {
        let s = store::connect(self.url(), 4).await.expect("connect store");
        s.migrate().await.expect("migrate");
        s
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { admin_url, name, .. } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
                    }
                });
            })
            .join();
        }
    }
}

#[test]
fn replaces_database_name() {
    assert_eq!(eventra::store::with_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
    assert_eq!(
        eventra::store::with_database("postgres://u@h/test?sslmode=disable", "x"),
        "postgres://u@h/x?sslmode=disable"
    );
    assert_eq!(eventra::store::with_database("postgres://u@h", "x"), "postgres://u@h/x");
}
