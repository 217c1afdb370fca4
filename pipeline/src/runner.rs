//! The runner: wires the stages (`stages/`) with bounded channels, runs them together, stops
//! them all at the first failure, and gathers their reports. It does no stage's work.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::chunk::Chunker;
use crate::embed::Embedder;
use crate::error::PipelineError;
use crate::report::{BuildParts, BuildReport};
use crate::settings::PipelineSettings;
use crate::source::Source;
use crate::stages::{self, extract::ProgressFn, StageMeter};
use crate::store::VectorStore;
use crate::types::BuildScope;

/// Source batches queued for the CPU stage: two keep the cores fed while the reader parses the
/// next; more would only hold memory (a batch is up to 4 MB).
const CPU_QUEUE_BATCHES: usize = 2;
/// Chunk batches queued for reuse and for the embedder: enough to fill several requests ahead.
const EMBED_QUEUE_BATCHES: usize = 4;
/// Embedded batches queued for the store.
const STORE_QUEUE_BATCHES: usize = 4;

/// The clean/chunk thread pool: built once, shared by every build that uses it.
pub type CpuPool = Arc<rayon::ThreadPool>;

/// A build wired from its parts. The CPU pool is the pipeline's, shared by all its builds.
pub struct Pipeline {
    pub source: Arc<dyn Source>,
    pub embedder: Arc<dyn Embedder>,
    pub store: Arc<dyn VectorStore>,
    pub settings: PipelineSettings,
    pub pool: CpuPool,
}

/// The clean/chunk pool: `threads` named threads.
pub fn cpu_pool(threads: usize) -> Result<CpuPool, PipelineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("orbit-cpu-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| PipelineError::Internal(e.to_string()))
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
        let (model, dimension) = (self.embedder.model_id(), self.embedder.dimension());
        self.store.ensure_model(model, dimension).await?;
        let gen = self.store.begin_build().await?;
        // Stages stop at the first failure anywhere.
        let stop = cancel.child_token();
        let (docs_tx, docs_rx) = mpsc::channel(CPU_QUEUE_BATCHES);
        let (chunks_tx, chunks_rx) = mpsc::channel(EMBED_QUEUE_BATCHES);
        let (embed_tx, embed_rx) = mpsc::channel(EMBED_QUEUE_BATCHES);
        let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE_BATCHES);

        let stream = self.source.documents(&scope);
        let extract = stages::extract::run(
            stream,
            docs_tx,
            stop.clone(),
            progress,
            StageMeter::new("extract"),
        );
        let (pool, s) = (self.pool.clone(), stop.clone());
        let cpu = tokio::task::spawn_blocking(move || {
            stages::clean_chunk::run(chunker, pool, docs_rx, chunks_tx, s)
        });
        let cpu = async {
            cpu.await
                .map_err(|e| PipelineError::Internal(e.to_string()))?
        };
        let reuse_from = self.settings.reuse_vectors.then(|| self.store.clone());
        let reuse = stages::reuse::run(
            reuse_from,
            chunks_rx,
            embed_tx,
            store_tx.clone(),
            stop.clone(),
            StageMeter::new("reuse"),
        );
        let embed = stages::embed::run(
            self.embedder.clone(),
            embed_rx,
            store_tx,
            stop.clone(),
            StageMeter::new("embed"),
        );
        let store = stages::store::run(
            self.store.clone(),
            gen,
            store_rx,
            stop.clone(),
            StageMeter::new("store"),
        );

        let (x, c, r, e, s) = tokio::join!(
            guard(&stop, extract),
            guard(&stop, cpu),
            guard(&stop, reuse),
            guard(&stop, embed),
            guard(&stop, store),
        );
        // Report the root cause, not the "cancelled" it caused in the other stages.
        let errors = [
            x.as_ref().err(),
            c.as_ref().err(),
            r.as_ref().err(),
            e.as_ref().err(),
            s.as_ref().err(),
        ];
        if errors.iter().any(|e| e.is_some()) || cancel.is_cancelled() {
            let root = [x.err(), c.err(), r.err(), e.err(), s.err()]
                .into_iter()
                .flatten();
            return Err(root
                .reduce(|a, b| {
                    if matches!(a, PipelineError::Cancelled) {
                        b
                    } else {
                        a
                    }
                })
                .unwrap_or(PipelineError::Cancelled));
        }
        let (x, c, r, e, s) = (x?, c?, r?, e?, s?);
        let points_deleted = self.store.finish_build(gen, &scope).await?;
        Ok(BuildReport::new(BuildParts {
            scope: scope.to_string(),
            model: model.to_string(),
            dimension,
            docs: c.docs,
            chunks_reused: r.items_out,
            vectors_upserted: s.items_out,
            points_deleted,
            stages: vec![x, c.clean, c.chunk, r, e, s],
            wall: started.elapsed(),
        }))
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
