//! The task ids revoked by `revoke` broadcasts, kept as Celery keeps them (`REVOKES_MAX`,
//! `REVOKE_EXPIRES`): at most 50,000, each for 3 hours. A revoked task that comes up is discarded
//! REVOKED; `inspect revoked` lists the set, and mingle (`hello`) hands it to starting workers.

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

#[cfg(test)]
mod tests {
    use super::*;

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
