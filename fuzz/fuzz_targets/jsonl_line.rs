//! The JSONL document parser on any line; what parses goes through the cleaner.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_pipeline::source::parse_line;
use orbit_pipeline::Cleaner;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = parse_line(data) {
        let user = doc.user_id;
        if let Some(clean) = Cleaner::new().clean(doc) {
            assert_eq!(clean.user_id, user);
            assert!(!clean.text.is_empty());
        }
    }
});
