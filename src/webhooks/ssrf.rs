//! SSRF protection for webhook URLs (SPEC §7): only public addresses may be called.
//!
//! A URL is checked when an endpoint is created or changed (its host resolved now), and
//! again at every delivery: the delivery client resolves names through
//! [`GuardedResolver`], which drops every refused address, so a name that resolves to a
//! public address at create time and to `127.0.0.1` later (DNS rebinding) cannot reach
//! the inside. An IP literal in the URL never reaches a resolver, so [`check_host`]
//! checks it before each request. `EVENTRA_WEBHOOK_ALLOW_PRIVATE=1` lifts all of this
//! (development and tests).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Why a destination is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error(
        "{0} is not a public address (loopback, private, link-local, CGNAT, metadata and reserved ranges are refused)"
    )]
    Private(IpAddr),
    #[error("{0} does not resolve: {1}")]
    Unresolvable(String, String),
}

/// Whether `ip` is one webhooks must never call.
pub fn is_refused(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()            // 0.0.0.0
        || a == 0                  // 0/8 "this network"
        || ip.is_loopback()        // 127/8
        || ip.is_private()         // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local()      // 169.254/16, incl. 169.254.169.254 (cloud metadata)
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 CGNAT
        || (a == 192 && b == 0 && c == 0)       // 192.0.0/24 IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)       // TEST-NET-1
        || (a == 198 && (b == 18 || b == 19))   // 198.18/15 benchmarking
        || (a == 198 && b == 51 && c == 100)    // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)     // TEST-NET-3
        || ip.is_multicast()       // 224/4
        || a >= 240 // 240/4 reserved, 255.255.255.255
}

fn refused_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refused_v4(v4); // ::ffff:a.b.c.d
    }
    let s = ip.segments();
    ip.is_unspecified()                       // ::
        || ip.is_loopback()                   // ::1
        || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0) // ::a.b.c.d (deprecated IPv4-compatible)
        || (s[0] & 0xfe00) == 0xfc00          // fc00::/7 unique local
        || (s[0] & 0xffc0) == 0xfe80          // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0          // fec0::/10 site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00          // ff00::/8 multicast
        || (s[0] == 0x64 && s[1] == 0xff9b)   // 64:ff9b::/96 NAT64 (reaches IPv4 inside)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] == 0x2002)                   // 2002::/16 6to4 (embeds any IPv4)
        || (s[0] == 0x2001 && s[1] == 0)      // 2001::/32 Teredo
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // 100::/64 discard
}

/// Checks a URL host: an IP literal directly, a name by resolving it (every address
/// must be public). Bounded by `timeout`.
pub async fn check_host(host: &str, port: u16, timeout: Duration) -> Result<(), Refused> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return if is_refused(ip) { Err(Refused::Private(ip)) } else { Ok(()) };
    }
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return Err(Refused::Unresolvable(host.to_owned(), e.to_string())),
        Err(_) => return Err(Refused::Unresolvable(host.to_owned(), format!("no answer within {timeout:?}"))),
    };
    if addrs.is_empty() {
        return Err(Refused::Unresolvable(host.to_owned(), "no addresses".into()));
    }
    match addrs.iter().find(|a| is_refused(a.ip())) {
        Some(bad) => Err(Refused::Private(bad.ip())),
        None => Ok(()),
    }
}

/// The delivery client's resolver: the system's answer without refused addresses (a
/// name with only refused addresses fails to resolve).
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.iter().copied().filter(|a| !is_refused(a.ip())).collect();
            if public.is_empty() {
                let why =
                    all.first().map_or_else(|| "no addresses".to_owned(), |a| Refused::Private(a.ip()).to_string());
                return Err(format!("webhook host {host} refused: {why}").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_addresses_are_refused_and_public_ones_allowed() {
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(is_refused(bad.parse().unwrap()), "{bad} must be refused");
        }
        for good in ["93.184.216.34", "8.8.8.8", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_refused(good.parse().unwrap()), "{good} must be allowed");
        }
    }

    #[tokio::test]
    async fn hosts_are_checked_after_resolution() {
        let t = Duration::from_secs(5);
        assert_eq!(check_host("127.0.0.1", 443, t).await, Err(Refused::Private("127.0.0.1".parse().unwrap())));
        assert_eq!(check_host("[::1]", 443, t).await, Err(Refused::Private("::1".parse().unwrap())));
        assert!(matches!(check_host("localhost", 443, t).await, Err(Refused::Private(_))), "a name for loopback");
        assert!(check_host("93.184.216.34", 443, t).await.is_ok());
    }
}
