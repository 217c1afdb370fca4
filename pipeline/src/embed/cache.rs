//! Embedding cache: a text is embedded once per (model, dimensions), whoever's memory it is in and
//! whichever build or re-embed run asks for it again (a rebuild, another user with the same text,
//! a run resumed after a crash). `CachedEmbedder` wraps any embedder; the cache lives in SQLite
//! beside the embedded store, or in a table of the app's Postgres when the worker has one.
//!
//! Keys are the xxh3-128 of the text: the text itself is never stored here. The cache is bounded
//! in bytes; past the bound the least recently used vectors go (a hit refreshes its entry at most
//! once an hour, so lookups stay reads). A cache that fails is logged and bypassed: it saves
//! money, it never fails a build.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sqlx::{PgPool, Row, SqlitePool};
use tokio::sync::watch;

use super::{EmbedError, EmbedLimits, Embedder};
use crate::hash::content_hash;

/// The default bound: 1 GiB holds about 170 k vectors of 1536 dimensions (a large user's memory
/// several times over), or 700 k of the local model's 384.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// What a row costs beyond its vector (key, space, timestamp, index entries), for the bound.
const ROW_OVERHEAD: u64 = 64;
/// When over the bound, evict down to this fraction of it, so eviction runs once per many puts.
const EVICT_TO: f64 = 0.9;
/// Keys per lookup statement: under SQLite's and Postgres' parameter limits with room to spare.
const LOOKUP_BATCH: usize = 500;
/// A hit rewrites its `used` time only when older than this: recency to the hour is enough for
/// LRU, and most lookups stay reads.
const TOUCH_AFTER_SECS: i64 = 3600;
/// The Postgres table (the worker's own; the app never reads it).
const PG_TABLE: &str = "orbit_embedding_cache";

#[derive(Debug, thiserror::Error)]
#[error("embedding cache: {0}")]
pub struct CacheError(String);

impl From<sqlx::Error> for CacheError {
    fn from(e: sqlx::Error) -> Self {
        CacheError(e.to_string())
    }
}

/// The key of one text.
pub type CacheKey = [u8; 16];

pub fn cache_key(text: &str) -> CacheKey {
    content_hash(text).to_be_bytes()
}

/// Where vectors of one (model, dimensions) live: every model's vectors apart.
pub fn cache_space(model: &str, dim: usize) -> String {
    format!("{model}@{dim}")
}

#[async_trait]
pub trait EmbeddingCache: Send + Sync {
    /// The vectors held for `keys` in `space`; missing ones are absent.
    async fn get(
        &self,
        space: &str,
        keys: &[CacheKey],
    ) -> Result<HashMap<CacheKey, Vec<f32>>, CacheError>;
    async fn put(&self, space: &str, entries: &[(CacheKey, &[f32])]) -> Result<(), CacheError>;
    /// Bytes held (an estimate: vectors plus `ROW_OVERHEAD` a row).
    async fn bytes(&self) -> Result<u64, CacheError>;
    fn describe(&self) -> String;
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A stored vector, or None when it is not `dim` floats (a row of another shape is a miss).
fn from_bytes(b: &[u8], dim: usize) -> Option<Vec<f32>> {
    (b.len() == dim * 4).then(|| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// The dimension a space names (`model@dim`).
fn space_dim(space: &str) -> usize {
    space
        .rsplit('@')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// How many of the oldest rows to evict so `bytes` comes down to `EVICT_TO` of `max`, at
/// `row_bytes` each; 0 while under `max`.
pub fn rows_to_evict(bytes: u64, max: u64, row_bytes: u64) -> u64 {
    if bytes <= max || row_bytes == 0 {
        return 0;
    }
    let target = (max as f64 * EVICT_TO) as u64;
    (bytes - target).div_ceil(row_bytes)
}

/// The cache in a SQLite file of its own (`embedding-cache.sqlite` in the data dir).
pub struct SqliteEmbeddingCache {
    pool: SqlitePool,
    path: String,
    max_bytes: u64,
    bytes: AtomicU64,
}

impl SqliteEmbeddingCache {
    pub async fn open(dir: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir).map_err(|e| CacheError(format!("{}: {e}", dir.display())))?;
        let path = dir.join("embedding-cache.sqlite");
        let pool = crate::sql::sqlite_pool(&path, 4).await?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS embeddings (space TEXT NOT NULL, hash BLOB NOT NULL, \
             vector BLOB NOT NULL, used INTEGER NOT NULL, PRIMARY KEY (space, hash)) WITHOUT ROWID",
            "CREATE INDEX IF NOT EXISTS embeddings_used ON embeddings (used)",
        ] {
            sqlx::query(ddl).execute(&pool).await?;
        }
        let bytes: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(length(vector)), 0) + count(*) * ? FROM embeddings",
        )
        .bind(ROW_OVERHEAD as i64)
        .fetch_one(&pool)
        .await?;
        Ok(Self {
            pool,
            path: path.display().to_string(),
            max_bytes,
            bytes: AtomicU64::new(bytes.max(0) as u64),
        })
    }

    async fn evict(&self, row_bytes: u64) -> Result<(), CacheError> {
        let n = rows_to_evict(
            self.bytes.load(Ordering::Relaxed),
            self.max_bytes,
            row_bytes,
        );
        if n == 0 {
            return Ok(());
        }
        sqlx::query(
            "DELETE FROM embeddings WHERE (space, hash) IN \
             (SELECT space, hash FROM embeddings ORDER BY used LIMIT ?)",
        )
        .bind(n as i64)
        .execute(&self.pool)
        .await?;
        let bytes: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(length(vector)), 0) + count(*) * ? FROM embeddings",
        )
        .bind(ROW_OVERHEAD as i64)
        .fetch_one(&self.pool)
        .await?;
        self.bytes.store(bytes.max(0) as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl EmbeddingCache for SqliteEmbeddingCache {
    async fn get(
        &self,
        space: &str,
        keys: &[CacheKey],
    ) -> Result<HashMap<CacheKey, Vec<f32>>, CacheError> {
        let dim = space_dim(space);
        let mut out = HashMap::new();
        let now = now_secs();
        for part in keys.chunks(LOOKUP_BATCH) {
            let marks = vec!["?"; part.len()].join(",");
            let sql = format!(
                "SELECT hash, vector, used FROM embeddings WHERE space = ? AND hash IN ({marks})"
            );
            let mut q = sqlx::query(&sql).bind(space);
            for k in part {
                q = q.bind(k.as_slice());
            }
            let mut stale: Vec<CacheKey> = Vec::new();
            for row in q.fetch_all(&self.pool).await? {
                let hash: Vec<u8> = row.get(0);
                let vector: Vec<u8> = row.get(1);
                let used: i64 = row.get(2);
                let (Ok(key), Some(v)) = (
                    <CacheKey>::try_from(hash.as_slice()),
                    from_bytes(&vector, dim),
                ) else {
                    continue;
                };
                if now - used > TOUCH_AFTER_SECS {
                    stale.push(key);
                }
                out.insert(key, v);
            }
            if !stale.is_empty() {
                let marks = vec!["?"; stale.len()].join(",");
                let sql =
                    format!("UPDATE embeddings SET used = ? WHERE space = ? AND hash IN ({marks})");
                let mut q = sqlx::query(&sql).bind(now).bind(space);
                for k in &stale {
                    q = q.bind(k.as_slice());
                }
                q.execute(&self.pool).await?;
            }
        }
        Ok(out)
    }

    async fn put(&self, space: &str, entries: &[(CacheKey, &[f32])]) -> Result<(), CacheError> {
        if entries.is_empty() || self.max_bytes == 0 {
            return Ok(());
        }
        let now = now_secs();
        let mut tx = self.pool.begin().await?;
        let mut added = 0u64;
        for (k, v) in entries {
            let r = sqlx::query(
                "INSERT INTO embeddings (space, hash, vector, used) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (space, hash) DO UPDATE SET used = excluded.used",
            )
            .bind(space)
            .bind(k.as_slice())
            .bind(to_bytes(v))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() > 0 {
                added += v.len() as u64 * 4 + ROW_OVERHEAD;
            }
        }
        tx.commit().await?;
        // Conflicts count too (an upper bound): the recount after an eviction puts it right.
        self.bytes.fetch_add(added, Ordering::Relaxed);
        let row_bytes = entries[0].1.len() as u64 * 4 + ROW_OVERHEAD;
        self.evict(row_bytes).await
    }

    async fn bytes(&self) -> Result<u64, CacheError> {
        Ok(self.bytes.load(Ordering::Relaxed))
    }

    fn describe(&self) -> String {
        format!("SQLite {}", self.path)
    }
}

/// The cache in a table of the app's Postgres, shared by every worker on every machine.
pub struct PgEmbeddingCache {
    pool: PgPool,
    max_bytes: u64,
    /// Puts since the size was last checked: the table's size is read every `CHECK_EVERY`.
    puts: AtomicU64,
}

/// Puts between two looks at the table's size (other workers add to it too).
const CHECK_EVERY: u64 = 64;

impl PgEmbeddingCache {
    /// Makes the table if it is not there (two workers may race to: the loser's error is the
    /// winner's table).
    pub async fn open(pool: PgPool, max_bytes: u64) -> Result<Self, CacheError> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {PG_TABLE} (space text NOT NULL, hash bytea NOT NULL, \
             vector bytea NOT NULL, used bigint NOT NULL, PRIMARY KEY (space, hash))"
        );
        let idx = format!("CREATE INDEX IF NOT EXISTS {PG_TABLE}_used ON {PG_TABLE} (used)");
        for sql in [ddl, idx] {
            match sqlx::query(&sql).execute(&pool).await {
                Err(e) if !crate::sql::lost_create_race(&e) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(Self {
            pool,
            max_bytes,
            puts: AtomicU64::new(0),
        })
    }

    async fn size(&self) -> Result<(u64, u64), CacheError> {
        let row = sqlx::query(&format!(
            "SELECT coalesce(sum(length(vector)), 0)::bigint, count(*) FROM {PG_TABLE}"
        ))
        .fetch_one(&self.pool)
        .await?;
        let (b, n): (i64, i64) = (row.get(0), row.get(1));
        Ok((b.max(0) as u64, n.max(0) as u64))
    }
}

#[async_trait]
impl EmbeddingCache for PgEmbeddingCache {
    async fn get(
        &self,
        space: &str,
        keys: &[CacheKey],
    ) -> Result<HashMap<CacheKey, Vec<f32>>, CacheError> {
        let dim = space_dim(space);
        let mut out = HashMap::new();
        let now = now_secs();
        for part in keys.chunks(LOOKUP_BATCH) {
            let hashes: Vec<Vec<u8>> = part.iter().map(|k| k.to_vec()).collect();
            let rows = sqlx::query(&format!(
                "SELECT hash, vector, used FROM {PG_TABLE} WHERE space = $1 AND hash = ANY($2)"
            ))
            .bind(space)
            .bind(&hashes)
            .fetch_all(&self.pool)
            .await?;
            let mut stale: Vec<Vec<u8>> = Vec::new();
            for row in rows {
                let hash: Vec<u8> = row.get(0);
                let vector: Vec<u8> = row.get(1);
                let used: i64 = row.get(2);
                let (Ok(key), Some(v)) = (
                    <CacheKey>::try_from(hash.as_slice()),
                    from_bytes(&vector, dim),
                ) else {
                    continue;
                };
                if now - used > TOUCH_AFTER_SECS {
                    stale.push(hash);
                }
                out.insert(key, v);
            }
            if !stale.is_empty() {
                sqlx::query(&format!(
                    "UPDATE {PG_TABLE} SET used = $1 WHERE space = $2 AND hash = ANY($3)"
                ))
                .bind(now)
                .bind(space)
                .bind(&stale)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(out)
    }

    async fn put(&self, space: &str, entries: &[(CacheKey, &[f32])]) -> Result<(), CacheError> {
        if entries.is_empty() || self.max_bytes == 0 {
            return Ok(());
        }
        let hashes: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.to_vec()).collect();
        let vectors: Vec<Vec<u8>> = entries.iter().map(|(_, v)| to_bytes(v)).collect();
        sqlx::query(&format!(
            "INSERT INTO {PG_TABLE} (space, hash, vector, used) \
             SELECT $1, h, v, $4 FROM UNNEST($2::bytea[], $3::bytea[]) AS t(h, v) \
             ON CONFLICT (space, hash) DO UPDATE SET used = excluded.used"
        ))
        .bind(space)
        .bind(&hashes)
        .bind(&vectors)
        .bind(now_secs())
        .execute(&self.pool)
        .await?;
        if !self
            .puts
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CHECK_EVERY)
        {
            return Ok(());
        }
        let (vector_bytes, rows) = self.size().await?;
        let bytes = vector_bytes + rows * ROW_OVERHEAD;
        let row_bytes = entries[0].1.len() as u64 * 4 + ROW_OVERHEAD;
        let n = rows_to_evict(bytes, self.max_bytes, row_bytes);
        if n > 0 {
            sqlx::query(&format!(
                "DELETE FROM {PG_TABLE} WHERE ctid IN \
                 (SELECT ctid FROM {PG_TABLE} ORDER BY used LIMIT $1)"
            ))
            .bind(n as i64)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn bytes(&self) -> Result<u64, CacheError> {
        let (b, n) = self.size().await?;
        Ok(b + n * ROW_OVERHEAD)
    }

    fn describe(&self) -> String {
        format!("Postgres table {PG_TABLE}")
    }
}

/// What a `CachedEmbedder` has saved so far, and what it sent.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Tokens of the texts sent to the embedder (cl100k, as OpenAI counts them).
    pub sent_tokens: AtomicU64,
}

fn cl100k(texts: &[String]) -> u64 {
    texts
        .iter()
        .map(|t| crate::tokenize::Encoding::Cl100kBase.count(t) as u64)
        .sum()
}

/// A vector another call is embedding: `Some` once it has it; closed if that call failed.
type Awaited = watch::Receiver<Option<Arc<Vec<f32>>>>;
/// The sending side: this call embeds the text and tells those waiting.
type Promised = watch::Sender<Option<Arc<Vec<f32>>>>;

/// An embedder that asks `cache` first and embeds only what it lacks.
pub struct CachedEmbedder {
    inner: Arc<dyn Embedder>,
    cache: Arc<dyn EmbeddingCache>,
    space: String,
    pub counters: Arc<CacheCounters>,
    /// Texts being embedded now, by key: a second call with the same text waits for the first.
    pending: Mutex<HashMap<CacheKey, Awaited>>,
}

impl CachedEmbedder {
    pub fn new(inner: Arc<dyn Embedder>, cache: Arc<dyn EmbeddingCache>) -> Self {
        let space = cache_space(inner.model_id(), inner.dimension());
        Self {
            inner,
            cache,
            space,
            counters: Arc::default(),
            pending: Mutex::default(),
        }
    }

    async fn embed_through(
        &self,
        texts: Vec<String>,
        tokens: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let keys: Vec<CacheKey> = texts.iter().map(|t| cache_key(t)).collect();
        let mut found = match self.cache.get(&self.space, &keys).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "embedding cache lookup failed; embedding without it");
                HashMap::new()
            }
        };
        // Each missing text once: embedded here, or awaited from the call already embedding it
        // (two users' builds in flight with the same text pay for it once).
        let mut mine: Vec<(usize, Promised)> = Vec::new();
        let mut theirs: Vec<(usize, Awaited)> = Vec::new();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = std::collections::HashSet::new();
            for (i, k) in keys.iter().enumerate() {
                if found.contains_key(k) || !seen.insert(*k) {
                    continue;
                }
                match pending.get(k) {
                    Some(rx) => theirs.push((i, rx.clone())),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        pending.insert(*k, rx);
                        mine.push((i, tx));
                    }
                }
            }
        }
        let hits = texts.len() - mine.len() - theirs.len();
        self.counters.hits.fetch_add(hits as u64, Ordering::Relaxed);
        let result = self.embed_missing(&texts, &keys, tokens, &mine).await;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (i, _) in &mine {
                pending.remove(&keys[*i]);
            }
        }
        for ((i, tx), v) in mine.iter().zip(result?) {
            let _ = tx.send(Some(Arc::new(v.clone())));
            found.insert(keys[*i], v);
        }
        // What another call was embedding; if that call failed, embedded here after all.
        let mut orphans = Vec::new();
        for (i, mut rx) in theirs {
            match rx.wait_for(Option::is_some).await {
                Ok(v) => {
                    let v = v.as_ref().map(|v| v.as_ref().clone()).unwrap_or_default();
                    found.insert(keys[i], v);
                }
                Err(_) => orphans.push(i),
            }
        }
        if !orphans.is_empty() {
            let todo: Vec<String> = orphans.iter().map(|&i| texts[i].clone()).collect();
            self.counters
                .misses
                .fetch_add(todo.len() as u64, Ordering::Relaxed);
            self.counters
                .sent_tokens
                .fetch_add(cl100k(&todo), Ordering::Relaxed);
            for (&i, v) in orphans.iter().zip(self.inner.embed(todo).await?) {
                found.insert(keys[i], v);
            }
        }
        keys.iter()
            .map(|k| {
                found
                    .get(k)
                    .cloned()
                    .ok_or_else(|| EmbedError::Decode("embedding cache lost a vector".into()))
            })
            .collect()
    }

    /// Embeds the texts of `mine` and keeps their vectors in the cache.
    async fn embed_missing<T>(
        &self,
        texts: &[String],
        keys: &[CacheKey],
        tokens: Option<usize>,
        mine: &[(usize, T)],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        self.counters
            .misses
            .fetch_add(mine.len() as u64, Ordering::Relaxed);
        let todo: Vec<String> = mine.iter().map(|(i, _)| texts[*i].clone()).collect();
        self.counters
            .sent_tokens
            .fetch_add(cl100k(&todo), Ordering::Relaxed);
        let vectors = match tokens {
            // The batch's count, shared out by bytes: the rate budget is corrected by every
            // answer's headers anyway.
            Some(t) => {
                let all: usize = texts.iter().map(String::len).sum();
                let part: usize = todo.iter().map(String::len).sum();
                let share = (t as u128 * part as u128 / all.max(1) as u128) as usize;
                self.inner.embed_counted(todo, share).await?
            }
            None => self.inner.embed(todo).await?,
        };
        let entries: Vec<(CacheKey, &[f32])> = mine
            .iter()
            .zip(&vectors)
            .map(|((i, _), v)| (keys[*i], v.as_slice()))
            .collect();
        if let Err(e) = self.cache.put(&self.space, &entries).await {
            tracing::warn!(error = %e, "embedding cache write failed; vectors not kept");
        }
        Ok(vectors)
    }
}

#[async_trait]
impl Embedder for CachedEmbedder {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn limits(&self) -> EmbedLimits {
        self.inner.limits()
    }
    fn rate_limit(&self) -> Option<(f64, f64)> {
        self.inner.rate_limit()
    }
    fn preferred_chunk_tokens(&self) -> Option<usize> {
        self.inner.preferred_chunk_tokens()
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_through(texts, None).await
    }
    async fn embed_counted(
        &self,
        texts: Vec<String>,
        tokens: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_through(texts, Some(tokens)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::HashingEmbedder;

    /// Counts what reaches the real embedder.
    struct Counting {
        inner: HashingEmbedder,
        model: String,
        texts: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Embedder for Counting {
        fn model_id(&self) -> &str {
            &self.model
        }
        fn dimension(&self) -> usize {
            self.inner.dimension()
        }
        fn limits(&self) -> EmbedLimits {
            self.inner.limits()
        }
        async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.texts.lock().unwrap().extend(texts.iter().cloned());
            // Long enough for a second call to arrive while this one is in flight.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            self.inner.embed(texts).await
        }
    }

    fn counting_as(model: &str) -> Arc<Counting> {
        Arc::new(Counting {
            inner: HashingEmbedder::new(8),
            model: model.into(),
            texts: Default::default(),
        })
    }

    fn counting() -> Arc<Counting> {
        counting_as("m")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_text_is_embedded_once_per_model_across_calls_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(
            SqliteEmbeddingCache::open(dir.path(), 1 << 20)
                .await
                .unwrap(),
        );
        let inner = counting();
        let e = CachedEmbedder::new(inner.clone(), cache.clone());
        let first = e.embed(strings(&["a b", "c d", "a b"])).await.unwrap();
        let h = HashingEmbedder::new(8);
        assert_eq!(
            first,
            vec![h.embed_one("a b"), h.embed_one("c d"), h.embed_one("a b")]
        );
        let again = e.embed(strings(&["c d", "e f", "a b"])).await.unwrap();
        assert_eq!(again[1], h.embed_one("e f"));
        assert_eq!(
            *inner.texts.lock().unwrap(),
            strings(&["a b", "c d", "e f"])
        );
        // Another model of the same size shares nothing.
        let other = counting_as("other");
        CachedEmbedder::new(other.clone(), cache.clone())
            .embed(strings(&["a b"]))
            .await
            .unwrap();
        assert_eq!(other.texts.lock().unwrap().len(), 1);
        // And it survives the process: a new handle on the same file hits.
        drop(e);
        let reopened = Arc::new(
            SqliteEmbeddingCache::open(dir.path(), 1 << 20)
                .await
                .unwrap(),
        );
        let inner2 = counting();
        CachedEmbedder::new(inner2.clone(), reopened)
            .embed(strings(&["a b", "c d"]))
            .await
            .unwrap();
        assert!(inner2.texts.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn calls_in_flight_at_once_with_the_same_text_embed_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(
            SqliteEmbeddingCache::open(dir.path(), 1 << 20)
                .await
                .unwrap(),
        );
        let inner = counting();
        let e = Arc::new(CachedEmbedder::new(inner.clone(), cache));
        let (a, b) = tokio::join!(
            e.embed(strings(&["same", "only a"])),
            e.embed(strings(&["same", "only b"]))
        );
        let h = HashingEmbedder::new(8);
        assert_eq!(a.unwrap()[0], h.embed_one("same"));
        assert_eq!(b.unwrap()[0], h.embed_one("same"));
        let mut sent = inner.texts.lock().unwrap().clone();
        sent.sort();
        assert_eq!(sent, strings(&["only a", "only b", "same"]));
    }

    #[test]
    fn eviction_brings_the_size_down_to_nine_tenths_of_the_bound() {
        for (bytes, max, row, want) in [
            (900, 1000, 10, 0),
            (1000, 1000, 10, 0),
            (1001, 1000, 10, 11),
            (5000, 1000, 100, 41),
            (5000, 1000, 0, 0),
        ] {
            assert_eq!(rows_to_evict(bytes, max, row), want, "{bytes} of {max}");
        }
    }

    #[tokio::test]
    async fn past_its_bound_the_least_recently_used_vectors_go() {
        let dir = tempfile::tempdir().unwrap();
        // Room for about 10 rows of 8 floats (32 + 64 bytes each).
        let cache = SqliteEmbeddingCache::open(dir.path(), 960).await.unwrap();
        let v = [0.5f32; 8];
        for i in 0..30u8 {
            let mut k = [0u8; 16];
            k[0] = i;
            sqlx::query("UPDATE embeddings SET used = used - 1")
                .execute(&cache.pool)
                .await
                .unwrap();
            cache.put("m@8", &[(k, &v)]).await.unwrap();
        }
        assert!(cache.bytes().await.unwrap() <= 960);
        let keys: Vec<CacheKey> = (0..30u8)
            .map(|i| {
                let mut k = [0u8; 16];
                k[0] = i;
                k
            })
            .collect();
        let held = cache.get("m@8", &keys).await.unwrap();
        assert!(held.len() >= 5 && held.len() <= 10, "{}", held.len());
        // The newest are kept, the oldest gone.
        assert!(held.contains_key(&keys[29]) && !held.contains_key(&keys[0]));
    }

    #[tokio::test]
    async fn a_row_of_another_shape_is_a_miss_not_a_wrong_vector() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SqliteEmbeddingCache::open(dir.path(), 1 << 20)
            .await
            .unwrap();
        let k = cache_key("x");
        cache.put("m@8", &[(k, &[1.0f32; 4])]).await.unwrap();
        assert!(cache.get("m@8", &[k]).await.unwrap().is_empty());
    }
}
