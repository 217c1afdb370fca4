//! The OpenAI response decoders on any body: embeddings (one vector per input, each of the
//! dimension, every index once), chat completions, transcriptions and the analysis JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_pipeline::embed::decode_embeddings;

fuzz_target!(|data: &[u8]| {
    let (head, body) = data.split_at(data.len().min(1));
    let inputs = usize::from(*head.first().unwrap_or(&1) % 8);
    let dim = 1 + usize::from(*head.first().unwrap_or(&0) >> 5);
    if let Ok(v) = decode_embeddings(body, inputs, dim) {
        assert_eq!(v.len(), inputs);
        assert!(v.iter().all(|x| x.len() == dim));
    }
    let text = String::from_utf8_lossy(body);
    let _ = orbit_worker::chat::parse(&text);
    let _ = orbit_worker::tasks::transcribe_audio::parse_verbose(&text);
    let _ = orbit_worker::tasks::analyse_audio::parse_analysis(&text);
});
