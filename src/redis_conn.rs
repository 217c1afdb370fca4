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

impl ConnError {
    /// The server's TLS refused us or we refused its certificate (an unknown CA, a name that does
    /// not match, no client certificate where one is required): configuration, which waiting
    /// never fixes, unlike a refused or dropped connection. rustls reports these as text only.
    pub fn is_tls_refusal(&self) -> bool {
        let ConnError::Redis(e) = self else {
            return false;
        };
        let text = e.to_string();
        [
            "invalid peer certificate",
            "peer sent no certificates",
            "received fatal alert",
            "InvalidCertificate",
            "UnknownIssuer",
        ]
        .iter()
        .any(|m| text.contains(m))
    }
}

/// `redis://:secret@host/0` → `redis://:***@host/0`, and `?password=secret` → `?password=***`
/// (the form redis-py and kombu also take), for logs.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// The `password` query parameter, percent-decoded (as redis-py reads it).
fn query_password(url: &str) -> Option<String> {
    query_param(url, "password")
}

/// A query parameter of the URL (name case-insensitive), percent-decoded.
fn query_param(url: &str, name: &str) -> Option<String> {
    let (_, q) = url.split_once('?')?;
    let q = q.split('#').next().unwrap_or(q);
    let v = q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        k.eq_ignore_ascii_case(name).then_some(v)
    })?;
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The TLS options of a `rediss://` URL, spelled as kombu and redis-py read them from the query:
/// `ssl_cert_reqs` (`required`, `optional`, `none`, or `CERT_REQUIRED`…), `ssl_ca_certs` (a PEM
/// file of the CAs to trust instead of the system's), `ssl_certfile` and `ssl_keyfile` (a client
/// certificate, for servers that ask for one).
#[derive(Debug, Default, PartialEq)]
struct TlsOptions {
    /// False only for `ssl_cert_reqs=none`: the server's certificate is not checked.
    verify: bool,
    ca_certs: Option<String>,
    certfile: Option<String>,
    keyfile: Option<String>,
}

fn tls_options(url: &str) -> Result<Option<TlsOptions>, String> {
    if !url
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
    {
        return Ok(None);
    }
    let reqs = query_param(url, "ssl_cert_reqs").unwrap_or_else(|| "required".into());
    // CERT_OPTIONAL on a client checks the certificate the server sends, and a TLS server always
    // sends one: the same as required.
    let verify = match reqs.to_ascii_lowercase().trim_start_matches("cert_") {
        "required" | "optional" => true,
        "none" => false,
        other => {
            return Err(format!(
                "ssl_cert_reqs={other:?}: expected required, optional or none"
            ))
        }
    };
    let o = TlsOptions {
        verify,
        ca_certs: query_param(url, "ssl_ca_certs"),
        certfile: query_param(url, "ssl_certfile"),
        keyfile: query_param(url, "ssl_keyfile"),
    };
    if o.certfile.is_some() != o.keyfile.is_some() {
        return Err("ssl_certfile and ssl_keyfile go together".into());
    }
    Ok(Some(o))
}

fn redact_userinfo(url: &str) -> String {
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
        use redis::IntoConnectionInfo;
        let bad = |e: redis::RedisError| ConnError::Url {
            url: redact_url(url),
            reason: e.to_string(),
        };
        let mut info = url.into_connection_info().map_err(bad)?;
        // `?password=` (redis-py's and kombu's other spelling) is used, not ignored into NOAUTH;
        // a password in the user part wins.
        if info.redis_settings().password().is_none() {
            if let Some(pw) = query_password(url) {
                let settings = info.redis_settings().clone().set_password(pw);
                info = info.set_redis_settings(settings);
            }
        }
        let tls = tls_options(url).map_err(|reason| ConnError::Url {
            url: redact_url(url),
            reason,
        })?;
        let client = match tls {
            None => redis::Client::open(info).map_err(bad)?,
            Some(o) => {
                if !o.verify {
                    if let redis::ConnectionAddr::TcpTls {
                        host,
                        port,
                        tls_params,
                        ..
                    } = info.addr().clone()
                    {
                        info = info.set_addr(redis::ConnectionAddr::TcpTls {
                            host,
                            port,
                            insecure: true,
                            tls_params,
                        });
                    }
                }
                let read = |what: &str, path: &str| {
                    std::fs::read(path).map_err(|e| ConnError::Url {
                        url: redact_url(url),
                        reason: format!("cannot read {what} {path}: {e}"),
                    })
                };
                let root_cert = o
                    .ca_certs
                    .as_deref()
                    .map(|p| read("ssl_ca_certs", p))
                    .transpose()?;
                let client_tls = match (&o.certfile, &o.keyfile) {
                    (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                        client_cert: read("ssl_certfile", c)?,
                        client_key: read("ssl_keyfile", k)?,
                    }),
                    _ => None,
                };
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls,
                        root_cert,
                    },
                )
                .map_err(bad)?
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_read_as_kombu_spells_them() {
        assert_eq!(tls_options("redis://h/0").unwrap(), None);
        let o = tls_options("rediss://h:6380/0").unwrap().unwrap();
        assert!(o.verify && o.ca_certs.is_none(), "verified by default");
        let o = tls_options("rediss://h/0?ssl_cert_reqs=CERT_NONE")
            .unwrap()
            .unwrap();
        assert!(!o.verify);
        let o =
            tls_options("REDISS://h/0?ssl_cert_reqs=optional&ssl_ca_certs=certs%2Fca%20test.pem")
                .unwrap()
                .unwrap();
        assert!(o.verify);
        assert_eq!(o.ca_certs.as_deref(), Some("certs/ca test.pem"));
        let o = tls_options("rediss://h/0?ssl_certfile=/c.pem&ssl_keyfile=/k.pem")
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.certfile.as_deref(), o.keyfile.as_deref()),
            (Some("/c.pem"), Some("/k.pem"))
        );
        assert!(tls_options("rediss://h/0?ssl_cert_reqs=maybe").is_err());
        assert!(tls_options("rediss://h/0?ssl_certfile=/c.pem").is_err());
    }

    #[test]
    fn query_passwords_are_read_and_never_shown() {
        let cases = [
            (
                "redis://h:6379/0?password=s3cret",
                "redis://h:6379/0?password=***",
                Some("s3cret"),
            ),
            (
                "redis://h/0?db=1&Password=a%2Fb%40c&x=1",
                "redis://h/0?db=1&Password=***&x=1",
                Some("a/b@c"),
            ),
            (
                "redis://:pw@h/0?password=q",
                "redis://:***@h/0?password=***",
                Some("q"),
            ),
            ("redis://h/0", "redis://h/0", None),
            (
                "redis://h/0?password=%zz",
                "redis://h/0?password=***",
                Some("%zz"),
            ),
        ];
        for (url, shown, pw) in cases {
            assert_eq!(redact_url(url), shown);
            assert_eq!(query_password(url).as_deref(), pw, "{url}");
        }
    }
}
