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

/// `eval` on a case small enough to score by hand: lexical mode, so no model decides the ranks.
#[test]
fn eval_scores_a_hand_computed_case() {
    let d = tempfile::tempdir().unwrap();
    let notes = [
        ("n1", "the cabin wifi password is otter42"),
        ("n2", "the hotel in Lisbon is Casa Azul"),
        ("n3", "flight TP1352 boards at gate 12"),
        ("n4", "pasta recipe with basil"),
    ];
    let src = d.path().join("notes.jsonl");
    let lines: Vec<String> = notes
        .iter()
        .map(|(id, t)| {
            serde_json::json!({"user_id": 1, "kind": "note", "source_id": id, "text": t,
                "created_at": "2026-03-01T10:00:00Z"})
            .to_string()
        })
        .collect();
    std::fs::write(&src, lines.join("\n")).unwrap();
    // Ranks by hand: q1-q3 first place; q4 matches n4 on two words and its evidence n3 on one,
    // so second place; q5 matches nothing.
    let questions = [
        ("what is the cabin wifi password?", "n1", "entity"),
        ("which hotel in Lisbon?", "n2", "entity"),
        ("gate for flight TP1352", "n3", "code"),
        ("recipe with basil and flight", "n3", "code"),
        ("zebra unicorn", "n2", "miss"),
    ];
    let qfile = d.path().join("q.jsonl");
    let lines: Vec<String> = questions
        .iter()
        .map(|(q, e, k)| {
            serde_json::json!({"user_id": 1, "question": q, "evidence": [e], "kind": k}).to_string()
        })
        .collect();
    std::fs::write(&qfile, lines.join("\n")).unwrap();
    let data = d.path().join("data");
    succeeded(
        &cmd(&data)
            .args(["build", "--user", "1", "--source"])
            .arg(&src)
            .output()
            .unwrap(),
    );
    let out = cmd(&data)
        .args([
            "eval",
            "--mode",
            "lexical,hybrid",
            "--top-k",
            "1,3",
            "--json",
            "--questions",
        ])
        .arg(&qfile)
        .output()
        .unwrap();
    succeeded(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lex = &r["modes"][0];
    assert_eq!(lex["mode"], "lexical");
    let close = |v: &serde_json::Value, want: f64| {
        assert!(
            (v.as_f64().unwrap() - want).abs() < 1e-9,
            "{v} != {want}: {lex}"
        )
    };
    close(&lex["all"]["recall"]["1"], 3.0 / 5.0);
    close(&lex["all"]["recall"]["3"], 4.0 / 5.0);
    close(&lex["all"]["mrr"], (1.0 + 1.0 + 1.0 + 0.5 + 0.0) / 5.0);
    close(&lex["all"]["ndcg"]["3"], (3.0 + 1.0 / 3f64.log2()) / 5.0);
    close(&lex["by_kind"]["code"]["mrr"], 0.75);
    close(&lex["by_kind"]["miss"]["recall"]["3"], 0.0);
    assert_eq!(lex["by_kind"]["entity"]["questions"], 2);
    assert_eq!(r["modes"][1]["mode"], "hybrid");
    assert_eq!(r["modes"][1]["all"]["questions"], 5);

    // A question file that is not one is a clear error naming the line.
    std::fs::write(&qfile, "{\"user_id\": 1}\n").unwrap();
    let out = cmd(&data)
        .args(["eval", "--questions"])
        .arg(&qfile)
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("q.jsonl:1"), "{err}");
}

/// Issue 13, limits: a question past ORBIT_MAX_QUESTION_CHARS, a build past
/// ORBIT_MAX_DOCUMENTS_PER_BUILD, and a limit set out of range are each one clear line naming
/// the setting; a document past ORBIT_MAX_DOCUMENT_BYTES is cut and counted in the report.
#[test]
fn input_limits_are_settings_with_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = cmd(d.path())
        .env("ORBIT_MAX_QUESTION_CHARS", "20")
        .args([
            "ask",
            "--user",
            "1",
            "what is the wifi password of the office in Lisbon?",
        ])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("ORBIT_MAX_QUESTION_CHARS"), "{err}");
    let out = cmd(d.path())
        .env("ORBIT_MAX_DOCUMENTS_PER_BUILD", "10")
        .args(["build", "--user", "1", "--source"])
        .arg(fixture("sample.jsonl"))
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("ORBIT_MAX_DOCUMENTS_PER_BUILD"), "{err}");
    let out = cmd(d.path())
        .env("ORBIT_MAX_MESSAGE_BYTES", "12")
        .args(["build", "--user", "1", "--source"])
        .arg(fixture("sample.jsonl"))
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("ORBIT_MAX_MESSAGE_BYTES"), "{err}");
    let out = cmd(d.path())
        .env("ORBIT_MAX_DOCUMENT_BYTES", "1024")
        .args(["build", "--user", "1", "--json", "--source"])
        .arg(fixture("sample.jsonl"))
        .output()
        .unwrap();
    succeeded(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["documents_truncated"].as_u64().unwrap() > 0, "{r}");
}

/// Batch settings past what the OpenAI API takes (2048 inputs, 300 k tokens a request) are cut
/// to its limits: the double, which refuses what the API refuses, sees no request over them.
#[test]
fn configured_batches_past_the_apis_limits_are_split_before_they_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    let notes: Vec<String> = (0..3000)
        .map(|i| {
            serde_json::json!({"user_id": 9, "kind": "note", "source_id": format!("n{i}"),
                "text": format!("Note number {i} about the garden plan."), "created_at": "2026-01-05T08:00:00Z"})
            .to_string()
        })
        .collect();
    let src = dir.path().join("notes.jsonl");
    std::fs::write(&src, notes.join("\n")).unwrap();
    let api = crate::openai_double::OpenAiDouble::start();
    let mut c = cmd(&dir.path().join("data"));
    for (k, v) in api.embedder_env() {
        c.env(k, v);
    }
    let out = c
        .env("ORBIT_EMBED_BATCH_INPUTS", "5000")
        .env("ORBIT_EMBED_BATCH_TOKENS", "1000000")
        .env("ORBIT_EMBED_CACHE_MB", "0")
        .args(["build", "--user", "9", "--source", src.to_str().unwrap()])
        .output()
        .unwrap();
    succeeded(&out);
    let counts = api.counts();
    assert_eq!(counts.oversized, 0, "a request over the API's limits");
    assert_eq!(counts.inputs, 3000);
    let biggest = api
        .seen()
        .iter()
        .map(|s| s.body["input"].as_array().map_or(0, Vec::len))
        .max()
        .unwrap();
    assert_eq!(biggest, crate::openai_double::MAX_INPUTS);
}

/// `build --json | head -c0`: the reader is gone before the report is written. The build still
/// ends on its own terms (exit 0, no panic), and what it built is there.
#[test]
fn a_closed_stdout_stops_the_output_not_the_build() {
    use std::process::Stdio;
    let d = tempfile::tempdir().unwrap();
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("orbit-worker"));
    c.env("ORBIT_DATA_DIR", d.path())
        .env("ORBIT_EMBEDDER", "hashing")
        .env_remove("OPENAI_API_KEY")
        .args(["build", "--all-users", "--json", "--source"])
        .arg(fixture("sample.jsonl"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
    let out = cmd(d.path())
        .args(["search", "--user", "2", "--json", "band practice Ostkreuz"])
        .output()
        .unwrap();
    succeeded(&out);
    let hits: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hits[0]["source_ids"][0], "fact-2-band");
}
