//! Celery events (`-E`, or switched on and off at run time by `enable_events` /
//! `disable_events`): `worker-online`, a `worker-heartbeat` every 2 s and `worker-offline`, and
//! each task's `task-received` → `task-started` → `task-succeeded` / `task-failed` /
//! `task-retried` / `task-rejected` / `task-revoked`, published the way Celery publishes them
//! (`../shared/docs/celery-wire.md` §6): kombu's JSON envelope on `/<db>.celeryev/<routing key>`,
//! task events batched as `task.multi` lists, every event stamped with the Lamport clock. Flower
//! and `celery events` read them unchanged.
//!
//! A task never waits on monitoring: events go through a bounded queue to one publisher task,
//! and an event that finds the queue full is dropped and counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::redis_conn::RedisConn;

/// Celery's heartbeat frequency; a monitor calls a worker gone after two missed beats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Task events per `task.multi` message at most: Celery's dispatcher buffer limit.
const TASK_BATCH: usize = 24;
/// Events waiting for the publisher. At 10 k tasks/s with four events a task this is about
/// 0.1 s of events: a Redis that stalls longer drops events (counted), never slows a task.
const EVENT_QUEUE: usize = 4096;
/// What this worker says it is, where Celery says `py-celery`.
const SW_IDENT: &str = "orbit-worker";

/// The worker's event dispatcher: shared by the fetch and task paths, drained by [`publisher`].
pub struct Events {
    enabled: AtomicBool,
    clock: AtomicU64,
    hostname: String,
    pid: u32,
    /// `/0.celeryev/`: kombu's fanout prefix for the broker's db, then the exchange.
    prefix: String,
    tx: mpsc::Sender<Value>,
    /// Tasks received since start: the heartbeat's `processed`, as Celery counts it.
    received: AtomicU64,
    dropped: AtomicU64,
    /// Set while PUBLISH fails: the failure is logged once, not once per batch.
    failing: AtomicBool,
}

impl Events {
    pub fn new(hostname: &str, db: i64, enabled: bool) -> (Arc<Events>, mpsc::Receiver<Value>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let events = Events {
            enabled: AtomicBool::new(enabled),
            clock: AtomicU64::new(0),
            hostname: hostname.to_string(),
            pid: std::process::id(),
            prefix: format!("/{db}.celeryev/"),
            tx,
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        };
        (Arc::new(events), rx)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// `enable_events` / `disable_events`. Returns whether this changed anything.
    pub fn set_enabled(&self, on: bool) -> bool {
        self.enabled.swap(on, Ordering::Relaxed) != on
    }

    /// The Lamport clock, one tick forward (each event sent, each control reply).
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Lamport's rule on a clock read from another node: ours moves past it.
    pub fn adjust(&self, other: u64) {
        self.clock.fetch_max(other, Ordering::Relaxed);
        self.tick();
    }

    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn processed(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// A task event: `kind` is `task-received`, …; `fields` makes its own fields (`uuid`, …),
    /// only when events are on, so a worker without `-E` spends nothing on them.
    pub fn task(&self, kind: &str, fields: impl FnOnce() -> Value) {
        if kind == "task-received" {
            self.received.fetch_add(1, Ordering::Relaxed);
        }
        if !self.enabled() {
            return;
        }
        let event = self.stamp(kind, fields());
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The common fields, in Celery's order: hostname, utcoffset, pid, clock, the event's own,
    /// then timestamp and type.
    fn stamp(&self, kind: &str, fields: Value) -> Value {
        let mut m = Map::new();
        m.insert("hostname".into(), self.hostname.clone().into());
        m.insert("utcoffset".into(), json!(utcoffset()));
        m.insert("pid".into(), self.pid.into());
        m.insert("clock".into(), self.tick().into());
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        m.insert("timestamp".into(), json!(unix_now()));
        m.insert("type".into(), kind.into());
        Value::Object(m)
    }

    /// `worker-online`, `worker-heartbeat` or `worker-offline`.
    fn worker_event(&self, kind: &str, active: usize) -> Value {
        self.stamp(
            kind,
            json!({
                "freq": HEARTBEAT_EVERY.as_secs_f64(),
                "active": active,
                "processed": self.processed(),
                "loadavg": loadavg(),
                "sw_ident": SW_IDENT,
                "sw_ver": env!("CARGO_PKG_VERSION"),
                "sw_sys": std::env::consts::OS.replace("linux", "Linux"),
            }),
        )
    }

    /// kombu's envelope for one event message: JSON, base64 body, transient delivery.
    fn envelope(&self, routing_key: &str, body: &Value) -> String {
        crate::celery::message::transient_envelope(
            body,
            json!({"hostname": self.hostname}),
            "celeryev",
            routing_key,
        )
    }

    /// `worker-heartbeat` → `worker.heartbeat`: the routing key and the channel.
    fn channel(&self, routing_key: &str) -> String {
        format!("{}{routing_key}", self.prefix)
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Hours west of UTC, as Celery's `utcoffset()` gives them.
fn utcoffset() -> f64 {
    use chrono::Offset;
    let east = chrono::Local::now().offset().fix().local_minus_utc();
    f64::from(-east / 3600)
}

/// The 1, 5 and 15 minute load averages, to two places as Celery rounds them.
pub(crate) fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .take(3)
                .filter_map(|x| x.parse::<f64>().ok())
                .map(|x| (x * 100.0).round() / 100.0)
                .collect()
        })
        .filter(|v: &Vec<f64>| v.len() == 3)
        .unwrap_or_else(|| vec![0.0, 0.0, 0.0])
}

/// Publishes what the dispatcher queues: task events batched (whatever is waiting, up to
/// [`TASK_BATCH`], so one event per message when it is quiet), a heartbeat every 2 s while
/// events are on, `worker-online` first and `worker-offline` last. Runs until `stop`, then
/// sends what is still queued.
pub async fn publisher(
    events: Arc<Events>,
    conn: Arc<RedisConn>,
    mut rx: mpsc::Receiver<Value>,
    active: impl Fn() -> usize,
    stop: CancellationToken,
) {
    let mut was_on = false;
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            first = rx.recv() => {
                let Some(first) = first else { break };
                let mut batch = vec![first];
                while batch.len() < TASK_BATCH {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                publish(&events, &conn, "task.multi", &Value::Array(batch)).await;
            }
            _ = beat.tick() => {
                let on = events.enabled();
                if on {
                    // Switched on at run time: say we are here first, as Celery does.
                    let kind = if was_on { "worker-heartbeat" } else { "worker-online" };
                    let e = events.worker_event(kind, active());
                    publish(&events, &conn, &kind.replace('-', "."), &e).await;
                }
                was_on = on;
            }
            _ = stop.cancelled() => break,
        }
    }
    let mut batch = Vec::new();
    while let Ok(e) = rx.try_recv() {
        batch.push(e);
        if batch.len() == TASK_BATCH {
            publish(
                &events,
                &conn,
                "task.multi",
                &Value::Array(std::mem::take(&mut batch)),
            )
            .await;
        }
    }
    if !batch.is_empty() {
        publish(&events, &conn, "task.multi", &Value::Array(batch)).await;
    }
    if was_on || events.enabled() {
        let e = events.worker_event("worker-offline", active());
        publish(&events, &conn, "worker.offline", &e).await;
    }
}

/// One PUBLISH. On a failure the events are lost (counted with the dropped ones): monitoring is
/// best effort, as in Celery, and must not hold the worker. The first failure of a run of them
/// is logged, and the recovery; a dead Redis at 10 k tasks/s does not write a line per batch.
async fn publish(events: &Events, conn: &RedisConn, routing_key: &str, body: &Value) {
    let channel = events.channel(routing_key);
    let envelope = events.envelope(routing_key, body);
    let r = conn
        .query::<i64>(redis::cmd("PUBLISH").arg(&channel).arg(envelope))
        .await;
    match r {
        Err(e) => {
            let n = body.as_array().map_or(1, Vec::len) as u64;
            events.dropped.fetch_add(n, Ordering::Relaxed);
            if !events.failing.swap(true, Ordering::Relaxed) {
                tracing::warn!(%channel, "cannot send events: {e}; dropping them until Redis answers");
            }
        }
        Ok(_) => {
            if events.failing.swap(false, Ordering::Relaxed) {
                tracing::info!(dropped = events.dropped(), "events sent again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_events_carry_celerys_fields_in_its_order_and_a_rising_clock() {
        let (ev, mut rx) = Events::new("w1@h", 3, true);
        ev.task("task-received", || json!({"uuid": "a", "name": "t"}));
        ev.task("task-started", || json!({"uuid": "a"}));
        let one = rx.try_recv().unwrap();
        let two = rx.try_recv().unwrap();
        let keys: Vec<&str> = one
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "hostname",
                "utcoffset",
                "pid",
                "clock",
                "uuid",
                "name",
                "timestamp",
                "type"
            ]
        );
        assert_eq!(one["type"], "task-received");
        assert!(two["clock"].as_u64() > one["clock"].as_u64());
        assert_eq!(ev.channel("task.multi"), "/3.celeryev/task.multi");
        assert_eq!(ev.processed(), 1);
        // Off: nothing is queued, but tasks are still counted for the heartbeat.
        assert!(ev.set_enabled(false));
        ev.task("task-received", || json!({"uuid": "b"}));
        assert!(rx.try_recv().is_err());
        assert_eq!(ev.processed(), 2);
        // Lamport: a clock read from elsewhere moves ours past it.
        ev.adjust(100);
        assert!(ev.clock() > 100);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (ev, _rx) = Events::new("w", 0, true);
        for i in 0..EVENT_QUEUE + 5 {
            ev.task("task-started", || json!({"uuid": i.to_string()}));
        }
        assert_eq!(ev.dropped(), 5);
    }

    #[test]
    fn the_envelope_is_kombus() {
        let (ev, _rx) = Events::new("w1@vm", 0, true);
        let e: Value = serde_json::from_str(&ev.envelope("task.multi", &json!([1]))).unwrap();
        assert_eq!(e["properties"]["delivery_info"]["exchange"], "celeryev");
        assert_eq!(e["properties"]["delivery_mode"], 1);
        assert_eq!(e["headers"]["hostname"], "w1@vm");
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD
            .decode(e["body"].as_str().unwrap())
            .unwrap();
        assert_eq!(body, b"[1]");
    }
}
