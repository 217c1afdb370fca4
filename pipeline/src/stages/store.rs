//! Store: upserts embedded chunks in batches under the build's generation, from both the embed
//! and the reuse stage, until every sender is done.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StageMeter;
use crate::error::PipelineError;
use crate::report::StageReport;
use crate::store::{BuildGeneration, VectorStore};
use crate::types::EmbeddedChunk;

/// Points per store transaction: amortises the commit, keeps a failed batch cheap to redo.
pub const STORE_BATCH_POINTS: usize = 512;

/// Runs until `rx` closes; `items_out` is the points upserted, `requests` the transactions.
pub async fn run(
    store: Arc<dyn VectorStore>,
    gen: BuildGeneration,
    mut rx: mpsc::Receiver<Vec<EmbeddedChunk>>,
    stop: CancellationToken,
    mut meter: StageMeter,
) -> Result<StageReport, PipelineError> {
    let mut buf: Vec<EmbeddedChunk> = Vec::with_capacity(STORE_BATCH_POINTS);
    loop {
        let got = meter.recv(&mut rx, &stop).await?;
        let last = got.is_none();
        if let Some(b) = got {
            meter.items_in += b.len() as u64;
            buf.extend(b);
        }
        while buf.len() >= STORE_BATCH_POINTS || (last && !buf.is_empty()) {
            let n = buf.len().min(STORE_BATCH_POINTS);
            let part: Vec<EmbeddedChunk> = buf.drain(..n).collect();
            store.upsert(gen, &part).await?;
            meter.requests += 1;
            meter.items_out += n as u64;
            meter.publish();
        }
        if last {
            return Ok(meter.report());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::HashingEmbedder;
    use crate::stages::testing::chunk;
    use crate::store::{NullStore, StoreError};

    fn points(n: usize, dim: usize) -> Vec<EmbeddedChunk> {
        let h = HashingEmbedder::new(dim);
        (0..n)
            .map(|i| {
                let c = chunk(1, &format!("point {i}"));
                EmbeddedChunk {
                    vector: h.embed_one(&c.text),
                    chunk: c,
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn upserts_in_batches_until_every_sender_is_done() {
        let store = Arc::new(NullStore::default());
        store.ensure_model("m", 8).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let tx2 = tx.clone();
        let stage = tokio::spawn(run(
            store,
            1,
            rx,
            CancellationToken::new(),
            StageMeter::new("store"),
        ));
        tx.send(points(STORE_BATCH_POINTS + 10, 8)).await.unwrap();
        drop(tx);
        tx2.send(points(5, 8)).await.unwrap();
        drop(tx2);
        let r = stage.await.unwrap().unwrap();
        assert_eq!(r.items_out, STORE_BATCH_POINTS as u64 + 15);
        assert_eq!(r.requests, 2, "one full batch, then the rest at the end");
    }

    #[tokio::test]
    async fn a_store_error_ends_the_stage() {
        let store = Arc::new(NullStore::default());
        store.ensure_model("m", 4).await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        tx.send(points(3, 8)).await.unwrap();
        drop(tx);
        let r = run(
            store,
            1,
            rx,
            CancellationToken::new(),
            StageMeter::new("store"),
        )
        .await;
        assert!(
            matches!(
                r,
                Err(PipelineError::Store(StoreError::Dimension {
                    got: 8,
                    want: 4
                }))
            ),
            "{r:?}"
        );
    }
}
