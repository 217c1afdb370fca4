//! Store: the `VectorStore` trait (vectors and, beside them, the lexical index of the same points),
//! the embedded SQLite implementation with exact search and FTS5, and the Qdrant server one.

mod null;
mod qdrant;
mod sqlite;
pub mod vector_cache;
pub mod versions;

use async_trait::async_trait;
use serde::Serialize;
use uuid::Uuid;

pub use null::NullStore;
pub use qdrant::{
    collection_name as qdrant_collection_name, QdrantCluster, QdrantSettings, QdrantStore,
    DEFAULT_ALIAS,
};
pub use sqlite::SqliteStore;
pub use versions::LiveSqliteStore;

use crate::search::Fusion;
use crate::types::BuildScope;
use crate::types::EmbeddedChunk;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "vector store holds embeddings of model {stored_model} ({stored_dim} dims) but this build \
         uses {model} ({dim} dims); re-embed everything with `orbit-worker build --all-users --reembed`"
    )]
    ModelMismatch {
        stored_model: String,
        stored_dim: usize,
        model: String,
        dim: usize,
    },
    #[error("vector store: {0}")]
    Backend(String),
    /// Needs a human: a refused API key, a collection of another shape, a server that is not
    /// Qdrant. Never retried.
    #[error("vector store configuration: {0}")]
    Config(String),
    #[error("query vector has {got} dimensions, store has {want}")]
    Dimension { got: usize, want: usize },
}

impl crate::retry::Retryable for StoreError {
    fn is_retryable(&self) -> bool {
        // SQLite busy or a Qdrant connection hiccup; a model mismatch needs a human.
        matches!(self, StoreError::Backend(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The prefix every indexed term of `user_id` carries: a letter, the digits, `x`, so no user's
/// prefix is another's (`-5` is `n5x`, never `u5x`) and the ASCII tokenizer keeps it whole.
/// Per-user terms give each user document frequencies of their own memory in both stores.
pub(crate) fn term_prefix(user_id: i64) -> String {
    let sign = if user_id < 0 { 'n' } else { 'u' };
    format!("{sign}{}x", user_id.unsigned_abs())
}

/// A chunk's index terms (`Chunk::terms`), computed here if a producer left them empty.
pub(crate) fn chunk_terms<'a>(
    title: Option<&str>,
    text: &str,
    terms: &'a str,
) -> std::borrow::Cow<'a, str> {
    if terms.is_empty() && !text.is_empty() {
        std::borrow::Cow::Owned(crate::lexical::index_terms(title, text))
    } else {
        std::borrow::Cow::Borrowed(terms)
    }
}

/// One search result.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub id: Uuid,
    /// The ranking score of the search that returned it: cosine for dense, BM25 for lexical, the
    /// fused reciprocal-rank score for hybrid.
    pub score: f32,
    /// Cosine similarity, when the dense list had this hit.
    pub dense_score: Option<f32>,
    /// BM25 (higher is better), when the lexical list had this hit.
    pub lexical_score: Option<f32>,
    pub user_id: i64,
    pub kind: String,
    pub source_ids: Vec<String>,
    pub conversation_id: Option<String>,
    pub author: Option<String>,
    pub created_at: String,
    pub text: String,
}

/// Counts of what a build changed in the store.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StoreCounts {
    pub upserted: u64,
    pub deleted: u64,
}

/// Stored vectors by user, then content hash: looked up with the chunk's own `&str` hash.
pub type VectorsByHash =
    std::collections::HashMap<i64, std::collections::HashMap<String, Vec<f32>>>;

/// Identifies one build's writes, so points the build did not produce can be deleted after it.
pub type BuildGeneration = i64;

/// The generation after `last`: the wall clock in microseconds, bumped past `last` (kept by the
/// store) so generations strictly increase even when clocks are close or step back.
pub(crate) fn next_generation(last: BuildGeneration) -> BuildGeneration {
    chrono::Utc::now().timestamp_micros().max(last + 1)
}

#[async_trait]
pub trait VectorStore: Send + Sync {
    /// Records the model and dimension on first use; a different one is `ModelMismatch`.
    async fn ensure_model(&self, model: &str, dim: usize) -> Result<(), StoreError>;
    /// The recorded (model, dimension), if any build has run.
    async fn model(&self) -> Result<Option<(String, usize)>, StoreError>;
    /// Forgets every vector and the recorded model, for a full re-embed with another model.
    async fn reset(&self) -> Result<(), StoreError>;
    async fn begin_build(&self) -> Result<BuildGeneration, StoreError>;
    /// Inserts or replaces points by their deterministic id, in one transaction.
    async fn upsert(
        &self,
        gen: BuildGeneration,
        points: &[EmbeddedChunk],
    ) -> Result<(), StoreError>;
    /// Deletes points in `scope` of builds older than `gen` (those it did not rewrite); returns
    /// how many. A newer build's points are never touched.
    async fn finish_build(
        &self,
        gen: BuildGeneration,
        scope: &BuildScope,
    ) -> Result<u64, StoreError>;
    /// Nearest chunks of `user_id` only; other users' points are never read.
    async fn search_dense(
        &self,
        user_id: i64,
        query: &[f32],
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError>;
    /// Best BM25 matches of the question's terms (`lexical::query_terms`) among `user_id`'s
    /// chunks only: the user is filtered before anything is scored.
    async fn search_lexical(
        &self,
        user_id: i64,
        question: &str,
        top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError>;
    /// Both lists `fusion.depth` deep, fused (`search::fuse`). A store that fuses on its server
    /// overrides this with one call.
    async fn search_hybrid(
        &self,
        user_id: i64,
        query: &[f32],
        question: &str,
        top_k: usize,
        fusion: &Fusion,
    ) -> Result<Vec<SearchHit>, StoreError> {
        let depth = fusion.depth.max(top_k);
        let (dense, lexical) = futures::try_join!(
            self.search_dense(user_id, query, depth),
            self.search_lexical(user_id, question, depth)
        )?;
        Ok(crate::search::fuse(dense, lexical, fusion, top_k))
    }
    /// Vectors already stored for these (user, content hash) pairs: a chunk whose text has not
    /// changed keeps its vector instead of being embedded again. Missing pairs are absent.
    async fn vectors_by_hash(&self, keys: &[(i64, &str)]) -> Result<VectorsByHash, StoreError>;
    async fn count(&self, user_id: i64) -> Result<u64, StoreError>;
    async fn point_ids(&self, user_id: i64) -> Result<Vec<Uuid>, StoreError>;
}
