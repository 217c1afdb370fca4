//! Helpers both test suites share (the pipeline's in `pipeline/tests/e2e`, the worker's in
//! `tests/integration`, which includes this file by path): fixture paths, where the Makefile
//! installs things, and reading one HTTP request as the API double does.
#![allow(dead_code)]

use std::path::PathBuf;

use tokio::io::AsyncReadExt;

/// The workspace root: the nearest folder up from this crate that holds `fixtures/`.
pub fn repo() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("fixtures").is_dir())
        .map(PathBuf::from)
        .unwrap_or(here)
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("fixtures").join(name)
}

/// `$VAR` if set, else `~/.cache/orbit-worker/<sub>`: where the Makefile installs things.
fn cache_path(var: &str, sub: &str) -> PathBuf {
    std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/orbit-worker")
            .join(sub)
    })
}

pub fn model_dir() -> PathBuf {
    cache_path("ORBIT_MODEL_DIR", "models/all-MiniLM-L6-v2")
}

pub fn python() -> PathBuf {
    let p = cache_path("ORBIT_TEST_PYTHON", "venv/bin/python");
    assert!(
        p.exists(),
        "test Python {} missing: run the suite with `make test`",
        p.display()
    );
    p
}

/// Where `make tiktoken-cache` puts tiktoken's rank files, so Python tiktoken works offline.
pub fn tiktoken_cache_dir() -> PathBuf {
    cache_path("TIKTOKEN_CACHE_DIR", "tiktoken")
}

/// Fixture lines as JSON values, for tests that edit the corpus.
pub fn sample_lines() -> Vec<serde_json::Value> {
    std::fs::read_to_string(fixture("sample.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn to_lines(v: &[serde_json::Value]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The `input` strings of an `/v1/embeddings` request body, as the API doubles read them.
pub fn embedding_inputs(body: &serde_json::Value) -> Vec<String> {
    body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// One HTTP/1.1 request: (path, authorization, raw body, content type).
pub async fn read_raw(
    sock: &mut tokio::net::TcpStream,
) -> Option<(String, Option<String>, Vec<u8>, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split_whitespace().nth(1)?.to_string();
    let header = |name: &str| {
        head.lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .map(|l| l[name.len() + 1..].trim().to_string())
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    Some((
        path,
        header("authorization"),
        body,
        header("content-type").unwrap_or_default(),
    ))
}
