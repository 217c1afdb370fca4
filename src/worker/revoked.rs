//! The task ids revoked by `revoke` broadcasts, kept as Celery keeps them (`REVOKES_MAX`,
//! `REVOKE_EXPIRES`): at most 50,000, each for 3 hours. A revoked task that comes up is discarded
//! REVOKED; `inspect revoked` lists the set, and mingle (`hello`) hands it to starting workers.
//! Stamps revoked by `revoke_by_stamped_headers` are kept the same way, under the same bounds
//! (Celery keeps them in an unbounded dict; a flood of them must not grow the worker without end).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Celery's `REVOKES_MAX`: a flood of revokes costs bounded memory.
const MAX_REVOKED: usize = 50_000;
/// Celery's `REVOKE_EXPIRES`: a revoke outlives any sane queueing delay.
const KEEP_FOR: Duration = Duration::from_secs(3 * 3600);

#[derive(Default)]
pub struct Revoked {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// id → when it was (last) revoked.
    at: HashMap<String, Instant>,
    /// Revokes in order, for expiry and the bound; an id revoked again appears twice, and only
    /// the entry matching `at` counts.
    order: VecDeque<(String, Instant)>,
}

impl Inner {
    fn prune(&mut self, now: Instant) {
        while let Some((id, t)) = self.order.front() {
            let stale = now.saturating_duration_since(*t) > KEEP_FOR;
            let over = self.at.len() > MAX_REVOKED;
            let superseded = self.at.get(id) != Some(t);
            if !(stale || over || superseded) {
                break;
            }
            if !superseded {
                self.at.remove(id);
            }
            self.order.pop_front();
        }
    }
}

impl Revoked {
    pub fn add(&self, id: &str) {
        self.add_at(id, Instant::now());
    }

    fn add_at(&self, id: &str, now: Instant) {
        if let Ok(mut g) = self.inner.lock() {
            g.at.insert(id.to_string(), now);
            g.order.push_back((id.to_string(), now));
            g.prune(now);
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.contains_at(id, Instant::now())
    }

    fn contains_at(&self, id: &str, now: Instant) -> bool {
        self.inner.lock().is_ok_and(|g| {
            g.at.get(id)
                .is_some_and(|t| now.saturating_duration_since(*t) <= KEEP_FOR)
        })
    }

    /// The ids revoked now with the unix time of their revoke, as mingle hands them on.
    pub fn with_times(&self) -> serde_json::Map<String, serde_json::Value> {
        let Ok(mut g) = self.inner.lock() else {
            return Default::default();
        };
        let now = Instant::now();
        g.prune(now);
        let unix = super::events::unix_now();
        g.at.iter()
            .map(|(id, t)| {
                let age = now.saturating_duration_since(*t).as_secs_f64();
                (id.clone(), serde_json::json!(unix - age))
            })
            .collect()
    }

    /// The ids revoked now, sorted.
    pub fn ids(&self) -> Vec<String> {
        let Ok(mut g) = self.inner.lock() else {
            return Vec::new();
        };
        g.prune(Instant::now());
        let mut v: Vec<String> = g.at.keys().cloned().collect();
        v.sort_unstable();
        v
    }
}

/// `revoke_by_stamped_headers`' set: `(header, value)` pairs, a task is revoked when one of its
/// stamps is among them.
#[derive(Default)]
pub struct RevokedStamps {
    pairs: Revoked,
}

/// One pair as a key: the header, a unit separator, the value's JSON (so `"1"` and `1` differ, as
/// they do in Python).
fn stamp_key(header: &str, value: &serde_json::Value) -> String {
    format!("{header}\u{1f}{value}")
}

/// A stamp's value as Celery's `maybe_list` sees it: a list stands for each of its items.
fn each_value(v: &serde_json::Value) -> &[serde_json::Value] {
    match v {
        serde_json::Value::Array(a) => a,
        one => std::slice::from_ref(one),
    }
}

impl RevokedStamps {
    /// Revokes every value given for `header` (one value or a list).
    pub fn add(&self, header: &str, values: &serde_json::Value) {
        for v in each_value(values) {
            self.pairs.add(&stamp_key(header, v));
        }
    }

    /// The first of a task's stamps that is revoked, as Celery's `Request.revoked` finds it.
    pub fn matching(
        &self,
        stamps: &[(String, serde_json::Value)],
    ) -> Option<(String, serde_json::Value)> {
        stamps.iter().find_map(|(h, v)| {
            each_value(v)
                .iter()
                .find(|x| self.pairs.contains(&stamp_key(h, x)))
                .map(|x| (h.clone(), x.clone()))
        })
    }
}

/// The stamps of `stamps` that `given` (header → a value or a list of them) names: what
/// `revoke_by_stamped_headers` with `terminate` matches a running task by.
pub fn stamps_matching(
    given: &serde_json::Map<String, serde_json::Value>,
    stamps: &[(String, serde_json::Value)],
) -> Vec<(String, serde_json::Value)> {
    let mut hits = Vec::new();
    for (h, v) in stamps {
        let Some(wanted) = given.get(h) else { continue };
        for x in each_value(v) {
            if each_value(wanted).contains(x) && !hits.contains(&(h.clone(), x.clone())) {
                hits.push((h.clone(), x.clone()));
            }
        }
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamps_match_by_header_and_value_lists_on_either_side() {
        let r = RevokedStamps::default();
        r.add("mtask_id", &json!(["a", "b"]));
        r.add("batch", &json!(7));
        let st = |h: &str, v: serde_json::Value| vec![(h.to_string(), v)];
        assert_eq!(
            r.matching(&st("mtask_id", json!("b"))),
            Some(("mtask_id".into(), json!("b")))
        );
        assert_eq!(
            r.matching(&st("mtask_id", json!(["x", "a"]))),
            Some(("mtask_id".into(), json!("a")))
        );
        assert_eq!(r.matching(&st("mtask_id", json!("c"))), None);
        // Another header with the same value, and the same value as a string: not revoked.
        assert_eq!(r.matching(&st("other", json!("a"))), None);
        assert_eq!(r.matching(&st("batch", json!("7"))), None);
        assert_eq!(
            r.matching(&st("batch", json!(7))),
            Some(("batch".into(), json!(7)))
        );
        assert_eq!(r.matching(&[]), None);

        let given = json!({"mtask_id": "a", "batch": [7, 8]});
        let given = given.as_object().unwrap();
        let stamps = vec![
            ("mtask_id".to_string(), json!(["a", "z"])),
            ("batch".to_string(), json!(8)),
            ("other".to_string(), json!("a")),
        ];
        assert_eq!(
            stamps_matching(given, &stamps),
            vec![
                ("mtask_id".to_string(), json!("a")),
                ("batch".to_string(), json!(8))
            ]
        );
        assert!(stamps_matching(given, &[("mtask_id".to_string(), json!("q"))]).is_empty());
    }

    #[test]
    fn revokes_expire_and_stay_bounded() {
        let r = Revoked::default();
        let t0 = Instant::now();
        r.add_at("a", t0);
        assert!(r.contains_at("a", t0 + KEEP_FOR));
        assert!(!r.contains_at("a", t0 + KEEP_FOR + Duration::from_secs(1)));
        assert!(!r.contains_at("b", t0));
        // Revoked again later: the later time counts, the earlier entry does not expire it.
        r.add_at("a", t0 + Duration::from_secs(3600));
        r.add_at("c", t0 + KEEP_FOR + Duration::from_secs(2));
        assert!(r.contains_at("a", t0 + KEEP_FOR + Duration::from_secs(2)));
        // The bound: the oldest go first.
        let r = Revoked::default();
        for i in 0..MAX_REVOKED + 10 {
            r.add_at(&i.to_string(), t0);
        }
        assert_eq!(r.ids().len(), MAX_REVOKED);
        assert!(!r.contains_at("0", t0) && r.contains_at(&(MAX_REVOKED + 9).to_string(), t0));
    }
}
