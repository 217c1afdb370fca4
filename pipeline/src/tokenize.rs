//! Token counting with OpenAI's encodings (cl100k_base, o200k_base), exact to tiktoken.
//! bpe-openai is used over tiktoken-rs: same counts, and faster (see docs/chunking.md).

use std::cell::RefCell;
use std::hash::Hasher;
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
        self.with_counter(|c| c.count_text(text))
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

/// Pieces longer than this are counted directly: long pieces repeat rarely, and a key of two
/// u64 keeps lookups cheap.
const PIECE_CACHE_MAX_BYTES: usize = 16;
/// Sets of the per-thread piece cache, two entries each in one 64-byte line: 2 MB a thread,
/// room for the working vocabulary of a corpus (a word-level cache, as HF tokenizers keeps one
/// for BPE).
const PIECE_CACHE_SETS: usize = 1 << 15;

/// FxHash-style mixing for fixed-size keys (the packer's open packs).
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

/// A piece of 2 to 16 bytes as a fixed key: its first and last bytes read as integers (they
/// overlap for short pieces, and together with the length they give every byte back), plus the
/// length and the encoding in `tag`. No copy into a buffer: this runs for every piece.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct PieceKey {
    head: u64,
    tail: u64,
    /// Length | encoding << 8; 0 marks an empty slot (no piece has length 0 here).
    tag: u16,
}

impl PieceKey {
    #[inline]
    fn new(bytes: &[u8], enc: Encoding) -> Self {
        let n = bytes.len();
        debug_assert!((2..=PIECE_CACHE_MAX_BYTES).contains(&n));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| {
            u64::from(u32::from_le_bytes(
                bytes[i..i + 4].try_into().expect("4 bytes"),
            ))
        };
        let (head, tail) = if n >= 8 {
            (u64_at(0), u64_at(n - 8))
        } else if n >= 4 {
            (u32_at(0), u32_at(n - 4))
        } else {
            (
                u64::from(bytes[0]) | u64::from(bytes[1]) << 8,
                u64::from(bytes[n - 1]),
            )
        };
        PieceKey {
            head,
            tail,
            tag: n as u16 | ((enc as u16) << 8),
        }
    }

    #[inline]
    fn set(&self) -> usize {
        let h = (self.head ^ self.tail.rotate_left(29) ^ u64::from(self.tag))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> (64 - PIECE_CACHE_SETS.trailing_zeros())) as usize
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    key: PieceKey,
    count: u32,
}

/// The two slots of a set in one cache line: a lookup touches one line, never two.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Set([Slot; 2]);
const _: () = assert!(std::mem::size_of::<Set>() == 64);

/// Exact BPE counts of short pieces, two-way set-associative: a hit costs one multiply and one
/// or two compares; a miss replaces the older entry of its set.
struct PieceCache {
    slots: Vec<Set>,
    hits: u64,
    misses: u64,
}

impl Default for PieceCache {
    fn default() -> Self {
        PieceCache {
            slots: vec![Set::default(); PIECE_CACHE_SETS],
            hits: 0,
            misses: 0,
        }
    }
}

thread_local! {
    static PIECE_CACHE: RefCell<PieceCache> = RefCell::new(PieceCache::default());
}

/// Counts pieces of one encoding through this thread's cache; see [`Encoding::with_counter`].
pub struct PieceCounter<'c> {
    enc: Encoding,
    bpe: &'static bpe_openai::byte_pair_encoding::BytePairEncoding,
    /// `None` when this thread's cache is already borrowed (a nested `with_counter`): counts
    /// are then exact but uncached, never a panic.
    cache: Option<&'c mut PieceCache>,
}

impl PieceCounter<'_> {
    /// Exact token count of one pre-token piece (from [`Encoding::split`]).
    #[inline]
    pub fn count(&mut self, piece: &str) -> usize {
        let bytes = piece.as_bytes();
        if bytes.len() <= 1 {
            return bytes.len(); // every single byte is a token of its own
        }
        let cache = match self.cache.as_deref_mut() {
            Some(c) if bytes.len() <= PIECE_CACHE_MAX_BYTES => c,
            _ => return self.bpe.count(bytes),
        };
        let key = PieceKey::new(bytes, self.enc);
        let set = &mut cache.slots[key.set()].0;
        if set[0].key == key {
            cache.hits += 1;
            return set[0].count as usize;
        }
        if set[1].key == key {
            cache.hits += 1;
            set.swap(0, 1);
            return set[0].count as usize;
        }
        cache.misses += 1;
        let n = self.bpe.count(bytes);
        set[1] = set[0];
        set[0] = Slot {
            key,
            count: n as u32,
        };
        n
    }

    /// Exact token count of a whole text.
    pub fn count_text(&mut self, text: &str) -> usize {
        self.enc.split(text).map(|p| self.count(p)).sum()
    }
}

impl Encoding {
    /// Runs `f` with a counter over this thread's piece cache, borrowed once for all the pieces
    /// `f` counts. Chat and transcripts repeat their words: most pieces are found, and BPE is
    /// skipped. A nested call counts without the cache.
    pub fn with_counter<R>(self, f: impl FnOnce(&mut PieceCounter<'_>) -> R) -> R {
        let bpe = &self.tokenizer().bpe;
        PIECE_CACHE.with(|c| {
            let mut borrowed = c.try_borrow_mut().ok();
            f(&mut PieceCounter {
                enc: self,
                bpe,
                cache: borrowed.as_deref_mut(),
            })
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

    proptest::proptest! {
        /// The key gives the bytes back: two different pieces never share one.
        #[test]
        fn piece_keys_are_injective(a in proptest::collection::vec(proptest::prelude::any::<u8>(), 2..=16),
                                    b in proptest::collection::vec(proptest::prelude::any::<u8>(), 2..=16)) {
            let (ka, kb) = (PieceKey::new(&a, Encoding::Cl100kBase), PieceKey::new(&b, Encoding::Cl100kBase));
            proptest::prop_assert_eq!(ka == kb, a == b);
            proptest::prop_assert!(PieceKey::new(&a, Encoding::O200kBase) != ka);
        }

        /// Counts through the cache, hits and misses alike, equal BPE's own.
        #[test]
        fn cached_counts_equal_bpe(words in proptest::collection::vec("[a-zé日😀 ]{1,6}", 1..40)) {
            let enc = Encoding::Cl100kBase;
            for w in words.iter().chain(words.iter()) {
                for p in enc.split(w) {
                    proptest::prop_assert_eq!(enc.with_counter(|c| c.count(p)), enc.tokenizer().bpe.count(p.as_bytes()));
                }
            }
        }
    }

    #[test]
    fn a_nested_counter_counts_exactly_without_the_cache() {
        let enc = Encoding::Cl100kBase;
        let text = "nested counting, no panic: 日本語 😀";
        let (outer, inner) = enc.with_counter(|c| (c.count_text(text), enc.count(text)));
        assert_eq!(outer, enc.tokenizer().count(text));
        assert_eq!(inner, outer);
    }

    #[test]
    fn piece_keys_differ_in_the_middle() {
        // Same first and last 8 bytes, different middle: only possible past 16 bytes.
        let a = b"abcdefgh12345678";
        let b = b"abcdefgh12345679";
        assert!(PieceKey::new(a, Encoding::Cl100kBase) != PieceKey::new(b, Encoding::Cl100kBase));
        let (c, d) = (b"abcXefg", b"abcYefg");
        assert!(PieceKey::new(c, Encoding::Cl100kBase) != PieceKey::new(d, Encoding::Cl100kBase));
    }

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
                let sum: usize = enc.with_counter(|c| enc.split(&text).map(|p| c.count(p)).sum());
                assert_eq!(sum, enc.tokenizer().count(&text));
            }
        }
        // The same bytes under the other encoding are a different key.
        let (a, b) = (
            Encoding::Cl100kBase.with_counter(|c| c.count(" 日本語")),
            Encoding::O200kBase.with_counter(|c| c.count(" 日本語")),
        );
        assert_eq!(a, Encoding::Cl100kBase.tokenizer().count(" 日本語"));
        assert_eq!(b, Encoding::O200kBase.tokenizer().count(" 日本語"));
        assert!(piece_cache_stats().0 > 0);
    }
}
