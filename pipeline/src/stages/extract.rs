//! Extract: reads the source's stream of document batches into the clean/chunk stage's channel.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{until_stopped, StageMeter};
use crate::error::PipelineError;
use crate::report::StageReport;
use crate::source::{SourceBatch, SourceStream};

/// Called with the input bytes of each batch read.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// Forwards every batch of `stream` until it ends; its first error ends the build, and so does
/// reading more than `max_docs` documents.
pub async fn run(
    mut stream: SourceStream,
    tx: mpsc::Sender<SourceBatch>,
    stop: CancellationToken,
    progress: Option<ProgressFn>,
    mut meter: StageMeter,
    max_docs: Option<u64>,
) -> Result<StageReport, PipelineError> {
    while let Some(batch) = until_stopped(&stop, stream.next()).await? {
        let batch = batch?;
        meter.items_out += batch.docs.len() as u64;
        if let Some(max) = max_docs.filter(|m| meter.items_out > *m) {
            return Err(PipelineError::Limit(format!(
                "the build read more than {max} documents, the per-build limit \
                 (ORBIT_MAX_DOCUMENTS_PER_BUILD); nothing was swept"
            )));
        }
        meter.bytes_out += batch.bytes;
        // The reader works ahead on its own thread: its busy time is what it measured.
        meter.add_busy(batch.busy);
        if let Some(p) = &progress {
            p(batch.bytes);
        }
        meter.send(&tx, batch).await?;
    }
    Ok(meter.report())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;
    use crate::stages::testing::{doc, drain};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn batch(n: usize) -> SourceBatch {
        SourceBatch {
            docs: Vec::new(),
            bytes: n as u64,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn forwards_every_batch_and_reports_progress() {
        let stream: SourceStream =
            Box::pin(futures::stream::iter(vec![Ok(batch(10)), Ok(batch(32))]));
        let (tx, rx) = mpsc::channel(1);
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let progress: ProgressFn = Arc::new(move |b| {
            s2.fetch_add(b, Ordering::SeqCst);
        });
        let stage = tokio::spawn(run(
            stream,
            tx,
            CancellationToken::new(),
            Some(progress),
            StageMeter::new("extract"),
            None,
        ));
        let got = drain(rx).await;
        let r = stage.await.unwrap().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((r.name, r.bytes_out), ("extract", 42));
        assert_eq!(seen.load(Ordering::SeqCst), 42);
    }

    #[tokio::test]
    async fn a_source_error_ends_the_stage_with_it() {
        let stream: SourceStream = Box::pin(futures::stream::iter(vec![
            Ok(batch(1)),
            Err(SourceError::Query("connection reset".into())),
        ]));
        let (tx, rx) = mpsc::channel(4);
        let r = run(
            stream,
            tx,
            CancellationToken::new(),
            None,
            StageMeter::new("extract"),
            None,
        )
        .await;
        assert!(matches!(r, Err(PipelineError::Source(_))), "{r:?}");
        assert_eq!(drain(rx).await.len(), 1);
    }

    /// Issue 13, limits: a build that reads past its document cap fails, naming the limit.
    #[tokio::test]
    async fn reading_past_the_document_cap_fails_the_build() {
        let docs = |n: usize| SourceBatch {
            docs: (0..n).map(|i| doc(1, &i.to_string(), "x")).collect(),
            ..Default::default()
        };
        for (cap, ok) in [(5u64, true), (4, false)] {
            let stream: SourceStream =
                Box::pin(futures::stream::iter(vec![Ok(docs(3)), Ok(docs(2))]));
            let (tx, rx) = mpsc::channel(4);
            let r = run(
                stream,
                tx,
                CancellationToken::new(),
                None,
                StageMeter::new("extract"),
                Some(cap),
            )
            .await;
            drain(rx).await;
            match r {
                Ok(_) => assert!(ok, "cap {cap}"),
                Err(PipelineError::Limit(m)) => {
                    assert!(!ok, "cap {cap}");
                    assert!(m.contains("ORBIT_MAX_DOCUMENTS_PER_BUILD"), "{m}");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}
