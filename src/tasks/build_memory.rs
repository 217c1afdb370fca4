//! `orbitpilot.build_memory(user_id, build_id=None)`: runs the memory pipeline for one user and
//! returns its BuildReport.

use std::sync::Arc;
use std::time::Duration;

use orbit_pipeline::runner::PipelineError;
use orbit_pipeline::source::JsonlSource;
use orbit_pipeline::BuildScope;
use serde::Deserialize;

use super::{bind, RetryPolicy, TaskContext, TaskDef, TaskOutcome, DEFAULT_LIMITS};
use crate::celery::result::ExceptionInfo;

pub const NAME: &str = "orbitpilot.build_memory";
const PARAMS: &[&str] = &["user_id", "build_id"];

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
    /// The app's build record; status updates come with the database issue.
    #[allow(dead_code)]
    build_id: Option<i64>,
}

const EXC_MODULE: &str = "orbitpilot.errors";

async fn run(ctx: TaskContext) -> TaskOutcome {
    let args: Args = match bind(&ctx.call, PARAMS) {
        Ok(a) => a,
        Err(e) => return TaskOutcome::Failure(e),
    };
    let fail = |kind: &str, msg: &str| {
        TaskOutcome::Failure(ExceptionInfo::raised(kind, EXC_MODULE, msg, NAME))
    };
    let settings = &ctx.services.settings;
    if settings.source_paths.is_empty() {
        return fail(
            "ConfigError",
            "no memory source configured: set ORBIT_SOURCE",
        );
    }
    let source = match JsonlSource::new(&settings.source_paths) {
        Ok(s) => Arc::new(s),
        Err(e) => return fail("SourceError", &e.to_string()),
    };
    let pipeline = match ctx.services.pipeline(source).await {
        Ok(p) => p,
        Err(e) => return fail("ConfigError", &format!("{e:#}")),
    };
    match pipeline
        .run(BuildScope::User(args.user_id), ctx.cancel.clone(), None)
        .await
    {
        Ok(report) => match serde_json::to_value(&report) {
            Ok(v) => TaskOutcome::Success(v),
            Err(e) => fail("BuildError", &e.to_string()),
        },
        Err(PipelineError::Cancelled) => TaskOutcome::Failure(ExceptionInfo::raised(
            "SoftTimeLimitExceeded",
            "billiard.exceptions",
            "memory build stopped at its soft time limit",
            NAME,
        )),
        Err(e) if e.is_retryable() => TaskOutcome::Retry {
            after: e.retry_after(),
            error: ExceptionInfo::raised("BuildError", EXC_MODULE, &e.to_string(), NAME),
        },
        Err(e) => fail("BuildError", &e.to_string()),
    }
}
