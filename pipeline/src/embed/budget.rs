//! The provider's rate limit as a budget the embedder's requests share: what each answer's
//! `x-ratelimit-*` headers say is left, refilled at the limit's rate, so requests go out as fast
//! as the budget refills and no faster; and how many requests to keep in flight (one more while
//! the budget is not what holds them back, half on a 429).
//!
//! Every worker on one API key reads the same headers, which count the whole key's use, so a
//! fleet settles under the limit together without talking to each other: each worker compares
//! how fast the key's bucket went down with what it sent itself, takes that share of the refill
//! and of what is left, and none spends the last `RESERVE` of the bucket, which absorbs what the
//! fleet sends before its next answers are heard.
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// OpenAI's limits are per minute, replenished continuously.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest one acquire sleeps before it looks again: a refilled budget or a freed slot is
/// seen within this.
const MAX_NAP: Duration = Duration::from_millis(250);
/// The part of the key's bucket no worker spends (3 s of refill, whatever the limit): requests
/// other workers sent since this one last heard from the server land in it instead of in a 429.
const RESERVE: f64 = 0.05;
/// How long a worker remembers the key's spending when it works out its share: long enough to
/// average over many answers, short enough to follow a worker joining or leaving within seconds.
const SHARE_MEMORY: Duration = Duration::from_secs(10);
/// The least share a worker gives itself, so one crowded out by the others still sends (and its
/// share grows back as its spending shows in the key's).
const MIN_SHARE: f64 = 1.0 / 16.0;
/// Answers heard before more than one request goes at once: two give the first comparison of
/// the key's count with what this worker sent, so its first burst is already its share.
const ALONE_UNTIL: u32 = 2;

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
    /// Nothing goes before this (a 429's `retry-after`).
    held_until: Instant,
    /// The newest request whose answer set `level`: an older answer's count, which others' later
    /// spending may have overtaken, can lower the level but never raise it.
    newest: u64,
}

impl Bucket {
    fn rate(&self) -> f64 {
        self.limit / WINDOW.as_secs_f64()
    }

    /// This worker's `share` of the key's refill since the last look.
    fn refill(&mut self, now: Instant, share: f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + self.rate() * share * dt).min(self.limit * share);
        self.at = now;
    }

    /// How long until `n` is there (zero: now). A request larger than the whole limit waits for
    /// a full bucket and then goes: the server will say whether it fits.
    fn wait_for(&mut self, n: f64, now: Instant, share: f64) -> Duration {
        self.refill(now, share);
        if self.held_until > now {
            return self.held_until - now;
        }
        let need = n.min(self.limit * share);
        if self.level >= need {
            return Duration::ZERO;
        }
        let rate = self.rate() * share;
        if rate <= 0.0 {
            return MAX_NAP;
        }
        Duration::from_secs_f64((need - self.level) / rate)
    }

    fn take(&mut self, n: f64) {
        self.level -= n.min(self.limit);
    }

    /// The server's count counts every worker on the key: of what it says is left above the
    /// reserve, this worker may spend its share, less what it sent after the answered request
    /// (which the count may not include yet). The newest answer sets the level either way (what
    /// others leave unspent comes back to each in its share); an older one only lowers it.
    fn observe(
        &mut self,
        h: (Option<f64>, Option<f64>),
        answered: (u64, f64),
        now: Instant,
        share: f64,
    ) {
        if let Some(l) = h.0.filter(|l| *l > 0.0) {
            self.limit = l;
        }
        self.refill(now, share);
        let (id, sent_since) = answered;
        if let Some(r) = h.1 {
            let spendable =
                (share * (r - RESERVE * self.limit) - sent_since).min(self.limit * share);
            if id > self.newest {
                self.newest = id;
                self.level = spendable;
            } else {
                self.level = self.level.min(spendable);
            }
        }
    }

    /// Nothing goes for `after` from `now`.
    fn hold(&mut self, now: Instant, after: Duration) {
        self.held_until = self.held_until.max(now + after);
    }
}

/// One answer's view of the key: which of this worker's requests it answered, when that left,
/// and the tokens the server said were left after it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    id: u64,
    sent_at: Instant,
    remaining: f64,
}

/// One request this worker sent, kept until no answer still to come needs it: answers are
/// compared by what this worker sent between their requests, refusals excluded (the server did
/// not count those).
#[derive(Debug, Clone, Copy)]
struct Sent {
    id: u64,
    tokens: f64,
    answered: bool,
    refused: bool,
}

/// This worker's share of the key: its own tokens over the key's (both decayed over
/// `SHARE_MEMORY`), from the fall of the server's count between answers.
#[derive(Debug, Clone, Copy)]
struct Share {
    own: f64,
    key: f64,
    last: Option<Sample>,
}

impl Share {
    const ALONE: Share = Share {
        own: 0.0,
        key: 0.0,
        last: None,
    };

    fn value(&self) -> f64 {
        if self.key <= 0.0 {
            return 1.0;
        }
        (self.own / self.key).clamp(MIN_SHARE, 1.0)
    }

    /// Between the newest sample so far and `s`, the key spent what its count fell plus what
    /// refilled; this worker spent `own_between(last, s)`. Answers that come back out of order,
    /// and spans where the bucket may have been full (refill lost, so the key's spending
    /// unknown), teach nothing.
    fn learn(&mut self, s: Sample, limit: f64, own_between: impl Fn(u64, u64) -> f64) {
        let Some(last) = self.last else {
            self.last = Some(s);
            return;
        };
        if s.id <= last.id {
            return;
        }
        self.last = Some(s);
        let dt = s
            .sent_at
            .saturating_duration_since(last.sent_at)
            .as_secs_f64();
        let refilled = limit / WINDOW.as_secs_f64() * dt;
        if last.remaining + refilled >= limit {
            return;
        }
        let own = own_between(last.id, s.id);
        let key = (last.remaining - s.remaining + refilled).max(own);
        let keep = (-dt / SHARE_MEMORY.as_secs_f64()).exp();
        self.own = self.own * keep + own;
        self.key = self.key * keep + key;
    }
}

#[derive(Debug)]
struct State {
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
    in_flight: usize,
    /// How many may be in flight now, between 1 and `max_in_flight`.
    allowed: usize,
    /// Answers come back so far: until `ALONE_UNTIL` have, one request goes at a time, so a key
    /// whose budget is already spent (another worker, an earlier run) costs one 429, not one per
    /// request in flight, and a worker joining a busy key has its share before it sends more.
    answers: u32,
    /// This worker's requests an answer may still be compared against, oldest first.
    sent: std::collections::VecDeque<Sent>,
    next_id: u64,
    share: Share,
}

impl State {
    /// Tokens the server counted of this worker's requests after `after` up to `upto`.
    fn own_between(&self, after: u64, upto: u64) -> f64 {
        self.sent
            .iter()
            .filter(|r| r.id > after && r.id <= upto && !r.refused)
            .map(|r| r.tokens)
            .sum()
    }

    fn end(&mut self, id: u64, refused: bool) {
        if let Some(r) = self.sent.iter_mut().find(|r| r.id == id) {
            r.answered = true;
            r.refused |= refused;
        }
        // What no later comparison needs: answered, and at or before the newest sample.
        let last = self.share.last.map_or(0, |l| l.id);
        while self
            .sent
            .front()
            .is_some_and(|r| r.answered && r.id <= last)
        {
            self.sent.pop_front();
        }
    }
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
    /// Whether it waited for a free slot while the budget had room for it (then latency is the
    /// limit, however long it also waited for the budget).
    pub held_by_slots: bool,
    ended: bool,
    sent_at: Instant,
    id: u64,
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
                answers: 0,
                sent: Default::default(),
                next_id: 1,
                share: Share::ALONE,
            }),
            max_in_flight,
        }
    }

    /// Waits until a request of `tokens` fits the budget and a slot is free, then takes both.
    pub async fn acquire(&self, tokens: usize) -> Slot<'_> {
        let (mut waited_for_budget, mut held_by_slots) = (false, false);
        loop {
            let nap = {
                let mut guard = self.lock();
                let s = &mut *guard;
                let now = Instant::now();
                let share = s.share.value();
                let by_tokens = s
                    .tokens
                    .as_mut()
                    .map_or(Duration::ZERO, |b| b.wait_for(tokens as f64, now, share));
                let by_requests = s
                    .requests
                    .as_mut()
                    .map_or(Duration::ZERO, |b| b.wait_for(1.0, now, share));
                let wait = by_tokens.max(by_requests);
                let allowed = if s.answers >= ALONE_UNTIL {
                    s.allowed
                } else {
                    1
                };
                if s.in_flight >= allowed {
                    // The budget had room: too few in flight is what held this one back.
                    held_by_slots |= wait.is_zero();
                    Err(MAX_NAP)
                } else if !wait.is_zero() {
                    waited_for_budget = true;
                    Err(wait.min(MAX_NAP))
                } else {
                    if let Some(b) = s.tokens.as_mut() {
                        b.take(tokens as f64);
                    }
                    if let Some(b) = s.requests.as_mut() {
                        b.take(1.0);
                    }
                    s.in_flight += 1;
                    let id = s.next_id;
                    s.next_id += 1;
                    s.sent.push_back(Sent {
                        id,
                        tokens: tokens as f64,
                        answered: false,
                        refused: false,
                    });
                    Ok((now, id))
                }
            };
            match nap {
                Ok((sent_at, id)) => {
                    return Slot {
                        budget: self,
                        waited_for_budget,
                        held_by_slots,
                        ended: false,
                        sent_at,
                        id,
                    }
                }
                Err(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// What the server said in the answer to the request of `slot` (success or not): the limits
    /// and what is left, which also tells this worker its share of the key.
    fn observe(&self, paid: bool, h: &RateHeaders, sent_at: Instant, id: u64) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = Instant::now();
        if !paid {
            if let Some(r) = s.sent.iter_mut().find(|r| r.id == id) {
                r.refused = true;
            }
        }
        if let (Some(r), Some(l)) = (
            h.remaining_tokens,
            h.limit_tokens.or(s.tokens.map(|b| b.limit)),
        ) {
            let sample = Sample {
                id,
                sent_at,
                remaining: r,
            };
            let mut share = s.share;
            share.learn(sample, l, |a, b| s.own_between(a, b));
            s.share = share;
        }
        let share = s.share.value();
        let sent_since = s.own_between(id, u64::MAX);
        for (slot, limit, remaining, since) in [
            (
                &mut s.tokens,
                h.limit_tokens,
                h.remaining_tokens,
                sent_since,
            ),
            (&mut s.requests, h.limit_requests, h.remaining_requests, 0.0),
        ] {
            match slot {
                Some(b) => b.observe((limit, remaining), (id, since), now, share),
                None => {
                    if let Some(l) = limit.filter(|l| *l > 0.0) {
                        let mut b = Bucket {
                            limit: l,
                            level: l,
                            at: now,
                            held_until: now,
                            newest: 0,
                        };
                        b.observe((limit, remaining), (id, since), now, share);
                        *slot = Some(b);
                    }
                }
            }
        }
    }

    /// The key's limits as last heard: (tokens, requests) a minute.
    pub fn limits(&self) -> Option<(f64, f64)> {
        let s = self.lock();
        Some((
            s.tokens?.limit,
            s.requests.map_or(f64::INFINITY, |b| b.limit),
        ))
    }

    /// Requests allowed in flight now.
    pub fn allowed(&self) -> usize {
        self.lock().allowed
    }

    /// A 429 with a wait: nothing is sent until it has passed, and half as many requests go at
    /// once from now on.
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
                b.hold(now, after);
            }
        }
    }
}

impl Slot<'_> {
    /// The answer's headers, success or not.
    /// `paid`: the server took the request (anything but a 429).
    pub fn observe(&self, paid: bool, h: &RateHeaders) {
        self.budget.observe(paid, h, self.sent_at, self.id);
    }

    /// A success: one more request may go at once if the budget did not hold this one back, or
    /// too few in flight did while the budget had room (latency, not the limit, is then what
    /// bounds throughput).
    pub fn done(mut self) {
        self.ended = true;
        let mut s = self.budget.lock();
        s.answers = s.answers.saturating_add(1);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.end(self.id, false);
        let latency_bound = self.held_by_slots || !self.waited_for_budget;
        if latency_bound && s.allowed < self.budget.max_in_flight {
            s.allowed += 1;
        }
    }

    /// A 429: the slot frees and `Budget::refused` does the rest.
    pub fn refused(mut self, retry_after: Option<Duration>) {
        self.ended = true;
        {
            let mut s = self.budget.lock();
            s.answers = s.answers.saturating_add(1);
            s.in_flight = s.in_flight.saturating_sub(1);
            s.end(self.id, true);
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
            // Unknown whether the server counted it: as if it had (the safe side).
            s.end(self.id, false);
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

    /// What the server said, as if in answer to a request just sent.
    fn heard(b: &Budget, h: &RateHeaders) {
        let id = b.lock().next_id;
        b.observe(true, h, Instant::now(), id);
    }

    /// Table: (tokens left, limit per minute, request size) -> the wait before it may go. The
    /// reserve (5 %, 3 k of 60 k) is never spent.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_exactly_for_the_tokens_it_lacks() {
        for (left, limit, size, wait_ms) in [
            (10_000.0, 60_000.0, 500, 0),
            (3_500.0, 60_000.0, 500, 0),
            (1_000.0, 60_000.0, 500, 2_500),
            (0.0, 60_000.0, 1_000, 4_000),
            (500.0, 60_000.0, 1_000, 3_500),
            // Larger than the whole limit: waits for a full bucket, then goes.
            (0.0, 60_000.0, 120_000, 63_000),
        ] {
            let b = Budget::new(4, 4);
            heard(&b, &headers(limit, left));
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
        // about 33 s whatever the concurrency (3 s to refill the reserve first).
        let b = std::sync::Arc::new(Budget::new(8, 8));
        heard(&b, &headers(60_000.0, 0.0));
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
        assert!((32.0..=34.5).contains(&secs), "{secs} s");
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
        heard(&b, &headers(60_000.0, 60_000.0));
        b.acquire(100).await.refused(Some(Duration::from_secs(2)));
        let t = Instant::now();
        b.acquire(100).await.done();
        let took = t.elapsed().as_secs_f64();
        assert!((2.0..=2.4).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_requests_go_alone_until_two_answers_are_heard() {
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
        // Two answers heard: the configured number go together.
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

    /// One API key as the server keeps it: a bucket of `tpm` refilled continuously, paid at a
    /// request's arrival; the answer (after `latency`) carries what is left, or is a 429.
    struct Key {
        tpm: f64,
        level: f64,
        at: Instant,
        refused: u64,
        paid: f64,
    }

    impl Key {
        fn arrive(&mut self, tokens: f64) -> (RateHeaders, bool) {
            let now = Instant::now();
            let dt = now.duration_since(self.at).as_secs_f64();
            self.level = (self.level + self.tpm / 60.0 * dt).min(self.tpm);
            self.at = now;
            let ok = self.level >= tokens;
            if ok {
                self.level -= tokens;
                self.paid += tokens;
            } else {
                self.refused += 1;
            }
            (headers(self.tpm, self.level.max(0.0).floor()), ok)
        }
    }

    /// `workers` budgets on one key, each sending `requests` of `tokens`, an answer taking
    /// `latency_ms` plus 10 µs a token: how many were refused, the tokens paid, the wall time.
    async fn fleet(
        workers: usize,
        requests: usize,
        tokens: usize,
        start: f64,
        latency_ms: u64,
    ) -> (u64, f64, f64) {
        let tpm = 600_000.0;
        let key = std::sync::Arc::new(Mutex::new(Key {
            tpm,
            level: start,
            at: Instant::now(),
            refused: 0,
            paid: 0.0,
        }));
        let t0 = Instant::now();
        let mut all = Vec::new();
        for _ in 0..workers {
            let b = std::sync::Arc::new(Budget::new(4, 32));
            for _ in 0..requests {
                let (b, key) = (b.clone(), key.clone());
                all.push(tokio::spawn(async move {
                    loop {
                        let slot = b.acquire(tokens).await;
                        let (h, ok) = key.lock().unwrap().arrive(tokens as f64);
                        tokio::time::sleep(Duration::from_millis(latency_ms + tokens as u64 / 100))
                            .await;
                        slot.observe(ok, &h);
                        if ok {
                            slot.done();
                            return;
                        }
                        slot.refused(Some(Duration::from_millis(500)));
                    }
                }));
            }
        }
        for t in all {
            t.await.unwrap();
        }
        let k = key.lock().unwrap();
        (k.refused, k.paid, t0.elapsed().as_secs_f64())
    }

    /// Table: workers on one key from a nearly spent bucket. Each finds its share from the
    /// key's count, so the fleet is refused at most once per worker (its first request, sent
    /// before it has heard anything), and together they embed at the key's rate (10 k tokens a
    /// second) once the reserve has refilled.
    #[tokio::test(start_paused = true)]
    async fn workers_on_one_key_settle_under_its_limit_together() {
        for (workers, latency_ms) in [
            (1, 200),
            (2, 200),
            (4, 200),
            (8, 200),
            (4, 1500),
            (16, 1500),
        ] {
            let (refused, paid, secs) =
                fleet(workers, 400 / workers, 2_000, 1_000.0, latency_ms).await;
            assert!(
                refused <= workers as u64,
                "{workers} workers, {latency_ms} ms: {refused} refused"
            );
            assert_eq!(paid, 800_000.0);
            // 800 k at 10 k/s is 80 s, after 3 s refilling the reserve, and the last answers.
            let bound = 80.0 * 1.05 + 3.0 + 2.0 * latency_ms as f64 / 1000.0;
            assert!(
                secs <= bound,
                "{workers} workers, {latency_ms} ms: {secs} s"
            );
        }
    }
}
