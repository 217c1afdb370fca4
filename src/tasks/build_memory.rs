//! `orbitpilot.build_memory(user_id, build_id=None)`: runs the memory pipeline for one user,
//! keeps the app's build record true (planned → running → completed | failed), holds the user's
//! build lock, and coalesces a request that arrives while a build runs.

use std::sync::Arc;
use std::time::Duration;

use orbit_pipeline::progress::BuildProgress;
use orbit_pipeline::{BuildReport, BuildScope, PipelineError, Retryable};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{
    bind, AbortReason, Raises, RetryPolicy, TaskContext, TaskDef, TaskError, TaskInfo, TaskResult,
    DEFAULT_LIMITS,
};
use crate::cache::Cache;
use crate::db::{BuildCounts, Db};
use crate::lock::{self, Acquired};

pub const NAME: &str = "orbitpilot.build_memory";
const PARAMS: &[&str] = &["user_id", "build_id"];
/// Passes one task makes when coalesced requests keep asking for another: a change that came in
/// mid-build is picked up, and a flood of clicks still ends.
const MAX_PASSES: usize = 3;

/// A failed embedding API or store is worth three more tries, spaced out: a rate limit or a
/// restart passes within minutes.
pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(300),
    },
    limits: DEFAULT_LIMITS,
    block: super::Block::None,
    run: |ctx| Box::pin(run(ctx)),
};

#[derive(Deserialize)]
struct Args {
    user_id: i64,
    /// The app's build record; created here when the app sent none.
    build_id: Option<i64>,
}

const RAISES: Raises = Raises {
    module: "orbitpilot.errors",
    task: NAME,
};

/// The record's text when the worker stops a build at shutdown (the message is given back and
/// runs again on the next worker).
pub const SHUTDOWN_MESSAGE: &str =
    "The memory build was stopped because the worker shut down; it runs again when a worker takes the task back.";
/// The record of a build stopped by `revoke(terminate=True)`.
pub const REVOKED_MESSAGE: &str = "revoked";
const HARD_LIMIT_MESSAGE: &str = "The memory build exceeded its hard time limit and was stopped.";

/// The build record this run keeps true, with the fence of the lock it holds.
#[derive(Clone)]
struct Record {
    db: Db,
    id: i64,
    fence: i64,
}

async fn run(ctx: TaskContext) -> TaskResult {
    let args: Args = bind(&ctx.call, PARAMS)?;
    let sv = ctx.services.clone();
    let uid = args.user_id;
    let task_id = ctx.call.id.clone();

    // The record: the app's, the one an earlier attempt of this task made, or a new one.
    let record_id = match &sv.db {
        None => None,
        Some(db) => Some((
            db.clone(),
            find_record(db, uid, args.build_id, &task_id).await?,
        )),
    };
    let build_id = record_id
        .as_ref()
        .map(|r| r.1)
        .or(args.build_id)
        .unwrap_or(0);
    let ttl = sv.settings.pipeline.build_lock_ttl;

    let lock = match lock::acquire(&sv.locks, uid, build_id, ttl).await {
        Ok(Acquired::Lock(l)) => l,
        Ok(Acquired::HeldBy(other)) => return coalesce(&ctx, uid, record_id, other).await,
        Err(e) => {
            return Err(RAISES.retry(
                "BuildError",
                format!("cannot take the build lock: {e}"),
                None,
            ))
        }
    };
    let record = record_id.map(|(db, id)| Record {
        db,
        id,
        fence: lock.fence,
    });
    if let Some(r) = &record {
        start_record(&ctx, r).await?;
    }
    set_abort_hook(&ctx, record.clone(), lock.releaser());

    // The pipeline stops at the soft limit, or when the lock is lost (another run may be
    // writing the same user's memory).
    let stop = CancellationToken::new();
    let watcher = {
        let (stop, soft, lost) = (stop.clone(), ctx.cancel.clone(), lock.lost.clone());
        tokio::spawn(async move {
            tokio::select! { _ = soft.cancelled() => {}, _ = lost.cancelled() => {} }
            stop.cancel();
        })
    };
    let live = Arc::new(BuildProgress::default());
    let reporter = tokio::spawn(report_progress(
        record.clone(),
        ctx.info.clone(),
        live.clone(),
    ));
    let result = run_passes(&ctx, uid, &lock, &stop, &live).await;
    reporter.abort();
    watcher.abort();
    ctx.on_abort.clear();
    // The lock releases itself when it goes out of scope, on every path.
    match result {
        Ok(report) => Ok(on_success(&ctx, uid, record.as_ref(), report).await),
        Err(failure) => {
            let e = failure.into_task_error(Stopped {
                soft_limit: ctx.cancel.is_cancelled(),
                lock_lost: lock.lost.is_cancelled().then(|| lock.ttl()),
            });
            on_failure(&ctx, record.as_ref(), &e).await;
            Err(e)
        }
    }
}

/// How often a running build's progress is written to its record and shown to `inspect
/// active`: the dashboard polls every 4 s, so it sees every second write. One fenced UPDATE of
/// one row every 2 s, off the pipeline's tasks (its cost on a build is not yet measured).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Writes the build's progress every [`PROGRESS_EVERY`] until aborted. A write that fails (a
/// table without the progress columns, a database blip) is warned of once; the build goes on,
/// and `inspect active` still shows the progress.
async fn report_progress(record: Option<Record>, info: TaskInfo, live: Arc<BuildProgress>) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut warned = false;
    loop {
        tick.tick().await;
        let p = live.snapshot();
        info.set(serde_json::to_value(p).unwrap_or_default());
        if let Some(r) = &record {
            if let Err(e) = r.db.build_progress(r.id, r.fence, &p).await {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(build_id = r.id, error = %e, "cannot write the build's progress to its record (the progress columns, migrations/20261202000001_build_progress.sql?)");
                }
            }
        }
    }
}

/// How soon a request that found the running build already ended tries again: the ended build
/// releases its lock right after writing its record.
const COALESCE_MISSED_RETRY: Duration = Duration::from_secs(2);

/// Another build of this user runs: this request follows it (and asks it for one more pass).
async fn coalesce(
    ctx: &TaskContext,
    uid: i64,
    record: Option<(Db, i64)>,
    running: i64,
) -> TaskResult {
    let sv = &ctx.services;
    lock::request_again(&sv.locks, uid, sv.settings.pipeline.build_lock_ttl)
        .await
        .map_err(|e| {
            RAISES.retry(
                "BuildError",
                format!("cannot coalesce with the running build: {e}"),
                None,
            )
        })?;
    let mut running = running;
    if let Some((db, id)) = &record {
        let following = db
            .build_coalesced(*id, running, &ctx.call.id)
            .await
            .map_err(|e| RAISES.retry("BuildError", e, None))?;
        let Some(root) = following else {
            // The running build ended between our lock attempt and now, and releases its lock
            // in a moment: this request builds on its own shortly instead of following a build
            // that will never end its record.
            return Err(RAISES.retry(
                "BuildError",
                format!("build {running} ended as this request arrived; building again"),
                Some(COALESCE_MISSED_RETRY),
            ));
        };
        running = root;
    }
    tracing::info!(
        user_id = uid,
        running_build = running,
        "build request coalesced into the running build"
    );
    Ok(json!({
        "status": "coalesced",
        "user_id": uid,
        "build_id": record.as_ref().map(|r| r.1),
        "coalesced_into": running,
    }))
}

/// planned → running under this run's fence, and what to write should the worker abandon it.
async fn start_record(ctx: &TaskContext, r: &Record) -> Result<(), TaskError> {
    let attempt = ctx.call.retries + 1;
    match r
        .db
        .build_running(r.id, &ctx.call.id, attempt, r.fence)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return Err(RAISES.permanent(
                "BuildSuperseded",
                "a newer run of this build has taken over; this one stops",
            ))
        }
        Err(e) => return Err(RAISES.retry("BuildError", e, None)),
    }
    Ok(())
}

/// What the worker does for a build it dropped (hard time limit, abandoning shutdown): the
/// record ends `failed` (with every record coalesced into it, under its row lock), then the
/// lock is released, in that order, so the next request neither follows the dead build nor
/// waits out the lock's TTL.
fn set_abort_hook(ctx: &TaskContext, record: Option<Record>, lock: lock::LockReleaser) {
    ctx.on_abort.set(move |reason| {
        Box::pin(async move {
            let message = match reason {
                AbortReason::HardTimeLimit => HARD_LIMIT_MESSAGE,
                AbortReason::Shutdown => SHUTDOWN_MESSAGE,
                AbortReason::Revoked => REVOKED_MESSAGE,
            };
            if let Some(r) = record {
                if let Err(e) = r.db.build_failed(r.id, Some(r.fence), message).await {
                    tracing::error!(build_id = r.id, error = %e, "cannot record the aborted build");
                }
            }
            lock.release().await;
        })
    });
}

/// The build's bookkeeping when it completed: the record, the usage row of its paid embedding
/// calls, the snapshot cache; and the task's result.
async fn on_success(
    ctx: &TaskContext,
    uid: i64,
    record: Option<&Record>,
    report: BuildReport,
) -> Value {
    let sv = &ctx.services;
    sv.metrics.build("completed", Some(&report));
    let counts = BuildCounts {
        documents: report.documents_kept,
        chunks: report.chunks,
        tokens: report.tokens,
        reused: report.chunks_reused,
        embedded: report.chunks_embedded,
    };
    if let Some(r) = record {
        if let Err(e) = r.db.build_completed(r.id, r.fence, counts).await {
            tracing::error!(build_id = r.id, error = %e, "cannot record the completed build");
        }
    }
    let embed_tokens = report.stage("embed").map(|s| s.tokens).unwrap_or(0);
    if embed_tokens > 0
        && sv.settings.pipeline.resolved_embedder() == crate::config::EmbedderKind::OpenAi
    {
        // One row per build for its paid embedding calls (reused chunks cost nothing).
        let model = report.model.clone();
        sv.log_usage(crate::db::UsageRow {
            user_id: Some(uid),
            feature: "orbitpilot_memory_embed",
            cost_usd: sv.settings.prices.cost(&model, embed_tokens as i64, 0, 0.0),
            model,
            prompt_tokens: embed_tokens as i64,
            task_id: ctx.call.id.clone(),
            ..Default::default()
        })
        .await;
    }
    if report.chunks_embedded > 0 || report.points_deleted > 0 {
        // The memory changed: the UI's counts must not be two minutes stale.
        if let Err(e) = sv.cache.delete(&[Cache::snapshot_key(uid)]).await {
            tracing::warn!(error = %e, "cannot invalidate the snapshot counts cache");
        }
    }
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("status".into(), json!("completed"));
        o.insert("user_id".into(), json!(uid));
        o.insert("build_id".into(), json!(record.map(|r| r.id)));
    }
    v
}

/// The record after a failed run: back to planned while a retry follows, else failed.
async fn on_failure(ctx: &TaskContext, record: Option<&Record>, e: &TaskError) {
    let retrying = matches!(e, TaskError::Retry { .. }) && !ctx.is_last_attempt();
    ctx.services
        .metrics
        .build(if retrying { "retried" } else { "failed" }, None);
    let Some(r) = record else { return };
    let res = if retrying {
        let m = format!(
            "Attempt {} failed: {}. Retrying.",
            ctx.call.retries + 1,
            e.message()
        );
        r.db.build_retrying(r.id, r.fence, &m).await
    } else {
        let m = match e.exception().exc_type.as_str() {
            "SoftTimeLimitExceeded" | "LockLost" | "ConfigError" => e.message(),
            _ => format!("The memory build failed: {}", e.message()),
        };
        r.db.build_failed(r.id, Some(r.fence), &m).await
    };
    if let Err(err) = res {
        tracing::error!(build_id = r.id, error = %err, "cannot record the failed build");
    }
}

async fn find_record(
    db: &Db,
    uid: i64,
    build_id: Option<i64>,
    task_id: &str,
) -> Result<i64, TaskError> {
    let db_err = |e: crate::db::DbError| RAISES.error("DatabaseError", &e);
    if db.user_active(uid).await.map_err(db_err)?.is_none() {
        return Err(RAISES.permanent("UserNotFound", format!("user {uid} does not exist")));
    }
    if let Some(id) = build_id {
        return match db.build(id).await.map_err(db_err)? {
            Some(b) if b.user_id == uid => Ok(id),
            Some(_) => Err(RAISES.permanent(
                "BuildNotFound",
                format!("memory build {id} belongs to another user"),
            )),
            None => {
                Err(RAISES.permanent("BuildNotFound", format!("memory build {id} does not exist")))
            }
        };
    }
    match db.build_by_task(uid, task_id).await.map_err(db_err)? {
        Some(b) => Ok(b.id),
        None => db.create_build(uid, task_id).await.map_err(db_err),
    }
}

/// One pipeline run, plus one more for each coalesced request that arrived meanwhile.
async fn run_passes(
    ctx: &TaskContext,
    uid: i64,
    lock: &lock::BuildLock,
    stop: &CancellationToken,
    live: &Arc<BuildProgress>,
) -> Result<BuildReport, BuildFailure> {
    let sv = &ctx.services;
    let mut pass = 0;
    loop {
        pass += 1;
        let source = sv
            .source()
            .map_err(|e| BuildFailure::Config(format!("{e:#}")))?;
        let pipeline = sv
            .pipeline(source)
            .await
            .map_err(|e| BuildFailure::Config(format!("{e:#}")))?;
        let report = pipeline
            .run_live(
                BuildScope::User(uid),
                stop.clone(),
                None,
                Some(live.clone()),
            )
            .await
            .map_err(BuildFailure::Pipeline)?;
        if pass >= MAX_PASSES || stop.is_cancelled() || !lock.take_again().await {
            return Ok(report);
        }
        tracing::info!(
            user_id = uid,
            pass = pass + 1,
            "another build was requested meanwhile: building again"
        );
    }
}

enum BuildFailure {
    Config(String),
    Pipeline(PipelineError),
}

/// Why a build's pipeline may have been stopped from outside.
#[derive(Debug, Clone, Copy, Default)]
struct Stopped {
    soft_limit: bool,
    /// The lock was lost: its TTL.
    lock_lost: Option<Duration>,
}

impl BuildFailure {
    /// What a failed run raises. Whether a retry follows is the worker's decision.
    fn into_task_error(self, stopped: Stopped) -> TaskError {
        match self {
            BuildFailure::Config(m) => RAISES.permanent(
                "ConfigError",
                format!("The memory build is misconfigured: {m}"),
            ),
            BuildFailure::Pipeline(PipelineError::Cancelled) if stopped.soft_limit => {
                Raises {
                    module: "billiard.exceptions",
                    task: NAME,
                }
                .permanent(
                    "SoftTimeLimitExceeded",
                    "The memory build reached its soft time limit and was stopped.",
                )
            }
            BuildFailure::Pipeline(PipelineError::Cancelled) if stopped.lock_lost.is_some() => {
                RAISES.retry(
                    "LockLost",
                    format!(
                        "The memory build lost its lock (not renewed within {:?}) and stopped so that two builds never write at once.",
                        stopped.lock_lost.unwrap_or_default()
                    ),
                    None,
                )
            }
            BuildFailure::Pipeline(e) if e.is_retryable() => {
                RAISES.retry("BuildError", &e, e.retry_after())
            }
            BuildFailure::Pipeline(e) => RAISES.permanent("BuildError", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orbit_pipeline::embed::EmbedError;
    use orbit_pipeline::http_call::CallError;
    use orbit_pipeline::source::SourceError;

    fn kind(e: &TaskError) -> (&'static str, String) {
        let v = match e {
            TaskError::Permanent(_) => "permanent",
            TaskError::Retry { .. } => "retry",
            TaskError::BadArgs(_) => "bad args",
        };
        (v, e.exception().exc_type.clone())
    }

    #[test]
    fn what_a_failed_build_raises() {
        let embed =
            |e: CallError| BuildFailure::Pipeline(PipelineError::Embed(EmbedError::from(e)));
        let soft = Stopped {
            soft_limit: true,
            lock_lost: None,
        };
        let lost = Stopped {
            soft_limit: false,
            lock_lost: Some(Duration::from_secs(60)),
        };
        let none = Stopped::default();
        let later = CallError::Later {
            after: Duration::from_secs(30),
            last: "HTTP 429".into(),
        };
        let gave_up = CallError::GaveUp {
            attempts: 3,
            last: "HTTP 503".into(),
        };
        let table: Vec<(BuildFailure, Stopped, (&str, &str))> = vec![
            (
                BuildFailure::Config("no source".into()),
                none,
                ("permanent", "ConfigError"),
            ),
            (
                BuildFailure::Pipeline(PipelineError::Cancelled),
                soft,
                ("permanent", "SoftTimeLimitExceeded"),
            ),
            (
                BuildFailure::Pipeline(PipelineError::Cancelled),
                lost,
                ("retry", "LockLost"),
            ),
            (
                BuildFailure::Pipeline(PipelineError::Cancelled),
                none,
                ("permanent", "BuildError"),
            ),
            (embed(later.clone()), none, ("retry", "BuildError")),
            (embed(gave_up), none, ("permanent", "BuildError")),
            (
                embed(CallError::from_status(401, "{}", None)),
                none,
                ("permanent", "BuildError"),
            ),
            (
                BuildFailure::Pipeline(PipelineError::Source(SourceError::Query("reset".into()))),
                none,
                ("retry", "BuildError"),
            ),
        ];
        for (i, (failure, stopped, want)) in table.into_iter().enumerate() {
            let e = failure.into_task_error(stopped);
            assert_eq!(kind(&e), (want.0, want.1.to_string()), "row {i}: {e:?}");
        }
        // The server's hint rides along to the task-level retry.
        match embed(later).into_task_error(none) {
            TaskError::Retry { after, .. } => assert_eq!(after, Some(Duration::from_secs(30))),
            other => panic!("{other:?}"),
        }
    }
}
