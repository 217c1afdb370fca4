//! The binary as a user runs it: clear one-line errors, JSON reports, search output.

use assert_cmd::Command;

use crate::helpers::fixture;

fn cmd(data: &std::path::Path) -> Command {
    let mut c = Command::cargo_bin("orbit-worker").unwrap();
    c.env("ORBIT_DATA_DIR", data)
        .env("ORBIT_EMBEDDER", "hashing")
        .env_remove("OPENAI_API_KEY");
    c
}

fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    err
}

#[test]
fn a_bad_source_path_is_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    let out = cmd(d.path())
        .args(["build", "--user", "1", "--source", "/no/such/file.jsonl"])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/file.jsonl"), "{err}");
}

#[test]
fn bad_flags_and_settings_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let out = cmd(d.path())
        .args(["build", "--user", "abc"])
        .output()
        .unwrap();
    one_line_error(&out);
    let out = cmd(d.path())
        .args(["build", "--user", "1", "--all-users"])
        .output()
        .unwrap();
    one_line_error(&out);
    let out = cmd(d.path())
        .env("ORBIT_CHUNK_TOKENS", "ten")
        .args(["build", "--user", "1", "--source"])
        .arg(fixture("sample.jsonl"))
        .output()
        .unwrap();
    assert!(one_line_error(&out).contains("ORBIT_CHUNK_TOKENS"));
    let out = cmd(d.path())
        .env("ORBIT_EMBEDDER", "openai")
        .args(["search", "--user", "1", "x"])
        .output()
        .unwrap();
    assert!(one_line_error(&out).contains("OPENAI_API_KEY"));
}

#[test]
fn searching_an_empty_store_says_so_and_records_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = cmd(d.path())
        .args(["search", "--user", "1", "anything"])
        .output()
        .unwrap();
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no memory built yet"));
    // A later build with another model is still accepted.
    let out = cmd(d.path())
        .env("ORBIT_HASHING_DIM", "96")
        .args(["build", "--user", "1", "--source"])
        .arg(fixture("sample.jsonl"))
        .output()
        .unwrap();
    succeeded(&out);
}

#[test]
fn build_json_then_search() {
    let d = tempfile::tempdir().unwrap();
    let out = cmd(d.path())
        .args(["build", "--all-users", "--json", "--source"])
        .arg(fixture("sample.jsonl"))
        .output()
        .unwrap();
    succeeded(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["chunks"].as_u64().unwrap() > 100);
    assert_eq!(report["vectors_upserted"], report["chunks"]);
    // extract, clean, chunk, reuse, embed, store
    assert_eq!(report["stages"].as_array().unwrap().len(), 6);

    let out = cmd(d.path())
        .args([
            "search",
            "--user",
            "2",
            "--top-k",
            "3",
            "--json",
            "band practice Ostkreuz",
        ])
        .output()
        .unwrap();
    succeeded(&out);
    let hits: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0]["source_ids"][0], "fact-2-band");
    assert!(hits.iter().all(|h| h["user_id"] == 2));

    // Another model on the same store is refused with the re-embed hint, not silently mixed.
    let out = cmd(d.path())
        .env("ORBIT_HASHING_DIM", "128")
        .args(["search", "--user", "2", "band"])
        .output()
        .unwrap();
    assert!(one_line_error(&out).contains("re-embed"));

    let out = cmd(d.path())
        .args(["search", "--user", "2", "band practice"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("1. "), "{text}");
    assert!(text.contains("[message] fact-2-band"), "{text}");
}
