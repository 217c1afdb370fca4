//! Embedded vector store: one SQLite file (sqlx, bundled SQLite), exact cosine search with ndarray
//! over the asking user's vectors. A user's memory is thousands of chunks: exact search is a
//! millisecond and never misses, so no index is worth its build time here.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use ndarray::{Array1, ArrayView2};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::{BuildGeneration, SearchHit, StoreError, VectorStore};
use crate::types::BuildScope;
use crate::types::EmbeddedChunk;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS points (
        id BLOB PRIMARY KEY,
        user_id INTEGER NOT NULL,
        build_gen INTEGER NOT NULL,
        kind TEXT NOT NULL,
        source_ids TEXT NOT NULL,
        conversation_id TEXT,
        title TEXT,
        author TEXT,
        chunk_index INTEGER NOT NULL,
        byte_start INTEGER NOT NULL,
        byte_end INTEGER NOT NULL,
        token_start INTEGER NOT NULL,
        token_end INTEGER NOT NULL,
        token_count INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        text TEXT NOT NULL,
        vector BLOB NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS points_user ON points (user_id, build_gen)",
    "CREATE INDEX IF NOT EXISTS points_hash ON points (user_id, content_hash)",
];

/// Hashes per lookup statement: one bind each, far under SQLite's variable limit.
const HASHES_PER_LOOKUP: usize = 500;

/// Rows per INSERT: each statement is one hop to sqlx's SQLite thread, so rows per hop is what
/// sets store throughput. 18 binds a row keeps 64 rows far under SQLite's 32766-variable limit.
const UPSERT_ROWS_PER_STATEMENT: usize = 64;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating) `<dir>/vectors.sqlite`.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("creating data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("vectors.sqlite");
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        for s in SCHEMA {
            sqlx::query(s).execute(&pool).await?;
        }
        Ok(Self { pool })
    }
}

fn vec_to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[async_trait]
impl VectorStore for SqliteStore {
    async fn ensure_model(&self, model: &str, dim: usize) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows =
            sqlx::query("SELECT key, value FROM store_meta WHERE key IN ('model', 'dimension')")
                .fetch_all(&mut *tx)
                .await?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.get::<String, _>(0) == k)
                .map(|r| r.get::<String, _>(1))
        };
        match (get("model"), get("dimension")) {
            (Some(m), Some(d)) => {
                let d: usize = d.parse().unwrap_or(0);
                if m != model || d != dim {
                    return Err(StoreError::ModelMismatch {
                        stored_model: m,
                        stored_dim: d,
                        model: model.into(),
                        dim,
                    });
                }
            }
            _ => {
                sqlx::query("INSERT OR REPLACE INTO store_meta (key, value) VALUES ('model', ?), ('dimension', ?)")
                    .bind(model)
                    .bind(dim.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn model(&self) -> Result<Option<(String, usize)>, StoreError> {
        let rows =
            sqlx::query("SELECT key, value FROM store_meta WHERE key IN ('model', 'dimension')")
                .fetch_all(&self.pool)
                .await?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.get::<String, _>(0) == k)
                .map(|r| r.get::<String, _>(1))
        };
        Ok(match (get("model"), get("dimension")) {
            (Some(m), Some(d)) => Some((m, d.parse().unwrap_or(0))),
            _ => None,
        })
    }

    async fn reset(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM points").execute(&mut *tx).await?;
        sqlx::query("DELETE FROM store_meta WHERE key <> 'last_gen'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn begin_build(&self) -> Result<BuildGeneration, StoreError> {
        // Strictly increasing across builds and processes: the wall clock in microseconds,
        // bumped past the last generation handed out (kept in store_meta, not scanned).
        let mut tx = self.pool.begin().await?;
        let last: Option<String> =
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'last_gen'")
                .fetch_optional(&mut *tx)
                .await?;
        let last = last.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let gen = chrono::Utc::now().timestamp_micros().max(last + 1);
        sqlx::query("INSERT OR REPLACE INTO store_meta (key, value) VALUES ('last_gen', ?)")
            .bind(gen.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(gen)
    }

    async fn upsert(
        &self,
        gen: BuildGeneration,
        points: &[EmbeddedChunk],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for rows in points.chunks(UPSERT_ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO points (id, user_id, build_gen, kind, source_ids, conversation_id, title, author, \
                 chunk_index, byte_start, byte_end, token_start, token_end, token_count, created_at, \
                 content_hash, text, vector) ",
            );
            qb.push_values(rows, |mut b, p| {
                let c = &p.chunk;
                let id = crate::hash::point_id(c.user_id, &c.source_ids, c.chunk_index);
                b.push_bind(id.as_bytes().to_vec())
                    .push_bind(c.user_id)
                    .push_bind(gen)
                    .push_bind(c.kind.as_str())
                    .push_bind(serde_json::to_string(&c.source_ids).unwrap_or_default())
                    .push_bind(c.conversation_id.clone())
                    .push_bind(c.title.clone())
                    .push_bind(c.author.clone())
                    .push_bind(c.chunk_index as i64)
                    .push_bind(c.byte_start as i64)
                    .push_bind(c.byte_end as i64)
                    .push_bind(c.token_start as i64)
                    .push_bind(c.token_end as i64)
                    .push_bind(c.token_count as i64)
                    .push_bind(c.created_at.to_rfc3339())
                    .push_bind(c.content_hash.clone())
                    .push_bind(c.text.clone())
                    .push_bind(vec_to_blob(&p.vector));
            });
            // A stale build (one that lost its lock to a newer one) never overwrites a point the
            // newer build wrote: generations only move forward.
            qb.push(
                " ON CONFLICT (id) DO UPDATE SET build_gen = excluded.build_gen, kind = excluded.kind, \
                 source_ids = excluded.source_ids, conversation_id = excluded.conversation_id, \
                 title = excluded.title, author = excluded.author, byte_start = excluded.byte_start, \
                 byte_end = excluded.byte_end, token_start = excluded.token_start, \
                 token_end = excluded.token_end, token_count = excluded.token_count, \
                 created_at = excluded.created_at, content_hash = excluded.content_hash, \
                 text = excluded.text, vector = excluded.vector \
                 WHERE excluded.build_gen >= points.build_gen",
            );
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn finish_build(
        &self,
        gen: BuildGeneration,
        scope: &BuildScope,
    ) -> Result<u64, StoreError> {
        let res = match scope {
            BuildScope::User(u) => {
                // Only older generations: a stale build finishing late never sweeps a newer one's.
                sqlx::query("DELETE FROM points WHERE user_id = ? AND build_gen < ?")
                    .bind(*u)
                    .bind(gen)
                    .execute(&self.pool)
                    .await?
            }
            BuildScope::AllUsers => {
                sqlx::query("DELETE FROM points WHERE build_gen < ?")
                    .bind(gen)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(res.rows_affected())
    }

    async fn search(
        &self,
        user_id: i64,
        query: &[f32],
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        let rows = sqlx::query("SELECT rowid, vector FROM points WHERE user_id = ?")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() || top_k == 0 {
            return Ok(Vec::new());
        }
        let dim = query.len();
        let mut flat = Vec::with_capacity(rows.len() * dim);
        let mut rowids = Vec::with_capacity(rows.len());
        for r in &rows {
            let blob: &[u8] = r.get(1);
            if blob.len() != dim * 4 {
                return Err(StoreError::Dimension {
                    got: dim,
                    want: blob.len() / 4,
                });
            }
            flat.extend(
                blob.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            rowids.push(r.get::<i64, _>(0));
        }
        let m = ArrayView2::from_shape((rowids.len(), dim), &flat)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let q = Array1::from_vec(query.to_vec());
        let scores = m.dot(&q);
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        let k = top_k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| scores[b].total_cmp(&scores[a]));
        idx.truncate(k);
        idx.sort_by(|&a, &b| {
            scores[b]
                .total_cmp(&scores[a])
                .then(rowids[a].cmp(&rowids[b]))
        });
        let mut hits = Vec::with_capacity(k);
        for i in idx {
            let r = sqlx::query(
                "SELECT id, user_id, kind, source_ids, conversation_id, author, created_at, text
                 FROM points WHERE rowid = ? AND user_id = ?",
            )
            .bind(rowids[i])
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
            let id: Vec<u8> = r.get(0);
            hits.push(SearchHit {
                id: Uuid::from_slice(&id).unwrap_or_default(),
                score: scores[i],
                user_id: r.get(1),
                kind: r.get(2),
                source_ids: serde_json::from_str(r.get::<&str, _>(3)).unwrap_or_default(),
                conversation_id: r.get(4),
                author: r.get(5),
                created_at: r.get(6),
                text: r.get(7),
            });
        }
        Ok(hits)
    }

    async fn vectors_by_hash(
        &self,
        keys: &[(i64, &str)],
    ) -> Result<super::VectorsByHash, StoreError> {
        let mut by_user: std::collections::BTreeMap<i64, Vec<&str>> = Default::default();
        for (u, h) in keys {
            by_user.entry(*u).or_default().push(h);
        }
        let mut out = super::VectorsByHash::new();
        for (user, hashes) in by_user {
            for part in hashes.chunks(HASHES_PER_LOOKUP) {
                let mut qb: QueryBuilder<Sqlite> =
                    QueryBuilder::new("SELECT content_hash, vector FROM points WHERE user_id = ");
                qb.push_bind(user).push(" AND content_hash IN (");
                let mut sep = qb.separated(", ");
                for h in part {
                    sep.push_bind(*h);
                }
                qb.push(")");
                for r in qb.build().fetch_all(&self.pool).await? {
                    let blob: &[u8] = r.get(1);
                    let v = blob
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    out.entry(user)
                        .or_default()
                        .insert(r.get::<String, _>(0), v);
                }
            }
        }
        Ok(out)
    }

    async fn count(&self, user_id: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM points WHERE user_id = ?")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn point_ids(&self, user_id: i64) -> Result<Vec<Uuid>, StoreError> {
        let rows: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT id FROM points WHERE user_id = ? ORDER BY id")
                .bind(user_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .filter_map(|b| Uuid::from_slice(b).ok())
            .collect())
    }
}
