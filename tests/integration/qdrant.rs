//! The Qdrant server store through the worker: `orbit-worker build`, `search` and `ask`, and the
//! Celery tasks, with QDRANT_URL set, against a real Qdrant 1.18 server; the points checked over
//! Qdrant's own REST API, not through the store.

use std::collections::HashSet;
use std::process::Command;

use serde_json::{json, Value};

use crate::app_harness::*;
use crate::celery_harness::*;
use crate::qdrant_server::{unique_alias, QdrantServer};

/// Qdrant's REST answer to `POST path` with `body` (its own view, not the store's).
fn rest(server: &QdrantServer, path: &str, body: Value) -> Value {
    let url = format!("{}{path}", server.rest());
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(&url)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{url}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn rest_get(server: &QdrantServer, path: &str) -> Value {
    let out = Command::new("curl")
        .args(["-s", &format!("{}{path}", server.rest())])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The user ids of every point the alias's collection holds, as the server lists them.
fn users_in(server: &QdrantServer, alias: &str) -> Vec<String> {
    let r = rest(
        server,
        &format!("/collections/{alias}/points/scroll"),
        json!({"limit": 10000, "with_payload": ["user_id"]}),
    );
    r["result"]["points"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .filter_map(|p| p["payload"]["user_id"].as_str().map(str::to_string))
        .collect()
}

/// The source ids of `user`'s points, as the server lists them.
fn sources_of(server: &QdrantServer, alias: &str, user: i64) -> HashSet<String> {
    let r = rest(
        server,
        &format!("/collections/{alias}/points/scroll"),
        json!({"limit": 10000, "with_payload": ["source_ids"],
               "filter": {"must": [{"key": "user_id", "match": {"value": user.to_string()}}]}}),
    );
    r["result"]["points"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .flat_map(|p| {
            p["payload"]["source_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_cli_builds_searches_and_asks_through_a_qdrant_server() {
    let server = QdrantServer::shared();
    let alias = unique_alias("cli");
    let db = PgDb::seeded(&crate::helpers::fixture("sample.jsonl"));
    let empty = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("QDRANT_URL", url.as_str()),
        ("ORBIT_QDRANT_ALIAS", alias.as_str()),
        // Nothing may land in the embedded store.
        ("ORBIT_DATA_DIR", empty.path().to_str().unwrap()),
    ];
    let built: Value =
        serde_json::from_str(&db.cli_env(&["build", "--user", "1", "--json"], &env)).unwrap();
    let chunks = built["chunks"].as_u64().unwrap();
    assert!(chunks > 0, "{built}");
    assert_eq!(built["chunks_embedded"].as_u64(), Some(chunks), "{built}");
    // The server holds them, under the alias, all user 1's.
    let users = users_in(server, &alias);
    assert_eq!(users.len() as u64, chunks);
    assert!(users.iter().all(|u| u == "1"), "{users:?}");
    assert!(
        std::fs::read_dir(empty.path()).unwrap().next().is_none(),
        "the embedded store was written"
    );
    // The tenant index is on user_id, as Qdrant's multitenancy pattern has it.
    let info = rest_get(server, &format!("/collections/{alias}"));
    let schema = &info["result"]["payload_schema"]["user_id"];
    assert_eq!(schema["data_type"], "keyword", "{info}");
    assert_eq!(schema["params"]["is_tenant"], true, "{info}");

    // A rebuild reuses every stored vector and embeds nothing.
    let again: Value =
        serde_json::from_str(&db.cli_env(&["build", "--user", "1", "--json"], &env)).unwrap();
    assert_eq!(again["chunks_embedded"].as_u64(), Some(0), "{again}");
    assert_eq!(again["chunks_reused"].as_u64(), Some(chunks), "{again}");

    for mode in ["dense", "lexical", "hybrid"] {
        let hits: Value = serde_json::from_str(&db.cli_env(
            &[
                "search",
                "--user",
                "1",
                "--mode",
                mode,
                "--json",
                "wifi password Lisbon",
            ],
            &env,
        ))
        .unwrap();
        let hits = hits.as_array().unwrap();
        assert!(!hits.is_empty(), "{mode}");
        assert!(hits.iter().all(|h| h["user_id"] == 1), "{mode}: {hits:?}");
        if mode != "dense" {
            assert!(
                hits[0]["text"].as_str().unwrap().contains("wifi"),
                "{mode}: {}",
                hits[0]
            );
        }
    }
    let answer: Value = serde_json::from_str(&db.cli_env(
        &[
            "ask",
            "--user",
            "1",
            "--json",
            "What is the wifi password in Lisbon?",
        ],
        &env,
    ))
    .unwrap();
    assert_eq!(answer["mode"], "extractive", "{answer}");
    assert!(
        !answer["citations"].as_array().unwrap().is_empty(),
        "{answer}"
    );
    // Another user's memory is empty here: nothing of user 1 comes back.
    let none: Value = serde_json::from_str(&db.cli_env(
        &["search", "--user", "2", "--json", "wifi password Lisbon"],
        &env,
    ))
    .unwrap();
    assert!(
        none.as_array().unwrap().iter().all(|h| h["user_id"] == 2),
        "{none}"
    );
}

#[test]
fn the_worker_builds_and_answers_through_the_queue_on_a_qdrant_server() {
    let server = QdrantServer::shared();
    let alias = unique_alias("queue");
    let db = PgDb::seeded(&crate::helpers::fixture("sample.jsonl"));
    let redis = RedisServer::start(false);
    let q = unique_queue("qdrant");
    let empty = tempfile::tempdir().unwrap();
    let url = server.url();
    let _w = WorkerProc::start_env(
        &redis,
        &["-Q", &q],
        &[
            ("DATABASE_URL", db.url().as_str()),
            ("QDRANT_URL", url.as_str()),
            ("ORBIT_QDRANT_ALIAS", alias.as_str()),
            ("ORBIT_DATA_DIR", empty.path().to_str().unwrap()),
        ],
    );
    for user in [1, 2] {
        let r = call(
            &redis,
            &q,
            "orbitpilot.build_memory",
            json!([user]),
            json!({}),
            json!({}),
        );
        assert_eq!(r["state"], "SUCCESS", "{r}");
        assert_eq!(r["result"]["status"], "completed", "{r}");
    }
    let users: HashSet<String> = users_in(server, &alias).into_iter().collect();
    assert_eq!(users, HashSet::from(["1".to_string(), "2".to_string()]));
    let r = call(
        &redis,
        &q,
        "orbitpilot.generate_answer",
        json!([1, "What is the wifi password in Lisbon?"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let cites = r["result"]["citations"].as_array().unwrap();
    assert!(!cites.is_empty(), "{r}");
    // Every cited source is among user 1's points as the server lists them, none among user 2's.
    let (mine, theirs) = (sources_of(server, &alias, 1), sources_of(server, &alias, 2));
    assert!(!mine.is_empty() && !theirs.is_empty());
    for c in cites {
        for s in c["source_ids"].as_array().unwrap() {
            let s = s.as_str().unwrap();
            assert!(
                mine.contains(s) && !theirs.contains(s),
                "{s} is not user 1's"
            );
        }
    }
    assert!(
        std::fs::read_dir(empty.path()).unwrap().next().is_none(),
        "the embedded store was written"
    );
}

#[test]
fn a_refused_qdrant_api_key_fails_at_once_and_never_shows_the_key() {
    let server = QdrantServer::start_with(&[("QDRANT__SERVICE__API_KEY", "right-key-8d1f")]);
    let db = PgDb::seeded(&crate::helpers::fixture("sample.jsonl"));
    let url = server.url();
    let alias = unique_alias("key");
    let run = |key: &str| {
        Command::new(worker_bin())
            .args(["build", "--user", "1", "--json"])
            .env("DATABASE_URL", db.url())
            .env("ORBIT_EMBEDDER", "hashing")
            .env("QDRANT_URL", &url)
            .env("QDRANT_API_KEY", key)
            .env("ORBIT_QDRANT_ALIAS", &alias)
            .output()
            .unwrap()
    };
    let out = run("wrong-key-77c2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("QDRANT_API_KEY"), "{err}");
    assert!(
        !err.contains("wrong-key-77c2"),
        "the key was printed: {err}"
    );
    let out = run("right-key-8d1f");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster settings a new collection gets (docs/scaling.md), on the one server a test has:
/// three shards on one node, one copy each, one confirmation per write; a search over the
/// shards finds what one shard would; a count of 0 is refused at start-up.
#[test]
fn a_new_collection_takes_the_configured_shards_replication_and_write_consistency() {
    let server = QdrantServer::shared();
    let alias = unique_alias("cluster");
    let db = PgDb::seeded(&crate::helpers::fixture("sample.jsonl"));
    let url = server.url();
    let env = [
        ("QDRANT_URL", url.as_str()),
        ("ORBIT_QDRANT_ALIAS", alias.as_str()),
        ("ORBIT_QDRANT_SHARDS", "3"),
        ("ORBIT_QDRANT_REPLICATION", "1"),
        ("ORBIT_QDRANT_WRITE_CONSISTENCY", "1"),
    ];
    db.cli_env(&["build", "--user", "2", "--json"], &env);
    let info = rest_get(server, &format!("/collections/{alias}"));
    let params = &info["result"]["config"]["params"];
    assert_eq!(params["shard_number"], 3, "{info}");
    assert_eq!(params["replication_factor"], 1, "{info}");
    assert_eq!(params["write_consistency_factor"], 1, "{info}");
    let hits: Value = serde_json::from_str(&db.cli_env(
        &[
            "search",
            "--user",
            "2",
            "--json",
            "band practice rehearsal room",
        ],
        &env,
    ))
    .unwrap();
    assert!(
        hits[0]["text"]
            .as_str()
            .unwrap_or("")
            .starts_with("Band practice"),
        "{hits}"
    );
    let out = std::process::Command::new(worker_bin())
        .args(["search", "--user", "2", "band"])
        .env("QDRANT_URL", url.as_str())
        .env("ORBIT_QDRANT_SHARDS", "0")
        .env("ORBIT_EMBEDDER", "hashing")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ORBIT_QDRANT_SHARDS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
