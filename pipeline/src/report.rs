//! The BuildReport: what each stage did, how long it worked and how long it waited.

use serde::Serialize;

use crate::types::Rejection;

/// The `p` quantile (0..=1) of ascending `sorted`, nearest rank; 0 when empty. What the eval
/// and the benchmarks report latencies with.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Rejections kept in full in the report; the rest are only counted.
pub const MAX_REPORTED_REJECTIONS: usize = 100;

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageReport {
    pub name: &'static str,
    pub items_in: u64,
    pub items_out: u64,
    /// Bytes of text the stage handed on (for embed: the text it sent to the embedder).
    pub bytes_out: u64,
    pub tokens: u64,
    /// Requests the stage made to an outside service (embed: embedding calls; reuse: lookups).
    pub requests: u64,
    /// Wall time minus both waits: the time the stage was working.
    pub busy_ms: f64,
    /// Time blocked waiting for the previous stage.
    pub wait_upstream_ms: f64,
    /// Time blocked because the next stage's channel was full: this stage is not the bottleneck.
    pub wait_downstream_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    pub documents_per_s: f64,
    pub chunks_per_s: f64,
    pub input_mb_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildReport {
    pub scope: String,
    pub model: String,
    pub dimension: usize,
    pub documents_read: u64,
    pub documents_kept: u64,
    pub empty_dropped: u64,
    pub duplicates_dropped: u64,
    /// Documents whose text was cut at the document size limit (`BuildLimits`).
    pub documents_truncated: u64,
    pub chunks: u64,
    pub packed_messages: u64,
    pub tokens: u64,
    /// Of `tokens`, those a chunk repeats from the previous chunk of its document (the
    /// overlap): `tokens - overlap_tokens` is the text chunked, whatever the overlap policy.
    pub overlap_tokens: u64,
    pub bytes_read: u64,
    pub vectors_upserted: u64,
    /// Chunks whose unchanged text kept the vector already stored (incremental rebuild).
    pub chunks_reused: u64,
    /// Chunks sent to the embedder.
    pub chunks_embedded: u64,
    pub points_deleted: u64,
    pub rejected_count: u64,
    pub rejected: Vec<Rejection>,
    pub stages: Vec<StageReport>,
    pub wall_ms: f64,
    pub throughput: Throughput,
    /// The stage with the most busy time.
    pub bottleneck: String,
}

/// What the clean/chunk stage counted of the documents it saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DocCounts {
    pub documents_read: u64,
    pub documents_kept: u64,
    pub empty_dropped: u64,
    pub duplicates_dropped: u64,
    /// Documents whose text was cut at the document size limit.
    pub truncated: u64,
    pub chunks: u64,
    pub packed_messages: u64,
    pub tokens: u64,
    pub overlap_tokens: u64,
    pub bytes_read: u64,
    pub rejected_count: u64,
    pub rejected: Vec<Rejection>,
}

impl DocCounts {
    pub fn add_rejections(&mut self, r: Vec<Rejection>) {
        self.rejected_count += r.len() as u64;
        let room = MAX_REPORTED_REJECTIONS.saturating_sub(self.rejected.len());
        self.rejected.extend(r.into_iter().take(room));
    }
}

/// Every part of a finished build, gathered by the runner.
pub struct BuildParts {
    pub scope: String,
    pub model: String,
    pub dimension: usize,
    pub docs: DocCounts,
    /// In pipeline order.
    pub stages: Vec<StageReport>,
    pub chunks_reused: u64,
    pub vectors_upserted: u64,
    pub points_deleted: u64,
    pub wall: std::time::Duration,
}

impl BuildReport {
    /// The report of a finished build, in one piece.
    pub fn new(p: BuildParts) -> BuildReport {
        let secs = p.wall.as_secs_f64().max(1e-9);
        let d = p.docs;
        let bottleneck = p
            .stages
            .iter()
            .max_by(|a, b| a.busy_ms.total_cmp(&b.busy_ms))
            .map(|s| s.name.to_string())
            .unwrap_or_default();
        BuildReport {
            scope: p.scope,
            model: p.model,
            dimension: p.dimension,
            throughput: Throughput {
                documents_per_s: d.documents_read as f64 / secs,
                chunks_per_s: d.chunks as f64 / secs,
                input_mb_per_s: d.bytes_read as f64 / 1e6 / secs,
            },
            documents_read: d.documents_read,
            documents_kept: d.documents_kept,
            empty_dropped: d.empty_dropped,
            duplicates_dropped: d.duplicates_dropped,
            documents_truncated: d.truncated,
            chunks: d.chunks,
            packed_messages: d.packed_messages,
            tokens: d.tokens,
            overlap_tokens: d.overlap_tokens,
            bytes_read: d.bytes_read,
            vectors_upserted: p.vectors_upserted,
            chunks_reused: p.chunks_reused,
            chunks_embedded: d.chunks.saturating_sub(p.chunks_reused),
            points_deleted: p.points_deleted,
            rejected_count: d.rejected_count,
            rejected: d.rejected,
            stages: p.stages,
            wall_ms: secs * 1000.0,
            bottleneck,
        }
    }

    /// The stage called `name`, if it ran.
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }
}
