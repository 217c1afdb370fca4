//! Chunk: token-aware splitting that cuts at paragraph, then sentence, then word, then token, with
//! an exact token overlap; and packing of short chat messages of one conversation into one chunk.
//!
//! A document is pre-tokenized once with tiktoken's own regex and each piece ("unit") counted
//! once with BPE. Because tiktoken encodes pieces independently, the count of a run of whole
//! units is the sum of their counts (one lookahead exception, handled in `Cutter::span`): chunk
//! sizes are exact without re-tokenizing candidates.
//! Only a cut inside a unit (a giant word, or an overlap start between the tokens of one word)
//! needs that unit encoded, and a chunk with such an edge is re-counted standalone.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use unicode_segmentation::UnicodeSegmentation;

use crate::hash::{content_hash, hex128};
use crate::tokenize::Encoding;
use crate::types::{Chunk, CleanDocument, PACK_SEPARATOR};

/// Packs do not overlap by default: on `fixtures/eval/` a repeated message did not help
/// (docs/retrieval.md), and it costs an embedding per pack.
pub const DEFAULT_PACK_OVERLAP: bool = false;

/// A conversation's messages keep filling one pack across pauses of up to 30 days. Measured on
/// `fixtures/eval/` (docs/retrieval.md): packs closed at every 30-minute pause leave a short tail
/// pack per sitting, and full packs found more (dense recall@5 0.717 against 0.678 at 30
/// minutes and 0.685 at a week, whose gaps the eval conversations sometimes exceed).
pub const DEFAULT_PACK_WINDOW_SECS: i64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkSettings {
    pub encoding: Encoding,
    /// Target (and hard maximum) tokens per chunk.
    pub max_tokens: usize,
    /// Tokens shared by consecutive chunks of one document.
    pub overlap_tokens: usize,
    /// Chat messages of one conversation closer in time than this are packed together.
    pub pack_window_secs: i64,
    /// Only messages up to this many tokens are packed; longer ones stand alone.
    pub pack_item_max_tokens: usize,
    /// When a pack closes on its token budget (not on a pause in the conversation), the next one
    /// starts with its last message again, so a question whose evidence sits on the border still
    /// finds that message beside what answered it.
    #[serde(default)]
    pub pack_overlap: bool,
    /// Whether the chunk stage gives each chunk its lexical terms (`Chunk::terms`): off for a
    /// store that keeps no lexical index, which then does not pay for them.
    #[serde(default = "lexical_terms_default")]
    pub lexical_terms: bool,
}

fn lexical_terms_default() -> bool {
    true
}

impl Default for ChunkSettings {
    fn default() -> Self {
        Self {
            encoding: Encoding::Cl100kBase,
            max_tokens: 512,
            overlap_tokens: 64,
            pack_window_secs: DEFAULT_PACK_WINDOW_SECS,
            pack_item_max_tokens: 128,
            pack_overlap: DEFAULT_PACK_OVERLAP,
            lexical_terms: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk settings: {0}")]
    Settings(String),
}

impl ChunkSettings {
    pub fn validate(&self) -> Result<(), ChunkError> {
        if self.max_tokens < 8 {
            return Err(ChunkError::Settings("max_tokens must be at least 8".into()));
        }
        if self.overlap_tokens * 2 >= self.max_tokens {
            return Err(ChunkError::Settings(format!(
                "overlap_tokens ({}) must be less than half of max_tokens ({})",
                self.overlap_tokens, self.max_tokens
            )));
        }
        Ok(())
    }
}

/// Where a chunk lies in its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub byte_start: usize,
    pub byte_end: usize,
    pub token_start: usize,
    pub token_end: usize,
    /// Standalone tiktoken count of the span's text.
    pub token_count: usize,
}

/// What splitting one document gives.
#[derive(Debug)]
// Returned by value and consumed at once: boxing the large variant would cost an allocation
// per chat message on the hottest path.
#[allow(clippy::large_enum_variant)]
pub enum Split {
    /// A short chat message: the runner's `Packer` decides its chunk.
    Packable(PackItem),
    /// The document's own chunks.
    Chunks(Vec<Chunk>),
}

/// A short chat message with what packing needs to know of its tokens.
#[derive(Debug)]
pub struct PackItem {
    pub doc: CleanDocument,
    /// Exact tiktoken count of the text alone.
    pub tokens: usize,
    /// Tokens `PACK_SEPARATOR` adds when this text is followed by another message: 0 or 1, as
    /// tiktoken may fold the newline into a trailing punctuation piece.
    pub sep_tokens: usize,
    /// False where the sum of parts may not be exact (leading or trailing whitespace, or an
    /// o200k text starting with `/`, which that encoding folds into a preceding `!\n`): the
    /// pack is then recounted whole.
    pub sum_exact: bool,
}

/// One tiktoken pre-token: its end byte and the running token count after it.
#[derive(Debug, Clone, Copy)]
struct Unit {
    end: usize,
    cum: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    byte: usize,
    tok: usize,
}

/// The chunking stage. Pure per document; packing needs order and lives in `Packer`.
#[derive(Debug, Clone)]
pub struct Chunker {
    settings: ChunkSettings,
}

impl Chunker {
    pub fn new(settings: ChunkSettings) -> Result<Self, ChunkError> {
        settings.validate()?;
        Ok(Self { settings })
    }

    pub fn settings(&self) -> &ChunkSettings {
        &self.settings
    }

    pub fn split(&self, doc: CleanDocument) -> Split {
        let s = &self.settings;
        if doc.kind.is_chat() && doc.conversation_id.is_some() {
            if let Some((tokens, last)) = count_upto(s.encoding, &doc.text, s.pack_item_max_tokens)
            {
                let sep_tokens = sep_tokens(s.encoding, last);
                let t = &doc.text;
                let sum_exact = !(t.starts_with(char::is_whitespace)
                    || t.ends_with(char::is_whitespace)
                    || (s.encoding == Encoding::O200kBase && t.starts_with('/')));
                return Split::Packable(PackItem {
                    doc,
                    tokens,
                    sep_tokens,
                    sum_exact,
                });
            }
        }
        let spans = self.spans(&doc.text);
        if let [only] = spans.as_slice() {
            return Split::Chunks(vec![whole_chunk(doc, only.token_count)]);
        }
        Split::Chunks(
            spans
                .into_iter()
                .enumerate()
                .map(|(i, sp)| doc_chunk(&doc, i as u32, sp))
                .collect(),
        )
    }

    /// Splits `text` into spans; the heart of the stage, exposed for tests and benches.
    pub fn spans(&self, text: &str) -> Vec<Span> {
        let s = &self.settings;
        let mut units = Vec::with_capacity(text.len() / 4 + 1);
        let mut cum = 0usize;
        let mut end = 0usize;
        s.encoding.with_counter(|counter| {
            for piece in s.encoding.split(text) {
                end += piece.len();
                cum += counter.count(piece);
                units.push(Unit { end, cum });
            }
        });
        if cum <= s.max_tokens {
            return vec![Span {
                byte_start: 0,
                byte_end: text.len(),
                token_start: 0,
                token_end: cum,
                token_count: cum,
            }];
        }
        Cutter {
            text,
            units: &units,
            enc: s.encoding,
            max: s.max_tokens,
            overlap: s.overlap_tokens,
        }
        .run(cum)
    }
}

/// Tokens `PACK_SEPARATOR` adds after a text whose last pre-token piece is `last`. Short pieces
/// (nearly all) are joined on the stack: this runs once per chat message.
fn sep_tokens(enc: Encoding, last: &str) -> usize {
    let mut buf = [0u8; 32];
    let n = last.len() + PACK_SEPARATOR.len();
    let heap;
    let joined: &str = if n <= buf.len() {
        buf[..last.len()].copy_from_slice(last.as_bytes());
        buf[last.len()..n].copy_from_slice(PACK_SEPARATOR.as_bytes());
        std::str::from_utf8(&buf[..n]).unwrap_or(PACK_SEPARATOR)
    } else {
        heap = format!("{last}{PACK_SEPARATOR}");
        &heap
    };
    enc.with_counter(|c| c.count_text(joined).saturating_sub(c.count(last)))
}

/// Count up to `limit` tokens, with the last pre-token piece; `None` as soon as the text is
/// known to be longer.
fn count_upto(enc: Encoding, text: &str, limit: usize) -> Option<(usize, &str)> {
    enc.with_counter(|c| {
        let mut n = 0;
        let mut last = "";
        for piece in enc.split(text) {
            n += c.count(piece);
            if n > limit {
                return None;
            }
            last = piece;
        }
        Some((n, last))
    })
}

struct Cutter<'a> {
    text: &'a str,
    units: &'a [Unit],
    enc: Encoding,
    max: usize,
    overlap: usize,
}

impl Cutter<'_> {
    fn unit_start(&self, i: usize) -> Pos {
        if i == 0 {
            Pos { byte: 0, tok: 0 }
        } else {
            Pos {
                byte: self.units[i - 1].end,
                tok: self.units[i - 1].cum,
            }
        }
    }

    /// Token boundaries after each token of unit `i` that fall on a char boundary, in order; the
    /// last is the unit's end. Only a cut inside a unit needs this, so the unit is encoded here.
    fn char_boundaries_in(&self, i: usize) -> Vec<Pos> {
        let start = self.unit_start(i);
        let bytes = &self.text.as_bytes()[start.byte..self.units[i].end];
        let (mut b, mut k) = (start.byte, start.tok);
        let mut out = Vec::new();
        let bpe = &self.enc.tokenizer().bpe;
        for id in bpe.encode_via_backtracking(bytes) {
            b += bpe.token_len(id);
            k += 1;
            if self.text.is_char_boundary(b) {
                out.push(Pos { byte: b, tok: k });
            }
        }
        out
    }

    /// The unit holding token position `t` (the first whose end is at or past it), or the
    /// text's end when `t` is past it.
    fn unit_at(&self, t: usize) -> Result<usize, Pos> {
        let i = self.units.partition_point(|u| u.cum < t);
        match self.units.get(i) {
            Some(_) => Ok(i),
            None => {
                let last = self.units.last().expect("non-empty units");
                Err(Pos {
                    byte: last.end,
                    tok: last.cum,
                })
            }
        }
    }

    /// The last token boundary at or before token `t` that falls on a char boundary.
    fn pos_at_or_before(&self, t: usize) -> Pos {
        let i = match self.unit_at(t) {
            Ok(i) => i,
            Err(end) => return end,
        };
        if self.units[i].cum == t {
            return Pos {
                byte: self.units[i].end,
                tok: t,
            };
        }
        let start = self.unit_start(i);
        self.char_boundaries_in(i)
            .into_iter()
            .take_while(|p| p.tok <= t)
            .last()
            .unwrap_or(start)
    }

    /// The first token boundary at or after token `t` that falls on a char boundary.
    fn pos_at_or_after(&self, t: usize) -> Pos {
        let i = match self.unit_at(t) {
            Ok(i) => i,
            Err(end) => return end,
        };
        let start = self.unit_start(i);
        if start.tok >= t {
            return start;
        }
        let end = Pos {
            byte: self.units[i].end,
            tok: self.units[i].cum,
        };
        self.char_boundaries_in(i)
            .into_iter()
            .find(|p| p.tok >= t)
            .unwrap_or(end)
    }

    fn is_unit_boundary(&self, p: Pos) -> bool {
        p.byte == 0 || self.units.binary_search_by(|u| u.end.cmp(&p.byte)).is_ok()
    }

    fn run(&self, total: usize) -> Vec<Span> {
        let end_pos = Pos {
            byte: self.text.len(),
            tok: total,
        };
        let mut spans = Vec::with_capacity(total / (self.max - self.overlap) + 2);
        let mut s = Pos { byte: 0, tok: 0 };
        loop {
            if total - s.tok <= self.max && self.is_unit_boundary(s) {
                spans.push(self.span(s, end_pos));
                break;
            }
            let mut e = self.choose_end(s);
            let mut span = self.span(s, e);
            // A cut inside a unit may tokenize differently standalone: shrink until it fits.
            while span.token_count > self.max {
                let over = span.token_count - self.max;
                e = self.pos_at_or_before(e.tok.saturating_sub(over.max(1)));
                if e.tok <= s.tok {
                    break;
                }
                span = self.span(s, e);
            }
            spans.push(span);
            if e.byte >= self.text.len() {
                break;
            }
            // Exact overlap when the token position is on a char boundary; else the nearest
            // boundary before it (a little more overlap), or, when that would not move past this
            // chunk's start, the nearest one after it (a little less).
            let target = e.tok - self.overlap;
            let mut next = self.pos_at_or_before(target);
            if next.tok <= s.tok {
                next = self.pos_at_or_after(target);
            }
            if next.tok <= s.tok || next.tok > e.tok {
                next = e;
            }
            s = next;
        }
        spans
    }

    fn span(&self, s: Pos, e: Pos) -> Span {
        // Sums of unit counts are exact except at a cut inside a unit, and at an end in
        // horizontal whitespace: there tiktoken's `\s+(?!\S)` splits "  x" as " ", " x", while
        // a chunk ending in "  " is one `\s+$` piece. Starts are safe: the regex has no lookbehind.
        let ends_in_space = self.text[..e.byte]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_whitespace() && c != '\n' && c != '\r');
        let exact_edges = self.is_unit_boundary(s) && self.is_unit_boundary(e) && !ends_in_space;
        let token_count = if exact_edges {
            e.tok - s.tok
        } else {
            self.enc.count(&self.text[s.byte..e.byte])
        };
        Span {
            byte_start: s.byte,
            byte_end: e.byte,
            token_start: s.tok,
            token_end: e.tok,
            token_count,
        }
    }

    /// The best cut for a chunk starting at `s`: the highest-level unit boundary between half
    /// and all of the budget, else a token cut.
    fn choose_end(&self, s: Pos) -> Pos {
        let limit = s.tok + self.max;
        let min_tok = s.tok + (self.max / 2).max(self.overlap + 1);
        // Units whose end boundary lies in [min_tok, limit].
        let hi = self.units.partition_point(|u| u.cum <= limit);
        let lo = self.units.partition_point(|u| u.cum < min_tok);
        if lo < hi {
            let window = &self.units[lo..hi];
            let best = self.best_boundary(window);
            let u = window[best];
            return Pos {
                byte: u.end,
                tok: u.cum,
            };
        }
        // No unit ends inside the window: a unit straddles it. Cut inside at a token.
        let p = self.pos_at_or_before(limit);
        if p.tok > s.tok {
            return p;
        }
        // Pathological: no char boundary before the limit; take the next one after it.
        let i = self.units.partition_point(|u| u.cum <= limit);
        let u = self.units[i.min(self.units.len() - 1)];
        Pos {
            byte: u.end,
            tok: u.cum,
        }
    }

    fn best_boundary(&self, window: &[Unit]) -> usize {
        let text = self.text;
        // Paragraph, then line break.
        if let Some(i) = window.iter().rposition(|u| text[..u.end].ends_with("\n\n")) {
            return i;
        }
        if let Some(i) = window.iter().rposition(|u| text[..u.end].ends_with('\n')) {
            return i;
        }
        let w_start = window[0].end;
        let w_end = window[window.len() - 1].end;
        let slice = &text[w_start..w_end];
        // Sentence: a unit boundary followed only by whitespace up to a UAX#29 sentence start.
        let sentence_starts: Vec<usize> = slice
            .split_sentence_bound_indices()
            .map(|(i, _)| w_start + i)
            .filter(|&b| b > w_start)
            .collect();
        if let Some(i) = window.iter().rposition(|u| {
            sentence_starts
                .iter()
                .any(|&sb| sb >= u.end && text[u.end..sb].trim().is_empty())
                && ends_sentence(&text[..u.end])
        }) {
            return i;
        }
        // Word: whitespace on either side, or a UAX#29 word bound (scripts without spaces).
        if let Some(i) = window.iter().rposition(|u| {
            let before = text[..u.end].chars().next_back();
            let after = text[u.end..].chars().next();
            before.is_some_and(char::is_whitespace) || after.is_some_and(char::is_whitespace)
        }) {
            return i;
        }
        let word_bounds: Vec<usize> = slice
            .split_word_bound_indices()
            .map(|(i, _)| w_start + i)
            .collect();
        if let Some(i) = window
            .iter()
            .rposition(|u| word_bounds.binary_search(&u.end).is_ok())
        {
            return i;
        }
        window.len() - 1
    }
}

fn ends_sentence(before: &str) -> bool {
    before.trim_end().chars().next_back().is_some_and(|c| {
        matches!(
            c,
            '.' | '!' | '?' | '。' | '！' | '？' | '…' | '؟' | '।' | '"' | '\'' | ')' | '”' | '»'
        )
    })
}

fn doc_chunk(doc: &CleanDocument, index: u32, sp: Span) -> Chunk {
    let text = doc.text[sp.byte_start..sp.byte_end].to_string();
    Chunk {
        user_id: doc.user_id,
        kind: doc.kind,
        source_ids: vec![doc.source_id.clone()],
        conversation_id: doc.conversation_id.clone(),
        title: doc.title.clone(),
        author: doc.author.clone(),
        chunk_index: index,
        byte_start: sp.byte_start,
        byte_end: sp.byte_end,
        token_start: sp.token_start,
        token_end: sp.token_end,
        token_count: sp.token_count,
        created_at: doc.created_at,
        content_hash: hex128(content_hash(&text)),
        text,
        terms: String::new(),
    }
}

/// The whole document as its only chunk: moves the text and reuses the cleaner's hash.
pub fn whole_chunk(doc: CleanDocument, tokens: usize) -> Chunk {
    Chunk {
        user_id: doc.user_id,
        kind: doc.kind,
        source_ids: vec![doc.source_id],
        conversation_id: doc.conversation_id,
        title: doc.title,
        author: doc.author,
        chunk_index: 0,
        byte_start: 0,
        byte_end: doc.text.len(),
        token_start: 0,
        token_end: tokens,
        token_count: tokens,
        created_at: doc.created_at,
        content_hash: hex128(doc.content_hash),
        text: doc.text,
        terms: String::new(),
    }
}

// ---------------------------------------------------------------- packing

/// Open packs kept at once. Past this the least recently touched half is flushed, so a corpus
/// with millions of conversations holds a few MB of open packs, not the corpus.
pub const MAX_OPEN_PACKS: usize = 4096;

/// xxh3-128 of (user, kind, conversation): fixed size, so a message looks up its pack without
/// cloning the conversation id, and 128 bits make a collision a non-event.
type PackKey = u128;

fn pack_key(doc: &CleanDocument) -> PackKey {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&doc.user_id.to_le_bytes());
    h.update(doc.kind.as_str().as_bytes());
    h.update(&[0xff]);
    h.update(doc.conversation_id.as_deref().unwrap_or("").as_bytes());
    h.digest128()
}

#[derive(Debug)]
struct Pack {
    docs: Vec<CleanDocument>,
    /// Tokens of the joined text so far (exact when `sum_exact`).
    tokens: usize,
    /// Separator tokens the last message adds if another joins.
    sep_tokens: usize,
    sum_exact: bool,
    /// The last message's own tokens and exactness, for carrying it into the next pack.
    last_tokens: usize,
    last_exact: bool,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    touched: u64,
}

/// Packs short chat messages of one conversation within a time window into one chunk. Keeps
/// state across batches; feed documents in source order, then `finish`.
#[derive(Debug)]
pub struct Packer {
    settings: ChunkSettings,
    open: HashMap<PackKey, Pack, std::hash::BuildHasherDefault<crate::tokenize::KeyHasher>>,
    clock: u64,
}

impl Packer {
    pub fn new(settings: ChunkSettings) -> Self {
        Self {
            settings,
            open: HashMap::default(),
            clock: 0,
        }
    }

    /// Adds a packable message; chunks of packs it closes are pushed to `out`.
    pub fn push(&mut self, item: PackItem, out: &mut Vec<Chunk>) {
        self.clock += 1;
        let PackItem {
            doc,
            tokens,
            sep_tokens,
            sum_exact,
        } = item;
        let key = pack_key(&doc);
        let window = chrono::Duration::seconds(self.settings.pack_window_secs);
        let max = self.settings.max_tokens;
        if let Some(p) = self.open.get_mut(&key) {
            let near = (doc.created_at - p.last).abs() <= window;
            // The separator costs at most one token, so `+ 1` keeps even a recounted pack in budget.
            if near && p.tokens + 1 + tokens <= max {
                p.tokens += p.sep_tokens + tokens;
                p.sep_tokens = sep_tokens;
                p.sum_exact &= sum_exact;
                p.last_tokens = tokens;
                p.last_exact = sum_exact;
                p.last = p.last.max(doc.created_at);
                p.first = p.first.min(doc.created_at);
                p.touched = self.clock;
                p.docs.push(doc);
                return;
            }
            let old = self.open.remove(&key).expect("present");
            // Closed on its budget within the conversation's flow: the next pack repeats the
            // last message when both fit, as fixed windows overlap.
            let carry = (near && self.settings.pack_overlap && old.docs.len() > 1)
                .then(|| old.docs.last().cloned())
                .flatten()
                .filter(|_| old.last_tokens + 1 + tokens <= max)
                .map(|d| (d, old.last_tokens, old.sep_tokens, old.last_exact));
            out.push(self.pack_chunk(old));
            if let Some((prev, prev_tokens, prev_sep, prev_exact)) = carry {
                let first = prev.created_at.min(doc.created_at);
                let last = prev.created_at.max(doc.created_at);
                self.open.insert(
                    key,
                    Pack {
                        docs: vec![prev, doc],
                        tokens: prev_tokens + prev_sep + tokens,
                        sep_tokens,
                        sum_exact: prev_exact && sum_exact,
                        last_tokens: tokens,
                        last_exact: sum_exact,
                        first,
                        last,
                        touched: self.clock,
                    },
                );
                return;
            }
        }
        let created = doc.created_at;
        self.open.insert(
            key,
            Pack {
                docs: vec![doc],
                tokens,
                sep_tokens,
                sum_exact,
                last_tokens: tokens,
                last_exact: sum_exact,
                first: created,
                last: created,
                touched: self.clock,
            },
        );
        if self.open.len() > MAX_OPEN_PACKS {
            self.evict(out);
        }
    }

    fn evict(&mut self, out: &mut Vec<Chunk>) {
        let mut ages: Vec<u64> = self.open.values().map(|p| p.touched).collect();
        let mid = ages.len() / 2;
        let (_, cut, _) = ages.select_nth_unstable(mid);
        let cut = *cut;
        let keys: Vec<PackKey> = self
            .open
            .iter()
            .filter(|(_, p)| p.touched <= cut)
            .map(|(k, _)| *k)
            .collect();
        let mut packs: Vec<Pack> = keys.iter().filter_map(|k| self.open.remove(k)).collect();
        packs.sort_by_key(|p| p.touched);
        for p in packs {
            out.push(self.pack_chunk(p));
        }
    }

    /// Flushes every open pack, in first-touched order so output is deterministic.
    pub fn finish(&mut self, out: &mut Vec<Chunk>) {
        let mut packs: Vec<Pack> = self.open.drain().map(|(_, p)| p).collect();
        packs.sort_by_key(|p| p.touched);
        for p in packs {
            out.push(self.pack_chunk(p));
        }
    }

    fn pack_chunk(&self, mut p: Pack) -> Chunk {
        if p.docs.len() == 1 {
            let d = p.docs.pop().expect("one doc");
            return whole_chunk(d, p.tokens);
        }
        // One allocation for the joined text, and the documents' own strings moved, not cloned:
        // this runs once per pack, over most of a chat corpus.
        let len = p
            .docs
            .iter()
            .map(|d| d.text.len() + PACK_SEPARATOR.len())
            .sum::<usize>();
        let mut text = String::with_capacity(len);
        for (i, d) in p.docs.iter().enumerate() {
            if i > 0 {
                text.push_str(PACK_SEPARATOR);
            }
            text.push_str(&d.text);
        }
        let tokens = if p.sum_exact {
            p.tokens
        } else {
            self.settings.encoding.count(&text)
        };
        let mut uniq: Vec<&str> = Vec::new();
        for a in p.docs.iter().filter_map(|d| d.author.as_deref()) {
            if !uniq.contains(&a) {
                uniq.push(a);
            }
        }
        let author = (!uniq.is_empty()).then(|| uniq.join(", "));
        let source_ids: Vec<String> = p
            .docs
            .iter_mut()
            .map(|d| std::mem::take(&mut d.source_id))
            .collect();
        let first = &mut p.docs[0];
        Chunk {
            user_id: first.user_id,
            kind: first.kind,
            source_ids,
            conversation_id: first.conversation_id.take(),
            title: first.title.take(),
            author,
            chunk_index: 0,
            byte_start: 0,
            byte_end: text.len(),
            token_start: 0,
            token_end: tokens,
            token_count: tokens,
            created_at: p.first,
            content_hash: hex128(content_hash(&text)),
            text,
            terms: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunker(max: usize, overlap: usize) -> Chunker {
        Chunker::new(ChunkSettings {
            max_tokens: max,
            overlap_tokens: overlap,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn short_text_is_one_span() {
        let sp = chunker(512, 64).spans("hello world");
        assert_eq!(sp.len(), 1);
        assert_eq!(sp[0].token_count, 2);
    }

    #[test]
    fn prefers_paragraph_then_sentence_boundaries() {
        let para = "word ".repeat(30);
        let text = format!("{}\n\n{}\n\n{}", para.trim(), para.trim(), para.trim());
        let sp = chunker(64, 8).spans(&text);
        assert!(sp.len() >= 2);
        assert!(
            text[..sp[0].byte_end].ends_with("\n\n"),
            "{:?}",
            &text[..sp[0].byte_end]
        );

        let text = "This is one sentence here. ".repeat(20);
        let sp = chunker(40, 4).spans(&text);
        assert!(text[..sp[0].byte_end].trim_end().ends_with('.'));
    }

    #[test]
    fn overlap_is_exact_on_latin_text() {
        let text = "alpha beta gamma delta epsilon zeta eta theta iota kappa ".repeat(60);
        let sp = chunker(100, 16).spans(&text);
        for w in sp.windows(2) {
            assert_eq!(w[0].token_end - w[1].token_start, 16);
        }
        for s in &sp {
            assert!(s.token_count <= 100);
        }
    }

    #[test]
    fn giant_word_is_cut_at_tokens_on_char_boundaries() {
        let text = "😀".repeat(400) + &"x".repeat(5000);
        let sp = chunker(64, 8).spans(&text);
        for s in &sp {
            assert!(text.is_char_boundary(s.byte_start) && text.is_char_boundary(s.byte_end));
            assert!(
                Encoding::Cl100kBase
                    .tokenizer()
                    .count(&text[s.byte_start..s.byte_end])
                    <= 64
            );
        }
        assert_eq!(sp.last().unwrap().byte_end, text.len());
    }

    /// Checks every invariant the chunker promises for one text; shared by the property test
    /// and the fixture-corpus test.
    pub(crate) fn check_spans(
        text: &str,
        spans: &[Span],
        max: usize,
        overlap: usize,
        enc: Encoding,
    ) {
        let tok = enc.tokenizer();
        let ids = tok.encode(text);
        let mut offsets = Vec::with_capacity(ids.len() + 1);
        let mut b = 0;
        offsets.push(0);
        for id in &ids {
            b += tok.bpe.token_len(*id);
            offsets.push(b);
        }
        assert!(!spans.is_empty());
        assert_eq!(spans[0].byte_start, 0);
        assert_eq!(spans.last().unwrap().byte_end, text.len());
        assert_eq!(spans.last().unwrap().token_end, ids.len());
        for s in spans {
            assert!(s.byte_end > s.byte_start, "empty span {s:?}");
            assert!(text.is_char_boundary(s.byte_start) && text.is_char_boundary(s.byte_end));
            let chunk = &text[s.byte_start..s.byte_end];
            let standalone = tok.count(chunk);
            assert_eq!(s.token_count, standalone, "span {s:?}");
            assert!(
                standalone <= max,
                "chunk of {standalone} tokens over {max}: {chunk:?}"
            );
            assert_eq!(
                offsets[s.token_start], s.byte_start,
                "token/byte start disagree {s:?}"
            );
            assert_eq!(
                offsets[s.token_end], s.byte_end,
                "token/byte end disagree {s:?}"
            );
        }
        for w in spans.windows(2) {
            let (a, n) = (w[0], w[1]);
            assert!(n.byte_start > a.byte_start, "no progress {a:?} {n:?}");
            assert!(n.byte_start <= a.byte_end, "gap between {a:?} and {n:?}");
            let got = a.token_end - n.token_start;
            let target = a.token_end - overlap;
            let on_char = |t: usize| text.is_char_boundary(offsets[t]);
            if got != overlap {
                // Only where the exact token position is inside a character: then the nearest
                // char boundary before it, or after it when before would not pass a's start.
                assert!(
                    !on_char(target),
                    "overlap {got} != {overlap} though token {target} is on a char boundary"
                );
                if got > overlap {
                    assert!(
                        (n.token_start + 1..target).all(|t| !on_char(t)),
                        "a nearer boundary existed: {a:?} {n:?}"
                    );
                } else {
                    assert!(
                        (a.token_start + 1..target).all(|t| !on_char(t)),
                        "could have overlapped more: {a:?} {n:?}"
                    );
                    assert!(
                        (target + 1..n.token_start).all(|t| !on_char(t)),
                        "a nearer boundary existed: {a:?} {n:?}"
                    );
                }
            }
        }
    }

    use proptest::prelude::*;

    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[a-z]{1,9}".prop_map(|w| w + " "),
            2 => Just(". ".to_string()),
            1 => Just("\n".to_string()),
            1 => Just("\n\n".to_string()),
            1 => "[\\p{Han}]{1,6}",
            1 => prop::sample::select(vec!["😀", "👨\u{200D}👩\u{200D}👧", "🇫🇷", "é", "ß", "Привет ", "مرحبا ", "  ", "1234567 ", "?! "]).prop_map(String::from),
            1 => "[a-zA-Z0-9]{20,120}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn chunking_invariants(parts in prop::collection::vec(piece(), 1..400), max in 16usize..160, ov_frac in 0usize..50, o200k in any::<bool>()) {
            let text: String = parts.concat();
            let overlap = (max * ov_frac / 100).min(max / 2 - 1);
            let enc = if o200k { Encoding::O200kBase } else { Encoding::Cl100kBase };
            let c = Chunker::new(ChunkSettings { max_tokens: max, overlap_tokens: overlap, encoding: enc, ..Default::default() }).unwrap();
            let spans = c.spans(&text);
            check_spans(&text, &spans, max, overlap, enc);
        }
    }

    /// Every chunk of the fixture corpus is a byte slice of its cleaned document, on char
    /// boundaries, never decoded from tokens; overlaps are as configured.
    #[test]
    fn fixture_corpus_chunks_are_exact_slices() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/sample.jsonl");
        let cleaner = crate::Cleaner::new();
        let mut docs = Vec::new();
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let raw: crate::RawDocument = serde_json::from_str(line).unwrap();
            if let Some(mut d) = cleaner.clean(raw) {
                // Split everything, chat included, so long messages are exercised too.
                d.conversation_id = None;
                docs.push(d);
            }
        }
        for (max, overlap) in [(512, 64), (200, 25), (64, 8)] {
            let c = chunker(max, overlap);
            let mut multi = 0;
            for d in &docs {
                let spans = c.spans(&d.text);
                check_spans(&d.text, &spans, max, overlap, Encoding::Cl100kBase);
                multi += usize::from(spans.len() > 1);
                let Split::Chunks(chunks) = c.split(d.clone()) else {
                    panic!("not packable")
                };
                for (ch, sp) in chunks.iter().zip(&spans) {
                    assert_eq!(&d.text[ch.byte_start..ch.byte_end], ch.text);
                    assert_eq!(ch.byte_start, sp.byte_start);
                }
            }
            assert!(
                multi > 10,
                "fixture has too few multi-chunk documents at {max}: {multi}"
            );
        }
    }

    #[test]
    fn packer_groups_a_conversation_within_the_window() {
        let settings = ChunkSettings {
            max_tokens: 64,
            overlap_tokens: 8,
            pack_window_secs: 600,
            ..Default::default()
        };
        let chunker = Chunker::new(settings.clone()).unwrap();
        let item = |d: CleanDocument| match chunker.split(d) {
            Split::Packable(i) => i,
            Split::Chunks(_) => panic!("short chat message not packable"),
        };
        let mut p = Packer::new(settings.clone());
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mk = |id: &str, conv: &str, mins: i64, text: &str| CleanDocument {
            user_id: 1,
            kind: crate::DocKind::Message,
            source_id: id.into(),
            text: text.into(),
            created_at: t0 + chrono::Duration::minutes(mins),
            conversation_id: Some(conv.into()),
            title: None,
            author: Some("bob".into()),
            meta: None,
            content_hash: 0,
        };
        let mut out = Vec::new();
        for (id, conv, m) in [
            ("a", "c1", 0),
            ("b", "c2", 1),
            ("c", "c1", 2),
            ("d", "c1", 60),
        ] {
            p.push(item(mk(id, conv, m, "hello there friend")), &mut out);
        }
        // "d" is an hour later: it closes the c1 pack of a and c.
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].source_ids, vec!["a", "c"]);
        assert_eq!(out[0].text, "hello there friend\nhello there friend");
        assert_eq!(out[0].author.as_deref(), Some("bob"), "one author, once");
        assert_eq!(out[0].token_count, settings.encoding.count(&out[0].text));
        p.finish(&mut out);
        let ids: Vec<Vec<String>> = out.iter().map(|c| c.source_ids.clone()).collect();
        assert_eq!(ids, vec![vec!["a", "c"], vec!["b"], vec!["d"]]);
        // A pack never exceeds the chunk limit; with overlap each pack after the first starts
        // with the message that ended the one before, without it every message is in one pack.
        for overlap in [false, true] {
            let settings = ChunkSettings {
                pack_overlap: overlap,
                ..settings.clone()
            };
            let mut p = Packer::new(settings.clone());
            let mut out = Vec::new();
            for i in 0..40 {
                p.push(
                    item(mk(
                        &format!("m{i}"),
                        "c1",
                        i,
                        "one two three four five six!",
                    )),
                    &mut out,
                );
            }
            // An hour's pause: no overlap across it.
            p.push(
                item(mk("late", "c1", 200, "one two three four five six!")),
                &mut out,
            );
            p.finish(&mut out);
            assert!(out.len() > 2);
            assert!(out.iter().all(|c| c.token_count <= 64));
            assert!(out
                .iter()
                .all(|c| c.token_count == settings.encoding.count(&c.text)));
            let total: usize = out.iter().map(|c| c.source_ids.len()).sum();
            let budget_closes = out.len() - 2;
            assert_eq!(total, 41 + if overlap { budget_closes } else { 0 });
            for w in out.windows(2).take(budget_closes) {
                let shared = w[1].source_ids[0] == *w[0].source_ids.last().unwrap();
                assert_eq!(
                    shared, overlap,
                    "{:?} then {:?}",
                    w[0].source_ids, w[1].source_ids
                );
            }
            assert_eq!(out.last().unwrap().source_ids, vec!["late"]);
        }
    }

    /// Pack token counts are summed from the parts, never recounted: check them against a
    /// recount on every pack of the fixture corpus, for both encodings.
    #[test]
    fn fixture_pack_counts_are_exact() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/sample.jsonl");
        let text = std::fs::read_to_string(path).unwrap();
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            let settings = ChunkSettings {
                encoding: enc,
                ..Default::default()
            };
            let chunker = Chunker::new(settings.clone()).unwrap();
            let mut packer = Packer::new(settings);
            let mut out = Vec::new();
            for line in text.lines() {
                let raw: crate::RawDocument = serde_json::from_str(line).unwrap();
                if let Some(d) = crate::Cleaner::new().clean(raw) {
                    match chunker.split(d) {
                        Split::Packable(i) => packer.push(i, &mut out),
                        Split::Chunks(c) => out.extend(c),
                    }
                }
            }
            packer.finish(&mut out);
            let packs = out.iter().filter(|c| c.source_ids.len() > 1).count();
            assert!(packs > 100, "{packs}");
            for c in &out {
                assert_eq!(
                    c.token_count,
                    enc.tokenizer().count(&c.text),
                    "{}: {:?}",
                    enc.as_str(),
                    c.text
                );
                assert!(c.token_count <= 512);
                assert_eq!(
                    c.content_hash,
                    crate::hash::hex128(crate::hash::content_hash(&c.text))
                );
            }
        }
    }
}
