//! Postgres source: one configured query per document kind, each read through a server-side
//! cursor in pages, so a user with a million messages never sits whole in memory.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::Row;
use tokio::sync::mpsc;

use super::{
    Rejection, Source, SourceBatch, SourceError, SourceStream, SOURCE_BATCH_BYTES,
    SOURCE_BATCH_DOCS,
};
use crate::types::BuildScope;
use crate::types::{DocKind, RawDocument};

/// Rows per FETCH: big enough that the round trip is noise, small enough that a page of long
/// posts stays a few MB.
const FETCH_ROWS: i64 = 1000;
/// Batches the reader may run ahead of the cleaner (as for files).
const READ_AHEAD_BATCHES: usize = 4;

/// One document kind and the query that yields it. The query takes `$1`, the user id, or NULL
/// for every user, and returns the columns `user_id` (bigint: whose memory the row belongs to),
/// `source_id`, `text`, `created_at` (timestamptz) and, optionally, `conversation_id`, `title`,
/// `author` (text or NULL). Rows should come ordered by user, conversation and time: packing
/// joins neighbouring chat messages.
#[derive(Debug, Clone)]
pub struct KindQuery {
    pub kind: DocKind,
    pub sql: String,
}

#[derive(Clone)]
pub struct PostgresSource {
    pool: PgPool,
    queries: Arc<Vec<KindQuery>>,
}

impl PostgresSource {
    pub fn new(pool: PgPool, queries: Vec<KindQuery>) -> Self {
        Self {
            pool,
            queries: Arc::new(queries),
        }
    }
}

type Tx = mpsc::Sender<Result<SourceBatch, SourceError>>;

impl Source for PostgresSource {
    fn documents(&self, scope: &BuildScope) -> SourceStream {
        let (tx, rx) = mpsc::channel(READ_AHEAD_BATCHES);
        let user = match scope {
            BuildScope::User(u) => Some(*u),
            BuildScope::AllUsers => None,
        };
        let (pool, queries) = (self.pool.clone(), self.queries.clone());
        super::watch_reader(
            tx.clone(),
            tokio::spawn(async move {
                for q in queries.iter() {
                    match read_kind(&pool, q, user, &tx).await {
                        Ok(true) => {}
                        Ok(false) => return, // the build went away
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            }),
        );
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    /// Each kind's query counted by the server (`count(*)` over it), none of its rows sent.
    fn count(&self, scope: &BuildScope) -> super::CountFuture<'_> {
        let user = match scope {
            BuildScope::User(u) => Some(*u),
            BuildScope::AllUsers => None,
        };
        Box::pin(async move {
            let mut total = 0u64;
            for q in self.queries.iter() {
                let sql = format!("SELECT count(*) FROM ({}) AS orbit_count", q.sql);
                let n: i64 = sqlx::query_scalar(&sql)
                    .persistent(false)
                    .bind(user)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| query_error(q.kind, e))?;
                total += n.max(0) as u64;
            }
            Ok(Some(total))
        })
    }

    fn describe(&self) -> String {
        format!("postgres ({} document kinds)", self.queries.len())
    }
}

fn query_error(kind: DocKind, e: sqlx::Error) -> SourceError {
    SourceError::Query(format!("{} query: {e}", kind.as_str()))
}

/// Streams one kind's rows; false when the receiver is gone.
async fn read_kind(
    pool: &PgPool,
    q: &KindQuery,
    user: Option<i64>,
    tx: &Tx,
) -> Result<bool, SourceError> {
    let err = |e| query_error(q.kind, e);
    let mut conn = pool.begin().await.map_err(err)?;
    // A cursor lives in its transaction; the name is ours alone on this connection.
    let cursor = format!("orbit_source_{}", q.kind.as_str());
    let declare = format!("DECLARE {cursor} NO SCROLL CURSOR FOR {}", q.sql);
    sqlx::query(&declare)
        .persistent(false)
        .bind(user)
        .execute(&mut *conn)
        .await
        .map_err(err)?;
    let fetch = format!("FETCH {FETCH_ROWS} FROM {cursor}");
    let mut batch = SourceBatch::default();
    let mut batch_bytes = 0usize;
    let mut started = Instant::now();
    loop {
        // Not a cached statement: a FETCH's columns are those of whichever cursor it reads, and
        // a cached description from another query would misread the rows.
        let rows = sqlx::query(&fetch)
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .map_err(err)?;
        let last = (rows.len() as i64) < FETCH_ROWS;
        for row in rows {
            match decode(q.kind, &row) {
                Ok(doc) => {
                    let n = doc.text.len();
                    batch.bytes += n as u64;
                    batch_bytes += n;
                    batch.docs.push(doc);
                }
                Err(r) => batch.rejected.push(r),
            }
            if batch.docs.len() >= SOURCE_BATCH_DOCS || batch_bytes >= SOURCE_BATCH_BYTES {
                batch.busy = started.elapsed();
                if tx.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                    return Ok(false);
                }
                batch_bytes = 0;
                started = Instant::now();
            }
        }
        if last {
            break;
        }
    }
    // Read-only: ending the transaction closes the cursor.
    conn.commit().await.map_err(err)?;
    if !batch.docs.is_empty() || !batch.rejected.is_empty() {
        batch.busy = started.elapsed();
        if tx.send(Ok(batch)).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn decode(kind: DocKind, row: &sqlx::postgres::PgRow) -> Result<RawDocument, Rejection> {
    let source_id: String = row.try_get("source_id").unwrap_or_default();
    let reject = |e: sqlx::Error| Rejection {
        location: format!("{} row {}", kind.as_str(), source_id),
        reason: e.to_string(),
    };
    let opt = |name: &str| -> Result<Option<String>, Rejection> {
        match row.try_get::<Option<String>, _>(name) {
            Ok(v) => Ok(v),
            Err(sqlx::Error::ColumnNotFound(_)) => Ok(None),
            Err(e) => Err(reject(e)),
        }
    };
    Ok(RawDocument {
        user_id: row.try_get("user_id").map_err(reject)?,
        kind,
        text: row
            .try_get::<Option<String>, _>("text")
            .map_err(reject)?
            .unwrap_or_default(),
        created_at: row
            .try_get::<DateTime<Utc>, _>("created_at")
            .map_err(reject)?,
        conversation_id: opt("conversation_id")?,
        title: opt("title")?,
        author: opt("author")?,
        meta: None,
        source_id,
    })
}
