//! What this worker holds, by task id: each accepted task from its receipt to its settlement,
//! waiting for its ETA (scheduled), for a slot (reserved) or running (active), with what
//! `celery inspect active|reserved|scheduled|query_task` show of it, and the per-name counts
//! `inspect stats` reports. An entry leaves when its [`Held`] guard is dropped, whichever way
//! the task ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::tasks::TaskInfo;

/// Where a held task is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    /// Waiting for its ETA.
    Scheduled,
    /// Waiting for a concurrency slot.
    Reserved,
    Active,
}

struct Entry {
    /// Which hold this is: a retry's new message may be held under the same id before the old
    /// one's guard is dropped, and that drop must not take the new entry out.
    serial: u64,
    stage: Stage,
    /// `revoke(terminate=True)`: fired to stop the task where it runs.
    terminate: CancellationToken,
    /// What the running task tells of itself (`progress` in `inspect active`).
    info: TaskInfo,
    request: Value,
    eta: Option<String>,
    priority: u8,
    stamps: Vec<(String, Value)>,
}

#[derive(Default)]
pub struct Inventory {
    tasks: Mutex<HashMap<String, Entry>>,
    serial: std::sync::atomic::AtomicU64,
    /// Tasks accepted since start, by name: `stats`' `total`.
    totals: Mutex<HashMap<String, u64>>,
}

/// A task's place in the inventory; dropping it takes the task out.
pub struct Held {
    inv: Arc<Inventory>,
    id: String,
    serial: u64,
}

impl Held {
    /// Fires when the task is revoked with `terminate` while it runs; and the slot the task
    /// tells of itself in.
    pub fn handles(&self) -> (CancellationToken, TaskInfo) {
        self.inv
            .tasks
            .lock()
            .ok()
            .and_then(|t| {
                t.get(&self.id)
                    .filter(|e| e.serial == self.serial)
                    .map(|e| (e.terminate.clone(), e.info.clone()))
            })
            .unwrap_or_default()
    }

    pub fn set(&self, stage: Stage) {
        if let Ok(mut t) = self.inv.tasks.lock() {
            if let Some(e) = t.get_mut(&self.id).filter(|e| e.serial == self.serial) {
                e.stage = stage;
                if stage == Stage::Active {
                    e.request["time_start"] = json!(super::events::unix_now());
                }
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut t) = self.inv.tasks.lock() {
            if t.get(&self.id).is_some_and(|e| e.serial == self.serial) {
                t.remove(&self.id);
            }
        }
    }
}

/// What `inspect active` shows of one task, in Celery's fields.
pub struct Request<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub args: &'a [Value],
    pub kwargs: &'a serde_json::Map<String, Value>,
    pub hostname: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub priority: u8,
    pub redelivered: bool,
    pub eta: Option<String>,
    /// The message's stamps, for `revoke_by_stamped_headers` with `terminate`.
    pub stamps: &'a [(String, Value)],
}

impl Inventory {
    /// Takes a task in (reserved until told otherwise).
    pub fn hold(self: &Arc<Self>, r: Request) -> Held {
        let request = json!({
            "id": r.id,
            "name": r.name,
            "args": r.args,
            "kwargs": r.kwargs,
            "type": r.name,
            "hostname": r.hostname,
            "time_start": null,
            // acks_late: a held message is acknowledged only when it is settled.
            "acknowledged": false,
            "delivery_info": {
                "exchange": r.exchange,
                "routing_key": r.routing_key,
                "priority": r.priority,
                "redelivered": r.redelivered,
            },
            "worker_pid": std::process::id(),
        });
        if let Ok(mut t) = self.totals.lock() {
            *t.entry(r.name.to_string()).or_default() += 1;
        }
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(
                r.id.to_string(),
                Entry {
                    serial,
                    stage: Stage::Reserved,
                    terminate: CancellationToken::new(),
                    info: TaskInfo::default(),
                    request,
                    eta: r.eta,
                    priority: r.priority,
                    stamps: r.stamps.to_vec(),
                },
            );
        }
        Held {
            inv: self.clone(),
            id: r.id.to_string(),
            serial,
        }
    }

    /// The requests at `stage`, oldest first by id order (Celery gives no order either).
    pub fn at(&self, stage: Stage) -> Vec<Value> {
        let Ok(t) = self.tasks.lock() else {
            return Vec::new();
        };
        let mut v: Vec<(&String, &Entry)> = t.iter().filter(|(_, e)| e.stage == stage).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter()
            .map(|(_, e)| match stage {
                // `inspect scheduled`: the request under its ETA and priority.
                Stage::Scheduled => {
                    json!({"eta": e.eta, "priority": e.priority, "request": e.request})
                }
                _ => match e.info.get() {
                    Some(progress) => {
                        let mut r = e.request.clone();
                        r["progress"] = progress;
                        r
                    }
                    None => e.request.clone(),
                },
            })
            .collect()
    }

    /// How many are held at each stage: (scheduled, reserved, active).
    pub fn counts(&self) -> (usize, usize, usize) {
        let Ok(t) = self.tasks.lock() else {
            return (0, 0, 0);
        };
        t.values().fold((0, 0, 0), |(s, r, a), e| match e.stage {
            Stage::Scheduled => (s + 1, r, a),
            Stage::Reserved => (s, r + 1, a),
            Stage::Active => (s, r, a + 1),
        })
    }

    /// `query_task`: `{id: [state, request]}` for the ids held here.
    pub fn query(&self, ids: &[&str]) -> Value {
        let Ok(t) = self.tasks.lock() else {
            return json!({});
        };
        let mut out = serde_json::Map::new();
        for id in ids {
            if let Some(e) = t.get(*id) {
                let state = match e.stage {
                    Stage::Scheduled => "scheduled",
                    Stage::Reserved => "reserved",
                    Stage::Active => "active",
                };
                out.insert(id.to_string(), json!([state, e.request]));
            }
        }
        Value::Object(out)
    }

    /// `revoke(terminate=True)`: stops the task if it is running here. Returns whether it was.
    pub fn terminate(&self, id: &str) -> bool {
        let Ok(t) = self.tasks.lock() else {
            return false;
        };
        match t.get(id) {
            Some(e) if e.stage == Stage::Active => {
                e.terminate.cancel();
                true
            }
            _ => false,
        }
    }

    /// `revoke_by_stamped_headers(terminate=True)`: stops every running task with a stamp that
    /// `given` names. Returns the stamps that stopped one.
    pub fn terminate_stamped(
        &self,
        given: &serde_json::Map<String, Value>,
    ) -> Vec<(String, Value)> {
        let Ok(t) = self.tasks.lock() else {
            return Vec::new();
        };
        let mut hit: Vec<(String, Value)> = Vec::new();
        for e in t.values().filter(|e| e.stage == Stage::Active) {
            let m = super::revoked::stamps_matching(given, &e.stamps);
            if !m.is_empty() {
                e.terminate.cancel();
            }
            for p in m {
                if !hit.contains(&p) {
                    hit.push(p);
                }
            }
        }
        hit
    }

    pub fn totals(&self) -> Value {
        self.totals
            .lock()
            .map(|t| json!(*t))
            .unwrap_or_else(|_| json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(id: &'a str, empty: &'a serde_json::Map<String, Value>) -> Request<'a> {
        Request {
            id,
            name: "t",
            args: &[],
            kwargs: empty,
            hostname: "w",
            exchange: "",
            routing_key: "celery",
            priority: 0,
            redelivered: false,
            eta: Some("2030-01-01T00:00:00+00:00".into()),
            stamps: &[],
        }
    }

    #[test]
    fn a_task_is_where_its_guard_says_until_the_guard_goes() {
        let inv = Arc::new(Inventory::default());
        let empty = serde_json::Map::new();
        let a = inv.hold(request("a", &empty));
        let b = inv.hold(request("b", &empty));
        b.set(Stage::Scheduled);
        assert_eq!(inv.at(Stage::Reserved).len(), 1);
        assert_eq!(inv.at(Stage::Scheduled)[0]["request"]["id"], "b");
        a.set(Stage::Active);
        assert!(inv.at(Stage::Active)[0]["time_start"].as_f64().unwrap() > 0.0);
        assert_eq!(
            inv.query(&["a", "zz"]),
            json!({"a": ["active", inv.at(Stage::Active)[0]]})
        );
        let (stop, info) = a.handles();
        info.set(json!({"percent": 5.0}));
        assert_eq!(inv.at(Stage::Active)[0]["progress"]["percent"], 5.0);
        assert!(!inv.terminate("b"), "b is not running");
        assert!(inv.terminate("a") && stop.is_cancelled());
        drop(a);
        drop(b);
        assert!(inv.at(Stage::Active).is_empty() && inv.at(Stage::Scheduled).is_empty());
        assert_eq!(inv.totals(), json!({"t": 2}));
        // The same id held again before the old guard goes: the old drop leaves the new entry.
        let old = inv.hold(request("r", &empty));
        let new = inv.hold(request("r", &empty));
        drop(old);
        assert_eq!(inv.at(Stage::Reserved).len(), 1);
        drop(new);
        assert!(inv.at(Stage::Reserved).is_empty());
    }
}
