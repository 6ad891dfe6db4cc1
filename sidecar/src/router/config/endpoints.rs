//! Where the endpoints are: `--decode`/`--prefill` values, DNS names, the endpoints file.

use std::collections::HashSet;

use http::Uri;
use serde_json::{Map, Value};

use crate::config::split_host_port;

/// A name whose addresses are endpoints (`--decode-dns`, `--prefill-dns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsName {
    /// `http` or `https` (decode endpoints; prefill endpoints are named by host:port only).
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
}

impl DnsName {
    pub(crate) fn parse(
        what: &str,
        scheme: &'static str,
        authority: &str,
    ) -> Result<DnsName, String> {
        let (host, port) =
            split_host_port(authority).ok_or_else(|| format!("{what}: expected name:port"))?;
        Ok(DnsName {
            scheme,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
        })
    }

    /// The decode endpoint at one of the name's addresses.
    pub fn decode_at(&self, ip: std::net::IpAddr) -> DecodeTarget {
        DecodeTarget {
            scheme: self.scheme,
            authority: std::net::SocketAddr::new(ip, self.port).to_string(),
            metrics_url: None,
            kv_events_url: None,
        }
    }

    /// The prefill endpoint at one of the name's addresses.
    pub fn prefill_at(&self, ip: std::net::IpAddr) -> PrefillTarget {
        PrefillTarget {
            host_port: std::net::SocketAddr::new(ip, self.port).to_string(),
            metrics_url: None,
            kv_events_url: None,
        }
    }
}

/// A decode endpoint: where requests are forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeTarget {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `host:port`.
    pub authority: String,
    /// Where its engine metrics are scraped; None = the endpoint's own `/metrics`
    /// (a pd-sidecar passes it through to its engine).
    pub metrics_url: Option<Uri>,
    /// Its engine's KV-event publisher (`tcp://host:port`), when the
    /// endpoints file names one; else the precise index's `socketPort`.
    pub kv_events_url: Option<String>,
}

impl DecodeTarget {
    /// `scheme://host:port`, also the endpoint's metric label.
    pub fn label(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    pub fn metrics_uri(&self) -> Uri {
        self.metrics_url
            .clone()
            .unwrap_or_else(|| self.uri("/metrics"))
    }

    /// `path` on this endpoint (a validated authority and an absolute path make a valid URI).
    pub fn uri(&self, path: &str) -> Uri {
        format!("{}://{}{path}", self.scheme, self.authority)
            .parse()
            .unwrap_or_else(|e| panic!("decode endpoint {} with {path}: {e}", self.label()))
    }
}

/// A prefill engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillTarget {
    /// `host:port`: the value of `x-prefiller-host-port`, also the metric label.
    pub host_port: String,
    /// Where its metrics are scraped; None = `http://host:port/metrics`.
    pub metrics_url: Option<Uri>,
    /// As [`DecodeTarget::kv_events_url`].
    pub kv_events_url: Option<String>,
}

impl PrefillTarget {
    pub fn label(&self) -> String {
        self.host_port.clone()
    }

    pub fn metrics_uri(&self) -> Uri {
        self.metrics_url
            .clone()
            .unwrap_or_else(|| self.uri("/metrics"))
    }

    pub fn uri(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.host_port)
            .parse()
            .unwrap_or_else(|e| panic!("prefill endpoint {} with {path}: {e}", self.host_port))
    }
}

/// Parses a `--decode` value.
pub fn parse_decode(value: &str) -> Result<DecodeTarget, String> {
    decode_target(&format!("--decode={value:?}"), value)
}

/// A decode endpoint; `what` names it in errors.
pub(crate) fn decode_target(what: &str, value: &str) -> Result<DecodeTarget, String> {
    let v = value.trim();
    let (scheme, rest) = if let Some(rest) = v.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = v.strip_prefix("https://") {
        ("https", rest)
    } else if v.contains("://") {
        return Err(format!(
            "{what}: only http:// and https:// endpoints are supported"
        ));
    } else {
        ("http", v)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') {
        return Err(format!(
            "{what}: give the endpoint as scheme://host:port, without a path"
        ));
    }
    if split_host_port(authority).is_none() || authority.parse::<http::uri::Authority>().is_err() {
        return Err(format!("{what}: expected host:port"));
    }
    Ok(DecodeTarget {
        scheme,
        authority: authority.to_string(),
        metrics_url: None,
        kv_events_url: None,
    })
}

/// Parses a `--prefill` value (a legacy `http://` prefix is accepted and dropped).
pub fn parse_prefill(value: &str) -> Result<PrefillTarget, String> {
    prefill_target(&format!("--prefill={value:?}"), value)
}

pub(crate) fn prefill_target(what: &str, value: &str) -> Result<PrefillTarget, String> {
    let v = value.trim();
    let v = v.strip_prefix("http://").unwrap_or(v);
    let v = v.strip_suffix('/').unwrap_or(v);
    if v.contains("://")
        || v.contains('/')
        || split_host_port(v).is_none()
        || v.parse::<http::uri::Authority>().is_err()
    {
        return Err(format!(
            "{what}: expected host:port (the value of x-prefiller-host-port)"
        ));
    }
    Ok(PrefillTarget {
        host_port: v.to_string(),
        metrics_url: None,
        kv_events_url: None,
    })
}

/// A `kvEventsUrl`: a ZMQ `tcp://host:port` to connect to.
fn kv_events_url(what: &str, value: &str) -> Result<String, String> {
    let ok = value
        .strip_prefix("tcp://")
        .and_then(split_host_port)
        .is_some_and(|(h, _)| !h.is_empty() && h != "*");
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!("{what}: {value:?}: expected tcp://host:port"))
    }
}

/// A `metricsUrl`: an absolute http(s) URL.
pub(crate) fn metrics_url(what: &str, value: &str) -> Result<Uri, String> {
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|e| format!("{what}: {value:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!(
            "{what}: {value:?} must be an absolute http:// or https:// URL"
        )),
    }
}

pub(crate) fn no_duplicates<'a>(
    what: &str,
    items: impl Iterator<Item = &'a str>,
) -> Result<(), String> {
    let mut seen = HashSet::new();
    for item in items {
        if !seen.insert(item.to_ascii_lowercase()) {
            return Err(format!("{what} {item} is listed twice"));
        }
    }
    Ok(())
}

/// The keys of a YAML mapping, each checked against `allowed`.
pub(crate) fn check_keys(
    at: &str,
    map: &Map<String, Value>,
    allowed: &[&str],
) -> Result<(), String> {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "{at}: unknown key \"{key}\" (supported: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

/// One entry of an endpoint list.
pub(crate) struct Entry {
    pub address: String,
    pub metrics: Option<Uri>,
    pub kv_events: Option<String>,
    /// Where it is in the file, for messages.
    pub at: String,
}

/// A list of endpoint entries: plain strings, or mappings with `key` (the
/// address), an optional `metricsUrl` and an optional `kvEventsUrl`.
pub(crate) fn endpoint_entries(
    list: &str,
    value: Option<&Value>,
    key: &str,
) -> Result<Vec<Entry>, String> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(format!("{list}: expected a list, got {other}")),
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{list}[{i}]");
        match item {
            Value::String(s) => out.push(Entry {
                address: s.clone(),
                metrics: None,
                kv_events: None,
                at,
            }),
            Value::Object(map) => {
                check_keys(&at, map, &[key, "metricsUrl", "kvEventsUrl"])?;
                let address = match map.get(key) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(format!("{at}.{key}: expected a string, got {other}"))
                    }
                    None => return Err(format!("{at}: \"{key}\" is required")),
                };
                let metrics = match map.get("metricsUrl") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(metrics_url(&format!("{at}.metricsUrl"), s)?),
                    Some(other) => {
                        return Err(format!("{at}.metricsUrl: expected a string, got {other}"))
                    }
                };
                let kv_events = match map.get("kvEventsUrl") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(kv_events_url(&format!("{at}.kvEventsUrl"), s)?),
                    Some(other) => {
                        return Err(format!("{at}.kvEventsUrl: expected a string, got {other}"))
                    }
                };
                out.push(Entry {
                    address,
                    metrics,
                    kv_events,
                    at,
                });
            }
            other => {
                return Err(format!(
                    "{at}: expected a string or a mapping with \"{key}\", got {other}"
                ))
            }
        }
    }
    Ok(out)
}

/// Parses an endpoints file:
/// `decode: [{url, metricsUrl?, kvEventsUrl?} | url]`,
/// `prefill: [{hostPort, metricsUrl?, kvEventsUrl?} | host:port]`.
pub fn parse_endpoints(text: &str) -> Result<(Vec<DecodeTarget>, Vec<PrefillTarget>), String> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let map = match doc {
        Value::Null => Map::new(),
        Value::Object(map) => map,
        other => {
            return Err(format!(
                "expected a mapping with \"decode\" and \"prefill\" lists, got {other}"
            ))
        }
    };
    check_keys("endpoints file", &map, &["decode", "prefill"])?;
    let decode = endpoint_entries("decode", map.get("decode"), "url")?
        .into_iter()
        .map(|e| {
            let mut d = decode_target(&format!("{}.url {:?}", e.at, e.address), &e.address)?;
            d.metrics_url = e.metrics;
            d.kv_events_url = e.kv_events;
            Ok(d)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let prefill = endpoint_entries("prefill", map.get("prefill"), "hostPort")?
        .into_iter()
        .map(|e| {
            let mut p = prefill_target(&format!("{}.hostPort {:?}", e.at, e.address), &e.address)?;
            p.metrics_url = e.metrics;
            p.kv_events_url = e.kv_events;
            Ok(p)
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((decode, prefill))
}
