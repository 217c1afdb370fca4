//! A store that keeps nothing: the sink for benchmarks and dry runs that measure the stages
//! before it. It still checks dimensions, so a dry run catches a misconfigured embedder.

use async_trait::async_trait;
use uuid::Uuid;

use super::{BuildGeneration, SearchHit, StoreError, VectorStore};
use crate::types::BuildScope;
use crate::types::EmbeddedChunk;

#[derive(Debug, Default)]
pub struct NullStore {
    dim: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl VectorStore for NullStore {
    async fn ensure_model(&self, _model: &str, dim: usize) -> Result<(), StoreError> {
        self.dim.store(dim, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn model(&self) -> Result<Option<(String, usize)>, StoreError> {
        Ok(None)
    }
    async fn reset(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn begin_build(&self) -> Result<BuildGeneration, StoreError> {
        Ok(1)
    }
    async fn upsert(
        &self,
        _gen: BuildGeneration,
        points: &[EmbeddedChunk],
    ) -> Result<(), StoreError> {
        let want = self.dim.load(std::sync::atomic::Ordering::Relaxed);
        match points.iter().find(|p| p.vector.len() != want) {
            Some(p) => Err(StoreError::Dimension {
                got: p.vector.len(),
                want,
            }),
            None => Ok(()),
        }
    }
    async fn finish_build(
        &self,
        _gen: BuildGeneration,
        _scope: &BuildScope,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }
    async fn search_dense(
        &self,
        _user_id: i64,
        _query: &[f32],
        _top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        Ok(Vec::new())
    }
    async fn search_lexical(
        &self,
        _user_id: i64,
        _question: &str,
        _top_k: usize,
    ) -> Result<Vec<SearchHit>, StoreError> {
        Ok(Vec::new())
    }
    async fn vectors_by_hash(
        &self,
        _keys: &[(i64, &str)],
    ) -> Result<super::VectorsByHash, StoreError> {
        Ok(Default::default())
    }
    async fn count(&self, _user_id: i64) -> Result<u64, StoreError> {
        Ok(0)
    }
    async fn point_ids(&self, _user_id: i64) -> Result<Vec<Uuid>, StoreError> {
        Ok(Vec::new())
    }
}
