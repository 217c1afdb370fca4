//! The chaos suite (`make chaos ROUNDS=N`; two rounds in `make test`): memory builds through
//! the real Celery client onto two workers sharing one Redis (AOF on), one Postgres and one
//! vector store, while the test SIGKILLs a worker at a random moment, restarts Redis mid-stream,
//! terminates the workers' Postgres backends, and the embedding API double fails 20% of requests
//! (429 with `retry-after`, 500, stalls past the timeout, malformed JSON, wrong vector length).
//! Each round edits some users' notes first, so stale memory would show.
//!
//! After each round: every task has a final result; every build record is final and agrees with
//! its task (a coalesced one with the build it followed); each user's store holds exactly the
//! point ids a clean build of the current data gives (no loss, no stale point); nothing is left
//! in `unacked` or holding a build lock; `orbit.dead` is empty (nothing here was meant to die).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::app_harness::*;
use crate::celery_harness::*;
use crate::helpers::fixture;

const USERS: [i64; 6] = [1, 2, 3, 4, 5, 6];
/// Builds requested per user per round: the second usually coalesces into the first.
const BUILDS_PER_USER: usize = 2;
/// Short, so a killed worker's messages come back within the round.
const VISIBILITY_S: &str = "6";
const FAULT_PERCENT: u64 = 20;

/// Deterministic per seed, so a failing round can be replayed (`ORBIT_CHAOS_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

#[derive(Default, Debug)]
struct Tally {
    rounds: usize,
    kills: usize,
    redis_restarts: usize,
    pg_terminations: usize,
    tasks: usize,
    builds_failed_then_rebuilt: usize,
    lost: usize,
    stale: usize,
    duplicated: usize,
    stranded: usize,
    dead: usize,
    stuck_records: usize,
    untrue_records: usize,
}

fn worker(redis: &RedisServer, db: &PgDb, data: &Path, api: &OpenAiDouble, q: &str) -> WorkerProc {
    let url = db.url();
    let data = data.to_str().unwrap().to_string();
    let mut env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", url),
        ("ORBIT_DATA_DIR", data),
        ("ORBIT_CHUNK_TOKENS", "256".into()),
        ("ORBIT_EMBED_TIMEOUT", "2".into()),
        ("ORBIT_BUILD_LOCK_TTL", "3".into()),
        ("ORBIT_HTTP_MAX_INLINE_WAIT", "1".into()),
        // Small requests: more of them, so the faults reach every build.
        ("ORBIT_EMBED_BATCH_INPUTS", "8".into()),
    ];
    env.extend(api.embedder_env());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    WorkerProc::start_env(
        redis,
        &["-Q", q, "-c", "4", "--visibility-timeout", VISIBILITY_S],
        &env,
    )
}

/// The point ids of each user after a clean build of the current data: the CLI with the
/// deterministic embedder into a fresh store (ids do not depend on the embedder, only on the
/// documents and the chunking).
fn expected_ids(db: &PgDb) -> HashMap<i64, BTreeSet<Vec<u8>>> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    db.cli_env(
        &["build", "--all-users"],
        &[("ORBIT_DATA_DIR", data), ("ORBIT_CHUNK_TOKENS", "256")],
    );
    store_ids(dir.path())
}

fn store_ids(data: &Path) -> HashMap<i64, BTreeSet<Vec<u8>>> {
    use orbit_pipeline::store::{SqliteStore, VectorStore};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = SqliteStore::open(data).await.unwrap();
        let mut out = HashMap::new();
        for u in USERS {
            let ids = s.point_ids(u).await.unwrap();
            let n = ids.len();
            let set: BTreeSet<Vec<u8>> = ids.into_iter().map(|i| i.as_bytes().to_vec()).collect();
            assert_eq!(set.len(), n, "user {u}: the store lists a point twice");
            out.insert(u, set);
        }
        out
    })
}

/// A note added to every user (so every build embeds something, and meets the faults) and one
/// deleted from two users: the next builds must add and sweep.
fn edit_notes(db: &PgDb, rng: &mut Rng, round: usize) {
    for add in USERS {
        db.sql(&format!(
            "INSERT INTO orbitpilot_note (user_id, title, content) VALUES ({add}, 'chaos {round}', \
             'Round {round}: the spare key for the bike lock is under the blue flower pot number {}.')",
            rng.next() % 10_000
        ));
    }
    for _ in 0..2 {
        let del = USERS[rng.below(USERS.len() as u64) as usize];
        db.sql(&format!(
            "DELETE FROM orbitpilot_note WHERE id = (SELECT id FROM orbitpilot_note \
             WHERE user_id = {del} ORDER BY id LIMIT 1)"
        ));
    }
}

#[test]
#[ignore = "loads both cores: run alone by `make chaos` (and by `make test`, two rounds)"]
fn chaos_rounds_lose_nothing_and_leave_nothing_stuck() {
    let rounds: usize = std::env::var("ORBIT_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("ORBIT_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_c4a0);
    let mut rng = Rng(seed);
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    let mut redis = RedisServer::start(true);
    let api = OpenAiDouble::start();
    let data = tempfile::tempdir().unwrap();
    let q = unique_queue("chaos");
    let mut workers = [
        worker(&redis, &db, data.path(), &api, &q),
        worker(&redis, &db, data.path(), &api, &q),
    ];
    let mut t = Tally::default();
    for round in 0..rounds {
        let started = Instant::now();
        edit_notes(&db, &mut rng, round);
        let expected = expected_ids(&db);
        api.set_faults(FAULT_PERCENT, rng.next());
        let mut records: Vec<(i64, String)> = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..BUILDS_PER_USER {
            for u in USERS {
                let id = db.sql(&format!(
                    "INSERT INTO orbitpilot_memorybuild (user_id) VALUES ({u}) RETURNING id"
                ));
                tasks.push(json!({"name": "orbitpilot.build_memory",
                                  "args": [u, id.parse::<i64>().unwrap()]}));
                records.push((u, id));
            }
        }
        for i in 0..6 {
            tasks.push(json!({"name": "orbit.echo", "args": [format!("round {round} echo {i}")]}));
        }
        let ids = send(&redis, &q, json!(tasks));
        t.tasks += ids.len();

        // The faults, at random moments of the round.
        std::thread::sleep(rng.millis(200, 1500));
        let victim = rng.below(2) as usize;
        workers[victim].kill9();
        t.kills += 1;
        std::thread::sleep(rng.millis(100, 800));
        workers[victim] = worker(&redis, &db, data.path(), &api, &q);
        std::thread::sleep(rng.millis(100, 1000));
        redis.restart();
        t.redis_restarts += 1;
        std::thread::sleep(rng.millis(100, 1000));
        db.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        );
        t.pg_terminations += 1;

        // Every task reaches a final state.
        let results = celery_client(&redis, &q, json!({"op": "get", "ids": ids, "timeout": 240}));
        let results = results.as_array().unwrap();
        let mut by_record: HashMap<String, Value> = HashMap::new();
        for (i, r) in results.iter().enumerate() {
            let state = r["state"].as_str().unwrap_or("");
            assert!(
                state == "SUCCESS" || state == "FAILURE",
                "round {round}: task {i} not final: {r}"
            );
            if let Some((_, rec)) = records.get(i) {
                by_record.insert(rec.clone(), r.clone());
            } else {
                assert_eq!(state, "SUCCESS", "round {round}: echo {i}: {r}");
            }
        }
        api.set_faults(0, 1);

        // Every record is final and true.
        let mut completed_users = BTreeSet::new();
        for (u, rec) in &records {
            let row = db.sql(&format!(
                "SELECT status, coalesced_into_id FROM orbitpilot_memorybuild WHERE id = {rec}"
            ));
            let (status, into) = row.split_once('|').unwrap();
            if status != "completed" && status != "failed" {
                t.stuck_records += 1;
                eprintln!("round {round}: record {rec} of user {u} is {status}");
                continue;
            }
            let r = &by_record[rec];
            let true_to_task = if into.is_empty() {
                match status {
                    "completed" => r["result"]["status"] == "completed",
                    _ => r["state"] == "FAILURE",
                }
            } else {
                let target = db.sql(&format!(
                    "SELECT status FROM orbitpilot_memorybuild WHERE id = {into}"
                ));
                r["result"]["status"] == "coalesced" && target == status
            };
            if !true_to_task {
                t.untrue_records += 1;
                eprintln!("round {round}: record {rec} ({status}, into {into:?}) vs task {r}");
            }
            if status == "completed" && into.is_empty() {
                completed_users.insert(*u);
            }
        }
        // A user whose every build failed (the faults can exhaust the retries) is built once
        // more without faults; then every user's memory must be exactly the expected one.
        for u in USERS.iter().filter(|u| !completed_users.contains(u)) {
            let id = db.sql(&format!(
                "INSERT INTO orbitpilot_memorybuild (user_id) VALUES ({u}) RETURNING id"
            ));
            let r = call(
                &redis,
                &q,
                "orbitpilot.build_memory",
                json!([u, id.parse::<i64>().unwrap()]),
                json!({}),
                json!({}),
            );
            assert_eq!(r["state"], "SUCCESS", "round {round}: rebuild of {u}: {r}");
            t.builds_failed_then_rebuilt += 1;
        }
        let actual = store_ids(data.path());
        for u in USERS {
            let (want, got) = (&expected[&u], &actual[&u]);
            let lost = want.difference(got).count();
            let stale = got.difference(want).count();
            if lost + stale > 0 {
                eprintln!("round {round}: user {u}: {lost} lost, {stale} stale");
            }
            t.lost += lost;
            t.stale += stale;
        }
        // Duplicates: a point stored under two ids would be the same chunk twice.
        let dup = db_dups(data.path());
        t.duplicated += dup;

        // Nothing stranded: once every task is final, unacked drains (a killed worker's entries
        // are restored and settled within the visibility timeout and a sweep).
        let deadline = Instant::now() + Duration::from_secs(30);
        let stranded = loop {
            let stranded = unacked_len(&redis);
            if stranded == 0 || Instant::now() > deadline {
                break stranded;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        t.stranded += stranded;
        let mut con = redis.con();
        let locks: Vec<String> = redis::cmd("KEYS")
            .arg("orbit:build:lock:*")
            .query(&mut con)
            .unwrap();
        if !locks.is_empty() {
            // A lock lives at most its TTL (3 s) past its build's end.
            std::thread::sleep(Duration::from_secs(4));
            let still: Vec<String> = redis::cmd("KEYS")
                .arg("orbit:build:lock:*")
                .query(&mut con)
                .unwrap();
            assert!(
                still.is_empty(),
                "round {round}: build locks left: {still:?}"
            );
        }
        t.dead += list(&redis, "orbit.dead").len();
        t.rounds += 1;
        eprintln!(
            "chaos round {round}: {:.1}s, {} tasks, faults so far {:?}",
            started.elapsed().as_secs_f64(),
            ids.len(),
            api.faults_injected()
        );
    }
    let faults: BTreeMap<_, _> = api.faults_injected();
    eprintln!("chaos summary: {t:?}; embedding faults injected: {faults:?}");
    assert_eq!(
        (
            t.lost,
            t.stale,
            t.duplicated,
            t.stranded,
            t.dead,
            t.stuck_records,
            t.untrue_records
        ),
        (0, 0, 0, 0, 0, 0, 0),
        "{t:?}"
    );
    assert!(
        faults.values().sum::<u64>() > 0,
        "no embedding fault was injected"
    );
}

/// Chunks stored twice under different ids (the same user, source and chunk index).
fn db_dups(data: &Path) -> usize {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             print(c.execute('SELECT count(*) FROM (SELECT user_id, source_ids, chunk_index, count(*) n \
             FROM points GROUP BY 1,2,3 HAVING n > 1)').fetchone()[0])",
        )
        .arg(data.join("vectors.sqlite"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
