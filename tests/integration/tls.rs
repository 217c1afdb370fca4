//! Redis and Postgres as managed services run them: over TLS. A TLS-only redis-server with a CA of
//! the test's own, the real Celery client sending over `rediss://` to our worker, which answers
//! over `rediss://`; and the app's Postgres (the machine's, `ssl = on`) with `sslmode`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::app_harness::*;
use crate::celery_harness::*;

/// Runs the worker against `url` and returns its exit status and log once it exits by itself;
/// a worker still running after `limit` is a hang, and fails the test.
fn worker_exit(url: &str, limit: Duration) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut child = Command::new(worker_bin())
        .args(["worker", "-Q", "tls-refused"])
        .env("REDIS_URL", url)
        .env_remove("CELERY_BROKER_URL")
        .env_remove("CELERY_RESULT_BACKEND")
        .env("ORBIT_EMBEDDER", "hashing")
        .env("ORBIT_DATA_DIR", dir.path().join("data"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, std::fs::read_to_string(&log).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the worker hangs on a refused TLS certificate: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_celery_client_and_our_worker_talk_over_rediss() {
    let redis = RedisServer::start_tls();
    let q = unique_queue("tls");
    // Verified against the test's CA: the URL is the one kombu reads too.
    let w = WorkerProc::start_env(&redis, &["-Q", &q], &[]);
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!([1, "over tls"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(r["result"]["args"], json!([1, "over tls"]), "{r}");
    // The result is in the TLS server's keyspace, as AsyncResult reads it.
    let meta = wait_meta(
        &redis,
        r["id"].as_str().unwrap(),
        "SUCCESS",
        Duration::from_secs(10),
    );
    assert_eq!(meta["result"]["args"], json!([1, "over tls"]));
    drop(w);

    // `ssl_cert_reqs=none`: the certificate is not checked (a self-signed managed server).
    let none = redis.tls_url("ssl_cert_reqs=none");
    let _w = WorkerProc::start_env(&redis, &["-Q", &q], &[("REDIS_URL", none.as_str())]);
    let r = call(
        &redis,
        &q,
        "orbit.echo",
        json!(["unchecked"]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
}

#[test]
fn a_wrong_ca_fails_the_worker_at_once_and_says_why() {
    let redis = RedisServer::start_tls();
    let wrong = redis.tls_files();
    for url in [
        // Another CA than the one that signed the server's certificate.
        redis.tls_url(&format!(
            "ssl_cert_reqs=required&ssl_ca_certs={}",
            wrong.wrong_ca.display()
        )),
        // The system's CAs, which do not know the test's CA.
        redis.tls_url("ssl_cert_reqs=required"),
    ] {
        let (status, log) = worker_exit(&url, Duration::from_secs(60));
        assert!(!status.success(), "{log}");
        assert!(log.contains("over TLS"), "{log}");
        assert!(log.contains("certificate"), "{log}");
    }
    // A file that is not there is a start-up error too, naming the file.
    let (status, log) = worker_exit(
        &redis.tls_url("ssl_ca_certs=/nonexistent/ca.pem"),
        Duration::from_secs(60),
    );
    assert!(!status.success());
    assert!(log.contains("/nonexistent/ca.pem"), "{log}");
}

#[test]
fn builds_and_answers_work_with_sslmode_require() {
    let db = PgDb::seeded(&crate::helpers::fixture("sample.jsonl"));
    let tls_url = format!("{}?sslmode=require", db.url());
    let env = [("DATABASE_URL", tls_url.as_str())];
    let migrated = db.cli_env(&["db", "migrate"], &env);
    assert!(
        migrated.contains("up to date") || migrated.contains("applied"),
        "{migrated}"
    );
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("DATABASE_URL", tls_url.as_str()),
        ("ORBIT_DATA_DIR", data.path().to_str().unwrap()),
    ];
    let built: serde_json::Value =
        serde_json::from_str(&db.cli_env(&["build", "--user", "1", "--json"], &env)).unwrap();
    assert!(built["chunks"].as_u64().unwrap() > 0, "{built}");
    let answer: serde_json::Value = serde_json::from_str(&db.cli_env(
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
    assert!(
        !answer["citations"].as_array().unwrap().is_empty(),
        "{answer}"
    );

    // TLS is really spoken: verify-full against a CA that did not sign the server's certificate
    // is refused, with a message about the certificate.
    let dir = tempfile::tempdir().unwrap();
    let other = TlsFiles::make(dir.path());
    let verify = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url(),
        other.ca.display()
    );
    let out = Command::new(worker_bin())
        .args(["db", "migrate"])
        .env("DATABASE_URL", &verify)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
