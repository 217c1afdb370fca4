//! `orbit-worker reembed`: every user's memory embedded again with another model into a new
//! store version built beside the live one (a Qdrant collection, or a SQLite file of the data
//! dir), checkpointed per user so a run resumes after a crash without paying twice, then switched
//! to in one step (the alias, or the data dir's `LIVE` file). The app answers from the old
//! version until the switch. Users' own builds during the run land in the old version; a
//! catch-up pass before the switch and one after bring the new version up to date (unchanged
//! chunks keep their vectors, so a catch-up embeds only what changed).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use orbit_pipeline::embed::cache::{cache_key, cache_space, CacheKey};
use orbit_pipeline::embed::{EmbedError, EmbedLimits, Embedder, EmbeddingCache};
use orbit_pipeline::source::Source;
use orbit_pipeline::store::{
    qdrant_collection_name, versions, NullStore, QdrantSettings, QdrantStore, SqliteStore,
    VectorStore,
};
use orbit_pipeline::{BuildScope, Pipeline};
use serde::Serialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::config::{PipelineConfig, Settings};
use crate::services::Services;

#[derive(Args, Debug)]
pub struct ReembedArgs {
    /// The embedding model every memory moves to.
    #[arg(long)]
    pub model: String,
    /// Vector size to ask the model for (`dimensions`); default: the model's own.
    #[arg(long)]
    pub dimensions: Option<usize>,
    /// `all`, or user ids separated by commas.
    #[arg(long, default_value = "all")]
    pub users: String,
    /// Count the tokens that would be sent (after the cache), the requests, the time at the
    /// key's limit and the cost; embed nothing.
    #[arg(long)]
    pub estimate: bool,
    /// Continue the run with this id (after a crash or a stop): users already done are skipped.
    #[arg(long)]
    pub resume: Option<String>,
    /// After the switch, delete the version that was live before.
    #[arg(long)]
    pub drop_old: bool,
    /// Users built at once (by this process; with --via-queue, by the workers).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// One `orbitpilot.reembed_user` Celery message per user instead of building here: every
    /// worker on every machine shares the run; this command follows it and switches at the end.
    #[arg(long)]
    pub via_queue: bool,
    /// The queue the messages go to (with --via-queue).
    #[arg(long, default_value = "celery")]
    pub queue: String,
    /// JSONL file or directory (repeatable) instead of DATABASE_URL / ORBIT_SOURCE.
    #[arg(long)]
    pub source: Vec<PathBuf>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One run as the run log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub id: String,
    pub model: String,
    pub dimensions: usize,
    /// The version being built.
    pub target: String,
    /// The version live when the run began (None: the store was empty).
    pub previous: Option<String>,
    /// `running`, then `switched`.
    pub status: String,
}

/// Where runs and their per-user checkpoints live: the app's Postgres when the worker has one
/// (every machine of the fleet sees the same run), else SQLite beside the store.
pub enum RunLog {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

const RUNS_DDL: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS orbit_reembed_runs (id TEXT PRIMARY KEY, model TEXT NOT NULL, \
     dimensions BIGINT NOT NULL, target TEXT NOT NULL, previous TEXT, status TEXT NOT NULL, \
     created_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orbit_reembed_users (run_id TEXT NOT NULL, user_id BIGINT NOT NULL, \
     chunks BIGINT NOT NULL, tokens BIGINT NOT NULL, done_at TEXT NOT NULL, \
     PRIMARY KEY (run_id, user_id))",
];

/// `$1, $2, …` as SQLite's `?`: the statements here use each parameter once, in order.
fn for_sqlite(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                chars.next();
            }
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

macro_rules! on_log {
    ($log:expr, $sql:expr, |$q:ident| $bind:expr, $run:ident) => {
        match $log {
            RunLog::Pg(p) => {
                let $q = sqlx::query($sql);
                $bind.$run(p).await.map(|_| ())
            }
            RunLog::Sqlite(p) => {
                let s = for_sqlite($sql);
                let $q = sqlx::query(&s);
                $bind.$run(p).await.map(|_| ())
            }
        }
    };
}

impl RunLog {
    pub async fn open(pg: Option<&sqlx::PgPool>, data_dir: &std::path::Path) -> Result<RunLog> {
        let log = match pg {
            Some(p) => RunLog::Pg(p.clone()),
            None => {
                std::fs::create_dir_all(data_dir)?;
                let file = data_dir.join("reembed-runs.sqlite");
                RunLog::Sqlite(orbit_pipeline::sql::sqlite_pool(&file, 2).await?)
            }
        };
        for ddl in RUNS_DDL {
            // Two workers making the table at once: the loser's error is the winner's table.
            match on_log!(&log, ddl, |q| q, execute) {
                Err(e) if !orbit_pipeline::sql::lost_create_race(&e) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(log)
    }

    pub async fn create(&self, r: &Run) -> Result<()> {
        on_log!(
            self,
            "INSERT INTO orbit_reembed_runs (id, model, dimensions, target, previous, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            |q| q
                .bind(&r.id)
                .bind(&r.model)
                .bind(r.dimensions as i64)
                .bind(&r.target)
                .bind(&r.previous)
                .bind(&r.status)
                .bind(chrono::Utc::now().to_rfc3339()),
            execute
        )?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Run>> {
        let sql = "SELECT id, model, dimensions, target, previous, status FROM orbit_reembed_runs WHERE id = $1";
        macro_rules! run_of {
            ($row:expr) => {
                $row.map(|r| Run {
                    id: r.get(0),
                    model: r.get(1),
                    dimensions: r.get::<i64, _>(2) as usize,
                    target: r.get(3),
                    previous: r.get(4),
                    status: r.get(5),
                })
            };
        }
        Ok(match self {
            RunLog::Pg(p) => run_of!(sqlx::query(sql).bind(id).fetch_optional(p).await?),
            RunLog::Sqlite(p) => {
                run_of!(
                    sqlx::query(&for_sqlite(sql))
                        .bind(id)
                        .fetch_optional(p)
                        .await?
                )
            }
        })
    }

    pub async fn set_status(&self, id: &str, status: &str) -> Result<()> {
        on_log!(
            self,
            "UPDATE orbit_reembed_runs SET status = $1 WHERE id = $2",
            |q| q.bind(status).bind(id),
            execute
        )?;
        Ok(())
    }

    /// Chunks and tokens the run's checkpoints record so far.
    pub async fn totals(&self, id: &str) -> Result<(u64, u64)> {
        let sql = "SELECT CAST(coalesce(sum(chunks), 0) AS BIGINT), \
                   CAST(coalesce(sum(tokens), 0) AS BIGINT) FROM orbit_reembed_users WHERE run_id = $1";
        let row = match self {
            RunLog::Pg(p) => sqlx::query(sql).bind(id).fetch_one(p).await?,
            RunLog::Sqlite(p) => {
                let r = sqlx::query(&for_sqlite(sql)).bind(id).fetch_one(p).await?;
                return Ok((r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64));
            }
        };
        Ok((row.get::<i64, _>(0) as u64, row.get::<i64, _>(1) as u64))
    }

    pub async fn done_users(&self, id: &str) -> Result<HashSet<i64>> {
        let sql = "SELECT user_id FROM orbit_reembed_users WHERE run_id = $1";
        let rows = match self {
            RunLog::Pg(p) => sqlx::query(sql).bind(id).fetch_all(p).await?,
            RunLog::Sqlite(p) => {
                let rows = sqlx::query(&for_sqlite(sql)).bind(id).fetch_all(p).await?;
                return Ok(rows.iter().map(|r| r.get::<i64, _>(0)).collect());
            }
        };
        Ok(rows.iter().map(|r| r.get::<i64, _>(0)).collect())
    }

    /// The user's checkpoint: written once the user's build into the target has finished.
    pub async fn mark_done(&self, id: &str, user: i64, chunks: u64, tokens: u64) -> Result<()> {
        on_log!(
            self,
            "INSERT INTO orbit_reembed_users (run_id, user_id, chunks, tokens, done_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (run_id, user_id) DO NOTHING",
            |q| q
                .bind(id)
                .bind(user)
                .bind(chunks as i64)
                .bind(tokens as i64)
                .bind(chrono::Utc::now().to_rfc3339()),
            execute
        )?;
        Ok(())
    }
}

/// The store's versions: Qdrant collections behind the alias, or SQLite files behind `LIVE`.
pub enum Versions {
    Qdrant(QdrantSettings),
    Sqlite { dir: PathBuf, lexical: bool },
}

impl Versions {
    pub fn of(p: &PipelineConfig) -> Versions {
        match &p.qdrant {
            Some(q) => Versions::Qdrant(q.clone()),
            None => Versions::Sqlite {
                dir: p.data_dir.clone(),
                lexical: p.lexical_index,
            },
        }
    }

    pub fn name_for(&self, model: &str, dim: usize, tag: &str) -> String {
        match self {
            Versions::Qdrant(q) => qdrant_collection_name(&q.alias, model, dim, Some(tag)),
            Versions::Sqlite { .. } => versions::version_file(model, dim, Some(tag)),
        }
    }

    /// The version answering now (None: nothing built yet).
    pub async fn live(&self) -> Result<Option<String>> {
        Ok(match self {
            Versions::Qdrant(q) => {
                QdrantStore::connect(q.clone())
                    .await?
                    .aliased_collection()
                    .await?
            }
            Versions::Sqlite { dir, .. } => {
                let f = versions::live_file(dir)?;
                dir.join(&f).exists().then_some(f)
            }
        })
    }

    /// The store of version `name`, made for `model` at `dim` if it is not there yet.
    pub async fn open(&self, name: &str, model: &str, dim: usize) -> Result<Arc<dyn VectorStore>> {
        let store: Arc<dyn VectorStore> = match self {
            Versions::Qdrant(q) => {
                let admin = QdrantStore::connect(q.clone()).await?;
                admin.create_version(name, model, dim).await?;
                Arc::new(QdrantStore::connect_collection(q.clone(), name).await?)
            }
            Versions::Sqlite { dir, lexical } => {
                Arc::new(SqliteStore::open_file(dir, name, *lexical).await?)
            }
        };
        store.ensure_model(model, dim).await?;
        Ok(store)
    }

    pub async fn switch_to(&self, name: &str) -> Result<()> {
        match self {
            Versions::Qdrant(q) => {
                QdrantStore::connect(q.clone())
                    .await?
                    .swap_alias(name)
                    .await?
            }
            Versions::Sqlite { dir, .. } => versions::set_live(dir, name)?,
        }
        Ok(())
    }

    pub async fn drop(&self, name: &str) -> Result<()> {
        match self {
            Versions::Qdrant(q) => {
                QdrantStore::connect(q.clone())
                    .await?
                    .drop_collection(name)
                    .await?
            }
            Versions::Sqlite { dir, .. } => versions::remove_version(dir, name)?,
        }
        Ok(())
    }
}

/// What `--json` prints at the end.
#[derive(Debug, Default, Serialize)]
pub struct ReembedReport {
    pub run_id: String,
    pub model: String,
    pub dimensions: usize,
    pub target: String,
    pub previous: Option<String>,
    pub users_total: usize,
    /// Users already done by an earlier attempt of the run.
    pub users_resumed: usize,
    pub users_built: usize,
    pub chunks: u64,
    pub chunks_embedded: u64,
    pub cache_hits: u64,
    pub tokens_sent: u64,
    pub cost_usd: f64,
    pub switched: bool,
    pub dropped_previous: bool,
    pub wall_s: f64,
}

/// What `--estimate` prints.
#[derive(Debug, Default, Serialize)]
pub struct Estimate {
    pub model: String,
    pub dimensions: usize,
    pub users: usize,
    pub chunks: u64,
    /// Chunks the cache already holds (or repeated in the run): not sent.
    pub chunks_cached: u64,
    pub tokens: u64,
    pub requests: u64,
    /// The key's tokens a minute (`ORBIT_EMBED_TPM`, else asked of the API with one tiny
    /// request); None when unknown.
    pub tpm: Option<f64>,
    pub wall_s_at_limit: Option<f64>,
    pub cost_usd: f64,
}

/// Counts what the run would send, and sends nothing: each text the cache lacks and the run has
/// not seen yet, its cl100k tokens (what the API counts), one request per batch with any.
struct Estimator {
    cache: Option<Arc<dyn EmbeddingCache>>,
    space: String,
    model: String,
    dim: usize,
    limits: EmbedLimits,
    seen: std::sync::Mutex<HashSet<CacheKey>>,
    counts: std::sync::Mutex<(u64, u64, u64, u64)>,
}

#[async_trait::async_trait]
impl Embedder for Estimator {
    fn model_id(&self) -> &str {
        &self.model
    }
    fn dimension(&self) -> usize {
        self.dim
    }
    fn limits(&self) -> EmbedLimits {
        self.limits
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let keys: Vec<CacheKey> = texts.iter().map(|t| cache_key(t)).collect();
        let cached = match &self.cache {
            Some(c) => c.get(&self.space, &keys).await.unwrap_or_default(),
            None => Default::default(),
        };
        let (mut tokens, mut sent) = (0u64, 0u64);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for (t, k) in texts.iter().zip(&keys) {
                if !cached.contains_key(k) && seen.insert(*k) {
                    sent += 1;
                    tokens += orbit_pipeline::tokenize::Encoding::Cl100kBase.count(t) as u64;
                }
            }
        }
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.0 += texts.len() as u64;
        c.1 += texts.len() as u64 - sent;
        c.2 += tokens;
        c.3 += u64::from(sent > 0);
        Ok(vec![vec![0.0; self.dim]; texts.len()])
    }
}

/// A short random run id: `r` and 8 hex digits (also the new version's name tag).
fn new_run_id() -> String {
    format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn parse_users(s: &str) -> Result<Option<Vec<i64>>> {
    if s.trim() == "all" {
        return Ok(None);
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        out.push(
            part.parse::<i64>()
                .with_context(|| format!("--users: {part:?} is not a user id (or `all`)"))?,
        );
    }
    if out.is_empty() {
        bail!("--users: no user ids (or `all`)");
    }
    Ok(Some(out))
}

/// Progress on a terminal as a bar, else a plain line every few users.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    total: usize,
    tpm: Option<f64>,
    price_per_token: f64,
}

impl Progress {
    fn new(total: usize, tpm: Option<f64>, price_per_token: f64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} users  {msg}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            bar,
            started: Instant::now(),
            total,
            tpm,
            price_per_token,
        }
    }

    fn update(&self, done: usize, chunks: u64, tokens: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = tokens as f64 / secs * 60.0;
        let limit = self.tpm.map(|t| format!(" of {t:.0}")).unwrap_or_default();
        let msg = format!(
            "{chunks} chunks, {rate:.0} tokens/min{limit}, ${:.4} so far",
            tokens as f64 * self.price_per_token
        );
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(msg);
            }
            None => crate::errln!("reembed: {done}/{} users, {msg}", self.total),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub async fn run(mut settings: Settings, a: ReembedArgs) -> Result<()> {
    if !a.source.is_empty() {
        settings.pipeline.source_paths = a.source.clone();
        settings.database_url = None;
    }
    let prices = settings.prices.clone();
    let sv = Services::new(settings.split().0)?;
    let source = sv
        .source()
        .context("no source: pass --source PATH, or set DATABASE_URL or ORBIT_SOURCE")?;
    let parts = parts(&sv, &a.model, a.dimensions).await?;
    let (base, cache, cached, embedder) = (
        parts.base.clone(),
        parts.cache.clone(),
        parts.cached.clone(),
        parts.embedder.clone(),
    );
    let dim = base.dimension();
    let p = &sv.settings.pipeline;
    let pg = sv.db.as_ref().map(|d| d.pool().clone());
    let price_per_token = prices.cost(&a.model, 1_000_000, 0, 0.0) / 1e6;
    let users = match parse_users(&a.users)? {
        Some(u) => u,
        None => orbit_pipeline::source::user_ids(source.as_ref()).await?,
    };
    if a.estimate {
        let e = estimate(&sv, source, cache, &base, &users, &a).await?;
        let e = Estimate {
            cost_usd: e.tokens as f64 * price_per_token,
            ..e
        };
        if a.json {
            crate::outln!("{}", serde_json::to_string_pretty(&e)?);
        } else {
            let wall = e
                .wall_s_at_limit
                .map(|w| format!("{w:.0} s at {:.0} TPM", e.tpm.unwrap_or(0.0)))
                .unwrap_or_else(|| "unknown (no rate limit heard; set ORBIT_EMBED_TPM)".into());
            crate::outln!(
                "reembed estimate for {} ({} dims): {} users, {} chunks ({} cached), {} tokens in {} requests, {wall}, ${:.4}",
                e.model, e.dimensions, e.users, e.chunks, e.chunks_cached, e.tokens, e.requests, e.cost_usd
            );
        }
        return Ok(());
    }

    let versions = Versions::of(p);
    let log = RunLog::open(pg.as_ref(), &p.data_dir).await?;
    let run = match &a.resume {
        Some(id) => {
            let r = log
                .get(id)
                .await?
                .with_context(|| format!("no reembed run {id}"))?;
            if r.model != a.model || r.dimensions != dim {
                bail!(
                    "run {id} moves to {} ({} dims), not {} ({dim} dims)",
                    r.model,
                    r.dimensions,
                    a.model
                );
            }
            r
        }
        None => {
            let id = new_run_id();
            let r = Run {
                target: versions.name_for(&a.model, dim, &id),
                id,
                model: a.model.clone(),
                dimensions: dim,
                previous: versions.live().await?,
                status: "running".into(),
            };
            log.create(&r).await?;
            r
        }
    };
    crate::errln!(
        "reembed: run {} → {} ({} dims) into {}{}",
        run.id,
        run.model,
        run.dimensions,
        run.target,
        run.previous
            .as_ref()
            .map(|p| format!("; {p} answers until the switch"))
            .unwrap_or_default()
    );
    let started = Instant::now();
    let target = versions
        .open(&run.target, &run.model, run.dimensions)
        .await?;
    let done = log.done_users(&run.id).await?;
    let todo: Vec<i64> = users
        .iter()
        .copied()
        .filter(|u| !done.contains(u))
        .collect();
    let mut report = ReembedReport {
        run_id: run.id.clone(),
        model: run.model.clone(),
        dimensions: run.dimensions,
        target: run.target.clone(),
        previous: run.previous.clone(),
        users_total: users.len(),
        users_resumed: users.len() - todo.len(),
        ..Default::default()
    };
    let counters = cached.as_ref().map(|c| c.counters.clone());
    let progress = Progress::new(users.len(), base.rate_limit().map(|l| l.0), price_per_token);
    let template = sv.pipeline(source.clone()).await?;
    let builder = UserBuilder {
        source: source.clone(),
        embedder: embedder.clone(),
        settings: template.settings.clone(),
        pool: template.pool.clone(),
    };
    if run.status == "running" && a.via_queue {
        follow_queue(&a.queue, &run, &todo, &users, &log, &progress).await?;
        report.users_built = todo.len();
        report.chunks = log.totals(&run.id).await?.0;
    } else if run.status == "running" {
        let mut builds = futures::stream::iter(todo.iter().copied())
            .map(|u| builder.build(u, target.clone(), CancellationToken::new()))
            .buffer_unordered(a.parallel.max(1));
        let mut n = report.users_resumed;
        while let Some(r) = builds.next().await {
            let (u, r) = r?;
            let tokens = counters
                .as_ref()
                .map_or(0, |c| c.sent_tokens.load(Ordering::Relaxed));
            log.mark_done(&run.id, u, r.chunks, tokens).await?;
            report.users_built += 1;
            report.chunks += r.chunks;
            report.chunks_embedded += r.chunks_embedded;
            n += 1;
            progress.update(n, report.chunks, tokens);
        }
        drop(builds);
    }
    if run.status == "running" {
        // What users built in the old version meanwhile: unchanged chunks keep their vectors.
        builder.catch_up(&users, target.clone(), a.parallel).await?;
        versions.switch_to(&run.target).await?;
        log.set_status(&run.id, "switched").await?;
        crate::errln!("reembed: switched to {}", run.target);
        // Builds that began on the old version before the switch finished there.
        builder.catch_up(&users, target.clone(), a.parallel).await?;
    } else {
        crate::errln!(
            "reembed: run {} had already switched to {}",
            run.id,
            run.target
        );
    }
    progress.finish();
    report.switched = true;
    if a.drop_old {
        if let Some(old) = run.previous.as_ref().filter(|o| **o != run.target) {
            versions.drop(old).await?;
            report.dropped_previous = true;
            crate::errln!("reembed: dropped {old}");
        }
    }
    if let Some(c) = &counters {
        report.cache_hits = c.hits.load(Ordering::Relaxed);
        report.tokens_sent = c.sent_tokens.load(Ordering::Relaxed);
    }
    report.cost_usd = report.tokens_sent as f64 * price_per_token;
    report.wall_s = started.elapsed().as_secs_f64();
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::outln!(
            "reembed {}: {} users ({} from an earlier attempt), {} chunks, {} embedded, {} tokens sent, ${:.4}, {:.1} s; live: {}",
            report.run_id,
            report.users_total,
            report.users_resumed,
            report.chunks,
            report.chunks_embedded,
            report.tokens_sent,
            report.cost_usd,
            report.wall_s,
            report.target
        );
    }
    Ok(())
}

/// The run's embedder: the configured kind with the run's model, behind the embedding cache.
#[derive(Clone)]
pub struct Parts {
    pub base: Arc<dyn Embedder>,
    pub cache: Option<Arc<dyn EmbeddingCache>>,
    pub cached: Option<Arc<orbit_pipeline::embed::CachedEmbedder>>,
    pub embedder: Arc<dyn Embedder>,
}

/// The embedders of this process by (model, dimensions): one per model, so every task of a
/// worker shares its rate budget and in-flight dedup, as the builds of the live model do.
static PARTS: std::sync::OnceLock<tokio::sync::Mutex<PartsByModel>> = std::sync::OnceLock::new();

type PartsByModel = std::collections::HashMap<(String, Option<usize>), Parts>;

pub async fn parts(sv: &Services, model: &str, dimensions: Option<usize>) -> Result<Parts> {
    let key = (model.to_string(), dimensions);
    let mut all = PARTS.get_or_init(Default::default).lock().await;
    if let Some(p) = all.get(&key) {
        return Ok(p.clone());
    }
    let mut p = sv.settings.pipeline.clone();
    p.embed_model = model.to_string();
    // The live model's ORBIT_EMBED_DIMENSIONS is not the new one's.
    p.embed_dimensions = dimensions;
    let (cfg, http, wait) = (p.clone(), sv.http.clone(), sv.settings.http.max_inline_wait);
    let base =
        tokio::task::spawn_blocking(move || crate::embedders::embedder(&cfg, http, wait)).await??;
    if base.model_id() != model {
        bail!(
            "the configured embedder ({:?}) cannot embed with {model}: it embeds with {} \
             (ORBIT_EMBEDDER=openai for OpenAI models)",
            p.resolved_embedder(),
            base.model_id(),
        );
    }
    let pg = sv.db.as_ref().map(|d| d.pool().clone());
    let cache = crate::embedders::embedding_cache(&p, pg.as_ref()).await;
    let cached = cache
        .clone()
        .map(|c| Arc::new(orbit_pipeline::embed::CachedEmbedder::new(base.clone(), c)));
    let embedder: Arc<dyn Embedder> = match &cached {
        Some(c) => c.clone(),
        None => base.clone(),
    };
    let parts = Parts {
        base,
        cache,
        cached,
        embedder,
    };
    all.insert(key, parts.clone());
    Ok(parts)
}

/// What one user of a queued run came to.
#[derive(Debug, Serialize)]
pub struct UserDone {
    pub run_id: String,
    pub user_id: i64,
    /// `done`, or `done_before` (a repeated or redelivered message: nothing was built).
    pub status: &'static str,
    pub chunks: u64,
    pub chunks_embedded: u64,
}

/// One user of run `run_id` into the run's version, then its checkpoint: what
/// `orbitpilot.reembed_user` runs on a worker.
pub async fn reembed_one(
    sv: &Services,
    run_id: &str,
    user: i64,
    cancel: &CancellationToken,
) -> Result<UserDone> {
    let p = &sv.settings.pipeline;
    let pg = sv.db.as_ref().map(|d| d.pool().clone());
    let log = RunLog::open(pg.as_ref(), &p.data_dir).await?;
    let run = log
        .get(run_id)
        .await?
        .with_context(|| format!("no reembed run {run_id}"))?;
    let mut out = UserDone {
        run_id: run.id.clone(),
        user_id: user,
        status: "done_before",
        chunks: 0,
        chunks_embedded: 0,
    };
    if log.done_users(&run.id).await?.contains(&user) {
        return Ok(out);
    }
    let parts = parts(sv, &run.model, Some(run.dimensions)).await?;
    let target = Versions::of(p)
        .open(&run.target, &run.model, run.dimensions)
        .await?;
    let source = sv.source()?;
    let template = sv.pipeline(source.clone()).await?;
    let builder = UserBuilder {
        source,
        embedder: parts.embedder.clone(),
        settings: template.settings.clone(),
        pool: template.pool.clone(),
    };
    let (_, r) = builder.build(user, target, cancel.clone()).await?;
    log.mark_done(&run.id, user, r.chunks, 0).await?;
    out.status = "done";
    out.chunks = r.chunks;
    out.chunks_embedded = r.chunks_embedded;
    Ok(out)
}

/// Publishes one `orbitpilot.reembed_user` per user of `todo` on `queue`, then follows the run
/// log until every user of `users` is done. A message that ends in FAILURE (its retries spent)
/// stops the run with its error; the run resumes with `--resume`.
async fn follow_queue(
    queue: &str,
    run: &Run,
    todo: &[i64],
    users: &[i64],
    log: &RunLog,
    progress: &Progress,
) -> Result<()> {
    use crate::celery::message::{queue_key, task_envelope};
    use redis::AsyncCommands;
    let celery = crate::config::CelerySettings::from_env()?;
    let timeout = std::time::Duration::from_secs(10);
    let broker = crate::redis_conn::RedisConn::open(celery.broker_url.expose(), timeout)?;
    let backend = crate::redis_conn::RedisConn::open(celery.backend_url.expose(), timeout)?;
    let mut ids = Vec::new();
    let mut conn = broker.conn().await?;
    for &u in todo {
        let (id, env) = task_envelope(
            crate::tasks::reembed_user::NAME,
            &serde_json::json!([run.id, u]),
            &serde_json::json!({}),
            queue,
        );
        let _: i64 = broker
            .note(conn.lpush(queue_key(queue, 0), env).await)
            .await?;
        ids.push((u, id));
    }
    crate::errln!("reembed: {} users queued on {queue}", todo.len());
    let wanted: HashSet<i64> = users.iter().copied().collect();
    loop {
        let done = log.done_users(&run.id).await?;
        let n = wanted.iter().filter(|u| done.contains(u)).count();
        let (chunks, tokens) = log.totals(&run.id).await?;
        progress.update(n, chunks, tokens);
        if n == wanted.len() {
            return Ok(());
        }
        let mut bc = backend.conn().await?;
        for (u, id) in ids.iter().filter(|(u, _)| !done.contains(u)) {
            let meta: Option<String> = backend
                .note(bc.get(format!("celery-task-meta-{id}")).await)
                .await?;
            if let Some(m) = meta.and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok()) {
                if m["status"] == "FAILURE" {
                    bail!(
                        "user {u} failed in the queue ({}); fix it and go on with --resume {} --via-queue",
                        m["result"]["exc_message"],
                        run.id
                    );
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Builds one user's memory into a given store version with the run's embedder.
struct UserBuilder {
    source: Arc<dyn Source>,
    embedder: Arc<dyn Embedder>,
    settings: orbit_pipeline::PipelineSettings,
    pool: orbit_pipeline::CpuPool,
}

impl UserBuilder {
    async fn build(
        &self,
        u: i64,
        store: Arc<dyn VectorStore>,
        cancel: CancellationToken,
    ) -> Result<(i64, orbit_pipeline::BuildReport)> {
        let p = Pipeline {
            source: self.source.clone(),
            embedder: self.embedder.clone(),
            store,
            settings: self.settings.clone(),
            pool: self.pool.clone(),
        };
        let r = p
            .run(BuildScope::User(u), cancel, None)
            .await
            .with_context(|| format!("re-embedding user {u}"))?;
        Ok((u, r))
    }

    /// Every user again into `target`: what changed since each was re-embedded (an unchanged
    /// chunk keeps its vector, so only changes are embedded).
    async fn catch_up(
        &self,
        users: &[i64],
        target: Arc<dyn VectorStore>,
        parallel: usize,
    ) -> Result<()> {
        let mut builds = futures::stream::iter(users.iter().copied())
            .map(|u| self.build(u, target.clone(), CancellationToken::new()))
            .buffer_unordered(parallel.max(1));
        while let Some(r) = builds.next().await {
            r?;
        }
        Ok(())
    }
}

async fn estimate(
    sv: &Services,
    source: Arc<dyn Source>,
    cache: Option<Arc<dyn EmbeddingCache>>,
    base: &Arc<dyn Embedder>,
    users: &[i64],
    a: &ReembedArgs,
) -> Result<Estimate> {
    let est = Arc::new(Estimator {
        cache,
        space: cache_space(base.model_id(), base.dimension()),
        model: base.model_id().to_string(),
        dim: base.dimension(),
        limits: base.limits(),
        seen: Default::default(),
        counts: Default::default(),
    });
    let template = sv.pipeline(source.clone()).await?;
    for &u in users {
        let pl = Pipeline {
            source: source.clone(),
            embedder: est.clone(),
            store: Arc::new(NullStore::default()),
            settings: orbit_pipeline::PipelineSettings {
                reuse_vectors: false,
                ..template.settings.clone()
            },
            pool: template.pool.clone(),
        };
        pl.run(BuildScope::User(u), CancellationToken::new(), None)
            .await
            .with_context(|| format!("estimating user {u}"))?;
    }
    let (chunks, cached, tokens, requests) = *est.counts.lock().unwrap_or_else(|e| e.into_inner());
    let tpm = match std::env::var("ORBIT_EMBED_TPM")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(t) => Some(t),
        None => {
            // One tiny request tells the key's limit (OpenAI's headers); a cent's millionth.
            if base.rate_limit().is_none() {
                let _ = base.embed(vec!["ping".into()]).await;
            }
            base.rate_limit().map(|l| l.0)
        }
    };
    Ok(Estimate {
        model: a.model.clone(),
        dimensions: base.dimension(),
        users: users.len(),
        chunks,
        chunks_cached: cached,
        tokens,
        requests,
        tpm,
        wall_s_at_limit: tpm.filter(|t| *t > 0.0).map(|t| tokens as f64 / t * 60.0),
        cost_usd: 0.0,
    })
}
