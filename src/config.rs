//! Settings: read from the environment once at start-up, validated into typed values.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use orbit_pipeline::chunk::ChunkSettings;
use orbit_pipeline::secret::Secret;
use orbit_pipeline::tokenize::Encoding;

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
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" | "" => EmbedderKind::Auto,
            "local" => EmbedderKind::Local,
            "openai" => EmbedderKind::OpenAi,
            "hashing" => EmbedderKind::Hashing,
            other => bail!("unknown embedder {other:?} (auto, local, openai, hashing)"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub source_paths: Vec<PathBuf>,
    pub embedder: EmbedderKind,
    pub openai_api_key: Secret,
    pub openai_base_url: String,
    pub embed_model: String,
    pub model_dir: PathBuf,
    pub hashing_dim: usize,
    /// None: the embedder's preference, else 512.
    pub chunk_tokens: Option<usize>,
    pub chunk_overlap: Option<usize>,
    pub encoding: Encoding,
    pub cpu_threads: usize,
    pub embed_in_flight: Option<usize>,
    pub embed_batch_inputs: Option<usize>,
    pub embed_batch_tokens: Option<usize>,
    /// The longest wait the HTTP call layer sleeps inside one call; a longer hint from the
    /// server is handed to the task layer (re-published with that ETA).
    pub http_max_inline_wait: std::time::Duration,
    /// The app's Postgres; when set, builds read it (the Postgres source) and write records.
    pub database_url: Option<Secret>,
    /// A JSON file replacing some of the Postgres source's per-kind queries.
    pub source_queries: Option<PathBuf>,
    /// The chat model for answers; None gives extractive answers.
    pub chat_model: Option<String>,
    pub chat_base_url: String,
    pub chat_timeout: std::time::Duration,
    /// Django's cache: its Redis, KEY_PREFIX and VERSION.
    pub cache_url: Secret,
    pub cache_key_prefix: String,
    pub cache_version: i64,
    /// How long a build lock lives without renewal (a dead worker's lock frees itself).
    pub build_lock_ttl: std::time::Duration,
    pub prices: crate::pricing::PriceTable,
    /// The bearer token of the HTTP status endpoints; empty refuses every request.
    pub http_token: Secret,
    /// Questions longer than this (in cl100k tokens) are refused.
    pub max_question_tokens: usize,
    /// A user's chat tokens per calendar month; past it, answers are extractive. None: no cap.
    pub monthly_token_limit: Option<i64>,
    /// VAPID (RFC 8292): the application server's P-256 private key (PEM, or the raw 32 bytes
    /// base64url) and the `sub` claim (`mailto:` or `https:`).
    pub vapid_private_key: Secret,
    pub vapid_subject: String,
    pub push_timeout: std::time::Duration,
    /// `smtp://host:1025`, `smtps://user:pass@host:465`, `smtp://…?tls=required`.
    pub smtp_url: Secret,
    pub smtp_from: String,
    pub smtp_timeout: std::time::Duration,
    /// Where Blink audio paths are relative to.
    pub media_root: PathBuf,
    pub transcribe_model: String,
    pub transcribe_base_url: String,
    pub transcribe_timeout: std::time::Duration,
    pub analysis_model: String,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
    }
}

/// A duration in seconds; negative, NaN or absurd values are a start-up error, not a panic.
fn seconds(name: &str, default: f64) -> Result<std::time::Duration> {
    let v: f64 = parse(name)?.unwrap_or(default);
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{name}={v}: not a number of seconds"))
}

/// Where `make model` puts all-MiniLM-L6-v2.
pub fn default_model_dir() -> PathBuf {
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("orbit-worker/models/all-MiniLM-L6-v2")
}

impl Settings {
    pub fn from_env() -> Result<Self> {
        let s = Settings {
            data_dir: var("ORBIT_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./data")),
            source_paths: var("ORBIT_SOURCE")
                .map(|v| v.split(',').map(|p| PathBuf::from(p.trim())).collect())
                .unwrap_or_default(),
            embedder: parse("ORBIT_EMBEDDER")?.unwrap_or(EmbedderKind::Auto),
            openai_api_key: Secret::new(var("OPENAI_API_KEY").unwrap_or_default()),
            openai_base_url: var("OPENAI_BASE_URL")
                .unwrap_or_else(|| "https://api.openai.com/v1".into()),
            embed_model: var("ORBIT_EMBED_MODEL")
                .unwrap_or_else(|| "text-embedding-3-small".into()),
            model_dir: var("ORBIT_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(default_model_dir),
            hashing_dim: parse("ORBIT_HASHING_DIM")?.unwrap_or(384),
            chunk_tokens: parse("ORBIT_CHUNK_TOKENS")?,
            chunk_overlap: parse("ORBIT_CHUNK_OVERLAP")?,
            encoding: parse::<Encoding>("ORBIT_ENCODING")?.unwrap_or_default(),
            cpu_threads: parse("ORBIT_CPU_THREADS")?.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            }),
            embed_in_flight: parse("ORBIT_EMBED_IN_FLIGHT")?,
            embed_batch_inputs: parse("ORBIT_EMBED_BATCH_INPUTS")?,
            embed_batch_tokens: parse("ORBIT_EMBED_BATCH_TOKENS")?,
            http_max_inline_wait: seconds(
                "ORBIT_HTTP_MAX_INLINE_WAIT",
                orbit_pipeline::embed::EMBED_MAX_INLINE_WAIT.as_secs_f64(),
            )?,
            database_url: var("DATABASE_URL").map(Secret::new),
            source_queries: var("ORBIT_SOURCE_QUERIES").map(PathBuf::from),
            chat_model: var("ORBIT_CHAT_MODEL").filter(|m| m != "none"),
            chat_base_url: var("ORBIT_CHAT_BASE_URL")
                .or_else(|| var("OPENAI_BASE_URL"))
                .unwrap_or_else(|| "https://api.openai.com/v1".into()),
            chat_timeout: seconds("ORBIT_CHAT_TIMEOUT", 60.0)?,
            cache_url: Secret::new(
                var("ORBIT_CACHE_URL")
                    .or_else(|| var("REDIS_URL"))
                    .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into()),
            ),
            cache_key_prefix: std::env::var("ORBIT_CACHE_KEY_PREFIX").unwrap_or_default(),
            cache_version: parse("ORBIT_CACHE_VERSION")?.unwrap_or(1),
            build_lock_ttl: seconds("ORBIT_BUILD_LOCK_TTL", 60.0)?,
            prices: crate::pricing::PriceTable::with_overrides(
                var("ORBIT_PRICE_TABLE").as_deref(),
            )?,
            http_token: Secret::new(var("ORBIT_HTTP_TOKEN").unwrap_or_default()),
            max_question_tokens: parse("ORBIT_MAX_QUESTION_TOKENS")?.unwrap_or(8192),
            monthly_token_limit: parse("ORBIT_MONTHLY_TOKEN_LIMIT")?,
            vapid_private_key: Secret::new(var("VAPID_PRIVATE_KEY").unwrap_or_default()),
            vapid_subject: var("VAPID_SUBJECT")
                .unwrap_or_else(|| "mailto:admin@orbitingfox.app".into()),
            push_timeout: seconds("ORBIT_PUSH_TIMEOUT", 10.0)?,
            smtp_url: Secret::new(var("SMTP_URL").unwrap_or_default()),
            smtp_from: var("SMTP_FROM")
                .or_else(|| var("DEFAULT_FROM_EMAIL"))
                .unwrap_or_else(|| "OrbitingFox <no-reply@orbitingfox.app>".into()),
            smtp_timeout: seconds("ORBIT_SMTP_TIMEOUT", 30.0)?,
            media_root: var("MEDIA_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./media")),
            transcribe_model: var("ORBIT_TRANSCRIBE_MODEL").unwrap_or_else(|| "whisper-1".into()),
            transcribe_base_url: var("ORBIT_TRANSCRIBE_BASE_URL")
                .or_else(|| var("OPENAI_BASE_URL"))
                .unwrap_or_else(|| "https://api.openai.com/v1".into()),
            transcribe_timeout: seconds("ORBIT_TRANSCRIBE_TIMEOUT", 600.0)?,
            analysis_model: var("ORBIT_ANALYSIS_MODEL")
                .unwrap_or_else(|| "gpt-4o-2024-08-06".into()),
        };
        if s.build_lock_ttl < std::time::Duration::from_secs(3) {
            bail!("ORBIT_BUILD_LOCK_TTL must be at least 3 seconds");
        }
        if s.chat_timeout.is_zero() {
            bail!("ORBIT_CHAT_TIMEOUT must be positive");
        }
        if s.cpu_threads == 0 {
            bail!("ORBIT_CPU_THREADS must be at least 1");
        }
        if s.embedder == EmbedderKind::OpenAi && s.openai_api_key.is_empty() {
            bail!("ORBIT_EMBEDDER=openai needs OPENAI_API_KEY");
        }
        Ok(s)
    }

    pub fn resolved_embedder(&self) -> EmbedderKind {
        match self.embedder {
            EmbedderKind::Auto if !self.openai_api_key.is_empty() => EmbedderKind::OpenAi,
            EmbedderKind::Auto => EmbedderKind::Local,
            k => k,
        }
    }

    /// Chunking for a model that reads `preferred` tokens whole.
    pub fn chunk_settings(&self, preferred: Option<usize>) -> Result<ChunkSettings> {
        let mut c = ChunkSettings {
            encoding: self.encoding,
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
            .context("ORBIT_CHUNK_TOKENS / ORBIT_CHUNK_OVERLAP")?;
        Ok(c)
    }
}

/// Where the worker meets Django: the broker, the result backend and result expiry, named as the
/// Celery settings Django already has in its environment.
#[derive(Debug, Clone)]
pub struct CelerySettings {
    /// URLs may carry a password.
    pub broker_url: Secret,
    pub backend_url: Secret,
    pub result_expires: std::time::Duration,
}

impl CelerySettings {
    pub fn from_env() -> Result<Self> {
        let broker = var("CELERY_BROKER_URL")
            .or_else(|| var("REDIS_URL"))
            .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
        let backend = var("CELERY_RESULT_BACKEND").unwrap_or_else(|| broker.clone());
        for (name, url) in [("broker", &broker), ("result backend", &backend)] {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                bail!("the {name} must be a redis:// URL (only Redis is supported)");
            }
        }
        let expires: f64 = parse("CELERY_RESULT_EXPIRES")?.unwrap_or(3600.0);
        if !(expires.is_finite() && expires >= 1.0) {
            bail!("CELERY_RESULT_EXPIRES must be at least 1 second");
        }
        Ok(CelerySettings {
            broker_url: Secret::new(broker),
            backend_url: Secret::new(backend),
            result_expires: std::time::Duration::from_secs_f64(expires),
        })
    }
}
