//! A Postgres database of the test's own: created under a unique name on the
//! server at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`,
//! the server `scripts/test.sh` starts), migrated or left empty, and dropped
//! with the value, pass or fail.
//!
//! [`TestDb::migrated`] applies `sql/` with refinery, embedded the way
//! `proxy/src/db.rs` embeds it for `tollgate migrate`, so a test runs on the
//! schema production gets, recorded in `refinery_schema_history` like
//! production's. [`TestDb::empty`] is for tests of migrating itself (the
//! `tollgate migrate` command, the Grafana role).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

refinery::embed_migrations!("../sql");

/// Connections of a test's pool: the code under test (a writer, an exporter)
/// and the test's own queries, and still far from Postgres's default
/// `max_connections` (100) with a test per core running.
const POOL_SIZE: usize = 8;

/// The server's administrative database, where databases are created and dropped.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `{prefix}_{process}_{counter}_{nanos}`: unique across the processes nextest
/// runs at once and across runs, and a valid unquoted SQL identifier.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database of the test's own, dropped (`WITH (FORCE)`) when this is.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// A URL for it, on the server and with the credentials of [`admin_url`].
    pub url: String,
    /// A pool of [`POOL_SIZE`] plain connections to it.
    pub pool: Pool,
}

impl TestDb {
    /// A new database with no tables.
    pub async fn empty() -> Self {
        let name = unique("tollgate_test");
        let admin = admin_url();
        let (client, connection) = tokio_postgres::connect(&admin, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        let manager = Manager::from_config(
            url.parse().unwrap(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager).max_size(POOL_SIZE).build().unwrap();
        Self { name, url, pool }
    }

    /// A new database with every migration of `sql/` applied.
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        let (mut client, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        migrations::runner().run_async(&mut client).await.unwrap();
        db
    }

    /// Runs one statement on a pooled connection.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) {
        self.pool
            .get()
            .await
            .unwrap()
            .execute(sql, params)
            .await
            .unwrap();
    }

    /// The one row `sql` returns.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Row {
        self.pool
            .get()
            .await
            .unwrap()
            .query_one(sql, params)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        admin_statement_on_drop(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `statement` on [`admin_url`], for a `Drop`: from a thread and a
/// runtime of its own, since a drop may run inside a runtime (which cannot
/// block on another) or outside any. Errors are ignored: a drop has nobody
/// to report them to, and a database left behind is only clutter.
pub fn admin_statement_on_drop(statement: String) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            if let Ok((client, connection)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                tokio::spawn(connection);
                let _ = client.batch_execute(&statement).await;
            }
        });
    })
    .join();
}
