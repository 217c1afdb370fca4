//! Temporary stores and pipelines with a chosen embedder, for the pipeline's end-to-end tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use orbit_pipeline::embed::{Embedder, HashingEmbedder};
use orbit_pipeline::store::{SqliteStore, VectorStore};
use orbit_pipeline::{BuildReport, BuildScope, ChunkSettings, Pipeline, PipelineSettings};
use tokio_util::sync::CancellationToken;

/// Wide enough that feature-hashing collisions do not decide rankings in tests.
pub const HASH_DIM: usize = 384;

pub fn hashing() -> Arc<dyn Embedder> {
    Arc::new(HashingEmbedder::new(HASH_DIM))
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<SqliteStore>,
}

impl Env {
    pub async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("data")).await.unwrap());
        Env { dir, store }
    }

    pub fn write(&self, name: &str, lines: &[String]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    }

    pub fn pipeline(
        &self,
        source: &Path,
        embedder: Arc<dyn Embedder>,
        chunk: ChunkSettings,
    ) -> Pipeline {
        Pipeline {
            source: Arc::new(orbit_pipeline::source::JsonlSource::new(&[source]).unwrap()),
            embedder,
            store: self.store.clone() as Arc<dyn VectorStore>,
            settings: PipelineSettings {
                chunk,
                cpu_threads: 2,
                reuse_vectors: true,
                ..Default::default()
            },
            pool: orbit_pipeline::cpu_pool(2).unwrap(),
        }
    }

    pub async fn build(&self, source: &Path, scope: BuildScope) -> BuildReport {
        self.pipeline(source, hashing(), ChunkSettings::default())
            .run(scope, CancellationToken::new(), None)
            .await
            .unwrap()
    }
}
