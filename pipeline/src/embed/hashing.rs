//! A deterministic embedder: signed feature hashing of lowercased words and character trigrams.
//! It costs microseconds, so benchmarks measure the CPU stages alone; it is also a usable lexical
//! retriever for tests.

use async_trait::async_trait;
use xxhash_rust::xxh3::xxh3_64;

use super::{l2_normalize, EmbedError, EmbedLimits, Embedder};

#[derive(Debug, Clone)]
pub struct HashingEmbedder {
    dim: usize,
    model_id: String,
}

impl HashingEmbedder {
    pub fn new(dim: usize) -> Self {
        Self {
            dim: dim.max(8),
            model_id: format!("orbit-hashing-v1-{dim}"),
        }
    }

    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        let lower = text.to_lowercase();
        for w in lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            self.add(&mut v, w.as_bytes(), 1.0);
            let chars: Vec<char> = w.chars().collect();
            if chars.len() > 3 {
                let mut buf = String::new();
                for t in chars.windows(3) {
                    buf.clear();
                    buf.extend(t);
                    self.add(&mut v, buf.as_bytes(), 0.3);
                }
            }
        }
        l2_normalize(&mut v);
        v
    }

    fn add(&self, v: &mut [f32], feature: &[u8], weight: f32) {
        let h = xxh3_64(feature);
        let idx = (h % self.dim as u64) as usize;
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[idx] += sign * weight;
    }
}

#[async_trait]
impl Embedder for HashingEmbedder {
    fn model_id(&self) -> &str {
        &self.model_id
    }
    fn dimension(&self) -> usize {
        self.dim
    }
    fn limits(&self) -> EmbedLimits {
        EmbedLimits {
            max_inputs: 512,
            max_batch_tokens: 1 << 20,
            max_in_flight: 2,
        }
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }
}
