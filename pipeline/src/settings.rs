//! A pipeline's own settings: chunking, its CPU pool, and whether stored vectors are reused.

use crate::chunk::ChunkSettings;

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
