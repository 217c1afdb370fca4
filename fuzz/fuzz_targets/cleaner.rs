//! The cleaner and the lexical tokenizer on any text: cleaning never panics and, on a result
//! with no markup character left, is idempotent (whitespace, controls, invisible characters and
//! normalisation are settled in one pass; escaped markup such as `\```` is kept as text that
//! may read as markup again, and cleaning runs once per document); no query term is empty or holds a quote, a space or a
//! control character: the store's FTS5 query quotes each term and relies on that.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_pipeline::clean::clean_text;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let once = clean_text(&text);
    if !once.contains(['*', '_', '`', ']', '~', '#', '>', '<', '&']) {
        assert_eq!(clean_text(&once), once, "cleaning is not idempotent");
    }
    assert_eq!(once.trim(), once, "cleaned text has outer whitespace");
    for t in orbit_pipeline::lexical::query_terms(&text) {
        assert!(
            !t.is_empty() && !t.chars().any(|c| c == '"' || c.is_whitespace() || c.is_control()),
            "term {t:?}"
        );
    }
});
