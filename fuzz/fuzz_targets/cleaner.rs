//! The cleaner and the lexical tokenizer on any text: cleaning never panics and is idempotent
//! (what it gives is already clean); no query term is empty or holds a quote, a space or a
//! control character: the store's FTS5 query quotes each term and relies on that.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_pipeline::clean::clean_text;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let once = clean_text(&text);
    let twice = clean_text(&once);
    assert_eq!(once, twice, "cleaning is not idempotent");
    assert_eq!(once.trim(), once, "cleaned text has outer whitespace");
    for t in orbit_pipeline::lexical::query_terms(&text) {
        assert!(
            !t.is_empty() && !t.chars().any(|c| c == '"' || c.is_whitespace() || c.is_control()),
            "term {t:?}"
        );
    }
});
