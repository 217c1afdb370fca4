//! The stages of a build, one file each, joined by bounded channels: extract → clean_chunk →
//! reuse → embed → store (reuse also sends straight to store). Each stage has one entry point
//! taking its channels, a stop token and its `StageMeter`, and returns its `StageReport`.

pub mod clean_chunk;
pub mod embed;
pub mod extract;
pub mod reuse;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::PipelineError;
use crate::progress::BuildProgress;
use crate::report::StageReport;

/// Times a stage: how long it waited on the previous stage (receives) and on the next (sends),
/// and counts what it did. Busy time is what is left of the stage's wall time.
#[derive(Debug)]
pub struct StageMeter {
    name: &'static str,
    started: Instant,
    wait_up: Duration,
    wait_down: Duration,
    /// Work measured where it happened (another thread): replaces wall minus waits.
    measured_busy: Option<Duration>,
    pub items_in: u64,
    pub items_out: u64,
    pub bytes_out: u64,
    pub tokens: u64,
    pub requests: u64,
    /// Where the counts go as batches move on, for a build's live progress.
    live: Option<(Arc<BuildProgress>, usize)>,
}

impl StageMeter {
    /// Publishes this stage's counts into `p` at every hand-on and [`StageMeter::publish`].
    pub fn publishing(mut self, p: &Arc<BuildProgress>) -> Self {
        self.live = BuildProgress::slot(self.name).map(|slot| (p.clone(), slot));
        self
    }

    /// The counts now, to the build's live progress (a stage that hands nothing on calls it).
    pub fn publish(&self) {
        if let Some((p, slot)) = &self.live {
            p.publish(*slot, self.items_in, self.items_out, self.tokens);
            let (busy, wait_down) = self.times();
            p.publish_times(*slot, busy, self.wait_up, wait_down);
        }
    }

    /// (busy, waited on the next stage) so far: wall minus both waits, or the work the stage
    /// measured on its own thread.
    fn times(&self) -> (Duration, Duration) {
        let wall = self.started.elapsed();
        match self.measured_busy {
            // The work ran ahead on its own thread: the rest of the stage's life it was blocked
            // on the next stage.
            Some(b) => (b, wall.saturating_sub(b).max(self.wait_down)),
            None => (
                wall.saturating_sub(self.wait_up + self.wait_down),
                self.wait_down,
            ),
        }
    }

    pub fn new(name: &'static str) -> Self {
        StageMeter {
            name,
            started: Instant::now(),
            wait_up: Duration::ZERO,
            wait_down: Duration::ZERO,
            measured_busy: None,
            items_in: 0,
            items_out: 0,
            bytes_out: 0,
            tokens: 0,
            requests: 0,
            live: None,
        }
    }

    /// The next input, timed as waiting upstream; `Cancelled` when the build stops first.
    pub async fn recv<T>(
        &mut self,
        rx: &mut mpsc::Receiver<T>,
        stop: &CancellationToken,
    ) -> Result<Option<T>, PipelineError> {
        let t = Instant::now();
        let got = until_stopped(stop, rx.recv()).await;
        self.wait_up += t.elapsed();
        got
    }

    /// Hands `v` on, timed as waiting downstream.
    pub async fn send<T>(&mut self, tx: &mpsc::Sender<T>, v: T) -> Result<(), PipelineError> {
        self.publish();
        let t = Instant::now();
        let r = tx.send(v).await.map_err(|_| PipelineError::Cancelled);
        self.wait_down += t.elapsed();
        r
    }

    /// `recv` for a stage on a blocking thread.
    pub fn blocking_recv<T>(&mut self, rx: &mut mpsc::Receiver<T>) -> Option<T> {
        let t = Instant::now();
        let got = rx.blocking_recv();
        self.wait_up += t.elapsed();
        got
    }

    /// `send` for a stage on a blocking thread.
    pub fn blocking_send<T>(&mut self, tx: &mpsc::Sender<T>, v: T) -> Result<(), PipelineError> {
        self.publish();
        let t = Instant::now();
        let r = tx.blocking_send(v).map_err(|_| PipelineError::Cancelled);
        self.wait_down += t.elapsed();
        r
    }

    /// Work done elsewhere (a reader thread) that the stage measured itself.
    pub fn add_busy(&mut self, d: Duration) {
        *self.measured_busy.get_or_insert(Duration::ZERO) += d;
    }

    pub fn report(&self) -> StageReport {
        let (busy, wait_down) = self.times();
        StageReport {
            name: self.name,
            items_in: self.items_in,
            items_out: self.items_out,
            bytes_out: self.bytes_out,
            tokens: self.tokens,
            requests: self.requests,
            busy_ms: ms(busy),
            wait_upstream_ms: ms(self.wait_up),
            wait_downstream_ms: ms(wait_down),
        }
    }
}

/// The stop token of a build and its root cause: the first error of any stage that is not the
/// "cancelled" it caused in the others.
pub struct FirstFailure {
    pub stop: CancellationToken,
    first: std::sync::Mutex<Option<PipelineError>>,
}

impl FirstFailure {
    pub fn new(stop: CancellationToken) -> Self {
        FirstFailure {
            stop,
            first: std::sync::Mutex::new(None),
        }
    }

    /// Runs a stage: its value, or None after recording its failure and stopping the others.
    pub async fn watch<T>(
        &self,
        stage: impl std::future::Future<Output = Result<T, PipelineError>>,
    ) -> Option<T> {
        match stage.await {
            Ok(v) => Some(v),
            Err(e) => {
                self.stop.cancel();
                if let Ok(mut first) = self.first.lock() {
                    if first
                        .as_ref()
                        .is_none_or(|f| matches!(f, PipelineError::Cancelled))
                    {
                        *first = Some(e);
                    }
                }
                None
            }
        }
    }

    /// The root cause; `Cancelled` when the build was only cancelled.
    pub fn take(&self) -> PipelineError {
        self.first
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or(PipelineError::Cancelled)
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Awaits `f` unless the build is stopped first.
pub(crate) async fn until_stopped<T>(
    stop: &CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Result<T, PipelineError> {
    tokio::select! {
        _ = stop.cancelled() => Err(PipelineError::Cancelled),
        v = f => Ok(v),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the stage tests share: a document or a chunk made from text, and draining a channel.
    use crate::types::{Chunk, DocKind, RawDocument};

    pub fn chunk(user_id: i64, text: &str) -> Chunk {
        Chunk::note(user_id, &format!("s-{text}"), text)
    }

    pub fn doc(user_id: i64, id: &str, text: &str) -> RawDocument {
        RawDocument {
            user_id,
            kind: DocKind::Note,
            source_id: id.into(),
            text: text.into(),
            created_at: chrono::DateTime::UNIX_EPOCH,
            conversation_id: None,
            title: None,
            author: None,
            meta: None,
        }
    }

    pub async fn drain<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(v) = rx.recv().await {
            out.push(v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_meter_counts_waits_on_both_sides() {
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        let mut m = StageMeter::new("t");
        let stop = CancellationToken::new();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(1).await.unwrap();
        });
        assert_eq!(m.recv(&mut rx, &stop).await.unwrap(), Some(1));
        producer.await.unwrap();
        assert_eq!(m.recv(&mut rx, &stop).await.unwrap(), None);
        let r = m.report();
        assert!(r.wait_upstream_ms >= 25.0, "{r:?}");
        assert_eq!(r.wait_downstream_ms, 0.0);
        stop.cancel();
        let (_tx, mut rx) = mpsc::channel::<u32>(1);
        assert!(matches!(
            m.recv(&mut rx, &stop).await,
            Err(PipelineError::Cancelled)
        ));
    }
}
