//! Task messages: kombu's Redis envelope around a Celery protocol 2 task, decoded and re-encoded.

use base64::Engine as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Why a queue element is not a task we can run. Never retryable: the same bytes fail again.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON envelope: {0}")]
    Envelope(String),
    #[error("protocol 1 message (no headers.task): only protocol 2 is supported")]
    Protocol1,
    #[error("unsupported content type {0:?}: only application/json is accepted")]
    ContentType(String),
    #[error("unsupported body encoding {0:?}")]
    BodyEncoding(String),
    #[error("body is not valid base64: {0}")]
    Base64(String),
    #[error("body is not [args, kwargs, embed]: {0}")]
    Body(String),
    #[error("bad {field} timestamp {value:?}")]
    Timestamp { field: &'static str, value: String },
    #[error("message is not UTF-8 (JSON is): refused as received")]
    NotUtf8,
    #[error("the decoder panicked: {0}")]
    Panic(String),
    #[error("{what} is {bytes} bytes, over the {limit}-byte limit ({setting})")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
        setting: &'static str,
    },
}

/// What one message may hold: `ORBIT_MAX_MESSAGE_BYTES` and `ORBIT_MAX_ARGUMENT_BYTES`.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    pub message_bytes: usize,
    pub argument_bytes: usize,
}

impl MessageLimits {
    pub const NONE: MessageLimits = MessageLimits {
        message_bytes: usize::MAX,
        argument_bytes: usize::MAX,
    };
}

/// A failed decode, with whatever identity could still be read, so the failure can be
/// acked, recorded against the task id, and dead-lettered.
#[derive(Debug)]
pub struct DecodeFailure {
    pub error: DecodeError,
    pub task_id: Option<String>,
    pub delivery_tag: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    body: Value,
    #[serde(rename = "content-type", default)]
    content_type: Option<String>,
    #[serde(rename = "content-encoding", default)]
    content_encoding: Option<String>,
    #[serde(default)]
    headers: Option<Headers>,
    properties: Properties,
}

#[derive(Deserialize, Default)]
struct Headers {
    task: Option<String>,
    id: Option<String>,
    eta: Option<String>,
    expires: Option<String>,
    retries: Option<u32>,
    /// `[hard, soft]`, either may be null.
    timelimit: Option<(Option<f64>, Option<f64>)>,
    parent_id: Option<String>,
    redelivered: Option<bool>,
    ignore_result: Option<bool>,
    // Read for events only: any JSON is accepted, and what is not a string is left out.
    root_id: Option<Value>,
    argsrepr: Option<Value>,
    kwargsrepr: Option<Value>,
    /// Celery's stamping (5.3+): the names of the stamps and their values, for
    /// `revoke_by_stamped_headers`. Any JSON is accepted; what is not the expected shape is
    /// left out.
    stamped_headers: Option<Value>,
    stamps: Option<Value>,
}

#[derive(Deserialize)]
struct Properties {
    delivery_tag: Option<String>,
    correlation_id: Option<String>,
    priority: Option<i64>,
    body_encoding: Option<String>,
    delivery_info: Option<DeliveryInfo>,
}

#[derive(Deserialize, Default)]
struct DeliveryInfo {
    exchange: Option<String>,
    routing_key: Option<String>,
    redelivered: Option<bool>,
}

/// One task message, decoded. `raw` keeps the exact bytes for restore and re-publish.
#[derive(Debug, Clone)]
pub struct TaskMessage {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub hard_limit: Option<f64>,
    pub soft_limit: Option<f64>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    /// The client's own repr of the arguments (`argsrepr`, `kwargsrepr`): what Celery's
    /// `task-received` event and `inspect active` show.
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
    pub delivery_tag: String,
    pub priority: u8,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub ignore_result: bool,
    /// The embed names a chain, callbacks, errbacks or a chord: canvas work this worker does
    /// not run yet, so it says so instead of dropping it silently.
    pub has_canvas: bool,
    /// The message's stamps, `(header, value)` for each name in `stamped_headers` that has a
    /// value (a value may be a list, as Celery allows).
    pub stamps: Vec<(String, Value)>,
    pub raw: String,
}

/// The identity of an oversized envelope, read without holding its body: only `headers` and
/// `properties` become values (the body is skipped as it is parsed). An envelope this cannot read
/// (a duplicated top-level key) falls back to `identity`.
fn identity_of_large(raw: &str) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Ident {
        #[serde(default)]
        headers: Option<Value>,
        #[serde(default)]
        properties: Option<Value>,
    }
    let Ok(v) = serde_json::from_str::<Ident>(raw) else {
        return identity(raw);
    };
    let text = |v: &Option<Value>, k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    (
        text(&v.headers, "id").or_else(|| text(&v.properties, "correlation_id")),
        text(&v.properties, "delivery_tag"),
    )
}

/// The task id and delivery tag of an envelope the typed decode refused (a wrong-typed field,
/// a duplicated key): read as plain JSON, as the fetch script's `cjson` read the tag it
/// registered the message under (the last of duplicated keys wins in both), so the failure is
/// still answered and acked.
fn identity(raw: &str) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_str::<Value>(raw) else {
        return (None, None);
    };
    let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    (
        text("/headers/id").or_else(|| text("/properties/correlation_id")),
        text("/properties/delivery_tag"),
    )
}

impl TaskMessage {
    /// `decode` that cannot unwind: a panic anywhere in decoding (a bug, found by an input no
    /// test had) becomes a failure with whatever identity a plain JSON read still gives, so the
    /// message is answered, dead-lettered and acked instead of crashing the fetch loop and
    /// coming back after every restart.
    pub fn decode_guarded(
        raw: &str,
        decode: impl FnOnce(&str) -> Result<TaskMessage, Box<DecodeFailure>>,
    ) -> Result<TaskMessage, Box<DecodeFailure>> {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        match catch_unwind(AssertUnwindSafe(|| decode(raw))) {
            Ok(r) => r,
            Err(p) => {
                let (task_id, delivery_tag) =
                    catch_unwind(|| identity(raw)).unwrap_or((None, None));
                Err(Box::new(DecodeFailure {
                    error: DecodeError::Panic(orbit_pipeline::panic_text(p)),
                    task_id,
                    delivery_tag,
                }))
            }
        }
    }

    /// The failure for a message whose bytes are not UTF-8, with what of its identity its lossy
    /// copy still shows.
    pub fn not_utf8(lossy: &str) -> Box<DecodeFailure> {
        let (task_id, delivery_tag) = identity(lossy);
        Box::new(DecodeFailure {
            error: DecodeError::NotUtf8,
            task_id,
            delivery_tag,
        })
    }

    pub fn decode(raw: &str) -> Result<TaskMessage, Box<DecodeFailure>> {
        Self::decode_within(raw, MessageLimits::NONE)
    }

    /// `decode`, refusing a message or arguments past `limits` before they are decoded: an
    /// oversized message costs its own bytes once, not the copies a decode makes.
    pub fn decode_within(
        raw: &str,
        limits: MessageLimits,
    ) -> Result<TaskMessage, Box<DecodeFailure>> {
        if raw.len() > limits.message_bytes {
            let (task_id, delivery_tag) = identity_of_large(raw);
            return Err(Box::new(DecodeFailure {
                error: DecodeError::TooLarge {
                    what: "the message",
                    bytes: raw.len(),
                    limit: limits.message_bytes,
                    setting: "ORBIT_MAX_MESSAGE_BYTES",
                },
                task_id,
                delivery_tag,
            }));
        }
        let env: Envelope = serde_json::from_str(raw).map_err(|e| {
            let (task_id, delivery_tag) = identity(raw);
            Box::new(DecodeFailure {
                error: DecodeError::Envelope(e.to_string()),
                task_id,
                delivery_tag,
            })
        })?;
        let headers = env.headers.unwrap_or_default();
        let tag = env.properties.delivery_tag.clone();
        let id = headers
            .id
            .clone()
            .or_else(|| env.properties.correlation_id.clone());
        let fail = |error| {
            Box::new(DecodeFailure {
                error,
                task_id: id.clone(),
                delivery_tag: tag.clone(),
            })
        };
        let Some(delivery_tag) = tag.clone() else {
            return Err(fail(DecodeError::Envelope(
                "missing properties.delivery_tag".into(),
            )));
        };
        let (Some(name), Some(task_id)) = (headers.task.clone(), id.clone()) else {
            return Err(fail(DecodeError::Protocol1));
        };
        let ct = env.content_type.as_deref().unwrap_or("application/json");
        if ct != "application/json" {
            return Err(fail(DecodeError::ContentType(ct.to_string())));
        }
        if let Some(enc) = env.content_encoding.as_deref() {
            if !enc.eq_ignore_ascii_case("utf-8") && !enc.eq_ignore_ascii_case("utf8") {
                return Err(fail(DecodeError::BodyEncoding(enc.to_string())));
            }
        }
        let too_large = |bytes: usize| {
            fail(DecodeError::TooLarge {
                what: "the arguments",
                bytes,
                limit: limits.argument_bytes,
                setting: "ORBIT_MAX_ARGUMENT_BYTES",
            })
        };
        if let Value::String(b) = &env.body {
            // base64 is 4 characters for 3 bytes: the decoded size, before decoding.
            let decoded = match env.properties.body_encoding.as_deref() {
                Some("base64") => b.len() / 4 * 3,
                _ => b.len(),
            };
            if decoded > limits.argument_bytes {
                return Err(too_large(decoded));
            }
        }
        let body_bytes = match (env.properties.body_encoding.as_deref(), &env.body) {
            (Some("base64"), Value::String(s)) => base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|e| fail(DecodeError::Base64(e.to_string())))?,
            (None, Value::String(s)) => s.clone().into_bytes(),
            // kombu may inline a JSON body that is already structured.
            (None, v @ Value::Array(_)) => serde_json::to_vec(v).unwrap_or_default(),
            (Some(other), _) => return Err(fail(DecodeError::BodyEncoding(other.to_string()))),
            (None, _) => return Err(fail(DecodeError::Body("body is not a string".into()))),
        };
        if body_bytes.len() > limits.argument_bytes {
            return Err(too_large(body_bytes.len()));
        }
        let (args, kwargs, has_canvas) = decode_body(&body_bytes).map_err(fail)?;
        let eta = parse_time("eta", headers.eta.as_deref()).map_err(fail)?;
        let expires = parse_time("expires", headers.expires.as_deref()).map_err(fail)?;
        let (hard_limit, soft_limit) = headers.timelimit.unwrap_or((None, None));
        let di = env.properties.delivery_info.unwrap_or_default();
        let stamps = stamps_of(headers.stamped_headers.as_ref(), headers.stamps.as_ref());
        Ok(TaskMessage {
            id: task_id,
            name,
            args,
            kwargs,
            retries: headers.retries.unwrap_or(0),
            eta,
            expires,
            hard_limit: hard_limit.filter(|v| v.is_finite() && *v > 0.0),
            soft_limit: soft_limit.filter(|v| v.is_finite() && *v > 0.0),
            parent_id: headers.parent_id,
            root_id: text(headers.root_id),
            argsrepr: text(headers.argsrepr),
            kwargsrepr: text(headers.kwargsrepr),
            delivery_tag,
            priority: env.properties.priority.unwrap_or(0).clamp(0, 9) as u8,
            exchange: di.exchange.unwrap_or_default(),
            routing_key: di.routing_key.unwrap_or_default(),
            redelivered: headers.redelivered.or(di.redelivered).unwrap_or(false),
            ignore_result: headers.ignore_result.unwrap_or(false),
            has_canvas,
            stamps,
            raw: raw.to_string(),
        })
    }
}

/// Celery's `Request.stamps`: the value of each stamp `stamped_headers` names, nulls left out.
fn stamps_of(names: Option<&Value>, stamps: Option<&Value>) -> Vec<(String, Value)> {
    let (Some(Value::Array(names)), Some(Value::Object(stamps))) = (names, stamps) else {
        return Vec::new();
    };
    names
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|n| match stamps.get(n) {
            None | Some(Value::Null) => None,
            Some(v) => Some((n.to_string(), v.clone())),
        })
        .collect()
}

/// A header that is a string, else none.
fn text(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

type Body = (Vec<Value>, Map<String, Value>, bool);

fn decode_body(bytes: &[u8]) -> Result<Body, DecodeError> {
    let body: Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Body(e.to_string()))?;
    let Value::Array(mut parts) = body else {
        return Err(DecodeError::Body("not a JSON list".into()));
    };
    if parts.len() < 2 {
        return Err(DecodeError::Body(format!("{} elements", parts.len())));
    }
    let has_canvas = parts
        .get(2)
        .and_then(Value::as_object)
        .is_some_and(|embed| {
            ["callbacks", "errbacks", "chain", "chord"].iter().any(|k| {
                embed
                    .get(*k)
                    .is_some_and(|v| !v.is_null() && v != &Value::Array(vec![]))
            })
        });
    let kwargs = match parts.swap_remove(1) {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        _ => return Err(DecodeError::Body("kwargs is not an object".into())),
    };
    let args = match parts.swap_remove(0) {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        _ => return Err(DecodeError::Body("args is not a list".into())),
    };
    Ok((args, kwargs, has_canvas))
}

/// ISO-8601 as Celery writes it (`+00:00`); a naive time is read as UTC, as Celery does with
/// `enable_utc`.
fn parse_time(field: &'static str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let Some(s) = v else { return Ok(None) };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|t| Some(t.and_utc()))
        .map_err(|_| DecodeError::Timestamp {
            field,
            value: s.to_string(),
        })
}

/// Celery's own timestamp format: microseconds and `+00:00`.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// The list a message with this priority lives on: kombu buckets priorities to 0/3/6/9,
/// rounding down, and bucket 0 is the bare queue.
pub fn queue_key(queue: &str, priority: u8) -> String {
    match priority {
        0..=2 => queue.to_string(),
        3..=5 => format!("{queue}\x06\x163"),
        6..=8 => format!("{queue}\x06\x166"),
        _ => format!("{queue}\x06\x169"),
    }
}

/// The lists `BRPOP` watches, in kombu's order: every queue's bucket 0, then bucket 3, …
pub fn poll_keys(queues: &[String]) -> Vec<String> {
    [0u8, 3, 6, 9]
        .iter()
        .flat_map(|p| queues.iter().map(move |q| queue_key(q, *p)))
        .collect()
}

/// kombu's round robin: each poll starts at the next queue, so one busy queue never starves the
/// others. Priority buckets still come first: every queue's bucket 0 before any bucket 3.
pub struct PollOrder {
    rotations: Vec<Vec<String>>,
    next: usize,
}

impl PollOrder {
    pub fn new(queues: &[String]) -> PollOrder {
        let rotations = (0..queues.len().max(1))
            .map(|i| {
                let mut q = queues.to_vec();
                let by = i.min(q.len().saturating_sub(1));
                q.rotate_left(by);
                poll_keys(&q)
            })
            .collect();
        PollOrder { rotations, next: 0 }
    }

    pub fn keys(&mut self) -> &[String] {
        let i = self.next;
        self.next = (self.next + 1) % self.rotations.len();
        &self.rotations[i]
    }
}

/// A new task message as Celery's client publishes it (`app.send_task(name, args, kwargs,
/// queue=…)`, protocol 2, the shape captured in `../shared/fixtures/celery/03_send_task_by_name`):
/// the task id and the envelope to `LPUSH` onto `queue_key(queue, 0)`.
pub fn task_envelope(task: &str, args: &Value, kwargs: &Value, queue: &str) -> (String, String) {
    use base64::Engine;
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::json!([args, kwargs,
        {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "orbit-worker".into());
    let env = serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": id, "shadow": null, "eta": null, "expires": null,
            "group": null, "group_index": null, "retries": 0, "timelimit": [null, null],
            "root_id": id, "parent_id": null, "argsrepr": args.to_string(),
            "kwargsrepr": kwargs.to_string(), "origin": format!("{}@{host}", std::process::id()),
            "ignore_result": null, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}
        },
        "properties": {
            "correlation_id": id, "reply_to": uuid::Uuid::new_v4().to_string(), "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string()
        }
    });
    (id, env.to_string())
}

/// kombu's JSON envelope of a transient message (an event, a remote-control reply): the body
/// JSON in base64, `delivery_mode` 1, a fresh delivery tag.
pub fn transient_envelope(
    body: &Value,
    headers: Value,
    exchange: &str,
    routing_key: &str,
) -> String {
    use base64::Engine;
    serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// The envelope of a retry, as Celery publishes it: same id, `retries + 1`, an absolute `eta`,
/// the task as its own parent, and a fresh delivery tag.
pub fn retry_envelope(
    raw: &str,
    retries: u32,
    eta: DateTime<Utc>,
    new_tag: &str,
) -> Result<String, DecodeError> {
    let mut env: Value =
        serde_json::from_str(raw).map_err(|e| DecodeError::Envelope(e.to_string()))?;
    let id = env["headers"]["id"].clone();
    if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("eta".into(), Value::String(iso(eta)));
        h.insert("retries".into(), Value::from(retries));
        h.insert("parent_id".into(), id);
        h.remove("redelivered");
    }
    if let Some(p) = env.get_mut("properties").and_then(Value::as_object_mut) {
        p.insert("delivery_tag".into(), Value::String(new_tag.to_string()));
        if let Some(di) = p.get_mut("delivery_info").and_then(Value::as_object_mut) {
            di.remove("redelivered");
        }
    }
    serde_json::to_string(&env).map_err(|e| DecodeError::Envelope(e.to_string()))
}

/// An `unacked` hash value, `[envelope, exchange, routing_key]`, turned into the envelope to put
/// back, marked redelivered as kombu marks it, and the priority that picks its list.
pub fn restored_envelope(unacked_value: &str) -> Result<(String, String, u8), DecodeError> {
    let v: Value =
        serde_json::from_str(unacked_value).map_err(|e| DecodeError::Envelope(e.to_string()))?;
    let Value::Array(mut parts) = v else {
        return Err(DecodeError::Envelope("unacked entry is not a list".into()));
    };
    if parts.len() != 3 {
        return Err(DecodeError::Envelope(
            "unacked entry is not a triple".into(),
        ));
    }
    let routing_key = parts[2].as_str().unwrap_or_default().to_string();
    let mut env = parts.swap_remove(0);
    if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    let mut priority = 0;
    if let Some(p) = env.get_mut("properties").and_then(Value::as_object_mut) {
        priority = p
            .get("priority")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .clamp(0, 9) as u8;
        if let Some(di) = p.get_mut("delivery_info").and_then(Value::as_object_mut) {
            di.insert("redelivered".into(), Value::Bool(true));
        }
    }
    let s = serde_json::to_string(&env).map_err(|e| DecodeError::Envelope(e.to_string()))?;
    Ok((s, routing_key, priority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_task_decodes_as_the_worker_reads_celerys_own() {
        let (id, raw) = task_envelope(
            "orbitpilot.reembed_user",
            &serde_json::json!(["r1", 7]),
            &serde_json::json!({}),
            "celery",
        );
        let m = TaskMessage::decode(&raw).unwrap();
        assert_eq!(m.id, id);
        assert_eq!(m.name, "orbitpilot.reembed_user");
        assert_eq!(m.args, vec![serde_json::json!("r1"), serde_json::json!(7)]);
        assert!(m.kwargs.is_empty());
    }

    #[test]
    fn stamps_are_the_values_stamped_headers_names() {
        use serde_json::json;
        let names = json!(["a", "b", "missing", 3, "nul"]);
        let stamps = json!({"a": "x", "b": ["y", "z"], "c": "not named", "nul": null});
        assert_eq!(
            stamps_of(Some(&names), Some(&stamps)),
            vec![
                ("a".to_string(), json!("x")),
                ("b".to_string(), json!(["y", "z"]))
            ]
        );
        // Wrong shapes from outside: no stamps, no error.
        assert!(stamps_of(Some(&json!("a")), Some(&stamps)).is_empty());
        assert!(stamps_of(Some(&names), Some(&json!([1]))).is_empty());
        assert!(stamps_of(None, None).is_empty());
    }

    #[test]
    fn priority_buckets_round_down() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 2), "celery");
        assert_eq!(queue_key("celery", 5), "celery\x06\x163");
        assert_eq!(queue_key("celery", 9), "celery\x06\x169");
        assert_eq!(
            poll_keys(&["a".into(), "b".into()])[..3],
            ["a".to_string(), "b".into(), "a\x06\x163".into()]
        );
    }

    #[test]
    fn polls_rotate_across_queues() {
        let mut p = PollOrder::new(&["a".into(), "b".into()]);
        assert_eq!(p.keys()[..2], ["a".to_string(), "b".into()]);
        assert_eq!(p.keys()[..2], ["b".to_string(), "a".into()]);
        assert_eq!(p.keys()[..2], ["a".to_string(), "b".into()]);
        assert_eq!(p.keys()[2], "b\x06\x163", "bucket 3 after every bucket 0");
        let mut one = PollOrder::new(&["celery".into()]);
        let first = one.keys().to_vec();
        assert_eq!(first, one.keys());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let f = TaskMessage::decode("not json").unwrap_err();
        assert!(matches!(f.error, DecodeError::Envelope(_)));
        let f = TaskMessage::decode(r#"{"body":"!!","headers":{"task":"t","id":"i"},"properties":{"delivery_tag":"d","body_encoding":"base64"}}"#).unwrap_err();
        assert!(matches!(f.error, DecodeError::Base64(_)));
        assert_eq!(f.task_id.as_deref(), Some("i"));
        assert_eq!(f.delivery_tag.as_deref(), Some("d"));
    }

    /// Issue 13: a panic inside the decoder is a decode failure that keeps the identity.
    #[test]
    fn a_panicking_decode_is_a_failure_with_the_identity() {
        let raw = r#"{"body":"W1tdLHt9LHt9XQ==","headers":{"task":"t","id":"i5"},"properties":{"delivery_tag":"d5","body_encoding":"base64"}}"#;
        let f = TaskMessage::decode_guarded(raw, |_| panic!("index out of bounds")).unwrap_err();
        match &f.error {
            DecodeError::Panic(m) => assert!(m.contains("index out of bounds"), "{m}"),
            e => panic!("{e:?}"),
        }
        assert_eq!(
            (f.task_id.as_deref(), f.delivery_tag.as_deref()),
            (Some("i5"), Some("d5"))
        );
        assert!(TaskMessage::decode_guarded(raw, TaskMessage::decode).is_ok());
    }

    /// Issue 13, limits: an oversized message or argument list is refused before it is decoded,
    /// and still names its task id and tag (so it is answered and acked).
    #[test]
    fn oversized_messages_and_arguments_are_refused_with_their_identity() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let body = format!(r#"[["{}"], {{}}, {{}}]"#, "x".repeat(10_000));
        let raw = format!(
            r#"{{"body":"{}","content-type":"application/json","headers":{{"task":"t","id":"i9"}},"properties":{{"delivery_tag":"d9","body_encoding":"base64"}}}}"#,
            b64(&body)
        );
        let limits = |m, a| MessageLimits {
            message_bytes: m,
            argument_bytes: a,
        };
        assert!(TaskMessage::decode_within(&raw, limits(raw.len(), body.len())).is_ok());
        for (l, what) in [
            (limits(raw.len() - 1, usize::MAX), "the message"),
            (limits(usize::MAX, body.len() - 1), "the arguments"),
            (limits(usize::MAX, 5_000), "the arguments"),
        ] {
            let f = TaskMessage::decode_within(&raw, l).unwrap_err();
            match &f.error {
                DecodeError::TooLarge { what: w, .. } => assert_eq!(*w, what),
                e => panic!("{e:?}"),
            }
            assert_eq!(
                (f.task_id.as_deref(), f.delivery_tag.as_deref()),
                (Some("i9"), Some("d9"))
            );
        }
        // An oversized envelope with a duplicated key still shows its identity.
        let dup = raw.replacen(r#"{"body":"#, r#"{"body":1,"body":"#, 1);
        let f = TaskMessage::decode_within(&dup, limits(100, usize::MAX)).unwrap_err();
        assert_eq!(f.task_id.as_deref(), Some("i9"));
        // An inline (not base64) body is measured too.
        let inline = format!(
            r#"{{"body":{body},"headers":{{"task":"t","id":"i8"}},"properties":{{"delivery_tag":"d8"}}}}"#
        );
        let f = TaskMessage::decode_within(&inline, limits(usize::MAX, 5_000)).unwrap_err();
        assert!(
            matches!(f.error, DecodeError::TooLarge { .. }),
            "{:?}",
            f.error
        );
    }

    /// Issue 13, defect 2: one wrong-typed field made the typed decode fail with no identity,
    /// so the failure was never acked (restored and dead-lettered forever) nor answered.
    #[test]
    fn a_wrong_typed_envelope_keeps_its_id_and_tag() {
        let ok = r#""headers":{"task":"t","id":"i7"},"properties":{"delivery_tag":"d7","body_encoding":"base64"}"#;
        let cases = [
            r#"{"body":"W10=","headers":{"task":"t","id":"i7","retries":-1},"properties":{"delivery_tag":"d7"}}"#.to_string(),
            r#"{"body":"W10=","headers":{"task":"t","id":"i7"},"properties":{"delivery_tag":"d7","priority":"5"}}"#.to_string(),
            r#"{"body":"W10=","headers":{"task":"t","id":"i7","timelimit":["x",null]},"properties":{"delivery_tag":"d7"}}"#.to_string(),
            format!(r#"{{"body":"W10=","body":"W10=",{ok}}}"#),
        ];
        for raw in &cases {
            let f = TaskMessage::decode(raw).unwrap_err();
            assert!(matches!(f.error, DecodeError::Envelope(_)), "{raw}");
            assert_eq!(f.task_id.as_deref(), Some("i7"), "{raw}");
            assert_eq!(f.delivery_tag.as_deref(), Some("d7"), "{raw}");
        }
        // The correlation id stands in for a missing header id, as in the typed decode.
        let f = TaskMessage::decode(
            r#"{"body":1,"headers":{"retries":"x"},"properties":{"correlation_id":"c","delivery_tag":"d"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            (f.task_id.as_deref(), f.delivery_tag.as_deref()),
            (Some("c"), Some("d"))
        );
    }

    #[test]
    fn retry_and_restore_rewrite_the_envelope() {
        let raw = r#"{"body":"W1tdLHt9LHt9XQ==","headers":{"task":"t","id":"i","retries":0,"eta":null,"redelivered":true},"properties":{"delivery_tag":"d","body_encoding":"base64","priority":5,"delivery_info":{"exchange":"","routing_key":"celery","redelivered":true}}}"#;
        let eta = Utc::now();
        let r = retry_envelope(raw, 1, eta, "new").unwrap();
        let m = TaskMessage::decode(&r).unwrap();
        assert_eq!(m.retries, 1);
        assert_eq!(m.delivery_tag, "new");
        assert_eq!(m.parent_id.as_deref(), Some("i"));
        assert!(!m.redelivered);
        assert_eq!(
            m.eta.unwrap().timestamp_micros(),
            eta.timestamp_micros(),
            "eta keeps microseconds"
        );
        let unacked = format!(r#"[{r}, "", "celery"]"#);
        let (env, rk, pri) = restored_envelope(&unacked).unwrap();
        assert_eq!((rk.as_str(), pri), ("celery", 5));
        let m = TaskMessage::decode(&env).unwrap();
        assert!(m.redelivered);
        assert_eq!(m.delivery_tag, "new", "a restore keeps the delivery tag");
    }

    fn fixtures() -> Vec<(String, Value)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/celery");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            out.push((name, v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every captured message decodes, and what it says survives decoding.
    #[test]
    fn every_captured_message_decodes() {
        let mut n = 0;
        for (name, f) in fixtures() {
            let Some(msgs) = f.get("messages").and_then(Value::as_array) else {
                continue;
            };
            for m in msgs {
                // Case captures hold the list element as text; the retry capture holds envelopes.
                let raw = match m.get("raw") {
                    Some(Value::String(s)) => s.clone(),
                    _ => m.to_string(),
                };
                let env: Value = serde_json::from_str(&raw).unwrap();
                let d =
                    TaskMessage::decode(&raw).unwrap_or_else(|e| panic!("{name}: {:?}", e.error));
                let h = &env["headers"];
                assert_eq!(d.id, h["id"].as_str().unwrap(), "{name}");
                assert_eq!(d.name, h["task"].as_str().unwrap(), "{name}");
                assert_eq!(
                    d.retries as u64,
                    h["retries"].as_u64().unwrap_or(0),
                    "{name}"
                );
                assert_eq!(d.eta.is_some(), !h["eta"].is_null(), "{name}");
                assert_eq!(d.expires.is_some(), !h["expires"].is_null(), "{name}");
                assert_eq!(d.hard_limit, h["timelimit"][0].as_f64(), "{name}");
                assert_eq!(d.soft_limit, h["timelimit"][1].as_f64(), "{name}");
                assert_eq!(
                    d.delivery_tag,
                    env["properties"]["delivery_tag"].as_str().unwrap()
                );
                let body = base64::engine::general_purpose::STANDARD
                    .decode(env["body"].as_str().unwrap())
                    .unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(Value::Array(d.args.clone()), body[0], "{name}");
                assert_eq!(Value::Object(d.kwargs.clone()), body[1], "{name}");
                let canvas =
                    name.contains("chain") || name.contains("link") || name.contains("chord");
                assert_eq!(d.has_canvas, canvas, "{name}: canvas in the embed");
                if let Some(list) = m.get("redis_list").and_then(Value::as_str) {
                    let rk = if d.routing_key.is_empty() {
                        "celery"
                    } else {
                        &d.routing_key
                    };
                    assert_eq!(
                        queue_key(rk, d.priority),
                        list,
                        "{name}: the list kombu chose"
                    );
                }
                n += 1;
            }
        }
        assert!(n >= 19, "only {n} captured messages found");
    }
}
