//! Clean: markup to text, NFC, control and zero-width removal, whitespace collapse, content hash.
//! Pure and per document, so the runner can run it on rayon over a batch.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::hash::content_hash;
use crate::types::{CleanDocument, RawDocument};

/// The cleaning stage. Stateless; duplicates are dropped by `Deduper`, which needs order.
#[derive(Debug, Clone, Default)]
pub struct Cleaner;

impl Cleaner {
    pub fn new() -> Self {
        Cleaner
    }

    /// Cleans one document; `None` when nothing readable is left.
    pub fn clean(&self, raw: RawDocument) -> Option<CleanDocument> {
        let text = clean_text(&raw.text);
        if text.is_empty() {
            return None;
        }
        let title = raw.title.map(|t| clean_text(&t)).filter(|t| !t.is_empty());
        Some(CleanDocument {
            content_hash: content_hash(&text),
            user_id: raw.user_id,
            kind: raw.kind,
            source_id: raw.source_id,
            text,
            created_at: raw.created_at,
            conversation_id: raw.conversation_id,
            title,
            author: raw.author,
            meta: raw.meta,
        })
    }
}

/// What one look at every byte says of a text: whether it may hold HTML, markdown, non-ASCII
/// or an ASCII control character that cleaning drops.
const MAY_HTML: u8 = 1;
const MAY_MARKDOWN: u8 = 2;
const NON_ASCII: u8 = 4;
const ASCII_CONTROL: u8 = 8;

static BYTE_FLAGS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'<' as usize] = MAY_HTML;
    // Every markdown signal `looks_like_markdown` knows needs one of these.
    let md = b"*_`]~#>";
    let mut i = 0;
    while i < md.len() {
        t[md[i] as usize] |= MAY_MARKDOWN;
        i += 1;
    }
    let mut b = 0x80;
    while b < 256 {
        t[b] = NON_ASCII;
        b += 1;
    }
    let mut c = 0;
    while c < 0x20 {
        if c != b'\t' as usize && c != b'\n' as usize && c != b'\r' as usize {
            t[c] = ASCII_CONTROL;
        }
        c += 1;
    }
    t[0x7f] = ASCII_CONTROL;
    t
};

/// One pass instead of three: most chat messages have none of the flags and skip every check.
fn byte_flags(s: &str) -> u8 {
    s.bytes().fold(0, |acc, b| acc | BYTE_FLAGS[b as usize])
}

/// The largest byte index of `s` at most `max` that falls on a character boundary: where to cut
/// a text to a byte budget without splitting a character (`str::floor_char_boundary`, which
/// this crate's minimum Rust does not have).
pub fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut at = max.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The whole text transformation, exposed for tests and benches. Hidden characters (controls
/// other than line breaks and tabs, invisible format characters) go first, so the markup look
/// sees the text as it reads: `"\0***"` is a thematic break, as `"***"` is. Texts without one
/// (nearly all) are not copied for it.
pub fn clean_text(input: &str) -> String {
    if has_hidden(input) {
        let visible: String = input
            .chars()
            .filter(|&c| !(is_hidden_control(c) || is_invisible(c)))
            .collect();
        return clean_once(&visible);
    }
    clean_once(input)
}

/// A control character that carries nothing: not a line break or a tab.
fn is_hidden_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// Whether `text` holds a character cleaning drops without a trace: a control character other
/// than a line break or tab, or an invisible format character.
fn has_hidden(text: &str) -> bool {
    let flags = byte_flags(text);
    flags & ASCII_CONTROL != 0
        || (flags & NON_ASCII != 0
            && text
                .chars()
                .any(|c| (c.is_control() && !c.is_ascii()) || is_invisible(c)))
}

fn clean_once(input: &str) -> String {
    let flags = byte_flags(input);
    let converted;
    let (text, non_ascii): (&str, bool) = if flags & MAY_HTML != 0 && looks_like_html(input) {
        converted = html_to_text(input);
        (&converted, !converted.is_ascii())
    } else if flags & MAY_MARKDOWN != 0 && looks_like_markdown(input) {
        converted = markdown_to_text(input);
        (&converted, !converted.is_ascii())
    } else {
        (input, flags & NON_ASCII != 0)
    };
    let normalized;
    // ASCII is always NFC; the quick check walks chars, so only other text takes it.
    let text: &str = if !non_ascii || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        text
    } else {
        normalized = text.nfc().collect::<String>();
        &normalized
    };
    filter_and_collapse(text)
}

/// Zero-width and invisible format characters that carry no meaning in memory. ZWJ and ZWNJ are
/// handled apart: they join emoji sequences and shape Indic and Persian words.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{200B}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' | '\u{180E}'
        | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        | '\u{2061}'..='\u{2064}')
}

/// Byte length of the character at `i` when it is copied as it is (printable ASCII, or any
/// other character that is not whitespace, control, invisible, ZWJ or ZWNJ), else 0.
#[inline(always)]
fn plain_len(text: &str, i: usize) -> usize {
    let b = text.as_bytes()[i];
    if b < 0x80 {
        return usize::from((0x21..=0x7e).contains(&b));
    }
    plain_len_non_ascii(text, i)
}

#[inline(never)]
fn plain_len_non_ascii(text: &str, i: usize) -> usize {
    match text[i..].chars().next() {
        Some(c)
            if !(c.is_whitespace()
                || c.is_control()
                || is_invisible(c)
                || c == '\u{200C}'
                || c == '\u{200D}') =>
        {
            c.len_utf8()
        }
        _ => 0,
    }
}

/// End of the run from `i` (on a plain character) of plain characters joined by single spaces:
/// the run comes out of cleaning exactly as it went in.
#[inline]
fn plain_run_end(text: &str, mut i: usize) -> usize {
    let bytes = text.as_bytes();
    let n = bytes.len();
    loop {
        while i < n && (0x21..=0x7e).contains(&bytes[i]) {
            i += 1;
        }
        if i >= n {
            return i;
        }
        let step = if bytes[i] == b' ' && i + 1 < n {
            // A single space joins the run only when a plain character follows it.
            match plain_len(text, i + 1) {
                0 => 0,
                l => 1 + l,
            }
        } else if bytes[i] >= 0x80 {
            plain_len_non_ascii(text, i)
        } else {
            0
        };
        if step == 0 {
            return i;
        }
        i += step;
    }
}

/// One pass: drops controls and invisibles, keeps ZWJ/ZWNJ only inside a word, folds runs of
/// spaces to one space and blank lines to one paragraph break, trims every line. A run of plain
/// characters joined by single spaces, most of any text, comes out unchanged, so it is copied
/// whole; everything else goes one character at a time.
fn filter_and_collapse(text: &str) -> String {
    let bytes = text.as_bytes();
    let n = bytes.len();
    let mut out = String::with_capacity(n);
    let mut pending_space = false;
    let mut pending_newlines = 0u8;
    let mut i = 0;
    while i < n {
        if plain_len(text, i) > 0 {
            let start = i;
            i = plain_run_end(text, i);
            separate(&mut out, &mut pending_space, &mut pending_newlines);
            out.push_str(&text[start..i]);
            continue;
        }
        if bytes[i] == b' ' {
            pending_space = true;
            i += 1;
            continue;
        }
        // `i` is on a char boundary: it only ever advances past whole characters.
        let Some(c) = text[i..].chars().next() else {
            break;
        };
        i += c.len_utf8();
        match c {
            '\n' => pending_newlines = pending_newlines.saturating_add(1),
            '\r' => {
                if bytes.get(i) != Some(&b'\n') {
                    pending_newlines = pending_newlines.saturating_add(1);
                }
            }
            '\u{2028}' | '\u{2029}' => pending_newlines = pending_newlines.saturating_add(1),
            c if c.is_whitespace() => pending_space = true,
            c if c.is_control() || is_invisible(c) => {}
            '\u{200C}' | '\u{200D}' => {
                let prev_ok = !out.is_empty() && !pending_space && pending_newlines == 0;
                let next_ok = joins_what_follows(&text[i..]);
                if prev_ok && next_ok {
                    out.push(c);
                }
            }
            c => {
                separate(&mut out, &mut pending_space, &mut pending_newlines);
                out.push(c);
            }
        }
    }
    out
}

/// Whether a ZWJ or ZWNJ before `rest` joins something: the next character cleaning keeps
/// (past dropped controls and invisibles, and further joiners) is neither whitespace nor the
/// end. Looking only one character on kept a joiner before a zero-width space and a line break,
/// which a second cleaning then dropped (found by the fuzzer).
fn joins_what_follows(rest: &str) -> bool {
    rest.chars()
        .find(|&n| {
            !((n.is_control() && !n.is_whitespace())
                || is_invisible(n)
                || n == '\u{200C}'
                || n == '\u{200D}')
        })
        .is_some_and(|n| !n.is_whitespace() && !n.is_control())
}

/// Before a visible character: the pending paragraph break, line break or space, then none.
#[inline]
fn separate(out: &mut String, pending_space: &mut bool, pending_newlines: &mut u8) {
    if !out.is_empty() {
        if *pending_newlines >= 2 {
            out.push_str("\n\n");
        } else if *pending_newlines == 1 {
            out.push('\n');
        } else if *pending_space {
            out.push(' ');
        }
    }
    *pending_space = false;
    *pending_newlines = 0;
}

// ---------------------------------------------------------------- HTML

/// HTML if a known tag appears; `Vec<String>` or `a <b` in a chat message stays text.
fn looks_like_html(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(off) = b[i..].iter().position(|&c| c == b'<') {
        let at = i + off;
        if let Some((name, _)) = tag_name(&s[at + 1..]) {
            if is_known_tag(&name) {
                return true;
            }
        }
        if s[at + 1..].starts_with("!--") {
            return true;
        }
        i = at + 1;
    }
    false
}

/// The tag name after `<` (lowercased), and whether it is a closing tag.
fn tag_name(after_lt: &str) -> Option<(String, bool)> {
    let (closing, rest) = match after_lt.strip_prefix('/') {
        Some(r) => (true, r),
        None => (false, after_lt),
    };
    let len = rest
        .bytes()
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    if len == 0 || !rest.as_bytes()[0].is_ascii_alphabetic() {
        return None;
    }
    let next = rest.as_bytes().get(len).copied();
    if !matches!(
        next,
        None | Some(b'>' | b' ' | b'/' | b'\t' | b'\n' | b'\r')
    ) {
        return None;
    }
    Some((rest[..len].to_ascii_lowercase(), closing))
}

const BLOCK_TAGS: &[&str] = &[
    "p",
    "div",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "table",
    "section",
    "article",
    "header",
    "footer",
    "hr",
    "dl",
    "figure",
    "main",
    "nav",
    "aside",
    "html",
    "body",
    "head",
    "title",
];
const LINE_TAGS: &[&str] = &["br", "li", "tr", "dt", "dd", "option"];
const INLINE_TAGS: &[&str] = &[
    "a", "b", "i", "u", "s", "em", "strong", "span", "code", "small", "sub", "sup", "mark", "img",
    "font", "abbr", "cite", "q", "del", "ins", "label", "td", "th", "tbody", "thead", "tfoot",
    "caption", "meta", "link", "input", "button", "select", "textarea", "form", "iframe", "video",
    "audio", "source", "svg", "time", "wbr", "center", "kbd", "var", "samp",
];
const SKIP_CONTENT_TAGS: &[&str] = &["script", "style", "noscript", "template"];

fn is_known_tag(name: &str) -> bool {
    BLOCK_TAGS.contains(&name)
        || LINE_TAGS.contains(&name)
        || INLINE_TAGS.contains(&name)
        || SKIP_CONTENT_TAGS.contains(&name)
}

fn html_to_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut text_start = 0;
    let mut i = 0;
    let b = s.as_bytes();
    let flush = |out: &mut String, from: usize, to: usize| {
        if from < to {
            out.push_str(&html_escape::decode_html_entities(&s[from..to]));
        }
    };
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        if s[i + 1..].starts_with("!--") {
            flush(&mut out, text_start, i);
            i = s[i..].find("-->").map(|e| i + e + 3).unwrap_or(b.len());
            text_start = i;
            continue;
        }
        if s[i + 1..].starts_with('!') || s[i + 1..].starts_with('?') {
            // doctype or processing instruction
            flush(&mut out, text_start, i);
            i = s[i..].find('>').map(|e| i + e + 1).unwrap_or(b.len());
            text_start = i;
            continue;
        }
        let Some((name, closing)) = tag_name(&s[i + 1..]) else {
            i += 1;
            continue;
        };
        if !is_known_tag(&name) {
            i += 1;
            continue;
        }
        let Some(end_rel) = s[i..].find('>') else {
            i += 1;
            continue;
        };
        flush(&mut out, text_start, i);
        let tag_end = i + end_rel + 1;
        if BLOCK_TAGS.contains(&name.as_str()) {
            out.push_str("\n\n");
        } else if LINE_TAGS.contains(&name.as_str()) {
            // Only the opening tag breaks: `</li><li>` is one line break, not a paragraph.
            if !closing {
                out.push('\n');
            }
        } else if matches!(name.as_str(), "td" | "th") {
            out.push(' ');
        } else if name == "img" {
            if let Some(alt) = attr(&s[i..tag_end], "alt") {
                out.push_str(&html_escape::decode_html_entities(alt));
            }
        }
        i = tag_end;
        if !closing && SKIP_CONTENT_TAGS.contains(&name.as_str()) {
            let close = format!("</{name}");
            i = find_ascii_ci(&s[i..], &close)
                .and_then(|c| s[i + c..].find('>').map(|e| i + c + e + 1))
                .unwrap_or(b.len());
        }
        text_start = i;
    }
    flush(&mut out, text_start, b.len());
    out
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = find_ascii_ci(tag, &format!("{name}="))?;
    let rest = &tag[at + name.len() + 1..];
    let quote = rest.chars().next()?;
    if quote == '"' || quote == '\'' {
        let end = rest[1..].find(quote)?;
        Some(&rest[1..1 + end])
    } else {
        None
    }
}

fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.len() > h.len() {
        return None;
    }
    (0..=h.len() - n.len()).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

// ---------------------------------------------------------------- Markdown

/// Markdown only on strong signals, so ordinary chat (`:-)`, `2*3`, `snake_case`) is untouched.
/// Called only when `byte_flags` saw one of the bytes every signal below needs.
fn looks_like_markdown(s: &str) -> bool {
    if s.contains("**")
        || s.contains("](")
        || s.contains("```")
        || s.contains("~~")
        || s.contains("__")
    {
        return true;
    }
    if s.matches('`').count() >= 2 {
        return true;
    }
    s.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("# ") || l.starts_with("## ") || l.starts_with("### ") || l.starts_with("> ")
    })
}

fn markdown_to_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut link: Option<(String, usize)> = None;
    let opts = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES | Options::ENABLE_TASKLISTS;
    for ev in Parser::new_ext(s, opts) {
        match ev {
            Event::Text(t) | Event::Code(t) => out.push_str(&t),
            Event::Html(h) | Event::InlineHtml(h) => out.push_str(&html_to_text(&h)),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => out.push_str("\n\n"),
            Event::TaskListMarker(done) => out.push_str(if done { "[x] " } else { "[ ] " }),
            Event::Start(Tag::Link { dest_url, .. }) => {
                link = Some((dest_url.to_string(), out.len()))
            }
            Event::End(TagEnd::Link) => {
                if let Some((url, start)) = link.take() {
                    // Keep the address too: "the link Bob sent" is a question memory must answer.
                    if !url.is_empty() && !out[start..].contains(url.as_str()) {
                        out.push_str(" (");
                        out.push_str(&url);
                        out.push(')');
                    }
                }
            }
            Event::Start(Tag::Item) => out.push_str("- "),
            Event::End(TagEnd::Item)
            | Event::End(TagEnd::TableRow)
            | Event::End(TagEnd::TableHead) => out.push('\n'),
            Event::End(TagEnd::TableCell) => out.push(' '),
            Event::End(
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::BlockQuote(_)
                | TagEnd::CodeBlock
                | TagEnd::List(_)
                | TagEnd::Table,
            ) => out.push_str("\n\n"),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------- dedup

/// Drops exact duplicates per user and conversation by content hash. Keyed by a 64-bit fold of
/// (user, conversation, hash) so a few million documents cost tens of MB, not hundreds.
#[derive(Debug, Default)]
pub struct Deduper {
    seen: std::collections::HashSet<u64>,
}

impl Deduper {
    /// True the first time this content is seen for the user and conversation.
    pub fn first_time(&mut self, doc: &CleanDocument) -> bool {
        let mut key = xxhash_rust::xxh3::Xxh3::new();
        key.update(&doc.user_id.to_le_bytes());
        key.update(doc.conversation_id.as_deref().unwrap_or("").as_bytes());
        key.update(&[0xff]);
        key.update(&doc.content_hash.to_le_bytes());
        self.seen.insert(key.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `cleaner` fuzz target: a NUL before a thematic break hid it from the markdown
    /// look, so a second cleaning removed what the first kept. Hidden characters now go before
    /// the look. (Escaped markup is kept as text and may read as markup if cleaned again:
    /// `"\\```"` gives `"```"`; cleaning runs once per document, so that is not a defect.)
    #[test]
    fn cleaning_is_idempotent_when_hidden_characters_hide_markup() {
        for input in [
            "\0***",
            "\u{200B}***",
            "x\n\u{7}---\ny",
            "\u{1}# Title\n\0text",
            // A joiner before a dropped invisible or control, then a break (fuzz finding).
            "👨\u{200D}\u{200B}\n\nx",
            "a\u{200D}\u{200D}\nb",
            "a\u{200C}\u{7} b",
            "a\u{200D}\u{FEFF}",
        ] {
            let once = clean_text(input);
            assert_eq!(clean_text(&once), once, "{input:?}");
        }
        assert_eq!(clean_text("\0***"), "");
    }
    use proptest::prelude::*;

    /// The rule one character at a time, as it was before runs were copied whole: the fast
    /// path must give exactly this.
    fn filter_and_collapse_by_char(text: &str) -> String {
        let mut out = String::new();
        let (mut space, mut newlines) = (false, 0u8);
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            let next = chars.peek().map(|(_, n)| *n);
            match c {
                ' ' => space = true,
                '\n' | '\u{2028}' | '\u{2029}' => newlines = newlines.saturating_add(1),
                '\r' if next != Some('\n') => newlines = newlines.saturating_add(1),
                '\r' => {}
                c if c.is_whitespace() => space = true,
                c if c.is_control() || is_invisible(c) => {}
                '\u{200C}' | '\u{200D}' => {
                    let prev_ok = !out.is_empty() && !space && newlines == 0;
                    let next_ok = joins_what_follows(&text[at + c.len_utf8()..]);
                    if prev_ok && next_ok {
                        out.push(c);
                    }
                }
                c => {
                    separate(&mut out, &mut space, &mut newlines);
                    out.push(c);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn runs_copied_whole_equal_the_char_by_char_rule(t in "([a-z]{1,4}|[ ]{1,3}|[\\t\\n\\r]|[.,!?]|\\p{L}{1,2}|\\p{Zs}|[\u{2028}\u{0085}\u{00A0}]|[\u{200B}\u{200C}\u{200D}\u{FEFF}\u{00AD}]|\\p{Cc}|[😀👍🏽]|\\PC){0,24}") {
            prop_assert_eq!(filter_and_collapse(&t), filter_and_collapse_by_char(&t));
        }
    }

    #[test]
    fn collapses_whitespace_and_keeps_paragraphs() {
        assert_eq!(clean_text("  a \t b  \r\n\r\n\n  c\n d  "), "a b\n\nc\nd");
        assert_eq!(clean_text(" \u{00A0}\u{3000} "), "");
    }

    #[test]
    fn removes_controls_and_zero_width_but_keeps_emoji_and_scripts() {
        assert_eq!(
            clean_text("he\u{0000}llo\u{200B} wo\u{FEFF}rld\u{0007}"),
            "hello world"
        );
        let family = "👨\u{200D}👩\u{200D}👧 ok";
        assert_eq!(clean_text(family), family);
        let persian = "می\u{200C}خواهم";
        assert_eq!(clean_text(persian), persian);
        assert_eq!(clean_text("\u{200D} x \u{200C}"), "x");
        for s in [
            "日本語のテキスト",
            "Привет мир",
            "مرحبا بالعالم",
            "नमस्ते दुनिया",
            "🇫🇷🏳️‍🌈 👍🏽",
        ] {
            assert_eq!(clean_text(s), s);
        }
    }

    #[test]
    fn normalizes_to_nfc() {
        assert_eq!(clean_text("Cafe\u{0301}"), "Café");
    }

    #[test]
    fn html_to_text_drops_tags_scripts_and_decodes_entities() {
        let html = "<div><p>Hello &amp; <b>welcome</b></p><script>var x=1;</script><ul><li>one</li><li>two</li></ul><img alt=\"cat\" src=x></div>";
        assert_eq!(clean_text(html), "Hello & welcome\n\none\ntwo\n\ncat");
        assert_eq!(
            clean_text("use Vec<String> and a < b"),
            "use Vec<String> and a < b"
        );
        assert_eq!(clean_text("I <3 you &amp; co"), "I <3 you &amp; co");
        assert_eq!(clean_text("x<!-- hidden -->y"), "xy");
    }

    #[test]
    fn markdown_to_text_keeps_words_and_links() {
        assert_eq!(
            clean_text("# Title\n\nSome **bold** and `code`, see [docs](https://x.io/a)."),
            "Title\n\nSome bold and code, see docs (https://x.io/a)."
        );
        assert_eq!(clean_text("snake_case stays 2*3"), "snake_case stays 2*3");
    }

    #[test]
    fn dedup_is_per_user_and_conversation() {
        let c = Cleaner::new();
        let mk = |u, conv: &str, t: &str| {
            c.clean(RawDocument {
                user_id: u,
                kind: crate::DocKind::Message,
                source_id: "s".into(),
                text: t.into(),
                created_at: chrono::Utc::now(),
                conversation_id: Some(conv.into()),
                title: None,
                author: None,
                meta: None,
            })
            .unwrap()
        };
        let mut d = Deduper::default();
        assert!(d.first_time(&mk(1, "a", "ok")));
        assert!(!d.first_time(&mk(1, "a", " ok ")));
        assert!(d.first_time(&mk(1, "b", "ok")));
        assert!(d.first_time(&mk(2, "a", "ok")));
    }
}
