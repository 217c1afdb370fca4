//! The runner: wires the stages (`stages/`) with bounded channels, runs them together, stops
//! them all at the first failure, and gathers their reports. It does no stage's work.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::channel;
use tokio_util::sync::CancellationToken;

use crate::chunk::Chunker;
use crate::embed::Embedder;
use crate::error::PipelineError;
use crate::progress::BuildProgress;
use crate::report::{BuildParts, BuildReport};
use crate::settings::{CpuPool, PipelineSettings};
use crate::source::Source;
use crate::stages::{clean_chunk, embed, extract, reuse, store, FirstFailure, StageMeter as M};
use crate::store::VectorStore;
use crate::types::BuildScope;

/// Source batches queued for the CPU stage: two keep the cores fed while the reader parses the
/// next; more would only hold memory (a batch is up to 4 MB).
const CPU_QUEUE_BATCHES: usize = 2;
/// Chunk batches queued before the reuse lookups and before the embedder: two each, the four one
/// queue held before reuse was a stage of its own (a batch already fills several requests).
const CHUNK_QUEUE_BATCHES: usize = 2;
const EMBED_QUEUE_BATCHES: usize = 2;
/// Embedded batches queued for the store.
const STORE_QUEUE_BATCHES: usize = 4;

/// A build wired from its parts. The CPU pool is the pipeline's, shared by all its builds.
pub struct Pipeline {
    pub source: Arc<dyn Source>,
    pub embedder: Arc<dyn Embedder>,
    pub store: Arc<dyn VectorStore>,
    pub settings: PipelineSettings,
    pub pool: CpuPool,
}

impl Pipeline {
    pub async fn run(
        &self,
        scope: BuildScope,
        cancel: CancellationToken,
        progress: Option<extract::ProgressFn>,
    ) -> Result<BuildReport, PipelineError> {
        self.run_live(scope, cancel, progress, None).await
    }

    /// `run`, its stages publishing their counts into `live` as they go, against the number of
    /// documents the source counted first.
    pub async fn run_live(
        &self,
        scope: BuildScope,
        cancel: CancellationToken,
        progress: Option<extract::ProgressFn>,
        live: Option<Arc<BuildProgress>>,
    ) -> Result<BuildReport, PipelineError> {
        let started = Instant::now();
        if let Some(p) = &live {
            match self.source.count(&scope).await {
                Ok(Some(n)) => p.expect(n),
                Ok(None) => {}
                // Progress without a total; the build itself will meet the error if it lasts.
                Err(e) => tracing::debug!(error = %e, "the source could not count its documents"),
            }
        }
        let meter = |name| match &live {
            Some(p) => M::new(name).publishing(p),
            None => M::new(name),
        };
        let chunker = Chunker::new(self.settings.chunk.clone())?;
        let (model, dimension) = (self.embedder.model_id(), self.embedder.dimension());
        self.store.ensure_model(model, dimension).await?;
        let gen = self.store.begin_build().await?;
        let (docs_tx, docs_rx) = channel(CPU_QUEUE_BATCHES);
        let (chunk_tx, chunk_rx) = channel(CHUNK_QUEUE_BATCHES);
        let (todo_tx, todo_rx) = channel(EMBED_QUEUE_BATCHES);
        let (store_tx, store_rx) = channel(STORE_QUEUE_BATCHES);
        // Stages stop at the first failure anywhere, or when the caller cancels.
        let f = FirstFailure::new(cancel.child_token());
        let stop = || f.stop.clone();
        let docs = self.source.documents(&scope);
        let known = self.settings.reuse_vectors.then(|| self.store.clone());
        let (pool, db, emb) = (self.pool.clone(), self.store.clone(), self.embedder.clone());
        let hit_tx = store_tx.clone();
        let limits = self.settings.limits;
        // Only one user's build is capped: a build of everyone streams at flat memory.
        let max_docs = matches!(scope, BuildScope::User(_)).then_some(limits.max_documents);
        let x = extract::run(docs, docs_tx, stop(), progress, meter("extract"), max_docs);
        let c = clean_chunk::spawn(
            chunker,
            pool,
            docs_rx,
            chunk_tx,
            stop(),
            limits.max_document_bytes,
            live.clone(),
        );
        let r = reuse::run(known, chunk_rx, todo_tx, hit_tx, stop(), meter("reuse"));
        let e = embed::run(emb, todo_rx, store_tx, stop(), meter("embed"));
        let s = store::run(db, gen, store_rx, stop(), meter("store"));
        let (x, c, r, e, s) =
            tokio::join!(f.watch(x), f.watch(c), f.watch(r), f.watch(e), f.watch(s));
        let (Some(x), Some(c), Some(r), Some(e), Some(s)) = (x, c, r, e, s) else {
            return Err(f.take());
        };
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
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
            pool: crate::settings::cpu_pool(1).unwrap(),
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

    #[tokio::test]
    async fn every_stage_publishes_its_counts_into_the_live_progress() {
        let p = pipeline(false);
        let live = Arc::new(BuildProgress::default());
        let r = p
            .run_live(
                BuildScope::User(1),
                CancellationToken::new(),
                None,
                Some(live.clone()),
            )
            .await
            .unwrap();
        let s = live.snapshot();
        assert_eq!(s.documents_read, 40);
        assert_eq!(s.documents_expected, None, "this source cannot count");
        assert_eq!(s.percent, None);
        assert_eq!((s.chunks, s.tokens), (r.chunks, r.tokens));
        assert_eq!(s.chunks_embedded, r.chunks);
        assert_eq!(s.chunks_stored, r.vectors_upserted);
    }
}
