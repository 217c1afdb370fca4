//! Lexical terms: one normalisation for what is indexed and what is asked, so a question's words
//! meet the stored words exactly. Words by Unicode segmentation (Latin, Cyrillic, Greek, Arabic,
//! Devanagari and other spaced scripts), CJK runs as overlapping bigrams (no spaces to split on),
//! case and optional diacritics folded, a short English stop list dropped.

use unicode_normalization::UnicodeNormalization;
use unicode_segmentation::UnicodeSegmentation;

/// Terms a question contributes to a lexical query: a question is a sentence, and a longer text
/// pasted in as a question should not turn into a scan of every posting list.
pub const MAX_QUERY_TERMS: usize = 32;

/// Bytes a single term may keep: a URL or a base64 blob is one "word" to the segmenter, and an
/// index entry that long only costs space without ever matching a question.
const MAX_TERM_BYTES: usize = 48;

/// Function words of English questions and chat: they match nearly every passage, so they only
/// cost time in the query and space in the index.
const STOP_WORDS: &[&str] = &[
    "a", "about", "am", "an", "and", "are", "as", "at", "be", "been", "but", "by", "can", "could",
    "did", "do", "does", "for", "from", "had", "has", "have", "he", "her", "him", "his", "how",
    "i", "if", "in", "is", "it", "its", "me", "my", "of", "on", "or", "our", "she", "so", "that",
    "the", "their", "them", "then", "there", "they", "this", "to", "too", "us", "was", "we",
    "were", "what", "when", "where", "which", "who", "why", "will", "with", "would", "you", "your",
];

fn is_stop(w: &str) -> bool {
    STOP_WORDS.binary_search(&w).is_ok()
}

/// Scripts written without spaces between words, where a "word" from the segmenter is one
/// character: Han, Hiragana, Katakana, and Thai/Lao/Khmer/Myanmar are left to the segmenter's
/// dictionary-free rules, which give whole runs; both are bigrammed.
fn is_unspaced(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF   // Hiragana, Katakana
        | 0x3400..=0x4DBF // CJK Extension A
        | 0x4E00..=0x9FFF // CJK Unified Ideographs
        | 0xF900..=0xFAFF // CJK Compatibility Ideographs
        | 0x20000..=0x2FFFF
        | 0x0E00..=0x0EFF // Thai, Lao
        | 0x1000..=0x109F // Myanmar
        | 0x1780..=0x17FF // Khmer
    )
}

/// Marks that are optional in writing, so a question typed without them still matches: Latin,
/// Greek and Cyrillic accents (after NFD), Arabic short vowels and the tatweel. Devanagari vowel
/// signs are letters of the word and are kept.
fn is_optional_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x064B..=0x065F | 0x0670 | 0x0640)
}

/// Folds one segmenter word: lower case, optional marks dropped, ASCII punctuation inside the
/// word ("3.5", "o'neil") dropped so every term is one token to the index's ASCII tokenizer.
fn fold(word: &str, out: &mut String) {
    out.clear();
    if word.is_ascii() {
        // Most chat words: ASCII has no marks and is its own NFD and NFC.
        out.extend(
            word.bytes()
                .filter(u8::is_ascii_alphanumeric)
                .map(|b| b.to_ascii_lowercase() as char),
        );
        out.truncate(MAX_TERM_BYTES);
        return;
    }
    fold_unicode(word, out);
}

/// `fold` for any word: through NFD, so marks can be dropped, then back to NFC.
fn fold_unicode(word: &str, out: &mut String) {
    out.clear();
    for c in word.nfd() {
        // A control character inside a word (a C1 control such as U+0095, which the segmenter
        // joins to a following combining mark) is no letter of it.
        if is_optional_mark(c) || c.is_control() || (c.is_ascii() && !c.is_ascii_alphanumeric()) {
            continue;
        }
        out.extend(c.to_lowercase());
    }
    let composed: String = out.nfc().collect();
    *out = composed;
    if out.len() > MAX_TERM_BYTES {
        let end = crate::clean::floor_char_boundary(out, MAX_TERM_BYTES);
        out.truncate(end);
    }
}

/// Calls `emit` with each term of `text`, in order, duplicates included.
pub fn for_each_term(text: &str, mut emit: impl FnMut(&str)) {
    let mut buf = String::new();
    // The pending run of unspaced-script characters, bigrammed when it ends.
    let mut run: Vec<char> = Vec::new();
    let flush = |run: &mut Vec<char>, emit: &mut dyn FnMut(&str)| {
        match run.len() {
            0 => {}
            1 => emit(&run[0].to_string()),
            _ => {
                let mut s = String::with_capacity(8);
                for w in run.windows(2) {
                    s.clear();
                    s.push(w[0]);
                    s.push(w[1]);
                    emit(&s);
                }
            }
        }
        run.clear();
    };
    // NFKC first: full-width Latin and digits, ligatures and compatibility forms become the
    // letters a question would be typed with.
    // Text already in NFKC (all ASCII text, most of any text) is used as it is.
    let normalised: String;
    let text = if unicode_normalization::is_nfkc_quick(text.chars())
        == unicode_normalization::IsNormalized::Yes
    {
        text
    } else {
        normalised = text.nfkc().collect();
        &normalised
    };
    for word in text.unicode_words() {
        if word.chars().all(is_unspaced) {
            run.extend(word.chars());
            continue;
        }
        flush(&mut run, &mut emit);
        if word.chars().any(is_unspaced) {
            // Mixed word ("iPhone手机"): the spaced part is a term, the rest a run.
            let (spaced, unspaced): (String, String) = word.chars().partition(|c| !is_unspaced(*c));
            fold(&spaced, &mut buf);
            if !buf.is_empty() && !is_stop(&buf) {
                emit(&buf);
            }
            run.extend(unspaced.chars());
            flush(&mut run, &mut emit);
            continue;
        }
        fold(word, &mut buf);
        if !buf.is_empty() && !is_stop(&buf) {
            emit(&buf);
        }
    }
    flush(&mut run, &mut emit);
}

/// The terms of a stored text, space-separated, duplicates kept (BM25 counts them).
pub fn document_terms(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for_each_term(text, |t| {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(t);
    });
    out
}

/// What a chunk is indexed by: the distinct terms of its title and text, space-separated, in
/// order of first use. Distinct: BM25 over short chunks gains nothing measurable from term
/// frequency here (docs/retrieval.md), and each repeat is index work at build time.
pub fn index_terms(title: Option<&str>, text: &str) -> String {
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = String::with_capacity(text.len() / 2);
    let mut add = |t: &str| {
        if !seen.contains(t) {
            seen.insert(t.to_string());
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(t);
        }
    };
    if let Some(t) = title {
        for_each_term(t, &mut add);
    }
    for_each_term(text, &mut add);
    out
}

/// The distinct terms of a question, in order of first use, at most `MAX_QUERY_TERMS`.
pub fn query_terms(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for_each_term(text, |t| {
        if out.len() < MAX_QUERY_TERMS && !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
        /// The ASCII shortcuts change nothing: the same terms as the full Unicode path.
        #[test]
        fn ascii_shortcuts_fold_as_unicode_does(word in "[ -~]{0,70}") {
            let (mut fast, mut slow) = (String::new(), String::new());
            fold(&word, &mut fast);
            fold_unicode(&word, &mut slow);
            prop_assert_eq!(fast, slow);
            let full: String = word.nfkc().collect();
            let mut via_nfkc = Vec::new();
            for_each_term(&full, |t| via_nfkc.push(t.to_string()));
            let mut direct = Vec::new();
            for_each_term(&word, |t| direct.push(t.to_string()));
            prop_assert_eq!(direct, via_nfkc);
        }
    }

    #[test]
    fn stop_words_are_sorted() {
        let mut s = STOP_WORDS.to_vec();
        s.sort_unstable();
        assert_eq!(s, STOP_WORDS, "binary_search needs the list sorted");
    }

    /// Fuzz finding (cleaner target): a C1 control (U+0095) before a Devanagari vowel sign is one
    /// segmenter word, and the control stayed in its term; the store's FTS5 query quotes each
    /// term and relies on terms holding no control character.
    #[test]
    fn no_term_holds_a_control_character() {
        for text in ["\u{95}\u{93e}", "a\u{85}\u{301}b", "\u{9f}\u{94d} x"] {
            for t in query_terms(text) {
                assert!(!t.chars().any(char::is_control), "{text:?} gave {t:?}");
                assert!(!t.is_empty());
            }
        }
        assert_eq!(query_terms("\u{95}\u{93e}"), vec!["\u{93e}"]);
    }

    #[test]
    fn terms_by_script() {
        let cases: &[(&str, &[&str])] = &[
            (
                "What is the Flight TP1352 to Porto?",
                &["flight", "tp1352", "porto"],
            ),
            ("Café CRÈME, naïve", &["cafe", "creme", "naive"]),
            ("Ｆｕｌｌ ｗｉｄｔｈ ４２", &["full", "width", "42"]),
            (
                "It costs 3.5 euros; O'Neil's",
                &["costs", "35", "euros", "oneils"],
            ),
            ("Привет, Ёлка и Москва", &["привет", "елка", "и", "москва"]),
            // Arabic with and without short vowels gives the same term.
            ("مَدْرَسَة مدرسة", &["مدرسة", "مدرسة"]),
            // Devanagari vowel signs stay in the word.
            ("नमस्ते दुनिया", &["नमस्ते", "दुनिया"]),
            ("会议室见面", &["会议", "议室", "室见", "见面"]),
            ("我 and 你", &["我", "你"]),
            ("iPhone手机", &["iphone", "手机"]),
            ("", &[]),
            ("?!... --", &[]),
        ];
        for (text, want) in cases {
            let mut got = Vec::new();
            for_each_term(text, |t| got.push(t.to_string()));
            assert_eq!(&got, want, "terms of {text:?}");
        }
    }

    #[test]
    fn documents_and_questions_agree() {
        let doc = document_terms("Booked the HOTEL Casa Azul, near the river");
        for t in query_terms("which hotel did I book? casa azul") {
            if t != "book" && t != "book?" {
                assert!(
                    doc.split(' ').any(|d| d == t),
                    "question term {t} missing from {doc}"
                );
            }
        }
        assert_eq!(query_terms("hotel hotel Hotel"), vec!["hotel"]);
        assert_eq!(
            index_terms(Some("Hotel notes"), "the hotel Casa, casa AZUL"),
            "hotel notes casa azul"
        );
    }

    #[test]
    fn long_inputs_are_bounded() {
        let q: String = (0..500).map(|i| format!("w{i} ")).collect();
        assert_eq!(query_terms(&q).len(), MAX_QUERY_TERMS);
        let blob = "x".repeat(10_000);
        let t = document_terms(&blob);
        assert_eq!(t.len(), MAX_TERM_BYTES);
        let cyr = "ж".repeat(100);
        assert!(document_terms(&cyr).len() <= MAX_TERM_BYTES);
    }

    #[test]
    fn every_term_is_one_ascii_token() {
        // The FTS index splits on ASCII non-alphanumerics: a term holding one would be split
        // there and lose the user prefix on its tail.
        for text in [
            "a.b-c_d e/f",
            "x@y.z",
            "1,000.50",
            "foo::bar",
            "日本語のテキスト",
        ] {
            for_each_term(text, |t| {
                assert!(
                    t.chars()
                        .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric()),
                    "{t:?}"
                );
            });
        }
    }
}
