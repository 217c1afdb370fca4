//! Token counting with OpenAI's encodings (cl100k_base, o200k_base), exact to tiktoken.
//! bpe-openai is used over tiktoken-rs: same counts, and faster (see docs/chunking.md).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Cl100kBase,
    O200kBase,
}

impl Encoding {
    pub fn tokenizer(self) -> &'static bpe_openai::Tokenizer {
        match self {
            Encoding::Cl100kBase => bpe_openai::cl100k_base(),
            Encoding::O200kBase => bpe_openai::o200k_base(),
        }
    }

    /// tiktoken's pre-token pieces of `text`: a scanner for cl100k_base (no regex), the
    /// encoding's own pattern for o200k_base.
    pub fn split<'a>(self, text: &'a str) -> Pieces<'a, impl Iterator<Item = &'a str> + 'a> {
        if self == Encoding::Cl100kBase {
            Pieces::Scan(crate::pretokenize::Cl100kSplits::new(text))
        } else {
            Pieces::Pattern(self.tokenizer().split(text))
        }
    }

    /// Exact tiktoken token count of `text`: its pieces counted through the piece cache.
    pub fn count(self, text: &str) -> usize {
        self.split(text).map(|p| self.count_piece(p)).sum()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::O200kBase => "o200k_base",
        }
    }
}

/// See [`Encoding::split`].
pub enum Pieces<'a, P> {
    Scan(crate::pretokenize::Cl100kSplits<'a>),
    Pattern(P),
}

impl<'a, P: Iterator<Item = &'a str>> Iterator for Pieces<'a, P> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        match self {
            Pieces::Scan(a) => a.next(),
            Pieces::Pattern(p) => p.next(),
        }
    }
}

impl FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cl100k_base" | "cl100k" => Ok(Encoding::Cl100kBase),
            "o200k_base" | "o200k" => Ok(Encoding::O200kBase),
            other => Err(format!(
                "unknown encoding {other:?} (cl100k_base or o200k_base)"
            )),
        }
    }
}

/// Pieces longer than this are counted directly: long pieces repeat rarely, and a key of one
/// u128 keeps lookups cheap.
const PIECE_CACHE_MAX_BYTES: usize = 16;
/// Entries per thread before the cache starts over: about 2.5 MB, enough for the working
/// vocabulary of a corpus (a word-level cache, as HF tokenizers keeps one for BPE).
const PIECE_CACHE_CAPACITY: usize = 1 << 16;

/// FxHash-style mixing for fixed-size keys (the piece cache, the packer's open packs).
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(n as u64);
    }
}

#[derive(Default)]
struct PieceCache {
    map: HashMap<(u128, u16), u32, BuildHasherDefault<KeyHasher>>,
    hits: u64,
    misses: u64,
}

thread_local! {
    static PIECE_CACHE: RefCell<PieceCache> = RefCell::new(PieceCache::default());
}

impl Encoding {
    /// Exact token count of one pre-token piece (from `tokenizer().split`), memoised per thread.
    /// Chat and transcripts repeat their words: most pieces are found, and BPE is skipped.
    pub fn count_piece(self, piece: &str) -> usize {
        let bytes = piece.as_bytes();
        if bytes.len() <= 1 {
            return bytes.len(); // every single byte is a token of its own
        }
        if bytes.len() > PIECE_CACHE_MAX_BYTES {
            return self.tokenizer().bpe.count(bytes);
        }
        let mut buf = [0u8; PIECE_CACHE_MAX_BYTES];
        buf[..bytes.len()].copy_from_slice(bytes);
        let key = (
            u128::from_le_bytes(buf),
            bytes.len() as u16 | ((self as u16) << 8),
        );
        PIECE_CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(&n) = c.map.get(&key) {
                c.hits += 1;
                return n as usize;
            }
            c.misses += 1;
            let n = self.tokenizer().bpe.count(bytes);
            if c.map.len() >= PIECE_CACHE_CAPACITY {
                c.map.clear();
            }
            c.map.insert(key, n as u32);
            n
        })
    }
}

/// (hits, misses) of this thread's piece cache, for benchmarks.
pub fn piece_cache_stats() -> (u64, u64) {
    PIECE_CACHE.with(|c| {
        let c = c.borrow();
        (c.hits, c.misses)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_counts() {
        // Values from Python tiktoken 0.x.
        assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
        assert_eq!(Encoding::Cl100kBase.count(""), 0);
    }

    #[test]
    fn cached_piece_counts_equal_bpe_for_both_encodings() {
        let text =
            "Hello hello  world!! ünïcödé 日本語のテキスト 😀😀 1234567 aaaaaaaaaaaaaaaaaaaaaaaaa "
                .repeat(3);
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            for _ in 0..2 {
                let sum: usize = enc.split(&text).map(|p| enc.count_piece(p)).sum();
                assert_eq!(sum, enc.tokenizer().count(&text));
            }
        }
        // The same bytes under the other encoding are a different key.
        let (a, b) = (
            Encoding::Cl100kBase.count_piece(" 日本語"),
            Encoding::O200kBase.count_piece(" 日本語"),
        );
        assert_eq!(a, Encoding::Cl100kBase.tokenizer().count(" 日本語"));
        assert_eq!(b, Encoding::O200kBase.tokenizer().count(" 日本語"));
        assert!(piece_cache_stats().0 > 0);
    }
}
