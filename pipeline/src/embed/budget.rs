//! The provider's rate limit as a budget the embedder's requests share: what each answer's
//! `x-ratelimit-*` headers say is left, refilled at the limit's rate, so requests go out as fast
//! as the budget refills and no faster; and how many requests to keep in flight (one more while
//! the budget is not what holds them back, half on a 429).
//!
//! Every worker on one API key reads the same headers, which count the whole key's use, so a
//! fleet settles under the limit together without talking to each other.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// OpenAI's limits are per minute, replenished continuously.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest one acquire sleeps before it looks again: a refilled budget or a freed slot is
/// seen within this.
const MAX_NAP: Duration = Duration::from_millis(250);

/// What one answer's headers said (OpenAI's names; durations as Go writes them: `6m0s`, `20ms`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateHeaders {
    pub limit_requests: Option<f64>,
    pub limit_tokens: Option<f64>,
    pub remaining_requests: Option<f64>,
    pub remaining_tokens: Option<f64>,
}

impl RateHeaders {
    pub fn read(get: impl Fn(&str) -> Option<String>) -> RateHeaders {
        let num = |k: &str| {
            get(k)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        RateHeaders {
            limit_requests: num("x-ratelimit-limit-requests"),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
        }
    }
}

/// One limit (requests or tokens per minute) as a bucket: `level` left now, refilled at
/// `limit / 60 s`, never above `limit`. Unknown until a response names the limit.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let rate = self.limit / WINDOW.as_secs_f64();
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + rate * dt).min(self.limit);
        self.at = now;
    }

    /// How long until `n` is there (zero: now). A request larger than the whole limit waits for
    /// a full bucket and then goes: the server will say whether it fits.
    fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        let need = n.min(self.limit);
        if self.level >= need {
            return Duration::ZERO;
        }
        let rate = self.limit / WINDOW.as_secs_f64();
        if rate <= 0.0 {
            return MAX_NAP;
        }
        Duration::from_secs_f64((need - self.level) / rate)
    }

    fn take(&mut self, n: f64) {
        self.level -= n.min(self.limit);
    }

    /// The server's count wins when it is lower: it counts every worker on the key.
    fn observe(&mut self, limit: Option<f64>, remaining: Option<f64>, now: Instant) {
        if let Some(l) = limit {
            if l > 0.0 {
                self.limit = l;
            }
        }
        self.refill(now);
        if let Some(r) = remaining {
            self.level = self.level.min(r);
        }
    }
}

#[derive(Debug)]
struct State {
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
    in_flight: usize,
    /// How many may be in flight now, between 1 and `max_in_flight`.
    allowed: usize,
    /// Whether an answer has come back yet: until one has, one request goes alone, so a key
    /// whose budget is already spent (another worker, an earlier run) costs one 429, not one per
    /// request in flight.
    heard: bool,
}

/// The shared budget of one embedder (one API key, one process).
#[derive(Debug)]
pub struct Budget {
    state: Mutex<State>,
    max_in_flight: usize,
}

/// A request's place in flight; `done` or `refused` says how it went (dropped: neither).
#[derive(Debug)]
pub struct Slot<'a> {
    budget: &'a Budget,
    /// Whether it had to wait for the rate budget (then the budget, not latency, is the limit).
    pub waited_for_budget: bool,
    ended: bool,
}

impl Budget {
    /// The state; a panic elsewhere while it was held leaves numbers that are still numbers.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `start_in_flight` requests at once to begin with, never more than `max_in_flight`.
    pub fn new(start_in_flight: usize, max_in_flight: usize) -> Budget {
        let max_in_flight = max_in_flight.max(1);
        Budget {
            state: Mutex::new(State {
                tokens: None,
                requests: None,
                in_flight: 0,
                allowed: start_in_flight.clamp(1, max_in_flight),
                heard: false,
            }),
            max_in_flight,
        }
    }

    /// Waits until a request of `tokens` fits the budget and a slot is free, then takes both.
    pub async fn acquire(&self, tokens: usize) -> Slot<'_> {
        let mut waited_for_budget = false;
        loop {
            let nap = {
                let mut s = self.lock();
                let now = Instant::now();
                let by_tokens = s
                    .tokens
                    .as_mut()
                    .map_or(Duration::ZERO, |b| b.wait_for(tokens as f64, now));
                let by_requests = s
                    .requests
                    .as_mut()
                    .map_or(Duration::ZERO, |b| b.wait_for(1.0, now));
                let wait = by_tokens.max(by_requests);
                let allowed = if s.heard { s.allowed } else { 1 };
                if s.in_flight >= allowed {
                    Some(MAX_NAP)
                } else if !wait.is_zero() {
                    waited_for_budget = true;
                    Some(wait.min(MAX_NAP))
                } else {
                    if let Some(b) = s.tokens.as_mut() {
                        b.take(tokens as f64);
                    }
                    if let Some(b) = s.requests.as_mut() {
                        b.take(1.0);
                    }
                    s.in_flight += 1;
                    None
                }
            };
            match nap {
                None => {
                    return Slot {
                        budget: self,
                        waited_for_budget,
                        ended: false,
                    }
                }
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// What the server said after an answer (success or not): the limits and what is left.
    pub fn observe(&self, h: &RateHeaders) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.heard = true;
        let now = Instant::now();
        for (slot, limit, remaining) in [
            (&mut s.tokens, h.limit_tokens, h.remaining_tokens),
            (&mut s.requests, h.limit_requests, h.remaining_requests),
        ] {
            match slot {
                Some(b) => b.observe(limit, remaining, now),
                None => {
                    if let Some(l) = limit.filter(|l| *l > 0.0) {
                        *slot = Some(Bucket {
                            limit: l,
                            level: remaining.unwrap_or(l).min(l),
                            at: now,
                        });
                    }
                }
            }
        }
    }

    /// Requests allowed in flight now.
    pub fn allowed(&self) -> usize {
        self.lock().allowed
    }

    /// A 429 with a wait: nothing is sent until it has passed (the bucket is emptied for that
    /// long), and half as many requests go at once from now on.
    pub fn refused(&self, retry_after: Option<Duration>) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.allowed = (s.allowed / 2).max(1);
        let now = Instant::now();
        if let Some(after) = retry_after {
            for b in [s.tokens.as_mut(), s.requests.as_mut()]
                .into_iter()
                .flatten()
            {
                b.refill(now);
                let rate = b.limit / WINDOW.as_secs_f64();
                b.level = -(rate * after.as_secs_f64());
            }
        }
    }
}

impl Slot<'_> {
    /// A success: one more request may go at once if the budget did not hold this one back
    /// (latency, not the limit, is then what bounds throughput).
    pub fn done(mut self) {
        self.ended = true;
        let mut s = self.budget.lock();
        s.heard = true;
        s.in_flight = s.in_flight.saturating_sub(1);
        if !self.waited_for_budget && s.allowed < self.budget.max_in_flight {
            s.allowed += 1;
        }
    }

    /// A 429: the slot frees and `Budget::refused` does the rest.
    pub fn refused(mut self, retry_after: Option<Duration>) {
        self.ended = true;
        {
            let mut s = self.budget.lock();
            s.heard = true;
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        self.budget.refused(retry_after);
    }
}

/// An error or a cancelled request: the slot frees and nothing is learnt.
impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut s = self.budget.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(limit_tokens: f64, remaining_tokens: f64) -> RateHeaders {
        RateHeaders {
            limit_tokens: Some(limit_tokens),
            remaining_tokens: Some(remaining_tokens),
            limit_requests: Some(10_000.0),
            remaining_requests: Some(9_999.0),
        }
    }

    #[test]
    fn headers_are_read_and_garbage_is_ignored() {
        let h = RateHeaders::read(|k| match k {
            "x-ratelimit-limit-tokens" => Some("1000000".into()),
            "x-ratelimit-remaining-tokens" => Some(" 999000 ".into()),
            "x-ratelimit-limit-requests" => Some("-5".into()),
            "x-ratelimit-remaining-requests" => Some("NaN".into()),
            _ => None,
        });
        assert_eq!(h.limit_tokens, Some(1_000_000.0));
        assert_eq!(h.remaining_tokens, Some(999_000.0));
        assert_eq!((h.limit_requests, h.remaining_requests), (None, None));
    }

    /// Table: (tokens left, limit per minute, request size) -> the wait before it may go.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_exactly_for_the_tokens_it_lacks() {
        for (left, limit, size, wait_ms) in [
            (1_000.0, 60_000.0, 500, 0),
            (0.0, 60_000.0, 1_000, 1_000),
            (500.0, 60_000.0, 1_000, 500),
            // Larger than the whole limit: waits for a full bucket, then goes.
            (0.0, 60_000.0, 120_000, 60_000),
        ] {
            let b = Budget::new(4, 4);
            b.observe(&headers(limit, left));
            let t = Instant::now();
            b.acquire(size).await.done();
            let took = t.elapsed().as_millis() as i64;
            assert!(
                (took - wait_ms).abs() <= 260,
                "{left} left of {limit}, {size}: waited {took} ms, not {wait_ms}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_go_as_fast_as_the_budget_refills_and_no_faster() {
        // 60 k tokens a minute is 1 k a second; 30 requests of 1 k from an empty budget take
        // about 30 s whatever the concurrency.
        let b = std::sync::Arc::new(Budget::new(8, 8));
        b.observe(&headers(60_000.0, 0.0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { b.acquire(1_000).await.done() }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        assert!((29.0..=31.5).contains(&secs), "{secs} s");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_grows_while_latency_limits_and_halves_on_a_429() {
        let b = Budget::new(2, 16);
        for _ in 0..5 {
            b.acquire(10).await.done();
        }
        assert_eq!(b.allowed(), 7, "one more per unhindered success");
        b.acquire(10).await.refused(None);
        assert_eq!(b.allowed(), 3);
        for _ in 0..40 {
            b.acquire(10).await.done();
        }
        assert_eq!(b.allowed(), 16, "never past the maximum");
        // A dropped slot (an error, a cancel) frees its place and changes nothing else.
        drop(b.acquire(10).await);
        assert_eq!(b.allowed(), 16);
        assert_eq!(b.lock().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_holds_every_request_back_that_long() {
        let b = Budget::new(4, 4);
        b.observe(&headers(60_000.0, 60_000.0));
        b.acquire(100).await.refused(Some(Duration::from_secs(2)));
        let t = Instant::now();
        b.acquire(100).await.done();
        let took = t.elapsed().as_secs_f64();
        assert!((2.0..=2.4).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_goes_alone_until_an_answer_is_heard() {
        let b = std::sync::Arc::new(Budget::new(4, 4));
        let first = b.acquire(1).await;
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.acquire(1).await.done() });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !second.is_finished(),
            "a second request went before any answer"
        );
        first.done();
        second.await.unwrap();
        // Once heard, the configured number go together.
        let slots = [b.acquire(1).await, b.acquire(1).await, b.acquire(1).await];
        assert_eq!(b.lock().in_flight, 3);
        drop(slots);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_beyond_the_allowed_wait_for_one_to_free() {
        let b = std::sync::Arc::new(Budget::new(1, 1));
        let first = b.acquire(1).await;
        let b2 = b.clone();
        let second = tokio::spawn(async move {
            let t = Instant::now();
            b2.acquire(1).await.done();
            t.elapsed()
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        first.done();
        let waited = second.await.unwrap();
        assert!(waited >= Duration::from_secs(1), "{waited:?}");
    }
}
