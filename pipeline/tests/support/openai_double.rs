//! The one OpenAI-compatible double every test and benchmark uses (the pipeline's suite, the
//! worker's suite and `make bench-embed` include this file by path): `/v1/embeddings`,
//! `/v1/chat/completions` and `/v1/audio/transcriptions` with the real response shapes, scripted
//! replies and random faults, and a rate-limit mode that behaves as the API does (a tokens- and
//! requests-per-minute bucket refilled continuously, `x-ratelimit-*` headers on every answer, a
//! 429 with `retry-after` for a request the bucket cannot pay for, the per-request limits, a
//! latency of a fixed part plus one per token). It counts every input it embedded.
//!
//! It runs on its own thread and runtime, so blocking test code never stalls it and it works the
//! same from synchronous and asynchronous tests.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use orbit_pipeline::embed::HashingEmbedder;
use orbit_pipeline::tokenize::Encoding;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::helpers::{embedding_inputs, read_raw};

/// `text-embedding-3-small`'s size, what an embedding has unless `dimensions` or the config says.
pub const EMBED_DIM: usize = 1536;
pub const CHAT_MODEL: &str = "gpt-4o-mini";
pub const API_KEY: &str = "sk-test-secret-4242";

/// The API's per-request limits for embeddings (OpenAI's documentation): a request over them is
/// refused with a 400, so a client that sends one has a bug the count shows.
pub const MAX_INPUTS: usize = 2048;
pub const MAX_REQUEST_TOKENS: usize = 300_000;
pub const MAX_INPUT_TOKENS: usize = 8192;

/// What the double answers to the next request on a path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A real-shaped success.
    Ok,
    /// A real-shaped success after this long.
    Slow(Duration),
    Status(u16, Vec<(&'static str, &'static str)>, String),
    /// Accept, read the request, never answer.
    Stall,
    /// A success with this body (any text the test wants, valid JSON or not).
    Body(String),
}

impl Reply {
    pub fn status(code: u16, headers: Vec<(&'static str, &'static str)>, body: &str) -> Reply {
        Reply::Status(code, headers, body.to_string())
    }
}

/// A tokens- and requests-per-minute limit, as one API key has.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    pub tpm: f64,
    pub rpm: f64,
    /// Tokens in the bucket at the start (a key another worker or run has partly spent).
    pub start_tokens: f64,
}

#[derive(Clone, Debug)]
pub struct DoubleConfig {
    /// Vector length when the request names no `dimensions`.
    pub dim: usize,
    /// Latency of an answered embeddings request: `latency + per_token × its tokens`.
    pub latency: Duration,
    pub per_token: Duration,
    pub limit: Option<RateLimit>,
    /// Keep every request body and embedded text (tests); off, only counts (benchmarks).
    pub keep: bool,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            dim: EMBED_DIM,
            latency: Duration::ZERO,
            per_token: Duration::ZERO,
            limit: None,
            keep: true,
        }
    }
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub path: String,
    pub auth: Option<String>,
    pub body: Value,
}

/// What the double has done, by number.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Embedding requests that arrived, answered or not.
    pub requests: u64,
    /// Embedding requests answered with vectors.
    pub answered: u64,
    /// Inputs and tokens embedded (answered requests only).
    pub inputs: u64,
    pub tokens: u64,
    /// 429s the rate limit sent, and when.
    pub refused: u64,
    pub refused_at: Vec<Instant>,
    /// 400s for a request over the per-request limits.
    pub oversized: u64,
    /// Embedding requests being answered at once: now, and the most.
    pub in_progress: usize,
    pub peak_in_progress: usize,
}

/// One limit as a bucket: `level` left, refilled at `limit / 60 s`, never above `limit`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    limit: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: f64, level: f64) -> Bucket {
        Bucket {
            limit,
            level: level.min(limit),
            at: Instant::now(),
        }
    }

    fn rate(&self) -> f64 {
        self.limit / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.duration_since(self.at).as_secs_f64();
        self.level = (self.level + self.rate() * dt).min(self.limit);
        self.at = now;
    }

    /// Time until the bucket is full again.
    fn reset(&self) -> Duration {
        Duration::from_secs_f64(((self.limit - self.level).max(0.0) / self.rate()).max(0.0))
    }
}

#[derive(Default)]
struct State {
    embeddings: VecDeque<Reply>,
    chat: VecDeque<Reply>,
    transcriptions: VecDeque<Reply>,
    seen: Vec<Seen>,
    /// Every transcription upload: its multipart fields (file as its byte length and name).
    uploads: Vec<Value>,
    /// Every input text embedded, in arrival order (when `keep`).
    embedded: Vec<String>,
    chats: Vec<Value>,
    counts: Counts,
    faults: Option<Faults>,
    /// (tokens, requests) when rate-limited.
    buckets: Option<(Bucket, Bucket)>,
    /// Seed of the order answers are shuffled in.
    shuffle: u64,
}

/// Embedding faults at a rate, each of the kinds a real API shows: a 429 with `retry-after`, a
/// 500, a stall past the client's timeout, a malformed body, vectors of the wrong length.
struct Faults {
    percent: u64,
    rng: u64,
    injected: BTreeMap<&'static str, u64>,
}

/// xorshift64: reproducible from the seed, no dependency.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl Faults {
    fn pick(&mut self, inputs: usize) -> Option<Reply> {
        if xorshift(&mut self.rng) % 100 >= self.percent {
            return None;
        }
        let (name, reply) = match xorshift(&mut self.rng) % 5 {
            0 => (
                "429",
                Reply::status(429, vec![("retry-after", "1")], RATE_LIMITED),
            ),
            1 => ("500", Reply::status(500, vec![], "{}")),
            2 => ("stall", Reply::Stall),
            3 => (
                "malformed",
                Reply::Body("{\"object\": \"list\", \"data\": [".into()),
            ),
            _ => {
                let data: Vec<Value> = (0..inputs)
                    .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.5, 0.5, 0.5]}))
                    .collect();
                (
                    "wrong_length",
                    Reply::Body(json!({"object": "list", "data": data}).to_string()),
                )
            }
        };
        *self.injected.entry(name).or_default() += 1;
        Some(reply)
    }
}

const RATE_LIMITED: &str = r#"{"error":{"message":"Rate limit reached for text-embedding-3-small in organization org-test on tokens per min (TPM). Please try again later.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;

pub struct OpenAiDouble {
    pub base_url: String,
    config: DoubleConfig,
    state: Arc<Mutex<State>>,
}

impl OpenAiDouble {
    /// Embeddings of `text-embedding-3-small`'s size, no latency, no limit.
    pub fn start() -> OpenAiDouble {
        OpenAiDouble::with(DoubleConfig::default())
    }

    pub fn with(config: DoubleConfig) -> OpenAiDouble {
        let state = Arc::new(Mutex::new(State {
            buckets: config.limit.map(|l| {
                (
                    Bucket::new(l.tpm, l.start_tokens),
                    Bucket::new(l.rpm, l.rpm),
                )
            }),
            shuffle: 0x9E37_79B9_7F4A_7C15,
            ..State::default()
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        let (st, cfg) = (state.clone(), config.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
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
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(serve(sock, st.clone(), cfg.clone()));
                }
            });
        });
        let addr = rx.recv().unwrap();
        OpenAiDouble {
            base_url: format!("http://{addr}/v1"),
            config,
            state,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn script_embeddings(&self, replies: Vec<Reply>) {
        self.lock().embeddings.extend(replies);
    }

    /// Forgets the embedding replies not used yet.
    pub fn clear_embeddings(&self) {
        self.lock().embeddings.clear();
    }

    pub fn script_chat(&self, replies: Vec<Reply>) {
        self.lock().chat.extend(replies);
    }

    pub fn clear_chat(&self) {
        self.lock().chat.clear();
    }

    pub fn script_transcriptions(&self, replies: Vec<Reply>) {
        self.lock().transcriptions.extend(replies);
    }

    pub fn clear_transcriptions(&self) {
        self.lock().transcriptions.clear();
    }

    /// Every request so far, on every path.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    pub fn uploads(&self) -> Vec<Value> {
        self.lock().uploads.clone()
    }

    pub fn embedded(&self) -> Vec<String> {
        self.lock().embedded.clone()
    }

    /// How many times each distinct text was embedded.
    pub fn embedded_counts(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for t in &self.lock().embedded {
            *out.entry(t.clone()).or_default() += 1;
        }
        out
    }

    pub fn embedding_requests(&self) -> usize {
        self.lock().counts.requests as usize
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts.clone()
    }

    pub fn chats(&self) -> Vec<Value> {
        self.lock().chats.clone()
    }

    pub fn auths(&self) -> Vec<Option<String>> {
        self.lock().seen.iter().map(|s| s.auth.clone()).collect()
    }

    /// From now on, `percent` of embedding requests get a random fault (`Faults`); 0 stops them.
    pub fn set_faults(&self, percent: u64, seed: u64) {
        let mut s = self.lock();
        let injected = s.faults.take().map(|f| f.injected).unwrap_or_default();
        s.faults = Some(Faults {
            percent,
            rng: seed.max(1),
            injected,
        });
    }

    /// The faults injected so far, by kind.
    pub fn faults_injected(&self) -> BTreeMap<&'static str, u64> {
        let s = self.lock();
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

    pub fn config(&self) -> &DoubleConfig {
        &self.config
    }
}

/// A duration as Go prints it, the way OpenAI's `x-ratelimit-reset-*` headers come: `6m0s`,
/// `1s`, `20ms`, `1.5s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, s) = (ms / 60_000, (ms % 60_000) as f64 / 1000.0);
    let s = format!("{s}");
    if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// What the rate limit makes of one embeddings request of `tokens`: its headers, and the
/// seconds to wait when the bucket cannot pay (then nothing is taken).
fn rate_limit(s: &mut State, tokens: f64) -> (Vec<(String, String)>, Option<f64>) {
    let Some((t, r)) = s.buckets.as_mut() else {
        return (
            vec![("x-ratelimit-remaining-requests".into(), "4999".into())],
            None,
        );
    };
    let now = Instant::now();
    t.refill(now);
    r.refill(now);
    let need = tokens.min(t.limit);
    let short = if t.level < need || r.level < 1.0 {
        Some(
            ((need - t.level) / t.rate())
                .max((1.0 - r.level) / r.rate())
                .max(0.001),
        )
    } else {
        t.level -= need;
        r.level -= 1.0;
        None
    };
    let headers = vec![
        ("x-ratelimit-limit-requests".into(), format!("{}", r.limit)),
        ("x-ratelimit-limit-tokens".into(), format!("{}", t.limit)),
        (
            "x-ratelimit-remaining-requests".into(),
            format!("{}", r.level.max(0.0).floor()),
        ),
        (
            "x-ratelimit-remaining-tokens".into(),
            format!("{}", t.level.max(0.0).floor()),
        ),
        ("x-ratelimit-reset-requests".into(), go_duration(r.reset())),
        ("x-ratelimit-reset-tokens".into(), go_duration(t.reset())),
    ];
    (headers, short)
}

/// Why a request breaks the per-request limits, in the API's words, if it does.
fn over_limits(inputs: &[String], tokens: &[usize]) -> Option<String> {
    if inputs.len() > MAX_INPUTS {
        return Some(format!(
            "'$.input' is invalid. Please check the API reference: {} inputs, at most {MAX_INPUTS}",
            inputs.len()
        ));
    }
    if let Some(t) = tokens.iter().find(|t| **t > MAX_INPUT_TOKENS) {
        return Some(format!("This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you requested {t} tokens"));
    }
    let total: usize = tokens.iter().sum();
    (total > MAX_REQUEST_TOKENS)
        .then(|| format!("Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request"))
}

async fn serve(mut sock: tokio::net::TcpStream, st: Arc<Mutex<State>>, cfg: DoubleConfig) {
    let lock = || st.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let Some((path, auth, raw, ctype)) = read_raw(&mut sock).await else {
            return;
        };
        let body: Value = serde_json::from_slice(&raw).unwrap_or_default();
        let is_chat = path.ends_with("/chat/completions");
        let is_audio = path.ends_with("/audio/transcriptions");
        let upload = is_audio.then(|| multipart_fields(&raw, &ctype));
        let inputs = if is_chat || is_audio {
            Vec::new()
        } else {
            embedding_inputs(&body)
        };
        let tokens: Vec<usize> = inputs
            .iter()
            .map(|t| Encoding::Cl100kBase.count(t))
            .collect();
        let total: usize = tokens.iter().sum();
        let mut extra: Vec<(String, String)> = Vec::new();
        let reply = {
            let mut s = lock();
            s.seen.push(Seen {
                at: Instant::now(),
                path: path.clone(),
                auth,
                body: if cfg.keep { body.clone() } else { Value::Null },
            });
            if is_chat {
                s.chats.push(body.clone());
                s.chat.pop_front()
            } else if let Some(u) = &upload {
                s.uploads.push(u.clone());
                s.transcriptions.pop_front()
            } else {
                s.counts.requests += 1;
                let scripted = s.embeddings.pop_front();
                let pre = scripted.or_else(|| s.faults.as_mut().and_then(|f| f.pick(inputs.len())));
                match pre {
                    Some(r) => Some(r),
                    None => {
                        if let Some(why) = over_limits(&inputs, &tokens) {
                            s.counts.oversized += 1;
                            Some(Reply::Status(
                                400,
                                vec![],
                                json!({"error": {"message": why, "type": "invalid_request_error", "param": null, "code": null}}).to_string(),
                            ))
                        } else {
                            let (headers, short) = rate_limit(&mut s, total as f64);
                            extra = headers;
                            short.map(|wait| {
                                s.counts.refused += 1;
                                s.counts.refused_at.push(Instant::now());
                                extra.push(("retry-after".into(), format!("{wait:.3}")));
                                Reply::status(429, vec![], RATE_LIMITED)
                            })
                        }
                    }
                }
            }
        }
        .unwrap_or(Reply::Ok);
        let ok = |s: &mut State| {
            if is_chat {
                chat_success(&body)
            } else if let Some(u) = &upload {
                transcription_success(u)
            } else {
                s.counts.answered += 1;
                s.counts.inputs += inputs.len() as u64;
                s.counts.tokens += total as u64;
                if cfg.keep {
                    s.embedded.extend(inputs.iter().cloned());
                }
                let seed = xorshift(&mut s.shuffle);
                embeddings_success(&body, &inputs, total, cfg.dim, seed)
            }
        };
        let latency = if is_chat || is_audio {
            Duration::ZERO
        } else {
            cfg.latency + cfg.per_token * total as u32
        };
        let (status, headers, text) = match reply {
            Reply::Ok | Reply::Slow(_) => {
                let wait = match reply {
                    Reply::Slow(d) => d,
                    _ => latency,
                };
                let embedding = !is_chat && !is_audio;
                if embedding {
                    let mut s = lock();
                    s.counts.in_progress += 1;
                    s.counts.peak_in_progress = s.counts.peak_in_progress.max(s.counts.in_progress);
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let mut s = lock();
                if embedding {
                    s.counts.in_progress -= 1;
                }
                (200, vec![], ok(&mut s))
            }
            Reply::Body(b) => (200, vec![], b),
            Reply::Status(code, h, b) => (
                code,
                h.into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                b,
            ),
            Reply::Stall => {
                tokio::time::sleep(Duration::from_secs(600)).await;
                return;
            }
        };
        let mut resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            text.len()
        );
        for (k, v) in extra.into_iter().chain(headers) {
            resp.push_str(&format!("{k}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        resp.push_str(&text);
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// An embeddings answer to `body` as the API gives it: vectors `dimensions` long (else `dim`),
/// base64 of little-endian f32 when `encoding_format` is `base64`, else JSON floats; the data in
/// a shuffled order (the API does not promise order: the client sorts by `index`).
fn embeddings_success(
    body: &Value,
    inputs: &[String],
    tokens: usize,
    dim: usize,
    seed: u64,
) -> String {
    let dim = body["dimensions"].as_u64().map_or(dim, |d| d as usize);
    let e = HashingEmbedder::new(dim);
    let mut data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let v = e.embed_one(t);
            let embedding = if body["encoding_format"] == "base64" {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let mut rng = seed.max(1);
    for i in (1..data.len()).rev() {
        let j = (xorshift(&mut rng) % (i as u64 + 1)) as usize;
        data.swap(i, j);
    }
    if data.len() > 1 && data.iter().enumerate().all(|(i, d)| d["index"] == i) {
        data.reverse();
    }
    json!({"object": "list", "data": data, "model": body["model"].as_str().unwrap_or("text-embedding-3-small"),
           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
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
