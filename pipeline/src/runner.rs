//! The runner: wires source → clean/chunk → embed → store with bounded channels, keeps the CPU
//! stages on a rayon pool off the async runtime, and accounts every stage's busy and wait time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::chunk::{ChunkSettings, Chunker, Packer, Split};
use crate::clean::{Cleaner, Deduper};
use crate::embed::{EmbedError, Embedder, RequestBatcher};
use crate::report::{BuildReport, StageReport};
use crate::source::{Source, SourceBatch, SourceError};
use crate::store::{StoreError, VectorStore};
use crate::types::{Chunk, EmbeddedChunk};

/// Source batches queued for the CPU stage. Two keep the cores fed while the reader parses the
/// next; more would only hold memory (a batch is up to 4 MB).
const CPU_QUEUE_BATCHES: usize = 2;
/// Chunk batches queued for the embedder: enough to fill several requests ahead.
const EMBED_QUEUE_BATCHES: usize = 4;
/// Embedded batches queued for the store.
const STORE_QUEUE_BATCHES: usize = 4;
/// Points per store transaction: amortises the commit, keeps a failed batch cheap to redo.
pub const STORE_BATCH_POINTS: usize = 512;

/// Whose memory a build covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum BuildScope {
    User(i64),
    AllUsers,
}

impl BuildScope {
    pub fn includes(&self, user_id: i64) -> bool {
        match self {
            BuildScope::User(u) => *u == user_id,
            BuildScope::AllUsers => true,
        }
    }
}

impl std::fmt::Display for BuildScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildScope::User(u) => write!(f, "user {u}"),
            BuildScope::AllUsers => f.write_str("all users"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub chunk: ChunkSettings,
    /// Threads of the clean/chunk pool.
    pub cpu_threads: usize,
    /// Chunks whose (user, content hash) already has a vector in the store keep it instead of
    /// being embedded again. Off for a full re-embed.
    pub reuse_vectors: bool,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            chunk: ChunkSettings::default(),
            cpu_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            reuse_vectors: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chunk(#[from] crate::chunk::ChunkError),
    #[error("build cancelled")]
    Cancelled,
    #[error("pipeline stage failed: {0}")]
    Internal(String),
}

impl PipelineError {
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_retryable(),
            PipelineError::Embed(e) => e.is_retryable(),
            PipelineError::Store(e) => e.is_retryable(),
            PipelineError::Chunk(_) | PipelineError::Cancelled | PipelineError::Internal(_) => {
                false
            }
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PipelineError::Embed(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Called with the input bytes of each batch read.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// A build wired from its parts.
pub struct Pipeline {
    pub source: Arc<dyn Source>,
    pub embedder: Arc<dyn Embedder>,
    pub store: Arc<dyn VectorStore>,
    pub settings: PipelineSettings,
}

/// Timing of one stage: busy is what remains of its wall time after both waits.
#[derive(Default)]
struct Clock {
    wait_up: Duration,
    wait_down: Duration,
}

impl Clock {
    fn stage(&self, name: &'static str, wall: Duration) -> StageReport {
        StageReport {
            name,
            busy_ms: ms(wall.saturating_sub(self.wait_up + self.wait_down)),
            wait_upstream_ms: ms(self.wait_up),
            wait_downstream_ms: ms(self.wait_down),
            ..Default::default()
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Pipeline {
    pub async fn run(
        &self,
        scope: BuildScope,
        cancel: CancellationToken,
        progress: Option<ProgressFn>,
    ) -> Result<BuildReport, PipelineError> {
        let started = Instant::now();
        let chunker = Chunker::new(self.settings.chunk.clone())?;
        self.store
            .ensure_model(self.embedder.model_id(), self.embedder.dimension())
            .await?;
        let gen = self.store.begin_build().await?;
        // Stages stop at the first failure anywhere.
        let stop = cancel.child_token();

        let (cpu_tx, cpu_rx) = mpsc::channel::<SourceBatch>(CPU_QUEUE_BATCHES);
        let (emb_tx, emb_rx) = mpsc::channel::<Vec<Chunk>>(EMBED_QUEUE_BATCHES);
        let (store_tx, store_rx) = mpsc::channel::<Vec<EmbeddedChunk>>(STORE_QUEUE_BATCHES);

        let source = self.read_stage(scope.clone(), cpu_tx, stop.clone(), progress);
        let cpu = {
            let threads = self.settings.cpu_threads.max(1);
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || cpu_stage(chunker, threads, cpu_rx, emb_tx, stop))
        };
        let reuse = self.settings.reuse_vectors.then(|| self.store.clone());
        let embed = embed_stage(self.embedder.clone(), reuse, emb_rx, store_tx, stop.clone());
        let store = store_stage(self.store.clone(), gen, store_rx, stop.clone());

        let (src_r, cpu_r, emb_r, store_r) = tokio::join!(
            guard(&stop, source),
            guard(&stop, async {
                cpu.await
                    .map_err(|e| PipelineError::Internal(e.to_string()))
                    .and_then(|r| r)
            }),
            guard(&stop, embed),
            guard(&stop, store),
        );
        // Report the root cause, not the "cancelled" it caused in the other stages.
        let any_err = src_r.is_err() || cpu_r.is_err() || emb_r.is_err() || store_r.is_err();
        if any_err {
            return Err(first_error(src_r, cpu_r, emb_r, store_r));
        }
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let src = src_r?;
        let mut report = cpu_r?;
        let (emb, reused) = emb_r?;
        let (mut store_report, upserted) = store_r?;
        let deleted = self.store.finish_build(gen, &scope).await?;
        store_report.items_out = upserted;

        report.scope = scope.to_string();
        report.model = self.embedder.model_id().to_string();
        report.dimension = self.embedder.dimension();
        report.vectors_upserted = upserted;
        report.chunks_reused = reused;
        report.chunks_embedded = report.chunks.saturating_sub(reused);
        report.points_deleted = deleted;
        report.stages.insert(0, src);
        report.stages.extend([emb, store_report]);
        report.finish(started.elapsed());
        Ok(report)
    }

    fn read_stage(
        &self,
        scope: BuildScope,
        tx: mpsc::Sender<SourceBatch>,
        stop: CancellationToken,
        progress: Option<ProgressFn>,
    ) -> impl std::future::Future<Output = Result<StageReport, PipelineError>> + Send + 'static
    {
        let mut stream = self.source.documents(&scope);
        async move {
            let t0 = Instant::now();
            let (mut docs, mut bytes) = (0u64, 0u64);
            let mut busy = Duration::ZERO;
            let mut wait_down = Duration::ZERO;
            loop {
                let batch = tokio::select! {
                    _ = stop.cancelled() => return Err(PipelineError::Cancelled),
                    b = stream.next() => b,
                };
                let Some(batch) = batch else { break };
                let batch = batch?;
                docs += batch.docs.len() as u64;
                bytes += batch.bytes;
                busy += batch.busy;
                if let Some(p) = &progress {
                    p(batch.bytes);
                }
                let t = Instant::now();
                if tx.send(batch).await.is_err() {
                    return Err(PipelineError::Cancelled);
                }
                wait_down += t.elapsed();
            }
            // The reader works ahead on its own thread: its busy time is what it measured, and
            // the rest of this stage's life was spent blocked on the cleaner.
            let wall = t0.elapsed();
            let r = StageReport {
                name: "extract",
                items_out: docs,
                bytes_out: bytes,
                busy_ms: ms(busy),
                wait_downstream_ms: ms(wall.saturating_sub(busy).max(wait_down)),
                ..Default::default()
            };
            Ok(r)
        }
    }
}

/// Awaits `f` unless the build is stopped first.
async fn until_stopped<T>(
    stop: &CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Result<T, PipelineError> {
    tokio::select! {
        _ = stop.cancelled() => Err(PipelineError::Cancelled),
        v = f => Ok(v),
    }
}

/// Runs a stage; its failure stops the others.
async fn guard<T>(
    stop: &CancellationToken,
    f: impl std::future::Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    let r = f.await;
    if r.is_err() {
        stop.cancel();
    }
    r
}

fn first_error<A, B, C, D>(
    a: Result<A, PipelineError>,
    b: Result<B, PipelineError>,
    c: Result<C, PipelineError>,
    d: Result<D, PipelineError>,
) -> PipelineError {
    [a.err(), b.err(), c.err(), d.err()]
        .into_iter()
        .flatten()
        .find(|e| !matches!(e, PipelineError::Cancelled))
        .unwrap_or(PipelineError::Cancelled)
}

/// Clean and chunk on a rayon pool, batch by batch. Returns the report's document counts and
/// rejections, with the `clean` and `chunk` stages as its first two stage reports.
fn cpu_stage(
    chunker: Chunker,
    threads: usize,
    mut rx: mpsc::Receiver<SourceBatch>,
    tx: mpsc::Sender<Vec<Chunk>>,
    stop: CancellationToken,
) -> Result<BuildReport, PipelineError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("orbit-cpu-{i}"))
        .build()
        .map_err(|e| PipelineError::Internal(e.to_string()))?;
    let cleaner = Cleaner::new();
    let mut dedup = Deduper::default();
    let mut packer = Packer::new(chunker.settings().clone());
    let t0 = Instant::now();
    let mut clock = Clock::default();
    let mut clean_busy = Duration::ZERO;
    let mut r = BuildReport::default();
    let mut clean = StageReport {
        name: "clean",
        ..Default::default()
    };
    let mut chunk = StageReport {
        name: "chunk",
        ..Default::default()
    };

    let send = |batch: Vec<Chunk>,
                chunk: &mut StageReport,
                clock: &mut Clock|
     -> Result<(), PipelineError> {
        if batch.is_empty() {
            return Ok(());
        }
        chunk.items_out += batch.len() as u64;
        for c in &batch {
            chunk.bytes_out += c.text.len() as u64;
            chunk.tokens += c.token_count as u64;
        }
        let t = Instant::now();
        tx.blocking_send(batch)
            .map_err(|_| PipelineError::Cancelled)?;
        clock.wait_down += t.elapsed();
        Ok(())
    };

    loop {
        if stop.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let t = Instant::now();
        let Some(batch) = rx.blocking_recv() else {
            break;
        };
        clock.wait_up += t.elapsed();

        r.documents_read += batch.docs.len() as u64;
        r.bytes_read += batch.bytes;
        r.add_rejections(batch.rejected);

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
                None => r.empty_dropped += 1,
                Some(d) if !dedup.first_time(&d) => r.duplicates_dropped += 1,
                Some(d) => {
                    clean.bytes_out += d.text.len() as u64;
                    kept.push(d);
                }
            }
        }
        r.documents_kept += kept.len() as u64;
        clean_busy += tc.elapsed();

        let splits: Vec<Split> =
            pool.install(|| kept.into_par_iter().map(|d| chunker.split(d)).collect());
        let mut batch_out = Vec::with_capacity(splits.len());
        for s in splits {
            match s {
                Split::Chunks(c) => batch_out.extend(c),
                Split::Packable(item) => {
                    r.packed_messages += 1;
                    packer.push(item, &mut batch_out);
                }
            }
        }
        send(batch_out, &mut chunk, &mut clock)?;
    }
    let mut tail = Vec::new();
    packer.finish(&mut tail);
    send(tail, &mut chunk, &mut clock)?;

    // One thread does both stages: cleaning time goes to "clean", the rest of its work to
    // "chunk"; waiting on the reader counts for clean, waiting on the embedder for chunk.
    let wall = t0.elapsed();
    clean.items_in = r.documents_read;
    clean.items_out = r.documents_kept;
    clean.busy_ms = ms(clean_busy);
    clean.wait_upstream_ms = ms(clock.wait_up);
    chunk.items_in = r.documents_kept;
    chunk.busy_ms = ms(wall.saturating_sub(clean_busy + clock.wait_up + clock.wait_down));
    chunk.wait_downstream_ms = ms(clock.wait_down);
    r.chunks = chunk.items_out;
    r.tokens = chunk.tokens;
    r.stages = vec![clean, chunk];
    Ok(r)
}

type EmbedResult = Result<(Vec<Chunk>, Vec<Vec<f32>>), EmbedError>;

/// Splits off the chunks whose vector the store already holds (same user, same content hash)
/// and returns them ready for the store; the rest still need the embedder.
async fn take_reusable(
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

async fn embed_stage(
    embedder: Arc<dyn Embedder>,
    reuse: Option<Arc<dyn VectorStore>>,
    mut rx: mpsc::Receiver<Vec<Chunk>>,
    tx: mpsc::Sender<Vec<EmbeddedChunk>>,
    stop: CancellationToken,
) -> Result<(StageReport, u64), PipelineError> {
    let t0 = Instant::now();
    let mut clock = Clock::default();
    let limits = embedder.limits();
    let in_flight = limits.max_in_flight.max(1);
    let mut batcher = RequestBatcher::new(limits);
    let mut ready: std::collections::VecDeque<Vec<Chunk>> = Default::default();
    let mut pending: FuturesOrdered<futures::future::BoxFuture<'static, EmbedResult>> =
        FuturesOrdered::new();
    let (mut items, mut tokens, mut requests, mut reused) = (0u64, 0u64, 0u64, 0u64);
    let mut upstream_done = false;

    let start = |req: Vec<Chunk>| {
        let e = embedder.clone();
        Box::pin(async move {
            let texts = req.iter().map(|c| c.text.clone()).collect();
            e.embed(texts).await.map(|v| (req, v))
        }) as futures::future::BoxFuture<'static, EmbedResult>
    };

    let handle = |r: EmbedResult| -> Result<Vec<EmbeddedChunk>, PipelineError> {
        let (chunks, vectors) = r?;
        if vectors.len() != chunks.len() {
            return Err(EmbedError::Decode(format!(
                "{} vectors for {} inputs",
                vectors.len(),
                chunks.len()
            ))
            .into());
        }
        Ok(chunks
            .into_iter()
            .zip(vectors)
            .map(|(chunk, vector)| EmbeddedChunk { chunk, vector })
            .collect())
    };

    loop {
        if stop.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        while pending.len() < in_flight {
            match ready.pop_front() {
                Some(req) => {
                    requests += 1;
                    pending.push_back(start(req));
                }
                None => break,
            }
        }
        // Every wait also watches `stop`: a stalled request must not outlive a soft time limit.
        let done = if upstream_done {
            if pending.is_empty() {
                break;
            }
            Some(until_stopped(&stop, pending.next()).await?)
        } else if pending.is_empty() {
            let t = Instant::now();
            let got = until_stopped(&stop, rx.recv()).await?;
            clock.wait_up += t.elapsed();
            let got = reuse_step(&reuse, got, &tx, &mut reused, &mut clock).await?;
            feed(
                got,
                &mut batcher,
                &mut ready,
                &mut upstream_done,
                &mut items,
                &mut tokens,
            );
            None
        } else if pending.len() < in_flight {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Err(PipelineError::Cancelled),
                r = pending.next() => Some(r),
                got = rx.recv() => {
                    let got = reuse_step(&reuse, got, &tx, &mut reused, &mut clock).await?;
                    feed(got, &mut batcher, &mut ready, &mut upstream_done, &mut items, &mut tokens);
                    None
                }
            }
        } else {
            Some(until_stopped(&stop, pending.next()).await?)
        };
        if let Some(Some(r)) = done {
            let batch = handle(r)?;
            let t = Instant::now();
            tx.send(batch).await.map_err(|_| PipelineError::Cancelled)?;
            clock.wait_down += t.elapsed();
        }
    }
    let mut r = clock.stage("embed", t0.elapsed());
    r.items_in = items;
    r.items_out = items;
    r.tokens = tokens;
    r.bytes_out = requests;
    r.items_in += reused;
    r.items_out += reused;
    Ok((r, reused))
}

/// Passes reusable chunks straight to the store and returns the rest for the embedder.
async fn reuse_step(
    store: &Option<Arc<dyn VectorStore>>,
    got: Option<Vec<Chunk>>,
    tx: &mpsc::Sender<Vec<EmbeddedChunk>>,
    reused: &mut u64,
    clock: &mut Clock,
) -> Result<Option<Vec<Chunk>>, PipelineError> {
    let (Some(store), Some(chunks)) = (store, got.as_ref()) else {
        return Ok(got);
    };
    if chunks.is_empty() {
        return Ok(got);
    }
    let (todo, done) = take_reusable(store.as_ref(), got.unwrap_or_default()).await?;
    if !done.is_empty() {
        *reused += done.len() as u64;
        let t = Instant::now();
        tx.send(done).await.map_err(|_| PipelineError::Cancelled)?;
        clock.wait_down += t.elapsed();
    }
    Ok(Some(todo))
}

fn feed(
    got: Option<Vec<Chunk>>,
    batcher: &mut RequestBatcher<Chunk>,
    ready: &mut std::collections::VecDeque<Vec<Chunk>>,
    upstream_done: &mut bool,
    items: &mut u64,
    tokens: &mut u64,
) {
    match got {
        Some(chunks) => {
            for c in chunks {
                *items += 1;
                *tokens += c.token_count as u64;
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

async fn store_stage(
    store: Arc<dyn VectorStore>,
    gen: crate::store::BuildGeneration,
    mut rx: mpsc::Receiver<Vec<EmbeddedChunk>>,
    stop: CancellationToken,
) -> Result<(StageReport, u64), PipelineError> {
    let t0 = Instant::now();
    let mut clock = Clock::default();
    let mut buf: Vec<EmbeddedChunk> = Vec::with_capacity(STORE_BATCH_POINTS);
    let mut upserted = 0u64;
    loop {
        let t = Instant::now();
        let got = tokio::select! {
            _ = stop.cancelled() => return Err(PipelineError::Cancelled),
            g = rx.recv() => g,
        };
        clock.wait_up += t.elapsed();
        let last = got.is_none();
        if let Some(b) = got {
            buf.extend(b);
        }
        while buf.len() >= STORE_BATCH_POINTS || (last && !buf.is_empty()) {
            let n = buf.len().min(STORE_BATCH_POINTS);
            let part: Vec<EmbeddedChunk> = buf.drain(..n).collect();
            store.upsert(gen, &part).await?;
            upserted += n as u64;
        }
        if last {
            break;
        }
    }
    let mut r = clock.stage("store", t0.elapsed());
    r.items_in = upserted;
    Ok((r, upserted))
}
