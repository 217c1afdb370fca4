//! SQL plumbing shared by everything that keeps a table: one SQLite file's pool, opened the way
//! the stores open theirs, and telling a lost "create if missing" race from a real error.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

/// A pool on the SQLite file at `path`, created if missing: WAL (readers never wait on the
/// writer), `synchronous = NORMAL` (durable at each checkpoint, safe under WAL), and 30 s of
/// busy timeout for writers of other processes on the same file.
pub async fn sqlite_pool(path: &Path, max_connections: u32) -> Result<SqlitePool, sqlx::Error> {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(std::time::Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(opts)
        .await
}

/// Whether `e` is Postgres refusing a `CREATE … IF NOT EXISTS` that another connection won at the
/// same moment (a unique violation on the catalogue, or "already exists"): the table is there.
pub fn lost_create_race(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23505" || c == "42P07")
}
