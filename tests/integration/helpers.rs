//! Shared helpers: fixture paths, temporary stores, pipelines with a chosen embedder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use orbit_pipeline::embed::{Embedder, HashingEmbedder};
use orbit_pipeline::store::{SqliteStore, VectorStore};
use orbit_pipeline::{BuildReport, BuildScope, ChunkSettings, Pipeline, PipelineSettings};
use tokio_util::sync::CancellationToken;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("fixtures").join(name)
}

/// `$VAR` if set, else `~/.cache/orbit-worker/<sub>`: where the Makefile installs things.
fn cache_path(var: &str, sub: &str) -> PathBuf {
    std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/orbit-worker")
            .join(sub)
    })
}

pub fn model_dir() -> PathBuf {
    cache_path("ORBIT_MODEL_DIR", "models/all-MiniLM-L6-v2")
}

pub fn python() -> PathBuf {
    let p = cache_path("ORBIT_TEST_PYTHON", "venv/bin/python");
    assert!(
        p.exists(),
        "test Python {} missing: run the suite with `make test`",
        p.display()
    );
    p
}

/// Where `make tiktoken-cache` puts tiktoken's rank files, so Python tiktoken works offline.
pub fn tiktoken_cache_dir() -> PathBuf {
    cache_path("TIKTOKEN_CACHE_DIR", "tiktoken")
}

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
            },
        }
    }

    pub async fn build(&self, source: &Path, scope: BuildScope) -> BuildReport {
        self.pipeline(source, hashing(), ChunkSettings::default())
            .run(scope, CancellationToken::new(), None)
            .await
            .unwrap()
    }
}

/// Fixture lines as JSON values, for tests that edit the corpus.
pub fn sample_lines() -> Vec<serde_json::Value> {
    std::fs::read_to_string(fixture("sample.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn to_lines(v: &[serde_json::Value]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The `input` strings of an `/v1/embeddings` request body, as the API doubles read them.
pub fn embedding_inputs(body: &serde_json::Value) -> Vec<String> {
    body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}
