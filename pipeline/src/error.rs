//! The pipeline's error: which stage's failure ended a build, and whether another try may help.

use std::time::Duration;

use crate::chunk::ChunkError;
use crate::embed::EmbedError;
use crate::retry::Retryable;
use crate::source::SourceError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("build cancelled")]
    Cancelled,
    #[error("{0}")]
    Limit(String),
    #[error("pipeline stage failed: {0}")]
    Internal(String),
}

impl Retryable for PipelineError {
    fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_retryable(),
            PipelineError::Embed(e) => e.is_retryable(),
            PipelineError::Store(e) => e.is_retryable(),
            PipelineError::Chunk(_)
            | PipelineError::Cancelled
            | PipelineError::Limit(_)
            | PipelineError::Internal(_) => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            PipelineError::Embed(e) => e.retry_after(),
            _ => None,
        }
    }
}
