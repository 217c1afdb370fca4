//! The chunker on any cleaned text, with its invariants: every chunk is the exact byte slice of
//! the document it names, on character boundaries, within the token budget, in order, and the
//! chunks cover the document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_pipeline::chunk::Split;
use orbit_pipeline::{ChunkSettings, Chunker, Cleaner, DocKind, RawDocument};

fuzz_target!(|data: &[u8]| {
    let (head, body) = data.split_at(data.len().min(2));
    let max = 16 + usize::from(*head.first().unwrap_or(&0)) % 200;
    let overlap = usize::from(*head.get(1).unwrap_or(&0)) % (max / 2);
    let Ok(chunker) = Chunker::new(ChunkSettings {
        max_tokens: max,
        overlap_tokens: overlap,
        ..Default::default()
    }) else {
        return;
    };
    let raw = RawDocument {
        user_id: 7,
        kind: DocKind::Note,
        source_id: "n".into(),
        text: String::from_utf8_lossy(body).into_owned(),
        created_at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        conversation_id: None,
        title: None,
        author: None,
        meta: None,
    };
    let Some(doc) = Cleaner::new().clean(raw) else {
        return;
    };
    let text = doc.text.clone();
    let Split::Chunks(chunks) = chunker.split(doc) else {
        panic!("a note is never packable");
    };
    assert!(!chunks.is_empty(), "a non-empty document gave no chunk");
    let mut last_start = 0;
    for (i, c) in chunks.iter().enumerate() {
        assert!(c.byte_start < c.byte_end && c.byte_end <= text.len(), "{i}: {}..{}", c.byte_start, c.byte_end);
        assert!(text.is_char_boundary(c.byte_start) && text.is_char_boundary(c.byte_end));
        assert_eq!(&text[c.byte_start..c.byte_end], c.text, "chunk {i} is not its slice");
        assert_eq!(c.chunk_index as usize, i);
        assert!(c.token_count <= max, "chunk {i} has {} tokens, over {max}", c.token_count);
        assert!(c.byte_start >= last_start, "chunks out of order");
        last_start = c.byte_start;
    }
    assert_eq!(chunks[0].byte_start, 0, "the start is not covered");
    assert_eq!(chunks.last().unwrap().byte_end, text.len(), "the end is not covered");
    for w in chunks.windows(2) {
        assert!(w[1].byte_start <= w[0].byte_end, "a gap between chunks");
    }
});
