//! Settling finished messages: results written first, then acks, re-publishes and dead letters
//! in one broker transaction, batched across tasks and retried until Redis takes them.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::Shared;
use crate::celery::redis::Settlement;

/// Finished messages settled per round trip. Large enough that a burst of short tasks costs a
/// few round trips in all, small enough that one transaction stays well under a millisecond.
pub const SETTLE_BATCH: usize = 256;
/// Completions waiting for the settler. Every sender holds a message, and messages are bounded
/// by the prefetch limit (ETA messages aside), so this rarely fills; when it does, tasks wait.
pub const SETTLE_QUEUE: usize = 1024;

/// What to do with a message once its task is over.
#[derive(Debug)]
pub enum Action {
    /// Remove it from `unacked`.
    Ack,
    /// Publish the retry and ack the original, atomically.
    Retry { list: String, envelope: String },
    /// Keep it in the dead-letter list; ack it when it was registered.
    DeadLetter { record: String, ack: bool },
    /// Put it back on its queue, marked redelivered (warm shutdown, abandoned work).
    GiveBack,
}

pub struct Completion {
    pub delivery_tag: Option<String>,
    /// (task id, meta JSON) to store before the message is acked.
    pub result: Option<(String, String)>,
    pub action: Action,
    /// The message's prefetch slot, held for its drop: freed once the message is settled.
    #[allow(dead_code)]
    pub permit: Option<OwnedSemaphorePermit>,
}

pub enum SettleMsg {
    Done(Completion),
    /// Everything before it is settled; then the settler returns.
    Stop,
}

/// Runs `op` until it succeeds, with backoff, and an error line every few seconds so an outage
/// is never silent.
pub async fn persist<T, E, F, Fut>(what: &str, op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display + Sync,
{
    match persist_unless(what, op, |_| false).await {
        Ok(v) => v,
        Err(_) => unreachable!("no error is fatal"),
    }
}

/// `persist`, except that an error `fatal` says no wait can fix (a refused TLS certificate)
/// ends it at once with that error.
pub async fn persist_unless<T, E, F, Fut>(
    what: &str,
    mut op: F,
    fatal: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display + Sync,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Ok(v) => {
                backoff.recovered(what);
                return Ok(v);
            }
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => backoff.wait(what, &e).await,
        }
    }
}

/// Reconnection pacing: the shared backoff (`orbit_pipeline::retry::Backoff`) from 100 ms to 5 s,
/// without jitter (one worker, one connection: no herd to spread); one error line per 5 s at most.
#[derive(Default)]
pub struct Backoff {
    last_log: Option<Instant>,
    failures: u32,
}

const RECONNECT: orbit_pipeline::retry::Backoff = orbit_pipeline::retry::Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(5),
};
const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

impl Backoff {
    pub async fn wait(&mut self, what: &str, e: &(dyn std::fmt::Display + Sync)) {
        let delay = RECONNECT.ceiling(self.failures);
        self.failures += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
            tracing::error!(
                operation = what,
                failures = self.failures,
                retry_in_ms = delay.as_millis() as u64,
                "cannot reach redis: {e}; retrying"
            );
            self.last_log = Some(Instant::now());
        }
        tokio::time::sleep(delay).await;
    }

    pub fn recovered(&mut self, what: &str) {
        if self.failures > 0 {
            tracing::warn!(operation = what, failures = self.failures, "redis is back");
        }
        *self = Backoff::default();
    }
}

/// The settler: one task per worker, so results and acks of concurrent tasks share round trips.
pub async fn settler(sh: Arc<Shared>, mut rx: mpsc::Receiver<SettleMsg>) {
    let mut batch: Vec<Completion> = Vec::with_capacity(SETTLE_BATCH);
    loop {
        let mut stop = false;
        match rx.recv().await {
            Some(SettleMsg::Done(c)) => batch.push(c),
            Some(SettleMsg::Stop) | None => stop = true,
        }
        while !stop && batch.len() < SETTLE_BATCH {
            match rx.try_recv() {
                Ok(SettleMsg::Done(c)) => batch.push(c),
                Ok(SettleMsg::Stop) => stop = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            settle(&sh, &mut batch).await;
        }
        if stop {
            return;
        }
    }
}

async fn settle(sh: &Shared, batch: &mut Vec<Completion>) {
    let results: Vec<(String, String)> = batch.iter_mut().filter_map(|c| c.result.take()).collect();
    let mut s = Settlement {
        dead_max: sh.broker.dead_letters.max_entries,
        ..Default::default()
    };
    let mut give_back = Vec::new();
    for c in batch.iter_mut() {
        let tag = c.delivery_tag.clone();
        match std::mem::replace(&mut c.action, Action::Ack) {
            Action::Ack => s.acks.extend(tag),
            Action::Retry { list, envelope } => {
                s.publish.push((list, envelope));
                s.acks.extend(tag);
            }
            Action::DeadLetter { record, ack } => {
                s.dead.push(record);
                if ack {
                    s.acks.extend(tag);
                }
            }
            Action::GiveBack => give_back.extend(tag),
        }
    }
    if sh.shared_redis {
        persist("store results and ack", || {
            sh.backend.store_and_settle(&results, &s)
        })
        .await;
    } else {
        // Results first: an ack must never land for a result that did not.
        persist("store results", || sh.backend.store(&results)).await;
        persist("ack", || sh.broker.settle(&s)).await;
    }
    let mut restored = 0;
    for tag in &give_back {
        if persist("restore", || sh.broker.restore_tag(tag)).await {
            restored += 1;
        }
    }
    if restored > 0 {
        tracing::warn!(
            count = restored,
            "Restoring {restored} unacknowledged message(s)"
        );
    }
    sh.release(batch.iter().filter_map(|c| c.delivery_tag.as_deref()));
    batch.clear(); // frees the prefetch slots
}
