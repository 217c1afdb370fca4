//! The worker run in-process from the library (`orbit_worker::worker::run`) on a redis-server of
//! the test's own, fed by the real Celery client: no child process, no log polling.

use std::sync::Arc;
use std::time::Duration;

use orbit_pipeline::embed::{EmbedError, EmbedLimits, Embedder, HashingEmbedder};
use orbit_pipeline::secret::Secret;
use orbit_worker::config::{Settings, Table};
use orbit_worker::services::Services;
use orbit_worker::worker::{self, WorkerOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::celery_harness::{send, unacked_len, unique_queue, wait_meta, RedisServer};

fn options(redis: &RedisServer, queue: &str) -> WorkerOptions {
    WorkerOptions {
        broker_url: Secret::new(redis.url()),
        backend_url: Secret::new(redis.url()),
        result_expires: Duration::from_secs(3600),
        concurrency: 2,
        queues: vec![queue.to_string()],
        hostname: "celery@in-process".into(),
        prefetch_multiplier: 4,
        visibility_timeout: Duration::from_secs(3600),
        events: false,
        shutdown_grace: Duration::from_secs(5),
        debug_tasks: true,
        http: None,
        autoscale: None,
        autoscale_keepalive: worker::autoscale::DEFAULT_KEEPALIVE,
    }
}

/// A worker on `redis`'s queue `q`, in a runtime of its own, stopped by the token.
struct InProcess {
    rt: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn start(redis: &RedisServer, q: &str) -> Self {
        Self::start_with(redis, q, &[], None)
    }

    /// With more settings, and optionally an embedder of the test's own.
    fn start_with(
        redis: &RedisServer,
        q: &str,
        more: &[(&str, &str)],
        embedder: Option<Arc<dyn Embedder>>,
    ) -> Self {
        let url = redis.url();
        let mut vars = vec![
            ("ORBIT_CACHE_URL", url.as_str()),
            ("ORBIT_EMBEDDER", "hashing"),
        ];
        vars.extend_from_slice(more);
        let (shared, blocks) = Settings::from_vars(&Table(&vars)).unwrap().split();
        let mut services = Services::new(shared).unwrap();
        if let Some(e) = embedder {
            services = services.with_embedder(e);
        }
        let services = Arc::new(services);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = rt.spawn(worker::run(
            options(redis, q),
            services,
            blocks,
            shutdown.clone(),
        ));
        Self {
            rt,
            shutdown,
            running,
        }
    }

    /// A warm shutdown; nothing may be left unacked.
    fn stop(self, redis: &RedisServer) {
        self.shutdown.cancel();
        let stopped = self.rt.block_on(self.running).unwrap();
        assert!(stopped.is_ok(), "{stopped:?}");
        assert_eq!(unacked_len(redis), 0, "nothing held after a warm shutdown");
    }
}

#[test]
fn the_worker_runs_in_process_retries_and_stops_holding_nothing() {
    let redis = RedisServer::start(false);
    let q = unique_queue("inproc");
    let worker = InProcess::start(&redis, &q);
    let ids = send(
        &redis,
        &q,
        json!([
            {"name": "orbit.echo", "args": [1, "two"]},
            {"name": "orbit.debug.flaky", "args": [2], "kwargs": {"countdown": 0}},
        ]),
    );
    let echo = wait_meta(&redis, &ids[0], "SUCCESS", Duration::from_secs(30));
    assert_eq!(echo["result"]["args"], json!([1, "two"]));
    let flaky = wait_meta(&redis, &ids[1], "SUCCESS", Duration::from_secs(30));
    assert_eq!(
        flaky["result"],
        json!({"retries": 2}),
        "retried twice, then done"
    );

    worker.stop(&redis);
}

/// Issue 13, defect 1: a `timelimit` header of `[1e300, null]` panicked converting it to a
/// duration, stored no result and left the message to be restored and panic again forever.
#[test]
fn an_absurd_time_limit_header_is_bounded_not_a_poison_message() {
    let redis = RedisServer::start(false);
    let q = unique_queue("timelimit");
    let worker = InProcess::start(&redis, &q);
    let ids = send(
        &redis,
        &q,
        json!([
            {"name": "orbit.echo", "args": ["huge"], "options": {"time_limit": 1e300}},
            {"name": "orbit.echo", "args": ["both"],
             "options": {"time_limit": 1e19, "soft_time_limit": 1e19}},
            {"name": "orbit.echo", "args": ["negative"], "options": {"time_limit": -5}},
        ]),
    );
    for (id, arg) in ids.iter().zip(["huge", "both", "negative"]) {
        let meta = wait_meta(&redis, id, "SUCCESS", Duration::from_secs(30));
        assert_eq!(meta["result"]["args"], json!([arg]));
    }
    worker.stop(&redis);
}

/// An embedder that holds the runtime thread it is polled on (blocking code that no abort can
/// reach, as a C library stuck in a call would) the first time it is called, then hashes.
struct StuckOnce {
    inner: HashingEmbedder,
    stuck: std::sync::atomic::AtomicBool,
    hold: Duration,
}

#[async_trait::async_trait]
impl Embedder for StuckOnce {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn limits(&self) -> EmbedLimits {
        self.inner.limits()
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        if !self.stuck.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(self.hold);
        }
        self.inner.embed(texts).await
    }
}

/// Issue 13, defect 5: a build past its hard time limit kept its build lock (renewed, as its
/// future was never dropped while its thread was stuck), so the next build of the user was
/// coalesced into the dead one and never ran. The worker's abort hook now releases the lock
/// by value once the abort's drop has had its bounded wait.
#[test]
fn a_build_stuck_past_its_hard_limit_does_not_keep_the_users_lock() {
    let redis = RedisServer::start(false);
    let q = unique_queue("stuck-build");
    let data = tempfile::tempdir().unwrap();
    let source = format!("{}/fixtures/sample.jsonl", env!("CARGO_MANIFEST_DIR"));
    let dir = data.path().to_str().unwrap();
    let stuck = Arc::new(StuckOnce {
        inner: HashingEmbedder::new(64),
        stuck: false.into(),
        // Past the hard limit (2 s) and the worker's 10 s wait for the aborted task's drop.
        hold: Duration::from_secs(25),
    });
    let worker = InProcess::start_with(
        &redis,
        &q,
        &[("ORBIT_SOURCE", source.as_str()), ("ORBIT_DATA_DIR", dir)],
        Some(stuck),
    );
    let ids = send(
        &redis,
        &q,
        json!([{"name": "orbitpilot.build_memory", "args": [3, 101],
                "options": {"time_limit": 2}}]),
    );
    let dead = wait_meta(&redis, &ids[0], "FAILURE", Duration::from_secs(40));
    assert_eq!(dead["result"]["exc_type"], "TimeLimitExceeded", "{dead}");
    // The stuck thread still holds the dead build's future: the next build must not follow it.
    let ids = send(
        &redis,
        &q,
        json!([{"name": "orbitpilot.build_memory", "args": [3, 102]}]),
    );
    let next = wait_meta(&redis, &ids[0], "SUCCESS", Duration::from_secs(40));
    assert_eq!(
        next["result"]["status"], "completed",
        "not coalesced into the dead build: {next}"
    );
    worker.stop(&redis);
}

/// The build lock on a real Redis: one holder at a time, a rising fence, the same build may take
/// its own lock over, and dropping the lock releases it (RAII).
#[test]
fn the_build_lock_excludes_fences_and_releases_itself_on_drop() {
    use orbit_worker::lock::{self, Acquired};
    use orbit_worker::redis_conn::RedisConn;
    let redis = RedisServer::start(false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = Arc::new(RedisConn::open(&redis.url(), Duration::from_secs(5)).unwrap());
        let ttl = Duration::from_secs(30);
        let Acquired::Lock(first) = lock::acquire(&conn, 7, 100, ttl).await.unwrap() else {
            panic!("a free lock was refused");
        };
        assert!(matches!(
            lock::acquire(&conn, 7, 200, ttl).await.unwrap(),
            Acquired::HeldBy(100)
        ));
        // Another user's builds are not affected.
        assert!(matches!(
            lock::acquire(&conn, 8, 300, ttl).await.unwrap(),
            Acquired::Lock(_)
        ));
        let fence = first.fence;
        drop(first);
        // The drop's release runs in the background: the lock frees within moments.
        let mut next = None;
        for _ in 0..100 {
            if let Acquired::Lock(l) = lock::acquire(&conn, 7, 200, ttl).await.unwrap() {
                next = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let next = next.expect("the dropped lock was never released");
        assert!(
            next.fence > fence,
            "the fence rises: {} then {}",
            fence,
            next.fence
        );
        // A redelivered message of the same build takes its own lock over.
        assert!(matches!(
            lock::acquire(&conn, 7, 200, ttl).await.unwrap(),
            Acquired::Lock(_)
        ));
    });
}

/// Issue 13: a Redis password given as `?password=` (as redis-py and kombu take it) was logged
/// in clear and not used (NOAUTH). It is used now, and `redact_url` hides it.
#[test]
fn a_query_string_password_is_used_and_redacted() {
    use orbit_worker::redis_conn::{redact_url, RedisConn};
    let redis = RedisServer::start(false);
    let mut con = redis.con();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret/x")
        .query(&mut con)
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let with = format!("{}?password=s3cret%2Fx", redis.url());
    let conn = RedisConn::open(&with, Duration::from_secs(5)).unwrap();
    rt.block_on(conn.ping()).unwrap();
    let without = RedisConn::open(&redis.url(), Duration::from_secs(5)).unwrap();
    let err = rt.block_on(without.ping()).unwrap_err().to_string();
    assert!(
        err.contains("NOAUTH") || err.contains("uthentication"),
        "{err}"
    );
    assert!(
        !redact_url(&with).contains("s3cret"),
        "{}",
        redact_url(&with)
    );
}
