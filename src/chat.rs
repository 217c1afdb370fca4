//! OpenAI-compatible `/v1/chat/completions`, with the call-level retry layer (429, 5xx and
//! connection errors, honouring `retry-after` and `x-ratelimit-reset-*`). The task layer only
//! sees what is left after it: a retryable error with the server's hint, or a permanent one.

use std::time::Duration;

use orbit_pipeline::embed::{api_error, retry_after, without_url};
use orbit_pipeline::secret::Secret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Attempts per call, the first included: three covers a blip without holding a task for minutes.
const MAX_ATTEMPTS: u32 = 3;
/// A single wait inside one call; a longer hint goes to the task layer instead.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat model HTTP {status}: {message}")]
    Http {
        status: u16,
        message: String,
        retryable: bool,
        retry_after: Option<Duration>,
    },
    #[error("chat model unreachable: {0}")]
    Connect(String),
    #[error("chat model answer malformed: {0}")]
    Decode(String),
    /// 401/403 or `insufficient_quota`: a human must fix the key or the billing.
    #[error("chat model configuration: {0}")]
    Config(String),
    /// Retried inside the call until its attempts ran out: the task layer must not retry it
    /// again (one failure, one retry layer).
    #[error("{0}")]
    GaveUp(String),
}

impl ChatError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ChatError::Http { retryable, .. } => *retryable,
            ChatError::Connect(_) => true,
            ChatError::Decode(_) | ChatError::Config(_) | ChatError::GaveUp(_) => false,
        }
    }
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ChatError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: i64,
    #[serde(default)]
    pub completion_tokens: i64,
    #[serde(default)]
    pub total_tokens: i64,
}

/// The first choice of a completion.
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: Option<String>,
    pub refusal: Option<String>,
    pub finish_reason: String,
    /// The model that answered (a snapshot name, e.g. `gpt-4o-2024-08-06`).
    pub model: String,
    pub usage: Usage,
}

#[derive(Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    url: String,
    key: Secret,
    pub model: String,
    timeout: Duration,
}

impl ChatClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        key: Secret,
        model: &str,
        timeout: Duration,
    ) -> Self {
        Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            key,
            model: model.to_string(),
            timeout,
        }
    }

    /// One completion; `extra` is merged into the request (e.g. `response_format`).
    pub async fn complete(
        &self,
        messages: &[Message],
        max_tokens: u32,
        extra: Value,
    ) -> Result<Completion, ChatError> {
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": messages,
            "temperature": 0.2,
            "max_tokens": max_tokens,
        });
        if let (Some(b), Value::Object(x)) = (body.as_object_mut(), extra) {
            b.extend(x);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(&body).await {
                Ok(c) => return Ok(c),
                Err(e) if e.is_retryable() => {
                    let backoff = Duration::from_millis(500 << attempt.min(6));
                    let wait = e.retry_after().unwrap_or(backoff);
                    // A long wait is the task layer's to schedule (re-published with an ETA);
                    // short ones are retried here, and once they run out, nowhere else.
                    if wait > MAX_INLINE_WAIT {
                        return Err(e);
                    }
                    if attempt >= MAX_ATTEMPTS {
                        return Err(ChatError::GaveUp(format!("{e} (after {attempt} attempts)")));
                    }
                    tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %e, "chat request retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn attempt(&self, body: &Value) -> Result<Completion, ChatError> {
        let mut req = self.http.post(&self.url).timeout(self.timeout).json(body);
        if !self.key.is_empty() {
            req = req.bearer_auth(self.key.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ChatError::Connect(without_url(&e)))?;
        let status = resp.status().as_u16();
        let hint = retry_after(resp.headers());
        let text = resp
            .text()
            .await
            .map_err(|e| ChatError::Connect(without_url(&e)))?;
        if !(200..300).contains(&status) {
            return Err(classify(status, &text, hint));
        }
        parse(&text)
    }
}

pub fn classify(status: u16, body: &str, retry_after: Option<Duration>) -> ChatError {
    let (message, code) = api_error(body);
    if status == 401 || status == 403 || code == "insufficient_quota" {
        return ChatError::Config(format!("HTTP {status} {code}: {message}"));
    }
    ChatError::Http {
        status,
        message,
        retryable: status == 429 || status == 408 || status >= 500,
        retry_after,
    }
}

fn parse(text: &str) -> Result<Completion, ChatError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| ChatError::Decode(format!("not JSON: {e}")))?;
    let choice = v["choices"]
        .get(0)
        .ok_or_else(|| ChatError::Decode("no choices".into()))?;
    let msg = &choice["message"];
    let usage = serde_json::from_value(v["usage"].clone()).unwrap_or_default();
    Ok(Completion {
        content: msg["content"].as_str().map(str::to_string),
        refusal: msg["refusal"].as_str().map(str::to_string),
        finish_reason: choice["finish_reason"].as_str().unwrap_or("").to_string(),
        model: v["model"].as_str().unwrap_or("").to_string(),
        usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_classifies() {
        let c = parse(r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"hi [1]","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13}}"#).unwrap();
        assert_eq!(c.content.as_deref(), Some("hi [1]"));
        assert_eq!(c.usage.total_tokens, 13);
        assert!(parse("{\"choices\": []}").is_err());
        assert!(parse("<html>").is_err());
        assert!(matches!(classify(401, "{}", None), ChatError::Config(_)));
        assert!(classify(429, "{}", None).is_retryable());
        assert!(!classify(400, "{}", None).is_retryable());
        assert!(matches!(
            classify(
                429,
                r#"{"error":{"code":"insufficient_quota","message":"q"}}"#,
                None
            ),
            ChatError::Config(_)
        ));
    }
}
