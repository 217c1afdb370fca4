//! Per-task settings changed at run time by remote control, as `celery control rate_limit` and
//! `time_limit` (and Flower's task page) change them: a rate limit paces a task name's starts,
//! and time limits replace the task's own (a message's `timelimit` header still wins, as in
//! Celery). Nothing here survives a restart, as in Celery.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::tasks::TimeLimits;

/// The slowest rate accepted: one start an hour is already a queue that never drains.
const MIN_INTERVAL: Duration = Duration::from_secs(3600);

/// Celery's rate strings: `"10/s"`, `"100/m"`, `"5/h"`, or a bare number per second. Zero or none
/// switches the limit off (None). Returns the interval between two starts.
pub fn parse_rate(spec: Option<&serde_json::Value>) -> Result<Option<Duration>, String> {
    let (n, per) = match spec {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Number(n)) => (n.as_f64().unwrap_or(f64::NAN), 1.0),
        Some(serde_json::Value::String(s)) => {
            let (n, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
            let per = match unit.trim() {
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                u => return Err(format!("rate limit {s:?}: unit {u:?} is not s, m or h")),
            };
            let n: f64 = n
                .trim()
                .parse()
                .map_err(|_| format!("rate limit {s:?} is not N/s, N/m or N/h"))?;
            (n, per)
        }
        Some(v) => return Err(format!("rate limit {v} is not a string or a number")),
    };
    if !(n.is_finite() && n >= 0.0) {
        return Err("a rate limit is a number of tasks at least 0".into());
    }
    if n == 0.0 {
        return Ok(None);
    }
    Ok(Some(Duration::from_secs_f64(per / n).min(MIN_INTERVAL)))
}

/// Hard and soft limits in seconds, as a `time_limit` request gives them (either may be none).
type Limits = (Option<f64>, Option<f64>);

#[derive(Default)]
pub struct Tuning {
    /// Task name → (interval between starts, the earliest next start).
    rates: Mutex<HashMap<String, (Duration, Instant)>>,
    /// Task name → (hard, soft) seconds, as the control request gave them.
    limits: Mutex<HashMap<String, Limits>>,
}

impl Tuning {
    pub fn set_rate(&self, task: &str, interval: Option<Duration>) {
        if let Ok(mut r) = self.rates.lock() {
            match interval {
                Some(i) => {
                    r.insert(task.to_string(), (i, Instant::now()));
                }
                None => {
                    r.remove(task);
                }
            }
        }
    }

    /// When `task` may start: now when it has no limit, else its turn (reserved by this call,
    /// so concurrent callers queue one interval apart).
    pub fn next_start(&self, task: &str) -> Option<Instant> {
        let mut r = self.rates.lock().ok()?;
        let (interval, next) = r.get_mut(task)?;
        let at = (*next).max(Instant::now());
        *next = at + *interval;
        Some(at)
    }

    pub fn set_time_limits(&self, task: &str, hard: Option<f64>, soft: Option<f64>) {
        if let Ok(mut l) = self.limits.lock() {
            l.insert(task.to_string(), (hard, soft));
        }
    }

    /// The task's limits with any set at run time in place of its own.
    pub fn limits(&self, task: &str, own: TimeLimits) -> TimeLimits {
        match self.limits.lock().ok().and_then(|l| l.get(task).copied()) {
            Some((hard, soft)) => own.with_overrides(hard, soft),
            None => own,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rates_are_read_as_celery_writes_them() {
        let ms = |v: serde_json::Value| parse_rate(Some(&v)).map(|d| d.map(|d| d.as_millis()));
        assert_eq!(ms(json!("10/s")), Ok(Some(100)));
        assert_eq!(ms(json!("120/m")), Ok(Some(500)));
        assert_eq!(ms(json!("2/h")), Ok(Some(1_800_000)));
        assert_eq!(ms(json!(4)), Ok(Some(250)));
        assert_eq!(ms(json!("4")), Ok(Some(250)));
        assert_eq!(
            ms(json!("0.0001/h")),
            Ok(Some(3_600_000)),
            "capped at one an hour"
        );
        assert_eq!(ms(json!("0/s")), Ok(None));
        assert_eq!(parse_rate(None), Ok(None));
        for bad in [
            json!("10/d"),
            json!("x/s"),
            json!("-1/s"),
            json!([1]),
            json!("nan/s"),
        ] {
            assert!(parse_rate(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn starts_are_paced_one_interval_apart() {
        let t = Tuning::default();
        assert!(t.next_start("a").is_none());
        t.set_rate("a", Some(Duration::from_millis(100)));
        let starts: Vec<Instant> = (0..3).map(|_| t.next_start("a").unwrap()).collect();
        assert!(starts[0] <= Instant::now(), "the first starts at once");
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [Duration::from_millis(100); 2]);
        t.set_rate("a", None);
        assert!(t.next_start("a").is_none());
        let own = TimeLimits {
            soft: Duration::from_secs(270),
            hard: Duration::from_secs(300),
        };
        t.set_time_limits("a", Some(10.0), Some(5.0));
        let l = t.limits("a", own);
        assert_eq!((l.hard.as_secs(), l.soft.as_secs()), (10, 5));
        assert_eq!(t.limits("b", own).hard.as_secs(), 300);
    }
}
