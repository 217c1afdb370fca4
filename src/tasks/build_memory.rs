//! `orbitpilot.build_memory(user_id, build_id=None)`: runs the memory pipeline for one user,
//! keeps the app's build record true (planned → running → completed | failed), holds the user's
//! build lock, and coalesces a request that arrives while a build runs.

use std::sync::Arc;
use std::time::Duration;

use orbit_pipeline::runner::PipelineError;
use orbit_pipeline::{BuildReport, BuildScope};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{bind, AbortReason, RetryPolicy, TaskContext, TaskDef, TaskOutcome, DEFAULT_LIMITS};
use crate::cache::Cache;
use crate::celery::result::ExceptionInfo;
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
    run: |ctx| Box::pin(run(ctx)),
};

#[derive(Deserialize)]
struct Args {
    user_id: i64,
    /// The app's build record; created here when the app sent none.
    build_id: Option<i64>,
}

const EXC_MODULE: &str = "orbitpilot.errors";

fn fail(kind: &str, msg: &str) -> TaskOutcome {
    TaskOutcome::Failure(ExceptionInfo::raised(kind, EXC_MODULE, msg, NAME))
}

fn retry(msg: &str, after: Option<Duration>) -> TaskOutcome {
    TaskOutcome::Retry {
        error: ExceptionInfo::raised("BuildError", EXC_MODULE, msg, NAME),
        after,
    }
}

/// Marks the record when the task is aborted from outside (hard time limit, shutdown): the
/// task's own code never runs again, so the drop does the write.
struct AbortGuard {
    db: Db,
    build: i64,
    fence: i64,
    reason: Arc<std::sync::OnceLock<AbortReason>>,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (db, id, fence) = (self.db.clone(), self.build, self.fence);
        let reason = self.reason.get().copied();
        tokio::spawn(async move {
            let r = match reason {
                Some(AbortReason::HardTimeLimit) => {
                    db.build_failed(
                        id,
                        Some(fence),
                        "The memory build exceeded its hard time limit and was stopped.",
                    )
                    .await
                }
                _ => {
                    db.build_retrying(
                        id,
                        fence,
                        "The memory build was interrupted by a worker shutdown; it will run again.",
                    )
                    .await
                }
            };
            if let Err(e) = r {
                tracing::error!(build_id = id, error = %e, "cannot record the aborted build");
            }
        });
    }
}

async fn run(ctx: TaskContext) -> TaskOutcome {
    let args: Args = match bind(&ctx.call, PARAMS) {
        Ok(a) => a,
        Err(e) => return TaskOutcome::Failure(e),
    };
    let sv = ctx.services.clone();
    let uid = args.user_id;
    let task_id = ctx.call.id.clone();
    let attempt = ctx.call.retries + 1;
    let last_attempt = ctx.call.retries >= TASK.retry.max_retries;

    // The record: the app's, the one an earlier attempt of this task made, or a new one.
    let record = match &sv.db {
        None => None,
        Some(db) => match find_record(db, uid, args.build_id, &task_id).await {
            Ok(id) => Some((db.clone(), id)),
            Err(o) => return o,
        },
    };
    let build_id = record.as_ref().map(|r| r.1).or(args.build_id).unwrap_or(0);
    let ttl = sv.settings.build_lock_ttl;

    let lock = match lock::acquire(&sv.locks, uid, build_id, ttl).await {
        Ok(Acquired::Lock(l)) => l,
        Ok(Acquired::HeldBy(other)) => {
            if let Err(e) = lock::request_again(&sv.locks, uid, ttl).await {
                return retry(
                    &format!("cannot coalesce with the running build: {e}"),
                    None,
                );
            }
            if let Some((db, id)) = &record {
                if let Err(e) = db.build_coalesced(*id, other, &task_id).await {
                    return retry(&e.to_string(), None);
                }
            }
            tracing::info!(
                user_id = uid,
                running_build = other,
                "build request coalesced into the running build"
            );
            return TaskOutcome::Success(json!({
                "status": "coalesced",
                "user_id": uid,
                "build_id": record.as_ref().map(|r| r.1),
                "coalesced_into": other,
            }));
        }
        Err(e) => return retry(&format!("cannot take the build lock: {e}"), None),
    };
    let fence = lock.fence;

    let mut guard = None;
    if let Some((db, id)) = &record {
        match db.build_running(*id, &task_id, attempt, fence).await {
            Ok(true) => {}
            Ok(false) => {
                lock.release().await;
                return fail(
                    "BuildSuperseded",
                    "a newer run of this build has taken over; this one stops",
                );
            }
            Err(e) => {
                lock.release().await;
                return retry(&e.to_string(), None);
            }
        }
        guard = Some(AbortGuard {
            db: db.clone(),
            build: *id,
            fence,
            reason: ctx.aborted.clone(),
            armed: true,
        });
    }

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
    let result = run_passes(&ctx, uid, &lock, &stop).await;
    watcher.abort();
    if let Some(g) = guard.as_mut() {
        g.armed = false;
    }

    let outcome = match result {
        Ok(report) => {
            sv.metrics.build("completed", Some(&report));
            let counts = BuildCounts {
                documents: report.documents_kept,
                chunks: report.chunks,
                tokens: report.tokens,
                reused: report.chunks_reused,
                embedded: report.chunks_embedded,
            };
            if let Some((db, id)) = &record {
                if let Err(e) = db.build_completed(*id, fence, counts).await {
                    tracing::error!(build_id = id, error = %e, "cannot record the completed build");
                }
            }
            let embed_tokens = report
                .stages
                .iter()
                .find(|s| s.name == "embed")
                .map(|s| s.tokens)
                .unwrap_or(0);
            if embed_tokens > 0
                && sv.settings.resolved_embedder() == crate::config::EmbedderKind::OpenAi
            {
                // One row per build for its paid embedding calls (reused chunks cost nothing).
                let model = report.model.clone();
                sv.log_usage(crate::db::UsageRow {
                    user_id: Some(uid),
                    feature: "orbitpilot_memory_embed",
                    cost_usd: sv.settings.prices.cost(&model, embed_tokens as i64, 0, 0.0),
                    model,
                    prompt_tokens: embed_tokens as i64,
                    task_id: task_id.clone(),
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
                o.insert("build_id".into(), json!(record.as_ref().map(|r| r.1)));
            }
            TaskOutcome::Success(v)
        }
        Err(e) => {
            let (message, outcome) = failure(&ctx, &lock, e, attempt, last_attempt);
            let retrying = matches!(outcome, TaskOutcome::Retry { .. });
            sv.metrics
                .build(if retrying { "retried" } else { "failed" }, None);
            if let Some((db, id)) = &record {
                let r = if retrying {
                    db.build_retrying(*id, fence, &message).await
                } else {
                    db.build_failed(*id, Some(fence), &message).await
                };
                if let Err(e) = r {
                    tracing::error!(build_id = id, error = %e, "cannot record the failed build");
                }
            }
            outcome
        }
    };
    lock.release().await;
    outcome
}

async fn find_record(
    db: &Db,
    uid: i64,
    build_id: Option<i64>,
    task_id: &str,
) -> Result<i64, TaskOutcome> {
    let db_err = |e: crate::db::DbError| {
        if e.is_retryable() {
            retry(&e.to_string(), None)
        } else {
            fail("DatabaseError", &e.to_string())
        }
    };
    match db.user_active(uid).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(fail("UserNotFound", &format!("user {uid} does not exist"))),
        Err(e) => return Err(db_err(e)),
    }
    if let Some(id) = build_id {
        return match db.build(id).await {
            Ok(Some(b)) if b.user_id == uid => Ok(id),
            Ok(Some(_)) => Err(fail(
                "BuildNotFound",
                &format!("memory build {id} belongs to another user"),
            )),
            Ok(None) => Err(fail(
                "BuildNotFound",
                &format!("memory build {id} does not exist"),
            )),
            Err(e) => Err(db_err(e)),
        };
    }
    match db.build_by_task(uid, task_id).await {
        Ok(Some(b)) => Ok(b.id),
        Ok(None) => db.create_build(uid, task_id).await.map_err(db_err),
        Err(e) => Err(db_err(e)),
    }
}

/// One pipeline run, plus one more for each coalesced request that arrived meanwhile.
async fn run_passes(
    ctx: &TaskContext,
    uid: i64,
    lock: &lock::BuildLock,
    stop: &CancellationToken,
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
            .run(BuildScope::User(uid), stop.clone(), None)
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

/// The record's message and the task's ending for a failed build.
fn failure(
    ctx: &TaskContext,
    lock: &lock::BuildLock,
    e: BuildFailure,
    attempt: u32,
    last_attempt: bool,
) -> (String, TaskOutcome) {
    match e {
        BuildFailure::Config(m) => (
            format!("The memory build is misconfigured: {m}"),
            fail("ConfigError", &m),
        ),
        BuildFailure::Pipeline(PipelineError::Cancelled) if ctx.cancel.is_cancelled() => {
            let m = "The memory build reached its soft time limit and was stopped.";
            (
                m.to_string(),
                TaskOutcome::Failure(ExceptionInfo::raised(
                    "SoftTimeLimitExceeded",
                    "billiard.exceptions",
                    m,
                    NAME,
                )),
            )
        }
        BuildFailure::Pipeline(PipelineError::Cancelled) if lock.lost.is_cancelled() => {
            let m = format!(
                "The memory build lost its lock (not renewed within {:?}) and stopped so that two builds never write at once.",
                lock.ttl()
            );
            (m.clone(), retry(&m, None))
        }
        BuildFailure::Pipeline(e) if e.is_retryable() && !last_attempt => {
            let m = format!("Attempt {attempt} failed: {e}. Retrying.");
            (m, retry(&e.to_string(), e.retry_after()))
        }
        BuildFailure::Pipeline(e) => (
            format!("The memory build failed: {e}"),
            fail("BuildError", &e.to_string()),
        ),
    }
}
