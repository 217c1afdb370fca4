//! A pipeline's own settings (chunking, CPU threads, whether stored vectors are reused) and the
//! CPU pool built from them.

use std::sync::Arc;

use crate::chunk::ChunkSettings;
use crate::error::PipelineError;

/// The clean/chunk thread pool: built once, shared by every build that uses it.
pub type CpuPool = Arc<rayon::ThreadPool>;

/// The clean/chunk pool: `threads` named threads.
pub fn cpu_pool(threads: usize) -> Result<CpuPool, PipelineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("orbit-cpu-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| PipelineError::Internal(e.to_string()))
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub chunk: ChunkSettings,
    /// Threads of the clean/chunk pool.
    pub cpu_threads: usize,
    /// Chunks whose (user, content hash) already has a vector in the store keep it instead of
    /// being embedded again. Off for a full re-embed.
    pub reuse_vectors: bool,
    pub limits: BuildLimits,
}

/// What one build takes in: a document's text past `max_document_bytes` is cut there (and
/// counted), and a user's build that reads more than `max_documents` fails, naming the limit,
/// instead of holding a memory no one asked for. A build of every user has no document cap: it
/// streams at flat memory whatever its size.
#[derive(Debug, Clone, Copy)]
pub struct BuildLimits {
    pub max_document_bytes: usize,
    pub max_documents: u64,
}

/// A message or a note is kilobytes; 1 MiB is a book chapter.
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Thousands of times the most active user's messages.
pub const DEFAULT_MAX_DOCUMENTS: u64 = 5_000_000;

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            max_documents: DEFAULT_MAX_DOCUMENTS,
        }
    }
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            chunk: ChunkSettings::default(),
            cpu_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            reuse_vectors: true,
            limits: BuildLimits::default(),
        }
    }
}
