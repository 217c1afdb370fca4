//! Token counts equal to OpenAI's Python tiktoken on every document of the fixture corpus, raw
//! and cleaned (the chunker counts cleaned text).

use std::path::Path;

use orbit_pipeline::tokenize::Encoding;

use crate::helpers::{fixture, python, repo, sample_lines, tiktoken_cache_dir};

fn tiktoken_counts(path: &Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(python())
        .arg(repo().join("scripts/tiktoken_counts.py"))
        .arg(path)
        .env("TIKTOKEN_CACHE_DIR", tiktoken_cache_dir())
        .output()
        .expect("running tiktoken_counts.py");
    assert!(
        out.status.success(),
        "tiktoken failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_same(texts: &[String], expected: &[serde_json::Value]) -> u64 {
    assert_eq!(expected.len(), texts.len());
    let mut total = 0;
    for (text, want) in texts.iter().zip(expected) {
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            let got = enc.count(text) as u64;
            assert_eq!(
                got,
                want[enc.as_str()].as_u64().unwrap(),
                "{} on {text:?}",
                enc.as_str()
            );
            total += got;
        }
    }
    total
}

#[test]
fn counts_match_python_tiktoken() {
    let docs = sample_lines();
    let raw: Vec<String> = docs
        .iter()
        .map(|d| d["text"].as_str().unwrap().to_string())
        .collect();
    let total = assert_same(&raw, &tiktoken_counts(&fixture("sample.jsonl")));
    assert!(
        total > 100_000,
        "fixture too small to mean anything: {total} tokens"
    );

    let cleaned: Vec<String> = raw
        .iter()
        .map(|t| orbit_pipeline::clean::clean_text(t))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cleaned.jsonl");
    let body: String = cleaned
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    std::fs::write(&p, body).unwrap();
    assert_same(&cleaned, &tiktoken_counts(&p));
}
