//! The worker's HTTP face (axum, off unless `--http ADDR`): health, Prometheus metrics, and the
//! two status endpoints the polling UI reads, behind a bearer token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::celery::message::poll_keys;
use crate::celery::redis::RedisConn;
use crate::services::Services;

/// A health check part that does not answer in this time counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub struct HttpState {
    pub services: Arc<Services>,
    /// The broker, for health, queue depth and unacked count.
    pub broker: RedisConn,
    pub queues: Vec<String>,
    /// The worker's state now, for its series on `/metrics`.
    pub worker: Option<Box<dyn Fn() -> crate::metrics::WorkerSnapshot + Send + Sync>>,
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/orbitpilot/build/status/", get(build_status))
        .route("/blink-audio/{pk}/status/", get(blink_status))
        .with_state(state)
}

/// How long a connection gets to finish after a shutdown asks it to (its response in flight).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves until `stop` fires. The caller binds, so a taken port fails the start-up.
///
/// Each connection is HTTP/1.1 with the limits of `HttpConfig`: its request head must arrive
/// within the header timeout, which also runs while a kept-alive connection waits for its next
/// request (so an idle or half-sent connection is closed); a head is at most the request-size
/// limit; and at most `max_connections` are open at once. The next connection is accepted only
/// when one closes: the rest wait in the kernel's backlog, costing this process nothing.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let limits = state.services.settings.http.clone();
    tracing::info!(
        addr = %listener.local_addr()?,
        max_connections = limits.max_connections,
        header_timeout_s = limits.header_timeout.as_secs_f64(),
        "HTTP listening"
    );
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let open = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let (stop, limits) = (stop.clone(), limits.clone());
        open.spawn(async move {
            let _slot = slot;
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_request_bytes);
            let conn = b.serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                }
            }
        });
    }
    open.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, open.wait()).await;
    Ok(())
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({"detail": detail.into()}))).into_response()
}

async fn check<F, E>(f: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {CHECK_TIMEOUT:?}")),
    }
}

async fn healthz(State(st): State<Arc<HttpState>>) -> Response {
    let redis = check(st.broker.ping()).await;
    let postgres = match &st.services.db {
        Some(db) => check(db.ping()).await,
        None => Ok(()),
    };
    let store = check(async {
        let s = st.services.store().await.map_err(|e| format!("{e:#}"))?;
        s.model().await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    let part = |name: &str, r: &Result<(), String>| match r {
        Ok(()) => json!({"part": name, "ok": true}),
        Err(e) => json!({"part": name, "ok": false, "error": e}),
    };
    let mut checks = vec![part("redis", &redis), part("vector_store", &store)];
    if st.services.db.is_some() {
        checks.insert(1, part("postgres", &postgres));
    }
    let failing: Vec<String> = checks
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["part"].as_str().unwrap_or("").to_string())
        .collect();
    let status = if failing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if failing.is_empty() { "ok" } else { "unhealthy" },
        "failing": failing,
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let m = &st.services.metrics;
    if let Some(worker) = &st.worker {
        m.observe_worker(&worker());
    }
    // Queue depth is read now, not counted: other workers and the app change it.
    if let Ok(mut c) = st.broker.conn().await {
        for q in &st.queues {
            let mut pipe = redis::pipe();
            for k in poll_keys(std::slice::from_ref(q)) {
                pipe.cmd("LLEN").arg(k);
            }
            let r: Result<Vec<i64>, _> = pipe.query_async(&mut c).await;
            if let Ok(lens) = st.broker.note(r).await {
                m.queue_depth.with_label_values(&[q]).set(lens.iter().sum());
            }
        }
        let r: Result<i64, _> = redis::cmd("HLEN").arg("unacked").query_async(&mut c).await;
        if let Ok(n) = st.broker.note(r).await {
            m.unacked.set(n);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(st: &HttpState, headers: &HeaderMap) -> bool {
    // No token configured: every request is refused.
    let Some(want) = &st.services.settings.http.token else {
        return false;
    };
    let want = want.expose().as_bytes();
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes());
    matches!(got, Some(t) if !want.is_empty() && same(t, want))
}

fn unauthorized() -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

#[derive(Deserialize)]
struct BuildQuery {
    user_id: Option<String>,
}

async fn build_status(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    Query(q): Query<BuildQuery>,
) -> Response {
    if !authorized(&st, &headers) {
        return unauthorized();
    }
    let Some(user_id) = q
        .user_id
        .as_deref()
        .and_then(|u| u.trim().parse::<i64>().ok())
    else {
        return error(StatusCode::BAD_REQUEST, "user_id must be an integer");
    };
    let Some(db) = &st.services.db else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no database configured (DATABASE_URL)",
        );
    };
    let build = match db.latest_build(user_id).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let counts = st
        .services
        .cache
        .snapshot_counts(db, user_id)
        .await
        .ok()
        .map(|c| serde_json::to_value(c).unwrap_or(Value::Null));
    let Some(b) = build else {
        return (
            StatusCode::OK,
            Json(json!({"user_id": user_id, "status": "none", "build": null, "counts": counts})),
        )
            .into_response();
    };
    Json(json!({
        "user_id": user_id,
        "build_id": b.id,
        "status": b.status,
        "error_message": b.error_message,
        "documents": b.documents,
        "chunks": b.chunks,
        "tokens": b.tokens,
        "chunks_reused": b.chunks_reused,
        "chunks_embedded": b.chunks_embedded,
        "attempt": b.attempt,
        "task_id": b.task_id,
        "coalesced_into_id": b.coalesced_into_id,
        "created_at": b.created_at,
        "started_at": b.started_at,
        "finished_at": b.finished_at,
        "progress": b.progress_view(),
        "counts": counts,
    }))
    .into_response()
}

async fn blink_status(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(pk): Path<String>,
) -> Response {
    if !authorized(&st, &headers) {
        return unauthorized();
    }
    let Ok(pk) = pk.parse::<i64>() else {
        return error(StatusCode::NOT_FOUND, "no such Blink audio");
    };
    let Some(db) = &st.services.db else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no database configured (DATABASE_URL)",
        );
    };
    match db.blink_status(pk).await {
        Ok(Some(b)) => Json(json!({
            "id": b.id,
            "transcription_status": b.transcription_status,
            "ai_analysis_status": b.ai_analysis_status,
            "transcription_error": b.transcription_error,
            "ai_analysis_error": b.ai_analysis_error,
            "duration_seconds": b.duration_seconds,
            "updated_at": b.updated_at,
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no Blink audio {pk}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_compare() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"ab"));
    }
}
