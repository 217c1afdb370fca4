//! `orbit-worker db seed`: loads a JSONL corpus (the pipeline's document format) into the app
//! tables, creating users, conversations, channels, groups and memberships as needed. Each line's
//! row is remembered in `orbitworker_seedmap`, so seeding the same corpus again updates rows
//! instead of duplicating them: demos, tests and benchmarks share one path into Postgres.

use std::collections::HashMap;

use futures::StreamExt;
use orbit_pipeline::source::{Rejection, Source};
use orbit_pipeline::{BuildScope, DocKind, RawDocument};
use serde::Serialize;
use sqlx::{Postgres, Transaction};

use super::{Db, DbError};

#[derive(Debug, Default, Serialize)]
pub struct SeedReport {
    pub documents: u64,
    pub inserted: u64,
    pub updated: u64,
    pub users: u64,
    pub rejected: Vec<Rejection>,
    pub rejected_count: u64,
}

/// Resolved parents, so a corpus of a million lines asks for each conversation once.
#[derive(Default)]
struct Cache {
    keys: HashMap<String, i64>,
    users: HashMap<i64, ()>,
    usernames: HashMap<String, i64>,
}

pub async fn seed(db: &Db, source: &dyn Source) -> Result<SeedReport, anyhow::Error> {
    let mut report = SeedReport::default();
    let mut cache = Cache::default();
    let mut stream = source.documents(&BuildScope::AllUsers);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        report.rejected_count += batch.rejected.len() as u64;
        report.rejected.extend(batch.rejected.into_iter().take(100));
        // One transaction per batch: a failure loses at most one batch, which a rerun redoes.
        let mut tx = db.pool.begin().await.map_err(DbError::from)?;
        for mut doc in batch.docs {
            report.documents += 1;
            // Postgres text cannot hold NUL; the cleaner would drop it anyway.
            if doc.text.contains('\0') {
                doc.text = doc.text.replace('\0', "");
            }
            match put(&mut tx, &mut cache, &mut report, &doc).await? {
                true => report.inserted += 1,
                false => report.updated += 1,
            }
        }
        tx.commit().await.map_err(DbError::from)?;
    }
    // Rows were inserted with explicit ids: move each sequence past them.
    for table in ["accounts_user"] {
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
             GREATEST((SELECT MAX(id) FROM {table}), 1))"
        );
        sqlx::query(&sql)
            .execute(&db.pool)
            .await
            .map_err(DbError::from)?;
    }
    Ok(report)
}

type Tx<'a> = Transaction<'a, Postgres>;

async fn ensure_user(
    tx: &mut Tx<'_>,
    cache: &mut Cache,
    report: &mut SeedReport,
    id: i64,
) -> Result<(), DbError> {
    if cache.users.contains_key(&id) {
        return Ok(());
    }
    let r = sqlx::query(
        "INSERT INTO accounts_user (id, username, email) VALUES ($1, 'user' || $1, 'user' || $1 || '@orbit.test') \
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    report.users += r.rows_affected();
    cache.users.insert(id, ());
    Ok(())
}

/// The user named `name` (an author who is not a memory owner), created when new.
async fn user_named(tx: &mut Tx<'_>, cache: &mut Cache, name: &str) -> Result<i64, DbError> {
    if let Some(id) = cache.usernames.get(name) {
        return Ok(*id);
    }
    let id: i64 = sqlx::query_scalar(
        "WITH ins AS (INSERT INTO accounts_user (id, username, email) \
           VALUES ((SELECT COALESCE(MAX(id), 0) + 1000000 FROM accounts_user), $1, '') \
           ON CONFLICT (username) DO NOTHING RETURNING id) \
         SELECT id FROM ins UNION ALL SELECT id FROM accounts_user WHERE username = $1 LIMIT 1",
    )
    .bind(name)
    .fetch_one(&mut **tx)
    .await?;
    cache.usernames.insert(name.to_string(), id);
    Ok(id)
}

/// The row remembered under `key`, or the one `insert` creates (and is remembered). `insert`
/// takes `$1` = `name` and, when given, `$2` = `owner`.
async fn keyed(
    tx: &mut Tx<'_>,
    cache: &mut Cache,
    key: &str,
    insert: &str,
    name: &str,
    owner: Option<i64>,
) -> Result<i64, DbError> {
    if let Some(id) = cache.keys.get(key) {
        return Ok(*id);
    }
    let id = match lookup(tx, key).await? {
        Some(id) => id,
        None => {
            let mut q = sqlx::query_scalar(insert).bind(name);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            let id: i64 = q.fetch_one(&mut **tx).await?;
            remember(tx, key, id).await?;
            id
        }
    };
    cache.keys.insert(key.to_string(), id);
    Ok(id)
}

/// The recording remembered under `key`, created for `owner` when new.
async fn blink_row(
    tx: &mut Tx<'_>,
    cache: &mut Cache,
    owner: i64,
    key: &str,
    title: &str,
) -> Result<i64, DbError> {
    let insert = "INSERT INTO blink_blinkaudio (title, owner_id) VALUES ($1, $2) RETURNING id";
    keyed(tx, cache, key, insert, title, Some(owner)).await
}

async fn remember(tx: &mut Tx<'_>, key: &str, id: i64) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO orbitworker_seedmap (source_key, row_id) VALUES ($1, $2) \
         ON CONFLICT (source_key) DO UPDATE SET row_id = excluded.row_id",
    )
    .bind(key)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn lookup(tx: &mut Tx<'_>, key: &str) -> Result<Option<i64>, DbError> {
    Ok(
        sqlx::query_scalar("SELECT row_id FROM orbitworker_seedmap WHERE source_key = $1")
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

/// Writes one document; true when it made a new row.
async fn put(
    tx: &mut Tx<'_>,
    cache: &mut Cache,
    report: &mut SeedReport,
    d: &RawDocument,
) -> Result<bool, DbError> {
    ensure_user(tx, cache, report, d.user_id).await?;
    let author = match d.author.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => Some(user_named(tx, cache, a).await?),
        None => None,
    };
    let line_key = format!("{}:{}:{}", d.kind.as_str(), d.user_id, d.source_id);
    let existing = lookup(tx, &line_key).await?;
    let parent = parent_of(tx, cache, d).await?;
    let sender = author.unwrap_or(d.user_id);
    let id = match d.kind {
        DocKind::Message => put_message(tx, d, parent, sender, existing).await?,
        DocKind::ChannelPost | DocKind::GroupPost => {
            put_post(tx, d, parent, sender, existing).await?
        }
        DocKind::BlinkTranscript | DocKind::BlinkAnalysis => {
            put_blink(tx, cache, d, &line_key, existing).await?
        }
        DocKind::Note => put_note(tx, d, existing).await?,
    };
    if existing.is_none() {
        remember(tx, &line_key, id).await?;
    }
    Ok(existing.is_none())
}

/// The conversation, channel or group a chat document belongs to, made and joined as needed.
async fn parent_of(
    tx: &mut Tx<'_>,
    cache: &mut Cache,
    d: &RawDocument,
) -> Result<Option<i64>, DbError> {
    let (parent_sql, member_sql, parent_prefix) = match d.kind {
        DocKind::Message => (
            "INSERT INTO messaging_conversation (title) VALUES ($1) RETURNING id",
            "INSERT INTO messaging_conversation_participants (conversation_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "conversation",
        ),
        DocKind::ChannelPost => (
            "INSERT INTO channels_channel (name) VALUES ($1) RETURNING id",
            "INSERT INTO channels_channel_members (channel_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "channel",
        ),
        DocKind::GroupPost => (
            "INSERT INTO groups_group (name) VALUES ($1) RETURNING id",
            "INSERT INTO groups_group_members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "group",
        ),
        _ => ("", "", ""),
    };
    if parent_prefix.is_empty() {
        return Ok(None);
    }
    let name = d
        .conversation_id
        .clone()
        .unwrap_or_else(|| format!("{parent_prefix}-of-user-{}", d.user_id));
    let key = format!("{parent_prefix}:{name}");
    let shown = d.title.clone().unwrap_or_else(|| name.clone());
    let id = keyed(tx, cache, &key, parent_sql, &shown, None).await?;
    if cache
        .keys
        .insert(format!("member:{parent_prefix}:{id}:{}", d.user_id), id)
        .is_none()
    {
        sqlx::query(member_sql)
            .bind(id)
            .bind(d.user_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(Some(id))
}

async fn put_message(
    tx: &mut Tx<'_>,
    d: &RawDocument,
    parent: Option<i64>,
    sender: i64,
    existing: Option<i64>,
) -> Result<i64, DbError> {
    Ok(match existing {
        None => {
            sqlx::query_scalar(
                "INSERT INTO messaging_message (conversation_id, sender_id, content, created_at) \
             VALUES ($1, $2, $3, $4) RETURNING id",
            )
            .bind(parent)
            .bind(sender)
            .bind(&d.text)
            .bind(d.created_at)
            .fetch_one(&mut **tx)
            .await?
        }
        Some(id) => {
            sqlx::query(
                "UPDATE messaging_message SET content = $2, created_at = $3, is_deleted = FALSE, \
             edited_at = CASE WHEN content <> $2 THEN now() ELSE edited_at END WHERE id = $1",
            )
            .bind(id)
            .bind(&d.text)
            .bind(d.created_at)
            .execute(&mut **tx)
            .await?;
            id
        }
    })
}

async fn put_post(
    tx: &mut Tx<'_>,
    d: &RawDocument,
    parent: Option<i64>,
    sender: i64,
    existing: Option<i64>,
) -> Result<i64, DbError> {
    let table = if d.kind == DocKind::ChannelPost {
        ("channels_channelpost", "channel_id")
    } else {
        ("groups_grouppost", "group_id")
    };
    Ok(match existing {
        None => {
            let sql = format!(
                    "INSERT INTO {} ({}, author_id, content, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
                    table.0, table.1
                );
            sqlx::query_scalar(&sql)
                .bind(parent)
                .bind(sender)
                .bind(&d.text)
                .bind(d.created_at)
                .fetch_one(&mut **tx)
                .await?
        }
        Some(id) => {
            let sql = format!(
                "UPDATE {} SET content = $2, created_at = $3 WHERE id = $1",
                table.0
            );
            sqlx::query(&sql)
                .bind(id)
                .bind(&d.text)
                .bind(d.created_at)
                .execute(&mut **tx)
                .await?;
            id
        }
    })
}

async fn put_blink(
    tx: &mut Tx<'_>,
    cache: &mut Cache,
    d: &RawDocument,
    line_key: &str,
    existing: Option<i64>,
) -> Result<i64, DbError> {
    let title = d.title.clone().unwrap_or_default();
    // A transcript and its analysis share one recording: `meta.audio_id` names it when
    // the corpus has one, else each line is its own recording.
    let audio = d
        .meta
        .as_ref()
        .and_then(|m| m.get("audio_id"))
        .map(|v| v.to_string().trim_matches('"').to_string());
    let id = match (existing, audio) {
        (Some(id), _) => id,
        (None, Some(a)) => {
            blink_row(
                tx,
                cache,
                d.user_id,
                &format!("blink:{}:{a}", d.user_id),
                &title,
            )
            .await?
        }
        (None, None) => blink_row(tx, cache, d.user_id, line_key, &title).await?,
    };
    let sql = if d.kind == DocKind::BlinkTranscript {
        "UPDATE blink_blinkaudio SET transcript = $2, transcription_status = 'completed', \
             created_at = $3, updated_at = now(), title = CASE WHEN $4 = '' THEN title ELSE $4 END \
             WHERE id = $1"
    } else {
        "UPDATE blink_blinkaudio SET summary = $2, ai_analysis_status = 'completed', \
             created_at = $3, updated_at = now(), title = CASE WHEN $4 = '' THEN title ELSE $4 END \
             WHERE id = $1"
    };
    sqlx::query(sql)
        .bind(id)
        .bind(&d.text)
        .bind(d.created_at)
        .bind(&title)
        .execute(&mut **tx)
        .await?;
    Ok(id)
}

async fn put_note(tx: &mut Tx<'_>, d: &RawDocument, existing: Option<i64>) -> Result<i64, DbError> {
    let title = d.title.clone().unwrap_or_default();
    Ok(match existing {
        None => {
            sqlx::query_scalar(
                "INSERT INTO orbitpilot_note (user_id, title, content, created_at) \
             VALUES ($1, $2, $3, $4) RETURNING id",
            )
            .bind(d.user_id)
            .bind(&title)
            .bind(&d.text)
            .bind(d.created_at)
            .fetch_one(&mut **tx)
            .await?
        }
        Some(id) => {
            sqlx::query("UPDATE orbitpilot_note SET title = $2, content = $3, created_at = $4 WHERE id = $1")
            .bind(id)
            .bind(&title)
            .bind(&d.text)
            .bind(d.created_at)
            .execute(&mut **tx)
            .await?;
            id
        }
    })
}
