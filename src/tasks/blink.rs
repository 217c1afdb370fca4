//! What the two Blink tasks share: how a step (transcription or analysis) ends, written to its
//! status column and turned into the task's outcome in one place.

use std::time::Duration;

use serde_json::Value;

use super::{TaskContext, TaskDef, TaskOutcome};
use crate::celery::result::ExceptionInfo;
use crate::db::{BlinkAudio, BlinkStep, Db};

pub const EXC_MODULE: &str = "blink.errors";

/// How a step ends, before its status column is written.
pub enum End {
    Done(Value),
    /// Permanent: the record says why.
    Failed(&'static str, String),
    /// Worth another attempt, after the service's hint if it gave one.
    Retry(String, Option<Duration>),
}

/// Runs `work` under the soft limit, then records the status (`processing` with the reason
/// while a retry follows, `failed` when none does) and returns the task's outcome. The step's
/// own code writes `completed` with its results.
pub async fn finish(
    ctx: &TaskContext,
    def: &TaskDef,
    step: BlinkStep,
    audio_id: i64,
    retry_kind: &str,
    work: impl std::future::Future<Output = End>,
) -> TaskOutcome {
    let end = tokio::select! {
        e = work => e,
        _ = ctx.cancel.cancelled() => End::Failed(
            "SoftTimeLimitExceeded",
            format!("the {} did not finish within its time limit", step.noun()),
        ),
    };
    let last = ctx.call.retries >= def.retry.max_retries;
    let (status, message, outcome) = match end {
        End::Done(v) => return TaskOutcome::Success(v),
        End::Retry(m, after) if !last => (
            "processing",
            format!("attempt {} failed, retrying: {m}", ctx.call.retries + 1),
            TaskOutcome::Retry {
                error: ExceptionInfo::raised(retry_kind, EXC_MODULE, &m, def.name),
                after,
            },
        ),
        End::Retry(m, _) => {
            let f = ExceptionInfo::raised(retry_kind, EXC_MODULE, &m, def.name);
            ("failed", m, TaskOutcome::Failure(f))
        }
        End::Failed(kind, m) => {
            let f = ExceptionInfo::raised(kind, EXC_MODULE, &m, def.name);
            ("failed", m, TaskOutcome::Failure(f))
        }
    };
    // A record that does not exist updates no row; without a database there is none to write.
    if let Some(db) = &ctx.services.db {
        if let Err(e) = db.set_blink_status(audio_id, step, status, &message).await {
            tracing::error!(error = %e, audio_id, "cannot record the Blink {} status", step.noun());
        }
    }
    outcome
}

/// The recording's row, or how the step ends without one: a missing row is permanent, a
/// database error is worth another attempt.
pub async fn load_audio(db: &Db, audio_id: i64) -> Result<BlinkAudio, End> {
    match db.blink_audio(audio_id).await {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(End::Failed(
            "AudioNotFound",
            format!("Blink audio {audio_id} does not exist"),
        )),
        Err(e) => Err(End::Retry(e.to_string(), None)),
    }
}
