//! Plain data of a build: whose memory it covers (`BuildScope`), what flows between the stages
//! (RawDocument → CleanDocument → Chunk → EmbeddedChunk), and what a source had to reject.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a document is in OrbitingFox; it decides packing and shows in search results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    Message,
    ChannelPost,
    GroupPost,
    BlinkTranscript,
    BlinkAnalysis,
    Note,
}

impl DocKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Message => "message",
            DocKind::ChannelPost => "channel_post",
            DocKind::GroupPost => "group_post",
            DocKind::BlinkTranscript => "blink_transcript",
            DocKind::BlinkAnalysis => "blink_analysis",
            DocKind::Note => "note",
        }
    }

    /// Chat-like kinds whose short items are packed together per conversation.
    pub fn is_chat(self) -> bool {
        matches!(
            self,
            DocKind::Message | DocKind::ChannelPost | DocKind::GroupPost
        )
    }
}

/// One document as a source yields it (the JSONL line format). Unknown fields are ignored, so a
/// field added on the app side does not reject every line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawDocument {
    pub user_id: i64,
    pub kind: DocKind,
    pub source_id: String,
    pub text: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// A document after cleaning: normalised text and its content hash.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanDocument {
    pub user_id: i64,
    pub kind: DocKind,
    pub source_id: String,
    pub text: String,
    pub created_at: DateTime<Utc>,
    pub conversation_id: Option<String>,
    pub title: Option<String>,
    pub author: Option<String>,
    pub meta: Option<serde_json::Value>,
    /// xxh3-128 of the cleaned text, hex.
    pub content_hash: u128,
}

/// A piece of text to embed. `text` is either `doc.text[char_start..char_end]` of one document
/// (byte offsets, on char boundaries) or, for a pack of short chat messages, their cleaned texts
/// joined by `PACK_SEPARATOR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub user_id: i64,
    pub kind: DocKind,
    /// Every source id this chunk covers, in order.
    pub source_ids: Vec<String>,
    pub conversation_id: Option<String>,
    pub title: Option<String>,
    pub author: Option<String>,
    /// Index of this chunk within its document (0 for packs).
    pub chunk_index: u32,
    /// Byte offsets into the cleaned document text (for packs: 0..text.len()).
    pub byte_start: usize,
    pub byte_end: usize,
    /// Token offsets into the document's tiktoken encoding (for packs: 0..token_count).
    pub token_start: usize,
    pub token_end: usize,
    pub token_count: usize,
    pub created_at: DateTime<Utc>,
    pub text: String,
    /// xxh3-128 of `text`, hex.
    pub content_hash: String,
    /// What the lexical index holds for it (`lexical::index_terms` of title and text), filled on
    /// the CPU pool by the chunk stage; empty until then (a store computes it if still empty).
    #[serde(default)]
    pub terms: String,
}

impl Chunk {
    /// A whole note as one chunk, for what stores text directly: tests, benchmarks, tools.
    /// Token counts are its words (no tokenizer involved).
    pub fn note(user_id: i64, source_id: &str, text: &str) -> Chunk {
        let words = text.split_whitespace().count();
        Chunk {
            user_id,
            kind: DocKind::Note,
            source_ids: vec![source_id.to_string()],
            conversation_id: None,
            title: None,
            author: None,
            chunk_index: 0,
            byte_start: 0,
            byte_end: text.len(),
            token_start: 0,
            token_end: words,
            token_count: words,
            created_at: chrono::DateTime::UNIX_EPOCH,
            text: text.to_string(),
            content_hash: crate::hash::hex128(crate::hash::content_hash(text)),
            terms: crate::lexical::index_terms(None, text),
        }
    }
}

/// A chunk with its vector.
#[derive(Debug, Clone)]
pub struct EmbeddedChunk {
    pub chunk: Chunk,
    pub vector: Vec<f32>,
}

/// Separator between packed chat messages.
pub const PACK_SEPARATOR: &str = "\n";

/// Whose memory a build covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum BuildScope {
    User(i64),
    AllUsers,
}

impl BuildScope {
    pub fn includes(&self, user_id: i64) -> bool {
        match self {
            BuildScope::User(u) => *u == user_id,
            BuildScope::AllUsers => true,
        }
    }
}

impl std::fmt::Display for BuildScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildScope::User(u) => write!(f, "user {u}"),
            BuildScope::AllUsers => f.write_str("all users"),
        }
    }
}

/// One input the source could not turn into a document; the build goes on without it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rejection {
    /// `file:line` for files, a row key for databases.
    pub location: String,
    pub reason: String,
}
