//! One logical Redis connection that remakes itself after a failure, its error, and URL
//! redaction: shared by the broker, the result backend, Django's cache and the build lock.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Mutex;

/// The longest a connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A Redis connection's own failure; the broker, the cache and the lock each wrap it in an error
/// of their own meaning.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bad redis URL {url}: {reason}")]
    Url { url: String, reason: String },
}

/// `redis://:secret@host/0` → `redis://:***@host/0`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let cred = &url[s + 3..at];
            let user = cred.split(':').next().unwrap_or("");
            if cred.contains(':') {
                format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
            } else {
                format!("{}***{}", &url[..s + 3], &url[at..])
            }
        }
        _ => url.to_string(),
    }
}

/// One logical Redis connection that remakes itself after a failure. Cloning the inner
/// multiplexed connection is cheap, so concurrent callers share one socket.
pub struct RedisConn {
    client: redis::Client,
    config: AsyncConnectionConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl RedisConn {
    /// `reply_timeout` bounds every reply; a blocking connection needs more than its BRPOP timeout.
    pub fn open(url: &str, reply_timeout: Duration) -> Result<Self, ConnError> {
        let client = redis::Client::open(url).map_err(|e| ConnError::Url {
            url: redact_url(url),
            reason: e.to_string(),
        })?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(reply_timeout));
        Ok(RedisConn {
            client,
            config,
            conn: Mutex::new(None),
        })
    }

    pub async fn conn(&self) -> Result<MultiplexedConnection, ConnError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Records the outcome of a call; a broken connection is dropped so the next call remakes it.
    pub async fn note<T>(&self, r: Result<T, redis::RedisError>) -> Result<T, ConnError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                {
                    *self.conn.lock().await = None;
                }
                Err(e.into())
            }
        }
    }

    pub async fn ping(&self) -> Result<(), ConnError> {
        let mut c = self.conn().await?;
        let r: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
        self.note(r).await.map(|_| ())
    }
}
