//! Redis Sentinel as managed and self-run Redis deployments use it: the real Celery client and
//! our worker both find the master through a sentinel (`sentinel://`, the master's name in the
//! transport options, as kombu reads them), and the worker follows a failover to the new master
//! without a restart.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::celery_harness::*;

const MASTER: &str = "orbitmaster";

/// A redis-server in sentinel mode watching one master, quorum 1 (so it may fail over alone).
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master: &RedisServer) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 10000\n",
                dir.path().display(),
                master.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (make test installs it)");
        Sentinel {
            port,
            child,
            _dir: dir,
        }
    }

    fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port).as_str())?;
        let mut con = client.get_connection()?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con)
    }

    /// The master's port as this sentinel names it now.
    fn master_port(&self) -> Option<u16> {
        let addr: Option<(String, String)> = self
            .cmd(&["SENTINEL", "get-master-addr-by-name", MASTER])
            .ok()?;
        addr?.1.parse().ok()
    }

    /// kombu's spelling: one `sentinel://` per sentinel, `;`-joined; an unreachable one first, so
    /// the list is really walked.
    fn url(&self) -> String {
        format!(
            "sentinel://127.0.0.1:{}/0;sentinel://127.0.0.1:{}/0",
            free_port(),
            self.port
        )
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn role(redis: &RedisServer) -> String {
    let r: Vec<redis::Value> = redis::cmd("ROLE").query(&mut redis.con()).unwrap();
    match &r[0] {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        v => format!("{v:?}"),
    }
}

#[test]
fn the_celery_client_and_our_worker_meet_through_a_sentinel_and_follow_a_failover() {
    let a = RedisServer::start(false);
    let b = RedisServer::start(false);
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(a.port)
        .query(&mut b.con())
        .unwrap();
    let sentinel = Sentinel::start(&a);
    wait_for(
        "the sentinel to see the replica",
        Duration::from_secs(30),
        || {
            let replicas: Vec<std::collections::HashMap<String, String>> =
                sentinel.cmd(&["SENTINEL", "replicas", MASTER]).ok()?;
            replicas
                .iter()
                .any(|r| {
                    r.get("port") == Some(&b.port.to_string())
                        && r.get("flags").is_some_and(|f| f == "slave")
                })
                .then_some(())
        },
    );
    let url = sentinel.url();
    let options = format!(r#"{{"master_name": "{MASTER}"}}"#);
    let q = unique_queue("sentinel");
    let w = WorkerProc::start_env(
        &a,
        &["-Q", &q],
        &[
            ("REDIS_URL", url.as_str()),
            ("CELERY_BROKER_TRANSPORT_OPTIONS", options.as_str()),
        ],
    );
    let client_env = [("BROKER", url.as_str()), ("MASTER_NAME", MASTER)];
    let echo = |word: &str| {
        celery_client_env(
            &a,
            &q,
            &client_env,
            json!({"op": "call", "timeout": 60, "tasks": [{"name": "orbit.echo", "args": [word]}]}),
        )[0]
        .clone()
    };
    let r = echo("before");
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(r["result"]["args"], json!(["before"]));
    // Written on the master the sentinel names.
    let id = r["id"].as_str().unwrap();
    assert!(meta(&a, id).is_some(), "the result is on the master");

    // Failover: b is promoted, a demoted to its replica. The worker keeps running.
    let _: String = sentinel.cmd(&["SENTINEL", "FAILOVER", MASTER]).unwrap();
    wait_for(
        "b to be master and a its replica",
        Duration::from_secs(60),
        || {
            (sentinel.master_port() == Some(b.port) && role(&b) == "master" && role(&a) == "slave")
                .then_some(())
        },
    );
    let r = echo("after");
    assert_eq!(r["state"], "SUCCESS", "{r}: {}", w.log());
    assert_eq!(r["result"]["args"], json!(["after"]));
    let id = r["id"].as_str().unwrap();
    assert!(meta(&b, id).is_some(), "the result is on the new master");
    assert_eq!(
        list(&b, &q).len(),
        0,
        "nothing left on the new master's queue"
    );
}

#[test]
fn a_sentinel_url_without_a_master_name_is_refused_at_start_up() {
    let out = Command::new(worker_bin())
        .args(["worker", "-Q", "sentinel-refused"])
        .env("REDIS_URL", "sentinel://127.0.0.1:1")
        .env_remove("CELERY_BROKER_URL")
        .env_remove("CELERY_RESULT_BACKEND")
        .env_remove("CELERY_BROKER_TRANSPORT_OPTIONS")
        .env("ORBIT_EMBEDDER", "hashing")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("master_name"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
