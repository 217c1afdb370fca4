//! The app's Postgres: every SQL statement the worker runs lives in this module (and `seed.rs`
//! beside it), so mapping onto the real Django schema is one place to change. All queries bind
//! their values; none is built from input.

mod seed;

use std::time::Duration;

use chrono::{DateTime, Utc};
use orbit_pipeline::secret::Secret;
use orbit_pipeline::source::KindQuery;
use orbit_pipeline::DocKind;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

pub use seed::seed;

/// Connections per worker process: tasks hold one only for a statement or a short transaction,
/// and the source's cursor holds one for a build.
const POOL_CONNECTIONS: u32 = 8;
/// A pool that cannot hand out a connection in this time means Postgres is down: fail the call
/// (retryable) instead of hanging the task.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres URL: {0}")]
    Config(String),
    // Not a #[source]: sqlx's message already includes its cause, and a chain would repeat it.
    #[error("database: {0}")]
    Sql(sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError::Sql(e)
    }
}

impl From<sqlx::migrate::MigrateError> for DbError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        DbError::Migrate(e)
    }
}

impl orbit_pipeline::Retryable for DbError {
    /// Connection trouble passes; a bad query or constraint will fail the same way again.
    fn is_retryable(&self) -> bool {
        match self {
            DbError::Sql(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct Db {
    pool: PgPool,
}

/// One memory-build record (`orbitpilot_memorybuild`).
#[derive(Debug, Clone, Serialize)]
pub struct BuildRow {
    pub id: i64,
    pub user_id: i64,
    pub status: String,
    pub task_id: String,
    pub attempt: i32,
    pub documents: i32,
    pub chunks: i32,
    pub tokens: i64,
    pub chunks_reused: i32,
    pub chunks_embedded: i32,
    pub error_message: String,
    pub coalesced_into_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub progress: BuildProgressCols,
}

/// Counts a finished build writes on its record.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildCounts {
    pub documents: u64,
    pub chunks: u64,
    pub tokens: u64,
    pub reused: u64,
    pub embedded: u64,
}

/// One AI usage log row (`orbitpilot_aiusagelog`).
#[derive(Debug, Clone, Default)]
pub struct UsageRow {
    pub user_id: Option<i64>,
    pub feature: &'static str,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub audio_seconds: f64,
    pub cost_usd: f64,
    pub task_id: String,
}

/// A user's AI usage in one month: what `usage:{pk}:{YYYY-MM}` caches.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct MonthUsage {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub audio_seconds: f64,
    pub cost_usd: f64,
}

/// What `orbit_snapshot_counts:{pk}` caches: how much of the user's data OrbitPilot can see.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct SnapshotCounts {
    pub messages: i64,
    pub channel_posts: i64,
    pub group_posts: i64,
    pub blinks: i64,
    pub notes: i64,
}

/// What the Blink polling UI reads.
#[derive(Debug, Clone, Serialize)]
pub struct BlinkStatus {
    pub id: i64,
    pub owner_id: i64,
    pub transcription_status: String,
    pub transcription_error: String,
    pub ai_analysis_status: String,
    pub ai_analysis_error: String,
    pub duration_seconds: Option<f64>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct PushSubscription {
    pub id: i64,
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
}

/// The two processing steps of a Blink recording, each with its own status column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlinkStep {
    Transcription,
    Analysis,
}

impl BlinkStep {
    pub fn noun(self) -> &'static str {
        match self {
            BlinkStep::Transcription => "transcription",
            BlinkStep::Analysis => "analysis",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BlinkAudio {
    pub owner_id: i64,
    pub audio_file: String,
    pub transcription_status: String,
    pub transcript: String,
}

/// The fields `blink.analyse_audio` asks the model for (its strict JSON schema).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AudioAnalysis {
    pub summary: String,
    pub action_items: Vec<ActionItem>,
    pub sentiment: String,
    pub speaker_count: i64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionItem {
    pub owner: Option<String>,
    pub task: String,
    pub due: Option<String>,
}

const BUILD_COLUMNS: &str = "id, user_id, status, task_id, attempt, documents, chunks, tokens, \
     chunks_reused, chunks_embedded, error_message, coalesced_into_id, created_at, started_at, \
     finished_at, to_jsonb(orbitpilot_memorybuild) AS row_json";

fn build_row(r: &sqlx::postgres::PgRow) -> Result<BuildRow, sqlx::Error> {
    Ok(BuildRow {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        status: r.try_get("status")?,
        task_id: r.try_get("task_id")?,
        attempt: r.try_get("attempt")?,
        documents: r.try_get("documents")?,
        chunks: r.try_get("chunks")?,
        tokens: r.try_get("tokens")?,
        chunks_reused: r.try_get("chunks_reused")?,
        chunks_embedded: r.try_get("chunks_embedded")?,
        error_message: r.try_get("error_message")?,
        coalesced_into_id: r.try_get("coalesced_into_id")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        progress: BuildProgressCols::of(r.try_get("row_json")?),
    })
}

/// The progress columns of a build record, read from the row as JSON so that a database
/// without them (an app that has not added them) still reads its records.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BuildProgressCols {
    pub documents_expected: Option<i64>,
    pub percent: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl BuildRow {
    /// The progress the polling UI shows: 100 once completed; while running, what this run
    /// wrote last (none before its first write, not an earlier attempt's).
    pub fn progress_view(&self) -> serde_json::Value {
        let p = &self.progress;
        let this_run = match (p.updated_at, self.started_at) {
            (Some(u), Some(s)) => u >= s,
            _ => false,
        };
        let (percent, eta) = match self.status.as_str() {
            "completed" => (Some(100.0), Some(0.0)),
            "running" if this_run => (p.percent, p.eta_seconds),
            "running" => (Some(0.0), None),
            _ => (None, None),
        };
        serde_json::json!({
            "documents_read": self.documents,
            "documents_expected": p.documents_expected,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "chunks_embedded": self.chunks_embedded,
            "chunks_reused": self.chunks_reused,
            "percent": percent,
            "eta_seconds": eta,
            "updated_at": p.updated_at,
        })
    }
}

impl BuildProgressCols {
    fn of(row: serde_json::Value) -> Self {
        BuildProgressCols {
            documents_expected: row["documents_expected"].as_i64(),
            percent: row["progress_percent"].as_f64(),
            eta_seconds: row["eta_seconds"].as_f64(),
            updated_at: row["progress_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
        }
    }
}

/// Clamps a count into the record's INTEGER column.
fn int(n: u64) -> i32 {
    n.min(i32::MAX as u64) as i32
}

impl Db {
    /// A pool that connects on first use, so a worker starts while Postgres is still coming up.
    pub fn connect_lazy(url: &Secret) -> Result<Db, DbError> {
        let opts: PgConnectOptions = url
            .expose()
            .parse()
            .map_err(|e: sqlx::Error| DbError::Config(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(opts.application_name("orbit-worker"));
        Ok(Db { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the shipped migrations; already applied ones are skipped.
    pub async fn migrate(&self) -> Result<usize, DbError> {
        let migrator = sqlx::migrate!("./migrations");
        migrator.run(&self.pool).await?;
        Ok(migrator.iter().count())
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// `Some(is_active)` for an existing user.
    pub async fn user_active(&self, user_id: i64) -> Result<Option<bool>, DbError> {
        Ok(
            sqlx::query_scalar("SELECT is_active FROM accounts_user WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn user_email(&self, user_id: i64) -> Result<Option<(String, bool)>, DbError> {
        let r = sqlx::query("SELECT email, is_active FROM accounts_user WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn email_bounced(
        &self,
        user_id: i64,
        email: &str,
        code: Option<u16>,
        message: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO orbitworker_emailbounce (user_id, email, smtp_code, message) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(user_id)
        .bind(email)
        .bind(code.map(i32::from))
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- push subscriptions ------------------------------------------------------------------

    pub async fn push_subscriptions(&self, user_id: i64) -> Result<Vec<PushSubscription>, DbError> {
        let rows = sqlx::query(
            "SELECT id, endpoint, p256dh, auth FROM notifications_pushsubscription \
             WHERE user_id = $1 ORDER BY id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| PushSubscription {
                id: r.get(0),
                endpoint: r.get(1),
                p256dh: r.get(2),
                auth: r.get(3),
            })
            .collect())
    }

    pub async fn delete_push_subscription(&self, id: i64) -> Result<(), DbError> {
        sqlx::query("DELETE FROM notifications_pushsubscription WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn push_delivered(&self, id: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE notifications_pushsubscription SET last_used_at = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- Blink audio -------------------------------------------------------------------------

    pub async fn blink_audio(&self, id: i64) -> Result<Option<BlinkAudio>, DbError> {
        let r = sqlx::query(
            "SELECT owner_id, audio_file, transcription_status, transcript \
             FROM blink_blinkaudio WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|r| BlinkAudio {
            owner_id: r.get(0),
            audio_file: r.get(1),
            transcription_status: r.get(2),
            transcript: r.get(3),
        }))
    }

    /// Sets a Blink step's status column and its error (empty unless it failed or retries).
    pub async fn set_blink_status(
        &self,
        id: i64,
        step: BlinkStep,
        status: &str,
        error: &str,
    ) -> Result<(), DbError> {
        let sql = match step {
            BlinkStep::Transcription => {
                "UPDATE blink_blinkaudio SET transcription_status = $2, transcription_error = $3, \
                 updated_at = now() WHERE id = $1"
            }
            BlinkStep::Analysis => {
                "UPDATE blink_blinkaudio SET ai_analysis_status = $2, ai_analysis_error = $3, \
                 updated_at = now() WHERE id = $1"
            }
        };
        sqlx::query(sql)
            .bind(id)
            .bind(status)
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn blink_transcribed(
        &self,
        id: i64,
        text: &str,
        segments: &serde_json::Value,
        duration: Option<f64>,
        language: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE blink_blinkaudio SET transcription_status = 'completed', transcript = $2, \
             transcript_segments = $3, duration_seconds = COALESCE($4, duration_seconds), \
             transcript_language = $5, transcription_error = '', updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(text)
        .bind(segments)
        .bind(duration)
        .bind(language)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn blink_analysed(&self, id: i64, a: &AudioAnalysis) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE blink_blinkaudio SET ai_analysis_status = 'completed', summary = $2, \
             action_items = $3, sentiment = $4, speaker_count = $5, ai_analysis_error = '', \
             updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(&a.summary)
        .bind(serde_json::to_value(&a.action_items).unwrap_or_default())
        .bind(&a.sentiment)
        .bind(a.speaker_count.clamp(0, i32::MAX as i64) as i32)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- memory builds ---------------------------------------------------------------------

    /// A new record in `planned`, as the app creates it before enqueueing.
    pub async fn create_build(&self, user_id: i64, task_id: &str) -> Result<i64, DbError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO orbitpilot_memorybuild (user_id, status, task_id) \
             VALUES ($1, 'planned', $2) RETURNING id",
        )
        .bind(user_id)
        .bind(task_id)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn build(&self, id: i64) -> Result<Option<BuildRow>, DbError> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM orbitpilot_memorybuild WHERE id = $1");
        let r = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(build_row).transpose()?)
    }

    /// The record a task made on an earlier attempt (a retry carries no build id it created).
    pub async fn build_by_task(
        &self,
        user_id: i64,
        task_id: &str,
    ) -> Result<Option<BuildRow>, DbError> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM orbitpilot_memorybuild \
             WHERE user_id = $1 AND task_id = $2 ORDER BY id DESC LIMIT 1"
        );
        let r = sqlx::query(&sql)
            .bind(user_id)
            .bind(task_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(build_row).transpose()?)
    }

    /// The record the polling UI shows: the newest build of the user.
    pub async fn latest_build(&self, user_id: i64) -> Result<Option<BuildRow>, DbError> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM orbitpilot_memorybuild \
             WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1"
        );
        let r = sqlx::query(&sql)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(build_row).transpose()?)
    }

    /// planned → running. The fencing token makes a write by a run that lost its lock (and
    /// was overtaken by a newer one) a no-op: returns false then.
    pub async fn build_running(
        &self,
        id: i64,
        task_id: &str,
        attempt: u32,
        fence: i64,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE orbitpilot_memorybuild SET status = 'running', task_id = $2, attempt = $3, \
             started_at = now(), finished_at = NULL, error_message = '', coalesced_into_id = NULL, \
             fence_token = $4 \
             WHERE id = $1 AND (fence_token IS NULL OR fence_token <= $4)",
        )
        .bind(id)
        .bind(task_id)
        .bind(attempt as i32)
        .bind(fence)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A running build's progress so far, under its fence and only while it runs (a late
    /// write never touches an ended record). Err when the progress columns are missing.
    pub async fn build_progress(
        &self,
        id: i64,
        fence: i64,
        p: &orbit_pipeline::progress::Snapshot,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE orbitpilot_memorybuild SET documents = $3, chunks = $4, tokens = $5, \
             chunks_reused = $6, chunks_embedded = $7, documents_expected = $8, \
             progress_percent = $9, eta_seconds = $10, progress_at = now() \
             WHERE id = $1 AND fence_token = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(fence)
        .bind(int(p.documents_read))
        .bind(int(p.chunks))
        .bind(p.tokens.min(i64::MAX as u64) as i64)
        .bind(int(p.chunks_reused))
        .bind(int(p.chunks_embedded))
        .bind(p.documents_expected.map(int))
        .bind(p.percent)
        .bind(p.eta_seconds)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// running → completed, for the build and every request coalesced into it.
    pub async fn build_completed(
        &self,
        id: i64,
        fence: i64,
        c: BuildCounts,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        lock_build_row(&mut tx, id).await?;
        let r = sqlx::query(
            "UPDATE orbitpilot_memorybuild SET status = 'completed', documents = $3, chunks = $4, \
             tokens = $5, chunks_reused = $6, chunks_embedded = $7, error_message = '', \
             finished_at = now() \
             WHERE (id = $1 AND fence_token = $2) \
                OR (coalesced_into_id = $1 AND status IN ('planned', 'running'))",
        )
        .bind(id)
        .bind(fence)
        .bind(int(c.documents))
        .bind(int(c.chunks))
        .bind(c.tokens.min(i64::MAX as u64) as i64)
        .bind(int(c.reused))
        .bind(int(c.embedded))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected() >= 1)
    }

    /// → failed with a readable message, for the build and every request coalesced into it.
    /// `fence` None: the run never held the lock (it failed before taking it).
    pub async fn build_failed(
        &self,
        id: i64,
        fence: Option<i64>,
        message: &str,
    ) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        lock_build_row(&mut tx, id).await?;
        sqlx::query(
            "UPDATE orbitpilot_memorybuild SET status = 'failed', error_message = $3, \
             finished_at = now() \
             WHERE (id = $1 AND ($2::bigint IS NULL OR fence_token IS NULL OR fence_token = $2)) \
                OR (coalesced_into_id = $1 AND status IN ('planned', 'running'))",
        )
        .bind(id)
        .bind(fence)
        .bind(message)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Back to planned before a retry: the UI shows the failed attempt and that another follows.
    pub async fn build_retrying(&self, id: i64, fence: i64, message: &str) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE orbitpilot_memorybuild SET status = 'planned', error_message = $3 \
             WHERE id = $1 AND fence_token = $2",
        )
        .bind(id)
        .bind(fence)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A request that arrived while `into` ran: it follows that build's status from now on.
    /// None when that build has already ended (it finished as this request arrived): nothing is
    /// written, as no one would end this record. Else the build it now follows: `into`, or the
    /// build `into` itself follows (a redelivered build that found a newer one holding the
    /// lock), so no record ever follows a follower, which no build's end would reach.
    ///
    /// The rows followed are locked first here and in `build_completed` / `build_failed`, so the
    /// two cannot interleave: either this request is recorded before the build ends (and the
    /// end, whose statement starts after the lock, finishes it too), or it sees the end. The
    /// records that followed this one move with it: the update of this row waits for any
    /// request still coalescing into it, and the move (a later statement) sees that request.
    pub async fn build_coalesced(
        &self,
        id: i64,
        into: i64,
        task_id: &str,
    ) -> Result<Option<i64>, DbError> {
        let mut tx = self.pool.begin().await?;
        let mut root = into;
        for _ in 0..MAX_COALESCE_HOPS {
            let row: Option<(String, Option<i64>)> = sqlx::query_as(
                "SELECT status, coalesced_into_id FROM orbitpilot_memorybuild WHERE id = $1 FOR SHARE",
            )
            .bind(root)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                Some((status, next)) if matches!(status.as_str(), "planned" | "running") => {
                    match next {
                        Some(n) if n != root && n != id => root = n,
                        _ => break,
                    }
                }
                _ => return Ok(None),
            }
        }
        sqlx::query(
            "UPDATE orbitpilot_memorybuild SET status = 'running', coalesced_into_id = $2, \
             task_id = $3, started_at = now(), error_message = '' \
             WHERE id = $1 AND id <> $2",
        )
        .bind(id)
        .bind(root)
        .bind(task_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE orbitpilot_memorybuild SET coalesced_into_id = $2 \
             WHERE coalesced_into_id = $1 AND status IN ('planned', 'running') AND id <> $2",
        )
        .bind(id)
        .bind(root)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(root))
    }

    // ---- AI usage ----------------------------------------------------------------------------

    pub async fn log_usage(&self, u: &UsageRow) -> Result<(), DbError> {
        let cost = Decimal::from_f64_retain(u.cost_usd)
            .unwrap_or_default()
            .round_dp(6);
        sqlx::query(
            "INSERT INTO orbitpilot_aiusagelog (user_id, feature, model, prompt_tokens, \
             completion_tokens, total_tokens, audio_seconds, cost_usd, task_id) \
             VALUES ((SELECT id FROM accounts_user WHERE id = $1), $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(u.user_id)
        .bind(u.feature)
        .bind(&u.model)
        .bind(u.prompt_tokens.min(i32::MAX as i64) as i32)
        .bind(u.completion_tokens.min(i32::MAX as i64) as i32)
        .bind((u.prompt_tokens + u.completion_tokens).min(i32::MAX as i64) as i32)
        .bind(u.audio_seconds)
        .bind(cost)
        .bind(&u.task_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Usage of `user_id` from `from` (inclusive) to `to` (exclusive).
    pub async fn usage_between(
        &self,
        user_id: i64,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<MonthUsage, DbError> {
        let r = sqlx::query(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0)::bigint, \
             COALESCE(SUM(completion_tokens), 0)::bigint, COALESCE(SUM(total_tokens), 0)::bigint, \
             COALESCE(SUM(audio_seconds), 0)::float8, COALESCE(SUM(cost_usd), 0)::float8 \
             FROM orbitpilot_aiusagelog WHERE user_id = $1 AND created_at >= $2 AND created_at < $3",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await?;
        Ok(MonthUsage {
            requests: r.get(0),
            prompt_tokens: r.get(1),
            completion_tokens: r.get(2),
            total_tokens: r.get(3),
            audio_seconds: r.get(4),
            cost_usd: r.get(5),
        })
    }

    pub async fn snapshot_counts(&self, user_id: i64) -> Result<SnapshotCounts, DbError> {
        let r = sqlx::query(
            "SELECT \
             (SELECT COUNT(*) FROM messaging_message m \
                WHERE NOT m.is_deleted AND (m.sender_id = $1 OR m.conversation_id IN \
                  (SELECT conversation_id FROM messaging_conversation_participants WHERE user_id = $1))), \
             (SELECT COUNT(*) FROM channels_channelpost p JOIN channels_channel_members cm \
                ON cm.channel_id = p.channel_id AND cm.user_id = $1), \
             (SELECT COUNT(*) FROM groups_grouppost p JOIN groups_group_members gm \
                ON gm.group_id = p.group_id AND gm.user_id = $1), \
             (SELECT COUNT(*) FROM blink_blinkaudio WHERE owner_id = $1), \
             (SELECT COUNT(*) FROM orbitpilot_note WHERE user_id = $1)",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(SnapshotCounts {
            messages: r.get(0),
            channel_posts: r.get(1),
            group_posts: r.get(2),
            blinks: r.get(3),
            notes: r.get(4),
        })
    }

    // ---- Blink -------------------------------------------------------------------------------

    pub async fn blink_status(&self, id: i64) -> Result<Option<BlinkStatus>, DbError> {
        let r = sqlx::query(
            "SELECT id, owner_id, transcription_status, transcription_error, ai_analysis_status, \
             ai_analysis_error, duration_seconds, updated_at FROM blink_blinkaudio WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|r| BlinkStatus {
            id: r.get(0),
            owner_id: r.get(1),
            transcription_status: r.get(2),
            transcription_error: r.get(3),
            ai_analysis_status: r.get(4),
            ai_analysis_error: r.get(5),
            duration_seconds: r.get(6),
            updated_at: r.get(7),
        }))
    }
}

/// The Postgres source's default queries, one per document kind, over the shipped schema. `$1`
/// is the user, or NULL for every user. A user's documents: messages they sent or of
/// conversations they belong to, posts of their channels and groups, their Blink transcripts
/// and analyses, and their notes.
pub fn default_source_queries() -> Vec<KindQuery> {
    let q = |kind, sql: &str| KindQuery {
        kind,
        sql: sql.to_string(),
    };
    vec![
        q(
            DocKind::Message,
            "WITH owners AS ( \
               SELECT conversation_id, user_id FROM messaging_conversation_participants \
                 WHERE $1::bigint IS NULL OR user_id = $1 \
               UNION \
               SELECT DISTINCT conversation_id, sender_id FROM messaging_message \
                 WHERE sender_id IS NOT NULL AND ($1::bigint IS NULL OR sender_id = $1)) \
             SELECT o.user_id, 'message:' || m.id AS source_id, m.content AS text, m.created_at, \
               'conversation:' || m.conversation_id AS conversation_id, \
               NULLIF(c.title, '') AS title, u.username AS author \
             FROM owners o \
             JOIN messaging_message m ON m.conversation_id = o.conversation_id \
             JOIN messaging_conversation c ON c.id = m.conversation_id \
             LEFT JOIN accounts_user u ON u.id = m.sender_id \
             WHERE NOT m.is_deleted \
             ORDER BY o.user_id, m.conversation_id, m.created_at, m.id",
        ),
        q(
            DocKind::ChannelPost,
            "SELECT cm.user_id, 'channel_post:' || p.id AS source_id, p.content AS text, p.created_at, \
               'channel:' || p.channel_id AS conversation_id, ch.name AS title, u.username AS author \
             FROM channels_channel_members cm \
             JOIN channels_channelpost p ON p.channel_id = cm.channel_id \
             JOIN channels_channel ch ON ch.id = p.channel_id \
             LEFT JOIN accounts_user u ON u.id = p.author_id \
             WHERE $1::bigint IS NULL OR cm.user_id = $1 \
             ORDER BY cm.user_id, p.channel_id, p.created_at, p.id",
        ),
        q(
            DocKind::GroupPost,
            "SELECT gm.user_id, 'group_post:' || p.id AS source_id, p.content AS text, p.created_at, \
               'group:' || p.group_id AS conversation_id, g.name AS title, u.username AS author \
             FROM groups_group_members gm \
             JOIN groups_grouppost p ON p.group_id = gm.group_id \
             JOIN groups_group g ON g.id = p.group_id \
             LEFT JOIN accounts_user u ON u.id = p.author_id \
             WHERE $1::bigint IS NULL OR gm.user_id = $1 \
             ORDER BY gm.user_id, p.group_id, p.created_at, p.id",
        ),
        q(
            DocKind::BlinkTranscript,
            "SELECT owner_id AS user_id, 'blink_transcript:' || id AS source_id, transcript AS text, \
               created_at, NULLIF(title, '') AS title \
             FROM blink_blinkaudio \
             WHERE transcription_status = 'completed' AND ($1::bigint IS NULL OR owner_id = $1) \
             ORDER BY owner_id, id",
        ),
        q(
            DocKind::BlinkAnalysis,
            "SELECT owner_id AS user_id, 'blink_analysis:' || id AS source_id, \
               summary || COALESCE(E'\\n\\n' || ( \
                 SELECT string_agg('- ' || COALESCE(NULLIF(ai->>'owner', '') || ': ', '') || (ai->>'task') \
                   || COALESCE(' (due ' || NULLIF(ai->>'due', '') || ')', ''), E'\\n') \
                 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(action_items) = 'array' \
                   THEN action_items ELSE '[]'::jsonb END) ai), '') AS text, \
               created_at, NULLIF(title, '') AS title \
             FROM blink_blinkaudio \
             WHERE ai_analysis_status = 'completed' AND ($1::bigint IS NULL OR owner_id = $1) \
             ORDER BY owner_id, id",
        ),
        q(
            DocKind::Note,
            "SELECT user_id, 'note:' || id AS source_id, content AS text, created_at, \
               NULLIF(title, '') AS title \
             FROM orbitpilot_note WHERE $1::bigint IS NULL OR user_id = $1 \
             ORDER BY user_id, id",
        ),
    ]
}

/// The default queries with any replaced from a JSON file `{"message": "SELECT …", …}`.
pub fn source_queries(overrides: Option<&std::path::Path>) -> anyhow::Result<Vec<KindQuery>> {
    let mut qs = default_source_queries();
    let Some(path) = overrides else {
        return Ok(qs);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("ORBIT_SOURCE_QUERIES {}: {e}", path.display()))?;
    let map: std::collections::BTreeMap<DocKind, Option<String>> = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("ORBIT_SOURCE_QUERIES {}: {e}", path.display()))?;
    for (kind, sql) in map {
        qs.retain(|q| q.kind != kind);
        // null drops the kind: an app without notes, say.
        if let Some(sql) = sql {
            qs.push(KindQuery { kind, sql });
        }
    }
    Ok(qs)
}

/// Takes the row lock of build `id` for the transaction: what orders a build's end against a
/// request coalescing into it (`Db::build_coalesced`).
/// Links followed from a build to the one it follows: chains are at most one link long once
/// `build_coalesced` moves followers; the bound only stops a cycle a bug could make.
const MAX_COALESCE_HOPS: usize = 8;

async fn lock_build_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: i64,
) -> Result<(), DbError> {
    sqlx::query("SELECT 1 FROM orbitpilot_memorybuild WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
