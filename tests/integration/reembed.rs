//! `orbit-worker reembed` as an operator runs it, against the shared OpenAI double: an estimate
//! first, a run killed with SIGKILL in the middle and resumed, the app answering from the old
//! model meanwhile, and the switch to the new version once every user is done; on the embedded
//! store and on a real Qdrant server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::app_harness::*;
use crate::celery_harness::worker_bin;
use crate::helpers::fixture;
use crate::openai_double::{DoubleConfig, OpenAiDouble};
use crate::qdrant_server::{unique_alias, QdrantServer};

const OLD: &str = "text-embedding-3-small";
const NEW: &str = "text-embedding-3-large";

/// The CLI with the OpenAI embedder against `api` (16 inputs a request), the embedded store in
/// `data`, no app database, and `env` on top.
fn cli(api: &OpenAiDouble, data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(worker_bin());
    c.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("QDRANT_URL")
        .env_remove("ORBIT_EMBED_DIMENSIONS")
        .env("ORBIT_DATA_DIR", data)
        .env("ORBIT_EMBED_MODEL", OLD)
        // Small requests, so a run is many of them and can be stopped between users.
        .env("ORBIT_EMBED_BATCH_INPUTS", "16")
        .env("RUST_LOG", "warn");
    for (k, v) in api.embedder_env() {
        c.env(k, v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `search --json` for user 2's band practice: the hits, from whichever version is live.
fn band_practice(api: &OpenAiDouble, data: &std::path::Path, env: &[(&str, &str)]) -> Vec<Value> {
    let args = [
        "search",
        "--user",
        "2",
        "--json",
        "band practice rehearsal room",
    ];
    let out = ok(cli(api, data, &args, env).output().unwrap(), "search");
    serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_else(|| panic!("search printed {out}"))
}

/// `reembed` to the new model at 256 dimensions over `src`, then `extra`.
fn reembed_args<'a>(src: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "reembed",
        "--model",
        NEW,
        "--dimensions",
        "256",
        "--source",
        src,
    ];
    v.extend_from_slice(extra);
    v
}

/// A data dir holding every user's memory of the sample corpus, built with the old model
/// through `old_api`: (its temp dir, the data dir, the corpus path).
fn old_memory(
    old_api: &OpenAiDouble,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let src = fixture("sample.jsonl").to_str().unwrap().to_string();
    let args = ["build", "--all-users", "--source", src.as_str()];
    ok(cli(old_api, &data, &args, env).output().unwrap(), "build");
    (dir, data, src)
}

#[test]
fn a_killed_reembed_resumes_pays_for_each_chunk_once_and_switches_once() {
    // The live memory, built with the old model.
    let old_api = OpenAiDouble::start();
    let (dir, data, src) = old_memory(&old_api, &[]);
    let src = src.as_str();
    let requests_per_build = old_api.embedding_requests();
    assert!(requests_per_build >= 6, "{requests_per_build} requests");

    // The new model's key: an estimate first (the TPM given, so no probe request is sent).
    let api = OpenAiDouble::with(DoubleConfig {
        latency: Duration::from_millis(20),
        ..DoubleConfig::default()
    });
    let reembed = reembed_args(src, &[]);
    let args = reembed_args(src, &["--estimate", "--json"]);
    let est: Value = serde_json::from_str(&ok(
        cli(&api, &data, &args, &[("ORBIT_EMBED_TPM", "1000000")])
            .output()
            .unwrap(),
        "estimate",
    ))
    .unwrap();
    assert_eq!(api.embedding_requests(), 0, "the estimate sent a request");
    assert_eq!(est["users"], 6, "{est}");
    let est_tokens = est["tokens"].as_u64().unwrap();
    assert!(
        est_tokens > 0 && est["cost_usd"].as_f64().unwrap() > 0.0,
        "{est}"
    );
    assert!(est["wall_s_at_limit"].as_f64().unwrap() > 0.0, "{est}");

    // The run: after about half a build's requests the key stalls (nothing more is paid for),
    // and the run is killed while its requests hang.
    let paid = requests_per_build / 2;
    let mut script = vec![Reply::Ok; paid];
    script.extend(vec![Reply::Stall; 200]);
    api.script_embeddings(script);
    let mut child = cli(&api, &data, &reembed, &[("ORBIT_EMBED_TIMEOUT", "120")])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut run_id = None;
    let mut users_done = 0;
    let mut read = |line: String| {
        if let Some(rest) = line.strip_prefix("reembed: run ") {
            run_id = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(n) = line
            .strip_prefix("reembed: ")
            .and_then(|r| r.split('/').next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            users_done = n;
        }
        assert!(
            !line.contains("switched"),
            "switched before the kill: {line}"
        );
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            read(line);
        }
        let stalled = api.embedding_requests() > paid && api.counts().in_progress == 0;
        if stalled {
            break;
        }
    }
    // Let the stalled requests arrive, then kill: nothing after the stall was answered.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    // Every line the run wrote before it died (each user's line follows its checkpoint).
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        read(line);
    }
    assert!(users_done >= 1, "no user finished before the key stalled");
    let run_id = run_id.expect("the run's id on stderr");
    let embedded_before_kill = api.counts().inputs;
    assert!(embedded_before_kill > 0);

    // During the run the app answers from the old model's version.
    let hits = band_practice(&old_api, &data, &[]);
    assert!(
        !hits.is_empty(),
        "no answer from the old version during the run"
    );
    let q = old_api.seen();
    assert_eq!(
        q.last().unwrap().body["model"],
        OLD,
        "the question was embedded with another model"
    );

    // Resumed: the rest, then the switch.
    api.clear_embeddings();
    let mut args = reembed.to_vec();
    args.extend(["--resume", &run_id, "--json", "--drop-old"]);
    let report: Value = serde_json::from_str(&ok(
        cli(&api, &data, &args, &[]).output().unwrap(),
        "resume",
    ))
    .unwrap();
    assert_eq!(report["switched"], true, "{report}");
    assert_eq!(report["users_total"], 6, "{report}");
    assert_eq!(
        report["users_resumed"].as_u64().unwrap(),
        users_done as u64,
        "{report}"
    );
    assert_eq!(report["dropped_previous"], true, "{report}");

    // Every distinct chunk was paid for once, across the killed attempt and the resumed one.
    let counts = api.embedded_counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "embedded more than once: {}", twice.len());
    assert!(
        counts.len() as u64 > embedded_before_kill,
        "the resume embedded the rest"
    );
    // The estimate said what the run would send, within 1 %.
    let sent = api.counts().tokens;
    let off = (sent as f64 - est_tokens as f64).abs() / est_tokens as f64;
    assert!(off <= 0.01, "estimate {est_tokens} tokens, sent {sent}");
    for s in api.seen() {
        if s.path.ends_with("/embeddings") {
            assert_eq!(s.body["model"], NEW);
            assert_eq!(s.body["dimensions"], 256);
        }
    }

    // Switched once, to the run's version; the old one is gone; the new one answers.
    let live = std::fs::read_to_string(data.join("LIVE")).unwrap();
    assert!(live.contains(&run_id), "LIVE names {live}");
    assert!(
        !data.join("vectors.sqlite").exists(),
        "the old version was not dropped"
    );
    let new_env = [
        ("ORBIT_EMBED_MODEL", NEW),
        ("ORBIT_EMBED_DIMENSIONS", "256"),
    ];
    assert!(!band_practice(&api, &data, &new_env).is_empty());
    // A worker still configured with the old model follows the switch: what it embeds (a new
    // note, a new question) it embeds with the live version's model, never mixing two models.
    let mut lines = std::fs::read_to_string(src).unwrap();
    lines.push_str(&serde_json::json!({"user_id": 2, "kind": "note", "source_id": "n-new",
        "text": "The rehearsal room door code changed to 4711.", "created_at": "2026-03-01T10:00:00Z"})
        .to_string());
    let grown = dir.path().join("grown.jsonl");
    std::fs::write(&grown, lines + "\n").unwrap();
    let before = old_api.embedding_requests();
    let args = ["build", "--user", "2", "--source", grown.to_str().unwrap()];
    ok(
        cli(&old_api, &data, &args, &[]).output().unwrap(),
        "build after the switch",
    );
    let args = [
        "search",
        "--user",
        "2",
        "--json",
        "what is the door code of the rehearsal room?",
    ];
    let hits = ok(
        cli(&old_api, &data, &args, &[]).output().unwrap(),
        "search after the switch",
    );
    assert!(hits.contains("4711"), "{hits}");
    let after: Vec<_> = old_api.seen().into_iter().skip(before).collect();
    assert_eq!(after.len(), 2, "the new note and the question");
    for s in after {
        assert_eq!(s.body["model"], NEW, "{}", s.body);
        assert_eq!(s.body["dimensions"], 256);
    }
}

/// What `alias` points to on the server, from Qdrant's own REST API.
fn alias_target(server: &QdrantServer, alias: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-s", &format!("{}/aliases", server.rest())])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["result"]["aliases"]
        .as_array()?
        .iter()
        .find(|a| a["alias_name"] == alias)
        .and_then(|a| a["collection_name"].as_str().map(str::to_string))
}

/// Points in a collection (the meta point included), or None when there is no such collection.
fn points_in(server: &QdrantServer, collection: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", "-H", "content-type: application/json"])
        .args(["-d", r#"{"exact": true}"#])
        .arg(format!(
            "{}/collections/{collection}/points/count",
            server.rest()
        ))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["result"]["count"].as_u64()
}

#[test]
fn a_reembed_on_the_qdrant_server_builds_a_new_collection_and_swaps_the_alias_once() {
    let server = QdrantServer::shared();
    let (url, alias) = (server.url(), unique_alias("reembed"));
    let q = [
        ("QDRANT_URL", url.as_str()),
        ("ORBIT_QDRANT_ALIAS", alias.as_str()),
    ];
    let old_api = OpenAiDouble::start();
    let (_dir, data, src) = old_memory(&old_api, &q);
    let src = src.as_str();
    let before = alias_target(server, &alias).expect("the alias after the first build");
    let points = points_in(server, &before).unwrap();

    let api = OpenAiDouble::start();
    let args = reembed_args(src, &["--json", "--drop-old"]);
    let report: Value = serde_json::from_str(&ok(
        cli(&api, &data, &args, &q).output().unwrap(),
        "reembed",
    ))
    .unwrap();
    let after = alias_target(server, &alias).expect("the alias after the run");
    assert_eq!(report["target"], after.as_str(), "{report}");
    assert_eq!(report["previous"], before.as_str(), "{report}");
    assert!(
        after.contains(report["run_id"].as_str().unwrap()),
        "{after}"
    );
    assert_eq!(
        points_in(server, &after),
        Some(points),
        "every chunk in the new version"
    );
    assert_eq!(
        points_in(server, &before),
        None,
        "the old collection was not dropped"
    );
    let new_env = [
        q[0],
        q[1],
        ("ORBIT_EMBED_MODEL", NEW),
        ("ORBIT_EMBED_DIMENSIONS", "256"),
    ];
    // Each chunk once (no kill here: the two catch-up passes embedded nothing).
    let counts = api.embedded_counts();
    assert!(counts.values().all(|n| *n == 1), "a chunk embedded twice");
    assert_eq!(
        counts.len() as u64,
        report["chunks_embedded"].as_u64().unwrap()
    );
    assert!(!band_practice(&api, &data, &new_env).is_empty());
}

/// `--via-queue`: one `orbitpilot.reembed_user` message per user, taken by two workers sharing
/// the data dir (store, run log, cache), followed by the command, which switches at the end.
#[test]
fn a_queued_reembed_is_shared_by_two_workers_and_each_user_is_done_once() {
    use crate::celery_harness::{meta, unique_queue, RedisServer, WorkerProc};
    let old_api = OpenAiDouble::start();
    let (_dir, data, src) = old_memory(&old_api, &[]);
    let src = src.as_str();
    let redis = RedisServer::start(false);
    let api = OpenAiDouble::start();
    let queue = unique_queue("reembed");
    let data_s = data.to_str().unwrap();
    let mut env: Vec<(&str, String)> = api.embedder_env();
    env.extend([
        ("ORBIT_DATA_DIR", data_s.to_string()),
        ("ORBIT_SOURCE", src.to_string()),
        ("ORBIT_EMBED_MODEL", OLD.to_string()),
        ("ORBIT_EMBED_BATCH_INPUTS", "16".to_string()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let workers: Vec<WorkerProc> = (0..2)
        .map(|_| WorkerProc::start_env(&redis, &["-Q", &queue, "-c", "2"], &env))
        .collect();
    let url = redis.url();
    let args = reembed_args(src, &["--via-queue", "--queue", &queue, "--json"]);
    let report: Value = serde_json::from_str(&ok(
        cli(&api, &data, &args, &[("REDIS_URL", url.as_str())])
            .output()
            .unwrap(),
        "reembed --via-queue",
    ))
    .unwrap();
    assert_eq!(report["switched"], true, "{report}");
    assert_eq!(report["users_built"], 6, "{report}");
    assert!(report["chunks"].as_u64().unwrap() > 0, "{report}");
    // Each user once: six results, all `done`, and each chunk embedded once in all.
    let logs: String = workers.iter().map(|w| w.log()).collect();
    let ids: Vec<String> = logs
        .lines()
        .filter(|l| l.contains("orbitpilot.reembed_user") && l.contains("succeeded"))
        .filter_map(|l| {
            let after = l.split("orbitpilot.reembed_user[").nth(1)?;
            after.split(']').next().map(str::to_string)
        })
        .collect();
    assert_eq!(ids.len(), 6, "{logs}");
    for id in &ids {
        let m = meta(&redis, id).expect("a result");
        assert_eq!(m["status"], "SUCCESS", "{m}");
        assert_eq!(m["result"]["status"], "done", "{m}");
    }
    let by_worker: Vec<usize> = workers
        .iter()
        .map(|w| w.log().matches("reembed_user").count())
        .collect();
    assert!(
        by_worker.iter().all(|n| *n > 0),
        "one worker did it all: {by_worker:?}"
    );
    let counts = api.embedded_counts();
    assert!(counts.values().all(|n| *n == 1), "a chunk embedded twice");
    let new_env = [
        ("ORBIT_EMBED_MODEL", NEW),
        ("ORBIT_EMBED_DIMENSIONS", "256"),
    ];
    assert!(!band_practice(&api, &data, &new_env).is_empty());
}

/// The production embedding cache, a table of the app's Postgres: made on first use (two workers
/// racing to make it both succeed), vectors found by (model, dimensions, text), a row of
/// another shape a miss, and past its bound the least recently used rows gone.
#[test]
fn the_postgres_embedding_cache_is_shared_bounded_and_least_recently_used_first() {
    use orbit_pipeline::embed::cache::{cache_key, EmbeddingCache, PgEmbeddingCache};
    let db = PgDb::empty();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
        // About ten rows of 8 floats (32 bytes and 64 of overhead each).
        let (a, b) = tokio::join!(
            PgEmbeddingCache::open(pool.clone(), 960),
            PgEmbeddingCache::open(pool.clone(), 960)
        );
        let (c, _) = (a.unwrap(), b.unwrap());
        let k = cache_key("hello");
        c.put("m@8", &[(k, &[0.25f32; 8])]).await.unwrap();
        assert_eq!(c.get("m@8", &[k]).await.unwrap()[&k], vec![0.25f32; 8]);
        assert!(
            c.get("m@4", &[k]).await.unwrap().is_empty(),
            "another space"
        );
        c.put("m@4", &[(cache_key("short"), &[1.0f32; 3])])
            .await
            .unwrap();
        assert!(
            c.get("m@4", &[cache_key("short")])
                .await
                .unwrap()
                .is_empty(),
            "a vector of another shape came back"
        );
        let keys: Vec<_> = (0..70).map(|i| cache_key(&format!("text {i}"))).collect();
        for k in &keys {
            // Each row older than the next, so "least recently used" has one answer.
            sqlx::query("UPDATE orbit_embedding_cache SET used = used - 1")
                .execute(&pool)
                .await
                .unwrap();
            c.put("m@8", &[(*k, &[0.5f32; 8])]).await.unwrap();
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orbit_embedding_cache")
            .fetch_one(&pool)
            .await
            .unwrap();
        // Checked every 64 puts: evicted to 9 rows at the 64th, then 6 more.
        assert!(rows <= 16, "{rows} rows kept under a bound of about 10");
        let held = c.get("m@8", &keys).await.unwrap();
        assert!(held.contains_key(&keys[69]) && !held.contains_key(&keys[0]));
    });
}

/// The production shape: the app's Postgres as the source, the run log and the embedding cache,
/// a Qdrant server as the store. The run is recorded there (switched, one checkpoint per user),
/// the cache holds the new model's vectors, and a second run to the same model pays for nothing.
#[test]
fn a_reembed_against_postgres_and_qdrant_keeps_its_run_and_cache_in_the_apps_database() {
    let server = QdrantServer::shared();
    let (url, alias) = (server.url(), unique_alias("reembed_pg"));
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db_url = db.url();
    let q = [
        ("QDRANT_URL", url.as_str()),
        ("ORBIT_QDRANT_ALIAS", alias.as_str()),
        ("DATABASE_URL", db_url.as_str()),
    ];
    let old_api = OpenAiDouble::start();
    ok(
        cli(&old_api, &data, &["build", "--all-users"], &q)
            .output()
            .unwrap(),
        "build",
    );
    let api = OpenAiDouble::start();
    let args = ["reembed", "--model", NEW, "--dimensions", "256", "--json"];
    let report: Value = serde_json::from_str(&ok(
        cli(&api, &data, &args, &q).output().unwrap(),
        "reembed",
    ))
    .unwrap();
    let run = report["run_id"].as_str().unwrap();
    assert_eq!(
        db.sql(&format!(
            "SELECT status, target FROM orbit_reembed_runs WHERE id = '{run}'"
        )),
        format!("switched|{}", report["target"].as_str().unwrap())
    );
    let done: u64 = db
        .sql(&format!(
            "SELECT count(*) FROM orbit_reembed_users WHERE run_id = '{run}'"
        ))
        .parse()
        .unwrap();
    assert_eq!(done, report["users_total"].as_u64().unwrap());
    assert!(done > 0, "{done} checkpoints");
    let cached: u64 = db
        .sql(&format!(
            "SELECT count(*) FROM orbit_embedding_cache WHERE space = '{NEW}@256'"
        ))
        .parse()
        .unwrap();
    assert_eq!(cached, api.embedded_counts().len() as u64);
    // A second run to the same model: a new version, every vector from the cache.
    let before = api.counts().inputs;
    let again: Value =
        serde_json::from_str(&ok(cli(&api, &data, &args, &q).output().unwrap(), "again")).unwrap();
    assert_eq!(again["switched"], true);
    assert_eq!(
        api.counts().inputs,
        before,
        "the second run paid for a chunk"
    );
    assert_eq!(again["tokens_sent"], 0, "{again}");
}
