//! SSRF guard for URLs Capibara calls out to (job callbacks, subscriptions, connectors).
//!
//! The API checks a URL when it is submitted ([`parse_url`], and optionally [`resolve`]); the
//! worker checks again at send time with [`resolve`] and then connects only to the addresses it
//! returned (pinning them), so a DNS answer that changes between the check and the connect
//! (DNS rebinding) cannot steer a request to a private address.
//!
//! `CAPIBARA_OUTBOUND_ALLOW_PRIVATE` turns the address check off (`capibara dev`, tests).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// How long [`resolve`] waits for the system resolver.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an outbound URL was refused. The messages fit a 422 problem's `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error("{}", forbidden_message(.host, .ip))]
    Forbidden { host: String, ip: IpAddr },
    #[error("URL host could not be resolved: {0}")]
    Resolve(String),
}

fn forbidden_message(host: &str, ip: &IpAddr) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        format!("URL host {host} is not a public address")
    } else {
        format!("URL host {host} resolves to {ip}, which is not a public address")
    }
}

/// Parse an outbound URL: `http`/`https` only, a host, no user info, at most 2048 characters.
pub fn parse_url(s: &str) -> Result<url::Url, OutboundError> {
    if s.len() > MAX_URL_LEN {
        return Err(OutboundError::InvalidUrl(format!(
            "URL is longer than {MAX_URL_LEN} characters"
        )));
    }
    let url = url::Url::parse(s)
        .map_err(|e| OutboundError::InvalidUrl(format!("URL is not valid: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OutboundError::InvalidUrl(format!(
            "URL scheme must be http or https, not {:?}",
            url.scheme()
        )));
    }
    match url.host_str() {
        None | Some("") => {
            return Err(OutboundError::InvalidUrl("URL must have a host".into()));
        }
        Some(_) => {}
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(OutboundError::InvalidUrl(
            "URL must not contain a user name or password".into(),
        ));
    }
    Ok(url)
}

/// Whether `ip` is a public unicast address (one an outbound request may reach).
///
/// Refused: unspecified/"this network" (0.0.0.0/8, `::`), loopback (127/8, `::1`), private
/// (10/8, 172.16/12, 192.168/16, `fc00::/7`), CGNAT (100.64/10), link-local (169.254/16 — the
/// cloud metadata address 169.254.169.254 included — and `fe80::/10`), IETF protocol
/// assignments (192.0.0/24), documentation (192.0.2/24, 198.51.100/24, 203.0.113/24,
/// `2001:db8::/32`), benchmarking (198.18/15), reserved (240/4) and broadcast, multicast
/// (224/4, `ff00::/8`), deprecated site-local `fec0::/10`, discard-only `100::/64`, Teredo
/// `2001::/32`, local-use NAT64 `64:ff9b:1::/48`; and IPv6 addresses that embed an IPv4
/// address — mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and 6to4
/// `2002:aabb:ccdd::` — whenever the embedded address is refused.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    const BLOCKED: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),       // "this network", unspecified
        ([10, 0, 0, 0], 8),      // private
        ([100, 64, 0, 0], 10),   // carrier-grade NAT
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local, cloud metadata
        ([172, 16, 0, 0], 12),   // private
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // TEST-NET-1
        ([192, 168, 0, 0], 16),  // private
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // TEST-NET-2
        ([203, 0, 113, 0], 24),  // TEST-NET-3
        ([224, 0, 0, 0], 4),     // multicast
        ([240, 0, 0, 0], 4),     // reserved, and 255.255.255.255 broadcast
    ];
    !BLOCKED.iter().any(|&(net, prefix)| in_v4(ip, net, prefix))
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    let seg = ip.segments();
    // IPv4-mapped ::ffff:a.b.c.d
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    // IPv4-compatible ::a.b.c.d (deprecated, but still routed by some stacks)
    if seg[..6] == [0, 0, 0, 0, 0, 0] {
        return is_public_v4(embedded_low_v4(ip));
    }
    // NAT64 well-known prefix 64:ff9b::/96 reaches the embedded IPv4 address.
    if in_v6(ip, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        return is_public_v4(embedded_low_v4(ip));
    }
    // 6to4 2002:aabb:ccdd::/48 tunnels to aa.bb.cc.dd.
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        );
        if !is_public_v4(v4) {
            return false;
        }
    }
    let blocked: [(Ipv6Addr, u32); 8] = [
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // unique local
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
        (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10), // site-local (deprecated)
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8), // multicast
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
        (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32), // Teredo
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64), // discard-only
        (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // local-use NAT64
    ];
    !blocked.iter().any(|&(net, prefix)| in_v6(ip, net, prefix))
}

fn embedded_low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

/// Resolve the URL's host once. With `allow_private` false, any address that is not public
/// makes the whole URL `Forbidden` (a name with one public and one private address is refused).
/// Returns the socket addresses (with the URL's port) to pin the connection to.
pub async fn resolve(
    url: &url::Url,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, OutboundError> {
    let port = url
        .port_or_known_default()
        .ok_or_else(|| OutboundError::InvalidUrl("URL has no port".into()))?;
    let host = url
        .host()
        .ok_or_else(|| OutboundError::InvalidUrl("URL must have a host".into()))?;
    let addrs: Vec<SocketAddr> = match host {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        url::Host::Domain(name) => {
            let lookup = tokio::net::lookup_host((name, port));
            let found = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
                .await
                .map_err(|_| OutboundError::Resolve(format!("{name}: timed out")))?
                .map_err(|e| OutboundError::Resolve(format!("{name}: {e}")))?;
            let mut out: Vec<SocketAddr> = Vec::new();
            for a in found {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            if out.is_empty() {
                return Err(OutboundError::Resolve(format!("{name}: no addresses")));
            }
            out
        }
    };
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(OutboundError::Forbidden {
                host: url.host_str().unwrap_or_default().to_string(),
                ip: bad.ip(),
            });
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refused_ranges() {
        for s in [
            // IPv4
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.0.1",
            "169.254.169.254",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.200",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            // IPv6
            "::",
            "::1",
            "fc00::1",
            "fd12:3456:789a::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "2001:db8::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
            "64:ff9b:1::1",
            // IPv4-mapped / compatible / NAT64 / 6to4 embeddings of refused IPv4
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::ffff:192.168.1.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
        ] {
            assert!(!is_public(ip(s)), "{s} must not be public");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "192.167.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(s)), "{s} must be public");
        }
    }

    #[test]
    fn parse_url_rules() {
        assert!(parse_url("https://example.com/hook?x=1").is_ok());
        assert!(parse_url("http://127.0.0.1:8080/").is_ok());
        assert!(parse_url("http://[::1]:8080/").is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://example.com/",
            "javascript:alert(1)",
            "example.com/hook",
            "http://",
            "https://user:pass@example.com/",
            "https://user@example.com/",
            "https://:pw@example.com/",
            "",
        ] {
            assert!(
                matches!(parse_url(bad), Err(OutboundError::InvalidUrl(_))),
                "{bad:?} must be refused"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(
            parse_url(&long),
            Err(OutboundError::InvalidUrl(_))
        ));
        let just_fits = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN - 20));
        assert_eq!(just_fits.len(), MAX_URL_LEN);
        assert!(parse_url(&just_fits).is_ok());
    }

    #[tokio::test]
    async fn resolve_literals_and_localhost() {
        // Obfuscated IPv4 forms are normalised by the URL parser and still caught.
        for s in [
            "http://127.0.0.1:9/",
            "http://0x7f.1:9/",
            "http://2130706433:9/",
            "http://[::ffff:127.0.0.1]:9/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
        ] {
            let url = parse_url(s).unwrap();
            let err = resolve(&url, false).await.unwrap_err();
            assert!(
                matches!(err, OutboundError::Forbidden { .. }),
                "{s}: {err:?}"
            );
            assert!(resolve(&url, true).await.is_ok(), "{s}");
        }

        let url = parse_url("http://localhost:1/").unwrap();
        match resolve(&url, false).await {
            Err(OutboundError::Forbidden { host, ip }) => {
                assert_eq!(host, "localhost");
                assert!(ip.is_loopback(), "{ip}");
            }
            other => panic!("localhost must be forbidden: {other:?}"),
        }
        let addrs = resolve(&url, true).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.port() == 1 && a.ip().is_loopback()));

        let url = parse_url("https://8.8.8.8/").unwrap();
        assert_eq!(
            resolve(&url, false).await.unwrap(),
            vec!["8.8.8.8:443".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn error_messages() {
        let e = OutboundError::Forbidden {
            host: "internal".into(),
            ip: ip("10.0.0.1"),
        };
        assert_eq!(
            e.to_string(),
            "URL host internal resolves to 10.0.0.1, which is not a public address"
        );
        let e = OutboundError::Forbidden {
            host: "[::1]".into(),
            ip: ip("::1"),
        };
        assert_eq!(e.to_string(), "URL host [::1] is not a public address");
    }
}
