//! OpenAI-compatible `/v1/embeddings` over reqwest. Retries go through the shared call layer
//! (`http_call`): short inline retries, then "gave up", or the task layer when the server asks
//! for a longer wait.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::budget::{Budget, RateHeaders};
use super::{EmbedError, EmbedLimits, Embedder};
use crate::http_call::{call_with_retry, send_observed, CallError, CallPolicy};
use crate::secret::Secret;
use crate::tokenize::Encoding;

/// The most requests the rate budget lets grow in flight from the configured start: past a
/// few dozen, a high-latency tier is limited by its TPM, not by concurrency.
pub const MAX_ADAPTIVE_IN_FLIGHT: usize = 32;

/// The longest wait slept inside one call (`ORBIT_HTTP_MAX_INLINE_WAIT` in the worker): a task has
/// 270 s, and a longer hint is better spent re-published with an ETA than holding a slot.
pub const EMBED_MAX_INLINE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// Up to and including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// None for a local server that takes no key.
    pub api_key: Option<Secret>,
    pub model: String,
    pub dimension: usize,
    pub limits: EmbedLimits,
    pub timeout: Duration,
    /// The inline retry layer of each request.
    pub policy: CallPolicy,
}

impl OpenAiSettings {
    pub fn new(
        base_url: impl Into<String>,
        api_key: Option<Secret>,
        model: impl Into<String>,
    ) -> Self {
        let model = model.into();
        let dimension = match model.as_str() {
            "text-embedding-3-large" => 3072,
            _ => 1536,
        };
        Self {
            base_url: base_url.into(),
            api_key,
            model,
            dimension,
            // OpenAI allows 2048 inputs and 300k tokens per request; staying well under keeps a
            // 429 cheap to retry and several requests in flight within a tier's TPM.
            limits: EmbedLimits {
                max_inputs: 256,
                max_batch_tokens: 64_000,
                max_in_flight: 4,
            },
            timeout: Duration::from_secs(60),
            policy: CallPolicy::short(EMBED_MAX_INLINE_WAIT),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    settings: OpenAiSettings,
    client: reqwest::Client,
    url: String,
    /// The key's rate limit as the answers' headers tell it, shared by every request of this
    /// embedder (the stage's concurrent batches, every build of the process).
    budget: Arc<Budget>,
}

impl OpenAiEmbedder {
    pub fn new(settings: OpenAiSettings, client: reqwest::Client) -> Result<Self, EmbedError> {
        if !settings.base_url.starts_with("http://") && !settings.base_url.starts_with("https://") {
            return Err(EmbedError::Config(format!(
                "base URL {:?} is not http(s)",
                settings.base_url
            )));
        }
        let url = format!("{}/embeddings", settings.base_url.trim_end_matches('/'));
        let budget = Arc::new(Budget::new(
            settings.limits.max_in_flight,
            MAX_ADAPTIVE_IN_FLIGHT.max(settings.limits.max_in_flight),
        ));
        Ok(Self {
            settings,
            client,
            url,
            budget,
        })
    }

    /// Requests the budget lets go at once now (it starts at the configured `max_in_flight`).
    pub fn in_flight_allowed(&self) -> usize {
        self.budget.allowed()
    }

    /// One request, when the budget has room for its `tokens`; what the answer's headers say
    /// goes back into the budget.
    async fn attempt(&self, texts: &[String], tokens: usize) -> Result<Vec<Vec<f32>>, CallError> {
        let slot = self.budget.acquire(tokens).await;
        let req = self
            .client
            .post(&self.url)
            .timeout(self.settings.timeout)
            .json(&serde_json::json!({"model": self.settings.model, "input": texts, "encoding_format": "float"}));
        let budget = &self.budget;
        let sent = send_observed(req, self.settings.api_key.as_ref(), |h| {
            budget.observe(&RateHeaders::read(|k| {
                h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
            }))
        })
        .await;
        let body = match sent {
            Ok(b) => {
                slot.done();
                b
            }
            Err(e) => {
                if let CallError::Status {
                    status: 429,
                    retry_after,
                    ..
                } = &e
                {
                    slot.refused(*retry_after);
                }
                return Err(e);
            }
        };
        self.decode(texts.len(), body.as_bytes())
            .map_err(CallError::Decode)
    }

    fn decode(&self, inputs: usize, body: &[u8]) -> Result<Vec<Vec<f32>>, String> {
        decode_embeddings(body, inputs, self.settings.dimension)
    }
}

/// The vectors of a 200 answer to `/v1/embeddings`, in input order, each of `dimension`: one per
/// input, every index once, or why not.
pub fn decode_embeddings(
    body: &[u8],
    inputs: usize,
    dimension: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let parsed: EmbeddingResponse = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if parsed.data.len() != inputs {
        return Err(format!("{} vectors for {inputs} inputs", parsed.data.len()));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; inputs];
    for d in parsed.data {
        let slot = out
            .get_mut(d.index)
            .ok_or_else(|| format!("index {} out of range", d.index))?;
        if d.embedding.len() != dimension {
            return Err(format!(
                "vector of {} dimensions, expected {dimension}",
                d.embedding.len(),
            ));
        }
        *slot = Some(d.embedding);
    }
    out.into_iter()
        .map(|v| v.ok_or_else(|| "duplicate index in response".to_string()))
        .collect()
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingData>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    index: usize,
    embedding: Vec<f32>,
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn model_id(&self) -> &str {
        &self.settings.model
    }
    fn dimension(&self) -> usize {
        self.settings.dimension
    }
    /// The configured limits, but as many requests in flight as the rate budget may grow to:
    /// the budget, not the stage, decides how many go at once (from the configured number).
    fn limits(&self) -> EmbedLimits {
        EmbedLimits {
            max_in_flight: MAX_ADAPTIVE_IN_FLIGHT.max(self.settings.limits.max_in_flight),
            ..self.settings.limits
        }
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        // What the API counts against the key's TPM: the inputs' tokens (the text-embedding-3
        // models read cl100k_base).
        let tokens: usize = texts.iter().map(|t| Encoding::Cl100kBase.count(t)).sum();
        call_with_retry(&self.settings.policy, "embedding request", || {
            self.attempt(&texts, tokens)
        })
        .await
        .map_err(EmbedError::from)
    }
}
