//! Helpers for the app-database tests: a Postgres database of the test's own, an
//! OpenAI-compatible double (embeddings and chat) on its own thread, Django's cache read through
//! real Django, and plain HTTP requests.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orbit_pipeline::embed::HashingEmbedder;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::celery_harness::{worker_bin, RedisServer};
use crate::helpers::{embedding_inputs, python, read_raw, repo};

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

/// What the double answers to the next request on a path.
#[derive(Clone)]
pub enum Reply {
    /// A real-shaped success.
    Ok,
    /// A real-shaped success after this long.
    Slow(Duration),
    Status(u16, Vec<(&'static str, &'static str)>, String),
    /// Accept, read the request, never answer.
    Stall,
    /// A success with this body (for chat: any JSON the test wants, valid or not).
    Body(String),
}

#[derive(Default)]
struct DoubleState {
    embeddings: VecDeque<Reply>,
    chat: VecDeque<Reply>,
    transcriptions: VecDeque<Reply>,
    /// Every transcription upload: its multipart fields (file as its byte length and name).
    uploads: Vec<Value>,
    /// Every input text embedded, in arrival order.
    embedded: Vec<String>,
    /// Every chat request body.
    chats: Vec<Value>,
    /// Requests to `/v1/embeddings`, answered or not.
    embedding_requests: usize,
    auths: Vec<Option<String>>,
    /// Random embedding faults, when set (the chaos suite).
    faults: Option<Faults>,
}

/// Embedding faults at a rate, each of the kinds a real API shows: a 429 with `retry-after`, a
/// 500, a stall past the client's timeout, a malformed body, vectors of the wrong length.
struct Faults {
    percent: u64,
    rng: u64,
    injected: std::collections::BTreeMap<&'static str, u64>,
}

impl Faults {
    /// xorshift64: reproducible from the seed, no dependency.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn pick(&mut self, inputs: usize) -> Option<Reply> {
        if self.next() % 100 >= self.percent {
            return None;
        }
        let (name, reply) = match self.next() % 5 {
            0 => (
                "429",
                Reply::Status(
                    429,
                    vec![("retry-after", "1")],
                    json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}).to_string(),
                ),
            ),
            1 => ("500", Reply::Status(500, vec![], "{}".into())),
            2 => ("stall", Reply::Stall),
            3 => ("malformed", Reply::Body("{\"object\": \"list\", \"data\": [".into())),
            _ => {
                let data: Vec<Value> = (0..inputs)
                    .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.5, 0.5, 0.5]}))
                    .collect();
                ("wrong_length", Reply::Body(json!({"object": "list", "data": data}).to_string()))
            }
        };
        *self.injected.entry(name).or_default() += 1;
        Some(reply)
    }
}

/// An OpenAI-compatible double on its own thread and runtime, so blocking test code never stalls
/// it. Embeddings are feature-hashed (1536 dimensions, as `text-embedding-3-small`).
pub struct ApiDouble {
    pub base_url: String,
    state: Arc<Mutex<DoubleState>>,
}

pub const EMBED_DIM: usize = 1536;
pub const CHAT_MODEL: &str = "gpt-4o-mini";
pub const API_KEY: &str = "sk-test-secret-4242";

impl ApiDouble {
    pub fn start() -> ApiDouble {
        let state: Arc<Mutex<DoubleState>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((sock, _)) = l.accept().await else {
                        return;
                    };
                    tokio::spawn(serve(sock, st.clone()));
                }
            });
        });
        let addr = rx.recv().unwrap();
        ApiDouble {
            base_url: format!("http://{addr}/v1"),
            state,
        }
    }

    pub fn script_embeddings(&self, replies: Vec<Reply>) {
        self.state.lock().unwrap().embeddings.extend(replies);
    }

    /// Forgets the embedding replies not used yet.
    pub fn clear_embeddings(&self) {
        self.state.lock().unwrap().embeddings.clear();
    }

    /// Forgets the chat replies not used yet.
    pub fn clear_chat(&self) {
        self.state.lock().unwrap().chat.clear();
    }

    pub fn script_chat(&self, replies: Vec<Reply>) {
        self.state.lock().unwrap().chat.extend(replies);
    }

    /// Forgets the transcription replies not used yet.
    pub fn clear_transcriptions(&self) {
        self.state.lock().unwrap().transcriptions.clear();
    }

    pub fn script_transcriptions(&self, replies: Vec<Reply>) {
        self.state.lock().unwrap().transcriptions.extend(replies);
    }

    pub fn uploads(&self) -> Vec<Value> {
        self.state.lock().unwrap().uploads.clone()
    }

    pub fn embedded(&self) -> Vec<String> {
        self.state.lock().unwrap().embedded.clone()
    }

    pub fn embedding_requests(&self) -> usize {
        self.state.lock().unwrap().embedding_requests
    }

    pub fn chats(&self) -> Vec<Value> {
        self.state.lock().unwrap().chats.clone()
    }

    pub fn auths(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().auths.clone()
    }

    /// From now on, `percent` of embedding requests get a random fault (`Faults`); 0 stops them.
    pub fn set_faults(&self, percent: u64, seed: u64) {
        let mut s = self.state.lock().unwrap();
        let injected = s.faults.take().map(|f| f.injected).unwrap_or_default();
        s.faults = Some(Faults {
            percent,
            rng: seed.max(1),
            injected,
        });
    }

    /// The faults injected so far, by kind.
    pub fn faults_injected(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let s = self.state.lock().unwrap();
        s.faults
            .as_ref()
            .map(|f| f.injected.clone())
            .unwrap_or_default()
    }

    /// Worker environment for the OpenAI embedder against this double.
    pub fn embedder_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ORBIT_EMBEDDER", "openai".into()),
            ("OPENAI_API_KEY", API_KEY.into()),
            ("OPENAI_BASE_URL", self.base_url.clone()),
        ]
    }
}

async fn serve(mut sock: tokio::net::TcpStream, st: Arc<Mutex<DoubleState>>) {
    loop {
        let Some((path, auth, raw, ctype)) = read_raw(&mut sock).await else {
            return;
        };
        let body: Value = serde_json::from_slice(&raw).unwrap_or_default();
        let is_chat = path.ends_with("/chat/completions");
        let is_audio = path.ends_with("/audio/transcriptions");
        let upload = is_audio.then(|| multipart_fields(&raw, &ctype));
        let reply = {
            let mut s = st.lock().unwrap();
            s.auths.push(auth);
            if is_chat {
                s.chats.push(body.clone());
                s.chat.pop_front()
            } else if let Some(u) = &upload {
                s.uploads.push(u.clone());
                s.transcriptions.pop_front()
            } else {
                s.embedding_requests += 1;
                let scripted = s.embeddings.pop_front();
                let n = embedding_inputs(&body).len();
                scripted.or_else(|| s.faults.as_mut().and_then(|f| f.pick(n)))
            }
        }
        .unwrap_or(Reply::Ok);
        let ok = || {
            if is_chat {
                chat_success(&body)
            } else if let Some(u) = &upload {
                transcription_success(u)
            } else {
                let inputs = embedding_inputs(&body);
                st.lock().unwrap().embedded.extend(inputs.iter().cloned());
                embeddings_success(&inputs)
            }
        };
        let (status, headers, text) = match reply {
            Reply::Ok => (200, vec![], ok()),
            Reply::Slow(d) => {
                tokio::time::sleep(d).await;
                (200, vec![], ok())
            }
            Reply::Body(b) => (200, vec![], b),
            Reply::Status(s, h, b) => (s, h, b),
            Reply::Stall => {
                tokio::time::sleep(Duration::from_secs(600)).await;
                return;
            }
        };
        let mut resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-ratelimit-remaining-requests: 4999\r\n",
            text.len()
        );
        for (k, v) in headers {
            resp.push_str(&format!("{k}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        resp.push_str(&text);
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn embeddings_success(inputs: &[String]) -> String {
    let e = HashingEmbedder::new(EMBED_DIM);
    let mut data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": e.embed_one(t)}))
        .collect();
    // The API does not promise order: the client must sort by index.
    data.reverse();
    json!({"object": "list", "data": data, "model": "text-embedding-3-small",
           "usage": {"prompt_tokens": 5, "total_tokens": 5}})
    .to_string()
}

/// A chat completion with the real response shape: a JSON answer matching the schema when one
/// was asked for (`response_format: json_schema`), else an answer citing passage [1].
pub fn chat_success(req: &Value) -> String {
    if req["response_format"]["type"] == "json_schema" {
        let content = json!({"summary": "Ana and Ben agree to ship the release on Friday.",
            "action_items": [{"owner": "Ana", "task": "send the slides", "due": "Friday"},
                             {"owner": null, "task": "book the room", "due": null}],
            "sentiment": "positive", "speaker_count": 2});
        return chat_body(Some(&content.to_string()), None, "stop");
    }
    chat_with_prompt(req)
}

/// A completion whose message is `content`/`refusal`, ending with `finish_reason`.
pub fn chat_body(content: Option<&str>, refusal: Option<&str>, finish_reason: &str) -> String {
    json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1_764_000_000,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal},
            "logprobs": null, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 211, "completion_tokens": 57, "total_tokens": 268}
    })
    .to_string()
}

/// What a verbose_json transcription looks like, `usage` included.
fn transcription_success(upload: &Value) -> String {
    let secs = upload["file_bytes"].as_f64().unwrap_or(0.0) / 32000.0;
    json!({"task": "transcribe", "language": "english", "duration": secs,
        "text": " Hello from the Blink test. Ana will send the slides on Friday.",
        "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": secs, "text": " Hello from the Blink test. Ana will send the slides on Friday.",
            "tokens": [50364, 2425], "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.1, "no_speech_prob": 0.01}],
        "usage": {"type": "duration", "seconds": secs.ceil()}})
    .to_string()
}

/// Field name → value of a multipart body; the file as its name and byte count.
fn multipart_fields(raw: &[u8], ctype: &str) -> Value {
    let Some(boundary) = ctype.split("boundary=").nth(1) else {
        return json!({"error": "not multipart"});
    };
    let delim = format!("--{}", boundary.trim_matches('"'));
    let mut out = serde_json::Map::new();
    let mut rest = raw;
    while let Some(i) = find(rest, delim.as_bytes()) {
        rest = &rest[i + delim.len()..];
        let Some(h) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..h]).to_string();
        let body_start = h + 4;
        let end = find(&rest[body_start..], delim.as_bytes())
            .map(|e| body_start + e - 2)
            .unwrap_or(rest.len());
        let body = &rest[body_start..end.max(body_start)];
        let name = head
            .split("name=\"")
            .nth(1)
            .and_then(|x| x.split('"').next())
            .unwrap_or("")
            .to_string();
        if let Some(fname) = head
            .split("filename=\"")
            .nth(1)
            .and_then(|x| x.split('"').next())
        {
            out.insert("file_name".into(), json!(fname));
            out.insert("file_bytes".into(), json!(body.len()));
        } else if !name.is_empty() {
            out.insert(name, json!(String::from_utf8_lossy(body)));
        }
    }
    Value::Object(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn chat_with_prompt(req: &Value) -> String {
    let prompt: String = req["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["content"].as_str()).collect())
        .unwrap_or_default();
    json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1_764_000_000,
        "model": format!("{CHAT_MODEL}-2024-07-18"),
        "choices": [{"index": 0, "message": {"role": "assistant",
            "content": "From your memory: see [1].", "refusal": null},
            "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt.len() / 4, "completion_tokens": 9,
                  "total_tokens": prompt.len() / 4 + 9},
        "system_fingerprint": "fp_test"
    })
    .to_string()
}

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
