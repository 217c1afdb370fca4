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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::HashingEmbedder;
    use crate::source::{SourceBatch, SourceError, SourceStream};
    use crate::store::NullStore;
    use crate::types::{DocKind, RawDocument};

    /// A source of fixed batches, ending in `fail` when given.
    struct Fixed {
        docs: Vec<RawDocument>,
        fail: bool,
    }

    impl Source for Fixed {
        fn documents(&self, _scope: &BuildScope) -> SourceStream {
            let mut items = vec![Ok(SourceBatch {
                bytes: self.docs.iter().map(|d| d.text.len() as u64).sum(),
                docs: self.docs.clone(),
                ..Default::default()
            })];
            if self.fail {
                items.push(Err(SourceError::Query("connection reset".into())));
            }
            Box::pin(futures::stream::iter(items))
        }
        fn describe(&self) -> String {
            "fixed".into()
        }
    }

    fn pipeline(fail: bool) -> Pipeline {
        let docs = (0..40)
            .map(|i| RawDocument {
                user_id: 1,
                kind: DocKind::Note,
                source_id: format!("n{i}"),
                text: format!("Note {i}: the ferry leaves at {i} past the hour from the pier."),
                created_at: chrono::DateTime::UNIX_EPOCH,
                conversation_id: None,
                title: None,
                author: None,
                meta: None,
            })
            .collect();
        Pipeline {
            source: Arc::new(Fixed { docs, fail }),
            embedder: Arc::new(HashingEmbedder::new(16)),
            store: Arc::new(NullStore::default()),
            settings: PipelineSettings {
                cpu_threads: 1,
                ..Default::default()
            },
            pool: cpu_pool(1).unwrap(),
        }
    }

    #[tokio::test]
    async fn wires_every_stage_and_reports_in_one_piece() {
        let p = pipeline(false);
        let r = p
            .run(BuildScope::User(1), CancellationToken::new(), None)
            .await
            .unwrap();
        let names: Vec<&str> = r.stages.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["extract", "clean", "chunk", "reuse", "embed", "store"]
        );
        assert_eq!(r.documents_read, 40);
        assert_eq!(r.vectors_upserted, r.chunks);
        assert_eq!(r.stage("embed").unwrap().items_in, r.chunks);
        assert_eq!(r.chunks_reused, 0, "a NullStore remembers nothing");
        assert_eq!(r.model, "orbit-hashing-v1-16");
        // The pool is the pipeline's: a second build reuses it.
        let again = p
            .run(BuildScope::User(1), CancellationToken::new(), None)
            .await
            .unwrap();
        assert_eq!(again.chunks, r.chunks);
    }

    #[tokio::test]
    async fn the_root_cause_is_reported_not_the_cancellations_it_caused() {
        let err = pipeline(true)
            .run(BuildScope::User(1), CancellationToken::new(), None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PipelineError::Source(SourceError::Query(_))),
            "{err}"
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = pipeline(false)
            .run(BuildScope::User(1), cancel, None)
            .await
            .unwrap_err();
        assert!(matches!(err, PipelineError::Cancelled), "{err}");
    }
}
