//! cl100k_base pre-tokenization without a regex: the same pieces as tiktoken's pattern, found by
//! a scanner over character classes. The regex was a fifth of clean+chunk's time on chat text.
//!
//! bpe-openai runs the pattern as three prioritised patterns (leftmost-first):
//! `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+$`,
//! then `\s+\s` with its last character dropped (tiktoken's `\s+(?!\S)`), then `\s+`.
//! The scanner follows those alternatives in that order. Its classes `\p{L}`, `\p{N}` and `\s`
//! come from `regex-syntax`, the very tables the regex is compiled from, so both agree on every
//! code point of whatever Unicode version that crate carries.

use std::sync::LazyLock;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
enum Class {
    Other = 0,
    Letter = 1,
    Number = 2,
    Space = 3,
}

/// Code points per block of the two-level class table: 256 keeps the index at 4,352 entries and
/// lets scripts that share a class layout share a block.
const BLOCK: usize = 256;
const BLOCKS: usize = (char::MAX as usize + 1) / BLOCK;

/// `\p{L}`, `\p{N}` and `\s` for every code point, as the pattern's regex sees them.
struct ClassTable {
    index: Vec<u16>,
    blocks: Vec<[Class; BLOCK]>,
}

static TABLE: LazyLock<ClassTable> = LazyLock::new(ClassTable::build);

impl ClassTable {
    fn build() -> Self {
        let mut all = vec![Class::Other; char::MAX as usize + 1];
        for (pattern, class) in [
            (r"\p{L}", Class::Letter),
            (r"\p{N}", Class::Number),
            (r"\s", Class::Space),
        ] {
            for (lo, hi) in unicode_ranges(pattern) {
                all[lo as usize..=hi as usize].fill(class);
            }
        }
        let mut index = Vec::with_capacity(BLOCKS);
        let mut blocks: Vec<[Class; BLOCK]> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for chunk in all.chunks_exact(BLOCK) {
            let block: [Class; BLOCK] = chunk.try_into().expect("block size");
            let id = *seen.entry(block).or_insert_with(|| {
                blocks.push(block);
                blocks.len() - 1
            });
            index.push(u16::try_from(id).expect("fewer than 65536 distinct blocks"));
        }
        ClassTable { index, blocks }
    }

    #[inline]
    fn class(&self, c: u32) -> Class {
        let c = c as usize;
        self.blocks[self.index[c / BLOCK] as usize][c % BLOCK]
    }
}

/// The code point ranges of a one-class pattern, from the regex crate's own parser.
fn unicode_ranges(pattern: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::parse(pattern).expect("a valid class");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(cls)) => {
            cls.ranges().iter().map(|r| (r.start(), r.end())).collect()
        }
        other => unreachable!("{pattern} parsed to {other:?}"),
    }
}

const fn ascii_class(b: u8) -> Class {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ' => Class::Space,
        _ => Class::Other,
    }
}

static ASCII: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = ascii_class(i as u8);
        i += 1;
    }
    t
};

/// The pieces of `text`, in order.
pub struct Cl100kSplits<'a> {
    text: &'a str,
    pos: usize,
    table: &'static ClassTable,
}

impl<'a> Cl100kSplits<'a> {
    pub fn new(text: &'a str) -> Self {
        Cl100kSplits {
            text,
            pos: 0,
            table: &TABLE,
        }
    }
}

/// Decodes the character at `i` of valid UTF-8: (code point, byte length).
#[inline]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

struct Scan<'t> {
    b: &'t [u8],
    table: &'static ClassTable,
}

impl Scan<'_> {
    /// Class and byte length of the character at `i` (< len).
    #[inline]
    fn at(&self, i: usize) -> (Class, usize) {
        let b0 = self.b[i];
        if b0 < 0x80 {
            return (ASCII[b0 as usize], 1);
        }
        let (c, n) = decode(self.b, i);
        (self.table.class(c), n)
    }

    /// Class at `i`, or `None` at the end.
    #[inline]
    fn class_at(&self, i: usize) -> Option<(Class, usize)> {
        (i < self.b.len()).then(|| self.at(i))
    }

    /// End of the run of `class` characters from `i`. ASCII bytes, most of any text, are
    /// checked in a tight loop; only other characters are decoded.
    #[inline]
    fn run(&self, mut i: usize, class: Class) -> usize {
        let b = self.b;
        loop {
            while i < b.len() && b[i] < 0x80 {
                if ASCII[b[i] as usize] != class {
                    return i;
                }
                i += 1;
            }
            if i >= b.len() {
                return i;
            }
            let (c, n) = decode(b, i);
            if self.table.class(c) != class {
                return i;
            }
            i += n;
        }
    }

    /// `(?i:s|t|m|d)` and `(?i:re|ve|ll)` after an apostrophe at `i`: the end of the
    /// contraction. Under Unicode case folding `ſ` (U+017F) is an `s`; no other non-ASCII
    /// character folds to these letters.
    fn contraction(&self, i: usize) -> Option<usize> {
        let b = self.b;
        let j = i + 1;
        let c1 = *b.get(j)?;
        if matches!(c1.to_ascii_lowercase(), b's' | b't' | b'm' | b'd') {
            return Some(j + 1);
        }
        if b[j..].starts_with("ſ".as_bytes()) {
            return Some(j + 2);
        }
        let c2 = b.get(j + 1)?.to_ascii_lowercase();
        matches!(
            (c1.to_ascii_lowercase(), c2),
            (b'r', b'e') | (b'v', b'e') | (b'l', b'l')
        )
        .then_some(j + 2)
    }

    /// End of the piece that starts at `i` (< len).
    fn piece_end(&self, i: usize) -> usize {
        let b = self.b;
        let n = b.len();
        let c0 = b[i];
        if c0 == b'\'' {
            if let Some(end) = self.contraction(i) {
                return end;
            }
        }
        let (k0, l0) = self.at(i);
        let j = i + l0;
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if k0 == Class::Letter {
            return self.run(j, Class::Letter);
        }
        let next = self.class_at(j);
        if k0 != Class::Number && c0 != b'\r' && c0 != b'\n' {
            if let Some((Class::Letter, l1)) = next {
                return self.run(j + l1, Class::Letter);
            }
        }
        // \p{N}{1,3}
        if k0 == Class::Number {
            let mut end = j;
            for _ in 0..2 {
                match self.class_at(end) {
                    Some((Class::Number, l)) => end += l,
                    _ => break,
                }
            }
            return end;
        }
        // " ?[^\s\p{L}\p{N}]+[\r\n]*"
        let other_from = if k0 == Class::Other {
            Some(j)
        } else if c0 == b' ' {
            match next {
                Some((Class::Other, l1)) => Some(j + l1),
                _ => None,
            }
        } else {
            None
        };
        if let Some(from) = other_from {
            let mut end = self.run(from, Class::Other);
            while end < n && (b[end] == b'\r' || b[end] == b'\n') {
                end += 1;
            }
            return end;
        }
        // Whitespace from here on: k0 is Space.
        let end = self.run(j, Class::Space);
        // \s*[\r\n]+ : up to the last line break of the run. UTF-8 never puts these bytes inside
        // a multi-byte character, so a byte search is a character search.
        if let Some(last_nl) = b[i..end].iter().rposition(|&c| c == b'\r' || c == b'\n') {
            return i + last_nl + 1;
        }
        // \s+$
        if end == n {
            return end;
        }
        // \s+\s minus its last character, else \s+.
        if end == j {
            return end;
        }
        let mut last = end - 1;
        while b[last] & 0xC0 == 0x80 {
            last -= 1;
        }
        last
    }
}

impl<'a> Iterator for Cl100kSplits<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let b = self.text.as_bytes();
        if self.pos >= b.len() {
            return None;
        }
        let start = self.pos;
        self.pos = Scan {
            b,
            table: self.table,
        }
        .piece_end(start);
        // Every end is found by whole characters, so it is a char boundary.
        Some(&self.text[start..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regex_pieces(t: &str) -> Vec<&str> {
        bpe_openai::cl100k_base().split(t).collect()
    }

    fn ours(t: &str) -> Vec<&str> {
        Cl100kSplits::new(t).collect()
    }

    #[test]
    fn known_splits() {
        for t in [
            "Hello world, it's 12345 o'clock!!\n\n  Next   line\r\n\tend  ",
            "I'LL we'Re you've 'sa ' 'x",
            "   hello  \n  \n  x",
            "(hello) [1] {a}b 3a a3 ...\n\n\n!\n x",
            "\x00\x01abc\x0b\x0c  \x7f",
            " ",
            "  ",
            "\n",
            "a  ",
            "a  b",
            "Ça va? Très bien 😀😀 日本語のテキスト ١٢٣٤ ½² Ⅻ",
            "it'ſ IT'ſa 'ſ 'K 'k",
            "a\u{3000}\u{3000}b \u{00A0}\u{00A0}x\u{2028}\u{0085} \u{2003}",
            "नमस्ते दुनिया — привет, мир! ¿Qué tal? 👍🏽👨‍👩‍👧",
            " 🙂🙂\n\n\r\n x",
        ] {
            assert_eq!(ours(t), regex_pieces(t), "{t:?}");
        }
    }

    /// Every code point's class against the regex itself, one character at a time.
    #[test]
    fn classes_match_the_regex_for_every_code_point() {
        let re = |p: &str| regex::Regex::new(&format!("^{p}$")).unwrap();
        let (l, n, s) = (re(r"\p{L}"), re(r"\p{N}"), re(r"\s"));
        let mut buf = [0u8; 4];
        for c in (0..=char::MAX as u32).filter_map(char::from_u32) {
            let t = c.encode_utf8(&mut buf);
            let want = if l.is_match(t) {
                Class::Letter
            } else if n.is_match(t) {
                Class::Number
            } else if s.is_match(t) {
                Class::Space
            } else {
                Class::Other
            };
            assert_eq!(TABLE.class(c as u32), want, "U+{:04X}", c as u32);
        }
    }

    /// The contraction letters under case folding: only ASCII letters and `ſ`.
    #[test]
    fn contraction_case_folds() {
        let re = regex::Regex::new(r"^(?i:'s|'t|'re|'ve|'m|'ll|'d)").unwrap();
        let mut buf = [0u8; 4];
        for c in (0..=char::MAX as u32).filter_map(char::from_u32) {
            for tail in ["", "e", "l", "E", "L"] {
                let t = format!("'{}{tail}", c.encode_utf8(&mut buf));
                let want = re.find(&t).map(|m| m.end());
                let scan = Scan {
                    b: t.as_bytes(),
                    table: &TABLE,
                };
                assert_eq!(scan.contraction(0), want, "{t:?}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Every ASCII string, weighted towards the characters the pattern treats specially.
        #[test]
        fn same_pieces_as_the_regex_ascii(t in "([a-zA-Z]{1,4}|[0-9]{1,5}|[ ]{1,3}|[\\t\\n\\r\\x0B\\x0C]|'[sStTrRvVlLmMdDeE]{0,2}|[!-/:-@\\[-`{-~]{1,3}|[\\x00-\\x08\\x0E-\\x1F\\x7F]){0,24}") {
            prop_assert_eq!(ours(&t), regex_pieces(&t));
        }

        /// Unicode: letters, marks, numbers of many scripts, Unicode spaces, emoji and ZWJ, `ſ`.
        #[test]
        fn same_pieces_as_the_regex_unicode(t in "([a-zA-Zé]{1,3}|\\p{L}{1,3}|\\p{M}{1,2}|\\p{N}{1,4}|[ ]{1,3}|\\s{1,2}|[\\t\\n\\r]|'[sStTrRvVlLmMdDeEſK]{0,2}|\\p{P}{1,2}|\\p{S}{1,2}|[😀👍🏽\u{200D}\u{FE0F}]{1,3}|\\PC|[\\x00-\\x08\\x7F\u{85}]){0,24}") {
            prop_assert_eq!(ours(&t), regex_pieces(&t));
        }
    }
}
