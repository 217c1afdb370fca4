//! The one HTTP call layer of every outgoing API call (embeddings, chat, transcription, Web
//! Push): one status table, one reading of the server's wait hints, URL redaction, and
//! `call_with_retry`, the inline retry layer.
//!
//! One failure is retried in exactly one layer. Inline retries stay short; when they run out the
//! error is `GaveUp`, which no task retries again. A hint longer than the inline budget is not
//! slept on: the call returns `Later`, and the task re-publishes itself with that ETA.

use std::future::Future;
use std::time::Duration;

use crate::retry::{Backoff, Retryable};
use crate::secret::Secret;

/// What a response status means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    /// Overload, rate limit or a passing server fault: another attempt may succeed.
    Retryable,
    /// The key or the billing is wrong: a human must act, retrying only burns quota.
    Config,
    /// The request itself is wrong (4xx, 501 Not Implemented): it will fail the same way again.
    Permanent,
}

/// The status table. `code` is the error body's `code` (or `type`): OpenAI answers a spent quota
/// with 429 `insufficient_quota`, which no retry fixes.
pub fn classify_status(status: u16, code: &str) -> StatusClass {
    match status {
        200..=299 => StatusClass::Success,
        401 | 403 => StatusClass::Config,
        _ if code == "insufficient_quota" => StatusClass::Config,
        408 | 409 | 425 | 429 => StatusClass::Retryable,
        // 501 and 505 say the server will never do this; the rest of 5xx are passing faults
        // (500, 502, 503, 504, and the 52x of a CDN in front of the API).
        501 | 505 => StatusClass::Permanent,
        500..=599 => StatusClass::Retryable,
        _ => StatusClass::Permanent,
    }
}

/// An error body's message (cut to a log line) and code (or type), for OpenAI-shaped bodies;
/// any other body is its own message.
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

/// When the server asked us to come back: `retry-after-ms`, `retry-after` (seconds), else the
/// larger of `x-ratelimit-reset-requests` / `-tokens` (`1s`, `6m0s`, `20ms`).
pub fn retry_hint(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
    let secs = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).ok();
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return secs(ms / 1000.0);
    }
    if let Some(s) = get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()) {
        return secs(s);
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|k| get(k).and_then(parse_go_duration))
        .max()
}

/// Go's duration format, as OpenAI writes its reset headers.
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
    if any {
        Duration::try_from_secs_f64(total).ok()
    } else {
        None
    }
}

/// A reqwest error without its URL (a key may sit in a query string, a push endpoint names the
/// browser), and saying so when it timed out.
pub fn redact(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    if e.is_timeout() {
        s = format!("timed out: {s}");
    }
    s
}

/// One attempt: sends `req` (with `key` as its bearer token) and returns the body of a 2xx
/// answer. Any other status is the `CallError` of the status table, with the server's hint; a
/// transport failure is `Connect`, redacted.
pub async fn send(req: reqwest::RequestBuilder, key: Option<&Secret>) -> Result<String, CallError> {
    send_observed(req, key, |_, _| {}).await
}

/// `send`, with the response's status and headers shown to `observe` whatever the status (the
/// rate-limit headers of a 429 say as much as a success's).
pub async fn send_observed(
    req: reqwest::RequestBuilder,
    key: Option<&Secret>,
    observe: impl FnOnce(u16, &reqwest::header::HeaderMap),
) -> Result<String, CallError> {
    let req = match key {
        Some(k) => req.bearer_auth(k.expose()),
        None => req,
    };
    let resp = req.send().await.map_err(|e| CallError::transport(&e))?;
    let status = resp.status().as_u16();
    observe(status, resp.headers());
    let hint = retry_hint(resp.headers());
    let text = resp.text().await.map_err(|e| CallError::transport(&e))?;
    if !(200..300).contains(&status) {
        return Err(CallError::from_status(status, &text, hint));
    }
    Ok(text)
}

/// How one call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("HTTP {status}{}: {message}", if code.is_empty() { String::new() } else { format!(" {code}") })]
    Status {
        status: u16,
        code: String,
        message: String,
        class: StatusClass,
        retry_after: Option<Duration>,
    },
    #[error("unreachable: {0}")]
    Connect(String),
    #[error("answer malformed: {0}")]
    Decode(String),
    /// Retried inline until the attempts ran out: no other layer tries again.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
    /// The service asked for a wait longer than the inline budget: the task layer schedules it.
    #[error("{last} (the service asked to wait {}s)", after.as_secs_f64())]
    Later { after: Duration, last: String },
}

impl CallError {
    /// The error for a non-success response.
    pub fn from_status(status: u16, body: &str, retry_after: Option<Duration>) -> CallError {
        let (message, code) = api_error(body);
        CallError::Status {
            class: classify_status(status, &code),
            status,
            code,
            message,
            retry_after,
        }
    }

    /// A transport error (connect, timeout, reset), redacted.
    pub fn transport(e: &reqwest::Error) -> CallError {
        CallError::Connect(redact(e))
    }

    pub fn is_config(&self) -> bool {
        matches!(
            self,
            CallError::Status {
                class: StatusClass::Config,
                ..
            }
        )
    }
}

impl Retryable for CallError {
    fn is_retryable(&self) -> bool {
        match self {
            CallError::Status { class, .. } => *class == StatusClass::Retryable,
            CallError::Connect(_) | CallError::Later { .. } => true,
            CallError::Decode(_) | CallError::GaveUp { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Status { retry_after, .. } => *retry_after,
            CallError::Later { after, .. } => Some(*after),
            _ => None,
        }
    }
}

/// How a call is retried inline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallPolicy {
    /// Attempts, the first included. 1: no inline retry; a retryable failure goes up as it is,
    /// for the task layer.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// The longest single wait slept inline; a longer hint becomes `Later`.
    pub max_inline_wait: Duration,
}

impl CallPolicy {
    /// Three attempts within seconds: a blip or a short rate limit passes without holding the
    /// task near its soft limit.
    pub const fn short(max_inline_wait: Duration) -> CallPolicy {
        CallPolicy {
            max_attempts: 3,
            backoff: Backoff {
                base: Duration::from_millis(500),
                max: Duration::from_secs(4),
            },
            max_inline_wait,
        }
    }
}

/// What to do after a failed attempt: the pure decision of `call_with_retry`.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Sleep this long, then try again.
    Wait(Duration),
    /// Return this error.
    Stop(CallError),
}

/// Decides after attempt number `attempt` (from 1) failed with `e`.
pub fn next_step(policy: &CallPolicy, attempt: u32, e: CallError) -> Next {
    if !e.is_retryable() || policy.max_attempts <= 1 {
        return Next::Stop(e);
    }
    let hint = e.retry_after();
    if let Some(h) = hint.filter(|h| *h > policy.max_inline_wait) {
        return Next::Stop(CallError::Later {
            after: h,
            last: e.to_string(),
        });
    }
    if attempt >= policy.max_attempts {
        return Next::Stop(CallError::GaveUp {
            attempts: attempt,
            last: e.to_string(),
        });
    }
    Next::Wait(hint.unwrap_or_else(|| policy.backoff.delay(attempt - 1)))
}

/// Runs `attempt` under `policy`. `what` names the call in log lines.
pub async fn call_with_retry<T, F, Fut>(
    policy: &CallPolicy,
    what: &str,
    mut attempt: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => match next_step(policy, n, e.clone()) {
                Next::Stop(e) => return Err(e),
                Next::Wait(wait) => {
                    tracing::warn!(call = what, attempt = n, wait_ms = wait.as_millis() as u64, error = %e, "{what} retrying");
                    tokio::time::sleep(wait).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn the_status_table() {
        use StatusClass::*;
        let table = [
            (200, "", Success),
            (204, "", Success),
            (400, "", Permanent),
            (401, "invalid_api_key", Config),
            (403, "", Config),
            (404, "", Permanent),
            (408, "", Retryable),
            (413, "", Permanent),
            (429, "rate_limit_exceeded", Retryable),
            (429, "insufficient_quota", Config),
            (500, "", Retryable),
            (501, "", Permanent),
            (502, "", Retryable),
            (503, "", Retryable),
            (504, "", Retryable),
            (505, "", Permanent),
            (524, "", Retryable),
        ];
        for (status, code, want) in table {
            assert_eq!(classify_status(status, code), want, "{status} {code}");
        }
    }

    #[test]
    fn parses_reset_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("1e400s"), None);
    }

    #[test]
    fn reads_every_hint_header() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = reqwest::header::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            retry_hint(&m)
        };
        assert_eq!(h(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(
            h(&[("retry-after-ms", "150"), ("retry-after", "9")]),
            Some(Duration::from_millis(150))
        );
        assert_eq!(
            h(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s")
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(h(&[("retry-after", "-3")]), Some(Duration::ZERO));
        assert_eq!(h(&[("retry-after", "inf")]), None);
        assert_eq!(h(&[]), None);
    }

    fn status(s: u16, hint: Option<u64>) -> CallError {
        CallError::from_status(s, "{}", hint.map(Duration::from_secs))
    }

    #[test]
    fn the_decision_after_a_failure() {
        let p = CallPolicy::short(Duration::from_secs(10));
        // Not retryable: returned as is, whatever the attempt.
        assert!(matches!(
            next_step(&p, 1, status(400, None)),
            Next::Stop(CallError::Status { status: 400, .. })
        ));
        assert!(matches!(
            next_step(&p, 1, status(501, None)),
            Next::Stop(CallError::Status { status: 501, .. })
        ));
        // Retryable within the budget: waits the hint, or the backoff.
        assert_eq!(
            next_step(&p, 1, status(429, Some(2))),
            Next::Wait(Duration::from_secs(2))
        );
        assert!(
            matches!(next_step(&p, 2, status(503, None)), Next::Wait(d) if d <= Duration::from_secs(1))
        );
        // Out of attempts: gave up, which nobody retries.
        let gave_up = next_step(&p, 3, status(503, None));
        assert!(
            matches!(&gave_up, Next::Stop(e @ CallError::GaveUp { attempts: 3, .. }) if !e.is_retryable()),
            "{gave_up:?}"
        );
        // A hint over the inline budget: not slept on, handed to the task layer with its ETA.
        match next_step(&p, 1, status(429, Some(60))) {
            Next::Stop(e @ CallError::Later { .. }) => {
                assert!(e.is_retryable());
                assert_eq!(e.retry_after(), Some(Duration::from_secs(60)));
            }
            other => panic!("{other:?}"),
        }
        // One attempt only: a retryable error goes up unchanged, for the task layer.
        let once = CallPolicy {
            max_attempts: 1,
            ..p
        };
        assert!(
            matches!(next_step(&once, 1, status(503, None)), Next::Stop(e) if e.is_retryable())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_is_tried_exactly_the_inline_budget() {
        let n = AtomicU32::new(0);
        let p = CallPolicy::short(Duration::from_secs(10));
        let r: Result<(), _> = call_with_retry(&p, "test call", || async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(status(503, None))
        })
        .await;
        assert_eq!(n.load(Ordering::SeqCst), p.max_attempts);
        let e = r.unwrap_err();
        assert!(
            !e.is_retryable() && e.to_string().starts_with("gave up after 3 attempts"),
            "{e}"
        );
    }
}
