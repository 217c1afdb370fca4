//! The outbound-URL policy: URLs that come from users' data (push endpoints, recording URLs, and
//! every redirect they lead to) never reach loopback, link-local or private addresses, so a
//! stored URL cannot make the worker probe or post into the network it runs in (SSRF).
//!
//! Three holes, three checks: a literal IP in the URL (checked before the request and on every
//! redirect hop), a name that resolves to a private address (a resolver that drops such
//! addresses, so the check and the connection use the same lookup: no DNS-rebinding window),
//! and redirects (each hop's URL is checked again). `ORBIT_ALLOW_PRIVATE_URLS=true` lifts the
//! policy: loopback test servers, or a deployment whose push service is internal.
//!
//! The operator's own endpoints (the OpenAI base URL, SMTP, Redis, Postgres) are configuration,
//! not data, and use the ordinary client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Redirect hops followed: as many as browsers' common minimum, and each is checked.
const MAX_REDIRECTS: usize = 5;

/// Connecting to a push service or a recording host: past this it is down, not slow.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OutboundError {
    #[error("{0:?} is not an http(s) URL")]
    Scheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error(
        "{host} is a loopback, link-local or private address; outbound URLs from user data may \
         not reach the worker's own network (ORBIT_ALLOW_PRIVATE_URLS=true allows it)"
    )]
    Private { host: String },
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

/// Whether `ip` is an address on the public internet. Refused: unspecified, loopback, private
/// (RFC 1918, IPv6 unique-local), link-local (cloud metadata at 169.254.169.254 included),
/// carrier-grade NAT, benchmarking, documentation, multicast, broadcast and reserved ranges, and
/// IPv6 forms that embed one of those IPv4 addresses (mapped, compatible, NAT64, 6to4).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network"
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 169 && b == 254) // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 192 && b == 168)
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
        || (s[0] & 0xff00) == 0xff00 // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only
}

/// The IPv4 address an IPv6 address stands for, where it stands for one: mapped
/// (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`), 6to4
/// (`2002:aabb:ccdd::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || (s[5] == 0 && s[6] != 0)) {
        return Some(tail());
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail());
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The policy's check of one URL: http(s), a host, and no literal non-public address. A name is
/// checked when it resolves (`PublicResolver`), so `localhost` and names pointing inside are
/// refused there.
pub fn check_url(url: &reqwest::Url, allow_private: bool) -> Result<(), OutboundError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OutboundError::Scheme(url.scheme().into()));
    }
    let host = url
        .host()
        .ok_or_else(|| OutboundError::NoHost(url.as_str().into()))?;
    if allow_private {
        return Ok(());
    }
    let ip = match host {
        url::Host::Ipv4(ip) => IpAddr::V4(ip),
        url::Host::Ipv6(ip) => IpAddr::V6(ip),
        url::Host::Domain(_) => return Ok(()),
    };
    if is_public(ip) {
        Ok(())
    } else {
        Err(OutboundError::Private {
            host: ip.to_string(),
        })
    }
}

/// A resolver that keeps only public addresses, and fails a name that has none: the connection
/// then goes to an address this policy saw.
#[derive(Debug, Default)]
struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(OutboundError::Private { host }) as _);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The client for URLs from user data: the policy on every name and every redirect hop, unless
/// `allow_private`.
pub fn client(allow_private: bool) -> reqwest::Result<reqwest::Client> {
    let b = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(redirect_policy(allow_private));
    if allow_private {
        b.build()
    } else {
        b.dns_resolver(Arc::new(PublicResolver)).build()
    }
}

/// Every hop checked like the first URL, and at most `MAX_REDIRECTS` of them.
fn redirect_policy(allow_private: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(OutboundError::TooManyRedirects);
        }
        match check_url(attempt.url(), allow_private) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

/// The policy's refusal inside a failed request (a name with only private addresses, a redirect
/// hop), where there is one: a refusal is final, not a network error to retry.
pub fn refusal(e: &reqwest::Error) -> Option<OutboundError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(o) = err.downcast_ref::<OutboundError>() {
            return Some(o.clone());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_table() {
        let table: &[(&str, bool)] = &[
            ("8.8.8.8", true),
            ("1.1.1.1", true),
            ("93.184.216.34", true),
            ("172.32.0.1", true),
            ("100.128.0.1", true),
            ("0.0.0.0", false),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("100.64.0.1", false),
            ("192.0.2.1", false),
            ("198.18.0.1", false),
            ("224.0.0.1", false),
            ("255.255.255.255", false),
            ("2606:4700:4700::1111", true),
            ("::", false),
            ("::1", false),
            ("fc00::1", false),
            ("fd12:3456::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("2001:db8::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("::127.0.0.1", false),
            ("64:ff9b::a9fe:a9fe", false),
            ("64:ff9b::808:808", true),
            ("2002:7f00:1::", false),
            ("2002:808:808::", true),
        ];
        for (ip, public) in table {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(is_public(parsed), *public, "{ip}");
        }
    }

    #[test]
    fn urls_table() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(check_url(&u("https://fcm.googleapis.com/fcm/send/x"), false).is_ok());
        assert!(check_url(&u("https://8.8.8.8/a"), false).is_ok());
        for bad in [
            "http://127.0.0.1:8080/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:10.0.0.1]/",
            "http://2130706433/", // 127.0.0.1 as one number: the URL parser normalises it
            "http://0x7f.1/",
        ] {
            assert!(
                matches!(
                    check_url(&u(bad), false),
                    Err(OutboundError::Private { .. })
                ),
                "{bad}"
            );
            assert!(
                check_url(&u(bad), true).is_ok(),
                "{bad} with the policy lifted"
            );
        }
        assert_eq!(
            check_url(&u("file:///etc/passwd"), true),
            Err(OutboundError::Scheme("file".into()))
        );
    }

    #[tokio::test]
    async fn a_name_that_resolves_inside_is_refused_and_says_why() {
        let c = client(false).unwrap();
        let e = c.get("http://localhost:9/x").send().await.unwrap_err();
        assert!(
            matches!(refusal(&e), Some(OutboundError::Private { ref host }) if host == "localhost"),
            "{e:?}"
        );
    }

    /// A start that redirects to the metadata address: the hop is refused. The start is a
    /// loopback server (tests have nothing else), so this client has the strict client's
    /// redirect policy and the ordinary resolver.
    #[tokio::test]
    async fn a_redirect_to_loopback_is_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest\r\n\
                          Content-Length: 0\r\n\r\n",
                    )
                    .await;
            }
        });
        let c = reqwest::Client::builder()
            .redirect(redirect_policy(false))
            .build()
            .unwrap();
        let e = c
            .get(format!("http://localhost:{port}/start"))
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(refusal(&e), Some(OutboundError::Private { ref host }) if host == "169.254.169.254"),
            "{e:?}"
        );
    }
}
