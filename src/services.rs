//! What tasks share inside one worker process: settings, and the embedder and vector store,
//! built once on first use (the local model takes seconds to load).

use std::sync::Arc;

use anyhow::Result;
use orbit_pipeline::embed::Embedder;
use orbit_pipeline::source::Source;
use orbit_pipeline::store::VectorStore;
use orbit_pipeline::{Pipeline, PipelineSettings};
use tokio::sync::OnceCell;

use crate::config::Settings;
use crate::embedders;

pub struct Services {
    pub settings: Settings,
    embedder: OnceCell<Arc<dyn Embedder>>,
    store: OnceCell<Arc<dyn VectorStore>>,
}

impl Services {
    pub fn new(settings: Settings) -> Self {
        Services {
            settings,
            embedder: OnceCell::new(),
            store: OnceCell::new(),
        }
    }

    pub async fn embedder(&self) -> Result<Arc<dyn Embedder>> {
        let s = &self.settings;
        self.embedder
            .get_or_try_init(|| async move {
                // Loading the model is CPU work: keep it off the runtime's threads.
                let s = s.clone();
                tokio::task::spawn_blocking(move || embedders::embedder(&s)).await?
            })
            .await
            .cloned()
    }

    /// A pipeline over `source` with the shared embedder and store and the configured chunking.
    pub async fn pipeline(&self, source: Arc<dyn Source>) -> Result<Pipeline> {
        let embedder = self.embedder().await?;
        let store = self.store().await?;
        let chunk = self
            .settings
            .chunk_settings(embedder.preferred_chunk_tokens())?;
        Ok(Pipeline {
            source,
            embedder,
            store,
            settings: PipelineSettings {
                chunk,
                cpu_threads: self.settings.cpu_threads,
            },
        })
    }

    pub async fn store(&self) -> Result<Arc<dyn VectorStore>> {
        self.store
            .get_or_try_init(|| embedders::store(&self.settings))
            .await
            .cloned()
    }
}
