//! One memory build per user at a time: a Redis lock with a TTL, renewed while the build runs,
//! and a fencing token (a per-user counter) that the build writes with its record, so a run that
//! lost its lock cannot overwrite what a newer run wrote.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::redis_conn::{ConnError, RedisConn};

/// The lock's Redis could not be reached or refused the script.
#[derive(Debug, thiserror::Error)]
#[error("build lock {0}")]
pub struct LockError(#[from] ConnError);

/// Takes the lock unless another build holds it. The same build may take it over: that is its
/// own message redelivered after a worker died.
const ACQUIRE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  local holder = sep and string.sub(cur, sep + 1) or ''
  if holder ~= ARGV[1] then return {0, holder} end
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return {1, tostring(token)}
";

const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

fn lock_key(user: i64) -> String {
    format!("orbit:build:lock:{user}")
}
fn fence_key(user: i64) -> String {
    format!("orbit:build:fence:{user}")
}
/// Set by a coalesced request: the running build makes one more pass when it ends, so a change
/// that arrived mid-build is not missed.
fn again_key(user: i64) -> String {
    format!("orbit:build:again:{user}")
}

pub enum Acquired {
    Lock(BuildLock),
    /// Another build holds the lock: its build id (0 when it keeps no record).
    HeldBy(i64),
}

/// Held while a build runs; released when dropped (RAII), on every exit of the task.
pub struct BuildLock {
    conn: Arc<RedisConn>,
    user: i64,
    value: String,
    pub fence: i64,
    ttl: Duration,
    /// Fires when the lock could not be renewed: another run may now hold it.
    pub lost: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

pub async fn acquire(
    conn: &Arc<RedisConn>,
    user: i64,
    build_id: i64,
    ttl: Duration,
) -> Result<Acquired, LockError> {
    let mut c = conn.conn().await?;
    let r: Result<(i64, String), _> = Script::new(ACQUIRE_LUA)
        .key(lock_key(user))
        .key(fence_key(user))
        .arg(build_id)
        .arg(ttl.as_millis() as u64)
        .invoke_async(&mut c)
        .await;
    let (ok, v) = conn.note(r).await?;
    if ok == 0 {
        return Ok(Acquired::HeldBy(v.parse().unwrap_or(0)));
    }
    let fence: i64 = v.parse().unwrap_or(0);
    let value = format!("{fence}:{build_id}");
    let lost = CancellationToken::new();
    let renewer = tokio::spawn(renew(
        conn.clone(),
        lock_key(user),
        value.clone(),
        ttl,
        lost.clone(),
    ));
    Ok(Acquired::Lock(BuildLock {
        conn: conn.clone(),
        user,
        value,
        fence,
        ttl,
        lost,
        renewer,
    }))
}

/// Extends the lock every third of its TTL; gives up (and fires `lost`) when the lock is gone
/// or Redis stays unreachable until the TTL would have run out.
async fn renew(
    conn: Arc<RedisConn>,
    key: String,
    value: String,
    ttl: Duration,
    lost: CancellationToken,
) {
    let every = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let r = async {
            let mut c = conn.conn().await?;
            let r: Result<i64, _> = Script::new(RENEW_LUA)
                .key(&key)
                .arg(&value)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await;
            conn.note(r).await
        }
        .await;
        match r {
            Ok(1) => last_ok = tokio::time::Instant::now(),
            Ok(_) => {
                tracing::error!(lock = %key, "build lock taken over by another run");
                lost.cancel();
                return;
            }
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::error!(lock = %key, error = %e, "build lock expired while Redis was unreachable");
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(lock = %key, error = %e, "cannot renew build lock; retrying"),
        }
    }
}

/// What frees a lock from outside the build that holds it: the worker's abort hook, run after a
/// hard time limit or an abandoning shutdown dropped the build. A build stuck in blocking code
/// is not dropped until that code returns, and its lock (renewed by its own task) would live
/// on; the hook stops the renewal and releases the lock by its value, so no newer holder's is
/// touched.
pub struct LockReleaser {
    conn: Arc<RedisConn>,
    user: i64,
    value: String,
    renewer: tokio::task::AbortHandle,
}

impl LockReleaser {
    pub async fn release(self) {
        self.renewer.abort();
        release(self.conn, self.user, self.value).await;
    }
}

impl BuildLock {
    pub fn releaser(&self) -> LockReleaser {
        LockReleaser {
            conn: self.conn.clone(),
            user: self.user,
            value: self.value.clone(),
            renewer: self.renewer.abort_handle(),
        }
    }

    /// Whether a coalesced request asked for another pass (and clears the ask).
    pub async fn take_again(&self) -> bool {
        let Ok(mut c) = self.conn.conn().await else {
            return false;
        };
        let r: Result<Option<String>, _> = redis::cmd("GETDEL")
            .arg(again_key(self.user))
            .query_async(&mut c)
            .await;
        matches!(self.conn.note(r).await, Ok(Some(_)))
    }

    /// Frees the lock now; dropping it does the same in the background.
    pub async fn release(mut self) {
        self.renewer.abort();
        let value = std::mem::take(&mut self.value);
        release(self.conn.clone(), self.user, value).await;
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        self.renewer.abort();
        // A lock is not a record: if the process exits before this lands, the TTL frees it.
        if self.value.is_empty() {
            return; // released already
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(release(
                self.conn.clone(),
                self.user,
                std::mem::take(&mut self.value),
            ));
        }
    }
}

/// Deletes the lock if it is still `value` (never a newer holder's).
async fn release(conn: Arc<RedisConn>, user: i64, value: String) {
    let Ok(mut c) = conn.conn().await else {
        return;
    };
    let r: Result<i64, _> = Script::new(RELEASE_LUA)
        .key(lock_key(user))
        .arg(&value)
        .invoke_async(&mut c)
        .await;
    if let Err(e) = conn.note(r).await {
        tracing::warn!(error = %e, "cannot release build lock; it expires on its own");
    }
}

/// Asks the build holding the lock for one more pass once it is done.
pub async fn request_again(conn: &RedisConn, user: i64, ttl: Duration) -> Result<(), LockError> {
    let mut c = conn.conn().await?;
    let r: Result<(), _> = redis::cmd("SET")
        .arg(again_key(user))
        .arg(1)
        .arg("PX")
        .arg((ttl * 10).as_millis() as u64)
        .query_async(&mut c)
        .await;
    Ok(conn.note(r).await?)
}
