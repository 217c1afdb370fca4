//! One message from the queue to its settlement: decode, dispatch, wait for its ETA and a free
//! slot, run within its time limits, and turn the outcome into a result and an action.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::decide::{decide, Decision, Ending};
use super::inventory::{Held, Request, Stage};
use super::settle::{persist, Action, Completion};
use super::Shared;
use crate::celery::message::{queue_key, retry_envelope, DecodeError, MessageLimits, TaskMessage};
use crate::celery::redis::Fetched;
use crate::celery::result::{
    encode_meta, py_args_repr, py_float, py_repr, py_str_repr, ExceptionInfo, Outcome,
};
use crate::tasks::TimeLimits;
use crate::tasks::{AbortHook, AbortReason, Call, TaskConfig, TaskContext, TaskDef, TaskError};

/// How long the worker waits for an abandoned task's own last write (its build record): a dead
/// database must not hold a shutdown for ever.
const ABORT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest result repr in a `succeeded in` log line: Celery's `resultrepr_maxsize`.
const LOG_RESULT_CHARS: usize = 1024;

/// A message just taken from its list. `registered`: the tag it is in `unacked` under (the fetch
/// script does that atomically; a BRPOP'd message is registered here). A message that is not
/// UTF-8 is refused like any undecodable one.
pub async fn accept(sh: Arc<Shared>, fetched: Fetched, permit: OwnedSemaphorePermit) {
    let Fetched {
        list,
        raw,
        utf8,
        registered,
    } = fetched;
    let limits = &sh.services.settings.limits;
    let limits = MessageLimits {
        message_bytes: limits.message_bytes,
        argument_bytes: limits.argument_bytes,
    };
    let decoded = if utf8 {
        TaskMessage::decode_guarded(&raw, |r| TaskMessage::decode_within(r, limits))
    } else {
        Err(TaskMessage::not_utf8(&raw))
    };
    let mut msg = match decoded {
        Ok(m) => m,
        Err(f) => {
            let reason = f.error.to_string();
            tracing::error!(queue = %list, "Received and deleted undecodable message: {reason}");
            // The caller of a task we cannot read still gets an answer instead of waiting forever.
            let result = f.task_id.as_ref().map(|id| {
                let (t, m) = match f.error {
                    DecodeError::ContentType(_) => ("ContentDisallowed", "kombu.exceptions"),
                    DecodeError::TooLarge { .. } => ("MessageTooLarge", "orbit_worker.errors"),
                    DecodeError::Panic(_) => ("PanicError", "orbit_worker.errors"),
                    _ => ("DecodeError", "kombu.exceptions"),
                };
                let exc = ExceptionInfo::bare(t, m, vec![reason.clone().into()]);
                (
                    id.clone(),
                    encode_meta(id, None, &Outcome::Failure(exc), Utc::now()),
                )
            });
            if let Some(id) = &f.task_id {
                sh.events
                    .task("task-rejected", || json!({"uuid": id, "requeue": false}));
            }
            // Only what the fetch registered is acked, by the exact tag it registered.
            let ack = registered.is_some();
            let tag = registered;
            sh.hold(tag.as_deref());
            sh.complete(Completion {
                delivery_tag: tag,
                result,
                action: Action::DeadLetter {
                    record: sh.broker.dead_letters.record(&reason, &list, &raw),
                    ack,
                },
                permit: Some(permit),
            })
            .await;
            return;
        }
    };
    if let Some(tag) = registered {
        // The fetch script's reading of the tag is the one in `unacked`.
        msg.delivery_tag = tag;
    } else {
        let rk = routing_key(&msg, base_queue(&list));
        persist("register", || {
            sh.broker
                .register(&msg.delivery_tag, &msg.raw, &msg.exchange, rk)
        })
        .await;
    }
    sh.hold(Some(&msg.delivery_tag));
    let Some(def) = sh.registry.get(&msg.name) else {
        tracing::error!(task = %msg.name, id = %msg.id, "Received unregistered task of type '{}'.", msg.name);
        // What Celery's consumer sends for an unknown task.
        sh.events.task(
            "task-failed",
            || json!({"uuid": msg.id, "exception": format!("NotRegistered({})", crate::celery::result::py_str_repr(&msg.name))}),
        );
        let result = result_of(
            &msg,
            &Outcome::Failure(ExceptionInfo::not_registered(&msg.name)),
        );
        sh.complete(Completion {
            delivery_tag: Some(msg.delivery_tag),
            result,
            action: Action::Ack,
            permit: Some(permit),
        })
        .await;
        return;
    };
    let span = tracing::info_span!("task", id = %msg.id, task = def.name, retries = msg.retries, slot = tracing::field::Empty);
    tracing::info!(parent: &span, "Task {}[{}] received", def.name, msg.id);
    sh.services.metrics.task_received(def.name);
    sh.events.task("task-received", || received_event(&msg));
    if msg.has_canvas {
        tracing::warn!(parent: &span, "Task {}[{}] carries a chain, callbacks or a chord: this worker runs the task but not the rest of the canvas", def.name, msg.id);
    }
    let queue = base_queue(&list).to_string();
    let held = sh.inventory.hold(Request {
        id: &msg.id,
        name: def.name,
        args: &msg.args,
        kwargs: &msg.kwargs,
        hostname: &sh.opts.hostname,
        exchange: &msg.exchange,
        routing_key: routing_key(&msg, &queue),
        priority: msg.priority,
        redelivered: msg.redelivered,
        eta: msg.eta.map(|t| t.to_rfc3339()),
        stamps: &msg.stamps,
    });
    sh.autoscale_look(true);
    let guard = PanicGuard::of(&msg);
    let sh2 = sh.clone();
    sh.tracker.spawn(
        or_on_panic(
            run(sh.clone(), msg, def, queue, permit, held),
            move |panic| async move { guard.settle(&sh2, def.name, panic).await },
        )
        .instrument(span),
    );
}

/// Runs `fut`; should it panic, `on_panic` runs with the panic's message instead of the panic
/// going on up (where it would end the spawned task and leave its message unsettled).
async fn or_on_panic<F, G, H>(fut: F, on_panic: G)
where
    F: std::future::Future<Output = ()>,
    G: FnOnce(String) -> H,
    H: std::future::Future<Output = ()>,
{
    use futures::FutureExt;
    if let Err(p) = std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        on_panic(orbit_pipeline::panic_text(p)).await;
    }
}

/// What settles a message whose handling panicked outside the task itself (the task's own
/// panics are caught where it runs, in `execute`): a FAILURE result and an ack, so the message
/// neither hangs in `unacked` nor comes back after every restart to panic again. A result
/// already stored as SUCCESS is kept (the settle script never overwrites one).
struct PanicGuard {
    id: String,
    parent_id: Option<String>,
    delivery_tag: String,
    ignore_result: bool,
}

impl PanicGuard {
    fn of(msg: &TaskMessage) -> Self {
        PanicGuard {
            id: msg.id.clone(),
            parent_id: msg.parent_id.clone(),
            delivery_tag: msg.delivery_tag.clone(),
            ignore_result: msg.ignore_result,
        }
    }

    async fn settle(self, sh: &Shared, task: &str, panic: String) {
        tracing::error!(panic = %panic, "Task {task}[{}] crashed the worker's handling of it: failing it and acking", self.id);
        sh.services.metrics.task_finished(task, "failed", None);
        let exc = ExceptionInfo::raised("PanicError", "orbit_worker.errors", &panic, task);
        let result = (!self.ignore_result).then(|| {
            (
                self.id.clone(),
                encode_meta(
                    &self.id,
                    self.parent_id.as_deref(),
                    &Outcome::Failure(exc),
                    Utc::now(),
                ),
            )
        });
        sh.ack(self.delivery_tag, result, None).await;
    }
}

/// `task-received` as Celery sends it: the client's reprs of the arguments where it sent them.
fn received_event(msg: &TaskMessage) -> serde_json::Value {
    let iso = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    json!({
        "uuid": msg.id,
        "name": msg.name,
        "args": msg.argsrepr.clone().unwrap_or_else(|| py_args_repr(&msg.args)),
        "kwargs": msg.kwargsrepr.clone().unwrap_or_else(|| py_repr(&serde_json::Value::Object(msg.kwargs.clone()))),
        "root_id": msg.root_id,
        "parent_id": msg.parent_id,
        "retries": msg.retries,
        "eta": iso(msg.eta),
        "expires": iso(msg.expires),
    })
}

/// `celery\x06\x163` → `celery`.
fn base_queue(list: &str) -> &str {
    list.split("\x06\x16").next().unwrap_or(list)
}

async fn run(
    sh: Arc<Shared>,
    mut msg: TaskMessage,
    def: &'static TaskDef,
    queue: String,
    permit: OwnedSemaphorePermit,
    held: Held,
) {
    let mut permit = Some(permit);
    if let Some(reason) = discard_reason(&sh, &msg) {
        return discard(&sh, msg, permit, reason).await;
    }
    if msg.redelivered {
        // A redelivery of a task that already succeeded (its worker died before the ack) is done.
        if let Ok(Some(state)) = sh.backend.status(&msg.id).await {
            if state == "SUCCESS" {
                tracing::info!(
                    "Task {}[{}] already succeeded: discarding the redelivered message",
                    def.name,
                    msg.id
                );
                return sh.ack(msg.delivery_tag, None, permit).await;
            }
        }
    }
    if let Some(eta) = msg.eta {
        let wait = (eta - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            // As in Celery, a message waiting for its ETA does not use a prefetch slot.
            permit = None;
            held.set(Stage::Scheduled);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = sh.stop_fetch.cancelled() => return sh.give_back(msg.delivery_tag, permit).await,
            }
            held.set(Stage::Reserved);
        }
    }
    // A rate limit set by remote control: wait for this task name's turn, holding the prefetch
    // slot but not a pool slot, as Celery's consumer does.
    if let Some(at) = sh.tuning.next_start(def.name) {
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = sh.stop_fetch.cancelled() => return sh.give_back(msg.delivery_tag, permit).await,
        }
    }
    let slot = tokio::select! {
        s = sh.concurrency.clone().acquire_owned() => s,
        _ = sh.stop_fetch.cancelled() => return sh.give_back(msg.delivery_tag, permit).await,
    };
    let Ok(_slot) = slot else {
        return sh.give_back(msg.delivery_tag, permit).await;
    };
    // Expired or revoked while it waited for its ETA or a slot.
    if let Some(reason) = discard_reason(&sh, &msg) {
        return discard(&sh, msg, permit, reason).await;
    }
    held.set(Stage::Active);
    let slot_name = sh.slot_names.take();
    tracing::Span::current().record("slot", slot_name.number());

    let limits = sh
        .tuning
        .limits(def.name, def.limits)
        .with_overrides(msg.hard_limit, msg.soft_limit);
    let call = Call {
        id: msg.id.clone(),
        name: msg.name.clone(),
        args: std::mem::take(&mut msg.args),
        kwargs: std::mem::take(&mut msg.kwargs),
        retries: msg.retries,
    };
    let started = Instant::now();
    sh.events.task("task-started", || json!({"uuid": msg.id}));
    let metrics = sh.services.metrics.clone();
    metrics.task_started(def.name);
    let (terminated, info) = held.handles();
    let ending = execute(&sh, def, call, limits, terminated, info).await;
    let runtime = started.elapsed();
    drop(_slot);
    let decision = decide(ending, msg.retries, &def.retry);
    metrics.task_finished(def.name, decision.state(), Some(runtime.as_secs_f64()));
    settle(&sh, msg, def, &queue, decision, runtime, permit).await;
    // Its lines are written: the name is free for the next task.
    drop(slot_name);
}

/// Runs the task within its limits: the soft limit fires its token, the hard limit and a
/// shutdown past the grace period drop it, after which the task's abort hook writes its record.
async fn execute(
    sh: &Shared,
    def: &'static TaskDef,
    call: Call,
    limits: TimeLimits,
    terminated: CancellationToken,
    info: crate::tasks::TaskInfo,
) -> Ending {
    let cancel = CancellationToken::new();
    let on_abort = AbortHook::default();
    let id = call.id.clone();
    let ctx = TaskContext {
        call,
        cancel: cancel.clone(),
        services: sh.services.clone(),
        config: TaskConfig::of(&sh.blocks, def.block),
        max_retries: def.retry.max_retries,
        on_abort: on_abort.clone(),
        info,
    };
    let mut handle = tokio::spawn((def.run)(ctx));
    let soft_at = tokio::time::Instant::now() + limits.soft;
    let hard_at = tokio::time::Instant::now() + limits.hard;
    let mut soft_fired = false;
    let (ending, reason) = loop {
        tokio::select! {
            r = &mut handle => return Ending::Finished(r.unwrap_or_else(|e| Err(TaskError::Permanent(
                ExceptionInfo::raised("PanicError", "orbit_worker.errors", &panic_text(e), def.name))))),
            _ = tokio::time::sleep_until(soft_at), if !soft_fired => {
                soft_fired = true;
                tracing::warn!("Soft time limit ({}s) exceeded for {}[{}]", secs(limits.soft), def.name, id);
                cancel.cancel();
            }
            _ = tokio::time::sleep_until(hard_at) => {
                tracing::error!("Hard time limit ({}s) exceeded for {}[{}]", secs(limits.hard), def.name, id);
                break (Ending::HardLimit(limits.hard), AbortReason::HardTimeLimit);
            }
            _ = sh.abandon.cancelled() => {
                cancel.cancel();
                break (Ending::Abandoned, AbortReason::Shutdown);
            }
            _ = terminated.cancelled() => {
                tracing::warn!("Terminating {}[{}] (revoked)", def.name, id);
                cancel.cancel();
                break (Ending::Terminated, AbortReason::Revoked);
            }
        }
    };
    handle.abort();
    // Let the drop finish, so the hook does not race the task's last steps; a task stuck in
    // blocking code cannot hold the worker past the bound.
    let _ = tokio::time::timeout(ABORT_WRITE_TIMEOUT, &mut handle).await;
    if let Some(write) = on_abort.take() {
        if tokio::time::timeout(ABORT_WRITE_TIMEOUT, write(reason))
            .await
            .is_err()
        {
            tracing::error!(
                "Task {}[{}]: its record could not be written after the abort",
                def.name,
                id
            );
        }
    }
    ending
}

/// Turns the decision into a result, an ack, a re-publish or a give-back, with the log line a
/// Celery user expects.
async fn settle(
    sh: &Shared,
    msg: TaskMessage,
    def: &'static TaskDef,
    queue: &str,
    decision: Decision,
    runtime: Duration,
    permit: Option<OwnedSemaphorePermit>,
) {
    let outcome = match decision {
        Decision::GiveBack => {
            tracing::warn!(
                "Task {}[{}] abandoned at shutdown after {:.3}s: giving it back",
                def.name,
                msg.id,
                runtime.as_secs_f64()
            );
            return sh.give_back(msg.delivery_tag, permit).await;
        }
        Decision::Succeed(v) => {
            tracing::info!(
                "Task {}[{}] succeeded in {}s: {}",
                def.name,
                msg.id,
                py_float(runtime.as_secs_f64()),
                short(&v)
            );
            sh.events.task(
                "task-succeeded",
                || json!({"uuid": msg.id, "result": py_repr(&v), "runtime": runtime.as_secs_f64()}),
            );
            Outcome::Success(v)
        }
        Decision::Fail(e) => {
            tracing::error!(
                "Task {}[{}] raised unexpected: {}",
                def.name,
                msg.id,
                e.repr()
            );
            sh.events.task(
                "task-failed",
                || json!({"uuid": msg.id, "exception": e.repr(), "traceback": e.traceback}),
            );
            Outcome::Failure(e)
        }
        Decision::Retry { error, hint } => {
            return retry(sh, msg, def, queue, error, hint, permit).await;
        }
        Decision::Revoked => {
            tracing::warn!(
                "Discarding revoked task: {}[{}] (terminated)",
                def.name,
                msg.id
            );
            // SIGTERM is what `terminate` sends by default; here the token did it.
            sh.events.task(
                "task-revoked",
                || json!({"uuid": msg.id, "terminated": true, "signum": 15, "expired": false}),
            );
            Outcome::Revoked {
                reason: "terminated",
            }
        }
    };
    let result = result_of(&msg, &outcome);
    sh.ack(msg.delivery_tag, result, permit).await;
}

/// The record to store for `outcome`, unless the caller asked for no result.
fn result_of(msg: &TaskMessage, outcome: &Outcome) -> Option<(String, String)> {
    (!msg.ignore_result).then(|| {
        (
            msg.id.clone(),
            encode_meta(&msg.id, msg.parent_id.as_deref(), outcome, Utc::now()),
        )
    })
}

/// Where the message was routed; a bare envelope without one came from `queue`.
fn routing_key<'a>(msg: &'a TaskMessage, queue: &'a str) -> &'a str {
    if msg.routing_key.is_empty() {
        queue
    } else {
        &msg.routing_key
    }
}

/// Celery's retry: the same task id re-published with `retries + 1` and an absolute ETA under a
/// new delivery tag, RETRY stored, then the original acked (with the publish, atomically).
async fn retry(
    sh: &Shared,
    msg: TaskMessage,
    def: &TaskDef,
    queue: &str,
    error: ExceptionInfo,
    after: Option<Duration>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let delay = def.retry.delay(msg.retries, after);
    let eta = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
    let new_tag = uuid::Uuid::new_v4().to_string();
    let envelope = match retry_envelope(&msg.raw, msg.retries + 1, eta, &new_tag) {
        Ok(e) => e,
        Err(e) => {
            // Cannot happen for a message that decoded; fail rather than lose the error.
            tracing::error!(
                "Task {}[{}] cannot be retried ({e}): {}",
                def.name,
                msg.id,
                error.repr()
            );
            let result = result_of(&msg, &Outcome::Failure(error));
            return sh.ack(msg.delivery_tag, result, permit).await;
        }
    };
    let list = queue_key(routing_key(&msg, queue), msg.priority);
    tracing::info!(
        "Task {}[{}] retry: Retry in {}s: {}",
        def.name,
        msg.id,
        secs(delay),
        error.repr()
    );
    sh.events.task(
        "task-retried",
        || json!({"uuid": msg.id, "exception": error.repr(), "traceback": error.traceback}),
    );
    let result = result_of(&msg, &Outcome::Retry(error));
    sh.complete(Completion {
        delivery_tag: Some(msg.delivery_tag),
        result,
        action: Action::Retry { list, envelope },
        permit,
    })
    .await;
}

fn is_expired(msg: &TaskMessage) -> bool {
    msg.expires.is_some_and(|t| t <= Utc::now())
}

/// Why a task is discarded instead of run, checked when it comes up and again after it waited
/// for its ETA or a slot: it expired, or remote control revoked it.
fn discard_reason(sh: &Shared, msg: &TaskMessage) -> Option<&'static str> {
    if is_expired(msg) {
        Some("expired")
    } else if sh.revoked.contains(&msg.id) || sh.revoked_stamps.matching(&msg.stamps).is_some() {
        Some("revoked")
    } else {
        None
    }
}

/// A task discarded before it ran: REVOKED with Celery's reason, acked, never run.
async fn discard(
    sh: &Shared,
    msg: TaskMessage,
    permit: Option<OwnedSemaphorePermit>,
    reason: &'static str,
) {
    sh.services
        .metrics
        .task_finished(&msg.name, "revoked", None);
    let expired = reason == "expired";
    if expired {
        tracing::warn!(
            "Discarding revoked task: {}[{}] (expired)",
            msg.name,
            msg.id
        );
    } else if let Some((h, v)) = sh
        .revoked_stamps
        .matching(&msg.stamps)
        .filter(|_| !sh.revoked.contains(&msg.id))
    {
        tracing::warn!(
            "Discarding revoked task: {}[{}] (revoked by header: {{{}: {}}})",
            msg.name,
            msg.id,
            py_str_repr(&h),
            py_repr(&v)
        );
    } else {
        tracing::warn!("Discarding revoked task: {}[{}]", msg.name, msg.id);
    }
    sh.events.task(
        "task-revoked",
        || json!({"uuid": msg.id, "terminated": false, "signum": null, "expired": expired}),
    );
    let result = result_of(&msg, &Outcome::Revoked { reason });
    sh.ack(msg.delivery_tag, result, permit).await;
}

/// `1`, `0.5`: seconds as Celery prints limits and countdowns.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s:.3}").trim_end_matches('0').to_string()
    }
}

/// The result as Python's repr, cut as Celery's `saferepr` cuts a long one (`...`).
fn short(v: &serde_json::Value) -> String {
    let s = py_repr(v);
    if s.chars().count() <= LOG_RESULT_CHARS {
        return s;
    }
    let mut t: String = s.chars().take(LOG_RESULT_CHARS).collect();
    t.push_str("...");
    t
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        orbit_pipeline::panic_text(e.into_panic())
    } else {
        "task was cancelled".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_messages_handling_reaches_its_settlement() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let s = seen.clone();
        or_on_panic(
            async {
                let v: Vec<u8> = Vec::new();
                let _ = v[usize::from(v.is_empty())]; // index out of bounds
            },
            move |p| async move {
                *s.lock().unwrap() = Some(p);
            },
        )
        .await;
        let p = seen
            .lock()
            .unwrap()
            .clone()
            .expect("the panic was not handed on");
        assert!(p.contains("index out of bounds"), "{p}");
        // And a future that ends normally never calls it.
        or_on_panic(async {}, |_| async { panic!("called for no panic") }).await;
    }
}
