//! Which prefill targets pd-sidecar may send to when SSRF protection is on:
//! static `--prefill-allowlist` entries, and the ready pods of an
//! InferencePool (kept current by `pool::watch`). Unlike llm-d's allow-list,
//! the port always counts.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::gauge::Gauge;

use crate::config::split_host_port;

/// The host part of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    /// A DNS name, lower-cased; matches that name only.
    Name(String),
    /// An address block (a single address is a /32 or /128).
    Net(IpAddr, u8),
}

/// One `--prefill-allowlist` entry: a host, name or CIDR block, and the
/// ports it allows (all when none was given).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    host: Host,
    ports: Option<(u16, u16)>,
}

/// Static allow-list entries: `host`, `host:port`, `host:lo-hi`, `10.0.0.0/8`,
/// `10.0.0.0/8:8000`, `10.0.0.0/8:8000-8010`, IPv6 in brackets when a port
/// follows (`[fd00::/8]:8000`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<Entry>,
}

impl Allowlist {
    /// Parses the entries; empty ones are skipped, a malformed one is an
    /// error naming it.
    pub fn parse<I: IntoIterator<Item = S>, S: AsRef<str>>(entries: I) -> Result<Self, String> {
        let mut list = Allowlist::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if !entry.is_empty() {
                list.entries.push(
                    parse_entry(entry)
                        .map_err(|e| format!("--prefill-allowlist entry {entry:?}: {e}"))?,
                );
            }
        }
        Ok(list)
    }

    /// Whether `host_port` (as the routing header names it) is allowed.
    pub fn allows(&self, host_port: &str) -> bool {
        let Some((host, port)) = split_host_port(host_port) else {
            return false;
        };
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|e| {
            let host_ok = match (&e.host, ip) {
                (Host::Name(n), _) => *n == host,
                (Host::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
                (Host::Net(..), None) => false,
            };
            host_ok && e.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn parse_entry(s: &str) -> Result<Entry, String> {
    let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '['")?;
        match after {
            "" => (host, None),
            a => (
                host,
                Some(a.strip_prefix(':').ok_or("expected ':' after ']'")?),
            ),
        }
    } else if s.matches(':').count() > 1 {
        // A bare IPv6 address or block: no port (use brackets for one).
        (s, None)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    let ports = ports.map(parse_ports).transpose()?;
    let host = match host.split_once('/') {
        Some((addr, bits)) => {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("prefix length {bits:?} is not 0-{max}"))?;
            Host::Net(addr, bits)
        }
        None => match host.parse::<IpAddr>() {
            Ok(ip) => Host::Net(ip, if ip.is_ipv4() { 32 } else { 128 }),
            Err(_) => {
                if host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
                    return Err(format!("{host:?} is not a host name"));
                }
                Host::Name(host.to_ascii_lowercase())
            }
        },
    };
    Ok(Entry { host, ports })
}

fn parse_ports(p: &str) -> Result<(u16, u16), String> {
    let num = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{s:?} is not a port"))
    };
    let (lo, hi) = match p.split_once('-') {
        Some((lo, hi)) => (num(lo)?, num(hi)?),
        None => (num(p)?, num(p)?),
    };
    if lo > hi {
        return Err(format!("port range {lo}-{hi} is empty"));
    }
    Ok((lo, hi))
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    // An IPv4-mapped IPv6 target is compared as IPv4.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The endpoints of an InferencePool's ready pods: every pod IP with every
/// target port of the pool. Empty and not synced until the first lists of
/// the pool and its pods have arrived.
#[derive(Debug, Default)]
pub struct PoolEndpoints {
    state: RwLock<PoolState>,
    synced_gauge: Gauge,
    endpoints_gauge: Gauge,
}

#[derive(Debug, Default, Clone)]
struct PoolState {
    synced: bool,
    endpoints: Arc<HashSet<SocketAddr>>,
}

impl PoolEndpoints {
    /// Reporting its state in these gauges (sidecar metrics).
    pub fn with_gauges(synced: Gauge, endpoints: Gauge) -> PoolEndpoints {
        PoolEndpoints {
            state: RwLock::default(),
            synced_gauge: synced,
            endpoints_gauge: endpoints,
        }
    }

    /// Replaces the endpoint set (a full recomputation) and marks it synced;
    /// returns whether anything changed.
    pub fn set(&self, endpoints: HashSet<SocketAddr>) -> bool {
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        if s.synced && *s.endpoints == endpoints {
            return false;
        }
        s.synced = true;
        self.synced_gauge.set(1);
        self.endpoints_gauge.set(endpoints.len() as i64);
        s.endpoints = Arc::new(endpoints);
        true
    }

    /// Back to "not synced" (the pool's selector changed and its pods are
    /// being listed again): nothing of the pool is allowed meanwhile.
    pub fn unsync(&self) {
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        s.synced = false;
        s.endpoints = Arc::default();
        self.synced_gauge.set(0);
        self.endpoints_gauge.set(0);
    }

    pub fn synced(&self) -> bool {
        self.state.read().unwrap_or_else(|p| p.into_inner()).synced
    }

    fn snapshot(&self) -> Arc<HashSet<SocketAddr>> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .endpoints
            .clone()
    }
}

/// Why a prefill target was not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Not on the static list and not a ready pod of the pool.
    NotAllowed,
    /// Not on the static list, and the pool's pods have not been listed yet.
    PoolNotSynced,
}

/// The SSRF check: the static list, then the pool's ready endpoints.
#[derive(Debug, Default)]
pub struct PrefillGuard {
    pub static_list: Allowlist,
    pub pool: Option<Arc<PoolEndpoints>>,
}

impl PrefillGuard {
    pub fn check(&self, host_port: &str) -> Result<(), Denied> {
        if self.static_list.allows(host_port) {
            return Ok(());
        }
        let Some(pool) = &self.pool else {
            return Err(Denied::NotAllowed);
        };
        if !pool.synced() {
            return Err(Denied::PoolNotSynced);
        }
        let addr = split_host_port(host_port).and_then(|(h, port)| {
            let ip: IpAddr = h.trim_matches(['[', ']']).parse().ok()?;
            Some(SocketAddr::new(ip, port))
        });
        match addr {
            Some(a) if pool.snapshot().contains(&a) => Ok(()),
            _ => Err(Denied::NotAllowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Allowlist {
        Allowlist::parse(entries).unwrap()
    }

    #[test]
    fn ports_count_and_names_match_exactly() {
        let l = list(&["10.0.0.5:8000", "prefill-0.svc"]);
        assert!(l.allows("10.0.0.5:8000"));
        assert!(!l.allows("10.0.0.5:22"));
        assert!(l.allows("PREFILL-0.svc:1234"));
        assert!(!l.allows("prefill-0.svc.evil:1234"));
        assert!(!l.allows("10.0.0.6:8000"));
        assert!(!l.allows("10.0.0.5"));
    }

    #[test]
    fn cidr_blocks_and_port_ranges() {
        let l = list(&["10.1.0.0/16:8000-8003", "[fd00::/8]:9000", "192.168.7.7/32"]);
        assert!(l.allows("10.1.200.3:8000"));
        assert!(l.allows("10.1.0.1:8003"));
        assert!(!l.allows("10.1.0.1:8004"));
        assert!(!l.allows("10.2.0.1:8000"));
        assert!(l.allows("[fd12::1]:9000"));
        assert!(!l.allows("[fe80::1]:9000"));
        assert!(!l.allows("[fd12::1]:9001"));
        assert!(l.allows("192.168.7.7:1"));
        assert!(!l.allows("192.168.7.8:1"));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert!(l.allows("[::ffff:10.1.2.3]:8001"));
        // A name never matches a block.
        assert!(!l.allows("localhost:8000"));
        let all = list(&["0.0.0.0/0"]);
        assert!(all.allows("1.2.3.4:5"));
        assert!(!all.allows("[::1]:5"));
        assert!(list(&["::1"]).allows("[::1]:80"));
        assert!(list(&["[::1]"]).allows("[::1]:80"));
    }

    #[test]
    fn malformed_entries_are_errors() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/8:0",
            "host:70000",
            "host:9-8",
            "[::1",
            "[::1]8000",
            ":8000",
            "a b:1",
            "nothost/8",
        ] {
            assert!(Allowlist::parse([bad]).is_err(), "{bad} parsed");
        }
        assert!(Allowlist::parse(["", " "]).unwrap().is_empty());
    }

    #[test]
    fn the_pool_allows_only_its_endpoints_and_nothing_before_its_first_list() {
        let pool = Arc::new(PoolEndpoints::default());
        let guard = PrefillGuard {
            static_list: list(&["static.svc:1"]),
            pool: Some(pool.clone()),
        };
        assert_eq!(guard.check("10.0.0.1:8000"), Err(Denied::PoolNotSynced));
        assert_eq!(guard.check("static.svc:1"), Ok(()));
        pool.set(["10.0.0.1:8000".parse().unwrap()].into_iter().collect());
        assert_eq!(guard.check("10.0.0.1:8000"), Ok(()));
        assert_eq!(guard.check("10.0.0.1:8001"), Err(Denied::NotAllowed));
        assert_eq!(guard.check("pod.svc:8000"), Err(Denied::NotAllowed));
        pool.unsync();
        assert_eq!(guard.check("10.0.0.1:8000"), Err(Denied::PoolNotSynced));
        let none = PrefillGuard::default();
        assert_eq!(none.check("10.0.0.1:8000"), Err(Denied::NotAllowed));
    }
}
