//! The app's Redis cache as Django sees it: keys made by Django's default key function
//! (`{KEY_PREFIX}:{VERSION}:{key}`) and values pickled as Django's Redis cache stores them
//! (integers as plain digits), so `cache.get(...)` in Django reads what the worker wrote.

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use redis::AsyncCommands;
use serde::{de::DeserializeOwned, Serialize};

use crate::db::{Db, MonthUsage, SnapshotCounts};
use crate::redis_conn::RedisConn;

/// `usage:{user_pk}:{YYYY-MM}`: the seed's five minutes.
pub const USAGE_TTL: Duration = Duration::from_secs(300);
/// `orbit_snapshot_counts:{user_pk}`: the seed's two minutes.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(120);
/// `op_ask:{task_id}`: as long as the Celery result.
pub const ASK_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache: {0}")]
    Redis(#[from] crate::redis_conn::ConnError),
    #[error("cache value: {0}")]
    Pickle(#[from] serde_pickle::Error),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl orbit_pipeline::Retryable for CacheError {
    fn is_retryable(&self) -> bool {
        match self {
            CacheError::Redis(_) => true,
            CacheError::Pickle(_) => false,
            CacheError::Db(e) => e.is_retryable(),
        }
    }
}

#[derive(Clone)]
pub struct Cache {
    conn: std::sync::Arc<RedisConn>,
    prefix: String,
    version: i64,
}

impl Cache {
    pub fn new(conn: std::sync::Arc<RedisConn>, prefix: String, version: i64) -> Self {
        Self {
            conn,
            prefix,
            version,
        }
    }

    /// Django's `make_key`: `"%s:%s:%s" % (KEY_PREFIX, VERSION, key)`.
    pub fn key(&self, key: &str) -> String {
        format!("{}:{}:{}", self.prefix, self.version, key)
    }

    pub fn usage_key(user_id: i64, month: chrono::DateTime<Utc>) -> String {
        format!("usage:{user_id}:{:04}-{:02}", month.year(), month.month())
    }

    pub fn snapshot_key(user_id: i64) -> String {
        format!("orbit_snapshot_counts:{user_id}")
    }

    pub fn ask_key(task_id: &str) -> String {
        format!("op_ask:{task_id}")
    }

    pub async fn set<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let bytes = serde_pickle::to_vec(value, serde_pickle::SerOptions::new())?;
        let mut c = self.conn.conn().await?;
        let r: Result<(), _> = c
            .pset_ex(self.key(key), bytes, ttl.as_millis() as u64)
            .await;
        Ok(self.conn.note(r).await?)
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CacheError> {
        let mut c = self.conn.conn().await?;
        let r: Result<Option<Vec<u8>>, _> = c.get(self.key(key)).await;
        match self.conn.note(r).await? {
            None => Ok(None),
            // A value another writer left in a shape we do not know is a miss, not an error:
            // the read-through recomputes and overwrites it.
            Some(b) => Ok(serde_pickle::from_slice(&b, serde_pickle::DeOptions::new()).ok()),
        }
    }

    pub async fn delete(&self, keys: &[String]) -> Result<(), CacheError> {
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let mut c = self.conn.conn().await?;
        let r: Result<(), _> = c.del(full).await;
        Ok(self.conn.note(r).await?)
    }

    /// This month's AI usage of a user, through the cache (5 min).
    pub async fn month_usage(&self, db: &Db, user_id: i64) -> Result<MonthUsage, CacheError> {
        let now = Utc::now();
        let key = Self::usage_key(user_id, now);
        if let Ok(Some(v)) = self.get::<MonthUsage>(&key).await {
            return Ok(v);
        }
        let from = Utc
            .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or(now);
        let to = if now.month() == 12 {
            Utc.with_ymd_and_hms(now.year() + 1, 1, 1, 0, 0, 0)
        } else {
            Utc.with_ymd_and_hms(now.year(), now.month() + 1, 1, 0, 0, 0)
        }
        .single()
        .unwrap_or(now);
        let v = db.usage_between(user_id, from, to).await?;
        // A cache that is down must not fail the caller: the number came from the database.
        let _ = self.set(&key, &v, USAGE_TTL).await;
        Ok(v)
    }

    /// How much of the user's data OrbitPilot sees, through the cache (2 min).
    pub async fn snapshot_counts(
        &self,
        db: &Db,
        user_id: i64,
    ) -> Result<SnapshotCounts, CacheError> {
        let key = Self::snapshot_key(user_id);
        if let Ok(Some(v)) = self.get::<SnapshotCounts>(&key).await {
            return Ok(v);
        }
        let v = db.snapshot_counts(user_id).await?;
        let _ = self.set(&key, &v, SNAPSHOT_TTL).await;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_as_django_makes_them() {
        let t = Utc.with_ymd_and_hms(2026, 11, 3, 10, 0, 0).unwrap();
        assert_eq!(Cache::usage_key(42, t), "usage:42:2026-11");
        assert_eq!(Cache::snapshot_key(7), "orbit_snapshot_counts:7");
        let c = Cache {
            conn: std::sync::Arc::new(
                RedisConn::open("redis://127.0.0.1:1/0", Duration::from_secs(1)).unwrap(),
            ),
            prefix: String::new(),
            version: 1,
        };
        assert_eq!(c.key("usage:42:2026-11"), ":1:usage:42:2026-11");
    }
}
