//! Builds the configured embedder and vector store.

use std::sync::Arc;

use anyhow::{Context, Result};
use orbit_pipeline::embed::{
    CachedEmbedder, EmbedLimits, Embedder, EmbeddingCache, HashingEmbedder, LocalEmbedder,
    OpenAiEmbedder, OpenAiSettings, PgEmbeddingCache, SqliteEmbeddingCache, WithLimits,
    API_MAX_INPUTS, API_MAX_REQUEST_TOKENS,
};
use orbit_pipeline::store::{LiveSqliteStore, VectorStore};

use crate::config::{EmbedderKind, PipelineConfig};

/// `http`: the process's shared client (its connection pool); each request sets its own timeout.
/// `max_inline_wait`: the HTTP call layer's budget (`ORBIT_HTTP_MAX_INLINE_WAIT`).
pub fn embedder(
    s: &PipelineConfig,
    http: reqwest::Client,
    max_inline_wait: std::time::Duration,
) -> Result<Arc<dyn Embedder>> {
    let base: Arc<dyn Embedder> = match s.resolved_embedder() {
        EmbedderKind::OpenAi => {
            let mut cfg =
                OpenAiSettings::new(&s.openai_base_url, s.openai_api_key.clone(), &s.embed_model);
            cfg.policy.max_inline_wait = max_inline_wait;
            cfg.timeout = s.embed_timeout;
            if let Some(d) = s.embed_dimensions {
                cfg.dimension = d;
                cfg.request_dimensions = Some(d);
            }
            // Where the rate budget starts, and (below) the most the stage sends at once;
            // unset, the budget starts at 4 and grows as the key's limits allow.
            if let Some(n) = s.embed_in_flight {
                cfg.limits.max_in_flight = n.max(1);
            }
            Arc::new(OpenAiEmbedder::new(cfg, http)?)
        }
        EmbedderKind::Hashing => Arc::new(HashingEmbedder::new(s.hashing_dim)),
        EmbedderKind::Local | EmbedderKind::Auto => Arc::new(
            LocalEmbedder::load(&s.model_dir)
                .with_context(|| format!("loading local model from {}", s.model_dir.display()))?,
        ),
    };
    let l = base.limits();
    let mut limits = EmbedLimits {
        max_inputs: s.embed_batch_inputs.unwrap_or(l.max_inputs).max(1),
        max_batch_tokens: s.embed_batch_tokens.unwrap_or(l.max_batch_tokens).max(1),
        max_in_flight: s.embed_in_flight.unwrap_or(l.max_in_flight).max(1),
    };
    if s.resolved_embedder() == EmbedderKind::OpenAi {
        // Larger batches than the API takes are split, never sent.
        limits.max_inputs = limits.max_inputs.min(API_MAX_INPUTS);
        limits.max_batch_tokens = limits.max_batch_tokens.min(API_MAX_REQUEST_TOKENS);
    }
    Ok(Arc::new(WithLimits::new(base, limits)))
}

/// The embedding cache: a table of the app's Postgres when the worker has one (every worker on
/// every machine shares it), else SQLite in ORBIT_DATA_DIR. None when turned off (a bound of 0),
/// for the hashing embedder (cheaper to run than to look up), or when it cannot be opened (it
/// saves money, it never stops a build: logged).
pub async fn embedding_cache(
    s: &PipelineConfig,
    pg: Option<&sqlx::PgPool>,
) -> Option<Arc<dyn EmbeddingCache>> {
    if s.embed_cache_bytes == 0 || s.resolved_embedder() == EmbedderKind::Hashing {
        return None;
    }
    let cache: Result<Arc<dyn EmbeddingCache>, _> = match pg {
        Some(pool) => PgEmbeddingCache::open(pool.clone(), s.embed_cache_bytes)
            .await
            .map(|c| Arc::new(c) as Arc<dyn EmbeddingCache>),
        None => SqliteEmbeddingCache::open(&s.data_dir, s.embed_cache_bytes)
            .await
            .map(|c| Arc::new(c) as Arc<dyn EmbeddingCache>),
    };
    match cache {
        Ok(c) => {
            tracing::info!(cache = %c.describe(), bound_mb = s.embed_cache_bytes >> 20, "embedding cache");
            Some(c)
        }
        Err(err) => {
            tracing::warn!(error = %err, "embedding cache unavailable; embedding without it");
            None
        }
    }
}

/// `e` behind the embedding cache, when there is one.
pub async fn cached(
    s: &PipelineConfig,
    pg: Option<&sqlx::PgPool>,
    e: Arc<dyn Embedder>,
) -> Arc<dyn Embedder> {
    match embedding_cache(s, pg).await {
        Some(c) => Arc::new(CachedEmbedder::new(e, c)),
        None => e,
    }
}

/// The Qdrant server when QDRANT_URL is set, else the embedded store in ORBIT_DATA_DIR.
pub async fn store(s: &PipelineConfig) -> Result<Arc<dyn VectorStore>> {
    if let Some(q) = &s.qdrant {
        let store = orbit_pipeline::store::QdrantStore::connect(q.clone())
            .await
            .with_context(|| format!("connecting to the Qdrant server at {}", q.url))?;
        return Ok(Arc::new(store));
    }
    Ok(Arc::new(
        LiveSqliteStore::open(&s.data_dir, s.lexical_index)
            .await
            .with_context(|| format!("opening vector store in {}", s.data_dir.display()))?,
    ))
}
