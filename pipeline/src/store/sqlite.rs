//! Embedded vector store: one SQLite file (sqlx, bundled SQLite), exact cosine search over the
//! asking user's vectors (kept in memory between searches, `vector_cache`), and an FTS5 index of
//! the same points for BM25. A user's memory is thousands of chunks: exact search is milliseconds
//! and never misses, so no approximate index is worth its build time here.
//!
//! The lexical index is external-content FTS5 over `points.terms`, kept by triggers: whatever
//! inserts, rewrites or deletes a point (an upsert under the generation fence, the end-of-build
//! sweep, a reset) changes its index entry in the same statement, so the two never disagree.
//! Every term is stored prefixed with its user (`u42xhotel`): a question's terms carry the same
//! prefix, so its match reads only that user's posting lists, and BM25's document frequencies
//! are the user's own.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::vector_cache::{UserCache, UserVectors, VectorCache, Versioned, VECTOR_CACHE_BYTES};
use super::{chunk_terms, term_prefix, BuildGeneration, SearchHit, StoreError, VectorStore};
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
    // Bumped by every write to a user's points: what the in-memory vectors are checked against.
    "CREATE TABLE IF NOT EXISTS user_versions (user_id INTEGER PRIMARY KEY, version INTEGER NOT NULL)",
];

/// The lexical index, created after `points` has its `terms` column (added to older files).
const LEXICAL_SCHEMA: &[&str] = &[
    // `ascii`: the terms are already normalised (`lexical`), so the tokenizer only splits on
    // the spaces between them; non-ASCII letters are term characters as they are.
    // The default `detail=full`: `none` and `column` built a little faster but made BM25
    // queries twice as slow at 100 k chunks (docs/retrieval.md).
    "CREATE VIRTUAL TABLE IF NOT EXISTS points_fts USING fts5(
        terms, content='points', content_rowid='rowid', tokenize='ascii'
    )",
    "CREATE TRIGGER IF NOT EXISTS points_fts_insert AFTER INSERT ON points BEGIN
        INSERT INTO points_fts (rowid, terms) VALUES (new.rowid, new.terms);
    END",
    "CREATE TRIGGER IF NOT EXISTS points_fts_delete AFTER DELETE ON points BEGIN
        INSERT INTO points_fts (points_fts, rowid, terms) VALUES ('delete', old.rowid, old.terms);
    END",
    // A rebuild rewrites every point, mostly with unchanged text: only a change reindexes.
    "CREATE TRIGGER IF NOT EXISTS points_fts_update AFTER UPDATE OF terms ON points
     WHEN old.terms IS NOT new.terms BEGIN
        INSERT INTO points_fts (points_fts, rowid, terms) VALUES ('delete', old.rowid, old.terms);
        INSERT INTO points_fts (rowid, terms) VALUES (new.rowid, new.terms);
    END",
];

/// Hashes per lookup statement: one bind each, far under SQLite's variable limit.
const HASHES_PER_LOOKUP: usize = 500;

/// Rows per INSERT: each statement is one hop to sqlx's SQLite thread, and FTS5 writes out its
/// pending terms at the end of every statement (its savepoint), so a store batch
/// (`STORE_BATCH_POINTS`, 512) is one statement: against 64 rows a statement, the lexical index
/// cost a third less build time. 19 binds a row keeps 512 rows under SQLite's 32766-variable
/// limit.
const UPSERT_ROWS_PER_STATEMENT: usize = 512;

/// Rows read per statement when an older store file gains the lexical index.
const BACKFILL_ROWS: i64 = 2000;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One writer at a time in this process, in arrival order. SQLite has one writer per file;
    /// left to itself, a writer that finds the lock taken polls under the busy timeout with
    /// growing sleeps, and under eight concurrent builds some waited out the timeout ("database
    /// is locked"). Queued here they wait their turn; other processes on the file are ordered by
    /// `BEGIN IMMEDIATE` and the busy timeout.
    writer: Arc<tokio::sync::Mutex<()>>,
    vectors: Arc<VectorCache>,
    terms: Arc<UserCache<UserTerms>>,
    /// False: points are stored with no terms and lexical search finds nothing (a dense-only
    /// deployment that does not pay for the index; `ORBIT_LEXICAL_INDEX=false`).
    lexical: bool,
}

/// The stored terms of a chunk: its index terms (`Chunk::terms`, computed here if a producer
/// left them empty), each with the user's prefix.
fn indexed_terms(user_id: i64, title: Option<&str>, text: &str, terms: &str) -> String {
    let terms = chunk_terms(title, text, terms);
    let prefix = term_prefix(user_id);
    let mut out = String::with_capacity(terms.len() + (prefix.len() + 1) * terms.len() / 6);
    for t in terms.split(' ').filter(|t| !t.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&prefix);
        out.push_str(t);
    }
    out
}

/// A question's term matching more than this share of the user's chunks is dropped from the
/// query: BM25 gives it little weight (IDF ln 19 at a twentieth of the chunks, against ln 10 000
/// for a term in ten of 100 k), while scoring its postings is most of the query's time. A
/// question of nothing but such terms gets no lexical list: the dense list answers it.
const MAX_TERM_DOC_SHARE: f64 = 0.05;
/// Below this many chunks nothing is pruned: scoring every posting is fast there, and in a small
/// memory even a common word tells passages apart.
const PRUNE_FROM_DOCS: i64 = 2_000;

/// Postings one question may make FTS5 score in a large memory: past it the most common of the
/// remaining terms are dropped (the rarest always stays). `bm25()` costs about 3 µs a posting
/// here (it reads each row's length), so this holds the query near 25 ms whatever words a
/// question holds; what it drops are the terms of least weight.
const MAX_SCORED_POSTINGS: i64 = 8_000;

/// Bytes of per-user term statistics kept in memory: a 100 k-chunk user's vocabulary is a few
/// MB, a small user's a few KB.
const TERM_CACHE_BYTES: usize = 64 << 20;

/// One user's chunk count and document frequency per stored term (without the user's prefix),
/// counted from `points.terms` at one version: what a question's terms are pruned by. Asking
/// FTS5 (`fts5vocab`) instead reads each term's whole doclist, 8 ms a question at 100 k chunks.
#[derive(Debug)]
struct UserTerms {
    version: i64,
    docs: i64,
    df: HashMap<Box<str>, u32>,
    bytes: usize,
}

impl UserTerms {
    fn count(version: i64, prefix: &str, rows: &[&str]) -> Self {
        let mut df: HashMap<Box<str>, u32> = HashMap::new();
        for terms in rows {
            // Stored terms are distinct within a chunk: each is one document.
            for t in terms.split(' ') {
                let Some(t) = t.strip_prefix(prefix).filter(|t| !t.is_empty()) else {
                    continue;
                };
                match df.get_mut(t) {
                    Some(n) => *n += 1,
                    None => {
                        df.insert(t.into(), 1);
                    }
                }
            }
        }
        // Key bytes, the entry, and the table's own slack.
        let bytes = df.keys().map(|k| k.len() + 40).sum::<usize>() + 64;
        Self {
            version,
            docs: rows.len() as i64,
            df,
            bytes,
        }
    }
}

impl Versioned for UserTerms {
    fn version(&self) -> i64 {
        self.version
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The FTS5 query over `terms` (already prefixed), any of them. Terms hold only letters and
/// digits (`lexical`), so quoting them is all the escaping there is.
fn match_expression(terms: &[String]) -> String {
    terms
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// Which terms to search with, from each term's document frequency among the user's `docs`
/// chunks: absent terms go (they match nothing), and in a memory of `PRUNE_FROM_DOCS` chunks or
/// more so do terms in more than `MAX_TERM_DOC_SHARE` of them, then the commonest until the
/// postings to score fit `MAX_SCORED_POSTINGS` (the rarest of the rest always stays).
fn prune_terms(with_df: Vec<(String, i64)>, docs: i64) -> Vec<String> {
    let present: Vec<(String, i64)> = with_df.into_iter().filter(|(_, df)| *df > 0).collect();
    if docs < PRUNE_FROM_DOCS {
        return present.into_iter().map(|(t, _)| t).collect();
    }
    let limit = docs as f64 * MAX_TERM_DOC_SHARE;
    let mut by_df: Vec<i64> = present
        .iter()
        .map(|(_, df)| *df)
        .filter(|df| (*df as f64) <= limit)
        .collect();
    by_df.sort_unstable();
    // The largest document frequency that still fits the budget, rarest terms first.
    let mut postings = 0;
    let mut max_df = None;
    for df in by_df {
        if max_df.is_some() && postings + df > MAX_SCORED_POSTINGS {
            break;
        }
        postings += df;
        max_df = Some(df);
    }
    if let Some(max_df) = max_df {
        // Terms tied at the cut all stay: which of equals to drop would be arbitrary.
        return present
            .into_iter()
            .filter(|(_, df)| *df <= max_df)
            .map(|(t, _)| t)
            .collect();
    }
    Vec::new()
}

impl SqliteStore {
    /// Opens (creating) `<dir>/vectors.sqlite`, with the lexical index.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, true).await
    }

    /// Opens (creating) the live version of `<dir>` (`versions::live_file`: `vectors.sqlite`
    /// until a re-embed switches); `lexical` false writes no terms (see the field).
    pub async fn open_with(dir: &Path, lexical: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("creating data dir {}: {e}", dir.display()))
        })?;
        let file = super::versions::live_file(dir)?;
        Self::open_file(dir, &file, lexical).await
    }

    /// Opens (creating) one version of the store, `<dir>/<file>`, live or not.
    pub async fn open_file(dir: &Path, file: &str, lexical: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("creating data dir {}: {e}", dir.display()))
        })?;
        let pool = crate::sql::sqlite_pool(&dir.join(file), 4).await?;
        for s in SCHEMA {
            sqlx::query(s).execute(&pool).await?;
        }
        let store = Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            vectors: Arc::new(VectorCache::new(VECTOR_CACHE_BYTES)),
            terms: Arc::new(UserCache::new(TERM_CACHE_BYTES)),
            lexical,
        };
        store.ensure_lexical_index().await?;
        Ok(store)
    }

    /// A write transaction: this process's writer turn, then `BEGIN IMMEDIATE`, which takes the
    /// file's write lock at the start. A deferred `BEGIN` that reads first (the generation
    /// counter, the model row) cannot upgrade to a writer once another connection has committed
    /// since its read: SQLite answers "database is locked" at once, busy timeout or not.
    async fn write(
        &self,
    ) -> Result<
        (
            tokio::sync::OwnedMutexGuard<()>,
            sqlx::Transaction<'static, Sqlite>,
        ),
        StoreError,
    > {
        let turn = self.writer.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((turn, tx))
    }

    /// Checks that the lexical index agrees with the points it indexes (FTS5's own
    /// `integrity-check` against the content table): an operator's check, and the tests'.
    pub async fn check_integrity(&self) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO points_fts (points_fts, rank) VALUES ('integrity-check', 1)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Creates the lexical index, or adds it to a store file written before it existed: the
    /// `terms` column filled for every point, the index built from it, then the triggers that keep
    /// it. One transaction, so a crash mid-way leaves the old file as it was, and the next open
    /// starts again; `store_meta.lexical_index` marks it done.
    async fn ensure_lexical_index(&self) -> Result<(), StoreError> {
        let (_turn, mut tx) = self.write().await?;
        let done: Option<String> =
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'lexical_index'")
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            return Ok(());
        }
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('points')")
                .fetch_all(&mut *tx)
                .await?;
        if !columns.iter().any(|c| c == "terms") {
            sqlx::query("ALTER TABLE points ADD COLUMN terms TEXT NOT NULL DEFAULT ''")
                .execute(&mut *tx)
                .await?;
        }
        // The index table first, without its triggers: the fill below must not ask FTS5 to
        // delete entries it never held.
        sqlx::query(LEXICAL_SCHEMA[0]).execute(&mut *tx).await?;
        let mut after = i64::MIN;
        loop {
            let rows = sqlx::query(
                "SELECT rowid, user_id, title, text FROM points WHERE rowid > ? ORDER BY rowid LIMIT ?",
            )
            .bind(after)
            .bind(BACKFILL_ROWS)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            for r in &rows {
                sqlx::query("UPDATE points SET terms = ? WHERE rowid = ?")
                    .bind(indexed_terms(r.get(1), r.get(2), r.get(3), ""))
                    .bind(r.get::<i64, _>(0))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("INSERT INTO points_fts (points_fts) VALUES ('rebuild')")
            .execute(&mut *tx)
            .await?;
        for s in &LEXICAL_SCHEMA[1..] {
            sqlx::query(s).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO store_meta (key, value) VALUES ('lexical_index', '1')")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user's vectors, from memory when nothing of theirs changed since they were read.
    async fn user_vectors(&self, user_id: i64, dim: usize) -> Result<Arc<UserVectors>, StoreError> {
        let fits = |v: &UserVectors| v.dim == dim || v.rowids.is_empty();
        self.per_user(
            &self.vectors,
            user_id,
            fits,
            "SELECT rowid, vector FROM points WHERE user_id = ?",
            move |version, rows| {
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
                Ok(UserVectors::new(version, dim, rowids, flat))
            },
        )
        .await
    }

    /// The user's term statistics, from memory when nothing of theirs changed since they were
    /// counted.
    async fn user_terms(&self, user_id: i64) -> Result<Arc<UserTerms>, StoreError> {
        let prefix = term_prefix(user_id);
        self.per_user(
            &self.terms,
            user_id,
            |_| true,
            "SELECT terms FROM points WHERE user_id = ?",
            move |version, rows| {
                let rows: Vec<&str> = rows.iter().map(|r| r.get::<&str, _>(0)).collect();
                Ok(UserTerms::count(version, &prefix, &rows))
            },
        )
        .await
    }

    /// A per-user value from `cache` when it is at the user's current version (and `fits`),
    /// else built by `build` from `sql`'s rows (bound to the user), read in one snapshot with
    /// the version: an entry never pairs newer rows with an older version or the reverse. The
    /// decoding and building run on the blocking pool: at 100 k rows they are tens of ms.
    async fn per_user<T, F>(
        &self,
        cache: &UserCache<T>,
        user_id: i64,
        fits: impl Fn(&T) -> bool,
        sql: &'static str,
        build: F,
    ) -> Result<Arc<T>, StoreError>
    where
        T: Versioned + Send + Sync + 'static,
        F: FnOnce(i64, Vec<SqliteRow>) -> Result<T, StoreError> + Send + 'static,
    {
        let version = user_version(&self.pool, user_id).await?;
        if let Some(v) = cache.get(user_id, version).filter(|v| fits(v)) {
            return Ok(v);
        }
        let mut tx = self.pool.begin().await?;
        let version = user_version(&mut *tx, user_id).await?;
        let rows = sqlx::query(sql).bind(user_id).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let v = tokio::task::spawn_blocking(move || build(version, rows))
            .await
            .map_err(|e| StoreError::Backend(format!("reading a user's memory failed: {e}")))??;
        let v = Arc::new(v);
        cache.put(user_id, v.clone());
        Ok(v)
    }

    /// The rows of `user_id` among `ranked` (rowid, score), in that order, as hits.
    async fn hits(
        &self,
        user_id: i64,
        ranked: &[(i64, f32)],
        dense: bool,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if ranked.is_empty() {
            return Ok(Vec::new());
        }
        // `+user_id`: the user is checked on each row found by rowid, never looked up through
        // `points_user`, which would walk all of a large user's rows to find forty.
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT rowid, id, user_id, kind, source_ids, conversation_id, author, created_at, text \
             FROM points WHERE +user_id = ",
        );
        qb.push_bind(user_id).push(" AND rowid IN (");
        let mut sep = qb.separated(", ");
        for (rowid, _) in ranked {
            sep.push_bind(*rowid);
        }
        qb.push(")");
        let mut by_rowid: HashMap<i64, SearchHit> = HashMap::new();
        for r in qb.build().fetch_all(&self.pool).await? {
            let id: Vec<u8> = r.get(1);
            by_rowid.insert(
                r.get(0),
                SearchHit {
                    id: Uuid::from_slice(&id).unwrap_or_default(),
                    score: 0.0,
                    dense_score: None,
                    lexical_score: None,
                    user_id: r.get(2),
                    kind: r.get(3),
                    source_ids: serde_json::from_str(r.get::<&str, _>(4)).unwrap_or_default(),
                    conversation_id: r.get(5),
                    author: r.get(6),
                    created_at: r.get(7),
                    text: r.get(8),
                },
            );
        }
        Ok(ranked
            .iter()
            .filter_map(|(rowid, score)| {
                let mut h = by_rowid.remove(rowid)?;
                h.score = *score;
                if dense {
                    h.dense_score = Some(*score);
                } else {
                    h.lexical_score = Some(*score);
                }
                Some(h)
            })
            .collect())
    }
}

async fn user_version<'e, E>(ex: E, user_id: i64) -> Result<i64, StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let v: Option<i64> = sqlx::query_scalar("SELECT version FROM user_versions WHERE user_id = ?")
        .bind(user_id)
        .fetch_optional(ex)
        .await?;
    Ok(v.unwrap_or(0))
}

/// Marks users' points changed, inside the writing transaction.
async fn bump_versions(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    users: impl IntoIterator<Item = i64>,
) -> Result<(), StoreError> {
    for u in users {
        sqlx::query(
            "INSERT INTO user_versions (user_id, version) VALUES (?, 1) \
             ON CONFLICT (user_id) DO UPDATE SET version = version + 1",
        )
        .bind(u)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn vec_to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[async_trait]
impl VectorStore for SqliteStore {
    async fn ensure_model(&self, model: &str, dim: usize) -> Result<(), StoreError> {
        let (_turn, mut tx) = self.write().await?;
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
        let (_turn, mut tx) = self.write().await?;
        sqlx::query("DELETE FROM points").execute(&mut *tx).await?;
        sqlx::query("UPDATE user_versions SET version = version + 1")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM store_meta WHERE key NOT IN ('last_gen', 'lexical_index')")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn begin_build(&self) -> Result<BuildGeneration, StoreError> {
        // Strictly increasing across builds and processes: the wall clock in microseconds,
        // bumped past the last generation handed out (kept in store_meta, not scanned).
        let (_turn, mut tx) = self.write().await?;
        let last: Option<String> =
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'last_gen'")
                .fetch_optional(&mut *tx)
                .await?;
        let last = last.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let gen = super::next_generation(last);
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
        let (_turn, mut tx) = self.write().await?;
        for rows in points.chunks(UPSERT_ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO points (id, user_id, build_gen, kind, source_ids, conversation_id, title, author, \
                 chunk_index, byte_start, byte_end, token_start, token_end, token_count, created_at, \
                 content_hash, text, vector, terms) ",
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
                    .push_bind(vec_to_blob(&p.vector))
                    .push_bind(if self.lexical {
                        indexed_terms(c.user_id, c.title.as_deref(), &c.text, &c.terms)
                    } else {
                        String::new()
                    });
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
                 text = excluded.text, vector = excluded.vector, terms = excluded.terms \
                 WHERE excluded.build_gen >= points.build_gen",
            );
            qb.build().execute(&mut *tx).await?;
        }
        let users: BTreeSet<i64> = points.iter().map(|p| p.chunk.user_id).collect();
        bump_versions(&mut tx, users).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn finish_build(
        &self,
        gen: BuildGeneration,
        scope: &BuildScope,
    ) -> Result<u64, StoreError> {
        let (_turn, mut tx) = self.write().await?;
        // Only older generations: a stale build finishing late never sweeps a newer one's. The
        // delete trigger takes each swept point out of the lexical index too.
        let deleted = match scope {
            BuildScope::User(u) => {
                let n = sqlx::query("DELETE FROM points WHERE user_id = ? AND build_gen < ?")
                    .bind(*u)
                    .bind(gen)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n > 0 {
                    bump_versions(&mut tx, [*u]).await?;
                }
                n
            }
            BuildScope::AllUsers => {
                let n = sqlx::query("DELETE FROM points WHERE build_gen < ?")
                    .bind(gen)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n > 0 {
                    sqlx::query("UPDATE user_versions SET version = version + 1")
                        .execute(&mut *tx)
                        .await?;
                }
                n
            }
        };
        tx.commit().await?;
        Ok(deleted)
    }

    async fn search_dense(
        &self,
        user_id: i64,
        query: &[f32],
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if top_k == 0 || query.is_empty() {
            return Ok(Vec::new());
        }
        let v = self.user_vectors(user_id, query.len()).await?;
        if v.rowids.is_empty() {
            return Ok(Vec::new());
        }
        // Milliseconds of arithmetic at 100 k rows: off the async threads.
        let q = query.to_vec();
        let ranked = tokio::task::spawn_blocking(move || v.top(&q, top_k))
            .await
            .map_err(|e| StoreError::Backend(format!("dense search thread failed: {e}")))?;
        self.hits(user_id, &ranked, true).await
    }

    async fn search_lexical(
        &self,
        user_id: i64,
        question: &str,
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        if top_k == 0 || !self.lexical {
            return Ok(Vec::new());
        }
        let question_terms = crate::lexical::query_terms(question);
        if question_terms.is_empty() {
            return Ok(Vec::new());
        }
        let stats = self.user_terms(user_id).await?;
        let with_df: Vec<(String, i64)> = question_terms
            .into_iter()
            .map(|t| {
                let df = stats.df.get(t.as_str()).copied().unwrap_or(0) as i64;
                (t, df)
            })
            .collect();
        let prefix = term_prefix(user_id);
        let terms: Vec<String> = prune_terms(with_df, stats.docs)
            .into_iter()
            .map(|t| format!("{prefix}{t}"))
            .collect();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let expr = match_expression(&terms);
        // FTS5's bm25() is lower-is-better; negated so every score in a hit is higher-is-better.
        let ranked: Vec<(i64, f64)> = sqlx::query_as(
            "SELECT rowid, -rank FROM points_fts WHERE points_fts MATCH ? ORDER BY rank LIMIT ?",
        )
        .bind(expr)
        .bind(top_k as i64)
        .fetch_all(&self.pool)
        .await?;
        let ranked: Vec<(i64, f32)> = ranked.into_iter().map(|(r, s)| (r, s as f32)).collect();
        self.hits(user_id, &ranked, false).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_terms_are_pruned_by_document_frequency() {
        let t = |v: &[(&str, i64)]| v.iter().map(|(a, b)| (a.to_string(), *b)).collect();
        // name, (term, df) pairs, the user's chunks, the terms kept
        type Case = (
            &'static str,
            Vec<(String, i64)>,
            i64,
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            ("absent terms go", t(&[("a", 0), ("b", 3)]), 100, &["b"]),
            (
                "a small memory keeps common terms",
                t(&[("a", 80), ("b", 3)]),
                100,
                &["a", "b"],
            ),
            (
                "common terms go",
                t(&[("a", 8000), ("b", 3), ("c", 400)]),
                10_000,
                &["b", "c"],
            ),
            (
                "all common in a large memory: no lexical list",
                t(&[("a", 9000), ("b", 7000)]),
                10_000,
                &[],
            ),
            ("nothing present", t(&[("a", 0)]), 10_000, &[]),
            (
                "the commonest go past the postings budget",
                t(&[("a", 5_000), ("b", 12), ("c", 9_500), ("d", 2_900)]),
                200_000,
                &["a", "b", "d"],
            ),
            (
                "equals at the cut both stay",
                t(&[("a", 5_000), ("b", 5_000)]),
                200_000,
                &["a", "b"],
            ),
            (
                "the rarest stays even alone over the budget",
                t(&[("a", 25_000), ("b", 30_000)]),
                1_000_000,
                &["a"],
            ),
            (
                "a tiny memory keeps its one match",
                t(&[("a", 1)]),
                1,
                &["a"],
            ),
        ];
        for (name, with_df, docs, want) in cases {
            assert_eq!(prune_terms(with_df.clone(), *docs), *want, "{name}");
        }
    }

    #[test]
    fn term_statistics_count_documents_per_term() {
        let rows = ["u1xhotel u1xlisbon", "u1xhotel", "", "u1xcasa u1xhotel"];
        let t = UserTerms::count(7, "u1x", &rows);
        assert_eq!((t.version, t.docs), (7, 4));
        assert_eq!(t.df.get("hotel"), Some(&3));
        assert_eq!(t.df.get("lisbon"), Some(&1));
        assert_eq!(t.df.len(), 3, "no empty term, no prefix kept: {:?}", t.df);
        assert!(t.bytes > 0);
    }

    #[test]
    fn prefixes_never_collide() {
        assert_eq!(term_prefix(42), "u42x");
        assert_eq!(term_prefix(-5), "n5x");
        assert_ne!(term_prefix(-5), term_prefix(5));
        assert_eq!(
            term_prefix(i64::MIN),
            format!("n{}x", i64::MIN.unsigned_abs())
        );
        assert_eq!(
            match_expression(&["u1xa".into(), "u1xb".into()]),
            "\"u1xa\" OR \"u1xb\""
        );
    }
}
