//! `notifications.send_push(user_id, payload)`: Web Push (VAPID, aes128gcm) to every
//! subscription of the user, each answer handled on its own: gone subscriptions are deleted,
//! rate limits and server errors retried, bad requests given up. One bad subscription never
//! blocks the others, and a retry resends only to those not yet served.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::json;
use web_push::{
    ContentEncoding, PartialVapidSignatureBuilder, SubscriptionInfo, Urgency,
    VapidSignatureBuilder, WebPushMessageBuilder,
};

use orbit_pipeline::http_call::{classify_status, redact, retry_hint, StatusClass};

use super::{bind, Raises, RetryPolicy, TaskContext, TaskDef, TaskResult, TimeLimits};
use crate::config::PushConfig;
use crate::db::PushSubscription;

pub const NAME: &str = "notifications.send_push";
const PARAMS: &[&str] = &["user_id", "payload"];
/// The largest plaintext a push message may carry (RFC 8291 over a 4096-byte record).
pub const MAX_PAYLOAD_BYTES: usize = 3052;
/// How long the task remembers which subscriptions a call already served, for its retries.
const SERVED_TTL_SECS: u64 = 86_400;

pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_secs(5),
        max_delay: Duration::from_secs(120),
    },
    limits: TimeLimits {
        soft: Duration::from_secs(60),
        hard: Duration::from_secs(90),
    },
    block: super::Block::Push,
    run: |ctx| Box::pin(run(ctx)),
};

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Message,
    GroupInvite,
    ChannelInvite,
    BlinkShare,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::GroupInvite => "group_invite",
            Kind::ChannelInvite => "channel_invite",
            Kind::BlinkShare => "blink_share",
        }
    }
    /// A chat message is stale within a day and wanted now; an invite keeps for a week.
    fn ttl_and_urgency(self) -> (u32, Urgency) {
        match self {
            Kind::Message => (86_400, Urgency::High),
            Kind::GroupInvite | Kind::ChannelInvite => (7 * 86_400, Urgency::Normal),
            Kind::BlinkShare => (3 * 86_400, Urgency::Normal),
        }
    }
}

#[derive(Deserialize)]
struct Payload {
    kind: Kind,
    title: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    tag: String,
}

#[derive(Deserialize)]
struct Args {
    user_id: i64,
    payload: Payload,
}

/// The JSON the service worker receives, with the body cut (on a character boundary, marked
/// with an ellipsis) until it fits the push limit.
fn encode_payload(p: &Payload) -> Vec<u8> {
    let make = |body: &str| {
        serde_json::to_vec(
            &json!({"kind": p.kind.as_str(), "title": p.title, "body": body,
                                   "url": p.url, "tag": p.tag}),
        )
        .unwrap_or_default()
    };
    let full = make(&p.body);
    if full.len() <= MAX_PAYLOAD_BYTES {
        return full;
    }
    let mut chars: Vec<char> = p.body.chars().collect();
    // Shrink by the overshoot (JSON escapes may count more than one byte per char), then step.
    let over = full.len() - MAX_PAYLOAD_BYTES;
    chars.truncate(chars.len().saturating_sub(over));
    loop {
        let body: String = chars.iter().collect::<String>() + "…";
        let out = make(&body);
        if out.len() <= MAX_PAYLOAD_BYTES || chars.is_empty() {
            return out;
        }
        chars.truncate(chars.len().saturating_sub(16.max(chars.len() / 20)));
    }
}

/// A topic lets a newer push replace an older undelivered one: at most 32 base64url characters.
fn topic(p: &Payload) -> String {
    let t: String = p
        .tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    if t.is_empty() {
        p.kind.as_str().replace('_', "-")
    } else {
        t
    }
}

/// One subscription's result.
enum Delivery {
    Sent,
    /// 404/410: the browser unsubscribed; the row is deleted.
    Gone,
    /// Worth another try, after the service's hint if it gave one.
    Retry(String, Option<Duration>),
    /// Will never work as is; logged.
    GiveUp(String),
}

pub fn vapid_key(pem_or_b64: &str) -> Result<PartialVapidSignatureBuilder, String> {
    let k = pem_or_b64.trim();
    let r = if k.starts_with("-----BEGIN") {
        VapidSignatureBuilder::from_pem_no_sub(k.as_bytes())
    } else {
        VapidSignatureBuilder::from_base64_no_sub(k)
    };
    r.map_err(|e| format!("not a P-256 private key (PEM or base64url): {e}"))
}

async fn deliver(
    ctx: &TaskContext,
    cfg: &PushConfig,
    vapid: &PartialVapidSignatureBuilder,
    sub: &PushSubscription,
    payload: &[u8],
    kind: Kind,
    topic: &str,
) -> Delivery {
    let info = SubscriptionInfo::new(
        sub.endpoint.as_str(),
        sub.p256dh.as_str(),
        sub.auth.as_str(),
    );
    let mut sig = vapid.clone().add_sub_info(&info);
    sig.add_claim("sub", cfg.vapid_subject.as_str());
    let sig = match sig.build() {
        Ok(s) => s,
        Err(e) => return Delivery::GiveUp(format!("VAPID signature: {e}")),
    };
    let mut b = WebPushMessageBuilder::new(&info);
    b.set_payload(ContentEncoding::Aes128Gcm, payload);
    b.set_vapid_signature(sig);
    let (ttl, urgency) = kind.ttl_and_urgency();
    b.set_ttl(ttl);
    b.set_urgency(urgency);
    b.set_topic(topic.to_string());
    let msg = match b.build() {
        // Keys a browser never made: the row is corrupt and will never work.
        Err(web_push::WebPushError::InvalidCryptoKeys) => return Delivery::Gone,
        Err(e) => return Delivery::GiveUp(format!("cannot build the message: {e}")),
        Ok(m) => m,
    };
    // The endpoint is user data: a browser's push service is on the internet, so one inside the
    // worker's network is refused (never retried) unless the policy is lifted.
    let allow_private = ctx.services.settings.http.allow_private_urls;
    let endpoint = match reqwest::Url::parse(&msg.endpoint.to_string()) {
        Ok(u) => u,
        Err(e) => return Delivery::GiveUp(format!("the endpoint is not a URL: {e}")),
    };
    if let Err(e) = crate::outbound::check_url(&endpoint, allow_private) {
        return Delivery::GiveUp(format!("endpoint refused: {e}"));
    }
    let mut req = ctx
        .services
        .user_urls
        .post(endpoint)
        .timeout(cfg.timeout)
        .header("TTL", msg.ttl.to_string());
    if let Some(u) = msg.urgency {
        req = req.header("Urgency", u.to_string());
    }
    if let Some(t) = &msg.topic {
        req = req.header("Topic", t.as_str());
    }
    if let Some(p) = msg.payload {
        req = req
            .header("Content-Encoding", p.content_encoding.to_str())
            .header("Content-Type", "application/octet-stream");
        for (k, v) in p.crypto_headers {
            req = req.header(k, v);
        }
        req = req.body(p.content);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            if let Some(refused) = crate::outbound::refusal(&e) {
                return Delivery::GiveUp(format!("endpoint refused: {refused}"));
            }
            return Delivery::Retry(format!("push service unreachable: {}", redact(&e)), None);
        }
    };
    let status = resp.status().as_u16();
    let hint = retry_hint(resp.headers());
    let body: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    // Push services speak plain HTTP: the shared status table, plus what 404/410/413 mean here.
    match (status, classify_status(status, "")) {
        (_, StatusClass::Success) => Delivery::Sent,
        (404 | 410, _) => Delivery::Gone,
        (413, _) => Delivery::GiveUp(format!(
            "payload too large for the push service (413) {body}"
        )),
        (429, _) => Delivery::Retry(format!("push service rate limit (429) {body}"), hint),
        (_, StatusClass::Retryable) => {
            Delivery::Retry(format!("push service error {status} {body}"), hint)
        }
        _ => Delivery::GiveUp(format!("push service refused it ({status}) {body}")),
    }
}

fn served_key(task_id: &str) -> String {
    format!("orbit:push:served:{task_id}")
}

const RAISES: Raises = Raises {
    module: "notifications.errors",
    task: NAME,
};

async fn run(ctx: TaskContext) -> TaskResult {
    let args: Args = bind(&ctx.call, PARAMS)?;
    let sv = ctx.services.clone();
    let Some(db) = &sv.db else {
        return Err(RAISES.permanent(
            "ConfigError",
            "DATABASE_URL is not set: push subscriptions live there",
        ));
    };
    let cfg: &PushConfig = ctx.own_block(RAISES)?;
    let Some(key) = &cfg.vapid_private_key else {
        return Err(RAISES.permanent("ConfigError", "VAPID_PRIVATE_KEY is not set"));
    };
    let vapid = vapid_key(key.expose())
        .map_err(|e| RAISES.permanent("ConfigError", format!("VAPID_PRIVATE_KEY: {e}")))?;
    let subs = db
        .push_subscriptions(args.user_id)
        .await
        .map_err(|e| RAISES.error("DatabaseError", &e))?;
    // What earlier attempts of this call did, per subscription: those are not sent again, and
    // the final counts include them.
    let served = served_key(&ctx.call.id);
    let mut outcomes = served_before(&ctx, &served).await;
    let payload = encode_payload(&args.payload);
    let topic = topic(&args.payload);
    let todo: Vec<&PushSubscription> = subs
        .iter()
        .filter(|s| !outcomes.contains_key(&s.id))
        .collect();
    let results = futures::future::join_all(
        todo.iter()
            .map(|s| deliver(&ctx, cfg, &vapid, s, &payload, args.payload.kind, &topic)),
    )
    .await;
    let (new_outcomes, retry) = record_deliveries(&ctx, db, &todo, results).await;
    remember_served(&ctx, &served, &new_outcomes).await;
    outcomes.extend(new_outcomes);
    if !retry.is_empty() && !ctx.is_last_attempt() {
        let after = retry.iter().filter_map(|r| r.1).max();
        let why = retry
            .iter()
            .map(|r| r.0.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(RAISES.retry(
            "PushRetry",
            format!(
                "{} of {} subscriptions to retry: {why}",
                retry.len(),
                subs.len()
            ),
            after,
        ));
    }
    Ok(summary(args.user_id, &outcomes, payload.len()))
}

/// Per subscription, what earlier attempts of this call did.
async fn served_before(ctx: &TaskContext, key: &str) -> HashMap<i64, String> {
    match ctx.services.locks.conn().await {
        Ok(mut c) => c.hgetall(key).await.unwrap_or_default(),
        Err(_) => HashMap::new(),
    }
}

async fn remember_served(ctx: &TaskContext, key: &str, outcomes: &[(i64, String)]) {
    if outcomes.is_empty() {
        return;
    }
    if let Ok(mut c) = ctx.services.locks.conn().await {
        let _: Result<(), _> = redis::pipe()
            .hset_multiple(key, outcomes)
            .expire(key, SERVED_TTL_SECS as i64)
            .query_async(&mut c)
            .await;
    }
}

/// What each delivery means for its row (a gone subscription is deleted) and for the call: the
/// outcomes to remember, and the reasons (with hints) of those to retry.
async fn record_deliveries(
    ctx: &TaskContext,
    db: &crate::db::Db,
    todo: &[&PushSubscription],
    results: Vec<Delivery>,
) -> (Vec<(i64, String)>, Vec<(String, Option<Duration>)>) {
    let mut retry = Vec::new();
    let mut outcomes = Vec::new();
    for (sub, r) in todo.iter().zip(results) {
        let host = endpoint_host(&sub.endpoint);
        match r {
            Delivery::Sent => {
                outcomes.push((sub.id, "sent".into()));
                let _ = db.push_delivered(sub.id).await;
            }
            Delivery::Gone => {
                outcomes.push((sub.id, "removed".into()));
                tracing::info!(subscription = sub.id, host = %host, "push subscription gone: deleted");
                if let Err(e) = db.delete_push_subscription(sub.id).await {
                    tracing::warn!(error = %e, "cannot delete the push subscription");
                }
            }
            Delivery::GiveUp(why) => {
                tracing::warn!(subscription = sub.id, host = %host, reason = %why, "push not delivered: giving up on this subscription");
                outcomes.push((sub.id, format!("failed:{why}")));
            }
            Delivery::Retry(why, after) => {
                tracing::warn!(subscription = sub.id, host = %host, reason = %why, "push not delivered: will retry");
                if ctx.is_last_attempt() {
                    outcomes.push((sub.id, format!("failed:{why}")));
                }
                retry.push((why, after));
            }
        }
    }
    (outcomes, retry)
}

/// The task's result: counts over every attempt of this call, and each failure's reason.
fn summary(
    user_id: i64,
    outcomes: &HashMap<i64, String>,
    payload_bytes: usize,
) -> serde_json::Value {
    let count = |what: &str| outcomes.values().filter(|o| o.as_str() == what).count();
    let errors: Vec<serde_json::Value> = outcomes
        .iter()
        .filter_map(|(id, o)| {
            o.strip_prefix("failed:")
                .map(|w| json!({"subscription": id, "error": w}))
        })
        .collect();
    json!({
        "user_id": user_id,
        "sent": count("sent"),
        "removed": count("removed"),
        "failed": errors.len(),
        "errors": errors,
        "payload_bytes": payload_bytes,
    })
}

/// The push service's host, for logs: never the endpoint path, which identifies the browser.
fn endpoint_host(endpoint: &str) -> String {
    endpoint
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(body: String, tag: &str) -> Payload {
        Payload {
            kind: Kind::Message,
            title: "Ana".into(),
            body,
            url: "/messages/1".into(),
            tag: tag.into(),
        }
    }

    #[test]
    fn long_bodies_are_trimmed_to_the_push_limit() {
        let p = payload("ñ😀 word ".repeat(2000), "conv-1");
        let out = encode_payload(&p);
        assert!(out.len() <= MAX_PAYLOAD_BYTES, "{}", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["body"].as_str().unwrap().ends_with('…'));
        assert_eq!(v["title"], "Ana");
        let short = encode_payload(&payload("hi".into(), ""));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&short).unwrap()["body"],
            "hi"
        );
    }

    #[test]
    fn topics_are_base64url_and_short() {
        assert_eq!(topic(&payload(String::new(), "conv:42/ä")), "conv42");
        assert_eq!(topic(&payload(String::new(), "")), "message");
        assert_eq!(topic(&payload(String::new(), &"x".repeat(50))).len(), 32);
    }
}
