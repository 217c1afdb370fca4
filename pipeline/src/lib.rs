//! orbit-pipeline: the memory pipeline (extract → clean → chunk → reuse → embed → store) as a
//! library, free of Redis, Celery and CLI concerns so the worker, the CLI and the benchmarks
//! share it. Also the one HTTP call layer (`http_call`) every outgoing API call goes through.

pub mod chunk;
pub mod clean;
pub mod embed;
pub mod error;
pub mod hash;
pub mod http_call;
pub mod lexical;
pub mod pretokenize;
pub mod progress;
pub mod report;
pub mod retry;
pub mod runner;
pub mod search;
pub mod secret;
pub mod settings;
pub mod source;
pub mod sql;
pub mod stages;
pub mod store;
pub mod tokenize;
pub mod types;

pub use chunk::{ChunkSettings, Chunker};
pub use clean::Cleaner;
pub use error::PipelineError;
pub use report::BuildReport;
pub use retry::Retryable;
pub use runner::Pipeline;
pub use settings::{cpu_pool, BuildLimits, CpuPool, PipelineSettings};
pub use types::{BuildScope, Chunk, CleanDocument, DocKind, EmbeddedChunk, RawDocument};

/// The message of a caught panic, for an error that says what broke.
pub fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
