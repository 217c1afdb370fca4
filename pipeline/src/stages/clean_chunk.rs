//! Clean and chunk: on the build's rayon pool, off the async runtime, batch by batch. Cleaning
//! drops empty and duplicate documents; chunking cuts long ones and packs short chat messages,
//! then gives every chunk its lexical terms.
//! One thread drives both, so it reports two stages: `clean` and `chunk`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StageMeter;
use crate::chunk::{Chunker, Packer, Split};
use crate::clean::{Cleaner, Deduper};
use crate::error::PipelineError;
use crate::progress::BuildProgress;
use crate::report::{DocCounts, StageReport};
use crate::source::SourceBatch;
use crate::types::Chunk;

/// What the stage hands back: its two stage reports and the document counts.
#[derive(Debug)]
pub struct CleanChunkReport {
    pub clean: StageReport,
    pub chunk: StageReport,
    pub docs: DocCounts,
}

/// `run` on a blocking thread, off the async runtime.
pub async fn spawn(
    chunker: Chunker,
    pool: Arc<rayon::ThreadPool>,
    rx: mpsc::Receiver<SourceBatch>,
    tx: mpsc::Sender<Vec<Chunk>>,
    stop: CancellationToken,
    max_document_bytes: usize,
    progress: Option<Arc<BuildProgress>>,
) -> Result<CleanChunkReport, PipelineError> {
    tokio::task::spawn_blocking(move || {
        run(chunker, pool, rx, tx, stop, max_document_bytes, progress)
    })
    .await
    .map_err(|e| PipelineError::Internal(e.to_string()))?
}

/// Runs until `rx` closes. Blocking: call it from `spawn_blocking`. A document's text past
/// `max_document_bytes` is cut there first, on a character boundary, and counted.
pub fn run(
    chunker: Chunker,
    pool: Arc<rayon::ThreadPool>,
    mut rx: mpsc::Receiver<SourceBatch>,
    tx: mpsc::Sender<Vec<Chunk>>,
    stop: CancellationToken,
    max_document_bytes: usize,
    progress: Option<Arc<BuildProgress>>,
) -> Result<CleanChunkReport, PipelineError> {
    let cleaner = Cleaner::new();
    let mut dedup = Deduper::default();
    let mut packer = Packer::new(chunker.settings().clone());
    // Waiting on the reader counts for clean, waiting on the next stage for chunk.
    let (mut clean, mut chunk) = (StageMeter::new("clean"), StageMeter::new("chunk"));
    if let Some(p) = &progress {
        (clean, chunk) = (clean.publishing(p), chunk.publishing(p));
    }
    let mut clean_busy = Duration::ZERO;
    let mut docs = DocCounts::default();

    loop {
        if stop.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let Some(mut batch) = clean.blocking_recv(&mut rx) else {
            break;
        };
        for d in batch.docs.iter_mut() {
            if d.text.len() > max_document_bytes {
                let at = crate::clean::floor_char_boundary(&d.text, max_document_bytes);
                d.text.truncate(at);
                docs.truncated += 1;
            }
        }
        docs.documents_read += batch.docs.len() as u64;
        docs.bytes_read += batch.bytes;
        docs.add_rejections(batch.rejected);

        let tc = Instant::now();
        let cleaned: Vec<_> = pool.install(|| {
            batch
                .docs
                .into_par_iter()
                .map(|d| cleaner.clean(d))
                .collect()
        });
        let mut kept = Vec::with_capacity(cleaned.len());
        for d in cleaned {
            match d {
                None => docs.empty_dropped += 1,
                Some(d) if !dedup.first_time(&d) => docs.duplicates_dropped += 1,
                Some(d) => {
                    clean.bytes_out += d.text.len() as u64;
                    kept.push(d);
                }
            }
        }
        docs.documents_kept += kept.len() as u64;
        clean_busy += tc.elapsed();
        (clean.items_in, clean.items_out) = (docs.documents_read, docs.documents_kept);
        clean.publish();

        let splits: Vec<Split> =
            pool.install(|| kept.into_par_iter().map(|d| chunker.split(d)).collect());
        let mut out = Vec::with_capacity(splits.len());
        for s in splits {
            match s {
                Split::Chunks(c) => out.extend(c),
                Split::Packable(item) => {
                    docs.packed_messages += 1;
                    packer.push(item, &mut out);
                }
            }
        }
        if chunker.settings().lexical_terms {
            add_terms(&pool, &mut out);
        }
        send(&mut chunk, &mut docs.overlap_tokens, &tx, out)?;
    }
    let mut tail = Vec::new();
    packer.finish(&mut tail);
    if chunker.settings().lexical_terms {
        add_terms(&pool, &mut tail);
    }
    send(&mut chunk, &mut docs.overlap_tokens, &tx, tail)?;

    if docs.truncated > 0 {
        tracing::warn!(
            documents = docs.truncated,
            limit_bytes = max_document_bytes,
            "documents over the size limit were cut to it"
        );
    }
    clean.items_in = docs.documents_read;
    clean.items_out = docs.documents_kept;
    chunk.items_in = docs.documents_kept;
    docs.chunks = chunk.items_out;
    docs.tokens = chunk.tokens;
    let mut clean_r = clean.report();
    let mut chunk_r = chunk.report();
    // The chunk meter's wall time covers cleaning and the reader waits too: take them out.
    clean_r.busy_ms = super::ms(clean_busy);
    clean_r.wait_downstream_ms = 0.0;
    chunk_r.busy_ms = (chunk_r.busy_ms - clean_r.busy_ms - clean_r.wait_upstream_ms).max(0.0);
    Ok(CleanChunkReport {
        clean: clean_r,
        chunk: chunk_r,
        docs,
    })
}

/// Each chunk's lexical terms, on the pool: the normalisation is CPU work the store's single
/// writer should not do.
fn add_terms(pool: &rayon::ThreadPool, chunks: &mut [Chunk]) {
    pool.install(|| {
        chunks.par_iter_mut().for_each(|c| {
            c.terms = crate::lexical::index_terms(c.title.as_deref(), &c.text);
        })
    });
}

/// Hands a batch on, counting its chunks, text, tokens and overlap tokens. A document's chunks
/// are cut together, so they sit side by side in one batch.
fn send(
    meter: &mut StageMeter,
    overlap: &mut u64,
    tx: &mpsc::Sender<Vec<Chunk>>,
    batch: Vec<Chunk>,
) -> Result<(), PipelineError> {
    if batch.is_empty() {
        return Ok(());
    }
    meter.items_out += batch.len() as u64;
    for c in &batch {
        meter.bytes_out += c.text.len() as u64;
        meter.tokens += c.token_count as u64;
    }
    *overlap += overlap_tokens(&batch);
    meter.blocking_send(tx, batch)
}

/// Tokens each chunk shares with the one before it of the same document.
fn overlap_tokens(batch: &[Chunk]) -> u64 {
    batch
        .windows(2)
        .filter(|w| w[1].chunk_index > 0 && w[1].chunk_index == w[0].chunk_index + 1)
        .filter(|w| w[0].user_id == w[1].user_id && w[0].source_ids == w[1].source_ids)
        .map(|w| w[0].token_end.saturating_sub(w[1].token_start) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkSettings;
    use crate::stages::testing::doc;

    #[test]
    fn cleans_dedups_and_chunks_over_channels() {
        let pool = crate::settings::cpu_pool(2).unwrap();
        let chunker = Chunker::new(ChunkSettings::default()).unwrap();
        let (in_tx, in_rx) = mpsc::channel(2);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let long =
            "The ferry to Cacilhas leaves every twenty minutes from Cais do Sodré. ".repeat(200);
        let batch = SourceBatch {
            docs: vec![
                doc(
                    1,
                    "a",
                    "Pickles takes half a tablet of methimazole twice a day.",
                ),
                doc(1, "b", "   "),
                doc(
                    1,
                    "c",
                    "Pickles takes half a tablet of methimazole twice a day.",
                ),
                doc(1, "d", &long),
            ],
            bytes: 100,
            ..Default::default()
        };
        in_tx.blocking_send(batch).unwrap();
        drop(in_tx);
        let r = run(
            chunker,
            pool,
            in_rx,
            out_tx,
            CancellationToken::new(),
            usize::MAX,
            None,
        )
        .unwrap();
        let mut chunks = Vec::new();
        while let Some(b) = out_rx.blocking_recv() {
            chunks.extend(b);
        }
        assert_eq!(r.docs.documents_read, 4);
        assert_eq!(r.docs.empty_dropped, 1);
        assert_eq!(r.docs.duplicates_dropped, 1);
        assert_eq!(r.docs.documents_kept, 2);
        assert!(chunks.len() >= 3, "the long note is cut: {}", chunks.len());
        assert_eq!(r.chunk.items_out, chunks.len() as u64);
        assert_eq!(r.docs.chunks, chunks.len() as u64);
        assert_eq!(
            r.docs.tokens,
            chunks.iter().map(|c| c.token_count as u64).sum::<u64>()
        );
        assert_eq!((r.clean.items_in, r.clean.items_out), (4, 2));
        // The long note's cuts each repeat the default overlap; the short note repeats nothing.
        let cuts = chunks.iter().filter(|c| c.chunk_index > 0).count() as u64;
        assert!(cuts >= 2);
        assert_eq!(r.docs.overlap_tokens, cuts * 64);
        // Every chunk leaves with its lexical terms.
        let pickles = chunks.iter().find(|c| c.text.contains("Pickles")).unwrap();
        assert_eq!(
            pickles.terms,
            "pickles takes half tablet methimazole twice day"
        );
        assert!(chunks.iter().all(|c| !c.terms.is_empty()));
    }

    #[test]
    fn no_terms_when_the_store_keeps_no_lexical_index() {
        let pool = crate::settings::cpu_pool(1).unwrap();
        let chunker = Chunker::new(ChunkSettings {
            lexical_terms: false,
            ..Default::default()
        })
        .unwrap();
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        in_tx
            .blocking_send(SourceBatch {
                docs: vec![doc(1, "a", "Pickles takes her pill.")],
                ..Default::default()
            })
            .unwrap();
        drop(in_tx);
        run(
            chunker,
            pool,
            in_rx,
            out_tx,
            CancellationToken::new(),
            usize::MAX,
            None,
        )
        .unwrap();
        let chunks = out_rx.blocking_recv().unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].terms, "");
    }

    /// Issue 13, limits: a document past the size limit is cut to it on a character boundary,
    /// counted, and still chunked; one under it is untouched.
    #[test]
    fn documents_past_the_size_limit_are_cut_and_counted() {
        let pool = crate::settings::cpu_pool(1).unwrap();
        let chunker = Chunker::new(ChunkSettings::default()).unwrap();
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        // 2-byte characters, so the limit (odd) falls inside one.
        let big = "é".repeat(5_000);
        in_tx
            .blocking_send(SourceBatch {
                docs: vec![doc(1, "big", &big), doc(1, "small", "Short note.")],
                ..Default::default()
            })
            .unwrap();
        drop(in_tx);
        let r = run(
            chunker,
            pool,
            in_rx,
            out_tx,
            CancellationToken::new(),
            1001,
            None,
        )
        .unwrap();
        let mut chunks = Vec::new();
        while let Some(b) = out_rx.blocking_recv() {
            chunks.extend(b);
        }
        assert_eq!(r.docs.truncated, 1);
        assert_eq!(r.docs.documents_kept, 2);
        let big_bytes: usize = chunks
            .iter()
            .filter(|c| c.source_ids == ["big"])
            .map(|c| c.byte_end - c.byte_start)
            .max()
            .unwrap();
        assert!(big_bytes <= 1000, "{big_bytes}");
        assert!(chunks.iter().any(|c| c.text == "Short note."));
    }

    #[test]
    fn a_stopped_build_ends_the_stage() {
        let pool = crate::settings::cpu_pool(1).unwrap();
        let chunker = Chunker::new(ChunkSettings::default()).unwrap();
        let (_in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, _out_rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        stop.cancel();
        let r = run(chunker, pool, in_rx, out_tx, stop, usize::MAX, None);
        assert!(matches!(r, Err(PipelineError::Cancelled)));
    }
}
