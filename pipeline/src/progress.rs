//! A running build's counts, live: each stage's meter publishes into it as it hands a batch on,
//! and whoever shows progress (the build record, `inspect active`) reads a [`Snapshot`]. Relaxed
//! atomic stores, one per stage per batch: nothing the build would notice.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

/// The stages that publish, in pipeline order; a meter finds its slot by its name.
const STAGES: [&str; 6] = ["extract", "clean", "chunk", "reuse", "embed", "store"];

/// A running build's percentage stays below this until its record says completed: the end of
/// the stream and the sweep are still to come.
const RUNNING_CEILING: f64 = 99.0;

#[derive(Default, Debug)]
struct Live {
    items_in: AtomicU64,
    items_out: AtomicU64,
    tokens: AtomicU64,
    /// Microseconds the stage worked, waited on the previous stage and on the next, so far.
    busy_us: AtomicU64,
    wait_up_us: AtomicU64,
    wait_down_us: AtomicU64,
}

/// One stage's counts and times so far: a point of a build's timeline (`build --timeline`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTimes {
    pub name: &'static str,
    pub items_in: u64,
    pub items_out: u64,
    pub tokens: u64,
    pub busy_s: f64,
    pub wait_upstream_s: f64,
    pub wait_downstream_s: f64,
}

/// Shared by a build's stages and its reporter.
#[derive(Debug)]
pub struct BuildProgress {
    started: Instant,
    /// Documents the source expects to give, when it could count them first.
    expected: OnceLock<u64>,
    stages: [Live; 6],
    /// The highest percentage shown so far (f64 bits), so that it never goes back.
    shown: AtomicU64,
}

impl Default for BuildProgress {
    fn default() -> Self {
        BuildProgress {
            started: Instant::now(),
            expected: OnceLock::new(),
            stages: Default::default(),
            shown: AtomicU64::new(0f64.to_bits()),
        }
    }
}

/// What a build has done so far, as the status endpoint and `inspect active` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Documents read from the source, and of how many (when the source counted them).
    pub documents_read: u64,
    pub documents_expected: Option<u64>,
    /// Chunks cut so far, their tokens, and how far each got.
    pub chunks: u64,
    pub tokens: u64,
    pub chunks_reused: u64,
    pub chunks_embedded: u64,
    pub chunks_stored: u64,
    /// Chunks done (embedded or reused) of the chunks the build will make, 0–99 while running (100 is for the finished record); None while nothing can be told.
    pub percent: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub elapsed_seconds: f64,
}

impl BuildProgress {
    /// The slot of the stage named `name`, if it is one that publishes.
    pub(crate) fn slot(name: &str) -> Option<usize> {
        STAGES.iter().position(|s| *s == name)
    }

    pub(crate) fn publish(&self, slot: usize, items_in: u64, items_out: u64, tokens: u64) {
        let l = &self.stages[slot];
        l.items_in.store(items_in, Relaxed);
        l.items_out.store(items_out, Relaxed);
        l.tokens.store(tokens, Relaxed);
    }

    pub(crate) fn publish_times(
        &self,
        slot: usize,
        busy: std::time::Duration,
        wait_up: std::time::Duration,
        wait_down: std::time::Duration,
    ) {
        let l = &self.stages[slot];
        let us = |d: std::time::Duration| d.as_micros().min(u64::MAX as u128) as u64;
        l.busy_us.store(us(busy), Relaxed);
        l.wait_up_us.store(us(wait_up), Relaxed);
        l.wait_down_us.store(us(wait_down), Relaxed);
    }

    /// Every stage's counts and times now, in pipeline order, and the seconds since the start.
    pub fn stage_times(&self) -> (f64, Vec<StageTimes>) {
        let s = |us: &AtomicU64| us.load(Relaxed) as f64 / 1e6;
        let stages = STAGES
            .iter()
            .zip(&self.stages)
            .map(|(name, l)| StageTimes {
                name,
                items_in: l.items_in.load(Relaxed),
                items_out: l.items_out.load(Relaxed),
                tokens: l.tokens.load(Relaxed),
                busy_s: s(&l.busy_us),
                wait_upstream_s: s(&l.wait_up_us),
                wait_downstream_s: s(&l.wait_down_us),
            })
            .collect();
        (self.started.elapsed().as_secs_f64(), stages)
    }

    /// The source's count, before the first document.
    pub fn expect(&self, documents: u64) {
        let _ = self.expected.set(documents);
    }

    fn get(&self, stage: &str) -> (u64, u64, u64) {
        let l = &self.stages[Self::slot(stage).unwrap_or(0)];
        (
            l.items_in.load(Relaxed),
            l.items_out.load(Relaxed),
            l.tokens.load(Relaxed),
        )
    }

    pub fn snapshot(&self) -> Snapshot {
        let (_, read, _) = self.get("extract");
        let (chunked_docs, _, _) = self.get("clean");
        let (_, chunks, tokens) = self.get("chunk");
        let (_, reused, _) = self.get("reuse");
        let (_, embedded, _) = self.get("embed");
        let (_, stored, _) = self.get("store");
        let expected = self.expected.get().copied();
        let elapsed = self.started.elapsed().as_secs_f64();
        let percent = expected
            .and_then(|e| estimate(e, chunked_docs, chunks, reused + embedded))
            .map(|p| {
                // Never back: a later estimate of the total can be larger than an earlier one.
                let prev = f64::from_bits(self.shown.load(Relaxed));
                let p = p.max(prev);
                self.shown.store(p.to_bits(), Relaxed);
                p
            });
        Snapshot {
            documents_read: read,
            documents_expected: expected,
            chunks,
            tokens,
            chunks_reused: reused,
            chunks_embedded: embedded,
            chunks_stored: stored,
            percent,
            eta_seconds: percent
                .filter(|p| *p >= 1.0)
                .map(|p| elapsed * (100.0 - p) / p),
            elapsed_seconds: elapsed,
        }
    }
}

/// How far a build is, from the chunks done (embedded, or reused with their vectors) of the
/// chunks it will make: those are known once every document is chunked, and until then taken in
/// proportion to the documents chunked so far. Embedding is most of a build's time; the store
/// writes in batches of hundreds, so its count moves too seldom to measure by.
fn estimate(expected: u64, chunked_docs: u64, chunks: u64, done: u64) -> Option<f64> {
    if expected == 0 || chunked_docs == 0 || chunks == 0 {
        return (chunked_docs == 0).then_some(0.0);
    }
    let total = if chunked_docs >= expected {
        chunks as f64
    } else {
        chunks as f64 * expected as f64 / chunked_docs as f64
    };
    Some((100.0 * done as f64 / total).clamp(0.0, RUNNING_CEILING))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_stored_chunks_of_the_chunks_to_come() {
        // (expected, docs chunked, chunks, chunks done) → percent
        for (e, d, c, s, want) in [
            (100, 0, 0, 0, Some(0.0)),
            (100, 50, 200, 0, Some(0.0)),
            // Half the documents gave 200 chunks: 400 to come, 100 done.
            (100, 50, 200, 100, Some(25.0)),
            (100, 100, 400, 200, Some(50.0)),
            // Everything embedded: short of 100 until the record says completed.
            (100, 100, 400, 400, Some(99.0)),
            // Documents that gave no chunk (all empty or duplicates): nothing to tell.
            (100, 10, 0, 0, None),
            (0, 0, 0, 0, Some(0.0)),
        ] {
            assert_eq!(estimate(e, d, c, s), want, "{e} {d} {c} {s}");
        }
    }

    #[test]
    fn a_snapshot_reads_the_stages_and_never_goes_back() {
        let p = BuildProgress::default();
        assert_eq!(p.snapshot().percent, None, "no count from the source");
        p.expect(10);
        let [x, cl, ch, _, em, st] = STAGES.map(|s| BuildProgress::slot(s).unwrap());
        p.publish(x, 0, 10, 0);
        p.publish(cl, 5, 5, 0);
        p.publish(ch, 5, 20, 900);
        p.publish(em, 20, 12, 500);
        p.publish(st, 12, 12, 0);
        let s = p.snapshot();
        assert_eq!((s.documents_read, s.documents_expected), (10, Some(10)));
        assert_eq!(
            (s.chunks, s.tokens, s.chunks_embedded, s.chunks_stored),
            (20, 900, 12, 12)
        );
        assert_eq!(s.percent, Some(30.0), "12 of an expected 40");
        // The rest turn out to give more chunks: the estimate of the total grows.
        p.publish(cl, 10, 10, 0);
        p.publish(ch, 10, 80, 3000);
        assert_eq!(p.snapshot().percent, Some(30.0), "held, not 15");
        p.publish(em, 80, 60, 2000);
        assert_eq!(p.snapshot().percent, Some(75.0));
        assert!(p.snapshot().eta_seconds.is_some());
        p.publish_times(
            em,
            std::time::Duration::from_millis(1500),
            std::time::Duration::from_micros(250),
            std::time::Duration::ZERO,
        );
        let (_, times) = p.stage_times();
        assert_eq!(times.len(), STAGES.len());
        assert_eq!(
            times[em],
            StageTimes {
                name: "embed",
                items_in: 80,
                items_out: 60,
                tokens: 2000,
                busy_s: 1.5,
                wait_upstream_s: 0.00025,
                wait_downstream_s: 0.0,
            }
        );
    }
}
