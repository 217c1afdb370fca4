//! OpenAI-compatible `/v1/embeddings` over reqwest, with the call-level retry layer: 429, 5xx and
//! connection errors are retried here, honouring `retry-after` and `x-ratelimit-reset-*`.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{EmbedError, EmbedLimits, Embedder};
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// Up to and including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: Secret,
    pub model: String,
    pub dimension: usize,
    pub limits: EmbedLimits,
    pub timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Cap on a single wait, whatever the server asks.
    pub max_backoff: Duration,
}

impl OpenAiSettings {
    pub fn new(base_url: impl Into<String>, api_key: Secret, model: impl Into<String>) -> Self {
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
            max_attempts: 5,
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    settings: OpenAiSettings,
    client: reqwest::Client,
    url: String,
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
        Ok(Self {
            settings,
            client,
            url,
        })
    }

    async fn attempt(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut req = self
            .client
            .post(&self.url)
            .timeout(self.settings.timeout)
            .json(&serde_json::json!({"model": self.settings.model, "input": texts, "encoding_format": "float"}));
        if !self.settings.api_key.is_empty() {
            req = req.bearer_auth(self.settings.api_key.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| EmbedError::Connect(without_url(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = retry_after(resp.headers());
            let body = resp.text().await.unwrap_or_default();
            return Err(classify(status.as_u16(), &body, retry_after));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| EmbedError::Connect(without_url(&e)))?;
        let parsed: EmbeddingResponse =
            serde_json::from_slice(&body).map_err(|e| EmbedError::Decode(e.to_string()))?;
        if parsed.data.len() != texts.len() {
            return Err(EmbedError::Decode(format!(
                "{} vectors for {} inputs",
                parsed.data.len(),
                texts.len()
            )));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        for d in parsed.data {
            let slot = out
                .get_mut(d.index)
                .ok_or_else(|| EmbedError::Decode(format!("index {} out of range", d.index)))?;
            if d.embedding.len() != self.settings.dimension {
                return Err(EmbedError::Decode(format!(
                    "vector of {} dimensions, expected {}",
                    d.embedding.len(),
                    self.settings.dimension
                )));
            }
            *slot = Some(d.embedding);
        }
        out.into_iter()
            .map(|v| v.ok_or_else(|| EmbedError::Decode("duplicate index in response".into())))
            .collect()
    }
}

/// reqwest errors print the URL; strip it in case a key was put in a query string.
pub fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    if e.is_timeout() {
        s = format!("timed out: {s}");
    }
    s
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

/// An OpenAI error body's message (cut to a log line) and code (or type).
pub fn api_error(body: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or(body)
        .chars()
        .take(300)
        .collect::<String>();
    let code = v["error"]["code"]
        .as_str()
        .or_else(|| v["error"]["type"].as_str())
        .unwrap_or("")
        .to_string();
    (message, code)
}

fn classify(status: u16, body: &str, retry_after: Option<Duration>) -> EmbedError {
    let (message, code) = api_error(body);
    let code = code.as_str();
    if status == 401 || status == 403 || code == "insufficient_quota" {
        return EmbedError::Config(format!("HTTP {status} {code}: {message}"));
    }
    let retryable = status == 429 || status == 408 || status >= 500;
    EmbedError::Http {
        status,
        message,
        retryable,
        retry_after,
    }
}

/// `retry-after` (seconds or ms variant), else the larger `x-ratelimit-reset-*` (`1s`, `6m0s`, `20ms`).
pub fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    if let Some(s) = get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(s.max(0.0)));
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|k| get(k).and_then(parse_go_duration))
        .max()
}

fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += n * unit;
        any = true;
    }
    if !num.is_empty() {
        total += num.parse::<f64>().ok()?;
        any = true;
    }
    any.then(|| Duration::from_secs_f64(total))
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn model_id(&self) -> &str {
        &self.settings.model
    }
    fn dimension(&self) -> usize {
        self.settings.dimension
    }
    fn limits(&self) -> EmbedLimits {
        self.settings.limits
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(&texts).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < self.settings.max_attempts => {
                    let backoff = Duration::from_millis(250 * (1 << attempt.min(8)));
                    let jitter = Duration::from_millis(fastrand_ms(250));
                    let wait = e
                        .retry_after()
                        .unwrap_or(backoff + jitter)
                        .min(self.settings.max_backoff);
                    tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %e, "embedding request retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Jitter without a RNG dependency: the clock's nanoseconds are random enough to de-synchronise.
fn fastrand_ms(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    n as u64 % max.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reset_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("soon"), None);
    }

    #[test]
    fn classifies_errors() {
        assert!(classify(
            429,
            r#"{"error":{"message":"slow down","type":"requests"}}"#,
            None
        )
        .is_retryable());
        assert!(!classify(
            429,
            r#"{"error":{"message":"quota","code":"insufficient_quota"}}"#,
            None
        )
        .is_retryable());
        assert!(matches!(classify(401, "{}", None), EmbedError::Config(_)));
        assert!(classify(503, "oops", None).is_retryable());
        assert!(!classify(400, "bad", None).is_retryable());
    }
}
