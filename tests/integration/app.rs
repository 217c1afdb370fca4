//! The app database end to end: migrations, build records through the queue (success, failure,
//! soft limit, retry, coalescing), incremental rebuilds, generate_answer with and without a chat
//! model, usage rows, Django-format cache keys read by real Django, and the HTTP face. Real
//! Postgres (a database per test), a redis-server per test, the real Celery client.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::app_harness::*;
use crate::celery_harness::*;
use crate::helpers::fixture;

fn month() -> String {
    chrono::Utc::now().format("%Y-%m").to_string()
}

fn worker(
    redis: &RedisServer,
    db: &PgDb,
    queue: &str,
    extra: &[&str],
    env: &[(&str, String)],
) -> WorkerProc {
    let mut args = vec!["-Q", queue];
    args.extend_from_slice(extra);
    let mut e: Vec<(&str, &str)> = vec![("DATABASE_URL", Box::leak(db.url().into_boxed_str()))];
    for (k, v) in env {
        e.push((k, v.as_str()));
    }
    WorkerProc::start_env(redis, &args, &e)
}

fn build_row(db: &PgDb, id: &str) -> Vec<String> {
    db.sql(&format!(
        "SELECT status, attempt, documents, chunks, task_id, error_message, \
         started_at IS NOT NULL, finished_at IS NOT NULL, coalesced_into_id \
         FROM orbitpilot_memorybuild WHERE id = {id}"
    ))
    .split('|')
    .map(str::to_string)
    .collect()
}

/// `orbitpilot.build_memory(user, build_id)` through the real Celery client, with `options`.
fn build_call(redis: &RedisServer, q: &str, user: i64, id: &str, options: Value) -> Value {
    let id: i64 = id.parse().unwrap();
    call(
        redis,
        q,
        "orbitpilot.build_memory",
        json!([user, id]),
        json!({}),
        options,
    )
}

fn new_build(db: &PgDb, user: i64) -> String {
    db.sql(&format!(
        "INSERT INTO orbitpilot_memorybuild (user_id) VALUES ({user}) RETURNING id"
    ))
}

#[test]
fn migrations_apply_on_an_empty_database_and_rerun() {
    let db = PgDb::empty();
    db.cli(&["db", "migrate"]);
    let again = db.cli(&["db", "migrate"]);
    assert!(again.contains("up to date"), "{again}");
    let tables = db.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name IN \
         ('accounts_user','messaging_conversation','messaging_conversation_participants','messaging_message',\
          'channels_channel','channels_channel_members','channels_channelpost','groups_group',\
          'groups_group_members','groups_grouppost','blink_blinkaudio','orbitpilot_note',\
          'orbitpilot_memorybuild','orbitpilot_aiusagelog','notifications_pushsubscription')",
    );
    assert_eq!(tables, "15");
    let shipped = std::fs::read_dir(crate::helpers::repo().join("migrations"))
        .unwrap()
        .count();
    assert_eq!(
        db.sql("SELECT count(*) FROM _sqlx_migrations WHERE success"),
        shipped.to_string()
    );
    // Seeding twice updates instead of duplicating.
    let corpus = fixture("sample.jsonl");
    db.cli(&["db", "seed", "--from", corpus.to_str().unwrap()]);
    let n = db.sql("SELECT (SELECT count(*) FROM messaging_message) + (SELECT count(*) FROM channels_channelpost)");
    let out = db.cli(&["db", "seed", "--from", corpus.to_str().unwrap()]);
    assert!(out.contains(" 0 new rows"), "{out}");
    assert_eq!(
        db.sql("SELECT (SELECT count(*) FROM messaging_message) + (SELECT count(*) FROM channels_channelpost)"),
        n
    );
}

#[test]
fn build_through_the_queue_completes_its_record_invalidates_the_cache_and_shows_over_http() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let q = unique_queue("build");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = worker(
        &redis,
        &db,
        &q,
        &["--http", &addr],
        &[("ORBIT_HTTP_TOKEN", "tok-1".into())],
    );
    let id = new_build(&db, 1);
    assert_eq!(build_row(&db, &id)[0], "planned");
    let snapshot = "orbit_snapshot_counts:1";
    django_cache(
        &redis,
        json!([{"op": "set", "key": snapshot, "value": {"messages": 1}, "timeout": 120}]),
    );

    let r = call(
        &redis,
        &q,
        "orbitpilot.build_memory",
        json!([1]),
        json!({"build_id": id.parse::<i64>().unwrap()}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(r["result"]["status"], "completed");
    let row = build_row(&db, &id);
    assert_eq!(row[0], "completed", "{row:?}");
    assert_eq!(row[1], "1", "attempt");
    assert_eq!(row[3], r["result"]["chunks"].to_string());
    assert!(row[2].parse::<i64>().unwrap() > 100, "documents {row:?}");
    assert_eq!(row[4], r["id"].as_str().unwrap(), "task id");
    assert_eq!((row[6].as_str(), row[7].as_str()), ("t", "t"));
    // The memory changed: Django no longer sees stale counts.
    assert_eq!(
        django_cache(&redis, json!([{"op": "has", "key": snapshot}])),
        json!([false])
    );

    // Status endpoints: 401 without (or with a wrong) token, the record with it.
    let path = "/orbitpilot/build/status/?user_id=1";
    assert_eq!(http_get(&addr, path, None).0, 401);
    assert_eq!(http_get(&addr, path, Some("nope")).0, 401);
    let (code, body) = http_get(&addr, path, Some("tok-1"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["build_id"].to_string(), id);
    assert_eq!(v["chunks"], r["result"]["chunks"]);
    assert!(v["counts"]["messages"].as_i64().unwrap() > 0, "{v}");
    let blink = db.sql("SELECT id FROM blink_blinkaudio ORDER BY id LIMIT 1");
    let bpath = format!("/blink-audio/{blink}/status/");
    assert_eq!(http_get(&addr, &bpath, None).0, 401);
    let (code, body) = http_get(&addr, &bpath, Some("tok-1"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["transcription_status"], "completed");
    assert!(v.get("ai_analysis_status").is_some());
    assert_eq!(
        http_get(&addr, "/blink-audio/99999999/status/", Some("tok-1")).0,
        404
    );

    let (code, body) = http_get(&addr, "/healthz", None);
    assert_eq!(code, 200, "{body}");

    // /metrics through a real Prometheus parser.
    let (code, text) = http_get(&addr, "/metrics", None);
    assert_eq!(code, 200);
    let parsed = prometheus_parse(&text);
    let get = |name: &str, labels: Value| metric(&parsed, name, labels);
    assert_eq!(
        get(
            "orbit_tasks_total",
            json!({"task": "orbitpilot.build_memory", "state": "succeeded"})
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "orbit_task_duration_seconds_count",
            json!({"task": "orbitpilot.build_memory", "state": "succeeded"})
        ),
        Some(1.0)
    );
    assert_eq!(get("orbit_queue_depth", json!({"queue": q})), Some(0.0));
    assert!(get("orbit_unacked_messages", json!({})).is_some());
    assert!(
        get(
            "orbit_pipeline_stage_items_total",
            json!({"stage": "chunk"})
        )
        .unwrap()
            > 0.0
    );
    drop(w);
}

/// A worker whose builds take some seconds: the API double answers each embeddings request of
/// `inputs` texts in `latency_ms`, one request at a time. Keep the double alive with the worker.
fn slow_api_worker(
    redis: &RedisServer,
    db: &PgDb,
    q: &str,
    latency_ms: u64,
    inputs: usize,
    extra: &[&str],
    env_extra: &[(&str, String)],
) -> (OpenAiDouble, WorkerProc) {
    let api = OpenAiDouble::with(crate::openai_double::DoubleConfig {
        latency: Duration::from_millis(latency_ms),
        ..Default::default()
    });
    let mut env = api.embedder_env();
    env.push(("ORBIT_EMBED_BATCH_INPUTS", inputs.to_string()));
    env.push(("ORBIT_EMBED_IN_FLIGHT", "1".into()));
    env.extend(env_extra.iter().cloned());
    let w = worker(redis, db, q, extra, &env);
    (api, w)
}

/// `orbitpilot.build_memory` of `user` for a new record, sent without waiting: (record, task id).
fn send_build(redis: &RedisServer, db: &PgDb, q: &str, user: i64) -> (String, String) {
    let id = new_build(db, user);
    let task = send(
        redis,
        q,
        json!([{"name": "orbitpilot.build_memory", "args": [user], "kwargs": {"build_id": id.parse::<i64>().unwrap()}}]),
    )[0]
    .clone();
    (id, task)
}

/// The dashboard's view of a build: polled through the status endpoint while it runs, its
/// percentage rises (never falls) against the documents the source counted first, and ends at
/// 100; `inspect active` shows the same progress in the task's request.
#[test]
fn a_build_shows_its_progress_rising_to_100_through_the_status_endpoint() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let q = unique_queue("progress");
    let addr = format!("127.0.0.1:{}", free_port());
    // 0.4 s a request of 4 inputs: a build of some ten seconds, five progress writes or more.
    let (_api, w) = slow_api_worker(
        &redis,
        &db,
        &q,
        400,
        4,
        &["--http", &addr],
        &[("ORBIT_HTTP_TOKEN", "tok-2".into())],
    );
    let (_, task) = send_build(&redis, &db, &q, 1);
    let mut seen: Vec<f64> = Vec::new();
    let mut inspected = None;
    let last = wait_for("the build to complete", Duration::from_secs(120), || {
        let (code, body) = http_get(&addr, "/orbitpilot/build/status/?user_id=1", Some("tok-2"));
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["status"] == "running" {
            if let Some(p) = v["progress"]["percent"].as_f64() {
                seen.push(p);
            }
            if inspected.is_none() && seen.last().is_some_and(|p| *p > 0.0) {
                let a = crate::monitoring::control(&redis, "*", &["inspect:active"]);
                inspected = a["inspect:active"]
                    .as_object()
                    .and_then(|m| m.values().next())
                    .and_then(|tasks| tasks.as_array()?.first().cloned());
            }
        }
        std::thread::sleep(Duration::from_millis(400));
        (v["status"] == "completed").then_some(v)
    });
    // The source's count first, and the documents the build then read: the same.
    let report = wait_meta(&redis, &task, "SUCCESS", Duration::from_secs(10))["result"].clone();
    let expected = report["documents_read"].as_u64().unwrap();
    assert!(expected > 100, "{report}");
    let p = &last["progress"];
    assert_eq!(p["percent"], 100.0, "{last}");
    assert_eq!(p["documents_expected"], json!(expected), "{last}");
    assert_eq!(p["chunks_embedded"], last["chunks_embedded"]);
    let between: Vec<&f64> = seen.iter().filter(|p| **p > 0.0 && **p < 100.0).collect();
    assert!(
        between.len() >= 3,
        "the percentage seen while running: {seen:?}\n{}",
        w.log()
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "it went back: {seen:?}"
    );
    let active = inspected.expect("inspect active while the build ran");
    assert_eq!(active["id"], json!(task), "{active}");
    assert_eq!(
        active["progress"]["documents_expected"],
        json!(expected),
        "{active}"
    );
    assert!(
        active["progress"]["chunks"].as_u64().unwrap() > 0,
        "{active}"
    );
    assert!(
        active["progress"]["eta_seconds"].as_f64().is_some(),
        "{active}"
    );
}

/// `celery control terminate SIGTERM <id>` (the CLI's spelling of `revoke(id, terminate=True)`)
/// on a running build: the task ends REVOKED, its record failed "revoked", and the user's lock
/// is free for the next build.
#[test]
fn a_terminated_build_ends_revoked_and_its_record_failed_revoked() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let q = unique_queue("terminate");
    let (api, _w) = slow_api_worker(&redis, &db, &q, 500, 4, &[], &[]);
    let (id, task) = send_build(&redis, &db, &q, 1);
    wait_for("the build to embed", Duration::from_secs(30), || {
        (build_row(&db, &id)[0] == "running" && api.embedding_requests() > 0).then_some(())
    });
    let mut revoke = std::process::Command::new(crate::helpers::python());
    revoke.args([
        "-m",
        "celery",
        "-A",
        "pyapp",
        "control",
        "terminate",
        "SIGTERM",
        &task,
    ]);
    py_env(&mut revoke, &redis, &q);
    let out = revoke.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = wait_meta(&redis, &task, "REVOKED", Duration::from_secs(20));
    assert_eq!(m["status"], "REVOKED", "{m}");
    let row = wait_for("the record to end", Duration::from_secs(10), || {
        let r = build_row(&db, &id);
        (r[0] != "running").then_some(r)
    });
    assert_eq!(
        (row[0].as_str(), row[5].as_str()),
        ("failed", "revoked"),
        "{row:?}"
    );
    // The lock went with it: the next build runs now, not after the lock's TTL.
    let next = new_build(&db, 1);
    let r = build_call(&redis, &q, 1, &next, json!({}));
    assert_eq!(r["state"], "SUCCESS", "{r}");
}

/// The embed stage counts requests and bytes apart, in its report and on /metrics, and both
/// agree with what the API double itself received.
#[test]
fn the_embed_stage_reports_requests_and_bytes_as_the_api_saw_them() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let api = OpenAiDouble::start();
    let q = unique_queue("embedcount");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = api.embedder_env();
    env.push(("ORBIT_EMBED_BATCH_INPUTS", "16".into()));
    let _w = worker(&redis, &db, &q, &["--http", &addr], &env);
    let r = call(
        &redis,
        &q,
        "orbitpilot.build_memory",
        json!([1]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let embed = r["result"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "embed")
        .unwrap()
        .clone();
    let requests = api.embedding_requests() as u64;
    let bytes: u64 = api.embedded().iter().map(|t| t.len() as u64).sum();
    assert!(requests > 1, "{requests}");
    assert_eq!(embed["requests"].as_u64(), Some(requests), "{embed}");
    assert_eq!(embed["bytes_out"].as_u64(), Some(bytes), "{embed}");
    assert_eq!(
        embed["items_out"].as_u64(),
        Some(api.embedded().len() as u64)
    );
    let (code, text) = http_get(&addr, "/metrics", None);
    assert_eq!(code, 200);
    let parsed = prometheus_parse(&text);
    let stage = json!({"stage": "embed"});
    assert_eq!(
        metric(
            &parsed,
            "orbit_pipeline_stage_requests_total",
            stage.clone()
        ),
        Some(requests as f64)
    );
    assert_eq!(
        metric(&parsed, "orbit_pipeline_stage_bytes_total", stage),
        Some(bytes as f64)
    );
}

#[test]
fn build_records_failure_soft_limit_and_retry_through_the_queue() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let api = OpenAiDouble::start();
    let q = unique_queue("buildfail");
    let mut env = api.embedder_env();
    // One request at a time, so a scripted reply lands on the request it is meant for.
    env.push(("ORBIT_EMBED_IN_FLIGHT", "1".into()));
    env.push(("ORBIT_HTTP_MAX_INLINE_WAIT", "0.5".into()));
    let _w = worker(&redis, &db, &q, &[], &env);

    // A rejected key: failed at once, with a readable message and no secret.
    api.script_embeddings(vec![Reply::Status(401, vec![], json!({"error": {"message": "Incorrect API key provided: sk-tes**********4242.", "type": "invalid_request_error", "code": "invalid_api_key"}}).to_string())]);
    let id = new_build(&db, 1);
    let r = build_call(&redis, &q, 1, &id, json!({}));
    assert_eq!(r["state"], "FAILURE", "{r}");
    let row = build_row(&db, &id);
    assert_eq!(row[0], "failed");
    assert!(
        row[5].contains("401") && row[5].contains("Incorrect API key"),
        "{row:?}"
    );
    assert!(
        !row[5].contains(API_KEY) && !row[5].contains("Traceback"),
        "{row:?}"
    );
    assert_eq!(row[7], "t", "finished_at");

    // A stalled API: the soft limit stops the build and the record says so.
    api.script_embeddings(vec![Reply::Stall]);
    let id = new_build(&db, 2);
    let r = build_call(
        &redis,
        &q,
        2,
        &id,
        json!({"soft_time_limit": 2, "time_limit": 30}),
    );
    assert_eq!(r["state"], "FAILURE", "{r}");
    assert_eq!(r["raised"]["type"], "SoftTimeLimitExceeded", "{r}");
    let row = build_row(&db, &id);
    assert_eq!(row[0], "failed");
    assert!(row[5].contains("soft time limit"), "{row:?}");

    // A 503 storm is retried in one layer only: the call layer's three attempts, then "gave up",
    // which the task does not retry (the count at the double proves it).
    let down = Reply::Status(
        503,
        vec![],
        json!({"error": {"message": "overloaded", "type": "server_error"}}).to_string(),
    );
    api.script_embeddings(vec![down; 6]);
    let before = api.embedding_requests();
    let id = new_build(&db, 3);
    let r = build_call(&redis, &q, 3, &id, json!({}));
    assert_eq!(r["state"], "FAILURE", "{r}");
    assert_eq!(
        api.embedding_requests() - before,
        3,
        "the inline budget, and not one request more"
    );
    let row = build_row(&db, &id);
    assert_eq!(
        (row[0].as_str(), row[1].as_str()),
        ("failed", "1"),
        "{row:?}"
    );
    assert!(row[5].contains("gave up after 3 attempts"), "{row:?}");
    // Forget what the storm left unused, so the next case starts clean.
    api.clear_embeddings();

    // Rate limited with a wait longer than the inline budget (set to half a second here): the
    // call does not sleep on it; the task retries with that ETA and the record counts the second
    // attempt.
    let limited = Reply::Status(429, vec![("retry-after", "1")], json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}).to_string());
    api.script_embeddings(vec![limited]);
    let before = api.embedding_requests();
    let id = new_build(&db, 3);
    let r = call(
        &redis,
        &q,
        "orbitpilot.build_memory",
        json!([3]),
        json!({"build_id": id.parse::<i64>().unwrap()}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let row = build_row(&db, &id);
    assert_eq!(
        (row[0].as_str(), row[1].as_str()),
        ("completed", "2"),
        "{row:?}"
    );
    assert_eq!(row[5], "", "a completed build carries no error");
    assert!(
        api.embedding_requests() - before > 1,
        "the rate-limited request was not retried inline"
    );
    // The paid embedding calls of the build that completed: one usage row, in tokens.
    let usage = db.sql(&format!(
        "SELECT feature, model, prompt_tokens > 0, cost_usd > 0 FROM orbitpilot_aiusagelog WHERE task_id = '{}'",
        r["id"].as_str().unwrap()
    ));
    assert_eq!(usage, "orbitpilot_memory_embed|text-embedding-3-small|t|t");
    // Every request carried the key, and only as a bearer token.
    assert!(api
        .auths()
        .iter()
        .all(|a| a.as_deref() == Some(&format!("Bearer {API_KEY}")[..])));
}

/// Two builds of user 4 on a worker whose first embedding request takes 3 s, so the first build
/// holds the lock while the second request arrives.
struct TwoBuilds {
    redis: RedisServer,
    db: PgDb,
    _api: OpenAiDouble,
    _worker: WorkerProc,
    q: String,
    first: String,
    second: String,
    first_task: String,
}

impl TwoBuilds {
    fn start(name: &str) -> Self {
        let redis = RedisServer::start(false);
        let db = PgDb::seeded(&fixture("sample.jsonl"));
        let api = OpenAiDouble::start();
        let q = unique_queue(name);
        let mut env = api.embedder_env();
        env.push(("ORBIT_EMBED_IN_FLIGHT", "1".into()));
        let worker = worker(&redis, &db, &q, &["-c", "2"], &env);
        api.script_embeddings(vec![Reply::Slow(Duration::from_secs(3))]);
        let first = new_build(&db, 4);
        let second = new_build(&db, 4);
        let ids = send(
            &redis,
            &q,
            json!([
                {"name": "orbitpilot.build_memory", "args": [4, first.parse::<i64>().unwrap()]},
            ]),
        );
        Self {
            redis,
            db,
            _api: api,
            _worker: worker,
            q,
            first,
            second,
            first_task: ids[0].clone(),
        }
    }

    /// Sends the second build and gets both results.
    fn second_and_results(&self) -> Value {
        let ids2 = send(
            &self.redis,
            &self.q,
            json!([
                {"name": "orbitpilot.build_memory", "args": [4, self.second.parse::<i64>().unwrap()]},
            ]),
        );
        celery_client(
            &self.redis,
            &self.q,
            json!({"op": "get", "ids": [self.first_task, ids2[0]], "timeout": 60}),
        )
    }
}

#[test]
fn a_second_request_while_a_build_runs_is_coalesced() {
    let t = TwoBuilds::start("coalesce");
    let (db, first, second) = (&t.db, &t.first, &t.second);
    // The first build's first request takes 3 s: long enough for the second to arrive.
    std::thread::sleep(Duration::from_millis(800));
    let r = t.second_and_results();
    assert_eq!(r[0]["state"], "SUCCESS", "{r}");
    assert_eq!(r[0]["result"]["status"], "completed", "{r}");
    assert_eq!(r[1]["state"], "SUCCESS", "{r}");
    assert_eq!(r[1]["result"]["status"], "coalesced", "{r}");
    assert_eq!(r[1]["result"]["coalesced_into"].to_string(), *first);
    let a = build_row(db, first);
    let b = build_row(db, second);
    assert_eq!(a[0], "completed");
    assert_eq!(a[8], "", "the build that ran is coalesced into nothing");
    // The coalesced record says so, and follows the build that served it.
    assert_eq!(b[8], *first, "{b:?}");
    assert_eq!(b[0], "completed", "{b:?}");
    assert_eq!(b[3], a[3], "same chunk count");
}

/// Issue 13, defect 4: a request that coalesced into a build whose record had already ended
/// (the build finished between the request's lock attempt and its coalescing) stayed `running`
/// forever, as nothing would end it. Here the running build's record is ended by hand while
/// the build still holds its lock, which is that moment made long.
#[test]
fn a_request_never_follows_a_build_that_already_ended() {
    let t = TwoBuilds::start("coalesce-late");
    let (db, first, second) = (&t.db, &t.first, &t.second);
    wait_for("the first build to run", Duration::from_secs(20), || {
        (build_row(db, first)[0] == "running").then_some(())
    });
    db.sql(&format!(
        "UPDATE orbitpilot_memorybuild SET status = 'completed', finished_at = now() \
         WHERE id = {first}"
    ));
    let r = t.second_and_results();
    assert_eq!(r[0]["state"], "SUCCESS", "{r}");
    assert_eq!(r[1]["state"], "SUCCESS", "{r}");
    assert_eq!(
        r[1]["result"]["status"], "completed",
        "built on its own, not coalesced into an ended build: {r}"
    );
    let b = build_row(db, second);
    assert_eq!(b[0], "completed", "{b:?}");
    assert_eq!(b[8], "", "coalesced into nothing: {b:?}");
}

/// A build that itself coalesces (here: the second record, whose earlier run left a follower,
/// as a redelivered build that finds a newer one holding the lock does) takes its followers
/// along: they follow the build that runs, and end with it. Before, they kept following the
/// coalesced record, which no build's end reaches, and stayed `running`.
#[test]
fn followers_of_a_build_that_coalesces_move_to_the_build_that_runs() {
    let t = TwoBuilds::start("coalesce-chain");
    let (db, first, second) = (&t.db, &t.first, &t.second);
    wait_for("the first build to run", Duration::from_secs(20), || {
        (build_row(db, first)[0] == "running").then_some(())
    });
    // The second record ran once and gathered a follower before it lost its worker.
    let follower = new_build(db, 4);
    db.sql(&format!(
        "UPDATE orbitpilot_memorybuild SET status = 'running', started_at = now() WHERE id = {second}; \
         UPDATE orbitpilot_memorybuild SET status = 'running', coalesced_into_id = {second} WHERE id = {follower}"
    ));
    let r = t.second_and_results();
    assert_eq!(r[1]["result"]["status"], "coalesced", "{r}");
    assert_eq!(r[1]["result"]["coalesced_into"].to_string(), *first, "{r}");
    assert_eq!(build_row(db, first)[0], "completed");
    let f = build_row(db, &follower);
    assert_eq!(
        (f[0].as_str(), f[8].as_str()),
        ("completed", first.as_str()),
        "{f:?}"
    );
}

/// Issue 13, defect 5 as reported: after a build hit its hard time limit, the next request
/// for the user was coalesced into the dead build (its lock outlived it) and no build ran.
/// Here (a build aborted at an await) the aborted task drops its lock; the worker's abort hook
/// now also ends the record and releases the lock by value itself, for a build stuck where an
/// abort cannot reach it (docs/schema.md, the state machine).
#[test]
fn a_build_after_a_hard_time_limit_runs_on_its_own() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let api = OpenAiDouble::start();
    let q = unique_queue("after-hard-limit");
    let mut env = api.embedder_env();
    env.push(("ORBIT_EMBED_IN_FLIGHT", "1".into()));
    let _w = worker(&redis, &db, &q, &["-c", "2"], &env);
    api.script_embeddings(vec![Reply::Stall]);
    let dead = new_build(&db, 4);
    let r = build_call(&redis, &q, 4, &dead, json!({"time_limit": 2}));
    assert_eq!(r["state"], "FAILURE", "{r}");
    assert_eq!(r["raised"]["type"], "TimeLimitExceeded", "{r}");
    assert_eq!(build_row(&db, &dead)[0], "failed");
    let next = new_build(&db, 4);
    let r = build_call(&redis, &q, 4, &next, json!({}));
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(
        r["result"]["status"], "completed",
        "not coalesced into the dead build: {r}"
    );
    let row = build_row(&db, &next);
    assert_eq!(
        (row[0].as_str(), row[8].as_str()),
        ("completed", ""),
        "{row:?}"
    );
}

/// All of the user's stored chunks, as the search CLI lists them.
fn chunks_of(db: &PgDb, env: &[(&str, &str)], user: i64) -> Vec<Value> {
    let out = db.cli_env(
        &[
            "search",
            "--user",
            &user.to_string(),
            "--top-k",
            "100000",
            "--json",
            "anything",
        ],
        env,
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn incremental_rebuilds_follow_edits_and_deletions_and_embed_only_what_changed() {
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let api = OpenAiDouble::start();
    let data = tempfile::tempdir().unwrap();
    let data = data.path().to_str().unwrap().to_string();
    let mut env: Vec<(&str, String)> = api.embedder_env();
    env.push(("ORBIT_DATA_DIR", data.clone()));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let build = || -> Value {
        serde_json::from_str(&db.cli_env(&["build", "--user", "1", "--json"], &env_ref)).unwrap()
    };
    let first = build();
    let total = first["chunks"].as_u64().unwrap();
    assert_eq!(first["chunks_embedded"].as_u64(), Some(total));
    assert_eq!(api.embedded().len() as u64, total);

    // Nothing changed: nothing is embedded again.
    let same = build();
    assert_eq!(same["chunks_reused"].as_u64(), Some(total));
    assert_eq!(api.embedded().len() as u64, total);

    // An edited message changes its chunk.
    let edited = db
        .sql("SELECT id FROM messaging_message WHERE content LIKE '%sardine-harbour-42%' LIMIT 1");
    db.sql(&format!("UPDATE messaging_message SET content = 'The wifi password for the Lisbon office is now octopus-tide-77.', edited_at = now() WHERE id = {edited}"));
    let r = build();
    assert!(r["chunks_embedded"].as_u64().unwrap() >= 1);
    let sid = format!("message:{edited}");
    let chunks = chunks_of(&db, &env_ref, 1);
    let holder = chunks
        .iter()
        .find(|c| {
            c["source_ids"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == &json!(sid))
        })
        .expect("edited message still in memory");
    assert!(
        holder["text"].as_str().unwrap().contains("octopus-tide-77"),
        "{holder}"
    );
    assert!(!chunks
        .iter()
        .any(|c| c["text"].as_str().unwrap().contains("sardine-harbour-42")));

    // A deleted message disappears.
    db.sql(&format!(
        "UPDATE messaging_message SET is_deleted = TRUE WHERE id = {edited}"
    ));
    build();
    let chunks = chunks_of(&db, &env_ref, 1);
    assert!(!chunks.iter().any(|c| c["source_ids"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == &json!(sid))));
    assert!(!chunks
        .iter()
        .any(|c| c["text"].as_str().unwrap().contains("octopus-tide-77")));

    // One new message (in a conversation of its own) re-embeds exactly its chunk.
    let before = api.embedded().len();
    let conv = db.sql("INSERT INTO messaging_conversation (title) VALUES ('new') RETURNING id");
    db.sql(&format!("INSERT INTO messaging_conversation_participants (conversation_id, user_id) VALUES ({conv}, 1)"));
    db.sql(&format!("INSERT INTO messaging_message (conversation_id, sender_id, content) VALUES ({conv}, 1, 'Parking spot for the offsite is P3-117.')"));
    let r = build();
    assert_eq!(r["chunks_embedded"].as_u64(), Some(1), "{r}");
    assert_eq!(
        r["chunks_reused"].as_u64(),
        Some(r["chunks"].as_u64().unwrap() - 1)
    );
    let new: Vec<String> = api.embedded()[before..].to_vec();
    assert_eq!(new.len(), 1, "embedder calls for one new message: {new:?}");
    assert!(new[0].contains("P3-117"));
}

/// Two users whose memories share words; each fact in a conversation of its own.
fn shared_words_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let lines = [
        json!({"user_id": 101, "kind": "message", "source_id": "a1", "conversation_id": "c-a1", "text": "The wifi password for the Lisbon office is sardine-harbour-42.", "created_at": "2026-01-05T08:00:00Z"}),
        json!({"user_id": 101, "kind": "message", "source_id": "a2", "conversation_id": "c-a2", "text": "Dentist appointment moved to Tuesday at 9:30.", "created_at": "2026-01-06T08:00:00Z"}),
        json!({"user_id": 101, "kind": "note", "source_id": "a3", "text": "Pickles the cat takes thyroid pills every morning.", "created_at": "2026-01-07T08:00:00Z"}),
        json!({"user_id": 102, "kind": "message", "source_id": "b1", "conversation_id": "c-b1", "text": "The wifi password for the Porto office is mackerel-bay-7.", "created_at": "2026-01-05T08:00:00Z"}),
        json!({"user_id": 102, "kind": "message", "source_id": "b2", "conversation_id": "c-b2", "text": "The office wifi password changes every month, ask IT for the password.", "created_at": "2026-01-06T08:00:00Z"}),
        json!({"user_id": 103, "kind": "message", "source_id": "c1", "conversation_id": "c-c1", "text": "hello", "created_at": "2026-01-06T08:00:00Z"}),
    ];
    let p = dir.join("shared.jsonl");
    std::fs::write(
        &p,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    p
}

#[test]
fn generate_answer_through_the_queue_cites_only_the_askers_rows_and_caches_for_django() {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::seeded(&shared_words_corpus(dir.path()));
    let redis = RedisServer::start(false);
    let api = OpenAiDouble::start();
    let data = dir.path().join("vectors");
    let data = data.to_str().unwrap().to_string();
    let q = unique_queue("ask");
    let qc = unique_queue("askchat");
    let _plain = worker(&redis, &db, &q, &[], &[("ORBIT_DATA_DIR", data.clone())]);
    let _chat = worker(
        &redis,
        &db,
        &qc,
        &[],
        &[
            ("ORBIT_DATA_DIR", data.clone()),
            ("ORBIT_CHAT_MODEL", CHAT_MODEL.into()),
            ("ORBIT_CHAT_BASE_URL", api.base_url.clone()),
            ("OPENAI_API_KEY", API_KEY.into()),
        ],
    );
    for u in [101, 102] {
        let r = call(
            &redis,
            &q,
            "orbitpilot.build_memory",
            json!([u]),
            json!({}),
            json!({}),
        );
        assert_eq!(r["state"], "SUCCESS", "{r}");
    }
    let rows = |user: i64| -> HashSet<String> {
        db.sql(&format!(
            "SELECT 'message:' || m.id FROM messaging_message m JOIN messaging_conversation_participants p \
             ON p.conversation_id = m.conversation_id WHERE p.user_id = {user} \
             UNION SELECT 'note:' || id FROM orbitpilot_note WHERE user_id = {user}"
        ))
        .lines()
        .map(str::to_string)
        .collect()
    };
    let (mine, theirs) = (rows(101), rows(102));
    let lisbon =
        db.sql("SELECT 'message:' || id FROM messaging_message WHERE content LIKE '%sardine%'");

    // Extractive: no model configured.
    let question = "What is the wifi password for the office?";
    let r = call(
        &redis,
        &q,
        "orbitpilot.generate_answer",
        json!([101, question]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let a = &r["result"];
    assert_eq!(a["mode"], "extractive");
    assert!(
        a["answer"]
            .as_str()
            .unwrap()
            .starts_with("Extractive answer"),
        "{a}"
    );
    assert!(a["model"].is_null());
    let cites = a["citations"].as_array().unwrap();
    assert_eq!(cites[0]["source_ids"], json!([lisbon]), "{a}");
    assert_eq!(cites[0]["kind"], "message");
    assert!(cites[0]["snippet"]
        .as_str()
        .unwrap()
        .contains("sardine-harbour-42"));
    for c in cites {
        for s in c["source_ids"].as_array().unwrap() {
            let s = s.as_str().unwrap();
            assert!(
                mine.contains(s) && !theirs.contains(s),
                "{s} is not user 101's"
            );
        }
    }
    assert!(
        !a.to_string().contains("mackerel"),
        "user 102's memory leaked: {a}"
    );
    // The Ask page's cache key, read by Django, holds the same JSON as the Celery result.
    let key = format!("op_ask:{}", r["id"].as_str().unwrap());
    assert_eq!(
        django_cache(&redis, json!([{"op": "get", "key": key}]))[0],
        r["result"]
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!(":1:{key}"))
        .query(&mut redis.con())
        .unwrap();
    assert!((3500..=3600).contains(&ttl), "ttl {ttl}");

    // Generative: a chat model behind the double; a usage row and a dropped usage cache.
    let usage_key = format!("usage:101:{}", month());
    django_cache(
        &redis,
        json!([{"op": "set", "key": usage_key, "value": {"total_tokens": 1}, "timeout": 300}]),
    );
    let r = call(
        &redis,
        &qc,
        "orbitpilot.generate_answer",
        json!([101, question]),
        json!({"top_k": 3}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let a = &r["result"];
    assert_eq!(a["mode"], "generative", "{a}");
    assert_eq!(a["model"], format!("{CHAT_MODEL}-2024-07-18"));
    assert_eq!(a["answer"], "From your memory: see [1].");
    assert_eq!(a["citations"].as_array().unwrap().len(), 3);
    assert_eq!(a["citations"][0]["n"], 1);
    assert_eq!(a["citations"][0]["source_ids"], json!([lisbon]));
    assert!(a["usage"]["total_tokens"].as_i64().unwrap() > 9);
    assert!(a["usage"]["cost_usd"].as_f64().unwrap() > 0.0);
    let sent = api.chats();
    let prompt = sent.last().unwrap()["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        prompt.contains("[1] (message, 2026-01-05) The wifi password for the Lisbon office"),
        "{prompt}"
    );
    assert!(
        !prompt.contains("mackerel"),
        "another user's memory reached the model"
    );
    assert_eq!(sent.last().unwrap()["model"], CHAT_MODEL);
    let usage = db.sql("SELECT user_id, feature, model, prompt_tokens, completion_tokens, total_tokens, cost_usd > 0, task_id FROM orbitpilot_aiusagelog");
    let cols: Vec<&str> = usage.split('|').collect();
    assert_eq!(
        &cols[..3],
        &["101", "orbitpilot_answer", "gpt-4o-mini-2024-07-18"],
        "{usage}"
    );
    assert_eq!(cols[5], a["usage"]["total_tokens"].to_string());
    assert_eq!(cols[6], "t");
    assert_eq!(cols[7], r["id"].as_str().unwrap());
    assert_eq!(
        django_cache(&redis, json!([{"op": "has", "key": usage_key}])),
        json!([false])
    );
    assert_eq!(
        django_cache(
            &redis,
            json!([{"op": "get", "key": format!("op_ask:{}", r["id"].as_str().unwrap())}])
        )[0],
        r["result"]
    );

    let ask = |q: &str| {
        call(
            &redis,
            q,
            "orbitpilot.generate_answer",
            json!([101, question]),
            json!({}),
            json!({}),
        )
    };
    // The chat API failing: a 5xx is retried inside the call; a malformed body fails clearly.
    api.script_chat(vec![
        Reply::Status(503, vec![], "upstream down".into()),
        Reply::Ok,
    ]);
    let r = ask(&qc);
    assert_eq!(r["state"], "SUCCESS", "{r}");
    // A storm: the call layer's three attempts, then "gave up"; the task does not retry it.
    let before = api.chats().len();
    api.script_chat(vec![Reply::Status(503, vec![], "upstream down".into()); 5]);
    let r = ask(&qc);
    assert_eq!(r["state"], "FAILURE", "{r}");
    assert!(
        r["raised"]["str"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{r}"
    );
    assert_eq!(api.chats().len() - before, 3, "retried in one layer only");
    api.clear_chat();
    api.script_chat(vec![Reply::Body("<html>gateway</html>".into())]);
    let r = ask(&qc);
    assert_eq!(r["raised"]["type"], "AnswerError", "{r}");
    assert!(
        r["raised"]["str"].as_str().unwrap().contains("malformed"),
        "{r}"
    );

    // `orbit-worker ask` runs the same answer in process.
    let out = db.cli_env(
        &["ask", "--user", "101", "--json", question],
        &[("ORBIT_DATA_DIR", &data)],
    );
    let a: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a["mode"], "extractive");
    assert_eq!(a["citations"][0]["source_ids"], json!([lisbon]));
    let text = db.cli_env(
        &["ask", "--user", "101", question],
        &[("ORBIT_DATA_DIR", &data)],
    );
    assert!(
        text.contains("[1] The wifi password for the Lisbon office"),
        "{text}"
    );

    // Bad input: clear failures or a clear answer, never a crash.
    let ask = |args: Value, kwargs: Value| {
        call(
            &redis,
            &q,
            "orbitpilot.generate_answer",
            args,
            kwargs,
            json!({}),
        )
    };
    let r = ask(json!([999999, question]), json!({}));
    assert_eq!(
        (r["state"].as_str(), r["raised"]["type"].as_str()),
        (Some("FAILURE"), Some("UserNotFound")),
        "{r}"
    );
    assert!(r["raised"]["str"]
        .as_str()
        .unwrap()
        .contains("user 999999 does not exist"));
    let r = ask(json!([101, "   "]), json!({}));
    assert_eq!(r["raised"]["type"], "ValueError", "{r}");
    assert!(r["raised"]["str"].as_str().unwrap().contains("empty"));
    let long = "budget ".repeat(9000);
    let r = ask(json!([101, long]), json!({}));
    assert_eq!(r["raised"]["type"], "ValueError", "{r}");
    assert!(
        r["raised"]["str"]
            .as_str()
            .unwrap()
            .contains("at most 8192"),
        "{r}"
    );
    let r = ask(json!([101, question]), json!({"top_k": 0}));
    assert_eq!(r["raised"]["type"], "ValueError", "{r}");
    let r = ask(json!([103, question]), json!({}));
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert!(
        r["result"]["answer"]
            .as_str()
            .unwrap()
            .contains("no memory"),
        "{r}"
    );
    assert_eq!(r["result"]["citations"], json!([]));
    let r = ask(json!(["abc"]), json!({}));
    assert_eq!(r["raised"]["type"], "TypeError", "{r}");
    let r = call(
        &redis,
        &q,
        "orbitpilot.build_memory",
        json!([999999]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["raised"]["type"], "UserNotFound", "{r}");
}

#[test]
fn healthz_names_the_failing_part() {
    let redis = RedisServer::start(false);
    let q = unique_queue("health");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dead = format!("postgres://postgres@127.0.0.1:{}/nothing", free_port());
    let _w = WorkerProc::start_env(
        &redis,
        &["-Q", &q, "--http", &addr],
        &[("DATABASE_URL", &dead)],
    );
    let (code, body) = http_get(&addr, "/healthz", None);
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["failing"], json!(["postgres"]), "{v}");
    // Without a configured token the status endpoints refuse everyone.
    assert_eq!(
        http_get(&addr, "/orbitpilot/build/status/?user_id=1", Some("")).0,
        401
    );
}

/// A warm shutdown that abandons a running build (the embedding API stalls past the grace
/// period): the worker itself writes the record final, failed with the reason, before it exits,
/// and the message goes back to its queue for the next worker.
#[test]
fn a_warm_shutdown_that_abandons_a_build_leaves_its_record_final() {
    let redis = RedisServer::start(false);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let api = OpenAiDouble::start();
    let q = unique_queue("buildstop");
    let mut env = api.embedder_env();
    env.push(("ORBIT_EMBED_IN_FLIGHT", "1".into()));
    let mut w = worker(&redis, &db, &q, &["--shutdown-grace", "1"], &env);
    api.script_embeddings(vec![Reply::Stall]);
    let id = new_build(&db, 1);
    let task = send(
        &redis,
        &q,
        json!([{"name": "orbitpilot.build_memory", "args": [1, id.parse::<i64>().unwrap()]}]),
    )[0]
    .clone();
    wait_for("the build to run", Duration::from_secs(60), || {
        (build_row(&db, &id)[0] == "running" && api.embedding_requests() > 0).then_some(())
    });
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0), "{}", w.log());
    // Read only after the process is gone: the write landed before it exited.
    let row = build_row(&db, &id);
    assert_eq!(row[0], "failed", "{row:?}");
    assert!(row[5].contains("worker shut down"), "{row:?}");
    assert_eq!(row[7], "t", "finished_at");
    assert!(w.log().contains("abandoned at shutdown"), "{}", w.log());
    assert!(
        meta(&redis, &task).is_none(),
        "no result: the task runs again"
    );
    assert_eq!(unacked_len(&redis), 0, "given back, not left in unacked");
    assert_eq!(list(&redis, &q).len(), 1, "back on its queue");
}

/// The HTTP face's limits: a connection that sends nothing, one that sends half a head, and a
/// kept-alive one idle after its answer are each closed after the header timeout; an oversized
/// head is refused; and past the connection cap the next connection waits until one closes.
#[test]
fn the_http_face_closes_idle_and_half_sent_connections_and_caps_them() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let redis = RedisServer::start(false);
    let q = unique_queue("httplimits");
    let addr = format!("127.0.0.1:{}", free_port());
    let _w = crate::celery_harness::WorkerProc::start_env(
        &redis,
        &["-Q", &q, "--http", &addr],
        &[
            // Long enough that the cap check below (half a second) ends before the held
            // connections time out, even on a loaded machine.
            ("ORBIT_HTTP_HEADER_TIMEOUT", "3"),
            ("ORBIT_HTTP_MAX_CONNECTIONS", "3"),
        ],
    );
    assert_eq!(http_get(&addr, "/healthz", None).0, 200);
    // Closed: the read ends (EOF or reset) long before the client's own 15 s limit.
    let closed_by_server = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    let silent = TcpStream::connect(&addr).unwrap();
    assert!(closed_by_server(silent), "a silent connection stayed open");
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    assert!(closed_by_server(half), "a half-sent head stayed open");
    let mut kept = TcpStream::connect(&addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        closed_by_server(kept),
        "an idle kept-alive connection stayed open"
    );
    // A 64 KiB header: refused, not buffered.
    let mut big = TcpStream::connect(&addr).unwrap();
    let filler = "a".repeat(64 * 1024);
    let _ = write!(
        big,
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n"
    );
    big.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:.80}"
    );

    // The cap: three held connections, each with half a head; the fourth waits for a slot.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut next = TcpStream::connect(&addr).unwrap();
    next.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    next.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let early = next.read(&mut b);
    assert!(
        early.is_err(),
        "a fourth connection was served while three were open: {early:?}"
    );
    // The held ones time out and free their slots: the waiting one is served.
    next.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut answer = String::new();
    next.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.80}");
    drop(held);
}
