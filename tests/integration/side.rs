//! The four side tasks through the queue with the real Celery client, against real local servers
//! (web-push-testing, maildev, aiosmtpd, real espeak-ng/sox audio) and, for what those cannot
//! produce, small local HTTP/TCP servers of the test's own.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::app_harness::*;
use crate::celery_harness::*;
use crate::helpers::{python, repo};

fn node_dir() -> PathBuf {
    std::env::var("ORBIT_TEST_NODE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/orbit-worker/node")
        })
}

/// A server process of the test's own, killed at the end.
struct Server {
    child: Child,
}

impl Server {
    fn start(mut cmd: Command, port: u16) -> Server {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("test server");
        wait_for("test server port", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
        Server { child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(script: &str, args: &[String]) -> Command {
    let mut c = Command::new("node");
    c.arg("-r").arg(repo().join("tests/js/loopback.cjs"));
    c.arg(node_dir().join("node_modules").join(script));
    c.args(args);
    c
}

/// A JSON request to an npm test server: (status, the JSON of the body, chunked or not).
fn http(addr: &str, method: &str, path: &str, body: &Value) -> (u16, String) {
    let (status, body) = http_request(addr, method, path, None, (!body.is_null()).then_some(body));
    let body = match (body.find(['{', '[']), body.rfind(['}', ']'])) {
        (Some(a), Some(z)) if z >= a => body[a..=z].to_string(),
        _ => body,
    };
    (status, body)
}

fn users_db() -> PgDb {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.jsonl");
    std::fs::write(
        &p,
        [201, 202, 203]
            .iter()
            .map(|u| json!({"user_id": u, "kind": "note", "source_id": format!("n{u}"), "text": "hi", "created_at": "2026-01-01T00:00:00Z"}).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    PgDb::seeded(&p)
}

fn side_worker(redis: &RedisServer, db: &PgDb, q: &str, env: &[(&str, String)]) -> WorkerProc {
    let mut e: Vec<(&str, &str)> = vec![("DATABASE_URL", Box::leak(db.url().into_boxed_str()))];
    for (k, v) in env {
        e.push((k, v.as_str()));
    }
    WorkerProc::start_env(redis, &["-Q", q], &e)
}

// ---- Web Push ---------------------------------------------------------------------------------

/// A VAPID key pair: the PEM and the public key as browsers are given it (base64url).
pub(crate) fn vapid(dir: &Path) -> (String, String) {
    let pem = dir.join("vapid.pem");
    let ok = Command::new("openssl")
        .args([
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
        ])
        .arg(&pem)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl");
    let pem = std::fs::read_to_string(pem).unwrap();
    let public = web_push::VapidSignatureBuilder::from_pem_no_sub(pem.as_bytes())
        .unwrap()
        .get_public_key();
    use base64::Engine;
    (
        pem,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
    )
}

struct Sub {
    endpoint: String,
    p256dh: String,
    auth: String,
    hash: String,
}

fn subscribe(wpt: &str, public: &str) -> Sub {
    let (code, body) = http(
        wpt,
        "POST",
        "/subscribe",
        &json!({"userVisibleOnly": "true", "applicationServerKey": public}),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let d = &v["data"];
    Sub {
        endpoint: d["endpoint"].as_str().unwrap().to_string(),
        p256dh: d["keys"]["p256dh"].as_str().unwrap().to_string(),
        auth: d["keys"]["auth"].as_str().unwrap().to_string(),
        hash: d["clientHash"].as_str().unwrap().to_string(),
    }
}

fn add_sub(db: &PgDb, user: i64, endpoint: &str, s: &Sub) -> String {
    db.sql(&format!(
        "INSERT INTO notifications_pushsubscription (user_id, endpoint, p256dh, auth) VALUES ({user}, '{endpoint}', '{}', '{}') RETURNING id",
        s.p256dh, s.auth
    ))
}

fn notifications(wpt: &str, hash: &str) -> Vec<Value> {
    let (code, body) = http(
        wpt,
        "POST",
        "/get-notifications",
        &json!({"clientHash": hash}),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| serde_json::from_str(m.as_str().unwrap()).unwrap())
        .collect()
}

/// A web-push-testing server on a free port, and its address.
fn web_push_testing() -> (Server, String) {
    let port = free_port();
    let server = Server::start(
        node("web-push-testing/src/bin/server.js", &[port.to_string()]),
        port,
    );
    (server, format!("127.0.0.1:{port}"))
}

#[test]
fn web_push_delivers_encrypted_payloads_and_deletes_expired_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let (_wpt, wpt) = web_push_testing();
    let (pem, public) = vapid(dir.path());
    let db = users_db();
    let redis = RedisServer::start(false);
    let q = unique_queue("push");
    let _w = side_worker(
        &redis,
        &db,
        &q,
        &[
            ("VAPID_PRIVATE_KEY", pem),
            ("VAPID_SUBJECT", "mailto:ops@orbitingfox.test".into()),
        ],
    );

    let (a, b, gone) = (
        subscribe(&wpt, &public),
        subscribe(&wpt, &public),
        subscribe(&wpt, &public),
    );
    for s in [&a, &b, &gone] {
        add_sub(&db, 201, &s.endpoint, s);
    }
    let (code, _) = http(
        &wpt,
        "POST",
        &format!("/expire-subscription/{}", gone.hash),
        &Value::Null,
    );
    assert_eq!(code, 200);

    let payload = json!({"kind": "message", "title": "Ana", "body": "Lunch at 12? 🍜", "url": "/messages/7", "tag": "conv-7"});
    let r = call(
        &redis,
        &q,
        "notifications.send_push",
        json!([201, payload]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(
        (
            r["result"]["sent"].as_u64(),
            r["result"]["removed"].as_u64(),
            r["result"]["failed"].as_u64()
        ),
        (Some(2), Some(1), Some(0)),
        "{r}"
    );
    for s in [&a, &b] {
        let got = notifications(&wpt, &s.hash);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["body"], "Lunch at 12? 🍜");
        assert_eq!(got[0]["kind"], "message");
        assert_eq!(got[0]["url"], "/messages/7");
    }
    assert_eq!(
        db.sql(&format!(
            "SELECT count(*) FROM notifications_pushsubscription WHERE endpoint = '{}'",
            gone.endpoint
        )),
        "0"
    );

    // A body far over the limit is trimmed, never refused.
    let long = json!({"kind": "blink_share", "title": "Blink", "body": "word ".repeat(2000), "url": "/blink/1", "tag": ""});
    let r = call(
        &redis,
        &q,
        "notifications.send_push",
        json!([201, long]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["result"]["sent"], 2, "{r}");
    assert!(r["result"]["payload_bytes"].as_u64().unwrap() <= 3052);
    let got = notifications(&wpt, &a.hash);
    assert!(got[1]["body"].as_str().unwrap().ends_with('…'));

    // No subscriptions: nothing to do, and said so.
    let r = call(
        &redis,
        &q,
        "notifications.send_push",
        json!([202, payload]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["result"]["sent"], 0, "{r}");
    let r = call(
        &redis,
        &q,
        "notifications.send_push",
        json!([201, {"kind": "spam", "title": "x"}]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["raised"]["type"], "TypeError", "{r}");
}

/// A push service that answers each path as told, counting hits: `(path, [statuses in order])`;
/// status 0 means stall (never answer).
fn push_service(script: Vec<(&'static str, Vec<u16>)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hits: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = hits.clone();
    let script = Arc::new(Mutex::new(script));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let (h, script) = (h.clone(), script.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if got.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&got).to_string();
                let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
                h.lock().unwrap().push(path.clone());
                let status = {
                    let mut sc = script.lock().unwrap();
                    sc.iter_mut()
                        .find(|(p, _)| *p == path)
                        .map(|(_, v)| if v.len() > 1 { v.remove(0) } else { v[0] })
                        .unwrap_or(201)
                };
                if status == 0 {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                let extra = if status == 429 {
                    "retry-after: 1\r\n"
                } else {
                    ""
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\n{extra}connection: close\r\n\r\n"
                );
            });
        }
    });
    (addr, hits)
}

#[test]
fn web_push_failures_land_on_the_right_action_and_retries_skip_what_was_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_wpt, wpt) = web_push_testing();
    let (pem, public) = vapid(dir.path());
    let keys = subscribe(&wpt, &public);
    let (svc, hits) = push_service(vec![
        ("/gone", vec![404]),
        ("/big", vec![413]),
        ("/busy", vec![429, 201]),
        ("/down", vec![503, 201]),
        ("/slow", vec![0, 201]),
        ("/ok", vec![201]),
    ]);
    let db = users_db();
    for p in ["/gone", "/big", "/busy", "/down", "/slow", "/ok"] {
        add_sub(&db, 203, &format!("http://{svc}{p}"), &keys);
    }
    let redis = RedisServer::start(false);
    let q = unique_queue("pushfail");
    let _w = side_worker(
        &redis,
        &db,
        &q,
        &[
            ("VAPID_PRIVATE_KEY", pem),
            ("ORBIT_PUSH_TIMEOUT", "1".into()),
        ],
    );
    let payload = json!({"kind": "group_invite", "title": "Book club", "body": "Join us", "url": "/groups/3", "tag": "group-3"});
    let r = call(
        &redis,
        &q,
        "notifications.send_push",
        json!([203, payload]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let res = &r["result"];
    assert_eq!(
        (
            res["sent"].as_u64(),
            res["removed"].as_u64(),
            res["failed"].as_u64()
        ),
        (Some(4), Some(1), Some(1)),
        "{res}"
    );
    assert!(
        res["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{res}"
    );
    // Served ones are not sent again on the retry; the others were tried twice.
    let hits = hits.lock().unwrap().clone();
    let count = |p: &str| hits.iter().filter(|h| *h == p).count();
    assert_eq!(
        (count("/gone"), count("/big"), count("/ok")),
        (1, 1, 1),
        "{hits:?}"
    );
    assert_eq!(
        (count("/busy"), count("/down"), count("/slow")),
        (2, 2, 2),
        "{hits:?}"
    );
    assert_eq!(
        db.sql("SELECT count(*) FROM notifications_pushsubscription WHERE user_id = 203"),
        "5"
    );
}

/// The outbound policy with its default (tests otherwise lift it): a push endpoint or recording
/// URL inside the worker's network, by literal address or by a name that resolves there, is
/// refused for good: no request reaches it, nothing is retried, the reason is stated.
#[test]
fn outbound_urls_into_the_workers_network_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_wpt, wpt) = web_push_testing();
    let (pem, public) = vapid(dir.path());
    let keys = subscribe(&wpt, &public);
    let (svc, hits) = push_service(vec![]);
    let port = svc.rsplit(':').next().unwrap().to_string();
    let db = users_db();
    add_sub(&db, 202, &format!("http://{svc}/literal"), &keys);
    add_sub(&db, 202, &format!("http://localhost:{port}/named"), &keys);
    let redis = RedisServer::start(false);
    let q = unique_queue("ssrf");
    let _w = side_worker(
        &redis,
        &db,
        &q,
        &[
            ("VAPID_PRIVATE_KEY", pem),
            ("ORBIT_ALLOW_PRIVATE_URLS", "false".into()),
            ("MEDIA_ROOT", dir.path().to_str().unwrap().into()),
            ("OPENAI_API_KEY", API_KEY.into()),
            ("ORBIT_MAX_AUDIO_BYTES", "2028".into()),
        ],
    );
    let payload =
        json!({"kind": "group_invite", "title": "t", "body": "b", "url": "/", "tag": "x"});
    let r = call(
        &redis,
        &q,
        "notifications.send_push",
        json!([202, payload]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(r["result"]["failed"].as_u64(), Some(2), "{r}");
    for e in r["result"]["errors"].as_array().unwrap() {
        assert!(
            e["error"].as_str().unwrap().contains("endpoint refused"),
            "{r}"
        );
    }
    for url in [
        format!("http://{svc}/a.wav"),
        format!("http://localhost:{port}/a.wav"),
        "http://169.254.169.254/latest/meta-data/a.wav".to_string(),
    ] {
        let id = db.sql(&format!("INSERT INTO blink_blinkaudio (owner_id, audio_file) VALUES (202, '{url}') RETURNING id"));
        let r = call(
            &redis,
            &q,
            "blink.transcribe_audio",
            json!([id.parse::<i64>().unwrap()]),
            json!({}),
            json!({}),
        );
        assert_eq!(r["raised"]["type"], "AudioUrlRefused", "{url}: {r}");
    }
    assert!(
        hits.lock().unwrap().is_empty(),
        "{:?}",
        hits.lock().unwrap()
    );
    // And the audio size limit is a setting: a 4 KiB file is over this worker's 2 KiB.
    std::fs::create_dir_all(dir.path().join("blink")).unwrap();
    std::fs::write(dir.path().join("blink/small.wav"), vec![0u8; 4096]).unwrap();
    let id = db.sql("INSERT INTO blink_blinkaudio (owner_id, audio_file) VALUES (202, 'blink/small.wav') RETURNING id");
    let r = call(
        &redis,
        &q,
        "blink.transcribe_audio",
        json!([id.parse::<i64>().unwrap()]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["raised"]["type"], "FileTooLarge", "{r}");
    assert!(
        r["raised"]["str"]
            .as_str()
            .unwrap()
            .contains("ORBIT_MAX_AUDIO_BYTES"),
        "{r}"
    );
}

// ---- Email ------------------------------------------------------------------------------------

#[test]
fn verification_email_arrives_multipart_and_smtp_failures_retry_or_give_up() {
    let (smtp, web) = (free_port(), free_port());
    let _md = Server::start(
        node(
            "maildev/dist/bin/maildev.js",
            &[
                "--ip",
                "127.0.0.1",
                "--web-ip",
                "127.0.0.1",
                "-s",
                &smtp.to_string(),
                "-w",
                &web.to_string(),
            ]
            .map(String::from),
        ),
        web,
    );
    let db = users_db();
    db.sql("UPDATE accounts_user SET email = 'new.user@example.test' WHERE id = 201");
    db.sql("UPDATE accounts_user SET email = 'tempfail@example.test' WHERE id = 202");
    db.sql("UPDATE accounts_user SET email = 'permfail@example.test' WHERE id = 203");
    let redis = RedisServer::start(false);
    let q = unique_queue("mail");
    let w = side_worker(
        &redis,
        &db,
        &q,
        &[("SMTP_URL", format!("smtp://127.0.0.1:{smtp}"))],
    );
    let token = "tok-9f8e7d6c5b4a";
    let url = format!("https://app.orbitingfox.test/verify/?token={token}");
    let r = call(
        &redis,
        &q,
        "config.send_verification_email",
        json!([201, url]),
        json!({}),
        json!({}),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert!(!r.to_string().contains(token), "the token is in the result");
    let (code, body) = http(
        &format!("127.0.0.1:{web}"),
        "GET",
        "/api/email",
        &Value::Null,
    );
    assert_eq!(code, 200, "{body}");
    let mails: Value = serde_json::from_str(&body).unwrap();
    let m = &mails[0];
    assert_eq!(m["to"][0]["address"], "new.user@example.test");
    assert!(m["text"].as_str().unwrap().contains(&url), "{m}");
    assert!(
        m["html"]
            .as_str()
            .unwrap()
            .contains(&url.replace('&', "&amp;")),
        "{m}"
    );
    let (code, source) = http_get(
        &format!("127.0.0.1:{web}"),
        &format!("/api/email/{}/source", m["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(code, 200);
    assert!(
        source.contains("multipart/alternative")
            && source.contains("text/plain")
            && source.contains("text/html"),
        "{source}"
    );
    w.wait_log("success line", "config.send_verification_email[");
    assert!(!w.log().contains(token), "the token reached a log line");

    // 451 and 550 from aiosmtpd: retry, and give up recording the address.
    let port = free_port();
    let mut cmd = Command::new(python());
    cmd.args([
        "-m",
        "aiosmtpd",
        "-n",
        "-l",
        &format!("127.0.0.1:{port}"),
        "-c",
        "smtp_fail.FailHandler",
    ])
    .env("PYTHONPATH", repo().join("tests/py"));
    let _fail = Server::start(cmd, port);
    let q2 = unique_queue("mailfail");
    let _w2 = side_worker(
        &redis,
        &db,
        &q2,
        &[("SMTP_URL", format!("smtp://127.0.0.1:{port}"))],
    );
    let ids = send(
        &redis,
        &q2,
        json!([
            {"name": "config.send_verification_email", "args": [202, url]},
            {"name": "config.send_verification_email", "args": [203, url]},
        ]),
    );
    let m = wait_meta(&redis, &ids[0], "RETRY", Duration::from_secs(30));
    assert!(
        m["result"]["exc_message"][0]
            .as_str()
            .unwrap()
            .contains("451"),
        "{m}"
    );
    let r = celery_client(
        &redis,
        &q2,
        json!({"op": "get", "ids": [ids[1]], "timeout": 30}),
    );
    assert_eq!(r[0]["raised"]["type"], "AddressRejected", "{r}");
    assert_eq!(
        db.sql("SELECT email, smtp_code FROM orbitworker_emailbounce"),
        "permfail@example.test|550"
    );

    // A server that wants authentication: a configuration error, not a retry.
    let (asmtp, aweb) = (free_port(), free_port());
    let _auth = Server::start(
        node(
            "maildev/dist/bin/maildev.js",
            &[
                "--ip",
                "127.0.0.1",
                "--web-ip",
                "127.0.0.1",
                "-s",
                &asmtp.to_string(),
                "-w",
                &aweb.to_string(),
                "--incoming-user",
                "app",
                "--incoming-pass",
                "secret",
            ]
            .map(String::from),
        ),
        aweb,
    );
    // A send through `smtp_url` ends in a ConfigError whose text holds `says`.
    let config_error = |name: &str, smtp_url: String, says: &str| {
        let q = unique_queue(name);
        let _w = side_worker(&redis, &db, &q, &[("SMTP_URL", smtp_url)]);
        let r = call(
            &redis,
            &q,
            "config.send_verification_email",
            json!([201, url]),
            json!({}),
            json!({}),
        );
        assert_eq!(r["raised"]["type"], "ConfigError", "{r}");
        assert!(r["raised"]["str"].as_str().unwrap().contains(says), "{r}");
    };
    config_error(
        "mailauth",
        format!("smtp://127.0.0.1:{asmtp}"),
        "authentication",
    );
    // Credentials for a server that offers no authentication at all (aiosmtpd here): lettre
    // finds no mechanism to use, a configuration error too (issue 13: it was retried).
    config_error(
        "mailnomech",
        format!("smtp://app:secret@127.0.0.1:{port}"),
        "mechanism",
    );

    // A server that accepts and never greets: the send times out and the task retries.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let q3 = unique_queue("mailstall");
    let _w3 = side_worker(
        &redis,
        &db,
        &q3,
        &[
            ("SMTP_URL", format!("smtp://127.0.0.1:{sport}")),
            ("ORBIT_SMTP_TIMEOUT", "2".into()),
        ],
    );
    let ids = send(
        &redis,
        &q3,
        json!([{"name": "config.send_verification_email", "args": [201, url]}]),
    );
    let m = wait_meta(&redis, &ids[0], "RETRY", Duration::from_secs(30));
    assert!(
        m["result"]["exc_message"][0]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{m}"
    );
}

// ---- Audio ------------------------------------------------------------------------------------

/// Real speech: espeak-ng to WAV (two voices for two speakers), sox to FLAC and OGG.
fn audio_fixtures(media: &Path) {
    std::fs::create_dir_all(media.join("blink")).unwrap();
    let say = |voice: &str, text: &str, out: &Path| {
        let ok = Command::new("espeak-ng")
            .args(["-v", voice, "-w"])
            .arg(out)
            .arg(text)
            .status()
            .unwrap()
            .success();
        assert!(ok, "espeak-ng");
    };
    let a = media.join("blink/ana.wav");
    let b = media.join("blink/ben.wav");
    say(
        "en-us",
        "Hello from the Blink test. I will send the slides on Friday.",
        &a,
    );
    say(
        "en-gb+f3",
        "Great. I will book the room for the release.",
        &b,
    );
    let sox = |args: &[&Path]| {
        let ok = Command::new("sox").args(args).status().unwrap().success();
        assert!(ok, "sox {args:?}");
    };
    sox(&[&a, &b, &media.join("blink/two.wav")]);
    sox(&[&media.join("blink/two.wav"), &media.join("blink/two.flac")]);
    sox(&[&media.join("blink/two.wav"), &media.join("blink/two.ogg")]);
    // Over the 25 MiB upload limit.
    let f = std::fs::File::create(media.join("blink/huge.wav")).unwrap();
    f.set_len(26 * 1024 * 1024).unwrap();
    std::fs::write(media.join("blink/voice.aiff"), b"FORM").unwrap();
}

#[test]
fn transcription_and_analysis_through_the_queue() {
    let media = tempfile::tempdir().unwrap();
    audio_fixtures(media.path());
    let db = users_db();
    let api = OpenAiDouble::start();
    let redis = RedisServer::start(false);
    let q = unique_queue("blink");
    let _w = side_worker(
        &redis,
        &db,
        &q,
        &[
            ("MEDIA_ROOT", media.path().to_str().unwrap().into()),
            ("OPENAI_API_KEY", API_KEY.into()),
            ("OPENAI_BASE_URL", api.base_url.clone()),
            ("ORBIT_CHAT_BASE_URL", api.base_url.clone()),
        ],
    );
    let blink = |file: &str| {
        db.sql(&format!("INSERT INTO blink_blinkaudio (owner_id, audio_file) VALUES (201, '{file}') RETURNING id")).parse::<i64>().unwrap()
    };
    let status = |id: i64| {
        db.sql(&format!("SELECT transcription_status, ai_analysis_status, transcription_error, ai_analysis_error FROM blink_blinkaudio WHERE id = {id}"))
    };
    let run = |name: &str, id: i64| call(&redis, &q, name, json!([id]), json!({}), json!({}));

    // WAV, FLAC and OGG through the multipart path.
    for (file, size) in ["blink/two.wav", "blink/two.flac", "blink/two.ogg"]
        .map(|f| (f, std::fs::metadata(media.path().join(f)).unwrap().len()))
    {
        let id = blink(file);
        let r = run("blink.transcribe_audio", id);
        assert_eq!(r["state"], "SUCCESS", "{file}: {r}");
        let up = api.uploads().last().unwrap().clone();
        assert_eq!(up["file_name"], file.rsplit('/').next().unwrap(), "{up}");
        assert_eq!(
            up["file_bytes"].as_u64(),
            Some(size),
            "the whole file was uploaded"
        );
        assert_eq!(
            (up["model"].as_str(), up["response_format"].as_str()),
            (Some("whisper-1"), Some("verbose_json")),
            "{up}"
        );
        assert!(
            status(id).starts_with("completed|pending"),
            "{}",
            status(id)
        );
        let t = db.sql(&format!("SELECT transcript, jsonb_array_length(transcript_segments), duration_seconds > 0 FROM blink_blinkaudio WHERE id = {id}"));
        assert!(
            t.starts_with("Hello from the Blink test.") && t.ends_with("|1|t"),
            "{t}"
        );
    }
    let usage = db.sql("SELECT count(*), bool_and(audio_seconds > 0), bool_and(cost_usd > 0), min(feature) FROM orbitpilot_aiusagelog");
    assert_eq!(usage, "3|t|t|blink_transcription");

    // A self-hosted server's answer without `usage` is accepted.
    api.script_transcriptions(vec![Reply::Body(json!({"task": "transcribe", "language": "english", "duration": 2.5, "text": "No usage here.", "segments": []}).to_string())]);
    let id = blink("blink/ana.wav");
    assert_eq!(run("blink.transcribe_audio", id)["state"], "SUCCESS");
    assert!(status(id).starts_with("completed"));

    // A rate limit retries at the task layer with the server's hint; an exhausted quota fails
    // at once as a configuration error.
    let before = api.uploads().len();
    api.script_transcriptions(vec![Reply::Status(429, vec![("retry-after", "1")], json!({"error": {"message": "Rate limit reached for whisper-1", "type": "requests", "code": "rate_limit_exceeded"}}).to_string())]);
    let id = blink("blink/ana.wav");
    let r = run("blink.transcribe_audio", id);
    assert_eq!(r["state"], "SUCCESS", "{r}");
    assert_eq!(api.uploads().len(), before + 2);
    api.script_transcriptions(vec![Reply::Status(429, vec![], json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}).to_string())]);
    let id = blink("blink/ana.wav");
    let r = run("blink.transcribe_audio", id);
    assert_eq!(r["raised"]["type"], "ConfigError", "{r}");
    assert_eq!(
        api.uploads().len(),
        before + 3,
        "no retry after insufficient_quota"
    );
    assert!(
        status(id).starts_with("failed|") && status(id).contains("quota"),
        "{}",
        status(id)
    );
    // A 503 storm on the upload: never retried inside the call (an upload of minutes), only at
    // the task layer, once per allowed retry: 1 + 3 uploads, then failed.
    let storm = api.uploads().len();
    api.script_transcriptions(vec![
        Reply::Status(
            503,
            vec![("retry-after", "0")],
            "{}".into()
        );
        6
    ]);
    let id = blink("blink/ana.wav");
    let r = run("blink.transcribe_audio", id);
    assert_eq!(r["state"], "FAILURE", "{r}");
    assert_eq!(
        api.uploads().len() - storm,
        4,
        "one upload per task attempt"
    );
    assert!(status(id).starts_with("failed|"), "{}", status(id));
    api.clear_transcriptions();

    // Too big and unknown formats fail before any upload.
    let uploads = api.uploads().len();
    let big = blink("blink/huge.wav");
    let r = run("blink.transcribe_audio", big);
    assert_eq!(r["raised"]["type"], "FileTooLarge", "{r}");
    assert!(
        status(big).starts_with("failed|") && status(big).contains("25 MiB"),
        "{}",
        status(big)
    );
    let aiff = blink("blink/voice.aiff");
    let r = run("blink.transcribe_audio", aiff);
    assert_eq!(r["raised"]["type"], "UnsupportedFormat", "{r}");
    assert_eq!(api.uploads().len(), uploads, "nothing reached the server");
    let r = run("blink.transcribe_audio", 99_999_999);
    assert_eq!(r["raised"]["type"], "AudioNotFound", "{r}");

    // Analysis: the schema goes out strict; the fields are stored.
    let done = blink("blink/two.wav");
    assert_eq!(run("blink.transcribe_audio", done)["state"], "SUCCESS");
    let r = run("blink.analyse_audio", done);
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let req = api.chats().last().unwrap().clone();
    assert_eq!(req["response_format"]["type"], "json_schema");
    assert_eq!(req["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        req["response_format"]["json_schema"]["schema"]["additionalProperties"],
        false
    );
    assert!(req["messages"][1]["content"]
        .as_str()
        .unwrap()
        .contains("Hello from the Blink test"));
    let row = db.sql(&format!("SELECT ai_analysis_status, summary, sentiment, speaker_count, jsonb_array_length(action_items), action_items->0->>'owner' FROM blink_blinkaudio WHERE id = {done}"));
    assert_eq!(
        row,
        "completed|Ana and Ben agree to ship the release on Friday.|positive|2|2|Ana"
    );
    assert_eq!(db.sql("SELECT count(*) FROM orbitpilot_aiusagelog WHERE feature = 'blink_analysis' AND prompt_tokens = 211"), "1");

    // Refusal, truncation, malformed JSON twice, and a missing transcript.
    api.script_chat(vec![Reply::Body(chat_body(
        None,
        Some("I can't help with that."),
        "stop",
    ))]);
    let r = run("blink.analyse_audio", done);
    assert_eq!(r["raised"]["type"], "AnalysisRefused", "{r}");
    assert!(status(done).contains("refused"), "{}", status(done));
    api.script_chat(vec![Reply::Body(chat_body(
        Some("{\"summary\": \"cut"),
        None,
        "length",
    ))]);
    let r = run("blink.analyse_audio", done);
    assert_eq!(r["raised"]["type"], "AnalysisTruncated", "{r}");
    let chats = api.chats().len();
    api.script_chat(vec![
        Reply::Body(chat_body(Some("not json"), None, "stop")),
        Reply::Body(chat_body(Some("{\"summary\": 1}"), None, "stop")),
    ]);
    let r = run("blink.analyse_audio", done);
    assert_eq!(r["raised"]["type"], "AnalysisMalformed", "{r}");
    assert_eq!(
        api.chats().len(),
        chats + 2,
        "malformed JSON is retried exactly once"
    );
    assert!(
        status(done).starts_with("completed|failed"),
        "{}",
        status(done)
    );
    let fresh = blink("blink/ben.wav");
    let chats = api.chats().len();
    let r = run("blink.analyse_audio", fresh);
    assert_eq!(r["raised"]["type"], "TranscriptMissing", "{r}");
    assert_eq!(
        api.chats().len(),
        chats,
        "the model was called without a transcript"
    );
    assert!(
        status(fresh).ends_with("|no completed transcript to analyse (transcription is pending)"),
        "{}",
        status(fresh)
    );
}
