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

/// The API's per-request limits (OpenAI's reference): more inputs or tokens in one request is a
/// 400, so no configured batch may exceed them.
pub const API_MAX_INPUTS: usize = 2048;
pub const API_MAX_REQUEST_TOKENS: usize = 300_000;

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
    /// Sent as `dimensions` (the text-embedding-3 models shorten their vectors to it); None: the
    /// model's own size.
    pub request_dimensions: Option<usize>,
    pub limits: EmbedLimits,
    /// Whether the number in flight grows from `limits.max_in_flight` while latency, not the
    /// rate limit, holds throughput back (up to `MAX_ADAPTIVE_IN_FLIGHT`); off, exactly that
    /// many go at once (the benchmark's one-at-a-time baseline).
    pub adaptive: bool,
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
            request_dimensions: None,
            // OpenAI allows 2048 inputs and 300k tokens per request; staying well under keeps a
            // 429 cheap to retry and several requests in flight within a tier's TPM.
            limits: EmbedLimits {
                max_inputs: 256,
                max_batch_tokens: 64_000,
                max_in_flight: 4,
            },
            adaptive: true,
            timeout: Duration::from_secs(60),
            policy: CallPolicy::short(EMBED_MAX_INLINE_WAIT),
        }
    }
}

impl OpenAiSettings {
    /// The most requests in flight at any time.
    fn max_in_flight(&self) -> usize {
        if self.adaptive {
            MAX_ADAPTIVE_IN_FLIGHT.max(self.limits.max_in_flight)
        } else {
            self.limits.max_in_flight.max(1)
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
            settings.max_in_flight(),
        ));
        Ok(Self {
            settings,
            client,
            url,
            budget,
        })
    }

    /// The request: base64 vectors (as OpenAI's own clients ask; a quarter of the bytes of
    /// JSON floats) and `dimensions` when set.
    fn request_body(&self, texts: &[String]) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": self.settings.model, "input": texts, "encoding_format": "base64"
        });
        if let Some(d) = self.settings.request_dimensions {
            body["dimensions"] = d.into();
        }
        body
    }

    /// One request, when the budget has room for its `tokens`; what the answer's headers say
    /// goes back into the budget.
    async fn attempt(&self, texts: &[String], tokens: usize) -> Result<Vec<Vec<f32>>, CallError> {
        let slot = self.budget.acquire(tokens).await;
        let req = self
            .client
            .post(&self.url)
            .timeout(self.settings.timeout)
            .json(&self.request_body(texts));
        let sent = send_observed(req, self.settings.api_key.as_ref(), |status, h| {
            slot.observe(
                status != 429,
                &RateHeaders::read(|k| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)),
            )
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
/// input, every index once, or why not. Each vector may come as JSON floats or as base64 of
/// little-endian f32 (`encoding_format: base64`); a server may answer either.
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
        let v = match d.embedding {
            Embedding::Floats(v) => v,
            Embedding::Base64(s) => base64_floats(&s, dimension)?,
        };
        if v.len() != dimension {
            return Err(format!(
                "vector of {} dimensions, expected {dimension}",
                v.len(),
            ));
        }
        if slot.is_some() {
            return Err("duplicate index in response".to_string());
        }
        *slot = Some(v);
    }
    out.into_iter()
        .map(|v| v.ok_or_else(|| "an index is missing from the response".to_string()))
        .collect()
}

/// Untrusted base64 of little-endian f32: the size is checked before anything is decoded (a
/// vector is at most `dimension` floats), bad characters and a length that is not whole floats
/// are errors, never a panic.
fn base64_floats(s: &str, dimension: usize) -> Result<Vec<f32>, String> {
    use base64::Engine;
    // 4 bytes a float, 4 base64 characters per 3 bytes, rounded up.
    let max_chars = (dimension * 4).div_ceil(3) * 4;
    if s.len() > max_chars {
        return Err(format!(
            "base64 vector of {} characters, more than {dimension} floats",
            s.len()
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("base64 vector: {e}"))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "base64 vector of {} bytes, not whole floats",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingData>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    index: usize,
    embedding: Embedding,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Embedding {
    Floats(Vec<f32>),
    Base64(String),
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
            max_in_flight: self.settings.max_in_flight(),
            ..self.settings.limits
        }
    }
    fn rate_limit(&self) -> Option<(f64, f64)> {
        self.budget.limits()
    }

    /// A question or any text not yet counted: what the API counts against the key's TPM is
    /// the inputs' tokens (the text-embedding-3 models read cl100k_base).
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let tokens: usize = texts.iter().map(|t| Encoding::Cl100kBase.count(t)).sum();
        self.embed_counted(texts, tokens).await
    }

    /// Chunks, counted when they were made: nothing is tokenized again here. The budget's
    /// estimate is corrected by every answer's remaining count anyway.
    async fn embed_counted(
        &self,
        texts: Vec<String>,
        tokens: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        call_with_retry(&self.settings.policy, "embedding request", || {
            self.attempt(&texts, tokens)
        })
        .await
        .map_err(EmbedError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(v: &[f32]) -> String {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn base64_and_float_vectors_decode_alike_in_input_order() {
        let (a, b) = ([0.5f32, -0.25, 1.0], [0.125f32, 2.0, -3.5]);
        let body = serde_json::json!({"data": [
            {"index": 1, "embedding": b64(&b)},
            {"index": 0, "embedding": a},
        ]});
        let v = decode_embeddings(body.to_string().as_bytes(), 2, 3).unwrap();
        assert_eq!(v, vec![a.to_vec(), b.to_vec()]);
    }

    /// Table: untrusted base64 vectors of a 3-dimension model -> an error naming the fault.
    #[test]
    fn bad_base64_vectors_are_errors() {
        for (embedding, says) in [
            ("!!!!", "base64"),
            ("AAAA", "not whole floats"),
            (&*b64(&[1.0, 2.0]), "2 dimensions"),
            (&*b64(&[1.0; 40]), "more than 3 floats"),
            ("", "0 dimensions"),
        ] {
            let body = serde_json::json!({"data": [{"index": 0, "embedding": embedding}]});
            let e = decode_embeddings(body.to_string().as_bytes(), 1, 3).unwrap_err();
            assert!(e.contains(says), "{embedding:?}: {e}");
        }
        let dup = serde_json::json!({"data": [
            {"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]});
        let e = decode_embeddings(dup.to_string().as_bytes(), 2, 1).unwrap_err();
        assert!(e.contains("duplicate"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn no_base64_string_panics(s in "\\PC{0,64}", dim in 1usize..16) {
            let _ = base64_floats(&s, dim);
        }
    }
}
