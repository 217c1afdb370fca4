//! Embed: the `Embedder` trait, request batching by token budget and count, and the
//! implementations (OpenAI-compatible HTTP, a local MiniLM on candle, a deterministic hasher).

pub mod budget;
pub mod cache;
mod hashing;
mod local;
mod openai;

use async_trait::async_trait;
use serde::Serialize;

pub use cache::{CachedEmbedder, EmbeddingCache, PgEmbeddingCache, SqliteEmbeddingCache};
pub use hashing::HashingEmbedder;
pub use local::{LocalEmbedder, LOCAL_MODEL_FILES};
pub use openai::{
    decode_embeddings, OpenAiEmbedder, OpenAiSettings, API_MAX_INPUTS, API_MAX_REQUEST_TOKENS,
    EMBED_MAX_INLINE_WAIT, MAX_ADAPTIVE_IN_FLIGHT,
};

use crate::http_call::CallError;
use crate::retry::Retryable;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The HTTP call failed after the call layer's own retries (or without any).
    #[error("embedding request failed: {0}")]
    Call(CallError),
    #[error("embedding response malformed: {0}")]
    Decode(String),
    /// A rejected key or a spent quota (401/403, `insufficient_quota`): a human must act.
    #[error("embedding configuration: {0}")]
    Config(String),
    #[error("local model: {0}")]
    Model(String),
}

impl From<CallError> for EmbedError {
    fn from(e: CallError) -> Self {
        match e {
            e if e.is_config() => EmbedError::Config(e.to_string()),
            CallError::Decode(m) => EmbedError::Decode(m),
            e => EmbedError::Call(e),
        }
    }
}

impl Retryable for EmbedError {
    fn is_retryable(&self) -> bool {
        match self {
            EmbedError::Call(e) => e.is_retryable(),
            EmbedError::Decode(_) | EmbedError::Config(_) | EmbedError::Model(_) => false,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            EmbedError::Call(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// How an embedder wants to be fed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EmbedLimits {
    /// Inputs per request.
    pub max_inputs: usize,
    /// Sum of input tokens per request.
    pub max_batch_tokens: usize,
    /// Requests kept in flight at once.
    pub max_in_flight: usize,
}

#[async_trait]
pub trait Embedder: Send + Sync {
    /// Stored with the vectors: a store built by one model refuses another's vectors.
    fn model_id(&self) -> &str;
    fn dimension(&self) -> usize;
    fn limits(&self) -> EmbedLimits;
    /// The provider's limits on this key as last heard (tokens, requests a minute), if any.
    fn rate_limit(&self) -> Option<(f64, f64)> {
        None
    }
    /// Chunk size this model reads whole, when smaller than the pipeline default.
    fn preferred_chunk_tokens(&self) -> Option<usize> {
        None
    }
    /// One vector per text, in input order, L2-normalised.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// `embed` for texts whose token count the caller already has (the chunks counted theirs):
    /// an embedder that meters tokens uses it instead of counting again.
    async fn embed_counted(
        &self,
        texts: Vec<String>,
        _tokens: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed(texts).await
    }
}

/// Groups items into requests under both the count and the token budget of `EmbedLimits`.
#[derive(Debug)]
pub struct RequestBatcher<T> {
    limits: EmbedLimits,
    items: Vec<T>,
    tokens: usize,
}

impl<T> RequestBatcher<T> {
    pub fn new(limits: EmbedLimits) -> Self {
        Self {
            limits,
            items: Vec::new(),
            tokens: 0,
        }
    }

    /// Adds an item; returns a full request when this item does not fit in the open one.
    pub fn push(&mut self, item: T, tokens: usize) -> Option<Vec<T>> {
        let full = !self.items.is_empty()
            && (self.items.len() >= self.limits.max_inputs
                || self.tokens + tokens > self.limits.max_batch_tokens);
        let out = if full { self.take() } else { None };
        self.items.push(item);
        self.tokens += tokens;
        out
    }

    pub fn take(&mut self) -> Option<Vec<T>> {
        self.tokens = 0;
        if self.items.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.items))
        }
    }
}

pub(crate) fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// An embedder with request limits set by configuration instead of its own defaults.
pub struct WithLimits {
    inner: std::sync::Arc<dyn Embedder>,
    limits: EmbedLimits,
}

impl WithLimits {
    pub fn new(inner: std::sync::Arc<dyn Embedder>, limits: EmbedLimits) -> Self {
        Self { inner, limits }
    }
}

#[async_trait]
impl Embedder for WithLimits {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn limits(&self) -> EmbedLimits {
        self.limits
    }
    fn rate_limit(&self) -> Option<(f64, f64)> {
        self.inner.rate_limit()
    }
    fn preferred_chunk_tokens(&self) -> Option<usize> {
        self.inner.preferred_chunk_tokens()
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.inner.embed(texts).await
    }
    async fn embed_counted(
        &self,
        texts: Vec<String>,
        tokens: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.inner.embed_counted(texts, tokens).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batcher_respects_count_and_tokens() {
        let mut b = RequestBatcher::new(EmbedLimits {
            max_inputs: 3,
            max_batch_tokens: 100,
            max_in_flight: 1,
        });
        assert!(b.push(1, 40).is_none());
        assert!(b.push(2, 40).is_none());
        assert_eq!(b.push(3, 40), Some(vec![1, 2]));
        assert!(b.push(4, 10).is_none());
        assert!(b.push(5, 10).is_none());
        assert_eq!(b.push(6, 10), Some(vec![3, 4, 5]));
        // An item over the budget alone still goes, alone.
        assert_eq!(b.push(7, 500), Some(vec![6]));
        assert_eq!(b.take(), Some(vec![7]));
        assert_eq!(b.take(), None);
    }
}
