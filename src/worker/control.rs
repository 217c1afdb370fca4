//! Remote control: Celery's pidbox (`../shared/docs/celery-wire.md` §7), so `celery inspect`,
//! `celery control`, `celery status` and Flower see and steer this worker as they do a Python
//! one. Requests arrive on the fanout channel `/<db>.celery.pidbox`; a request that carries a
//! `reply_to` is answered by an LPUSH of `{hostname: reply}` onto
//! `<routing key>.reply.celery.pidbox` with the request's ticket. Requests for other nodes
//! (`destination`, `pattern`) or past their `expires` are ignored; a malformed one is logged and
//! ignored, never a crash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::events::unix_now;
use super::inventory::Stage;
use super::Shared;
use crate::celery::result::{py_repr, py_str_repr};
use crate::redis_conn::{redact_url, RedisConn};

/// Wait before subscribing again after the control connection failed.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// One control request, as read from its envelope.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    pub arguments: serde_json::Map<String, Value>,
    pub ticket: Option<String>,
    /// The reply list's routing key; None for broadcasts nobody waits on.
    pub reply_to: Option<String>,
    pub clock: Option<u64>,
}

/// Why a request is not for us, or not a request.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Skip {
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("for other nodes")]
    NotForUs,
    #[error("expired")]
    Expired,
}

/// Reads a pidbox envelope and decides whether it is for `hostname` at `now` (unix seconds).
/// Pure, so its table test covers every way a request is refused.
pub fn read(raw: &[u8], hostname: &str, now: f64) -> Result<Request, Skip> {
    let bad = |why: &str| Skip::Malformed(why.to_string());
    let env: Value = serde_json::from_slice(raw).map_err(|e| Skip::Malformed(e.to_string()))?;
    let body = match (
        env.pointer("/properties/body_encoding")
            .and_then(Value::as_str),
        env.get("body"),
    ) {
        (Some("base64"), Some(Value::String(b))) => base64::engine::general_purpose::STANDARD
            .decode(b.as_bytes())
            .map_err(|_| bad("body is not base64"))?,
        (None, Some(Value::String(b))) => b.clone().into_bytes(),
        _ => return Err(bad("no body")),
    };
    let body: Value = serde_json::from_slice(&body).map_err(|_| bad("body is not JSON"))?;
    let method = body
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no method"))?;
    let arguments = match body.get("arguments") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("arguments is not an object")),
    };
    match body.get("destination") {
        None | Some(Value::Null) => {}
        Some(Value::Array(d)) => {
            if !d.iter().any(|n| n.as_str() == Some(hostname)) {
                return Err(Skip::NotForUs);
            }
        }
        Some(_) => return Err(bad("destination is not a list")),
    }
    if let Some(p) = body.get("pattern").and_then(Value::as_str) {
        let matcher = body
            .get("matcher")
            .and_then(Value::as_str)
            .unwrap_or("glob");
        if matcher != "glob" {
            // kombu's `pcre` matcher: not evaluated here, so not answered rather than guessed.
            return Err(Skip::NotForUs);
        }
        if !glob(p, hostname) {
            return Err(Skip::NotForUs);
        }
    }
    let headers = env.get("headers");
    if let Some(exp) = headers
        .and_then(|h| h.get("expires"))
        .and_then(Value::as_f64)
    {
        if exp < now {
            return Err(Skip::Expired);
        }
    }
    let reply_to = body
        .get("reply_to")
        .and_then(|r| r.get("routing_key"))
        .and_then(Value::as_str)
        .filter(|rk| !rk.is_empty())
        .map(str::to_string);
    Ok(Request {
        method: method.to_string(),
        arguments,
        ticket: body
            .get("ticket")
            .and_then(Value::as_str)
            .map(str::to_string),
        reply_to,
        clock: headers.and_then(|h| h.get("clock")).and_then(Value::as_u64),
    })
}

/// kombu's `glob` matcher (fnmatch): `*`, `?`, nothing else special. The classic two-pointer
/// match, which backtracks only to the last `*`: O(pattern × name) whatever a hostile pattern
/// holds (a recursive match is exponential in its stars, and anyone on the broker may send one).
fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) && p[i] != '*' {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// Subscribes to the pidbox and answers until `stop`; a lost connection is made again.
pub async fn serve(
    sh: Arc<Shared>,
    sub: Arc<RedisConn>,
    started: Instant,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let channel = format!("/{}.celery.pidbox", sub.db());
    loop {
        let pubsub = async {
            let mut p = sub.pubsub().await?;
            p.subscribe(&channel)
                .await
                .map_err(crate::redis_conn::ConnError::from)?;
            Ok::<_, crate::redis_conn::ConnError>(p)
        };
        let pubsub = tokio::select! {
            p = pubsub => p,
            _ = stop.cancelled() => return,
        };
        let mut pubsub = match pubsub {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("remote control: cannot subscribe to {channel}: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                m = messages.next() => match m {
                    Some(m) => handle(&sh, m.get_payload_bytes(), started, &shutdown).await,
                    None => break,
                },
                _ = stop.cancelled() => return,
            }
        }
        tracing::warn!("remote control: the pidbox subscription ended; subscribing again");
    }
}

async fn handle(sh: &Arc<Shared>, raw: &[u8], started: Instant, shutdown: &CancellationToken) {
    let req = match read(raw, &sh.opts.hostname, unix_now()) {
        Ok(r) => r,
        Err(Skip::Malformed(why)) => {
            tracing::warn!("remote control: ignored a malformed control message: {why}");
            return;
        }
        Err(_) => return,
    };
    if let Some(c) = req.clock {
        sh.events.adjust(c);
    }
    tracing::debug!(method = %req.method, "remote control request");
    let Some(reply) = answer(sh, &req, started, shutdown) else {
        return;
    };
    let Some(rk) = req.reply_to.as_deref() else {
        return;
    };
    let body = json!({ sh.opts.hostname.clone(): reply });
    let envelope = crate::celery::message::transient_envelope(
        &body,
        json!({"ticket": req.ticket, "clock": sh.events.tick()}),
        "reply.celery.pidbox",
        rk,
    );
    let key = format!("{rk}.reply.celery.pidbox");
    let r = sh
        .broker
        .ops
        .query::<i64>(redis::cmd("LPUSH").arg(&key).arg(envelope))
        .await;
    if let Err(e) = r {
        tracing::warn!(method = %req.method, "remote control: cannot reply: {e}");
    }
}

/// The reply to one request; None where Celery sends none.
fn answer(
    sh: &Arc<Shared>,
    req: &Request,
    started: Instant,
    shutdown: &CancellationToken,
) -> Option<Value> {
    let o = &sh.opts;
    let arg = |k: &str| req.arguments.get(k);
    Some(match req.method.as_str() {
        "ping" => json!({"ok": "pong"}),
        "stats" => stats(sh, started),
        "active_queues" => Value::Array(sh.queues().iter().map(|q| queue_info(q)).collect()),
        "add_consumer" | "cancel_consumer" => {
            let on = req.method == "add_consumer";
            let Some(q) = arg("queue")
                .and_then(Value::as_str)
                .filter(|q| queue_name_ok(q))
            else {
                return Some(
                    json!({"error": "a queue name (1 to 200 printable characters) is needed"}),
                );
            };
            let changed = sh.consume(q, on);
            match (on, changed) {
                (true, true) => json!({"ok": format!("add consumer {q}")}),
                (true, false) => json!({"ok": format!("already consuming from {q}")}),
                (false, _) => json!({"ok": format!("no longer consuming from {q}")}),
            }
        }
        "rate_limit" | "time_limit" => {
            let Some(task) = arg("task_name")
                .and_then(Value::as_str)
                .filter(|t| sh.registry.get(t).is_some())
            else {
                return Some(json!({"error": "unknown task"}));
            };
            if req.method == "rate_limit" {
                match super::tuning::parse_rate(arg("rate_limit")) {
                    Err(e) => json!({"error": e}),
                    Ok(interval) => {
                        sh.tuning.set_rate(task, interval);
                        tracing::info!(task, ?interval, "rate limit set by remote control");
                        match interval {
                            Some(_) => json!({"ok": "new rate limit set successfully"}),
                            None => json!({"ok": "rate limit disabled successfully"}),
                        }
                    }
                }
            } else {
                let secs = |k: &str| arg(k).and_then(Value::as_f64);
                sh.tuning.set_time_limits(task, secs("hard"), secs("soft"));
                tracing::info!(task, hard = ?secs("hard"), soft = ?secs("soft"), "time limits set by remote control");
                json!({"ok": "time limits set successfully"})
            }
        }
        "registered" => json!(sh.registry.names()),
        "conf" => json!({
            "broker_url": redact_url(o.broker_url.expose()),
            "result_backend": redact_url(o.backend_url.expose()),
            "task_acks_late": true,
            "result_expires": o.result_expires.as_secs_f64(),
            "worker_prefetch_multiplier": o.prefetch_multiplier,
            "worker_concurrency": sh.pool_size(),
            "broker_transport_options": {"visibility_timeout": o.visibility_timeout.as_secs_f64()},
        }),
        "active" => json!(sh.inventory.at(Stage::Active)),
        "reserved" => json!(sh.inventory.at(Stage::Reserved)),
        "scheduled" => json!(sh.inventory.at(Stage::Scheduled)),
        "revoked" => json!(sh.revoked.ids()),
        // With an autoscaler the pool is its to move: Celery refuses these the same way.
        "pool_grow" | "pool_shrink" if sh.autoscaler.is_some() => json!({"error": format!(
            "{} is not supported with autoscale. Adjust autoscale range instead.",
            req.method
        )}),
        "pool_grow" => {
            let n = count(arg("n"));
            sh.grow_pool(n);
            tracing::info!(n, size = sh.pool_size(), "pool grown by remote control");
            json!({"ok": "pool will grow"})
        }
        "pool_shrink" => {
            let took = sh.shrink_pool(count(arg("n")));
            tracing::info!(
                n = took,
                size = sh.pool_size(),
                "pool shrunk by remote control"
            );
            json!({"ok": "pool will shrink"})
        }
        "autoscale" => {
            let (max, min) = match (bound(arg("max")), bound(arg("min"))) {
                (Ok(max), Ok(min)) => (max, min),
                _ => return Some(json!({"error": "autoscale wants whole numbers: max, min"})),
            };
            match sh.autoscale_update(max, min) {
                None => json!({"error": "ValueError('Autoscale not enabled')"}),
                Some(Err(e)) => json!({"error": e.to_string()}),
                Some(Ok(r)) => {
                    tracing::info!(
                        max = r.max,
                        min = r.min,
                        "autoscale range set by remote control"
                    );
                    json!({"ok": format!("autoscale now max={} min={}", r.max, r.min)})
                }
            }
        }
        // `terminate` is `celery control terminate SIGNAL ID…`: a revoke with terminate.
        "revoke" | "terminate" => {
            let ids: Vec<&str> = match arg("task_id") {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => return Some(json!({"error": "revoke needs a task_id"})),
            };
            let terminate = req.method == "terminate"
                || arg("terminate").and_then(Value::as_bool).unwrap_or(false);
            for id in &ids {
                sh.revoked.add(id);
                if terminate && sh.inventory.terminate(id) {
                    tracing::info!("Terminating {id} (revoked)");
                }
            }
            tracing::info!(terminate, "Tasks flagged as revoked: {}", ids.join(", "));
            let set: Vec<String> = ids.iter().map(|i| py_str_repr(i)).collect();
            json!({"ok": format!("tasks {{{}}} flagged as revoked", set.join(", "))})
        }
        // Celery 5.3's stamping: `headers` is {header: value or list}, or the CLI's ["k=v", …].
        "revoke_by_stamped_headers" => {
            let Some(headers) = stamped_headers(arg("headers")) else {
                return Some(json!({"error": "revoke_by_stamped_headers needs headers"}));
            };
            for (h, v) in &headers {
                sh.revoked_stamps.add(h, v);
            }
            let shown = py_repr(&Value::Object(headers.clone()));
            tracing::info!("Tasks with stamped headers {shown} flagged as revoked");
            if !arg("terminate").and_then(Value::as_bool).unwrap_or(false) {
                return Some(
                    json!({"ok": format!("headers {shown} flagged as revoked, but not terminated")}),
                );
            }
            let hit = sh.inventory.terminate_stamped(&headers);
            if hit.is_empty() {
                return Some(json!({"ok": format!("headers {shown} were not terminated")}));
            }
            json!({"ok": format!("headers {} revoked", py_set_mapping(&hit))})
        }
        "query_task" => {
            let ids: Vec<&str> = match arg("ids") {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                Some(Value::String(s)) => vec![s.as_str()],
                _ => Vec::new(),
            };
            sh.inventory.query(&ids)
        }
        "report" => json!({"ok": report(sh)}),
        "enable_events" => {
            if sh.events.set_enabled(true) {
                tracing::info!("Events of group {{task}} enabled by remote.");
            }
            json!({"ok": "task events enabled"})
        }
        "disable_events" => {
            if sh.events.set_enabled(false) {
                tracing::info!("Events of group {{task}} disabled by remote.");
            }
            json!({"ok": "task events disabled"})
        }
        // Flower's keep-alive broadcast; the heartbeat events go on their own clock.
        "heartbeat" => return None,
        "shutdown" => {
            tracing::warn!("worker: Warm shutdown requested by remote control");
            shutdown.cancel();
            return None;
        }
        // Mingle: a starting worker asks for our revoked set and clock, and brings its own.
        "hello" => {
            if arg("from_node").and_then(Value::as_str) == Some(o.hostname.as_str()) {
                return None;
            }
            merge_revoked(sh, arg("revoked"));
            json!({"revoked": sh.revoked.with_times(), "clock": sh.events.clock()})
        }
        other => json!({"error": format!("No such method: {other}")}),
    })
}

/// A queue name a control request may add: a Redis key of printable characters, bounded.
fn queue_name_ok(q: &str) -> bool {
    !q.is_empty() && q.len() <= 200 && !q.chars().any(char::is_control)
}

/// The `n` of pool_grow / pool_shrink: Celery's default 1, at most 1,024 a request (a typo must
/// not ask for a million slots).
fn count(v: Option<&Value>) -> usize {
    v.and_then(Value::as_u64).unwrap_or(1).clamp(0, 1024) as usize
}

/// An `autoscale` bound: absent or null leaves it as it is; a number, or the digits
/// `celery control autoscale 10 3` may send as text. Anything else is refused, not guessed.
fn bound(v: Option<&Value>) -> Result<Option<usize>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| Some(n.min(usize::MAX as u64) as usize))
            .ok_or(()),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

/// How long mingle waits for other workers' answers: Celery's `mingle` waits 1 s too.
const MINGLE_WAIT: Duration = Duration::from_secs(1);

/// Mingle, as a starting Celery worker does: `hello` to every node, and their revoked sets
/// merged into ours (and their clocks into ours), so a revoke outlives the restart of the worker
/// that heard it. Silence is fine ("mingle: all alone").
pub async fn mingle(sh: &Shared, conn: &RedisConn) {
    let rk = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "method": "hello",
        "arguments": {"from_node": sh.opts.hostname, "revoked": sh.revoked.with_times()},
        "destination": null, "pattern": null, "matcher": null,
        "ticket": uuid::Uuid::new_v4().to_string(),
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": rk},
    });
    let envelope = crate::celery::message::transient_envelope(
        &body,
        json!({"clock": sh.events.tick(), "expires": unix_now() + MINGLE_WAIT.as_secs_f64()}),
        "celery.pidbox",
        "",
    );
    let channel = format!("/{}.celery.pidbox", conn.db());
    if let Err(e) = conn
        .query::<i64>(redis::cmd("PUBLISH").arg(&channel).arg(envelope))
        .await
    {
        tracing::warn!("mingle: cannot ask the other nodes: {e}");
        return;
    }
    let key = format!("{rk}.reply.celery.pidbox");
    let deadline = tokio::time::Instant::now() + MINGLE_WAIT;
    let mut nodes = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let r: Result<Option<(String, Vec<u8>)>, _> = conn
            .query(
                redis::cmd("BRPOP")
                    .arg(&key)
                    .arg(left.as_secs_f64().max(0.01)),
            )
            .await;
        let Ok(Some((_, raw))) = r else { break };
        // A reply is an envelope like a request: the same reader, without the addressing.
        let Some(reply) = reply_body(&raw) else {
            continue;
        };
        for (node, answer) in reply.iter().filter(|(n, _)| **n != sh.opts.hostname) {
            merge_revoked(sh, answer.get("revoked"));
            if let Some(c) = answer.get("clock").and_then(Value::as_u64) {
                sh.events.adjust(c);
            }
            nodes.push(node.clone());
        }
    }
    let _ = conn.query::<i64>(redis::cmd("DEL").arg(&key)).await;
    if nodes.is_empty() {
        tracing::info!("mingle: all alone");
    } else {
        tracing::info!(nodes = ?nodes, revoked = sh.revoked.ids().len(), "mingle: sync with {} nodes", nodes.len());
    }
}

/// The `{hostname: answer}` body of a control reply envelope.
fn reply_body(raw: &[u8]) -> Option<serde_json::Map<String, Value>> {
    let env: Value = serde_json::from_slice(raw).ok()?;
    let b = env.get("body")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// `revoke_by_stamped_headers`' `headers`: a non-empty dict, or Celery's CLI list of `key=value`
/// (split as Celery splits them: the text between the first and a second `=`).
fn stamped_headers(v: Option<&Value>) -> Option<serde_json::Map<String, Value>> {
    let m: serde_json::Map<String, Value> = match v? {
        Value::Object(m) => m.clone(),
        Value::Array(a) => a
            .iter()
            .map(|h| {
                let mut parts = h.as_str()?.split('=');
                let (k, v) = (parts.next()?, parts.next()?);
                Some((k.to_string(), Value::String(v.to_string())))
            })
            .collect::<Option<_>>()?,
        _ => return None,
    };
    (!m.is_empty() && m.keys().all(|k| !k.is_empty())).then_some(m)
}

/// Celery's reply shows the stamps that stopped a task as its `defaultdict(set)`.
fn py_set_mapping(hit: &[(String, Value)]) -> String {
    let mut by: Vec<(&String, Vec<String>)> = Vec::new();
    for (h, v) in hit {
        match by.iter_mut().find(|(k, _)| *k == h) {
            Some((_, vs)) => vs.push(py_repr(v)),
            None => by.push((h, vec![py_repr(v)])),
        }
    }
    let body: Vec<String> = by
        .iter()
        .map(|(h, vs)| format!("{}: {{{}}}", py_str_repr(h), vs.join(", ")))
        .collect();
    format!("defaultdict(<class 'set'>, {{{}}})", body.join(", "))
}

/// Revoked ids another worker handed over (a dict of id → time, or a list of ids).
fn merge_revoked(sh: &Shared, v: Option<&Value>) {
    match v {
        Some(Value::Object(m)) => m.keys().for_each(|id| sh.revoked.add(id)),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .for_each(|id| sh.revoked.add(id)),
        _ => {}
    }
}

/// kombu's description of a consumed queue, for `active_queues`.
fn queue_info(q: &str) -> Value {
    json!({
        "name": q,
        "exchange": {"name": q, "type": "direct", "arguments": null, "durable": true,
                     "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": q,
        "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
        "alias": null, "bindings": [], "no_declare": null, "expires": null,
        "message_ttl": null, "max_length": null, "max_length_bytes": null, "max_priority": null,
    })
}

fn stats(sh: &Shared, started: Instant) -> Value {
    let o = &sh.opts;
    let broker = url::Url::parse(o.broker_url.expose().split(';').next().unwrap_or("")).ok();
    let mut v = json!({
        "total": sh.inventory.totals(),
        "pid": std::process::id(),
        "clock": sh.events.clock().to_string(),
        "uptime": started.elapsed().as_secs(),
        "pool": {
            // Tasks run as tokio tasks in this one process: its pid is the pool's only process.
            "implementation": "orbit_worker:tokio",
            "max-concurrency": sh.pool_size(),
            "processes": [std::process::id()],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, 0],
        },
        "broker": {
            "hostname": broker.as_ref().and_then(|u| u.host_str().map(str::to_string)),
            "userid": broker.as_ref().map(|u| u.username()).filter(|u| !u.is_empty()),
            "virtual_host": sh.broker.ops.db().to_string(),
            "port": broker.as_ref().and_then(|u| u.port()),
            "insist": false,
            "ssl": broker.as_ref().is_some_and(|u| u.scheme() == "rediss"),
            "transport": if crate::redis_conn::is_sentinel_url(o.broker_url.expose()) { "sentinel" } else { "redis" },
            "connect_timeout": 4,
            "transport_options": {"visibility_timeout": o.visibility_timeout.as_secs_f64()},
            "heartbeat": 120.0,
            "failover_strategy": "round-robin",
            "alternates": [],
        },
        "prefetch_count": sh.prefetch_count.load(std::sync::atomic::Ordering::Relaxed),
        "rusage": rusage(),
    });
    // Celery's autoscaler bootstep adds its section only when it runs.
    if let (Some(a), Some(m)) = (sh.autoscaler_info(), v.as_object_mut()) {
        m.insert("autoscaler".into(), a);
    }
    v
}

/// getrusage(RUSAGE_SELF), in the fields and units Python's `resource` gives.
fn rusage() -> Value {
    // SAFETY: getrusage only writes the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } != 0 {
        return json!({});
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    json!({
        "utime": secs(r.ru_utime), "stime": secs(r.ru_stime), "maxrss": r.ru_maxrss,
        "ixrss": r.ru_ixrss, "idrss": r.ru_idrss, "isrss": r.ru_isrss,
        "minflt": r.ru_minflt, "majflt": r.ru_majflt, "nswap": r.ru_nswap,
        "inblock": r.ru_inblock, "oublock": r.ru_oublock, "msgsnd": r.ru_msgsnd,
        "msgrcv": r.ru_msgrcv, "nsignals": r.ru_nsignals, "nvcsw": r.ru_nvcsw,
        "nivcsw": r.ru_nivcsw,
    })
}

/// `inspect report`: what this worker is, in the shape of Celery's bug report.
fn report(sh: &Shared) -> String {
    let o = &sh.opts;
    format!(
        "\nsoftware -> orbit-worker:{} (Celery protocol 2, kombu Redis transport)\n\
         platform -> system:{} arch:{}\n\
         settings -> transport:redis results:{}\n\n\
         broker_url: {:?}\nresult_backend: {:?}\ntask_acks_late: True\n\
         result_expires: {}\nworker_prefetch_multiplier: {}\nworker_concurrency: {}\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        redact_url(o.backend_url.expose()),
        redact_url(o.broker_url.expose()),
        redact_url(o.backend_url.expose()),
        o.result_expires.as_secs(),
        o.prefetch_multiplier,
        sh.pool_size(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(body: Value, headers: Value) -> Vec<u8> {
        json!({
            "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
            "headers": headers,
            "properties": {"body_encoding": "base64"},
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn stamped_headers_read_as_celery_reads_them() {
        let dict = json!({"mtask_id": ["a", "b"]});
        assert_eq!(stamped_headers(Some(&dict)), dict.as_object().cloned());
        // The CLI's `key=value` words: the text between the first and a second `=`.
        assert_eq!(
            stamped_headers(Some(&json!(["k=v", "x=1=2"]))),
            json!({"k": "v", "x": "1"}).as_object().cloned()
        );
        for bad in [
            json!([]),
            json!({}),
            json!(["novalue"]),
            json!([7]),
            json!("k=v"),
            json!({"": 1}),
        ] {
            assert_eq!(stamped_headers(Some(&bad)), None, "{bad}");
        }
        assert_eq!(stamped_headers(None), None);
        let hit = vec![
            ("batch".to_string(), json!("b1")),
            ("id".to_string(), json!(3)),
            ("batch".to_string(), json!("b2")),
        ];
        assert_eq!(
            py_set_mapping(&hit),
            "defaultdict(<class 'set'>, {'batch': {'b1', 'b2'}, 'id': {3}})"
        );
    }

    #[test]
    fn requests_are_read_and_refused_as_kombu_addresses_them() {
        let ping = json!({"method": "ping", "arguments": {}, "destination": null, "ticket": "t1",
                          "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "rk"}});
        let r = read(
            &envelope(ping.clone(), json!({"clock": 7, "expires": 200.0})),
            "w1",
            100.0,
        )
        .unwrap();
        assert_eq!(
            r,
            Request {
                method: "ping".into(),
                arguments: Default::default(),
                ticket: Some("t1".into()),
                reply_to: Some("rk".into()),
                clock: Some(7),
            }
        );
        let with = |k: &str, v: Value| {
            let mut b = ping.clone();
            b[k] = v;
            envelope(b, json!({}))
        };
        let kind = |r: Result<Request, Skip>| match r {
            Ok(_) => "ok",
            Err(Skip::NotForUs) => "not for us",
            Err(Skip::Expired) => "expired",
            Err(Skip::Malformed(_)) => "malformed",
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with("destination", json!(["w1", "w2"])), "ok"),
            (with("destination", json!(["w2"])), "not for us"),
            (with("pattern", json!("w*")), "ok"),
            (with("pattern", json!("x?")), "not for us"),
            (envelope(ping.clone(), json!({"expires": 99.0})), "expired"),
            (with("arguments", json!([1])), "malformed"),
            (with("destination", json!("w1")), "malformed"),
            (with("method", json!(3)), "malformed"),
            (b"not json".to_vec(), "malformed"),
            (
                br#"{"body": "!!", "properties": {"body_encoding": "base64"}}"#.to_vec(),
                "malformed",
            ),
            (br#"{"properties": {}}"#.to_vec(), "malformed"),
            (br#"[1]"#.to_vec(), "malformed"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                kind(read(&raw, "w1", 100.0)),
                want,
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
        // A broadcast (revoke, heartbeat) has no reply_to and is not answered.
        let mut b = ping.clone();
        b.as_object_mut().unwrap().remove("reply_to");
        assert_eq!(
            read(&envelope(b, json!({})), "w1", 0.0).unwrap().reply_to,
            None
        );
    }

    #[test]
    fn glob_is_fnmatch() {
        for (p, n, want) in [
            ("*", "celery@h", true),
            ("celery@*", "celery@h", true),
            ("c?lery@h", "celery@h", true),
            ("*@x", "celery@h", false),
            ("", "a", false),
            ("a*b*c", "aXbYc", true),
            ("*?", "", false),
            ("**", "", true),
            ("a*", "b", false),
        ] {
            assert_eq!(glob(p, n), want, "{p} {n}");
        }
        // A hostile pattern costs its length times the name's, not exponential time.
        let evil = "*a".repeat(5000) + "b";
        assert!(!glob(&evil, &"a".repeat(200)));
    }
}
