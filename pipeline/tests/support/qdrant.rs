//! A real Qdrant server for the tests (the 1.18.3 build in `../shared/tools/qdrant`, copied into
//! the cache by `make qdrant`): one per test process, on free loopback ports with a fresh
//! storage folder, stopped when the process ends. Both suites include this file by path.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub struct QdrantServer {
    pub http: u16,
    pub grpc: u16,
    pub pid: u32,
    pub dir: PathBuf,
}

/// A test's own server (`start_with`) stops when it is dropped; the shared one never is.
impl Drop for QdrantServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `start-qdrant`: `$ORBIT_QDRANT_START`, else where `make qdrant` copies it, else next to the
/// repository as the workplace lays it out. Missing is a failure that says where it should be,
/// never a skipped test.
fn start_script() -> PathBuf {
    if let Ok(p) = std::env::var("ORBIT_QDRANT_START") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default());
    let cached = home.join(".cache/orbit-worker/qdrant-tools/start-qdrant");
    if cached.exists() {
        return cached;
    }
    let beside = super::helpers::repo().join("../shared/tools/qdrant/start-qdrant");
    assert!(
        beside.exists(),
        "the Qdrant server for the tests is missing: expected {} (or {}), a Qdrant 1.18 build \
         with its start-qdrant script (see ../shared/tools/qdrant/README.md); `make qdrant` copies \
         it into the cache, or set ORBIT_QDRANT_START",
        beside.display(),
        cached.display()
    );
    beside
}

impl QdrantServer {
    /// The process's server, started on first use.
    pub fn shared() -> &'static QdrantServer {
        static SERVER: OnceLock<QdrantServer> = OnceLock::new();
        SERVER.get_or_init(|| QdrantServer::start_with(&[]))
    }

    /// A server of the test's own with these settings (`QDRANT__SECTION__KEY` variables).
    pub fn start_with(env: &[(&str, &str)]) -> QdrantServer {
        let script = start_script();
        let dir = std::env::temp_dir().join(format!(
            "orbit-qdrant-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .envs(env.iter().copied())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed; log in {}/qdrant.log",
            script.display(),
            dir.display()
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<u32> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(nums.len(), 3, "start-qdrant printed {line:?}");
        let server = QdrantServer {
            http: nums[0] as u16,
            grpc: nums[1] as u16,
            pid: nums[2],
            dir,
        };
        // A static is never dropped: a watcher stops the server and removes its storage when
        // this test process is gone, however it ends.
        let watcher = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill {pid} 2>/dev/null; \
             sleep 1; kill -9 {pid} 2>/dev/null; rm -rf '{dir}'",
            me = std::process::id(),
            pid = server.pid,
            dir = server.dir.display()
        );
        // Detached (setsid, in the background of a shell that exits at once), so it outlives
        // nothing but the test process it watches.
        let started = Command::new("sh")
            .args([
                "-c",
                "setsid sh -c \"$1\" >/dev/null 2>&1 </dev/null &",
                "sh",
                &watcher,
            ])
            .status()
            .expect("cannot start the Qdrant watcher");
        assert!(started.success());
        server
    }

    /// The gRPC URL the store takes (QDRANT_URL).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// The REST URL, for checking what the server holds independently of the store.
    pub fn rest(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

/// An alias no other test of this run uses, so tests share the server and never each other's
/// collections.
pub fn unique_alias(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
