//! The worker against real Redis and the real Python Celery 5.7 client and worker: every promise
//! of the Celery setup, each on a redis-server of the test's own.

use std::time::Duration;

use serde_json::{json, Value};

use crate::celery_harness::*;
use crate::helpers::fixture;

const Q: &[&str] = &["-Q"];

fn args<'a>(queue: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = Q.to_vec();
    v.push(queue);
    v.extend_from_slice(extra);
    v
}

#[test]
fn python_send_task_reaches_the_worker_and_get_returns_the_value() {
    let redis = RedisServer::start(false);
    let q = unique_queue("echo");
    let w = WorkerProc::start(&redis, &args(&q, &[]));
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!([1, "two", {"x": [3]}]),
        json!({"k": "é✓"}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(
        r["result"],
        json!({"args": [1, "two", {"x": [3]}], "kwargs": {"k": "é✓"}})
    );
    let id = r["id"].as_str().unwrap();
    // Info lines reach the log within 100 ms (the worker buffers them).
    w.wait_log("received line", &format!("Task orbit.echo[{id}] received"));
    w.wait_log(
        "success line",
        &format!("Task orbit.echo[{id}] succeeded in "),
    );
    // Acked after the result: nothing left in flight, and the record expires like Celery's.
    wait_for("ack", Duration::from_secs(5), || {
        (unacked_len(&redis) == 0).then_some(())
    });
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut redis.con())
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    // A priority message lives on its own list (`q\x06\x169`) and is served too.
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!(["urgent"]),
        json!({}),
        json!({"priority": 9}),
    );
    assert_eq!(r["result"]["args"], json!(["urgent"]), "{r}");
}

#[test]
fn one_worker_serves_several_queues() {
    let redis = RedisServer::start(false);
    let (a, b) = (unique_queue("qa"), unique_queue("qb"));
    let both = format!("{a},{b}");
    let _w = WorkerProc::start(&redis, &["-Q", &both]);
    for q in [&a, &b] {
        let r = call(
            &redis,
            q,
            "orbit.echo",
            json!([q]),
            json!({}),
            json!({"queue": q}),
        );
        assert_eq!(r["result"]["args"], json!([q]), "{r}");
    }
}

#[test]
fn results_go_to_celery_result_backend_when_it_is_elsewhere() {
    let redis = RedisServer::start(false);
    let q = unique_queue("backend");
    let backend = format!("redis://127.0.0.1:{}/3", redis.port);
    let _w = WorkerProc::start_env(
        &redis,
        &args(&q, &[]),
        &[("CELERY_RESULT_BACKEND", &backend)],
    );
    let task = json!({"name": "orbit.echo", "args": ["db3"]});
    let r = celery_client_env(
        &redis,
        &q,
        &[("BACKEND", &backend)],
        json!({"op": "call", "timeout": 30, "tasks": [task]}),
    );
    assert_eq!(r[0]["result"]["args"], json!(["db3"]), "{r}");
    let id = r[0]["id"].as_str().unwrap();
    assert!(meta(&redis, id).is_none(), "nothing in the broker's db");
    let mut con = redis::Client::open(backend.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let stored: Option<String> = redis::cmd("GET")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut con)
        .unwrap();
    assert!(stored
        .unwrap()
        .starts_with("{\"status\": \"SUCCESS\", \"result\": "));
    wait_for("ack", Duration::from_secs(5), || {
        (unacked_len(&redis) == 0).then_some(())
    });
}

#[test]
fn build_memory_through_the_queue_builds_a_fixture_user() {
    let redis = RedisServer::start(false);
    let q = unique_queue("build");
    let source = fixture("sample.jsonl");
    let _w = WorkerProc::start_env(
        &redis,
        &args(&q, &[]),
        &[("ORBIT_SOURCE", source.to_str().unwrap())],
    );
    let r = call(
        &redis,
        &q,
        "orbitpilot.build_memory",
        json!([1]),
        json!({"build_id": 5}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let report = &r["result"];
    assert_eq!(report["scope"], "user 1", "{report}");
    assert!(report["chunks"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["chunks"], report["vectors_upserted"], "{report}");
    // Bad arguments fail as Python would, without a retry.
    let r = call(
        &redis,
        &q,
        "orbitpilot.build_memory",
        json!(["not a user"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["raised"]["type"], "TypeError", "{r}");
}

#[test]
fn a_task_error_raises_that_exception_from_get() {
    let redis = RedisServer::start(false);
    let q = unique_queue("fail");
    let w = WorkerProc::start(&redis, &args(&q, &[]));
    let r = call(
        &redis,
        &q,
        "orbit.debug.fail",
        json!(["ValueError", "bad input"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "FAILURE");
    assert_eq!(
        r["raised"],
        json!({"module": "builtins", "type": "ValueError", "args": ["bad input"], "str": "bad input"})
    );
    let r = call(
        &redis,
        &q,
        "orbit.debug.fail",
        json!(["MemoryBuildError", "store is gone"]),
        json!({"exc_module": "orbitpilot.errors"}),
        json!({}),
    );
    assert_eq!(r["raised"]["type"], "MemoryBuildError", "{r}");
    assert_eq!(r["raised"]["args"], json!(["store is gone"]), "{r}");
    let id = r["id"].as_str().unwrap();
    let m = meta(&redis, id).unwrap();
    assert!(
        m["traceback"]
            .as_str()
            .unwrap()
            .contains("MemoryBuildError: store is gone"),
        "{m}"
    );
    assert!(w.log().contains(&format!(
        "Task orbit.debug.fail[{id}] raised unexpected: MemoryBuildError('store is gone')"
    )));
}

#[test]
fn a_stored_success_is_never_overwritten() {
    let redis = RedisServer::start(false);
    let q = unique_queue("keep");
    let w = WorkerProc::start(&redis, &args(&q, &[]));
    let id = uuid::Uuid::new_v4().to_string();
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!(["first"]),
        json!({}),
        json!({"task_id": id}),
    );
    assert_eq!(r["state"], "SUCCESS");
    // The same id again, failing this time (a duplicate delivery of a task that did succeed).
    send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.fail", "args": ["ValueError", "late"], "options": {"task_id": id}}]),
    );
    w.wait_log(
        "the duplicate to run",
        "raised unexpected: ValueError('late')",
    );
    wait_for("ack", Duration::from_secs(5), || {
        (unacked_len(&redis) == 0).then_some(())
    });
    let m = meta(&redis, &id).unwrap();
    assert_eq!(m["status"], "SUCCESS", "{m}");
    assert_eq!(m["result"]["args"], json!(["first"]));
}

#[test]
fn a_retry_with_countdown_shows_retry_then_success_after_the_eta() {
    let redis = RedisServer::start(false);
    let q = unique_queue("retry");
    let w = WorkerProc::start(&redis, &args(&q, &[]));
    // The retry is published after the send, so the second attempt cannot end before this + 2 s.
    let sent = chrono::Utc::now();
    let id = send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.flaky", "args": [1], "kwargs": {"countdown": 2}}]),
    )[0]
    .clone();
    let retry = wait_meta(&redis, &id, "RETRY", Duration::from_secs(20));
    assert_eq!(retry["children"], json!([[[id, null], null]]), "{retry}");
    assert_eq!(retry["result"]["exc_type"], "KeyError");
    let done = wait_meta(&redis, &id, "SUCCESS", Duration::from_secs(20));
    let done_at =
        chrono::DateTime::parse_from_rfc3339(done["date_done"].as_str().unwrap()).unwrap();
    assert!(
        done_at.with_timezone(&chrono::Utc) - sent >= chrono::Duration::seconds(2),
        "ran before its ETA: sent {sent}, done {done_at}"
    );
    assert_eq!(done["result"], json!({"retries": 1}));
    assert_eq!(
        done["parent_id"],
        json!(id),
        "a retry is its own parent, as in Celery"
    );
    w.wait_log(
        "retry line",
        &format!("Task orbit.debug.flaky[{id}] retry: Retry in 2s: KeyError('flaky attempt 0')"),
    );
    // And get() in a new client process sees the final value.
    let r = celery_client(&redis, &q, json!({"op": "get", "ids": [id], "timeout": 10}));
    assert_eq!(r[0]["result"], json!({"retries": 1}));
    // Past max_retries, the original error is the FAILURE.
    let id = send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.flaky", "args": [10], "kwargs": {"countdown": 0.1}}]),
    )[0]
    .clone();
    let failed = wait_meta(&redis, &id, "FAILURE", Duration::from_secs(20));
    assert_eq!(
        failed["result"]["exc_message"],
        json!(["flaky attempt 3"]),
        "{failed}"
    );
}

#[test]
fn an_expired_task_is_revoked_and_an_eta_task_waits_without_blocking_others() {
    let redis = RedisServer::start(false);
    let q = unique_queue("expire");
    // Expired before any worker sees it.
    let stale = send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": [1], "options": {"expires": 0.5}}]),
    )[0]
    .clone();
    std::thread::sleep(Duration::from_millis(800));
    let w = WorkerProc::start(&redis, &args(&q, &["-c", "1"]));
    let m = wait_meta(&redis, &stale, "REVOKED", Duration::from_secs(10));
    assert_eq!(m["result"]["exc_type"], "TaskRevokedError");
    assert_eq!(m["result"]["exc_message"], json!(["expired"]));
    let r = celery_client(
        &redis,
        &q,
        json!({"op": "get", "ids": [stale], "timeout": 5}),
    );
    assert_eq!(r[0]["raised"]["type"], "TaskRevokedError", "{r}");
    // Expires while held for its ETA: checked again when the ETA comes.
    let late = send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": [2], "options": {"countdown": 1.5, "expires": 0.5}}]),
    )[0]
    .clone();
    // An ETA task is held in unacked while the worker (concurrency 1) serves the rest.
    let eta = send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": [3], "options": {"countdown": 5}}]),
    )[0]
    .clone();
    let now = send(&redis, &q, json!([{"name": "orbit.echo", "args": [4]}]))[0].clone();
    wait_meta(&redis, &now, "SUCCESS", Duration::from_secs(10));
    assert!(meta(&redis, &eta).is_none(), "the ETA task ran early");
    assert!(
        unacked_len(&redis) >= 1,
        "the ETA task must stay registered in unacked"
    );
    wait_meta(&redis, &late, "REVOKED", Duration::from_secs(10));
    wait_meta(&redis, &eta, "SUCCESS", Duration::from_secs(10));
    assert!(w.log().contains("Discarding revoked task"));
}

#[test]
fn unregistered_names_fail_and_garbage_lands_in_the_dead_letter_list() {
    let redis = RedisServer::start(false);
    let q = unique_queue("bad");
    let w = WorkerProc::start(&redis, &args(&q, &[]));
    let r = call(
        &redis,
        &q,
        "does.not.exist",
        json!([1]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "FAILURE");
    assert_eq!(r["raised"]["type"], "NotRegistered", "{r}");
    let log = w.log();
    assert_eq!(
        log.matches("Received unregistered task of type 'does.not.exist'.")
            .count(),
        1,
        "{log}"
    );
    // Garbage of every kind: not JSON, JSON without a tag, a task whose body is not base64.
    let mut con = redis.con();
    let bad_body = r#"{"body": "%%%", "content-type": "application/json", "content-encoding": "utf-8", "headers": {"task": "orbit.echo", "id": "bad-body-1"}, "properties": {"delivery_tag": "tag-bad-1", "body_encoding": "base64"}}"#;
    // And envelopes with one wrong-typed field or a duplicated key (issue 13, defect 2: these
    // lost their delivery tag with the failed decode, were never acked, and came back forever).
    let typed = |i: usize, field: &str| {
        format!(
            r#"{{"body": "W1tdLHt9LHt9XQ==", "content-type": "application/json", "headers": {{"task": "orbit.echo", "id": "bad-typed-{i}"{field}}}, "properties": {{"delivery_tag": "tag-typed-{i}", "body_encoding": "base64"}}}}"#
        )
    };
    let wrong_typed = [
        typed(0, r#", "retries": -1"#),
        typed(1, r#", "timelimit": ["x", null]"#),
        typed(2, r#", "task": "orbit.echo""#),
    ];
    for g in ["\u{0}\u{1}not json at all", "{\"hello\": 1}", bad_body]
        .into_iter()
        .chain(wrong_typed.iter().map(String::as_str))
    {
        let _: i64 = redis::cmd("LPUSH").arg(&q).arg(g).query(&mut con).unwrap();
    }
    let dead = wait_for("6 dead letters", Duration::from_secs(10), || {
        let d = list(&redis, "orbit.dead");
        (d.len() == 6).then_some(d)
    });
    for d in &dead {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(!v["reason"].as_str().unwrap().is_empty(), "{v}");
        assert_eq!(v["queue"], json!(q));
    }
    assert!(dead.iter().any(|d| d.contains("base64")), "{dead:?}");
    // The readable id gets an answer instead of a wait; nothing stays in flight.
    assert_eq!(
        meta(&redis, "bad-body-1").unwrap()["result"]["exc_type"],
        "DecodeError"
    );
    for i in 0..wrong_typed.len() {
        assert_eq!(
            meta(&redis, &format!("bad-typed-{i}")).unwrap()["result"]["exc_type"],
            "DecodeError"
        );
    }
    wait_for("acks", Duration::from_secs(5), || {
        (unacked_len(&redis) == 0).then_some(())
    });
    // And the worker keeps serving.
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!(["still here"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS");
}

/// Issue 13, limits: a message or argument list past its limit is answered with
/// MessageTooLarge and acked, its dead letter keeps a bounded head of it with its size, and
/// `orbit.dead` keeps only its newest entries.
#[test]
fn oversized_messages_are_answered_and_orbit_dead_stays_bounded() {
    let redis = RedisServer::start(false);
    let q = unique_queue("big");
    let w = WorkerProc::start_env(
        &redis,
        &args(&q, &[]),
        &[
            ("ORBIT_MAX_MESSAGE_BYTES", "200000"),
            ("ORBIT_MAX_ARGUMENT_BYTES", "50000"),
            ("ORBIT_DEAD_LETTER_MAX", "3"),
            ("ORBIT_DEAD_LETTER_MAX_BYTES", "4096"),
        ],
    );
    let tasks: Vec<Value> = [60_000usize, 300_000, 70_000, 400_000, 80_000]
        .iter()
        .map(|n| json!({"name": "orbit.echo", "args": ["x".repeat(*n)]}))
        .collect();
    let ids = send(&redis, &q, json!(tasks));
    let r = celery_client(&redis, &q, json!({"op": "get", "ids": ids, "timeout": 30}));
    for (i, r) in r.as_array().unwrap().iter().enumerate() {
        assert_eq!(r["state"], "FAILURE", "{i}: {r:.300}");
        assert_eq!(r["raised"]["type"], "MessageTooLarge", "{i}: {r:.300}");
        let what = if i % 2 == 1 {
            "the message"
        } else {
            "the arguments"
        };
        assert!(
            r["raised"]["str"].as_str().unwrap().contains(what),
            "{i}: {r:.300}"
        );
    }
    let dead = list(&redis, "orbit.dead");
    assert_eq!(dead.len(), 3, "trimmed to ORBIT_DEAD_LETTER_MAX");
    for d in &dead {
        assert!(d.len() < 5000, "{} bytes", d.len());
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["truncated"], true, "{v:.200}");
        assert!(v["raw_bytes"].as_u64().unwrap() > 60_000, "{v:.200}");
        assert!(v["reason"].as_str().unwrap().contains("limit"), "{v:.200}");
    }
    wait_for("acks", Duration::from_secs(5), || {
        (unacked_len(&redis) == 0).then_some(())
    });
    let ok = call(
        &redis,
        &q,
        "orbit.echo",
        json!(["fits"]),
        json!({}),
        json!({}),
    );
    assert_eq!(ok["state"], "SUCCESS", "{ok}");
    drop(w);
}

#[test]
fn soft_and_hard_time_limits() {
    let redis = RedisServer::start(false);
    let q = unique_queue("limits");
    let w = WorkerProc::start(&redis, &args(&q, &["-c", "1"]));
    // Soft: the task sees its cancellation and returns normally.
    let r = call(
        &redis,
        &q,
        "orbit.debug.sleep",
        json!([30]),
        json!({}),
        json!({"soft_time_limit": 0.5, "time_limit": 10}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(r["result"]["cancelled"], true, "{r}");
    assert!(r["result"]["slept"].as_f64().unwrap() < 5.0);
    // Hard: a task that ignores cancellation is abandoned with TimeLimitExceeded...
    let r = call(
        &redis,
        &q,
        "orbit.debug.sleep",
        json!([30]),
        json!({"ignore_cancel": true}),
        json!({"soft_time_limit": 0.5, "time_limit": 1}),
    );
    assert_eq!(r["state"], "FAILURE");
    assert_eq!(r["raised"]["type"], "TimeLimitExceeded", "{r}");
    assert_eq!(r["raised"]["args"], json!([1]));
    assert!(w
        .log()
        .contains("Hard time limit (1s) exceeded for orbit.debug.sleep["));
    // ...and the next task runs on the freed slot.
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!(["next"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS");
}

/// Issue 13, defect 3: one delivery tag that is not UTF-8 disabled crash recovery for the whole
/// queue (every restore sweep failed reading it), and such a message was run but never acked.
#[test]
fn a_delivery_tag_that_is_not_utf8_never_stops_crash_recovery() {
    let redis = RedisServer::start(false);
    let q = unique_queue("utf8");
    let mut con = redis.con();
    // A dead worker's message, left in unacked long ago under its own tag.
    let id = send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": ["back"]}]),
    )[0]
    .clone();
    let raw: Vec<u8> = redis::cmd("RPOP").arg(&q).query(&mut con).unwrap();
    let env: Value = serde_json::from_slice(&raw).unwrap();
    let tag = env["properties"]["delivery_tag"]
        .as_str()
        .unwrap()
        .to_string();
    let mut entry = b"[".to_vec();
    entry.extend(&raw);
    entry.extend(format!(r#", "", "{q}"]"#).as_bytes());
    let bad_tag: &[u8] = b"tag-\xff\xfe";
    for (t, v) in [
        (tag.as_bytes(), entry.as_slice()),
        (bad_tag, b"[\"\xff\", \"\", \"q\"]".as_slice()),
    ] {
        let _: () = redis::cmd("HSET")
            .arg("unacked")
            .arg(t)
            .arg(v)
            .query(&mut con)
            .unwrap();
        let _: () = redis::cmd("ZADD")
            .arg("unacked_index")
            .arg(1.0)
            .arg(t)
            .query(&mut con)
            .unwrap();
    }
    // And a new message whose tag is not UTF-8, with a readable id.
    let mut msg = br#"{"body": "W1tdLHt9LHt9XQ==", "content-type": "application/json", "headers": {"task": "orbit.echo", "id": "not-utf8-1"}, "properties": {"delivery_tag": "t-"#.to_vec();
    msg.extend(b"\xff");
    msg.extend(br#"", "body_encoding": "base64"}}"#);
    let _: i64 = redis::cmd("LPUSH")
        .arg(&q)
        .arg(msg)
        .query(&mut con)
        .unwrap();

    let _w = WorkerProc::start(&redis, &args(&q, &["--visibility-timeout", "2"]));
    let m = wait_meta(&redis, &id, "SUCCESS", Duration::from_secs(30));
    assert_eq!(
        m["result"]["args"],
        json!(["back"]),
        "the dead worker's message ran"
    );
    assert_eq!(
        meta(&redis, "not-utf8-1").unwrap()["result"]["exc_type"],
        "DecodeError"
    );
    let dead = wait_for("2 dead letters", Duration::from_secs(10), || {
        let d = list(&redis, "orbit.dead");
        (d.len() == 2).then_some(d)
    });
    assert!(dead.iter().any(|d| d.contains("not UTF-8")), "{dead:?}");
    wait_for("nothing left in unacked", Duration::from_secs(10), || {
        (unacked_len(&redis) == 0).then_some(())
    });
}

#[test]
fn a_worker_killed_mid_task_is_restored_by_the_next_and_the_result_stored_once() {
    let redis = RedisServer::start(false);
    let q = unique_queue("kill");
    let mut w = WorkerProc::start(&redis, &args(&q, &["--visibility-timeout", "2"]));
    let id = send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.sleep", "args": [3]}]),
    )[0]
    .clone();
    w.wait_log(
        "the task to start",
        &format!("orbit.debug.sleep[{id}] received"),
    );
    w.kill9();
    assert_eq!(
        unacked_len(&redis),
        1,
        "a killed worker leaves its message in unacked"
    );
    assert!(meta(&redis, &id).is_none());
    let setex_before = redis.calls("setex");
    let w2 = WorkerProc::start(&redis, &args(&q, &["--visibility-timeout", "2"]));
    let m = wait_meta(&redis, &id, "SUCCESS", Duration::from_secs(30));
    assert_eq!(m["result"]["cancelled"], false);
    assert!(
        w2.log().contains("Restoring 1 unacknowledged message(s)"),
        "{}",
        w2.log()
    );
    wait_for("ack", Duration::from_secs(5), || {
        (unacked_len(&redis) == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3)); // one more sweep: nothing may run it again
    assert_eq!(
        redis.calls("setex") - setex_before,
        1,
        "the result is stored once"
    );
    assert_eq!(w2.log().matches("succeeded in").count(), 1);
}

#[test]
fn sigterm_gives_prefetched_messages_back_marked_redelivered() {
    let redis = RedisServer::start(false);
    let q = unique_queue("term");
    let mut w = WorkerProc::start(
        &redis,
        &args(&q, &["-c", "1", "--prefetch-multiplier", "4"]),
    );
    let ids = send(
        &redis,
        &q,
        json!([
            {"name": "orbit.debug.sleep", "args": [1.5]},
            {"name": "orbit.debug.sleep", "args": [1.5]},
            {"name": "orbit.debug.sleep", "args": [1.5]},
            {"name": "orbit.debug.sleep", "args": [1.5]},
        ]),
    );
    wait_for("4 held", Duration::from_secs(10), || {
        (unacked_len(&redis) == 4).then_some(())
    });
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0), "{}", w.log());
    // The running one finished; the other three are back on the queue, redelivered, same tags.
    assert_eq!(
        wait_meta(&redis, &ids[0], "SUCCESS", Duration::from_secs(1))["status"],
        "SUCCESS"
    );
    assert_eq!(unacked_len(&redis), 0);
    let back = list(&redis, &q);
    assert_eq!(back.len(), 3, "{back:?}");
    for raw in &back {
        let v: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(v["headers"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["redelivered"], true);
    }
    // Nothing lost: a new worker finishes them.
    let _w2 = WorkerProc::start(&redis, &args(&q, &["-c", "2"]));
    for id in &ids[1..] {
        wait_meta(&redis, id, "SUCCESS", Duration::from_secs(30));
    }
}

#[test]
fn python_and_rust_workers_share_a_queue_and_restore_each_others_work() {
    let redis = RedisServer::start(false);
    let q = unique_queue("mixed");
    // Ours dies holding a task; a Python worker restores it.
    let mut ours = WorkerProc::start(&redis, &args(&q, &["--visibility-timeout", "1"]));
    let a = send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.sleep", "args": [2]}]),
    )[0]
    .clone();
    ours.wait_log("our worker to take it", &format!("[{a}] received"));
    ours.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let mut py = PyWorker::start(&redis, &q, 2, 1.0);
    let m = wait_meta(&redis, &a, "SUCCESS", Duration::from_secs(60));
    assert_eq!(
        m["result"]["worker"], "python",
        "restored and run by the Python worker: {m}"
    );
    // The Python worker dies holding a task; ours restores it.
    let b = send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.sleep", "args": [2]}]),
    )[0]
    .clone();
    wait_for("python to take it", Duration::from_secs(20), || {
        py.log().contains(&b).then_some(())
    });
    py.kill9();
    assert!(unacked_len(&redis) >= 1);
    std::thread::sleep(Duration::from_millis(1500));
    let ours = WorkerProc::start(&redis, &args(&q, &["--visibility-timeout", "1"]));
    let m = wait_meta(&redis, &b, "SUCCESS", Duration::from_secs(30));
    assert!(
        m["result"].get("worker").is_none(),
        "restored and run by ours: {m}"
    );
    ours.wait_log("the restore line", "Restoring");
    // Both serving one queue, with the usual visibility timeout (a 1 s one would restore the
    // other's prefetched messages): every task completes, once.
    drop(ours);
    let ours = WorkerProc::start(&redis, &args(&q, &[]));
    let py = PyWorker::start(&redis, &q, 2, 3600.0);
    let tasks: Vec<Value> = (0..40)
        .map(|i| json!({"name": "orbit.echo", "args": [i]}))
        .collect();
    let r = celery_client(
        &redis,
        &q,
        json!({"op": "call", "timeout": 60, "tasks": tasks}),
    );
    for (i, x) in r.as_array().unwrap().iter().enumerate() {
        assert_eq!(x["result"]["args"], json!([i]), "{x}");
    }
    // Each task ran once, on one worker or the other (log lines land within a moment).
    let ran = || {
        let py_ran = py.log().matches("succeeded in").count();
        let ours_ran = ours.log().matches("Task orbit.echo[").count() / 2;
        (py_ran, ours_ran)
    };
    wait_for("every run logged", Duration::from_secs(10), || {
        let (p, o) = ran();
        (p + o >= 40).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let (p, o) = ran();
    assert_eq!(p + o, 40, "python {p}, ours {o}");
}

#[test]
fn redis_killed_and_restarted_under_a_running_worker() {
    let mut redis = RedisServer::start(true);
    let q = unique_queue("outage");
    let w = WorkerProc::start(&redis, &args(&q, &["-c", "2"]));
    let tasks: Vec<Value> = (0..20)
        .map(|_| json!({"name": "orbit.debug.sleep", "args": [0.3]}))
        .collect();
    let ids = send(&redis, &q, json!(tasks));
    wait_for("some progress", Duration::from_secs(20), || {
        meta(&redis, &ids[1]).map(|_| ())
    });
    redis.kill();
    std::thread::sleep(Duration::from_secs(3));
    redis.restart();
    for id in &ids {
        wait_meta(&redis, id, "SUCCESS", Duration::from_secs(60));
    }
    wait_for("acks", Duration::from_secs(10), || {
        (unacked_len(&redis) == 0).then_some(())
    });
    assert!(list(&redis, &q).is_empty());
    assert!(
        w.log().contains("cannot reach redis"),
        "the outage must be logged: {}",
        w.log()
    );
}

#[test]
fn json_log_format_carries_task_fields() {
    let redis = RedisServer::start(false);
    let q = unique_queue("json");
    let w = WorkerProc::start(&redis, &args(&q, &["--log-format", "json"]));
    let r = call(&redis, &q, "orbit.echo", json!([1]), json!({}), json!({}));
    let id = r["id"].as_str().unwrap();
    let line = wait_for("the success line", Duration::from_secs(5), || {
        w.log()
            .lines()
            .find(|l| l.contains("succeeded in") && l.contains(id))
            .map(str::to_string)
    });
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["span"]["id"], json!(id), "{v}");
    assert_eq!(v["span"]["task"], "orbit.echo", "{v}");
    assert_eq!(v["level"], "INFO");
}

#[test]
fn the_health_check_fails_while_redis_is_down() {
    let mut redis = RedisServer::start(false);
    let health = |url: &str| {
        std::process::Command::new(worker_bin())
            .arg("health")
            .env("REDIS_URL", url)
            .env_remove("CELERY_BROKER_URL")
            .env_remove("CELERY_RESULT_BACKEND")
            .output()
            .unwrap()
    };
    let url = redis.url();
    let ok = health(&url);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    redis.kill();
    let down = health(&url);
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(err.contains("unhealthy: broker"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_second_signal_is_a_cold_shutdown_that_leaves_work_in_unacked() {
    let redis = RedisServer::start(false);
    let q = unique_queue("cold");
    let mut w = WorkerProc::start(&redis, &args(&q, &["-c", "1"]));
    let id = send(
        &redis,
        &q,
        json!([{"name": "orbit.debug.sleep", "args": [10]}]),
    )[0]
    .clone();
    w.wait_log("the task to start", &format!("[{id}] received"));
    w.signal("TERM");
    w.wait_log("warm shutdown", "Warm shutdown");
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(5)), Some(1), "{}", w.log());
    assert!(w.log().contains("Cold shutdown"), "{}", w.log());
    assert_eq!(
        unacked_len(&redis),
        1,
        "the running task stays in unacked for a restore"
    );
    assert!(meta(&redis, &id).is_none());
}

/// The task lines of one worker's log, as text to compare: the timestamp checked for Celery's
/// shape (`2026-05-23 10:12:33,501`) and replaced, the ids of `ids` named by their index, and a
/// runtime checked for Python's float repr and replaced.
fn task_lines(log: &str, ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with('[') && l.contains("Task orbit."))
        .map(|l| {
            let ts = &l[1..24];
            let shape: String = ts
                .chars()
                .map(|c| if c.is_ascii_digit() { '9' } else { c })
                .collect();
            assert_eq!(shape, "9999-99-99 99:99:99,999", "{l}");
            let mut l = format!("[TS{}", &l[24..]);
            for (i, id) in ids.iter().enumerate() {
                l = l.replace(id.as_str(), &format!("id{i}"));
            }
            if let Some((head, tail)) = l.split_once(" succeeded in ") {
                let (t, rest) = tail.split_once("s: ").expect("a runtime");
                let ok = t.parse::<f64>().is_ok()
                    && t.contains(['.', 'e'])
                    && !t.contains("e-") | t.contains("e-0");
                assert!(ok, "not Python's float repr: {t} in {l}");
                l = format!("{head} succeeded in Ts: {rest}");
            }
            l
        })
        .collect();
    out.sort();
    out
}

#[test]
fn our_task_log_lines_are_the_python_workers_prefix_included() {
    let redis = RedisServer::start(false);
    let (qp, qo) = (unique_queue("logpy"), unique_queue("logrs"));
    let py = PyWorker::start(&redis, &qp, 1, 3600.0);
    let ours = WorkerProc::start(&redis, &args(&qo, &["-c", "1"]));
    let tasks = json!([
        {"name": "orbit.echo", "args": [1, "two"], "kwargs": {"k": [true, null]}},
        {"name": "orbit.debug.fail", "args": ["ValueError", "boom"]},
        {"name": "orbit.debug.flaky", "args": [1, 1]},
    ]);
    let (py_log, our_log) = (|| py.log(), || ours.log());
    let sides: [(&String, &dyn Fn() -> String); 2] = [(&qp, &py_log), (&qo, &our_log)];
    let mut seen = Vec::new();
    for (q, log) in sides {
        let ids = send(&redis, q, tasks.clone());
        wait_meta(&redis, &ids[0], "SUCCESS", Duration::from_secs(30));
        wait_meta(&redis, &ids[1], "FAILURE", Duration::from_secs(30));
        wait_meta(&redis, &ids[2], "SUCCESS", Duration::from_secs(30));
        // Two lines per task, and the retry's three: retry, received again, succeeded.
        let lines = wait_for("every task line", Duration::from_secs(10), || {
            let l = task_lines(&log(), &ids);
            (l.len() >= 8).then_some(l)
        });
        seen.push(lines);
    }
    assert_eq!(seen[1], seen[0], "ours (left) against Python's (right)");
    assert!(
        seen[0].iter().any(|l| l.contains("INFO/ForkPoolWorker-1] Task orbit.echo[id0] succeeded in Ts: {'args': [1, 'two'], 'kwargs': {'k': [True, None]}}")),
        "{:#?}",
        seen[0]
    );
}
