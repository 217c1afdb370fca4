//! Extract: the `Source` trait and its implementations, yielding documents as a bounded stream.

mod jsonl;
mod postgres;

use std::pin::Pin;

use futures::Stream;

use crate::types::RawDocument;
pub use crate::types::{BuildScope, Rejection};

pub use jsonl::{parse_line, JsonlSource};
pub use postgres::{KindQuery, PostgresSource};

/// Documents per batch a source hands on: large enough that channel hand-offs are noise next to
/// cleaning the batch, small enough that a batch of long documents stays a few MB.
pub const SOURCE_BATCH_DOCS: usize = 1024;
/// Bytes per batch a source hands on, whichever of the two limits comes first.
pub const SOURCE_BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source path {path}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("source query failed: {0}")]
    Query(String),
    #[error("source reader crashed: {0}")]
    Crashed(String),
}

impl crate::retry::Retryable for SourceError {
    /// A missing file will still be missing on retry; a dropped connection may not be.
    fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Query(_))
    }
}

/// What a source yields: documents plus the inputs it had to reject on the way.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub docs: Vec<RawDocument>,
    /// Bytes of input read for these documents (for throughput).
    pub bytes: u64,
    pub rejected: Vec<Rejection>,
    /// Time the source spent producing this batch (reading, decompressing, parsing), measured
    /// where the work happens, which may be another thread.
    pub busy: std::time::Duration,
}

/// Turns a crashed reader into an error the build sees: without it, a panic would close the
/// channel and the build would end "successfully" on half its documents.
pub(crate) fn watch_reader(
    tx: tokio::sync::mpsc::Sender<Result<SourceBatch, SourceError>>,
    reader: tokio::task::JoinHandle<()>,
) {
    tokio::spawn(async move {
        if let Err(e) = reader.await {
            if e.is_panic() {
                let _ = tx
                    .send(Err(SourceError::Crashed(crate::panic_text(e.into_panic()))))
                    .await;
            }
        }
    });
}

pub type SourceStream = Pin<Box<dyn Stream<Item = Result<SourceBatch, SourceError>> + Send>>;

pub trait Source: Send + Sync {
    /// Streams the documents in `scope`. Input-level problems come back as `Rejection`s inside
    /// batches; an `Err` item ends the build.
    fn documents(&self, scope: &BuildScope) -> SourceStream;
    /// Total input size in bytes when known up front (drives the progress bar).
    fn size_hint_bytes(&self) -> Option<u64> {
        None
    }
    /// How many documents `scope` holds, when the source can tell cheaply before reading them
    /// (a count query): a build's progress is shown against it. None: not known.
    fn count(&self, _scope: &BuildScope) -> CountFuture<'_> {
        Box::pin(async { Ok(None) })
    }
    /// A short human description for logs.
    fn describe(&self) -> String;
}

pub type CountFuture<'a> =
    Pin<Box<dyn std::future::Future<Output = Result<Option<u64>, SourceError>> + Send + 'a>>;

/// Every user with a document in `source`, ascending: what a run over all users fans out over.
/// Reads the whole source once (documents are not kept).
pub async fn user_ids(source: &dyn Source) -> Result<Vec<i64>, SourceError> {
    use futures::StreamExt;
    let mut users = std::collections::BTreeSet::new();
    let mut stream = source.documents(&BuildScope::AllUsers);
    while let Some(batch) = stream.next().await {
        users.extend(batch?.docs.iter().map(|d| d.user_id));
    }
    Ok(users.into_iter().collect())
}
