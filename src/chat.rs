//! OpenAI-compatible `/v1/chat/completions`. Retries go through the shared call layer
//! (`orbit_pipeline::http_call`): a blip is retried inline; when the attempts run out the error
//! says "gave up" and no task retries it again; a longer wait the server asks for goes to the
//! task layer, which re-publishes the task with that ETA.

use std::time::Duration;

use orbit_pipeline::http_call::{call_with_retry, send, CallError, CallPolicy};
use orbit_pipeline::secret::Secret;
use orbit_pipeline::Retryable;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat model {0}")]
    Call(CallError),
    #[error("chat model answer malformed: {0}")]
    Decode(String),
    /// 401/403 or `insufficient_quota`: a human must fix the key or the billing.
    #[error("chat model configuration: {0}")]
    Config(String),
}

impl From<CallError> for ChatError {
    fn from(e: CallError) -> Self {
        match e {
            e if e.is_config() => ChatError::Config(e.to_string()),
            CallError::Decode(m) => ChatError::Decode(m),
            e => ChatError::Call(e),
        }
    }
}

impl Retryable for ChatError {
    fn is_retryable(&self) -> bool {
        matches!(self, ChatError::Call(e) if e.is_retryable())
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ChatError::Call(e) => e.retry_after(),
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
    key: Option<Secret>,
    pub model: String,
    timeout: Duration,
    policy: CallPolicy,
}

impl ChatClient {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        key: Option<Secret>,
        model: &str,
        timeout: Duration,
        max_inline_wait: Duration,
    ) -> Self {
        Self {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            key,
            model: model.to_string(),
            timeout,
            policy: CallPolicy::short(max_inline_wait),
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
        call_with_retry(&self.policy, "chat request", || self.attempt(&body))
            .await
            .map_err(ChatError::from)
    }

    async fn attempt(&self, body: &Value) -> Result<Completion, CallError> {
        let req = self.http.post(&self.url).timeout(self.timeout).json(body);
        let text = send(req, self.key.as_ref()).await?;
        parse(&text).map_err(CallError::Decode)
    }
}

/// A chat completion answer: the first choice's content or refusal, its finish reason, the
/// model and the usage.
pub fn parse(text: &str) -> Result<Completion, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let choice = v["choices"]
        .get(0)
        .ok_or_else(|| "no choices".to_string())?;
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
    fn parses_and_maps_call_errors() {
        let c = parse(r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"hi [1]","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13}}"#).unwrap();
        assert_eq!(c.content.as_deref(), Some("hi [1]"));
        assert_eq!(c.usage.total_tokens, 13);
        assert!(parse("{\"choices\": []}").is_err());
        assert!(parse("<html>").is_err());
        let map = |status, body: &str| ChatError::from(CallError::from_status(status, body, None));
        assert!(matches!(map(401, "{}"), ChatError::Config(_)));
        assert!(map(429, "{}").is_retryable());
        assert!(!map(400, "{}").is_retryable());
        assert!(!map(501, "{}").is_retryable());
        assert!(matches!(
            map(
                429,
                r#"{"error":{"code":"insufficient_quota","message":"q"}}"#
            ),
            ChatError::Config(_)
        ));
        let gave_up = ChatError::from(CallError::GaveUp {
            attempts: 3,
            last: "HTTP 503".into(),
        });
        assert!(!gave_up.is_retryable() && gave_up.to_string().contains("gave up"));
    }
}
