//! [`ScratchDatabase`]: a throwaway PostgreSQL database for tests and benchmarks, created on
//! a server given by URL and dropped (with its connections) when the value is dropped.

use std::str::FromStr;

use pond_core::StoreError;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::rows::db_err;

/// A database that exists for the lifetime of this value.
pub struct ScratchDatabase {
    /// URL of the new database.
    pub url: String,
    name: String,
    server: PgConnectOptions,
}

fn with_database(url: &str, database: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

impl ScratchDatabase {
    /// Creates `pond_<prefix>_<random>` on the server of `server_url`.
    pub async fn create(server_url: &str, prefix: &str) -> Result<Self, StoreError> {
        let server = PgConnectOptions::from_str(server_url)
            .map_err(|e| StoreError::Backend(format!("bad database URL: {e}")))?;
        let name = format!("pond_{prefix}_{}", uuid_suffix());
        let mut conn = server.connect().await.map_err(db_err)?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await.map_err(db_err)?;
        conn.close().await.map_err(db_err)?;
        Ok(ScratchDatabase { url: with_database(server_url, &name), name, server })
    }
}

/// What the database server counted of the work done in one database (see
/// [`ScratchDatabase::activity`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Activity {
    /// Transactions committed or rolled back in the database.
    pub transactions: i64,
    /// Statements executed in the database, when `pg_stat_statements` is loaded
    /// (`shared_preload_libraries`); `None` otherwise.
    pub statements: Option<i64>,
    /// WAL syncs (fsync/fdatasync of the WAL) of the whole server.
    pub wal_syncs: i64,
}

impl Activity {
    /// The work between `earlier` and this reading.
    pub fn since(&self, earlier: &Activity) -> Activity {
        Activity {
            transactions: self.transactions - earlier.transactions,
            statements: self.statements.zip(earlier.statements).map(|(a, b)| a - b),
            wal_syncs: self.wal_syncs - earlier.wal_syncs,
        }
    }
}

impl ScratchDatabase {
    /// The server's counters for this database. Backends report theirs when they end (or after
    /// a while idle), so read them after the pools using the database have closed.
    pub async fn activity(&self) -> Result<Activity, StoreError> {
        let options = PgConnectOptions::from_str(&self.url).map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut conn = options.connect().await.map_err(db_err)?;
        let transactions: i64 = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(db_err)?;
        let wal_syncs: i64 = sqlx::query_scalar("SELECT wal_sync::BIGINT FROM pg_stat_wal")
            .fetch_one(&mut conn)
            .await
            .map_err(db_err)?;
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&mut conn).await;
        let statements: Option<i64> = sqlx::query_scalar(
            "SELECT COALESCE(SUM(calls), 0)::BIGINT FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut conn)
        .await
        .ok();
        conn.close().await.map_err(db_err)?;
        Ok(Activity { transactions, statements, wal_syncs })
    }
}

fn uuid_suffix() -> String {
    let id = pond_core::ids::RunId::generate(pond_core::time::Timestamp::from_millis(0));
    id.0.simple().to_string()[16..].to_string()
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside an async runtime; a thread with its own runtime keeps it simple.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(mut conn) = server.connect().await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_replace_the_path_only() {
        let cases = [
            ("postgres://u@h:5432/test", "postgres://u@h:5432/x"),
            ("postgres://u@h/test?sslmode=disable", "postgres://u@h/x?sslmode=disable"),
            ("postgres://u@h", "postgres://u@h/x"),
        ];
        for (url, want) in cases {
            assert_eq!(super::with_database(url, "x"), want);
        }
    }
}

/// A test's prerequisite (a PostgreSQL server, root, PyNaCl, the agent CLIs) is missing: the
/// test fails naming it, so a suite run without the set-up cannot pass by skipping. With
/// `POND_TEST_ALLOW_SKIP=1` it prints `skipped: …` instead and the caller returns.
pub fn missing_prerequisite(what: &str) {
    if std::env::var("POND_TEST_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("skipped: {what}");
        return;
    }
    panic!(
        "missing test prerequisite: {what}. Run the suite with `bash .ci/run`, which sets up what the tests need, \
         or set POND_TEST_ALLOW_SKIP=1 to skip such tests"
    );
}
