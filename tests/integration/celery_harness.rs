//! Real parts for the wire tests: a redis-server of the test's own on a free port (killable,
//! with persistence when asked), our worker as a child process, and the real Python Celery client.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{python, repo};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` every 50 ms until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    persist: bool,
    child: Option<Child>,
    /// A TLS-only server (`start_tls`): its throwaway CA and certificate.
    pub tls: Option<TlsFiles>,
}

/// A throwaway CA, a server certificate it signs for 127.0.0.1, and a second CA that signs
/// nothing here (the wrong one).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub wrong_ca: PathBuf,
}

impl TlsFiles {
    /// Made with the openssl command, as an operator would.
    pub fn make(dir: &std::path::Path) -> TlsFiles {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "wrong-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=orbit test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]);
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            wrong_ca: dir.join("wrong-ca.pem"),
        }
    }
}

impl RedisServer {
    /// `persist`: append-only file fsynced on every write, so a kill loses nothing acknowledged.
    pub fn start(persist: bool) -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            persist,
            child: None,
            tls: None,
        };
        s.spawn();
        s
    }

    /// A redis-server that speaks TLS only (no plain port), with a CA of the test's own.
    pub fn start_tls() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsFiles::make(dir.path());
        let mut s = RedisServer {
            port: free_port(),
            dir,
            persist: false,
            child: None,
            tls: Some(tls),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let aof = if self.persist { "yes" } else { "no" };
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (make test installs it)");
        self.child = Some(child);
        wait_for("redis-server to answer", Duration::from_secs(10), || {
            let mut con = self.client().get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut con).ok()
        });
    }

    /// The URL as kombu and our worker read it: `rediss://…?ssl_cert_reqs=required&ssl_ca_certs=…`
    /// for a TLS server.
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(t) => self.tls_url(&format!(
                "ssl_cert_reqs=required&ssl_ca_certs={}",
                t.ca.display()
            )),
        }
    }

    pub fn tls_files(&self) -> &TlsFiles {
        self.tls.as_ref().expect("a TLS server (start_tls)")
    }

    /// The TLS URL with another query (`ssl_cert_reqs=none`, a wrong CA, …).
    pub fn tls_url(&self, query: &str) -> String {
        format!("rediss://127.0.0.1:{}/0?{query}", self.port)
    }

    fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url().as_str()).unwrap(),
            Some(t) => redis::Client::build_with_tls(
                format!("rediss://127.0.0.1:{}/0", self.port).as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(&t.ca).unwrap()),
                },
            )
            .unwrap(),
        }
    }

    pub fn con(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Calls of one command since start, from `INFO commandstats` (scripts' inner calls included).
    pub fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.con())
            .unwrap();
        let key = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Our worker as a child process, its log in a file.
pub struct WorkerProc {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn worker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_orbit-worker")
}

impl WorkerProc {
    pub fn start(redis: &RedisServer, args: &[&str]) -> WorkerProc {
        Self::start_env(redis, args, &[])
    }

    pub fn start_env(redis: &RedisServer, args: &[&str], env: &[(&str, &str)]) -> WorkerProc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(worker_bin());
        cmd.args(["worker", "--debug-tasks", "--loglevel", "info"])
            .args(args)
            .env("REDIS_URL", redis.url())
            .env_remove("CELERY_BROKER_URL")
            .env_remove("CELERY_RESULT_BACKEND")
            .env_remove("OPENAI_API_KEY")
            .env("ORBIT_EMBEDDER", "hashing")
            .env("ORBIT_DATA_DIR", dir.path().join("data"))
            .env("NO_COLOR", "1")
            // Every outside service here is on loopback.
            .env("ORBIT_ALLOW_PRIVATE_URLS", "true")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let w = WorkerProc {
            child: Some(child),
            log,
            _dir: dir,
        };
        w.wait_log("worker ready", "ready.");
        w
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, what: &str, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.log().contains(needle) {
            if std::time::Instant::now() > deadline {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "timed out waiting for {what}; the worker's last lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the exit and returns its code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let status = wait_for("worker to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status.code()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn py_env(cmd: &mut Command, redis: &RedisServer, queue: &str) {
    cmd.env("BROKER", redis.url())
        .env_remove("BACKEND")
        .env("PYTHONPATH", repo().join("tests/py"))
        .env("QUEUE", queue)
        .env("PYTHONDONTWRITEBYTECODE", "1");
}

/// Runs one request through the real Celery client (tests/py/celery_client.py).
pub fn celery_client(redis: &RedisServer, queue: &str, request: Value) -> Value {
    celery_client_env(redis, queue, &[], request)
}

pub fn celery_client_env(
    redis: &RedisServer,
    queue: &str,
    env: &[(&str, &str)],
    request: Value,
) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/py/celery_client.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    py_env(&mut cmd, redis, queue);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("python venv (make venv)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "celery client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One task through send_task + get().
pub fn call(
    redis: &RedisServer,
    queue: &str,
    name: &str,
    args: Value,
    kwargs: Value,
    options: Value,
) -> Value {
    let r = celery_client(
        redis,
        queue,
        json!({"op": "call", "timeout": 60, "tasks": [{"name": name, "args": args, "kwargs": kwargs, "options": options}]}),
    );
    r[0].clone()
}

pub fn send(redis: &RedisServer, queue: &str, tasks: Value) -> Vec<String> {
    let r = celery_client(redis, queue, json!({"op": "send", "tasks": tasks}));
    serde_json::from_value(r).unwrap()
}

/// The real Python Celery worker (prefork, acks_late, results on), in its own process group so
/// a kill takes its children too.
pub struct PyWorker {
    child: Option<Child>,
    pub log: PathBuf,
    /// `py<port>@`: its node name before Celery's `%h`.
    pub name_prefix: String,
    _dir: tempfile::TempDir,
}

impl PyWorker {
    pub fn start(
        redis: &RedisServer,
        queue: &str,
        concurrency: usize,
        visibility: f64,
    ) -> PyWorker {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("celery.log");
        let name_prefix = format!("py{}@", free_port());
        let celery = python().with_file_name("celery");
        let mut cmd = Command::new(celery);
        cmd.args([
            "-A",
            "pyapp",
            "worker",
            "-P",
            "prefork",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ])
        .args([
            "-c",
            &concurrency.to_string(),
            "-Q",
            queue,
            "-n",
            &format!("{name_prefix}%h"),
        ])
        .arg("--logfile")
        .arg(&log)
        .env("VISIBILITY", visibility.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
        py_env(&mut cmd, redis, queue);
        let child = cmd.spawn().unwrap();
        let w = PyWorker {
            child: Some(child),
            log,
            name_prefix,
            _dir: dir,
        };
        wait_for("python worker ready", Duration::from_secs(60), || {
            std::fs::read_to_string(&w.log)
                .ok()?
                .contains("ready.")
                .then_some(())
        });
        w
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL to the whole group: the main process and its pool children.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for PyWorker {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn unacked_len(redis: &RedisServer) -> usize {
    redis::cmd("HLEN")
        .arg("unacked")
        .query(&mut redis.con())
        .unwrap()
}

pub fn list(redis: &RedisServer, key: &str) -> Vec<String> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut redis.con())
        .unwrap()
}

/// The stored result record of a task, parsed.
pub fn meta(redis: &RedisServer, id: &str) -> Option<Value> {
    let s: Option<String> = redis::cmd("GET")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut redis.con())
        .unwrap();
    s.map(|s| serde_json::from_str(&s).unwrap())
}

pub fn wait_meta(redis: &RedisServer, id: &str, status: &str, timeout: Duration) -> Value {
    wait_for(&format!("{status} for {id}"), timeout, || {
        meta(redis, id).filter(|m| m["status"] == status)
    })
}

pub fn unique_queue(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
