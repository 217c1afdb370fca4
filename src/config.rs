//! Settings: read from the environment (the variables Django already uses where there is one)
//! once at start-up, one validated block per concern. Every block is checked before anything
//! runs: a bad VAPID key or SMTP URL stops `orbit-worker worker` at once, naming the variable.
//! Optional secrets are `Option<Secret>`: unset is `None`, never an empty string.

use std::path::PathBuf;
use std::time::Duration;

use orbit_pipeline::chunk::ChunkSettings;
use orbit_pipeline::secret::Secret;
use orbit_pipeline::tokenize::Encoding;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {reason}")]
    Var { name: &'static str, reason: String },
}

fn bad(name: &'static str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Var {
        name,
        reason: reason.to_string(),
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Where settings come from: the process environment, or a table in tests.
pub trait Vars {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Vars for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A fixed table of variables (tests).
pub struct Table<'a>(pub &'a [(&'a str, &'a str)]);

impl Vars for Table<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// A set, non-blank variable.
fn var(v: &dyn Vars, name: &str) -> Option<String> {
    v.get(name).filter(|s| !s.trim().is_empty())
}

fn secret(v: &dyn Vars, name: &str) -> Option<Secret> {
    var(v, name).map(Secret::new)
}

fn parse<T: std::str::FromStr>(v: &dyn Vars, name: &'static str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match var(v, name) {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|e| bad(name, format!("{s:?}: {e}"))),
    }
}

/// A duration in seconds; negative, NaN or absurd values are a start-up error, not a panic.
fn seconds(v: &dyn Vars, name: &'static str, default: f64) -> Result<Duration> {
    let s: f64 = parse(v, name)?.unwrap_or(default);
    Duration::try_from_secs_f64(s).map_err(|_| bad(name, format!("{s}: not a number of seconds")))
}

/// Like `seconds`, and more than zero.
fn positive_seconds(v: &dyn Vars, name: &'static str, default: f64) -> Result<Duration> {
    let d = seconds(v, name, default)?;
    if d.is_zero() {
        return Err(bad(name, "must be positive"));
    }
    Ok(d)
}

/// A count or size within `range` (`default` when unset).
fn within(
    v: &dyn Vars,
    name: &'static str,
    range: std::ops::RangeInclusive<usize>,
    default: usize,
) -> Result<usize> {
    let n: usize = parse(v, name)?.unwrap_or(default);
    if !range.contains(&n) {
        return Err(bad(
            name,
            format!("{n}: must be from {} to {}", range.start(), range.end()),
        ));
    }
    Ok(n)
}

/// `https://api.openai.com/v1` unless `name` (or `OPENAI_BASE_URL`) says otherwise; http(s) only.
fn api_base(v: &dyn Vars, name: &'static str) -> Result<String> {
    let url = var(v, name)
        .or_else(|| var(v, "OPENAI_BASE_URL"))
        .unwrap_or_else(|| "https://api.openai.com/v1".into());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad(name, format!("{url:?} is not an http(s) URL")));
    }
    Ok(url)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedderKind {
    /// `openai` when OPENAI_API_KEY is set, else `local`.
    Auto,
    Local,
    OpenAi,
    /// Deterministic feature hashing: tests and benchmarks of the CPU stages.
    Hashing,
}

impl std::str::FromStr for EmbedderKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" | "" => EmbedderKind::Auto,
            "local" => EmbedderKind::Local,
            "openai" => EmbedderKind::OpenAi,
            "hashing" => EmbedderKind::Hashing,
            other => {
                return Err(format!(
                    "unknown embedder {other:?} (auto, local, openai, hashing)"
                ))
            }
        })
    }
}

/// The memory pipeline: where builds read, how they chunk and embed, where vectors live.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub data_dir: PathBuf,
    pub source_paths: Vec<PathBuf>,
    /// A JSON file replacing some of the Postgres source's per-kind queries.
    pub source_queries: Option<PathBuf>,
    pub embedder: EmbedderKind,
    pub openai_api_key: Option<Secret>,
    pub openai_base_url: String,
    pub embed_model: String,
    /// Sent as the embeddings request's `dimensions` (text-embedding-3 shortens its vectors).
    pub embed_dimensions: Option<usize>,
    pub model_dir: PathBuf,
    pub hashing_dim: usize,
    /// None: the embedder's preference, else 512.
    pub chunk_tokens: Option<usize>,
    pub chunk_overlap: Option<usize>,
    /// Chat messages closer than this are packed together.
    pub pack_window: Duration,
    /// Whether a pack closed on its budget repeats its last message in the next one.
    pub pack_overlap: bool,
    /// Whether the store keeps the lexical index beside the vectors (needed by hybrid and
    /// lexical search).
    pub lexical_index: bool,
    pub encoding: Encoding,
    pub cpu_threads: usize,
    pub embed_in_flight: Option<usize>,
    /// Bound of the embedding cache (`ORBIT_EMBED_CACHE_MB`, default 1024; 0 turns it off).
    pub embed_cache_bytes: u64,
    pub embed_batch_inputs: Option<usize>,
    pub embed_batch_tokens: Option<usize>,
    /// How long one embedding request may take before it counts as stalled and is retried.
    pub embed_timeout: Duration,
    /// How long a build lock lives without renewal (a dead worker's lock frees itself).
    pub build_lock_ttl: Duration,
    /// The Qdrant server store, when QDRANT_URL is set; else the embedded store in `data_dir`.
    pub qdrant: Option<orbit_pipeline::store::QdrantSettings>,
}

/// A count that must be at least 1 when set.
fn positive(v: &dyn Vars, name: &'static str) -> Result<Option<u32>> {
    match parse::<u32>(v, name)? {
        Some(0) => Err(bad(name, "must be at least 1")),
        n => Ok(n),
    }
}

/// QDRANT_URL (the gRPC port, 6334), QDRANT_API_KEY, ORBIT_QDRANT_ALIAS, ORBIT_QDRANT_TIMEOUT,
/// and a new collection's cluster settings: ORBIT_QDRANT_SHARDS, ORBIT_QDRANT_REPLICATION,
/// ORBIT_QDRANT_WRITE_CONSISTENCY.
fn qdrant(v: &dyn Vars) -> Result<Option<orbit_pipeline::store::QdrantSettings>> {
    let Some(url) = var(v, "QDRANT_URL") else {
        return Ok(None);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad(
            "QDRANT_URL",
            "must be an http(s) URL of the gRPC port, like http://127.0.0.1:6334",
        ));
    }
    let alias = var(v, "ORBIT_QDRANT_ALIAS")
        .unwrap_or_else(|| orbit_pipeline::store::DEFAULT_ALIAS.to_string());
    // What Qdrant accepts in a name, and short enough for the versions named after it.
    if alias.is_empty()
        || alias.len() > 100
        || !alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad(
            "ORBIT_QDRANT_ALIAS",
            "must be 1 to 100 of A-Z, a-z, 0-9, _ and -",
        ));
    }
    Ok(Some(orbit_pipeline::store::QdrantSettings {
        url,
        api_key: secret(v, "QDRANT_API_KEY"),
        alias,
        timeout: positive_seconds(v, "ORBIT_QDRANT_TIMEOUT", 30.0)?,
        lexical: parse(v, "ORBIT_LEXICAL_INDEX")?.unwrap_or(true),
        cluster: orbit_pipeline::store::QdrantCluster {
            shards: positive(v, "ORBIT_QDRANT_SHARDS")?,
            replication: positive(v, "ORBIT_QDRANT_REPLICATION")?,
            write_consistency: positive(v, "ORBIT_QDRANT_WRITE_CONSISTENCY")?,
        },
    }))
}

impl PipelineConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        let c = PipelineConfig {
            data_dir: var(v, "ORBIT_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./data")),
            source_paths: var(v, "ORBIT_SOURCE")
                .map(|s| s.split(',').map(|p| PathBuf::from(p.trim())).collect())
                .unwrap_or_default(),
            source_queries: var(v, "ORBIT_SOURCE_QUERIES").map(PathBuf::from),
            embedder: parse(v, "ORBIT_EMBEDDER")?.unwrap_or(EmbedderKind::Auto),
            openai_api_key: secret(v, "OPENAI_API_KEY"),
            openai_base_url: api_base(v, "OPENAI_BASE_URL")?,
            embed_model: var(v, "ORBIT_EMBED_MODEL")
                .unwrap_or_else(|| "text-embedding-3-small".into()),
            embed_dimensions: parse(v, "ORBIT_EMBED_DIMENSIONS")?,
            model_dir: var(v, "ORBIT_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| default_model_dir(v)),
            hashing_dim: parse(v, "ORBIT_HASHING_DIM")?.unwrap_or(384),
            chunk_tokens: parse(v, "ORBIT_CHUNK_TOKENS")?,
            chunk_overlap: parse(v, "ORBIT_CHUNK_OVERLAP")?,
            pack_window: seconds(
                v,
                "ORBIT_PACK_WINDOW",
                ChunkSettings::default().pack_window_secs as f64,
            )?,
            pack_overlap: parse(v, "ORBIT_PACK_OVERLAP")?
                .unwrap_or(orbit_pipeline::chunk::DEFAULT_PACK_OVERLAP),
            lexical_index: parse(v, "ORBIT_LEXICAL_INDEX")?.unwrap_or(true),
            encoding: parse::<Encoding>(v, "ORBIT_ENCODING")?.unwrap_or_default(),
            cpu_threads: parse(v, "ORBIT_CPU_THREADS")?.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            }),
            embed_in_flight: parse(v, "ORBIT_EMBED_IN_FLIGHT")?,
            embed_cache_bytes: parse::<u64>(v, "ORBIT_EMBED_CACHE_MB")?
                .map_or(orbit_pipeline::embed::cache::DEFAULT_CACHE_BYTES, |mb| {
                    mb << 20
                }),
            embed_batch_inputs: parse(v, "ORBIT_EMBED_BATCH_INPUTS")?,
            embed_batch_tokens: parse(v, "ORBIT_EMBED_BATCH_TOKENS")?,
            embed_timeout: positive_seconds(v, "ORBIT_EMBED_TIMEOUT", 60.0)?,
            build_lock_ttl: seconds(v, "ORBIT_BUILD_LOCK_TTL", 60.0)?,
            qdrant: qdrant(v)?,
        };
        if c.build_lock_ttl < Duration::from_secs(3) {
            return Err(bad("ORBIT_BUILD_LOCK_TTL", "must be at least 3 seconds"));
        }
        if c.cpu_threads == 0 {
            return Err(bad("ORBIT_CPU_THREADS", "must be at least 1"));
        }
        if c.hashing_dim == 0 {
            return Err(bad("ORBIT_HASHING_DIM", "must be at least 1"));
        }
        if c.embed_dimensions == Some(0) {
            return Err(bad("ORBIT_EMBED_DIMENSIONS", "must be at least 1"));
        }
        // OpenAI embeds at most this many tokens of one input; a longer chunk is refused whole.
        const OPENAI_MAX_INPUT_TOKENS: usize = 8_192;
        if c.resolved_embedder() == EmbedderKind::OpenAi
            && c.chunk_tokens.is_some_and(|n| n > OPENAI_MAX_INPUT_TOKENS)
        {
            return Err(bad(
                "ORBIT_CHUNK_TOKENS",
                "the OpenAI embeddings API takes at most 8192 tokens per input",
            ));
        }
        if c.embedder == EmbedderKind::OpenAi && c.openai_api_key.is_none() {
            return Err(bad("OPENAI_API_KEY", "ORBIT_EMBEDDER=openai needs it"));
        }
        c.chunk_settings(None)?;
        Ok(c)
    }

    pub fn resolved_embedder(&self) -> EmbedderKind {
        match self.embedder {
            EmbedderKind::Auto if self.openai_api_key.is_some() => EmbedderKind::OpenAi,
            EmbedderKind::Auto => EmbedderKind::Local,
            k => k,
        }
    }

    /// Chunking for a model that reads `preferred` tokens whole.
    pub fn chunk_settings(&self, preferred: Option<usize>) -> Result<ChunkSettings> {
        let mut c = ChunkSettings {
            encoding: self.encoding,
            pack_window_secs: self.pack_window.as_secs() as i64,
            pack_overlap: self.pack_overlap,
            lexical_terms: self.lexical_index,
            ..Default::default()
        };
        if let Some(n) = self.chunk_tokens.or(preferred) {
            c.max_tokens = n;
            // Keep the default 1/8 ratio when only the size changes.
            c.overlap_tokens = n / 8;
        }
        if let Some(o) = self.chunk_overlap {
            c.overlap_tokens = o;
        }
        c.validate()
            .map_err(|e| bad("ORBIT_CHUNK_TOKENS / ORBIT_CHUNK_OVERLAP", e))?;
        Ok(c)
    }
}

/// Django's cache: its Redis, KEY_PREFIX and VERSION. Build locks live on the same Redis.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub url: Secret,
    pub key_prefix: String,
    pub version: i64,
}

impl CacheConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        let url = var(v, "ORBIT_CACHE_URL")
            .or_else(|| var(v, "REDIS_URL"))
            .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
        // The cache lives on the broker's Redis unless told otherwise, so a sentinel URL here
        // takes the broker's master name.
        let url = redis_url(v, "ORBIT_CACHE_URL", url, "CELERY_BROKER_TRANSPORT_OPTIONS")?;
        Ok(CacheConfig {
            url: Secret::new(url),
            key_prefix: v.get("ORBIT_CACHE_KEY_PREFIX").unwrap_or_default(),
            version: parse(v, "ORBIT_CACHE_VERSION")?.unwrap_or(1),
        })
    }
}

/// Checks a Redis URL as Celery and kombu take it, and returns it ready for `RedisConn::open`.
/// A `sentinel://` URL gets the master's name (and the sentinels' password) from `options`, the
/// transport-options setting kombu reads them from (`{"master_name": "mymaster",
/// "sentinel_kwargs": {"password": "…"}}`), unless the URL already carries `?master_name=`;
/// without a name it is refused here, at start-up.
fn redis_url(
    v: &dyn Vars,
    name: &'static str,
    url: String,
    options: &'static str,
) -> Result<String> {
    if crate::redis_conn::is_sentinel_url(&url) {
        return sentinel_url(v, name, url, options);
    }
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        return Err(bad(
            name,
            "must be a redis://, rediss://, unix:// or sentinel:// URL (only Redis is supported)",
        ));
    }
    Ok(url)
}

fn sentinel_url(
    v: &dyn Vars,
    name: &'static str,
    url: String,
    options: &'static str,
) -> Result<String> {
    /// The transport options read here; the others belong to the Celery-configuration issue and
    /// are named in a warning, not silently dropped.
    const READ: [&str; 2] = ["master_name", "sentinel_kwargs"];
    let opts: serde_json::Map<String, serde_json::Value> = match var(v, options) {
        None => Default::default(),
        Some(s) => {
            serde_json::from_str(&s).map_err(|e| bad(options, format!("not a JSON object: {e}")))?
        }
    };
    let ignored: Vec<&str> = opts
        .keys()
        .map(String::as_str)
        .filter(|k| !READ.contains(k))
        .collect();
    // The cache reads the broker's options too; the broker's reading warns for both.
    if !ignored.is_empty() && name != "ORBIT_CACHE_URL" {
        tracing::warn!(
            setting = options,
            ?ignored,
            "transport options not honoured by orbit-worker yet: {}",
            ignored.join(", ")
        );
    }
    let has = |key: &str| {
        url.split(';').any(|part| {
            part.split_once('?').is_some_and(|(_, q)| {
                q.split('&').any(|kv| {
                    kv.split('=')
                        .next()
                        .is_some_and(|k| k.eq_ignore_ascii_case(key))
                })
            })
        })
    };
    let mut extra = Vec::new();
    if !has("master_name") {
        match opts.get("master_name") {
            Some(serde_json::Value::String(m)) if !m.trim().is_empty() => extra.push(format!("master_name={}", percent_encode(m))),
            Some(_) => return Err(bad(options, "master_name must be a string")),
            None => return Err(bad(name, format!("a sentinel:// URL needs the master's name: {options}='{{\"master_name\": \"mymaster\"}}', as kombu reads it"))),
        }
    }
    if let Some(pw) = opts.get("sentinel_kwargs").and_then(|k| k.get("password")) {
        let Some(pw) = pw.as_str() else {
            return Err(bad(options, "sentinel_kwargs.password must be a string"));
        };
        if !has("sentinel_password") {
            extra.push(format!("sentinel_password={}", percent_encode(pw)));
        }
    }
    if extra.is_empty() {
        return Ok(url);
    }
    // Onto the first sentinel's URL, where the master's credentials are read too.
    let (first, rest) = match url.split_once(';') {
        Some((f, r)) => (f.to_string(), Some(r)),
        None => (url.clone(), None),
    };
    let sep = if first.contains('?') { '&' } else { '?' };
    let mut out = format!("{first}{sep}{}", extra.join("&"));
    if let Some(r) = rest {
        out.push(';');
        out.push_str(r);
    }
    Ok(out)
}

/// Percent-encodes everything but unreserved characters, for a value put into a URL's query.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The chat model: OrbitPilot's answers and Blink's analysis.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// The model for answers; None gives extractive answers.
    pub model: Option<String>,
    pub analysis_model: String,
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub timeout: Duration,
    /// Questions longer than this (in cl100k tokens) are refused.
    pub max_question_tokens: usize,
    /// A user's chat tokens per calendar month; past it, answers are extractive. None: no cap.
    pub monthly_token_limit: Option<i64>,
}

impl ChatConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        Ok(ChatConfig {
            model: var(v, "ORBIT_CHAT_MODEL").filter(|m| m != "none"),
            analysis_model: var(v, "ORBIT_ANALYSIS_MODEL")
                .unwrap_or_else(|| "gpt-4o-2024-08-06".into()),
            base_url: api_base(v, "ORBIT_CHAT_BASE_URL")?,
            api_key: secret(v, "OPENAI_API_KEY"),
            timeout: positive_seconds(v, "ORBIT_CHAT_TIMEOUT", 60.0)?,
            max_question_tokens: parse(v, "ORBIT_MAX_QUESTION_TOKENS")?.unwrap_or(8192),
            monthly_token_limit: parse(v, "ORBIT_MONTHLY_TOKEN_LIMIT")?,
        })
    }
}

/// Web Push: the VAPID key (RFC 8292), checked to be a P-256 private key at start-up.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// PEM, or the raw 32 bytes base64url. None: `send_push` fails as misconfigured.
    pub vapid_private_key: Option<Secret>,
    /// The `sub` claim: `mailto:` or `https:`.
    pub vapid_subject: String,
    pub timeout: Duration,
}

impl PushConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        let c = PushConfig {
            vapid_private_key: secret(v, "VAPID_PRIVATE_KEY"),
            vapid_subject: var(v, "VAPID_SUBJECT")
                .unwrap_or_else(|| "mailto:admin@orbitingfox.app".into()),
            timeout: positive_seconds(v, "ORBIT_PUSH_TIMEOUT", 10.0)?,
        };
        if let Some(k) = &c.vapid_private_key {
            crate::tasks::send_push::vapid_key(k.expose())
                .map_err(|e| bad("VAPID_PRIVATE_KEY", e))?;
        }
        if !(c.vapid_subject.starts_with("mailto:") || c.vapid_subject.starts_with("https:")) {
            return Err(bad("VAPID_SUBJECT", "must start with mailto: or https:"));
        }
        Ok(c)
    }
}

/// Email over SMTP: the URL (checked by the transport's own parser) and the sender.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// `smtp://host:1025`, `smtps://user:pass@host:465`, `smtp://…?tls=required`.
    pub url: Option<Secret>,
    pub from: lettre::message::Mailbox,
    pub timeout: Duration,
}

impl SmtpConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        let url = secret(v, "SMTP_URL");
        if let Some(u) = &url {
            // The parser's message never includes the URL (it may hold a password).
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(u.expose())
                .map_err(|e| bad("SMTP_URL", format!("not a usable SMTP URL: {e}")))?;
        }
        let from = var(v, "SMTP_FROM")
            .or_else(|| var(v, "DEFAULT_FROM_EMAIL"))
            .unwrap_or_else(|| "OrbitingFox <no-reply@orbitingfox.app>".into());
        Ok(SmtpConfig {
            url,
            from: from
                .parse()
                .map_err(|e| bad("SMTP_FROM", format!("{from:?} is not an address: {e}")))?,
            timeout: positive_seconds(v, "ORBIT_SMTP_TIMEOUT", 30.0)?,
        })
    }
}

/// Blink transcription: an OpenAI-compatible `/v1/audio/transcriptions`.
#[derive(Debug, Clone)]
pub struct TranscriptionConfig {
    /// Where Blink audio paths are relative to.
    pub media_root: PathBuf,
    pub model: String,
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub timeout: Duration,
}

impl TranscriptionConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        Ok(TranscriptionConfig {
            media_root: var(v, "MEDIA_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./media")),
            model: var(v, "ORBIT_TRANSCRIBE_MODEL").unwrap_or_else(|| "whisper-1".into()),
            base_url: api_base(v, "ORBIT_TRANSCRIBE_BASE_URL")?,
            api_key: secret(v, "OPENAI_API_KEY"),
            timeout: positive_seconds(v, "ORBIT_TRANSCRIBE_TIMEOUT", 600.0)?,
        })
    }
}

/// HTTP: the status endpoints' token and the outgoing call layer's inline budget.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The bearer token of the HTTP status endpoints; None refuses every request.
    pub token: Option<Secret>,
    /// The longest wait the call layer sleeps inside one call; a longer hint from the server
    /// goes to the task layer (re-published with that ETA).
    pub max_inline_wait: Duration,
    /// How long a connection to the HTTP face may take to send a request head, and may sit idle
    /// between requests: then it is closed.
    pub header_timeout: Duration,
    /// Connections the HTTP face keeps open at once; more wait to be accepted.
    pub max_connections: usize,
    /// The largest request head the HTTP face reads (its endpoints take no body).
    pub max_request_bytes: usize,
    /// False (the default): URLs from user data (push endpoints, recording URLs, their
    /// redirects) may not reach loopback, link-local or private addresses (`outbound`).
    pub allow_private_urls: bool,
}

impl HttpConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        Ok(HttpConfig {
            token: secret(v, "ORBIT_HTTP_TOKEN"),
            max_inline_wait: seconds(
                v,
                "ORBIT_HTTP_MAX_INLINE_WAIT",
                orbit_pipeline::embed::EMBED_MAX_INLINE_WAIT.as_secs_f64(),
            )?,
            allow_private_urls: parse(v, "ORBIT_ALLOW_PRIVATE_URLS")?.unwrap_or(false),
            header_timeout: positive_seconds(v, "ORBIT_HTTP_HEADER_TIMEOUT", 10.0)?,
            max_connections: within(v, "ORBIT_HTTP_MAX_CONNECTIONS", 1..=65_536, 256)?,
            // hyper reads heads in a buffer of at least 8 KiB; a status poll's head is far less.
            max_request_bytes: within(v, "ORBIT_HTTP_MAX_REQUEST_BYTES", 8192..=1 << 20, 16384)?,
        })
    }
}

/// Input limits: what one message, one build or one question may make the worker hold. Each
/// has a default sized well past real use; past it the input is refused with the limit named,
/// never held whole.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// A task message as received (the kombu envelope): `ORBIT_MAX_MESSAGE_BYTES`.
    pub message_bytes: usize,
    /// A task's decoded arguments (the body's `[args, kwargs, embed]`):
    /// `ORBIT_MAX_ARGUMENT_BYTES`.
    pub argument_bytes: usize,
    /// One memory document's text: `ORBIT_MAX_DOCUMENT_BYTES`.
    pub document_bytes: usize,
    /// Documents one user's build reads: `ORBIT_MAX_DOCUMENTS_PER_BUILD`.
    pub documents_per_build: u64,
    /// An OrbitPilot question, in characters: `ORBIT_MAX_QUESTION_CHARS`.
    pub question_chars: usize,
    /// A recording to transcribe: `ORBIT_MAX_AUDIO_BYTES` (the transcription API takes 25 MiB).
    pub audio_bytes: u64,
    /// Entries kept in `orbit.dead`, newest first: `ORBIT_DEAD_LETTER_MAX`.
    pub dead_letters: usize,
    /// Bytes of the message kept in one dead-letter entry: `ORBIT_DEAD_LETTER_MAX_BYTES`.
    pub dead_letter_bytes: usize,
}

const MIB: usize = 1 << 20;

impl LimitsConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        Ok(LimitsConfig {
            // Django's tasks send ids and small payloads; 16 MiB is thousands of times that.
            message_bytes: within(v, "ORBIT_MAX_MESSAGE_BYTES", 4096..=512 * MIB, 16 * MIB)?,
            argument_bytes: within(v, "ORBIT_MAX_ARGUMENT_BYTES", 1024..=512 * MIB, 4 * MIB)?,
            // A message or a note is kilobytes; a 1 MiB document is a book chapter.
            document_bytes: within(v, "ORBIT_MAX_DOCUMENT_BYTES", 1024..=256 * MIB, MIB)?,
            documents_per_build: within(
                v,
                "ORBIT_MAX_DOCUMENTS_PER_BUILD",
                1..=usize::MAX >> 1,
                5_000_000,
            )? as u64,
            // Past the token limit's reach (8192 tokens of prose is 30 000 to 60 000
            // characters), so that limit decides for real questions; this one bounds the cost
            // of counting (100 000 characters count in milliseconds).
            question_chars: within(v, "ORBIT_MAX_QUESTION_CHARS", 16..=MIB, 100_000)?,
            audio_bytes: within(v, "ORBIT_MAX_AUDIO_BYTES", 1024..=25 * MIB, 25 * MIB)? as u64,
            dead_letters: within(
                v,
                "ORBIT_DEAD_LETTER_MAX",
                1..=10_000_000,
                crate::celery::redis::DEFAULT_DEAD_LETTERS,
            )?,
            dead_letter_bytes: within(
                v,
                "ORBIT_DEAD_LETTER_MAX_BYTES",
                256..=64 * MIB,
                crate::celery::redis::DEFAULT_DEAD_LETTER_BYTES,
            )?,
        })
    }
}

/// Retrieval: the mode and the fusion of `generate_answer`, `search`, `ask` and `eval`.
#[derive(Debug, Clone, Copy)]
pub struct SearchConfig {
    pub mode: orbit_pipeline::search::SearchMode,
    pub fusion: orbit_pipeline::search::Fusion,
}

impl SearchConfig {
    fn from_vars(v: &dyn Vars) -> Result<Self> {
        let d = orbit_pipeline::search::Fusion::default();
        let fusion = orbit_pipeline::search::Fusion {
            rrf_k: parse(v, "ORBIT_SEARCH_RRF_K")?.unwrap_or(d.rrf_k),
            dense_weight: parse(v, "ORBIT_SEARCH_DENSE_WEIGHT")?.unwrap_or(d.dense_weight),
            lexical_weight: parse(v, "ORBIT_SEARCH_LEXICAL_WEIGHT")?.unwrap_or(d.lexical_weight),
            depth: parse(v, "ORBIT_SEARCH_DEPTH")?.unwrap_or(d.depth),
        };
        fusion.validate().map_err(|e| {
            bad(
                "ORBIT_SEARCH_RRF_K / ORBIT_SEARCH_*_WEIGHT / ORBIT_SEARCH_DEPTH",
                e,
            )
        })?;
        Ok(SearchConfig {
            mode: parse(v, "ORBIT_SEARCH_MODE")?.unwrap_or_default(),
            fusion,
        })
    }
}

/// Every block, each validated. `split` hands the shared blocks to `Services` and the blocks
/// only one task needs (push, SMTP, transcription) to the worker, which gives each task its own.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pipeline: PipelineConfig,
    /// The app's Postgres; when set, builds read it (the Postgres source) and write records.
    pub database_url: Option<Secret>,
    pub cache: CacheConfig,
    pub chat: ChatConfig,
    pub push: PushConfig,
    pub smtp: SmtpConfig,
    pub transcription: TranscriptionConfig,
    pub http: HttpConfig,
    pub search: SearchConfig,
    pub limits: LimitsConfig,
    /// Prices of the paid models, for usage rows (`ORBIT_PRICE_TABLE` adds or replaces).
    pub prices: crate::pricing::PriceTable,
}

/// What several tasks and the CLI share: held by `Services`.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    pub pipeline: PipelineConfig,
    pub database_url: Option<Secret>,
    pub cache: CacheConfig,
    pub chat: ChatConfig,
    pub http: HttpConfig,
    pub search: SearchConfig,
    pub limits: LimitsConfig,
    pub prices: crate::pricing::PriceTable,
}

/// The blocks one task each needs, secrets included: the worker passes each task its own block
/// (`TaskDef::block`) and nothing else, so no other task can read them.
#[derive(Debug, Clone)]
pub struct TaskBlocks {
    pub push: std::sync::Arc<PushConfig>,
    pub smtp: std::sync::Arc<SmtpConfig>,
    pub transcription: std::sync::Arc<TranscriptionConfig>,
}

impl Settings {
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&Env)
    }

    pub fn split(self) -> (SharedSettings, TaskBlocks) {
        (
            SharedSettings {
                pipeline: self.pipeline,
                database_url: self.database_url,
                cache: self.cache,
                chat: self.chat,
                http: self.http,
                search: self.search,
                limits: self.limits,
                prices: self.prices,
            },
            TaskBlocks {
                push: std::sync::Arc::new(self.push),
                smtp: std::sync::Arc::new(self.smtp),
                transcription: std::sync::Arc::new(self.transcription),
            },
        )
    }

    pub fn from_vars(v: &dyn Vars) -> Result<Self> {
        let pipeline = PipelineConfig::from_vars(v)?;
        let search = SearchConfig::from_vars(v)?;
        if !pipeline.lexical_index && search.mode != orbit_pipeline::search::SearchMode::Dense {
            return Err(bad(
                "ORBIT_LEXICAL_INDEX",
                format!(
                    "false keeps no lexical index, so ORBIT_SEARCH_MODE must be dense, not {}",
                    search.mode.as_str()
                ),
            ));
        }
        Ok(Settings {
            pipeline,
            database_url: secret(v, "DATABASE_URL"),
            cache: CacheConfig::from_vars(v)?,
            chat: ChatConfig::from_vars(v)?,
            push: PushConfig::from_vars(v)?,
            smtp: SmtpConfig::from_vars(v)?,
            transcription: TranscriptionConfig::from_vars(v)?,
            http: HttpConfig::from_vars(v)?,
            search,
            limits: LimitsConfig::from_vars(v)?,
            prices: crate::pricing::PriceTable::with_overrides(
                var(v, "ORBIT_PRICE_TABLE").as_deref(),
            )
            .map_err(|e| bad("ORBIT_PRICE_TABLE", format!("{e:#}")))?,
        })
    }
}

/// Where `make model` puts all-MiniLM-L6-v2.
fn default_model_dir(v: &dyn Vars) -> PathBuf {
    let cache = var(v, "XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var(v, "HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("orbit-worker/models/all-MiniLM-L6-v2")
}

/// Where the worker meets Django: the broker, the result backend and result expiry, named as the
/// Celery settings Django already has in its environment.
#[derive(Debug, Clone)]
pub struct CelerySettings {
    /// URLs may carry a password.
    pub broker_url: Secret,
    pub backend_url: Secret,
    pub result_expires: Duration,
}

impl CelerySettings {
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&Env)
    }

    pub fn from_vars(v: &dyn Vars) -> Result<Self> {
        let broker = var(v, "CELERY_BROKER_URL")
            .or_else(|| var(v, "REDIS_URL"))
            .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
        let broker = redis_url(
            v,
            "CELERY_BROKER_URL",
            broker,
            "CELERY_BROKER_TRANSPORT_OPTIONS",
        )?;
        let backend = match var(v, "CELERY_RESULT_BACKEND") {
            // Celery reads the backend's own options, result_backend_transport_options.
            Some(b) => redis_url(
                v,
                "CELERY_RESULT_BACKEND",
                b,
                "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS",
            )?,
            None => broker.clone(),
        };
        let expires: f64 = parse(v, "CELERY_RESULT_EXPIRES")?.unwrap_or(3600.0);
        if !(expires.is_finite() && expires >= 1.0) {
            return Err(bad("CELERY_RESULT_EXPIRES", "must be at least 1 second"));
        }
        Ok(CelerySettings {
            broker_url: Secret::new(broker),
            backend_url: Secret::new(backend),
            result_expires: Duration::from_secs_f64(expires),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 private key as VAPID tools print it (base64url of the 32 raw bytes).
    const VAPID_KEY: &str = "IQ9Ur0ykXoHS9gzfYX0aBjy9lvdrjx_PFUXmie9YRcY";

    fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
        Settings::from_vars(&Table(vars))
    }

    fn refused(vars: &[(&str, &str)]) -> String {
        match settings(vars) {
            Ok(_) => panic!("{vars:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_need_nothing_and_optional_secrets_are_none() {
        let s = settings(&[]).unwrap();
        assert!(s.pipeline.openai_api_key.is_none());
        assert!(s.push.vapid_private_key.is_none());
        assert!(s.smtp.url.is_none());
        assert!(s.http.token.is_none());
        assert!(s.database_url.is_none());
        assert_eq!(s.pipeline.resolved_embedder(), EmbedderKind::Local);
        assert_eq!(s.chat.base_url, "https://api.openai.com/v1");
        // Blank is unset, as Django's settings read it.
        let s = settings(&[("OPENAI_API_KEY", "  "), ("SMTP_URL", "")]).unwrap();
        assert!(s.pipeline.openai_api_key.is_none() && s.smtp.url.is_none());
        let s = settings(&[("OPENAI_API_KEY", "sk-x")]).unwrap();
        assert_eq!(s.pipeline.resolved_embedder(), EmbedderKind::OpenAi);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let table: &[(&[(&str, &str)], &str)] = &[
            (&[("VAPID_PRIVATE_KEY", "not-a-key")], "VAPID_PRIVATE_KEY"),
            (&[("VAPID_SUBJECT", "admin@x")], "VAPID_SUBJECT"),
            (&[("SMTP_URL", "ftp://mail")], "SMTP_URL"),
            (&[("SMTP_FROM", "nobody")], "SMTP_FROM"),
            (&[("ORBIT_BUILD_LOCK_TTL", "1")], "ORBIT_BUILD_LOCK_TTL"),
            (&[("ORBIT_BUILD_LOCK_TTL", "-5")], "ORBIT_BUILD_LOCK_TTL"),
            (&[("ORBIT_CHAT_TIMEOUT", "0")], "ORBIT_CHAT_TIMEOUT"),
            (&[("ORBIT_CPU_THREADS", "0")], "ORBIT_CPU_THREADS"),
            (&[("ORBIT_EMBEDDER", "magic")], "ORBIT_EMBEDDER"),
            (&[("ORBIT_EMBEDDER", "openai")], "OPENAI_API_KEY"),
            (&[("ORBIT_CHUNK_TOKENS", "4")], "ORBIT_CHUNK_TOKENS"),
            (&[("ORBIT_CACHE_URL", "memcached://x")], "ORBIT_CACHE_URL"),
            (&[("OPENAI_BASE_URL", "api.openai.com")], "OPENAI_BASE_URL"),
            (
                &[("ORBIT_HTTP_MAX_INLINE_WAIT", "NaN")],
                "ORBIT_HTTP_MAX_INLINE_WAIT",
            ),
            (&[("ORBIT_PRICE_TABLE", "{")], "ORBIT_PRICE_TABLE"),
        ];
        for (vars, name) in table {
            let e = refused(vars);
            assert!(e.starts_with(name), "{vars:?}: {e}");
        }
    }

    #[test]
    fn valid_push_and_smtp_settings_are_accepted_and_secrets_stay_hidden() {
        let s = settings(&[
            ("VAPID_PRIVATE_KEY", VAPID_KEY),
            ("SMTP_URL", "smtps://user:hunter2@mail.example:465"),
            ("SMTP_FROM", "OrbitingFox <no-reply@orbitingfox.app>"),
        ])
        .unwrap();
        assert!(s.push.vapid_private_key.is_some());
        assert_eq!(s.smtp.from.email.to_string(), "no-reply@orbitingfox.app");
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains(VAPID_KEY),
            "{shown}"
        );
        let e = refused(&[("SMTP_URL", "smtps://user:hunter2@:465:x")]);
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn celery_urls() {
        let c = CelerySettings::from_vars(&Table(&[("REDIS_URL", "redis://r:1/2")][..])).unwrap();
        assert_eq!(c.backend_url.expose(), "redis://r:1/2");
        let e = CelerySettings::from_vars(&Table(&[("CELERY_BROKER_URL", "amqp://x")][..]))
            .unwrap_err();
        assert!(e.to_string().starts_with("CELERY_BROKER_URL"), "{e}");
        let e =
            CelerySettings::from_vars(&Table(&[("CELERY_RESULT_EXPIRES", "0")][..])).unwrap_err();
        assert!(e.to_string().starts_with("CELERY_RESULT_EXPIRES"), "{e}");
    }

    #[test]
    fn sentinel_urls_take_the_master_name_from_the_transport_options() {
        let celery = |vars: &[(&str, &str)]| CelerySettings::from_vars(&Table(vars));
        let urls = "sentinel://:pw@s1:26379/1;sentinel://s2:26379/1";
        let c = celery(&[
            ("CELERY_BROKER_URL", urls),
            (
                "CELERY_BROKER_TRANSPORT_OPTIONS",
                r#"{"master_name": "my master", "sentinel_kwargs": {"password": "s&p"}}"#,
            ),
        ])
        .unwrap();
        let want = "sentinel://:pw@s1:26379/1?master_name=my%20master&sentinel_password=s%26p;sentinel://s2:26379/1";
        assert_eq!(c.broker_url.expose(), want);
        assert_eq!(
            c.backend_url.expose(),
            want,
            "the backend defaults to the broker"
        );
        // A backend of its own reads its own options, as Celery does.
        let e = celery(&[
            ("CELERY_BROKER_URL", "redis://r/0"),
            ("CELERY_RESULT_BACKEND", urls),
            ("CELERY_BROKER_TRANSPORT_OPTIONS", r#"{"master_name": "m"}"#),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("CELERY_RESULT_BACKEND")
                && e.contains("CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS"),
            "{e}"
        );
        let c = celery(&[("CELERY_RESULT_BACKEND", "sentinel://s?master_name=m")]).unwrap();
        assert_eq!(c.backend_url.expose(), "sentinel://s?master_name=m");
        for (opts, blamed) in [
            ("not json", "CELERY_BROKER_TRANSPORT_OPTIONS"),
            (r#"{"master_name": 7}"#, "CELERY_BROKER_TRANSPORT_OPTIONS"),
            (r#"{"visibility_timeout": 60}"#, "CELERY_BROKER_URL"),
        ] {
            let e = celery(&[
                ("CELERY_BROKER_URL", urls),
                ("CELERY_BROKER_TRANSPORT_OPTIONS", opts),
            ])
            .unwrap_err()
            .to_string();
            assert!(e.starts_with(blamed), "{opts}: {e}");
        }
        // The cache on the broker's sentinels takes the broker's master name.
        let s = settings(&[
            ("REDIS_URL", "sentinel://s1"),
            ("CELERY_BROKER_TRANSPORT_OPTIONS", r#"{"master_name": "m"}"#),
        ])
        .unwrap();
        assert_eq!(s.cache.url.expose(), "sentinel://s1?master_name=m");
    }
}
