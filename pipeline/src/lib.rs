//! orbit-pipeline: the memory pipeline (extract → clean → chunk → embed → store) as a library,
//! free of Redis, Celery and CLI concerns so the worker, the CLI and the benchmarks share it.

pub mod chunk;
pub mod clean;
pub mod embed;
pub mod hash;
pub mod pretokenize;
pub mod report;
pub mod runner;
pub mod secret;
pub mod source;
pub mod store;
pub mod tokenize;
pub mod types;

pub use chunk::{ChunkSettings, Chunker};
pub use clean::Cleaner;
pub use report::BuildReport;
pub use runner::{BuildScope, Pipeline, PipelineSettings};
pub use types::{Chunk, CleanDocument, DocKind, EmbeddedChunk, RawDocument};

/// The message of a caught panic, for an error that says what broke.
pub(crate) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
