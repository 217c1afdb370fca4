//! Seen by the tools ops already use: Celery's own event receiver and `celery.events.state`
//! (what Flower and `celery events` are built on) follow our worker's events.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::celery_harness::*;
use crate::helpers::{python, repo};

/// Celery's receiver on `redis`, until `worker-offline` (tests/py/events_listen.py).
struct Listener {
    child: std::process::Child,
    /// Kept open: the listener logs there until it ends.
    stderr: BufReader<std::process::ChildStderr>,
}

impl Listener {
    fn start(redis: &RedisServer, queue: &str, stop_on: &str, timeout_s: u32) -> Listener {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/py/events_listen.py"))
            .env("STOP_ON", stop_on)
            .env("TIMEOUT", timeout_s.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        py_env(&mut cmd, redis, queue);
        let mut child = cmd.spawn().expect("python venv (make venv)");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 && !line.contains("listening") {
            line.clear();
        }
        assert!(line.contains("listening"), "the listener did not start");
        Listener { child, stderr: err }
    }

    fn finish(mut self) -> Value {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut err).unwrap();
        let out = self.child.wait_with_output().unwrap();
        assert!(out.status.success(), "listener failed: {err}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

#[test]
fn celerys_event_state_follows_our_workers_tasks_and_heartbeats() {
    let redis = RedisServer::start(false);
    let q = unique_queue("events");
    let listener = Listener::start(&redis, &q, "worker-offline", 90);
    // The receiver subscribes before the worker is up: it sees worker-online.
    std::thread::sleep(Duration::from_millis(500));
    let mut w = WorkerProc::start(&redis, &["-Q", &q, "-E", "-n", "rust1@%h"]);
    let ok = call(
        &redis,
        &q,
        "orbit.echo",
        json!([2, "x"]),
        json!({"k": true}),
        json!({}),
    );
    assert_eq!(ok["state"], "SUCCESS", "{ok}");
    let failed = call(
        &redis,
        &q,
        "orbit.debug.fail",
        json!(["ValueError", "boom"]),
        json!({}),
        json!({}),
    );
    assert_eq!(failed["state"], "FAILURE", "{failed}");
    let retried = call(
        &redis,
        &q,
        "orbit.debug.flaky",
        json!([1]),
        json!({"countdown": 0.1}),
        json!({}),
    );
    assert_eq!(retried["state"], "SUCCESS", "{retried}");
    let unknown = send(&redis, &q, json!([{"name": "no.such.task"}]))[0].clone();
    wait_meta(&redis, &unknown, "FAILURE", Duration::from_secs(20));
    // At least one heartbeat (every 2 s) before the warm shutdown sends worker-offline.
    std::thread::sleep(Duration::from_millis(2500));
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0));
    let seen = listener.finish();

    let events = seen["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for k in [
        "worker-online",
        "worker-heartbeat",
        "task-received",
        "task-started",
        "task-succeeded",
        "task-failed",
        "task-retried",
        "worker-offline",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    assert_eq!(kinds.first(), Some(&"worker-online"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"worker-offline"), "{kinds:?}");
    // One Lamport clock, rising with every event, one hostname.
    let clocks: Vec<u64> = events
        .iter()
        .map(|e| e["clock"].as_u64().unwrap())
        .collect();
    assert!(clocks.windows(2).all(|p| p[0] < p[1]), "{clocks:?}");
    let host = events[0]["hostname"].as_str().unwrap();
    assert!(host.starts_with("rust1@"), "{host}");
    assert!(events.iter().all(|e| e["hostname"] == host));

    let worker = &seen["workers"][host];
    assert_eq!(worker["sw_ident"], "orbit-worker", "{worker}");
    assert_eq!(worker["freq"], 2.0);
    assert_eq!(
        worker["alive"], false,
        "offline after the shutdown: {worker}"
    );
    // echo, fail, flaky twice (its retry is received again); an unknown name is not
    // received (Celery counts it nowhere either).
    assert_eq!(worker["processed"], 4, "{worker}");

    let task = |id: &Value| seen["tasks"][id.as_str().unwrap()].clone();
    let t = task(&ok["id"]);
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["name"], "orbit.echo");
    assert_eq!(t["args"], "[2, 'x']", "the client's argsrepr: {t}");
    assert_eq!(t["kwargs"], "{'k': True}", "{t}");
    assert_eq!(
        t["result"], "{'args': [2, 'x'], 'kwargs': {'k': True}}",
        "{t}"
    );
    assert_eq!(t["worker"], host);
    assert!(t["runtime"].as_f64().unwrap() >= 0.0, "{t}");
    let t = task(&failed["id"]);
    assert_eq!(t["state"], "FAILURE", "{t}");
    assert_eq!(t["exception"], "ValueError('boom')", "{t}");
    let t = task(&retried["id"]);
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["retries"], 1, "{t}");
    let t = task(&json!(unknown));
    assert_eq!(t["state"], "FAILURE", "{t}");
    assert_eq!(t["exception"], "NotRegistered('no.such.task')", "{t}");
}

#[test]
fn without_e_nothing_is_published() {
    let redis = RedisServer::start(false);
    let q = unique_queue("quiet");
    let listener = Listener::start(&redis, &q, "none", 5);
    let mut w = WorkerProc::start(&redis, &["-Q", &q]);
    let ok = call(&redis, &q, "orbit.echo", json!([1]), json!({}), json!({}));
    assert_eq!(ok["state"], "SUCCESS");
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(0));
    let seen = listener.finish();
    assert_eq!(
        seen["events"],
        json!([]),
        "events were published without -E"
    );
}

/// Celery's remote-control client (tests/py/control_client.py) against `node` ("*" for all).
pub fn control(redis: &RedisServer, node: &str, calls: &[&str]) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/py/control_client.py"))
        .arg(node)
        .args(calls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    py_env(&mut cmd, redis, "celery");
    let out = cmd.output().expect("python venv (make venv)");
    assert!(
        out.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `celery -A pyapp control ARGS…`, the real CLI; its output must say `expect`.
fn celery_control_cli(redis: &RedisServer, queue: &str, args: &[&str], expect: &str) {
    let mut cli = Command::new(python());
    cli.args(["-m", "celery", "-A", "pyapp", "control"])
        .args(args);
    py_env(&mut cli, redis, queue);
    let out = cli.output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(expect),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first worker's reply to one `inspect` method (Null when none answered).
fn inspect_one(redis: &RedisServer, method: &str) -> Value {
    let call = format!("inspect:{method}");
    let r = control(redis, "*", &[&call]);
    r[&call]
        .as_object()
        .and_then(|m| m.values().next().cloned())
        .unwrap_or(Value::Null)
}

/// The first worker's reply to one `control` method with its JSON arguments.
fn control_one(redis: &RedisServer, method: &str, args: Value) -> Value {
    let call = format!("control:{method}:{args}");
    let r = control(redis, "*", &[&call]);
    r[&call][0]
        .as_object()
        .and_then(|m| m.values().next().cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn celery_inspect_and_control_see_and_steer_our_worker() {
    let redis = RedisServer::start(false);
    let q = unique_queue("inspect");
    let mut w = WorkerProc::start(&redis, &["-Q", &q, "-n", "rust2@%h", "-c", "1"]);
    let pong = control(&redis, "*", &["inspect:ping"]);
    let host = pong["inspect:ping"]
        .as_object()
        .and_then(|m| m.keys().find(|k| k.starts_with("rust2@")).cloned())
        .unwrap_or_else(|| panic!("no pong from our worker: {pong}"));
    assert_eq!(pong["inspect:ping"][&host], json!({"ok": "pong"}));

    // One task running, one waiting for the only slot, one waiting for its ETA.
    let sleep = |s: f64| json!({"name": "orbit.debug.sleep", "args": [s]});
    let ids = send(
        &redis,
        &q,
        json!([sleep(4.0), sleep(0.1), {"name": "orbit.echo", "args": [1], "options": {"countdown": 60}}]),
    );
    wait_for("the first sleep to run", Duration::from_secs(20), || {
        let a = control(&redis, &host, &["inspect:active"]);
        (a["inspect:active"][&host].as_array()?.len() == 1).then_some(())
    });
    let r = control(
        &redis,
        &host,
        &[
            "inspect:active",
            "inspect:reserved",
            "inspect:scheduled",
            "inspect:stats",
            "inspect:registered",
            "inspect:active_queues",
            "inspect:conf",
            "inspect:report",
            &format!("query:{},{}", ids[1], "no-such-id"),
        ],
    );
    let of = |call: &str| r[call][&host].clone();
    let active = of("inspect:active");
    assert_eq!(active[0]["id"], json!(ids[0]), "{active}");
    assert_eq!(active[0]["name"], "orbit.debug.sleep");
    assert_eq!(active[0]["args"], json!([4.0]));
    assert_eq!(active[0]["acknowledged"], false);
    assert!(active[0]["time_start"].as_f64().unwrap() > 0.0);
    assert_eq!(active[0]["delivery_info"]["routing_key"], json!(q));
    assert_eq!(of("inspect:reserved")[0]["id"], json!(ids[1]), "{r}");
    let scheduled = of("inspect:scheduled");
    assert_eq!(scheduled[0]["request"]["id"], json!(ids[2]), "{scheduled}");
    assert!(scheduled[0]["eta"].as_str().is_some(), "{scheduled}");
    let stats = of("inspect:stats");
    assert_eq!(stats["pool"]["max-concurrency"], 1, "{stats}");
    assert_eq!(stats["prefetch_count"], 4, "{stats}");
    assert!(stats["rusage"]["maxrss"].as_u64().unwrap() > 0, "{stats}");
    // CPU time is counted in scheduler ticks, so a young, idle worker may show 0.0 there; its
    // voluntary context switches (every wait on Redis) are never 0.
    assert!(stats["rusage"]["utime"].as_f64().unwrap() >= 0.0, "{stats}");
    assert!(stats["rusage"]["nvcsw"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["total"]["orbit.debug.sleep"], 2, "{stats}");
    assert_eq!(stats["broker"]["port"], redis.port);
    let registered = of("inspect:registered");
    assert!(registered
        .as_array()
        .unwrap()
        .contains(&json!("orbitpilot.build_memory")));
    assert_eq!(of("inspect:active_queues")[0]["name"], json!(q));
    assert_eq!(of("inspect:conf")["task_acks_late"], true);
    assert!(of("inspect:report")["ok"]
        .as_str()
        .unwrap()
        .contains("orbit-worker"));
    let query = of(&format!("query:{},{}", ids[1], "no-such-id"));
    assert_eq!(query[&ids[1]][0], "reserved", "{query}");
    assert!(query.get("no-such-id").is_none(), "{query}");

    // A request for another node gets no answer from ours.
    let other = control(&redis, "other@nowhere", &["inspect:ping"]);
    assert!(other["inspect:ping"].is_null(), "{other}");

    // Events switched on at run time, as Flower does.
    let before = redis.calls("publish");
    let on = control(&redis, &host, &["control:enable_events"]);
    assert_eq!(
        on["control:enable_events"][0][&host],
        json!({"ok": "task events enabled"}),
        "{on}"
    );
    wait_for(
        "events after enable_events",
        Duration::from_secs(10),
        || (redis.calls("publish") > before + 1).then_some(()),
    );

    // Warm shutdown by remote control: the running task finishes, the ETA'd one goes back.
    control(&redis, &host, &["broadcast:shutdown"]);
    assert_eq!(w.wait_exit(Duration::from_secs(60)), Some(0), "{}", w.log());
    assert_eq!(meta(&redis, &ids[0]).unwrap()["status"], "SUCCESS");
    assert!(w
        .log()
        .contains("Warm shutdown requested by remote control"));
    assert_eq!(unacked_len(&redis), 0, "nothing held after the shutdown");
}

/// Headless Chromium (Debian's, `make chromium`) renders `url`: the DOM after its scripts ran,
/// and a screenshot kept at `shot` as a test artefact.
fn browser_dom(url: &str, shot: &std::path::Path) -> String {
    let run = |what: &str| {
        let profile = tempfile::tempdir().unwrap();
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--window-size=1400,900",
                // Time for the page's own requests (Flower fills its tables from its API).
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(what)
            .arg(url)
            .output()
            .expect("chromium (make chromium)");
        assert!(
            out.status.success(),
            "chromium {what} {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&format!("--screenshot={}", shot.display()));
    assert!(
        shot.metadata().map(|m| m.len() > 0).unwrap_or(false),
        "no screenshot of {url}"
    );
    run("--dump-dom")
}

/// The table row of a rendered page that holds `needle`.
fn row_of<'a>(dom: &'a str, needle: &str) -> Option<&'a str> {
    let at = dom.find(needle)?;
    let start = dom[..at].rfind("<tr")?;
    let end = at + dom[at..].find("</tr>")?;
    Some(&dom[start..end])
}

/// A mixed fleet, as during a migration: our worker and a Python Celery worker, both without
/// `-E`. Flower 2.2, unchanged, finds both by remote control, switches their events on and lists
/// their tasks; headless Chromium renders Flower's workers and tasks pages with them; `celery
/// status` and `inspect ping` list both; one `revoke` reaches both; our `/metrics` agrees with
/// what Flower shows.
#[test]
fn flower_a_browser_and_celery_see_a_mixed_fleet() {
    let redis = RedisServer::start(false);
    let (q, qp) = (unique_queue("flower"), unique_queue("flowerpy"));
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let w = WorkerProc::start(
        &redis,
        &["-Q", &q, "-n", "rust3@%h", "--http", &metrics_addr],
    );
    let py = PyWorker::start(&redis, &qp, 1, 3600.0);
    let port = free_port();
    let mut cmd = Command::new(python());
    cmd.args(["-m", "celery", "-A", "pyapp", "flower"])
        .arg(format!("--port={port}"))
        .arg("--address=127.0.0.1")
        .env("FLOWER_UNAUTHENTICATED_API", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    py_env(&mut cmd, &redis, &q);
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _flower = Kill(cmd.spawn().expect("flower in the test venv (make venv)"));
    let addr = format!("127.0.0.1:{port}");
    let get = |path: &str| -> Option<Value> {
        // Not listening yet: nothing to ask.
        std::net::TcpStream::connect(&addr).ok()?;
        let (status, body) = crate::app_harness::http_get(&addr, path, None);
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    };
    let (host, py_host) = wait_for(
        "Flower to list both workers",
        Duration::from_secs(60),
        || {
            let workers = get("/api/workers?refresh=1")?;
            let find = |prefix: &str, queue: &str| {
                let (host, info) = workers
                    .as_object()?
                    .iter()
                    .find(|(k, _)| k.starts_with(prefix))?;
                let registered = info.get("registered")?.as_array()?;
                let queues = info.get("active_queues")?.as_array()?;
                (registered.contains(&json!("orbit.echo"))
                    && info.get("stats")?.get("pool").is_some()
                    && queues.iter().any(|x| x["name"] == queue))
                .then(|| host.clone())
            };
            Some((find("rust3@", &q)?, find(&py.name_prefix, &qp)?))
        },
    );
    // Flower's enable_events broadcast (every few seconds) switches our events on.
    w.wait_log("Flower's enable_events", "enabled by remote");

    // Ours: a success, a failure, a task retried once (1 s later); Python's: a success.
    let ids = send(
        &redis,
        &q,
        json!([
            {"name": "orbit.echo", "args": ["flower"]},
            {"name": "orbit.debug.fail", "args": ["ValueError", "boom"]},
            {"name": "orbit.debug.flaky", "args": [1, 1]},
        ]),
    );
    let py_id = send(&redis, &qp, json!([{"name": "orbit.echo", "args": ["py"]}]))[0].clone();
    let want = [
        (&ids[0], "SUCCESS", &host),
        (&ids[1], "FAILURE", &host),
        (&ids[2], "SUCCESS", &host),
        (&py_id, "SUCCESS", &py_host),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let tasks = loop {
        let t = get("/api/tasks").unwrap_or_default();
        let states = |(id, state, _): &(&String, &str, &String)| {
            t.get(id.as_str()).and_then(|x| x.get("state")) == Some(&json!(state))
        };
        if want.iter().all(states) {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Flower's tasks, against {want:?}: {t:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for (id, _, worker) in &want {
        let t = &tasks[id.as_str()];
        assert_eq!(t["worker"], json!(worker), "{t}");
    }
    let ok = &tasks[ids[0].as_str()];
    assert_eq!(ok["name"], "orbit.echo", "{ok}");
    assert_eq!(ok["args"], "['flower']", "{ok}");
    assert!(ok["runtime"].as_f64().unwrap() > 0.0, "{ok}");
    let failed = &tasks[ids[1].as_str()];
    assert_eq!(failed["exception"], "ValueError('boom')", "{failed}");
    assert!(failed["runtime"].is_null() || failed["runtime"].as_f64().is_some());
    let retried = &tasks[ids[2].as_str()];
    assert_eq!(retried["retries"], 1, "{retried}");
    assert!(retried["retried"].as_f64().is_some(), "{retried}");
    assert!(
        retried["exception"]
            .as_str()
            .unwrap()
            .contains("flaky attempt 0"),
        "{retried}"
    );
    assert!(retried["runtime"].as_f64().unwrap() > 0.0, "{retried}");

    // A real browser renders Flower's pages with both workers and the tasks in their states.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("flower");
    std::fs::create_dir_all(&shots).unwrap();
    let dom = browser_dom(
        &format!("http://{addr}/workers"),
        &shots.join("workers.png"),
    );
    assert!(
        dom.contains(&host) && dom.contains(&py_host),
        "workers page: {dom}"
    );
    let online = row_of(&dom, &host).unwrap_or_else(|| panic!("no row for {host}: {dom}"));
    assert!(online.contains("Online"), "{online}");
    let dom = browser_dom(&format!("http://{addr}/tasks"), &shots.join("tasks.png"));
    for (id, state, _) in &want {
        let row = row_of(&dom, id).unwrap_or_else(|| panic!("no row for {id}: {dom}"));
        assert!(row.contains(state), "{id} not {state}: {row}");
    }

    // `celery status` and `inspect ping` list both.
    let mut status = Command::new(python());
    status.args(["-m", "celery", "-A", "pyapp", "status"]);
    py_env(&mut status, &redis, &q);
    let out = status.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{host}: OK")), "{text}");
    assert!(text.contains(&format!("{py_host}: OK")), "{text}");
    assert!(text.contains("2 nodes online"), "{text}");
    let pong = control(&redis, "*", &["inspect:ping"]);
    assert_eq!(pong["inspect:ping"][&host], json!({"ok": "pong"}), "{pong}");
    assert_eq!(
        pong["inspect:ping"][&py_host],
        json!({"ok": "pong"}),
        "{pong}"
    );

    // One revoke, sent once to every node, reaches both.
    let eta = send(
        &redis,
        &qp,
        json!([{"name": "orbit.echo", "args": [0], "options": {"countdown": 600}}]),
    )[0]
    .clone();
    control(&redis, "*", &[&format!("revoke:{eta}")]);
    let revoked = control(&redis, "*", &["inspect:revoked"]);
    for node in [&host, &py_host] {
        let ids = revoked["inspect:revoked"][node].as_array();
        assert!(
            ids.is_some_and(|i| i.contains(&json!(eta))),
            "{node}: {revoked}"
        );
    }

    // Our /metrics shows what Flower shows of our worker.
    let flower = wait_for("Flower's counts to settle", Duration::from_secs(20), || {
        let f = get("/api/workers?refresh=1")?.get(&host)?.clone();
        let total: u64 = f["stats"]["total"]
            .as_object()?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        // echo, fail, flaky, and flaky again for its retry.
        (total == 4).then_some(f)
    });
    let (code, text) = crate::app_harness::http_get(&metrics_addr, "/metrics", None);
    assert_eq!(code, 200);
    let parsed = crate::app_harness::prometheus_parse(&text);
    let m = |name: &str| crate::app_harness::metric(&parsed, name, json!({"worker": host}));
    assert_eq!(m("orbit_worker_online"), Some(1.0), "{text}");
    assert_eq!(m("orbit_worker_processed_total"), Some(4.0), "{text}");
    assert_eq!(m("orbit_worker_active_tasks"), Some(0.0));
    assert_eq!(
        m("orbit_worker_pool_size"),
        flower["stats"]["pool"]["max-concurrency"].as_f64()
    );
    assert_eq!(m("orbit_worker_scheduled_tasks"), Some(0.0));
    assert!(crate::app_harness::metric(
        &parsed,
        "orbit_worker_load_average",
        json!({"worker": host, "period": "1m"})
    )
    .is_some());
    assert_eq!(
        crate::app_harness::metric(
            &parsed,
            "orbit_tasks_total",
            json!({"task": "orbit.debug.fail", "state": "failed"})
        ),
        Some(1.0)
    );
}

/// `revoke` as `AsyncResult.revoke()` / `celery control revoke` send it: a task revoked before it
/// arrives, one waiting for its ETA, and one running with `terminate` all end REVOKED, and
/// `inspect revoked` lists them.
#[test]
fn revoked_tasks_end_revoked_wherever_they_were() {
    let redis = RedisServer::start(false);
    let q = unique_queue("revoke");
    let w = WorkerProc::start(&redis, &["-Q", &q, "-n", "rust4@%h", "-E"]);
    // Revoked before it is sent.
    let early = "00000000-0000-4000-8000-00000000e001";
    let r = control(&redis, "*", &[&format!("revoke:{early}")]);
    assert!(r.to_string().contains("flagged as revoked"), "{r}");
    send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": [1], "options": {"task_id": early}}]),
    );
    let m = wait_meta(&redis, early, "REVOKED", Duration::from_secs(20));
    assert_eq!(m["result"]["exc_message"], json!(["revoked"]), "{m}");
    // Waiting for its ETA when revoked: discarded when it comes up.
    let ids = send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": [2], "options": {"countdown": 2}},
               {"name": "orbit.debug.sleep", "args": [60]}]),
    );
    control(&redis, "*", &[&format!("revoke:{}", ids[0])]);
    wait_meta(&redis, &ids[0], "REVOKED", Duration::from_secs(20));
    // Running: terminate stops it where it runs.
    wait_for("the sleep to run", Duration::from_secs(20), || {
        let a = control(&redis, "*", &["inspect:active"]);
        (a.to_string().contains(&ids[1])).then_some(())
    });
    control(&redis, "*", &[&format!("revoke:{}:terminate", ids[1])]);
    let m = wait_meta(&redis, &ids[1], "REVOKED", Duration::from_secs(20));
    assert_eq!(m["result"]["exc_message"], json!(["terminated"]), "{m}");
    let got = celery_client(
        &redis,
        &q,
        json!({"op": "get", "ids": [ids[1]], "timeout": 5}),
    );
    assert_eq!(got[0]["raised"]["type"], "TaskRevokedError", "{got}");
    w.wait_log(
        "terminate line",
        &format!(
            "Discarding revoked task: orbit.debug.sleep[{}] (terminated)",
            ids[1]
        ),
    );
    let listed = control(&redis, "*", &["inspect:revoked"]);
    let listed = listed["inspect:revoked"].to_string();
    for id in [early, &ids[0], &ids[1]] {
        assert!(listed.contains(id), "{id} not in {listed}");
    }
    assert_eq!(unacked_len(&redis), 0);
}

/// `revoke_by_stamped_headers` (Celery 5.3's stamping): from the real CLI before the task is
/// sent, and with `terminate` for a running one stamped with a list; a task with other stamps
/// runs.
#[test]
fn tasks_are_revoked_by_their_stamps() {
    let redis = RedisServer::start(false);
    let q = unique_queue("stamps");
    let w = WorkerProc::start(&redis, &["-Q", &q, "-c", "2"]);
    celery_control_cli(
        &redis,
        &q,
        &["revoke_by_stamped_headers", "mtask_id=early"],
        "headers {'mtask_id': 'early'} flagged as revoked, but not terminated",
    );
    let stamped = |name: &str, args: Value, header: &str, value: Value| {
        json!({"name": name, "args": args,
               "options": {"stamped_headers": [header], header: value}})
    };
    let ids = send(
        &redis,
        &q,
        json!([
            stamped("orbit.echo", json!(["early"]), "mtask_id", json!("early")),
            stamped("orbit.echo", json!(["kept"]), "mtask_id", json!("other")),
            stamped(
                "orbit.debug.sleep",
                json!([60]),
                "batch",
                json!(["b1", "b2"])
            ),
        ]),
    );
    let m = wait_meta(&redis, &ids[0], "REVOKED", Duration::from_secs(20));
    assert_eq!(m["result"]["exc_message"], json!(["revoked"]), "{m}");
    w.wait_log(
        "the header in the discard line",
        &format!(
            "Discarding revoked task: orbit.echo[{}] (revoked by header: {{'mtask_id': 'early'}})",
            ids[0]
        ),
    );
    assert_eq!(
        wait_meta(&redis, &ids[1], "SUCCESS", Duration::from_secs(20))["result"]["args"],
        json!(["kept"])
    );
    wait_for("the sleep to run", Duration::from_secs(20), || {
        let a = control(&redis, "*", &["inspect:active"]);
        (a.to_string().contains(&ids[2])).then_some(())
    });
    let r = control_one(
        &redis,
        "revoke_by_stamped_headers",
        json!({"headers": {"batch": "b2", "unused": "x"}, "terminate": true}),
    );
    assert_eq!(
        r,
        json!({"ok": "headers defaultdict(<class 'set'>, {'batch': {'b2'}}) revoked"})
    );
    let m = wait_meta(&redis, &ids[2], "REVOKED", Duration::from_secs(20));
    assert_eq!(m["result"]["exc_message"], json!(["terminated"]), "{m}");
    // Nothing running carries the header: Celery's answer, nothing stopped.
    assert_eq!(
        control_one(
            &redis,
            "revoke_by_stamped_headers",
            json!({"headers": {"batch": "b9"}, "terminate": true})
        ),
        json!({"ok": "headers {'batch': 'b9'} were not terminated"})
    );
    assert!(
        control_one(&redis, "revoke_by_stamped_headers", json!({"headers": []}))["error"]
            .is_string()
    );
    assert_eq!(unacked_len(&redis), 0);
}

/// Flower's pool buttons: `pool_grow` lets a second task run beside the first at once;
/// `pool_shrink` takes the slot back once it is free.
#[test]
fn the_pool_grows_and_shrinks_at_run_time() {
    let redis = RedisServer::start(false);
    let q = unique_queue("pool");
    let _w = WorkerProc::start(&redis, &["-Q", &q, "-c", "1"]);
    let max = || inspect_one(&redis, "stats")["pool"]["max-concurrency"].clone();
    assert_eq!(max(), 1);
    // Long enough for the inspect calls (each waits its 3 s for replies); ended by revoke.
    let sleep = json!({"name": "orbit.debug.sleep", "args": [60]});
    let ids = send(&redis, &q, json!([sleep.clone(), sleep]));
    let active = || {
        control(&redis, "*", &["inspect:active"])["inspect:active"]
            .as_object()
            .and_then(|m| m.values().next().cloned())
            .and_then(|a| a.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    wait_for("one task running", Duration::from_secs(20), || {
        (active() == 1).then_some(())
    });
    let r = control(&redis, "*", &[r#"control:pool_grow:{"n": 1}"#]);
    assert!(r.to_string().contains("pool will grow"), "{r}");
    assert_eq!(max(), 2);
    // The second runs while the first still sleeps.
    assert_eq!(active(), 2, "the grown slot was not used");
    let r = control(&redis, "*", &[r#"control:pool_shrink:{"n": 5}"#]);
    assert!(r.to_string().contains("pool will shrink"), "{r}");
    assert_eq!(max(), 1, "never below one");
    let stop = |ids: &[String]| {
        for id in ids {
            control(&redis, "*", &[&format!("revoke:{id}:terminate")]);
        }
        for id in ids {
            wait_meta(&redis, id, "REVOKED", Duration::from_secs(20));
        }
    };
    stop(&ids);
    // Back to one slot: of two more, one runs.
    let sleep = json!({"name": "orbit.debug.sleep", "args": [60]});
    let ids = send(&redis, &q, json!([sleep.clone(), sleep]));
    wait_for("a task running", Duration::from_secs(20), || {
        (active() == 1).then_some(())
    });
    assert_eq!(active(), 1, "the shrunk slot was used");
    stop(&ids);
}

/// `--autoscale MAX,MIN`: the pool grows with the work up to MAX, Flower's and `celery control
/// autoscale`'s range change moves it at run time, the pool buttons are refused as Celery refuses
/// them, and a keepalive after the work ends the pool is back at MIN.
#[test]
fn the_autoscaler_follows_the_work_and_its_range() {
    let redis = RedisServer::start(false);
    let q = unique_queue("autoscale");
    let w = WorkerProc::start_env(
        &redis,
        &["-Q", &q, "--autoscale", "3,1"],
        &[("AUTOSCALE_KEEPALIVE", "1")],
    );
    let stats = || inspect_one(&redis, "stats");
    let s = stats();
    assert_eq!(s["pool"]["max-concurrency"], 1, "starts at min: {s}");
    assert_eq!(
        s["autoscaler"],
        json!({"max": 3, "min": 1, "current": 1, "qty": 0})
    );
    assert_eq!(s["prefetch_count"], 12, "prefetch is sized for max: {s}");
    let ctl = |method: &str, args: Value| control_one(&redis, method, args);
    assert_eq!(
        ctl("pool_grow", json!({"n": 1}))["error"],
        "pool_grow is not supported with autoscale. Adjust autoscale range instead."
    );
    // (running, waiting for a slot), as `celery inspect` sees them.
    let held = || {
        let r = control(&redis, "*", &["inspect:active", "inspect:reserved"]);
        let n = |k: &str| {
            r[k].as_object()
                .and_then(|m| m.values().next().cloned())
                .and_then(|a| a.as_array().map(Vec::len))
                .unwrap_or(0)
        };
        (n("inspect:active"), n("inspect:reserved"))
    };
    let sleep = json!({"name": "orbit.debug.sleep", "args": [60]});
    let ids = send(&redis, &q, json!([sleep, sleep, sleep, sleep]));
    wait_for(
        "the pool to grow to its max",
        Duration::from_secs(20),
        || (held() == (3, 1)).then_some(()),
    );
    w.wait_log("the scale-up line", "Scaling up");
    assert_eq!(stats()["pool"]["max-concurrency"], 3, "grown past max");
    // `celery control autoscale 4 1`, the real CLI: the range moves and the fourth runs.
    celery_control_cli(
        &redis,
        &q,
        &["autoscale", "4", "1"],
        "autoscale now max=4 min=1",
    );
    wait_for("the fourth to run", Duration::from_secs(20), || {
        (held() == (4, 0)).then_some(())
    });
    assert!(ctl("autoscale", json!({"max": 2, "min": 5}))["error"]
        .as_str()
        .is_some_and(|e| e.contains("above max")));
    // One revoke for all, so they end together.
    ctl("revoke", json!({"task_id": ids, "terminate": true}));
    for id in &ids {
        wait_meta(&redis, id, "REVOKED", Duration::from_secs(20));
    }
    // Idle past the keepalive: back to min.
    wait_for("the pool back at min", Duration::from_secs(20), || {
        (stats()["pool"]["max-concurrency"] == 1).then_some(())
    });
    w.wait_log("the scale-down line", "Scaling down");
    // A lower max holds: of two, one runs.
    assert_eq!(
        ctl("autoscale", json!({"max": 1, "min": 1})),
        json!({"ok": "autoscale now max=1 min=1"})
    );
    let sleep = json!({"name": "orbit.debug.sleep", "args": [60]});
    let ids = send(&redis, &q, json!([sleep, sleep]));
    wait_for("one running", Duration::from_secs(20), || {
        (held().0 == 1).then_some(())
    });
    // Two looks of the autoscaler later, the second still waits.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(held(), (1, 1), "ran past the max");
    ctl("revoke", json!({"task_id": ids, "terminate": true}));
    assert_eq!(stats()["prefetch_count"], 4, "the prefetch follows max");
}

/// `add_consumer` / `cancel_consumer`, `time_limit` and `rate_limit` by remote control, as
/// `celery control` and Flower send them.
#[test]
fn queues_and_limits_change_at_run_time() {
    let redis = RedisServer::start(false);
    let q1 = unique_queue("consumed");
    let q2 = unique_queue("added");
    let _w = WorkerProc::start(&redis, &["-Q", &q1]);
    let ctl = |method: &str, args: Value| control_one(&redis, method, args);
    let echo =
        |q: &str, word: &str| call(&redis, q, "orbit.echo", json!([word]), json!({}), json!({}));
    assert_eq!(
        ctl("add_consumer", json!({"queue": q2})),
        json!({"ok": format!("add consumer {q2}")})
    );
    assert_eq!(echo(&q2, "added")["state"], "SUCCESS");
    let queues = control(&redis, "*", &["inspect:active_queues"]).to_string();
    assert!(queues.contains(&q1) && queues.contains(&q2), "{queues}");
    assert_eq!(
        ctl("cancel_consumer", json!({"queue": q1})),
        json!({"ok": format!("no longer consuming from {q1}")})
    );
    let waiting = send(
        &redis,
        &q1,
        json!([{"name": "orbit.echo", "args": ["later"]}]),
    )[0]
    .clone();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        meta(&redis, &waiting).is_none(),
        "a cancelled queue was consumed"
    );
    assert_eq!(list(&redis, &q1).len(), 1, "the message waits on its queue");
    ctl("add_consumer", json!({"queue": q1}));
    wait_meta(&redis, &waiting, "SUCCESS", Duration::from_secs(20));
    assert!(ctl("add_consumer", json!({"queue": ""}))["error"].is_string());

    // time_limit replaces the task's own limits.
    assert_eq!(
        ctl(
            "time_limit",
            json!({"task_name": "orbit.debug.sleep", "hard": 1, "soft": 0.5})
        ),
        json!({"ok": "time limits set successfully"})
    );
    let r = call(
        &redis,
        &q1,
        "orbit.debug.sleep",
        json!([30, true]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["raised"]["type"], "TimeLimitExceeded", "{r}");
    assert_eq!(
        ctl(
            "time_limit",
            json!({"task_name": "no.such.task", "hard": 1})
        ),
        json!({"error": "unknown task"})
    );

    // rate_limit paces the starts of one task name: 30/m is one start every 2 s.
    assert_eq!(
        ctl(
            "rate_limit",
            json!({"task_name": "orbit.echo", "rate_limit": "30/m"})
        ),
        json!({"ok": "new rate limit set successfully"})
    );
    let ids = send(
        &redis,
        &q1,
        json!([{"name": "orbit.echo", "args": [1]}, {"name": "orbit.echo", "args": [2]},
               {"name": "orbit.echo", "args": [3]}]),
    );
    let mut done: Vec<chrono::DateTime<chrono::FixedOffset>> = ids
        .iter()
        .map(|id| {
            let m = wait_meta(&redis, id, "SUCCESS", Duration::from_secs(30));
            chrono::DateTime::parse_from_rfc3339(m["date_done"].as_str().unwrap()).unwrap()
        })
        .collect();
    done.sort();
    for pair in done.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(1900),
            "starts closer than the rate allows: {done:?}"
        );
    }
    assert!(ctl(
        "rate_limit",
        json!({"task_name": "orbit.echo", "rate_limit": "5/d"})
    )["error"]
        .is_string());
    assert_eq!(
        ctl(
            "rate_limit",
            json!({"task_name": "orbit.echo", "rate_limit": null})
        ),
        json!({"ok": "rate limit disabled successfully"})
    );
}

/// Mingle: a worker that starts after a revoke hears it from the worker that did, so the revoke
/// outlives that worker.
#[test]
fn a_revoke_outlives_the_worker_that_heard_it() {
    let redis = RedisServer::start(false);
    let q = unique_queue("mingle");
    let mut first = WorkerProc::start(&redis, &["-Q", &q, "-n", "rust5a@%h"]);
    assert!(first.log().contains("mingle: all alone"), "{}", first.log());
    let id = "00000000-0000-4000-8000-00000000e002";
    control(&redis, "*", &[&format!("revoke:{id}")]);
    let second = WorkerProc::start(&redis, &["-Q", &q, "-n", "rust5b@%h"]);
    assert!(
        second.log().contains("mingle: sync with 1 nodes"),
        "{}",
        second.log()
    );
    first.kill9();
    send(
        &redis,
        &q,
        json!([{"name": "orbit.echo", "args": [1], "options": {"task_id": id}}]),
    );
    let m = wait_meta(&redis, id, "REVOKED", Duration::from_secs(20));
    assert_eq!(m["result"]["exc_message"], json!(["revoked"]), "{m}");
}
