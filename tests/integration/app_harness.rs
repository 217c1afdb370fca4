//! Helpers for the app-database tests: a Postgres database of the test's own, the shared
//! OpenAI-compatible double (`pipeline/tests/support/openai_double.rs`), Django's cache read
//! through real Django, and plain HTTP requests.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::celery_harness::{worker_bin, RedisServer};
use crate::helpers::{python, repo};

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of this test's own on the machine's Postgres, dropped at the end.
pub struct PgDb {
    pub name: String,
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl PgDb {
    /// An empty database.
    pub fn empty() -> PgDb {
        let name = format!("orbit_test_{}", uuid::Uuid::new_v4().simple());
        psql(PG_ADMIN, &format!("CREATE DATABASE {name}"));
        PgDb { name }
    }

    /// A database with the app schema, loaded with `corpus` through `db seed`.
    pub fn seeded(corpus: &std::path::Path) -> PgDb {
        let db = PgDb::empty();
        db.cli(&["db", "seed", "--from", corpus.to_str().unwrap()]);
        db
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    /// One statement; rows as lines, columns split by `|`.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.url(), sql)
    }

    /// Runs orbit-worker with this database and returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_env(args, &[])
    }

    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut cmd = Command::new(worker_bin());
        cmd.args(args)
            .env("DATABASE_URL", self.url())
            .env_remove("OPENAI_API_KEY")
            .env_remove("ORBIT_CHAT_MODEL")
            .env("ORBIT_EMBEDDER", "hashing");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "orbit-worker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                PG_ADMIN,
                "-AtX",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

pub use crate::openai_double::{chat_body, OpenAiDouble, Reply, API_KEY, CHAT_MODEL};

/// Django's own cache API over the test's Redis (tests/py/django_cache.py): what the app reads.
pub fn django_cache(redis: &RedisServer, ops: Value) -> Value {
    let mut child = Command::new(python())
        .arg(repo().join("tests/py/django_cache.py"))
        .env("CACHE_LOCATION", redis.url())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python venv (make venv)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ops.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "django cache: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A plain HTTP/1.1 request, with an optional bearer token and JSON body: (status, body).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let b = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token, None)
}

/// Samples of a Prometheus text page, parsed by `prometheus_client` (Python's reference client).
pub fn prometheus_parse(text: &str) -> Value {
    use std::io::Write;
    let mut child = std::process::Command::new(crate::helpers::python())
        .args(["-c", "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families\nout = []\nfor fam in text_string_to_metric_families(sys.stdin.read()):\n    for s in fam.samples:\n        out.append({'name': s.name, 'labels': s.labels, 'value': s.value})\njson.dump(out, sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not Prometheus text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The sample of `name` with `labels` in a parsed /metrics page.
pub fn metric(parsed: &Value, name: &str, labels: Value) -> Option<f64> {
    parsed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &s["labels"][k] == v)
        })
        .and_then(|s| s["value"].as_f64())
}
