//! Redis I/O of the Celery protocol: fetch and register, results, acks, re-publish and restore.
//!
//! Keys and transactions follow kombu's Redis transport (`../shared/docs/celery-wire.md`), so a
//! Python worker and this one can share a queue and restore each other's unacked messages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;

use super::message::{queue_key, restored_envelope};
pub use crate::redis_conn::{redact_url, ConnError, RedisConn};

pub const UNACKED: &str = "unacked";
pub const UNACKED_INDEX: &str = "unacked_index";
pub const UNACKED_MUTEX: &str = "unacked_mutex";
/// kombu's lock lifetime for a restore sweep (`unacked_mutex_expire`).
const UNACKED_MUTEX_MS: u64 = 300_000;
/// Tries to free the restore mutex after a sweep, each on a fresh connection: a Redis restart
/// (seconds) is outlasted, a long outage is left to the mutex's expiry.
const MUTEX_RELEASE_TRIES: u32 = 10;
const MUTEX_RELEASE_PAUSE: Duration = Duration::from_millis(500);
/// Where messages that can never run go, with the reason.
pub const DEAD_LETTER: &str = "orbit.dead";
/// Restores per round trip of a sweep: bounds one sweep's hold on the mutex between reads.
const RESTORE_PAGE: isize = 100;
/// Beyond the BRPOP timeout, how long a reply may take before the connection counts as dead.
const REPLY_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker {0}")]
    Conn(#[from] ConnError),
}

impl From<redis::RedisError> for BrokerError {
    fn from(e: redis::RedisError) -> Self {
        BrokerError::Conn(ConnError::Redis(e))
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Bytes from Redis as text without a copy; invalid UTF-8 (garbage on a queue) made readable.
fn utf8(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A queue element as taken: the list it came from, its bytes, and whether it was registered
/// in `unacked` (it was unless no delivery tag could be read from it).
#[derive(Debug)]
pub struct Fetched {
    pub list: String,
    /// The message, or its lossy copy when `utf8` is false (such a message is refused: it is
    /// not JSON, and its delivery tag could not be acked by a re-encoded copy).
    pub raw: String,
    pub utf8: bool,
    /// The delivery tag the fetch registered the message under, as the fetch script read it;
    /// None: not registered (the worker registers what it can read).
    pub registered: Option<String>,
}

impl Fetched {
    fn new(list: Vec<u8>, raw: Vec<u8>, registered: Option<String>) -> Self {
        let (raw, is_utf8) = match String::from_utf8(raw) {
            Ok(s) => (s, true),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
        };
        Fetched {
            list: utf8(list),
            raw,
            utf8: is_utf8,
            registered,
        }
    }
}

/// (list, raw message, "1" when registered, the tag registered) per message taken.
type FetchReply = Vec<(Vec<u8>, Vec<u8>, String, Vec<u8>)>;

/// Pops up to ARGV[2] messages in priority order and registers each in `unacked`/`unacked_index`
/// in the same atomic step, so no message is ever off the queue and unregistered. The `unacked`
/// value keeps the envelope's bytes verbatim: `[envelope, exchange, routing_key]`.
const FETCH_LUA: &str = r#"
local now = ARGV[1]
local max = tonumber(ARGV[2])
local out, zadd, hset = {}, {}, {}
for i = 3, #KEYS do
  local popped = redis.call('RPOP', KEYS[i], max - #out)
  if popped then
    for _, raw in ipairs(popped) do
      local ok, env = pcall(cjson.decode, raw)
      local tag, ex, rk = nil, '', KEYS[i]
      if ok and type(env) == 'table' and type(env.properties) == 'table' then
        tag = env.properties.delivery_tag
        local di = env.properties.delivery_info
        if type(di) == 'table' then
          if type(di.exchange) == 'string' then ex = di.exchange end
          if type(di.routing_key) == 'string' then rk = di.routing_key end
        end
      end
      -- Only an ASCII tag is registered here: any other is registered by the worker if the
      -- message is readable at all, so every tag in unacked is one it can ack byte for byte.
      if type(tag) == 'string' and not string.find(tag, '[\128-\255]') then
        zadd[#zadd + 1] = now
        zadd[#zadd + 1] = tag
        hset[#hset + 1] = tag
        hset[#hset + 1] = '[' .. raw .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']'
        out[#out + 1] = {KEYS[i], raw, '1', tag}
      else
        out[#out + 1] = {KEYS[i], raw, '0', ''}
      end
    end
  end
  if #out >= max then break end
end
if #zadd > 0 then
  redis.call('ZADD', KEYS[1], unpack(zadd))
  redis.call('HSET', KEYS[2], unpack(hset))
end
return out
"#;

/// Settles a batch in one atomic step: each result written unless a SUCCESS is already stored
/// (a redelivered task must not turn a success into anything else) and published
/// (`AsyncResult.get()` waits on the channel); then retries re-published, dead letters kept, and
/// acks. The worker calls it once when results and broker share a Redis, else once on each, results
/// first.
/// `orbit.dead` is trimmed to its newest `dead max` entries.
/// KEYS: unacked_index, unacked, orbit.dead, meta keys…, publish lists…
/// ARGV: expires, #results, #publish, #dead, #acks, dead max, results…, envelopes…, dead
/// records…, tags…
const FINISH_LUA: &str = r#"
local nres, npub, ndead, nack = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a, k, written = 7, 4, 0
for i = 0, nres - 1 do
  local key, val = KEYS[k + i], ARGV[a + i]
  local cur = redis.call('GET', key)
  local keep = false
  if cur then
    local ok, m = pcall(cjson.decode, cur)
    keep = ok and type(m) == 'table' and m.status == 'SUCCESS'
  end
  if not keep then
    redis.call('SETEX', key, ARGV[1], val)
    redis.call('PUBLISH', key, val)
    written = written + 1
  end
end
a, k = a + nres, k + nres
for i = 0, npub - 1 do redis.call('LPUSH', KEYS[k + i], ARGV[a + i]) end
a = a + npub
for i = 0, ndead - 1 do redis.call('LPUSH', KEYS[3], ARGV[a + i]) end
if ndead > 0 then redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1) end
a = a + ndead
if nack > 0 then
  local tags = {}
  for i = 0, nack - 1 do tags[i + 1] = ARGV[a + i] end
  redis.call('ZREM', KEYS[1], unpack(tags))
  redis.call('HDEL', KEYS[2], unpack(tags))
end
return written
"#;

static FINISH: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| Script::new(FINISH_LUA));

/// Runs the settle script on `conn`; returns how many results were written.
pub async fn finish(
    conn: &RedisConn,
    results: &[(String, String)],
    s: &Settlement,
    expires: Duration,
) -> Result<usize, BrokerError> {
    if results.is_empty() && s.is_empty() {
        return Ok(0);
    }
    let mut inv = FINISH.prepare_invoke();
    inv.key(UNACKED_INDEX).key(UNACKED).key(DEAD_LETTER);
    inv.arg(expires.as_secs().max(1))
        .arg(results.len())
        .arg(s.publish.len())
        .arg(s.dead.len())
        .arg(s.acks.len())
        .arg(s.dead_max.max(1));
    for (id, meta) in results {
        inv.key(meta_key(id)).arg(meta);
    }
    for (list, env) in &s.publish {
        inv.key(list).arg(env);
    }
    for d in &s.dead {
        inv.arg(d);
    }
    for t in &s.acks {
        inv.arg(t);
    }
    let mut c = conn.conn().await?;
    let r: Result<usize, _> = inv.invoke_async(&mut c).await;
    Ok(conn.note(r).await?)
}

/// Puts one unacked message back if it is still the entry that was read (compare and swap, so
/// a concurrent ack or restore wins cleanly and nothing is pushed twice).
const RESTORE_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
if cur ~= ARGV[2] then return -1 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"#;

const UNLOCK_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// What to settle in one broker transaction after results are stored.
#[derive(Debug)]
pub struct Settlement {
    /// Delivery tags to remove from `unacked`.
    pub acks: Vec<String>,
    /// (list, envelope) to push: retries re-published.
    pub publish: Vec<(String, String)>,
    /// Dead-letter records for `orbit.dead`.
    pub dead: Vec<String>,
    /// How many entries `orbit.dead` keeps, newest first, once these are added.
    pub dead_max: usize,
}

impl Default for Settlement {
    fn default() -> Self {
        Settlement {
            acks: Vec::new(),
            publish: Vec::new(),
            dead: Vec::new(),
            dead_max: DeadLetters::default().max_entries,
        }
    }
}

/// How much `orbit.dead` keeps (`ORBIT_DEAD_LETTER_MAX`, `ORBIT_DEAD_LETTER_MAX_BYTES`): the
/// newest entries, each with at most `max_entry_bytes` of its message.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetters {
    pub max_entries: usize,
    pub max_entry_bytes: usize,
}

/// Dead letters kept by default: thousands of refused messages is an incident to read, and
/// 10 000 entries of at most 64 KiB keep `orbit.dead` under about 650 MB in the worst case.
pub const DEFAULT_DEAD_LETTERS: usize = 10_000;
/// Bytes of one dead message kept by default: a real task message is a few KiB, so the whole
/// of it; an oversized one keeps its head (the headers carry the task id) and its size.
pub const DEFAULT_DEAD_LETTER_BYTES: usize = 64 * 1024;

impl Default for DeadLetters {
    fn default() -> Self {
        DeadLetters {
            max_entries: DEFAULT_DEAD_LETTERS,
            max_entry_bytes: DEFAULT_DEAD_LETTER_BYTES,
        }
    }
}

impl DeadLetters {
    /// The record kept in `orbit.dead`: why, from which list, when, and the message as received,
    /// cut to `max_entry_bytes` (on a character boundary) with its full size noted.
    pub fn record(&self, reason: &str, list: &str, raw: &str) -> String {
        let cut = orbit_pipeline::clean::floor_char_boundary(raw, self.max_entry_bytes);
        let mut v = serde_json::json!({
            "reason": reason,
            "queue": list,
            "at": super::message::iso(chrono::Utc::now()),
            "raw": &raw[..cut],
        });
        if cut < raw.len() {
            v["raw_bytes"] = raw.len().into();
            v["truncated"] = true.into();
        }
        v.to_string()
    }
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.publish.is_empty() && self.dead.is_empty()
    }
}

/// The broker side: the queue lists and the `unacked` bookkeeping.
pub struct Broker {
    pub ops: RedisConn,
    /// The bounds of `orbit.dead`, for the dead letters the broker writes itself (restores).
    pub dead_letters: DeadLetters,
    blocking: RedisConn,
    fetch: Script,
    restore: Script,
    unlock: Script,
}

impl Broker {
    pub fn open(url: &str, brpop_timeout: Duration) -> Result<Self, BrokerError> {
        Ok(Broker {
            ops: RedisConn::open(url, Duration::from_secs(10))?,
            dead_letters: DeadLetters::default(),
            blocking: RedisConn::open(url, brpop_timeout + REPLY_GRACE)?,
            fetch: Script::new(FETCH_LUA),
            restore: Script::new(RESTORE_LUA),
            unlock: Script::new(UNLOCK_LUA),
        })
    }

    /// Takes up to `max` waiting messages without blocking, registered as they are taken.
    pub async fn fetch(&self, keys: &[String], max: usize) -> Result<Vec<Fetched>, BrokerError> {
        let mut c = self.ops.conn().await?;
        let mut inv = self.fetch.prepare_invoke();
        inv.key(UNACKED_INDEX).key(UNACKED);
        for k in keys {
            inv.key(k);
        }
        inv.arg(format!("{:.6}", unix_now())).arg(max);
        let r: Result<FetchReply, _> = inv.invoke_async(&mut c).await;
        Ok(self
            .ops
            .note(r)
            .await?
            .into_iter()
            .map(|(list, raw, reg, tag)| {
                // Registered tags are ASCII (the script's check): exact as a String.
                Fetched::new(list, raw, (reg == "1").then(|| utf8(tag)))
            })
            .collect())
    }

    /// Waits up to `timeout` for one message (`BRPOP … 1`, as kombu does). The caller registers it.
    pub async fn brpop(
        &self,
        keys: &[String],
        timeout: Duration,
    ) -> Result<Option<Fetched>, BrokerError> {
        let mut c = self.blocking.conn().await?;
        let r: Result<Option<(Vec<u8>, Vec<u8>)>, _> = redis::cmd("BRPOP")
            .arg(keys)
            .arg(timeout.as_secs_f64())
            .query_async(&mut c)
            .await;
        Ok(self
            .blocking
            .note(r)
            .await?
            .map(|(k, v)| Fetched::new(k, v, None)))
    }

    /// kombu's registration: `MULTI; ZADD unacked_index; HSET unacked; EXEC`.
    pub async fn register(
        &self,
        tag: &str,
        raw: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        let value = format!(
            "[{raw}, {}, {}]",
            serde_json::Value::from(exchange),
            serde_json::Value::from(routing_key)
        );
        let mut c = self.ops.conn().await?;
        let r: Result<(), _> = redis::pipe()
            .atomic()
            .zadd(UNACKED_INDEX, tag, unix_now())
            .ignore()
            .hset(UNACKED, tag, value)
            .ignore()
            .query_async(&mut c)
            .await;
        Ok(self.ops.note(r).await?)
    }

    /// Acks, re-publishes and dead-letters in one atomic step: a retry's new message and the ack
    /// of the old one land together or not at all.
    pub async fn settle(&self, s: &Settlement) -> Result<(), BrokerError> {
        finish(&self.ops, &[], s, Duration::from_secs(1))
            .await
            .map(|_| ())
    }

    /// A live worker keeps its held messages fresh, so no sweep takes them while they run or
    /// wait for their ETA (Python workers do not, and duplicate tasks longer than the timeout).
    pub async fn refresh(&self, tags: &[String]) -> Result<(), BrokerError> {
        if tags.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(UNACKED_INDEX).arg("XX");
        for t in tags {
            cmd.arg(now).arg(t);
        }
        let mut c = self.ops.conn().await?;
        let r: Result<i64, _> = cmd.query_async(&mut c).await;
        self.ops.note(r).await?;
        Ok(())
    }

    /// Puts one message back on its queue, marked redelivered, with its delivery tag kept.
    /// Returns whether it was restored (false: already acked or restored by someone else).
    pub async fn restore_tag(&self, tag: &str) -> Result<bool, BrokerError> {
        self.restore_raw_tag(tag.as_bytes()).await
    }

    /// `restore_tag` for a tag as Redis holds it. An entry whose tag or message is not UTF-8
    /// cannot be a message to put back: it goes to the dead letters, removed by its exact bytes.
    async fn restore_raw_tag(&self, raw_tag: &[u8]) -> Result<bool, BrokerError> {
        let mut c = self.ops.conn().await?;
        for _ in 0..3 {
            let cur: Result<Option<Vec<u8>>, _> = redis::cmd("HGET")
                .arg(UNACKED)
                .arg(raw_tag)
                .query_async(&mut c)
                .await;
            let cur = match self.ops.note(cur).await? {
                None => None,
                Some(bytes) => match (std::str::from_utf8(raw_tag), String::from_utf8(bytes)) {
                    (Ok(_), Ok(text)) => Some(text),
                    (_, text) => {
                        let text = match text {
                            Ok(t) => t,
                            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                        };
                        let shown = String::from_utf8_lossy(raw_tag);
                        tracing::error!(
                            delivery_tag = %shown,
                            "unacked entry is not UTF-8; moved to {DEAD_LETTER}"
                        );
                        let dead =
                            self.dead_letters
                                .record("unacked entry is not UTF-8", "", &text);
                        let r: Result<(), _> = redis::pipe()
                            .atomic()
                            .lpush(DEAD_LETTER, dead)
                            .ignore()
                            .ltrim(DEAD_LETTER, 0, self.dead_letters.max_entries as isize - 1)
                            .ignore()
                            .zrem(UNACKED_INDEX, raw_tag)
                            .ignore()
                            .hdel(UNACKED, raw_tag)
                            .ignore()
                            .query_async(&mut c)
                            .await;
                        self.ops.note(r).await?;
                        return Ok(false);
                    }
                },
            };
            let tag = String::from_utf8_lossy(raw_tag);
            let tag = tag.as_ref();
            let Some(cur) = cur else {
                // An index entry without its message: drop it, as kombu does.
                let r: Result<i64, _> = redis::cmd("ZREM")
                    .arg(UNACKED_INDEX)
                    .arg(raw_tag)
                    .query_async(&mut c)
                    .await;
                self.ops.note(r).await?;
                return Ok(false);
            };
            let (env, list) = match restored_envelope(&cur) {
                Ok((env, rk, pri)) if !rk.is_empty() => (env, queue_key(&rk, pri)),
                Ok(_) | Err(_) => {
                    // Nothing to put back where it belongs: keep it, with the reason.
                    tracing::error!(
                        delivery_tag = tag,
                        "unacked entry cannot be restored; moved to {DEAD_LETTER}"
                    );
                    let dead = self
                        .dead_letters
                        .record("unrestorable unacked entry", "", &cur);
                    self.settle(&Settlement {
                        acks: vec![tag.to_string()],
                        dead: vec![dead],
                        dead_max: self.dead_letters.max_entries,
                        ..Default::default()
                    })
                    .await?;
                    return Ok(false);
                }
            };
            let r: Result<i64, _> = self
                .restore
                .key(UNACKED)
                .key(UNACKED_INDEX)
                .key(&list)
                .arg(tag)
                .arg(&cur)
                .arg(&env)
                .invoke_async(&mut c)
                .await;
            match self.ops.note(r).await? {
                1 => return Ok(true),
                0 => return Ok(false),
                _ => continue, // changed under us: read again
            }
        }
        Ok(false)
    }

    /// kombu's `restore_visible`: under `unacked_mutex`, every message taken longer ago than the
    /// visibility timeout goes back, newest first so the oldest is consumed first.
    /// Returns None when another worker holds the mutex.
    pub async fn restore_stale(
        &self,
        visibility: Duration,
        skip: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Option<usize>, BrokerError> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut c = self.ops.conn().await?;
        let got: Result<Option<String>, _> = redis::cmd("SET")
            .arg(UNACKED_MUTEX)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(UNACKED_MUTEX_MS)
            .query_async(&mut c)
            .await;
        match self.ops.note(got).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e) => {
                // The SET may have landed with its reply lost: free what may be ours.
                self.release_mutex(&token).await;
                return Err(e.into());
            }
        }
        let result = self.restore_stale_locked(visibility, skip).await;
        self.release_mutex(&token).await;
        result.map(Some)
    }

    /// Frees the restore mutex if it is still ours. A sweep that failed because Redis went away
    /// broke the connection it held; unlocking on that one fails too, and the mutex would then
    /// stop every worker's sweeps for its whole lifetime (5 minutes: the messages of a worker
    /// that died meanwhile stay stranded that long). So the unlock gets a fresh connection and
    /// a few tries; only a Redis that stays away longer leaves the mutex to its expiry.
    async fn release_mutex(&self, token: &str) {
        for attempt in 0..MUTEX_RELEASE_TRIES {
            if attempt > 0 {
                tokio::time::sleep(MUTEX_RELEASE_PAUSE).await;
            }
            let Ok(mut c) = self.ops.conn().await else {
                continue;
            };
            let r: Result<i64, _> = self
                .unlock
                .key(UNACKED_MUTEX)
                .arg(token)
                .invoke_async(&mut c)
                .await;
            if self.ops.note(r).await.is_ok() {
                return;
            }
        }
        tracing::warn!(
            "cannot release {UNACKED_MUTEX}; restore sweeps wait for it to expire ({} s)",
            UNACKED_MUTEX_MS / 1000
        );
    }

    async fn restore_stale_locked(
        &self,
        visibility: Duration,
        skip: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<usize, BrokerError> {
        let ceil = unix_now() - visibility.as_secs_f64();
        let mut restored = 0;
        let mut offset = 0;
        loop {
            let mut c = self.ops.conn().await?;
            // Bytes: a tag another client registered need not be UTF-8, and one such tag must
            // not stop every later sweep.
            let r: Result<Vec<Vec<u8>>, _> = redis::cmd("ZRANGE")
                .arg(UNACKED_INDEX)
                .arg(ceil)
                .arg(0)
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(offset)
                .arg(RESTORE_PAGE)
                .query_async(&mut c)
                .await;
            let tags = self.ops.note(r).await?;
            if tags.is_empty() {
                return Ok(restored);
            }
            let page = tags.len() as isize;
            for tag in &tags {
                // Our own held messages are refreshed, but a refresh may lag a short timeout.
                if std::str::from_utf8(tag).is_ok_and(skip) {
                    offset += 1;
                    continue;
                }
                if self.restore_raw_tag(tag).await? {
                    restored += 1;
                }
            }
            if page < RESTORE_PAGE {
                return Ok(restored);
            }
        }
    }
}

/// The result backend: `celery-task-meta-<id>` keys and channels.
pub struct Backend {
    pub conn: RedisConn,
    pub expires: Duration,
}

pub fn meta_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

impl Backend {
    pub fn open(url: &str, expires: Duration) -> Result<Self, BrokerError> {
        Ok(Backend {
            conn: RedisConn::open(url, Duration::from_secs(10))?,
            expires,
        })
    }

    /// Stores and publishes a batch of (task id, meta JSON); returns how many were written
    /// (the rest already held a SUCCESS).
    pub async fn store(&self, items: &[(String, String)]) -> Result<usize, BrokerError> {
        finish(&self.conn, items, &Settlement::default(), self.expires).await
    }

    /// Results and their acks in one round trip, for a backend on the broker's own Redis.
    pub async fn store_and_settle(
        &self,
        items: &[(String, String)],
        s: &Settlement,
    ) -> Result<usize, BrokerError> {
        finish(&self.conn, items, s, self.expires).await
    }

    /// The stored state of a task, if any.
    pub async fn status(&self, task_id: &str) -> Result<Option<String>, BrokerError> {
        let mut c = self.conn.conn().await?;
        let r: Result<Option<String>, _> = redis::cmd("GET")
            .arg(meta_key(task_id))
            .query_async(&mut c)
            .await;
        Ok(self.conn.note(r).await?.and_then(|s| {
            serde_json::from_str::<serde_json::Value>(&s)
                .ok()
                .and_then(|v| v.get("status")?.as_str().map(str::to_string))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_records_are_cut_on_a_character_boundary_and_say_so() {
        use serde_json::Value;
        let d = DeadLetters {
            max_entries: 3,
            max_entry_bytes: 256,
        };
        let small: Value = serde_json::from_str(&d.record("why", "q", "short")).unwrap();
        assert_eq!(small["raw"], "short");
        assert!(small.get("truncated").is_none());
        let raw = "é".repeat(300); // 600 bytes, 2 per character
        let big: Value = serde_json::from_str(&d.record("why", "q", &raw)).unwrap();
        assert_eq!(big["raw"].as_str().unwrap().len(), 256);
        assert_eq!(
            (big["raw_bytes"].as_u64(), big["truncated"].as_bool()),
            (Some(600), Some(true))
        );
        assert_eq!(big["reason"], "why");
        let odd = DeadLetters {
            max_entry_bytes: 257,
            ..d
        };
        let big: Value = serde_json::from_str(&odd.record("why", "q", &raw)).unwrap();
        assert_eq!(
            big["raw"].as_str().unwrap().len(),
            256,
            "cut back to a boundary"
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://u:pw@h/0"), "redis://u:***@h/0");
        assert_eq!(redact_url("redis://h:6379/1"), "redis://h:6379/1");
    }
}
