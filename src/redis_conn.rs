//! One logical Redis connection that remakes itself after a failure, its error, and URL
//! redaction: shared by the broker, the result backend, Django's cache and the build lock. The
//! server is named by a `redis://`, `rediss://` or `unix://` URL, or found through Redis Sentinel
//! (`sentinel://`, as kombu spells it), asked again on every reconnect so a failover is followed.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Mutex;

/// The longest a connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest asking the sentinels for the master may take: each sentinel gets a connect, and
/// the master it names a `ROLE` check, so a few connects' worth.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(10);
/// Kombu's default port for a `sentinel://` URL without one (Sentinel's own port).
const SENTINEL_PORT: u16 = 26379;

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
    // A sentinel URL lists one URL per sentinel, joined by `;`.
    url.split(';').map(redact_one).collect::<Vec<_>>().join(";")
}

fn redact_one(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                // `password`, and `sentinel_password` with it.
                Some((k, _)) if k.to_ascii_lowercase().ends_with("password") => {
                    format!("{k}=***")
                }
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

/// A `sentinel://` URL as kombu reads it: `sentinel://[user:password@]host[:port][/db]`, one per
/// sentinel, joined by `;`. The user, password and db of the first are the master's (kombu gives
/// the master the first URL's credentials). The master's name is not in kombu's URL but in the
/// transport option `master_name`; the configuration puts it here as `?master_name=`, which a URL
/// may also carry itself, with `?sentinel_password=` for sentinels that ask for one (kombu's
/// `sentinel_kwargs`).
#[derive(Debug, PartialEq)]
struct SentinelUrl {
    sentinels: Vec<(String, u16)>,
    master_name: String,
    db: i64,
    username: Option<String>,
    password: Option<String>,
    sentinel_password: Option<String>,
}

/// Whether `url` names its server through Redis Sentinel.
pub fn is_sentinel_url(url: &str) -> bool {
    url.get(..11)
        .is_some_and(|s| s.eq_ignore_ascii_case("sentinel://"))
}

fn sentinel_url(url: &str) -> Result<Option<SentinelUrl>, String> {
    use redis::IntoConnectionInfo;
    if !is_sentinel_url(url) {
        return Ok(None);
    }
    let mut out = SentinelUrl {
        sentinels: Vec::new(),
        master_name: String::new(),
        db: 0,
        username: None,
        password: None,
        sentinel_password: None,
    };
    for (i, part) in url.split(';').map(str::trim).enumerate() {
        if !is_sentinel_url(part) {
            return Err(format!(
                "entry {} is not a sentinel:// URL; every sentinel is written sentinel://host:port",
                i + 1
            ));
        }
        if let Some(name) = query_param(part, "master_name") {
            out.master_name = name;
        }
        if let Some(pw) = query_param(part, "sentinel_password") {
            out.sentinel_password = Some(pw);
        }
        let base = part[11..].split(['?', '#']).next().unwrap_or("");
        let host_port = base.rsplit('@').next().unwrap_or(base);
        let host_port = host_port.split('/').next().unwrap_or("");
        // `[::1]:26379` has a port, `[::1]` has none.
        let has_port = host_port.rsplit(']').next().unwrap_or("").contains(':');
        let with_port = if has_port {
            format!("redis://{base}")
        } else {
            // No port: kombu's default for sentinels, not Redis's 6379.
            let (userinfo, rest) = match base.rsplit_once('@') {
                Some((u, r)) => (format!("{u}@"), r),
                None => (String::new(), base),
            };
            let (hp, path) = match rest.split_once('/') {
                Some((h, p)) => (h, format!("/{p}")),
                None => (rest, String::new()),
            };
            format!("redis://{userinfo}{hp}:{SENTINEL_PORT}{path}")
        };
        let info = with_port
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("entry {}: {e}", i + 1))?;
        let redis::ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
            return Err(format!("entry {}: a sentinel is a host and a port", i + 1));
        };
        if i == 0 {
            let r = info.redis_settings();
            out.db = r.db();
            out.username = r.username().map(str::to_string);
            out.password = r.password().map(str::to_string);
        }
        out.sentinels.push((host, port));
    }
    if out.master_name.is_empty() {
        return Err(
            "a sentinel:// URL needs the master's name (the master_name transport option)".into(),
        );
    }
    Ok(Some(out))
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
    target: Target,
    /// The database number the URL selects (kombu's fanout channels are named by it).
    db: i64,
    config: AsyncConnectionConfig,
    conn: Mutex<Option<MultiplexedConnection>>,
}

/// Where a connection goes.
enum Target {
    Server(redis::Client),
    /// Whichever server the sentinels name master now: asked on every (re)connect.
    Sentinel(Mutex<redis::sentinel::SentinelClient>),
}

impl Target {
    fn sentinel(s: SentinelUrl) -> Result<Target, redis::RedisError> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let addrs = s
            .sentinels
            .into_iter()
            .map(|(host, port)| redis::ConnectionAddr::Tcp(host, port));
        let mut b = SentinelClientBuilder::new(addrs, s.master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(s.db);
        if let Some(u) = s.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = s.password {
            b = b.set_client_to_redis_password(p);
        }
        if let Some(p) = s.sentinel_password {
            b = b.set_client_to_sentinel_password(p);
        }
        Ok(Target::Sentinel(Mutex::new(b.build()?)))
    }

    async fn client(&self) -> Result<redis::Client, redis::RedisError> {
        match self {
            Target::Server(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                let mut s = s.lock().await;
                match tokio::time::timeout(SENTINEL_TIMEOUT, s.async_get_client()).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no sentinel named a master in time",
                    )
                    .into()),
                }
            }
        }
    }
}

impl RedisConn {
    /// `reply_timeout` bounds every reply; a blocking connection needs more than its BRPOP timeout.
    pub fn open(url: &str, reply_timeout: Duration) -> Result<Self, ConnError> {
        use redis::IntoConnectionInfo;
        let bad = |e: redis::RedisError| ConnError::Url {
            url: redact_url(url),
            reason: e.to_string(),
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(reply_timeout));
        let sentinel = sentinel_url(url).map_err(|reason| ConnError::Url {
            url: redact_url(url),
            reason,
        })?;
        if let Some(s) = sentinel {
            return Ok(RedisConn {
                db: s.db,
                target: Target::sentinel(s).map_err(bad)?,
                config,
                conn: Mutex::new(None),
            });
        }
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
        Ok(RedisConn {
            db: client.get_connection_info().redis_settings().db(),
            target: Target::Server(client),
            config,
            conn: Mutex::new(None),
        })
    }

    /// A connection of its own for SUBSCRIBE (a subscribed connection carries nothing else),
    /// to the server the URL names or the sentinels name now.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, ConnError> {
        Ok(self.target.client().await?.get_async_pubsub().await?)
    }

    pub fn db(&self) -> i64 {
        self.db
    }

    pub async fn conn(&self) -> Result<MultiplexedConnection, ConnError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .target
            .client()
            .await?
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
                    // A demoted master: Sentinel closes its clients' connections when it fails
                    // over, but a demotion without that (a manual REPLICAOF) leaves them open,
                    // blocked BRPOPs ending UNBLOCKED and writes READONLY. Reconnecting asks the
                    // sentinels for the new master.
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                    || e.code() == Some("UNBLOCKED")
                {
                    *self.conn.lock().await = None;
                }
                Err(e.into())
            }
        }
    }

    /// Runs one command, with the outcome noted (a broken connection is remade next time).
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ConnError> {
        let mut c = self.conn().await?;
        let r = cmd.query_async(&mut c).await;
        self.note(r).await
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
    fn sentinel_urls_are_read_as_kombu_spells_them() {
        let s = sentinel_url(
            "sentinel://:pw@s1:26380/3?master_name=mymaster;sentinel://s2;SENTINEL://[::1]:7",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s,
            SentinelUrl {
                sentinels: vec![
                    ("s1".into(), 26380),
                    ("s2".into(), SENTINEL_PORT),
                    ("::1".into(), 7)
                ],
                master_name: "mymaster".into(),
                db: 3,
                username: None,
                password: Some("pw".into()),
                sentinel_password: None,
            }
        );
        let s = sentinel_url("sentinel://u:p@h/1?master_name=m%20x&sentinel_password=sp")
            .unwrap()
            .unwrap();
        assert_eq!(s.sentinels, vec![("h".into(), SENTINEL_PORT)]);
        assert_eq!(
            (s.master_name.as_str(), s.db, s.username.as_deref()),
            ("m x", 1, Some("u"))
        );
        assert_eq!(s.sentinel_password.as_deref(), Some("sp"));
        assert_eq!(sentinel_url("redis://h/0").unwrap(), None);
        for bad in [
            "sentinel://h:26379",
            "sentinel://h:26379?master_name=m;redis://h2",
            "sentinel://h:notaport?master_name=m",
            "sentinel:///?master_name=m",
        ] {
            assert!(sentinel_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            redact_url("sentinel://:pw@s1:1/0;sentinel://u:pw2@s2:2/0?master_name=m&password=x"),
            "sentinel://:***@s1:1/0;sentinel://u:***@s2:2/0?master_name=m&password=***"
        );
        assert_eq!(
            redact_url("sentinel://h?master_name=m&Sentinel_Password=sp"),
            "sentinel://h?master_name=m&Sentinel_Password=***"
        );
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
