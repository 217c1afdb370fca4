//! `--autoscale MAX,MIN`: Celery's autoscaler. The pool grows toward the work held (running or
//! waiting for a slot) up to MAX, and shrinks back toward MIN once neither a task nor a scale-up
//! has come for the keepalive. Pure decisions here; `Shared` applies them to the semaphores.

use std::time::{Duration, Instant};

/// How often the pool is looked at besides on each task received: Celery's autoscaler thread
/// sleeps 1 s between looks.
pub const TICK: Duration = Duration::from_secs(1);
/// Celery's `AUTOSCALE_KEEPALIVE` default: how long after the last task or scale-up before idle
/// slots are taken back, so a bursty queue does not make the pool flap.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);
/// The most slots one worker may scale to: a typo (`--autoscale 100000`) must not ask for that.
pub const MAX_SLOTS: usize = 1024;

/// The autoscale range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub max: usize,
    pub min: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AutoscaleError {
    #[error("--autoscale wants MAX[,MIN] (e.g. 10,3), got {0:?}")]
    Syntax(String),
    #[error("autoscale max must be between 1 and {MAX_SLOTS}, got {0}")]
    Max(usize),
    #[error("autoscale min {min} is above max {max}")]
    MinAboveMax { min: usize, max: usize },
    #[error("AUTOSCALE_KEEPALIVE must be a positive number of seconds, got {0:?}")]
    Keepalive(String),
}

impl Range {
    pub fn new(max: usize, min: usize) -> Result<Range, AutoscaleError> {
        if max == 0 || max > MAX_SLOTS {
            return Err(AutoscaleError::Max(max));
        }
        if min > max {
            return Err(AutoscaleError::MinAboveMax { min, max });
        }
        Ok(Range { max, min })
    }

    /// `MAX[,MIN]` as `celery worker --autoscale` takes it; MIN defaults to 0.
    pub fn parse(s: &str) -> Result<Range, AutoscaleError> {
        let bad = || AutoscaleError::Syntax(s.to_string());
        let (max, min) = s.split_once(',').unwrap_or((s, ""));
        let max = max.trim().parse().map_err(|_| bad())?;
        let min = match min.trim() {
            "" => 0,
            m => m.parse().map_err(|_| bad())?,
        };
        Range::new(max, min)
    }
}

/// `AUTOSCALE_KEEPALIVE` as Celery reads it (seconds, a float); unset: 30 s.
pub fn keepalive_from(v: Option<&str>) -> Result<Duration, AutoscaleError> {
    let Some(v) = v else {
        return Ok(DEFAULT_KEEPALIVE);
    };
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(AutoscaleError::Keepalive(v.to_string())),
    }
}

/// What to do to the pool now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Grow(usize),
    Shrink(usize),
    Hold,
}

/// What an `autoscale` control command asks of the pool: slots to take back at once (max below
/// the pool), slots to add at once (min above it), and the change of max (the prefetch follows
/// it, as Celery's consumer's does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    pub shrink: usize,
    pub grow: usize,
    pub max_delta: isize,
}

#[derive(Debug)]
pub struct Autoscaler {
    range: Range,
    keepalive: Duration,
    /// The later of the last scale-up and the last task received: shrinking waits a keepalive
    /// past it. None until either happens: a worker that never had work keeps its pool.
    last_active: Option<Instant>,
}

impl Autoscaler {
    pub fn new(range: Range, keepalive: Duration) -> Autoscaler {
        Autoscaler {
            range,
            keepalive,
            last_active: None,
        }
    }

    pub fn range(&self) -> Range {
        self.range
    }

    pub fn received(&mut self, now: Instant) {
        self.last_active = Some(now);
    }

    /// Celery's `_maybe_scale`: `procs` slots now, `qty` tasks held (running or waiting for a
    /// slot; not those waiting for an ETA).
    pub fn step(&mut self, procs: usize, qty: usize, now: Instant) -> Step {
        let want = qty.min(self.range.max);
        if want > procs {
            self.last_active = Some(now);
            return Step::Grow(want - procs);
        }
        let floor = qty.max(self.range.min);
        let quiet = self
            .last_active
            .is_some_and(|t| now.saturating_duration_since(t) > self.keepalive);
        if floor < procs && quiet {
            return Step::Shrink(procs - floor);
        }
        Step::Hold
    }

    /// The `autoscale` control command: either bound may be left as it is.
    pub fn update(
        &mut self,
        max: Option<usize>,
        min: Option<usize>,
        procs: usize,
    ) -> Result<Update, AutoscaleError> {
        let next = Range::new(max.unwrap_or(self.range.max), min.unwrap_or(self.range.min))?;
        let shrink = procs.saturating_sub(next.max);
        let grow = next.min.saturating_sub(procs - shrink);
        let max_delta = next.max as isize - self.range.max as isize;
        self.range = next;
        Ok(Update {
            shrink,
            grow,
            max_delta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_what_celery_takes_and_refuses_the_rest() {
        let ok = |max, min| Ok(Range { max, min });
        let cases: &[(&str, Result<Range, AutoscaleError>)] = &[
            ("10,3", ok(10, 3)),
            ("10", ok(10, 0)),
            (" 4 , 4 ", ok(4, 4)),
            ("10,", ok(10, 0)),
            ("3,10", Err(AutoscaleError::MinAboveMax { min: 10, max: 3 })),
            ("0,0", Err(AutoscaleError::Max(0))),
            ("5000", Err(AutoscaleError::Max(5000))),
            ("", Err(AutoscaleError::Syntax(String::new()))),
            ("a,1", Err(AutoscaleError::Syntax("a,1".into()))),
            ("4,-1", Err(AutoscaleError::Syntax("4,-1".into()))),
            ("4,1,2", Err(AutoscaleError::Syntax("4,1,2".into()))),
        ];
        for (s, want) in cases {
            assert_eq!(&Range::parse(s), want, "{s:?}");
        }
    }

    #[test]
    fn keepalive_reads_seconds_and_refuses_nonsense() {
        assert_eq!(keepalive_from(None), Ok(DEFAULT_KEEPALIVE));
        assert_eq!(keepalive_from(Some("1.5")), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "nan", "inf", "soon", ""] {
            assert!(keepalive_from(Some(bad)).is_err(), "{bad:?}");
        }
    }

    /// (procs, qty, seconds since the last task or scale-up (None: never), expected step), with
    /// max 8, min 2, keepalive 30 s.
    #[test]
    fn step_grows_to_the_work_and_shrinks_only_after_the_keepalive() {
        let cases: &[(usize, usize, Option<u64>, Step)] = &[
            (2, 5, None, Step::Grow(3)),
            (2, 50, None, Step::Grow(6)),
            (8, 50, Some(100), Step::Hold),
            (2, 2, Some(100), Step::Hold),
            (2, 0, Some(100), Step::Hold),
            (8, 3, Some(100), Step::Shrink(5)),
            (8, 0, Some(100), Step::Shrink(6)),
            (8, 0, Some(30), Step::Hold),
            (8, 0, Some(10), Step::Hold),
            (8, 0, None, Step::Hold),
            (5, 3, Some(31), Step::Shrink(2)),
            // Below min after a narrower range: min is a floor for shrinking, not a target.
            (1, 0, Some(100), Step::Hold),
        ];
        let t0 = Instant::now();
        for &(procs, qty, ago, want) in cases {
            let mut a = Autoscaler::new(Range::new(8, 2).unwrap(), DEFAULT_KEEPALIVE);
            let now = t0 + Duration::from_secs(1000);
            a.last_active = ago.map(|s| now - Duration::from_secs(s));
            assert_eq!(a.step(procs, qty, now), want, "{procs} {qty} {ago:?}");
        }
    }

    #[test]
    fn a_scale_up_or_a_task_restarts_the_keepalive() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut a = Autoscaler::new(Range::new(4, 0).unwrap(), s(30));
        assert_eq!(a.step(0, 3, t0), Step::Grow(3));
        assert_eq!(a.step(3, 0, t0 + s(29)), Step::Hold);
        a.received(t0 + s(29));
        assert_eq!(a.step(3, 0, t0 + s(50)), Step::Hold);
        assert_eq!(a.step(3, 0, t0 + s(60)), Step::Shrink(3));
    }

    #[test]
    fn update_moves_the_range_and_says_what_to_do_now() {
        let mut a = Autoscaler::new(Range::new(8, 2).unwrap(), DEFAULT_KEEPALIVE);
        let up = |shrink, grow, max_delta| Update {
            shrink,
            grow,
            max_delta,
        };
        assert_eq!(a.update(Some(4), None, 6), Ok(up(2, 0, -4)));
        assert_eq!(a.range(), Range { max: 4, min: 2 });
        assert_eq!(a.update(None, Some(3), 2), Ok(up(0, 1, 0)));
        assert_eq!(a.update(Some(10), Some(10), 3), Ok(up(0, 7, 6)));
        assert_eq!(
            a.update(Some(2), Some(5), 10),
            Err(AutoscaleError::MinAboveMax { min: 5, max: 2 })
        );
        assert_eq!(
            a.range(),
            Range { max: 10, min: 10 },
            "a refused update changes nothing"
        );
    }
}
