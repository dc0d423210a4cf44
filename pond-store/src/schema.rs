//! Where a database's schema stands against the migrations this build carries, read without
//! changing anything (`pond server --check`): opening a store migrates; this only looks.

use std::path::Path;
use std::str::FromStr;

use pond_core::StoreError;
use sqlx::Connection as _;

/// The migrations a database has applied beside those this build knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Versions applied (successfully), in order.
    pub applied: Vec<i64>,
    /// Versions this build carries, in order.
    pub known: Vec<i64>,
}

impl SchemaStatus {
    /// Versions this build would apply at start.
    pub fn pending(&self) -> Vec<i64> {
        self.known.iter().copied().filter(|v| !self.applied.contains(v)).collect()
    }

    /// Versions applied by a build newer than this one.
    pub fn unknown(&self) -> Vec<i64> {
        self.applied.iter().copied().filter(|v| !self.known.contains(v)).collect()
    }
}

const APPLIED: &str = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";

fn known(migrator: &sqlx::migrate::Migrator) -> Vec<i64> {
    migrator.iter().filter(|m| m.migration_type.is_up_migration()).map(|m| m.version).collect()
}

fn no_table(e: &sqlx::Error) -> bool {
    // Before the first migration the bookkeeping table does not exist.
    e.as_database_error().is_some_and(|d| d.message().contains("_sqlx_migrations"))
}

/// The schema of the SQLite database at `path`, opened read-only; `None` when there is no file
/// yet (the first start makes it).
pub async fn sqlite_schema(path: &Path) -> Result<Option<SchemaStatus>, StoreError> {
    if !path.exists() {
        return Ok(None);
    }
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path).read_only(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
    let applied = match sqlx::query_scalar::<_, i64>(APPLIED).fetch_all(&mut conn).await {
        Ok(v) => v,
        Err(e) if no_table(&e) => Vec::new(),
        Err(e) => return Err(StoreError::Backend(format!("reading {}: {e}", path.display()))),
    };
    let _ = conn.close().await;
    Ok(Some(SchemaStatus { applied, known: known(&crate::sqlite::MIGRATOR) }))
}

/// The schema of the PostgreSQL database at `url` (one connection, nothing written).
pub async fn pg_schema(url: &str) -> Result<SchemaStatus, StoreError> {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Backend(format!("bad database URL: {e}")))?
        .application_name("pond-check");
    let mut conn = tokio::time::timeout(std::time::Duration::from_secs(10), sqlx::PgConnection::connect_with(&options))
        .await
        .map_err(|_| StoreError::Unavailable("no answer within 10 s".into()))?
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let applied = match sqlx::query_scalar::<_, i64>(APPLIED).fetch_all(&mut conn).await {
        Ok(v) => v,
        Err(e) if no_table(&e) => Vec::new(),
        Err(e) => return Err(StoreError::Backend(e.to_string())),
    };
    let _ = conn.close().await;
    Ok(SchemaStatus { applied, known: known(&crate::pg::MIGRATOR) })
}

const RECORD: &str = "SELECT body FROM records WHERE kind = $1 AND key = $2";

/// One record of the SQLite database at `path`, read over a read-only connection.
pub async fn sqlite_record(path: &Path, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path).read_only(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
    let body = sqlx::query_scalar::<_, String>(RECORD)
        .bind(kind)
        .bind(key)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| StoreError::Backend(format!("reading {}: {e}", path.display())));
    let _ = conn.close().await;
    body
}

/// One record of the PostgreSQL database at `url`, read in a read-only transaction.
pub async fn pg_record(url: &str, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Backend(format!("bad database URL: {e}")))?
        .application_name("pond-check");
    let mut conn =
        sqlx::PgConnection::connect_with(&options).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
    sqlx::query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .execute(&mut conn)
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    let body = sqlx::query_scalar::<_, String>(RECORD)
        .bind(kind)
        .bind(key)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| StoreError::Backend(e.to_string()));
    let _ = conn.close().await;
    body
}
