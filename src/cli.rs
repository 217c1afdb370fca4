//! The command line: `worker` (the Celery worker), `build`, `search`, `ask` and `eval` over the
//! configured source, embedder and store, `db` (migrate, seed) and `health`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orbit_pipeline::source::JsonlSource;
use orbit_pipeline::stages::extract::ProgressFn;
use orbit_pipeline::{BuildReport, BuildScope};
use tokio_util::sync::CancellationToken;

use crate::celery::redis::{redact_url, RedisConn};
use crate::config::{CelerySettings, Settings};
use crate::services::Services;
use crate::worker::{self, WorkerOptions};

/// How long a health probe waits for each Redis.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "orbit-worker",
    version,
    about = "OrbitingFox memory pipeline and Celery worker"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace; Celery's upper-case names too). Default: info
    /// for the worker, warn otherwise. ORBIT_LOG overrides with a full filter.
    #[arg(short = 'l', long, global = true)]
    pub loglevel: Option<String>,
    /// Log lines in Celery's own format (the worker's default, so ops' log searches keep
    /// matching), as tracing's text (the other commands' default), or as one JSON object per
    /// line for machines.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Celery,
    Text,
    Json,
}

impl Cli {
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(match self.command {
            Command::Worker(_) => LogFormat::Celery,
            _ => LogFormat::Text,
        })
    }

    pub fn log_level(&self) -> String {
        let default = match self.command {
            Command::Worker(_) => "info",
            _ => "warn",
        };
        self.loglevel
            .as_deref()
            .unwrap_or(default)
            .to_ascii_lowercase()
            .replace("warning", "warn")
            .replace("critical", "error")
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Consume Celery tasks from Redis, as `celery worker` does.
    Worker(WorkerArgs),
    /// Check that the broker and the result backend answer: exit 0, or 1 naming what fails
    /// (for container health probes).
    Health,
    /// Build one user's memory, or every user's.
    Build(BuildArgs),
    /// Move every memory to another embedding model: a new store version built beside the live
    /// one, resumable, switched to once (docs/stores.md).
    Reembed(crate::reembed::ReembedArgs),
    /// Print a user's nearest chunks for a query.
    Search(SearchArgs),
    /// Answer a question from a user's memory, as `orbitpilot.generate_answer` does.
    Ask(AskArgs),
    /// Score retrieval on questions with known evidence: recall@k, MRR and nDCG@k per mode.
    Eval(crate::eval::EvalArgs),
    /// The app database: apply migrations, or load a JSONL corpus into the app tables.
    #[command(subcommand)]
    Db(DbCommand),
    /// The end-to-end benchmark: our build against the Python baseline on one corpus and one
    /// embedding server, with report.json, report.md and SVG plots.
    Bench(crate::bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Apply the shipped migrations to DATABASE_URL (already applied ones are skipped).
    Migrate,
    /// Load a JSONL corpus into the app tables, creating users, conversations and memberships.
    Seed {
        /// JSONL file or directory (repeatable).
        #[arg(long = "from", required = true)]
        from: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct AskArgs {
    #[arg(long)]
    pub user: i64,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// hybrid, dense or lexical; default ORBIT_SEARCH_MODE (hybrid).
    #[arg(long)]
    pub mode: Option<orbit_pipeline::search::SearchMode>,
    /// Print the answer JSON (the Celery result's shape).
    #[arg(long)]
    pub json: bool,
    /// The question.
    pub question: String,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The user whose memory to build.
    #[arg(
        long,
        conflicts_with = "all_users",
        required_unless_present = "all_users"
    )]
    pub user: Option<i64>,
    /// Build every user found in the source.
    #[arg(long)]
    pub all_users: bool,
    /// JSONL file or directory (repeatable); defaults to ORBIT_SOURCE.
    #[arg(long)]
    pub source: Vec<PathBuf>,
    /// Drop every stored vector first: needed when switching embedding model (with --all-users).
    #[arg(long, requires = "all_users")]
    pub reembed: bool,
    /// Print the BuildReport as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write each stage's counts and busy/waiting seconds to FILE as JSON lines, every
    /// `TIMELINE_INTERVAL` (what `orbit-worker bench` plots).
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
}

/// How often `build --timeline` writes a point: fine enough to see a stage stall, and at most
/// a few thousand lines for a build of an hour.
const TIMELINE_INTERVAL: Duration = Duration::from_millis(250);

/// Writes the build's stage times to `path` until `done` fires, then once more.
fn timeline_writer(
    path: &std::path::Path,
    live: Arc<orbit_pipeline::progress::BuildProgress>,
    done: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    use std::io::Write;
    let f = std::fs::File::create(path)
        .with_context(|| format!("cannot write the timeline {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(TIMELINE_INTERVAL);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = done.cancelled() => true,
            };
            let (t, stages) = live.stage_times();
            let line = serde_json::json!({"t": t, "stages": stages});
            if writeln!(w, "{line}").is_err() || last {
                let _ = w.flush();
                return;
            }
        }
    }))
}

/// Flags mirror `celery worker`. The broker is REDIS_URL (CELERY_BROKER_URL overrides it); results
/// go to CELERY_RESULT_BACKEND, by default the broker's Redis.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Tasks run at once.
    #[arg(short = 'c', long, default_value_t = 2)]
    pub concurrency: usize,
    /// Queues to consume, comma separated.
    #[arg(short = 'Q', long, value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
    /// Node name; %h is this machine's host name.
    #[arg(short = 'n', long, default_value = "celery@%h")]
    pub hostname: String,
    /// Messages held per concurrency slot (running or about to run).
    #[arg(long, default_value_t = 4)]
    pub prefetch_multiplier: usize,
    /// Seconds before an unacked message of a dead worker is put back on its queue.
    #[arg(long, default_value_t = 3600.0)]
    pub visibility_timeout: f64,
    /// Send Celery events (worker-online, heartbeats, task events) for Flower and `celery events`.
    #[arg(short = 'E', long)]
    pub events: bool,
    /// Seconds a warm shutdown waits for running tasks before giving them back to the queue.
    #[arg(long, default_value_t = 300.0)]
    pub shutdown_grace: f64,
    /// Also register the `orbit.debug.*` diagnostic tasks (sleep, fail, flaky).
    #[arg(long, env = "ORBIT_DEBUG_TASKS")]
    pub debug_tasks: bool,
    /// Serve /healthz, /metrics and the status endpoints on this address (e.g. 127.0.0.1:8081).
    #[arg(long, env = "ORBIT_HTTP_ADDR")]
    pub http: Option<std::net::SocketAddr>,
    /// MAX,MIN: grow the pool with the work up to MAX, back to MIN when idle (replaces -c).
    /// Scale-down waits AUTOSCALE_KEEPALIVE seconds (default 30) after the last task.
    #[arg(long)]
    pub autoscale: Option<String>,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[arg(long)]
    pub user: i64,
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// hybrid, dense or lexical; default ORBIT_SEARCH_MODE (hybrid).
    #[arg(long)]
    pub mode: Option<orbit_pipeline::search::SearchMode>,
    #[arg(long)]
    pub json: bool,
    /// The query text.
    pub query: String,
}

pub async fn run(cli: Cli) -> Result<()> {
    let settings = Settings::from_env()?;
    match cli.command {
        // The harness only starts and measures other processes, on blocking threads.
        Command::Bench(a) => tokio::task::spawn_blocking(move || crate::bench::run(a)).await?,
        Command::Worker(a) => worker(settings, a).await,
        Command::Health => health().await,
        Command::Build(a) => build(settings, a).await,
        Command::Reembed(a) => crate::reembed::run(settings, a).await,
        Command::Search(a) => search(settings, a).await,
        Command::Ask(a) => ask(settings, a).await,
        Command::Eval(a) => crate::eval::run(settings, a).await,
        Command::Db(c) => db(settings, c).await,
    }
}

fn database(settings: &Settings) -> Result<crate::db::Db> {
    let url = settings
        .database_url
        .as_ref()
        .context("DATABASE_URL is not set")?;
    Ok(crate::db::Db::connect_lazy(url)?)
}

async fn db(settings: Settings, c: DbCommand) -> Result<()> {
    let db = database(&settings)?;
    match c {
        DbCommand::Migrate => {
            let n = db.migrate().await?;
            crate::outln!("migrations applied: {n} known, database up to date");
        }
        DbCommand::Seed { from, json } => {
            db.migrate().await?;
            let source = JsonlSource::new(&from)?;
            let r = crate::db::seed(&db, &source).await?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                crate::outln!(
                    "seeded {} documents: {} new rows, {} updated, {} new users, {} lines rejected",
                    r.documents,
                    r.inserted,
                    r.updated,
                    r.users,
                    r.rejected_count
                );
                for x in r.rejected.iter().take(10) {
                    crate::outln!("  {}: {}", x.location, x.reason);
                }
            }
        }
    }
    Ok(())
}

async fn ask(settings: Settings, a: AskArgs) -> Result<()> {
    let sv = Services::new(settings.split().0)?;
    let task_id = format!("cli-{}", uuid::Uuid::new_v4());
    let q = crate::answer::Question {
        user_id: a.user,
        question: &a.question,
        top_k: a.top_k,
        task_id: &task_id,
        mode: a.mode,
    };
    let ans = crate::answer::answer(&sv, q).await?;
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&ans)?);
        return Ok(());
    }
    crate::outln!("{}", ans.answer);
    if !ans.citations.is_empty() && ans.mode == "generative" {
        crate::outln!();
        for c in &ans.citations {
            crate::outln!(
                "[{}] {:.3} {} {}: {}",
                c.n,
                c.score,
                c.kind,
                c.source_ids.join(","),
                c.snippet.replace('\n', " ")
            );
        }
    }
    if let Some(m) = &ans.model {
        crate::outln!(
            "\n({m}; {} tokens, ${:.6})",
            ans.usage.total_tokens,
            ans.usage.cost_usd
        );
    }
    Ok(())
}

async fn worker(settings: Settings, a: WorkerArgs) -> Result<()> {
    let celery = CelerySettings::from_env()?;
    for (name, v) in [
        ("--visibility-timeout", a.visibility_timeout),
        ("--shutdown-grace", a.shutdown_grace),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be a number of seconds, got {v}");
        }
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let queues: Vec<String> = a
        .queues
        .iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    if queues.is_empty() {
        bail!("no queue to consume: pass -Q NAME");
    }
    let autoscale = a
        .autoscale
        .as_deref()
        .map(worker::autoscale::Range::parse)
        .transpose()?;
    let autoscale_keepalive =
        worker::autoscale::keepalive_from(std::env::var("AUTOSCALE_KEEPALIVE").ok().as_deref())?;
    let opts = WorkerOptions {
        autoscale,
        autoscale_keepalive,
        broker_url: celery.broker_url,
        backend_url: celery.backend_url,
        result_expires: celery.result_expires,
        concurrency: a.concurrency,
        queues,
        hostname: worker::expand_hostname(&a.hostname),
        prefetch_multiplier: a.prefetch_multiplier,
        visibility_timeout: Duration::from_secs_f64(a.visibility_timeout),
        events: a.events,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        debug_tasks: a.debug_tasks,
        http: a.http,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let (shared, blocks) = settings.split();
    worker::run(opts, Arc::new(Services::new(shared)?), blocks, shutdown).await
}

async fn health() -> Result<()> {
    let celery = CelerySettings::from_env()?;
    let mut failing = Vec::new();
    for (part, url) in [
        ("broker", &celery.broker_url),
        ("result backend", &celery.backend_url),
    ] {
        let shown = redact_url(url.expose());
        let conn = RedisConn::open(url.expose(), HEALTH_TIMEOUT)?;
        match tokio::time::timeout(HEALTH_TIMEOUT, conn.ping()).await {
            Ok(Ok(())) => crate::outln!("{part}: ok ({shown})"),
            Ok(Err(e)) => failing.push(format!("{part} ({shown}): {e}")),
            Err(_) => failing.push(format!("{part} ({shown}): no answer in {HEALTH_TIMEOUT:?}")),
        }
    }
    if !failing.is_empty() {
        bail!("unhealthy: {}", failing.join("; "));
    }
    Ok(())
}

/// The first SIGTERM or SIGINT starts a warm shutdown; a second one is a cold shutdown: exit at
/// once, leaving held messages in `unacked` for a restore.
async fn signals(warm: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    warm.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    crate::logging::flush();
    // Straight to stderr: nothing after this line is flushed.
    crate::errln!("worker: Cold shutdown: held messages stay in unacked for a restore");
    std::process::exit(1);
}

async fn build(mut settings: Settings, a: BuildArgs) -> Result<()> {
    // --source names files; without it, the app's Postgres when DATABASE_URL is set.
    let sv = if !a.source.is_empty() {
        settings.pipeline.source_paths = a.source.clone();
        settings.database_url = None;
        Services::new(settings.split().0)?
    } else {
        Services::new(settings.split().0)?
    };
    let source = sv
        .source()
        .context("no source: pass --source PATH, or set DATABASE_URL or ORBIT_SOURCE")?;
    let total = source.size_hint_bytes();
    let mut pipeline = sv.pipeline(source).await?;
    pipeline.settings.reuse_vectors = !a.reembed;
    if a.reembed {
        pipeline.store.reset().await?;
    }
    let scope = match a.user {
        Some(u) => BuildScope::User(u),
        None => BuildScope::AllUsers,
    };
    let cancel = CancellationToken::new();
    let ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    let bar = LazyBar::new(total);
    let live = a
        .timeline
        .as_ref()
        .map(|_| Arc::new(orbit_pipeline::progress::BuildProgress::default()));
    let done = CancellationToken::new();
    let writer = match (&a.timeline, &live) {
        (Some(path), Some(l)) => Some(timeline_writer(path, l.clone(), done.clone())?),
        _ => None,
    };
    let report = pipeline
        .run_live(scope, cancel, Some(bar.callback()), live)
        .await;
    done.cancel();
    if let Some(w) = writer {
        let _ = w.await;
    }
    bar.finish();
    let report = report.context("build failed")?;
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &BuildReport) {
    crate::outln!(
        "built {}: {} documents read, {} kept ({} empty, {} duplicates), {} chunks ({} messages packed), {} tokens",
        r.scope, r.documents_read, r.documents_kept, r.empty_dropped, r.duplicates_dropped, r.chunks, r.packed_messages, r.tokens
    );
    crate::outln!(
        "store: {} vectors upserted ({} embedded, {} unchanged kept their vectors), {} stale removed; model {} ({} dims)",
        r.vectors_upserted, r.chunks_embedded, r.chunks_reused, r.points_deleted, r.model, r.dimension
    );
    if r.rejected_count > 0 {
        crate::outln!("rejected {} inputs:", r.rejected_count);
        for x in r.rejected.iter().take(10) {
            crate::outln!("  {}: {}", x.location, x.reason);
        }
    }
    for s in &r.stages {
        crate::outln!(
            "  {:<8} busy {:>9.1} ms  waited on previous {:>9.1} ms  on next {:>9.1} ms",
            s.name,
            s.busy_ms,
            s.wait_upstream_ms,
            s.wait_downstream_ms
        );
    }
    crate::outln!(
        "{:.2} s, {:.0} documents/s, {:.2} MB/s; bottleneck: {}",
        r.wall_ms / 1000.0,
        r.throughput.documents_per_s,
        r.throughput.input_mb_per_s,
        r.bottleneck
    );
}

/// A progress bar that appears only on a terminal and only once the work has taken a moment.
struct LazyBar {
    inner: Arc<Mutex<BarState>>,
}

struct BarState {
    started: Instant,
    total: Option<u64>,
    done: u64,
    bar: Option<ProgressBar>,
}

/// Work shorter than this finishes without a bar.
const BAR_DELAY: Duration = Duration::from_millis(700);

impl LazyBar {
    fn new(total: Option<u64>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(BarState {
                started: Instant::now(),
                total,
                done: 0,
                bar: None,
            })),
        }
    }

    fn callback(&self) -> ProgressFn {
        let state = self.inner.clone();
        let tty = std::io::stderr().is_terminal();
        Arc::new(move |bytes| {
            let Ok(mut s) = state.lock() else { return };
            s.done += bytes;
            if s.bar.is_none() && tty && s.started.elapsed() > BAR_DELAY {
                let bar = match s.total {
                    Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                    None => ProgressBar::new_spinner(),
                };
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {wide_bar} {binary_bytes_per_sec} eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                s.bar = Some(bar);
            }
            let done = s.done;
            if let Some(b) = &s.bar {
                b.set_position(done);
            }
        })
    }

    fn finish(&self) {
        if let Ok(s) = self.inner.lock() {
            if let Some(b) = &s.bar {
                b.finish_and_clear();
            }
        }
    }
}

async fn search(settings: Settings, a: SearchArgs) -> Result<()> {
    if a.query.trim().is_empty() {
        bail!("empty query");
    }
    let data_dir = settings.pipeline.data_dir.clone();
    let sv = Services::new(settings.split().0)?;
    let embedder = sv.live_embedder().await?;
    let store = sv.store().await?;
    // Compare, never record: a search must not claim an empty store for its model.
    match store.model().await? {
        None => {
            crate::outln!("no memory built yet in {}", data_dir.display());
            return Ok(());
        }
        Some((m, d)) if m != embedder.model_id() || d != embedder.dimension() => {
            return Err(orbit_pipeline::store::StoreError::ModelMismatch {
                stored_model: m,
                stored_dim: d,
                model: embedder.model_id().to_string(),
                dim: embedder.dimension(),
            }
            .into());
        }
        Some(_) => {}
    }
    let task_id = format!("cli-{}", uuid::Uuid::new_v4());
    let q = crate::answer::Question {
        user_id: a.user,
        question: &a.query,
        top_k: a.top_k,
        task_id: &task_id,
        mode: a.mode,
    };
    // Any top_k: a large one lists the user's whole memory.
    let hits = crate::answer::retrieve(&sv, &q, usize::MAX).await?;
    if a.json {
        crate::outln!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        crate::outln!("no memory for user {} yet", a.user);
    }
    for (i, h) in hits.iter().enumerate() {
        let text: String = h
            .text
            .chars()
            .take(200)
            .collect::<String>()
            .replace('\n', " ");
        crate::outln!(
            "{}. {:.4} [{}] {} {}",
            i + 1,
            h.score,
            h.kind,
            h.source_ids.join(","),
            text
        );
    }
    Ok(())
}
