//! Embed: groups chunks into requests under the embedder's input and token budgets and keeps up
//! to `max_in_flight` requests running at once, handing vectors on in input order.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{until_stopped, StageMeter};
use crate::embed::{EmbedError, Embedder, RequestBatcher};
use crate::error::PipelineError;
use crate::report::StageReport;
use crate::types::{Chunk, EmbeddedChunk};

type Request = BoxFuture<'static, Result<Vec<EmbeddedChunk>, EmbedError>>;

/// Runs until `rx` closes and every request has answered. The report counts chunks (`items`),
/// the bytes of text sent, their tokens, and the requests made: each in its own field.
pub async fn run(
    embedder: Arc<dyn Embedder>,
    mut rx: mpsc::Receiver<Vec<Chunk>>,
    tx: mpsc::Sender<Vec<EmbeddedChunk>>,
    stop: CancellationToken,
    mut meter: StageMeter,
) -> Result<StageReport, PipelineError> {
    let limits = embedder.limits();
    let in_flight = limits.max_in_flight.max(1);
    let mut batcher = RequestBatcher::new(limits);
    let mut ready: VecDeque<Vec<Chunk>> = VecDeque::new();
    let mut pending: FuturesOrdered<Request> = FuturesOrdered::new();
    let mut upstream_done = false;

    loop {
        if stop.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        while pending.len() < in_flight {
            let Some(req) = ready.pop_front() else { break };
            meter.requests += 1;
            meter.bytes_out += req.iter().map(|c| c.text.len() as u64).sum::<u64>();
            pending.push_back(request(embedder.clone(), req));
        }
        // Every wait also watches `stop`: a stalled request must not outlive a soft time limit.
        let answered = if upstream_done {
            if pending.is_empty() {
                break;
            }
            until_stopped(&stop, pending.next()).await?
        } else if pending.is_empty() {
            let got = meter.recv(&mut rx, &stop).await?;
            feed(
                got,
                &mut batcher,
                &mut ready,
                &mut upstream_done,
                &mut meter,
            );
            None
        } else if pending.len() < in_flight {
            // Room for another request: take whichever comes first, an answer or more chunks.
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Err(PipelineError::Cancelled),
                r = pending.next() => r,
                got = rx.recv() => {
                    feed(got, &mut batcher, &mut ready, &mut upstream_done, &mut meter);
                    None
                }
            }
        } else {
            until_stopped(&stop, pending.next()).await?
        };
        if let Some(r) = answered {
            let batch = r?;
            meter.items_out += batch.len() as u64;
            meter.send(&tx, batch).await?;
        }
    }
    Ok(meter.report())
}

/// One embedding request for `chunks`, checked to answer one vector per input.
fn request(embedder: Arc<dyn Embedder>, chunks: Vec<Chunk>) -> Request {
    Box::pin(async move {
        let texts = chunks.iter().map(|c| c.text.clone()).collect();
        let tokens = chunks.iter().map(|c| c.token_count).sum();
        let vectors = embedder.embed_counted(texts, tokens).await?;
        if vectors.len() != chunks.len() {
            return Err(EmbedError::Decode(format!(
                "{} vectors for {} inputs",
                vectors.len(),
                chunks.len()
            )));
        }
        Ok(chunks
            .into_iter()
            .zip(vectors)
            .map(|(chunk, vector)| EmbeddedChunk { chunk, vector })
            .collect())
    })
}

/// Adds received chunks to the open request; the end of input closes it.
fn feed(
    got: Option<Vec<Chunk>>,
    batcher: &mut RequestBatcher<Chunk>,
    ready: &mut VecDeque<Vec<Chunk>>,
    upstream_done: &mut bool,
    meter: &mut StageMeter,
) {
    match got {
        Some(chunks) => {
            for c in chunks {
                meter.items_in += 1;
                meter.tokens += c.token_count as u64;
                let n = c.token_count;
                if let Some(req) = batcher.push(c, n) {
                    ready.push_back(req);
                }
            }
        }
        None => {
            *upstream_done = true;
            if let Some(req) = batcher.take() {
                ready.push_back(req);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::{EmbedLimits, HashingEmbedder, WithLimits};
    use crate::stages::testing::{chunk, drain};

    fn limited(max_inputs: usize) -> Arc<dyn Embedder> {
        Arc::new(WithLimits::new(
            Arc::new(HashingEmbedder::new(16)),
            EmbedLimits {
                max_inputs,
                max_batch_tokens: 10_000,
                max_in_flight: 2,
            },
        ))
    }

    #[tokio::test]
    async fn counts_requests_bytes_and_tokens_apart_and_keeps_order() {
        let (tx, rx) = mpsc::channel(4);
        let (otx, orx) = mpsc::channel(4);
        let texts: Vec<String> = (0..10).map(|i| format!("chunk number {i}")).collect();
        let stage = tokio::spawn(run(
            limited(3),
            rx,
            otx,
            CancellationToken::new(),
            StageMeter::new("embed"),
        ));
        tx.send(texts[..4].iter().map(|t| chunk(1, t)).collect())
            .await
            .unwrap();
        tx.send(texts[4..].iter().map(|t| chunk(1, t)).collect())
            .await
            .unwrap();
        drop(tx);
        let out: Vec<EmbeddedChunk> = drain(orx).await.concat();
        let r = stage.await.unwrap().unwrap();
        let h = HashingEmbedder::new(16);
        assert_eq!(out.len(), 10);
        for (e, t) in out.iter().zip(&texts) {
            assert_eq!(&e.chunk.text, t, "order");
            assert_eq!(e.vector, h.embed_one(t), "each vector is its own text's");
        }
        // 10 chunks at 3 per request: 4 requests; bytes are the texts' own.
        assert_eq!(r.requests, 4);
        assert_eq!(
            r.bytes_out,
            texts.iter().map(|t| t.len() as u64).sum::<u64>()
        );
        assert_eq!(r.tokens, 30);
        assert_eq!((r.items_in, r.items_out), (10, 10));
    }

    #[tokio::test]
    async fn a_failed_request_ends_the_stage_with_its_error() {
        struct Broken;
        #[async_trait::async_trait]
        impl Embedder for Broken {
            fn model_id(&self) -> &str {
                "broken"
            }
            fn dimension(&self) -> usize {
                4
            }
            fn limits(&self) -> EmbedLimits {
                EmbedLimits {
                    max_inputs: 8,
                    max_batch_tokens: 100,
                    max_in_flight: 1,
                }
            }
            async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
                Ok(vec![vec![0.0; 4]; texts.len() + 1])
            }
        }
        let (tx, rx) = mpsc::channel(1);
        let (otx, _orx) = mpsc::channel(1);
        tx.send(vec![chunk(1, "x")]).await.unwrap();
        drop(tx);
        let r = run(
            Arc::new(Broken),
            rx,
            otx,
            CancellationToken::new(),
            StageMeter::new("embed"),
        )
        .await;
        assert!(
            matches!(r, Err(PipelineError::Embed(EmbedError::Decode(_)))),
            "{r:?}"
        );
    }
}
