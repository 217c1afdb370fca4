//! Reuse: a chunk whose (user, content hash) already has a vector in the store keeps it and goes
//! straight to the store; the rest go on to the embedder. Off for a full re-embed, when every
//! chunk passes through.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{until_stopped, StageMeter};
use crate::error::PipelineError;
use crate::report::StageReport;
use crate::store::VectorStore;
use crate::types::{Chunk, EmbeddedChunk};

/// Runs until `rx` closes. `store` None: nothing is reused. The report's `items_in` counts every
/// chunk, `items_out` those reused (sent to the store), `requests` the store lookups.
pub async fn run(
    store: Option<Arc<dyn VectorStore>>,
    mut rx: mpsc::Receiver<Vec<Chunk>>,
    to_embed: mpsc::Sender<Vec<Chunk>>,
    to_store: mpsc::Sender<Vec<EmbeddedChunk>>,
    stop: CancellationToken,
    mut meter: StageMeter,
) -> Result<StageReport, PipelineError> {
    while let Some(chunks) = meter.recv(&mut rx, &stop).await? {
        meter.items_in += chunks.len() as u64;
        let (todo, done) = match &store {
            Some(s) if !chunks.is_empty() => {
                meter.requests += 1;
                until_stopped(&stop, split_reusable(s.as_ref(), chunks)).await??
            }
            _ => (chunks, Vec::new()),
        };
        if !done.is_empty() {
            meter.items_out += done.len() as u64;
            meter.bytes_out += done.iter().map(|c| c.chunk.text.len() as u64).sum::<u64>();
            meter.send(&to_store, done).await?;
        }
        if !todo.is_empty() {
            meter.send(&to_embed, todo).await?;
        }
    }
    Ok(meter.report())
}

/// Splits off the chunks whose vector the store already holds and returns them ready for the
/// store; the rest still need the embedder.
async fn split_reusable(
    store: &dyn VectorStore,
    chunks: Vec<Chunk>,
) -> Result<(Vec<Chunk>, Vec<EmbeddedChunk>), PipelineError> {
    let keys: Vec<(i64, &str)> = chunks
        .iter()
        .map(|c| (c.user_id, c.content_hash.as_str()))
        .collect();
    let found = store.vectors_by_hash(&keys).await?;
    drop(keys);
    if found.is_empty() {
        return Ok((chunks, Vec::new()));
    }
    let (mut todo, mut done) = (Vec::with_capacity(chunks.len()), Vec::new());
    for c in chunks {
        // Two chunks with the same text (a repeated message) share one stored vector.
        let hit = found
            .get(&c.user_id)
            .and_then(|m| m.get(c.content_hash.as_str()));
        match hit {
            Some(v) => done.push(EmbeddedChunk {
                vector: v.clone(),
                chunk: c,
            }),
            None => todo.push(c),
        }
    }
    Ok((todo, done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::HashingEmbedder;
    use crate::stages::testing::{chunk, drain};
    use crate::store::SqliteStore;

    #[tokio::test]
    async fn stored_vectors_go_to_the_store_the_rest_to_the_embedder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
        store.ensure_model("hashing-8", 8).await.unwrap();
        let gen = store.begin_build().await.unwrap();
        let known = chunk(1, "already embedded");
        let vector = HashingEmbedder::new(8).embed_one(&known.text);
        store
            .upsert(
                gen,
                &[EmbeddedChunk {
                    chunk: known.clone(),
                    vector: vector.clone(),
                }],
            )
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (etx, erx) = mpsc::channel(4);
        let (stx, srx) = mpsc::channel(4);
        // The same text of another user is that user's to embed: never another user's vector.
        tx.send(vec![
            known.clone(),
            chunk(1, "new text"),
            chunk(2, "already embedded"),
        ])
        .await
        .unwrap();
        drop(tx);
        let dyn_store: Arc<dyn VectorStore> = store;
        let r = run(
            Some(dyn_store),
            rx,
            etx,
            stx,
            CancellationToken::new(),
            StageMeter::new("reuse"),
        )
        .await
        .unwrap();
        let to_embed: Vec<Chunk> = drain(erx).await.into_iter().flatten().collect();
        let to_store: Vec<EmbeddedChunk> = drain(srx).await.into_iter().flatten().collect();
        assert_eq!(to_store.len(), 1);
        assert_eq!(to_store[0].vector, vector);
        assert_eq!(
            to_embed
                .iter()
                .map(|c| (c.user_id, c.text.as_str()))
                .collect::<Vec<_>>(),
            [(1, "new text"), (2, "already embedded")]
        );
        assert_eq!((r.items_in, r.items_out, r.requests), (3, 1, 1));
    }

    #[tokio::test]
    async fn without_a_store_every_chunk_passes_through() {
        let (tx, rx) = mpsc::channel(4);
        let (etx, erx) = mpsc::channel(4);
        let (stx, srx) = mpsc::channel(4);
        tx.send(vec![chunk(1, "a"), chunk(1, "b")]).await.unwrap();
        drop(tx);
        let r = run(
            None,
            rx,
            etx,
            stx,
            CancellationToken::new(),
            StageMeter::new("reuse"),
        )
        .await
        .unwrap();
        assert_eq!(drain(erx).await.concat().len(), 2);
        assert!(drain(srx).await.is_empty());
        assert_eq!((r.items_in, r.items_out, r.requests), (2, 0, 0));
    }
}
