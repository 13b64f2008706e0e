//! E2B's egress options mapped onto a native create: `allow_internet_access` and `network` (`allowOut`,
//! `denyOut`, per-host header `transform` rules with `${e2b.secrets.NAME}` placeholders) become the create's
//! allow rules, `secrets` and `secret_headers`, parsed here once; what has no Hutch meaning is refused by field.
//!
//! Hutch's gateway denies by default and dials names only, so:
//! - nothing given (or `allow_internet_access=False`) is the native default: every connection denied;
//! - `allowOut` names (`example.com`, `*.example.com`) are the allow rules; an address or range there would be
//!   more than Hutch can give and is refused (`allow_internet_access=True` without `allowOut` too);
//! - `denyOut` wins over `allowOut`: a name it covers is dropped from the allow rules, and a name inside an
//!   allowed wildcard (a hole Hutch's allow-only policy cannot punch) is refused. Addresses and ranges there,
//!   `0.0.0.0/0` included, are already denied: guests never reach an address directly;
//! - a transform header whose value holds `${e2b.secrets.NAME}` becomes a header the gateway adds on that host
//!   from the daemon's secret store (the guest gets at most a placeholder); the secret must exist and be bound
//!   to the host; a literal value, another placeholder kind or several secrets in one value are refused.

use std::collections::BTreeMap;

use hutch_policy::{HostPattern, SecretTarget};
use serde::Deserialize;

use super::E2bError;
use crate::model::{AllowSpec, PolicySpec, SecretHeader};

/// E2B's `network` object as the SDK sends it; unknown keys are refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    allow_out: Option<Vec<String>>,
    #[serde(default)]
    deny_out: Option<Vec<String>>,
    #[serde(default)]
    rules: Option<BTreeMap<String, Vec<Rule>>>,
    #[serde(default)]
    dns_servers: Option<Vec<String>>,
    #[serde(default)]
    egress_proxy: Option<serde_json::Value>,
    #[serde(default)]
    allow_public_traffic: Option<bool>,
    #[serde(default)]
    mask_request_host: Option<String>,
    #[serde(default)]
    https_ports: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    transform: Option<Transform>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Transform {
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// The native create's egress fields.
#[derive(Debug, Default, PartialEq)]
pub struct Mapped {
    pub policy: Option<PolicySpec>,
    pub secrets: Vec<String>,
    pub secret_headers: BTreeMap<String, SecretHeader>,
}

const SECRET_OPEN: &str = "${e2b.secrets.";
const MAX_ENTRIES: usize = 256;

/// An address or a CIDR range (`8.8.8.8`, `10.0.0.0/8`, `::/0`), as E2B's lists take them.
fn is_address(s: &str) -> bool {
    let addr = s.split_once('/').map_or(s, |(a, _)| a);
    addr.parse::<std::net::IpAddr>().is_ok()
}

fn shown(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The `{value}` template for a header value holding exactly one `${e2b.secrets.NAME}`, and NAME.
fn secret_template(field: &str, value: &str) -> Result<(String, String), E2bError> {
    let Some(start) = value.find(SECRET_OPEN) else {
        if value.contains("${e2b.") {
            return Err(E2bError::bad(format!(
                "{field}: only ${{e2b.secrets.NAME}} placeholders are offered here (workload identity tokens are not)"
            )));
        }
        return Err(E2bError::bad(format!(
            "{field}: a literal header value; this daemon adds headers from its secret store only: store the value (`hutch secret set NAME --hosts HOST`) and write ${{e2b.secrets.NAME}}"
        )));
    };
    let rest = &value[start + SECRET_OPEN.len()..];
    let end = rest.find('}').ok_or_else(|| E2bError::bad(format!("{field}: the ${{e2b.secrets. placeholder is not closed with }}")))?;
    let name = &rest[..end];
    let (prefix, suffix) = (&value[..start], &rest[end + 1..]);
    if suffix.contains("${e2b.") || prefix.contains("${e2b.") {
        return Err(E2bError::bad(format!("{field}: one placeholder per header value")));
    }
    if prefix.contains("{value}") || suffix.contains("{value}") {
        return Err(E2bError::bad(format!("{field}: the literal text {{value}} cannot be sent")));
    }
    crate::secrets::check_secret_name(name).map_err(|e| E2bError::bad(format!("{field}: {e}; this daemon's secrets are named like environment variables")))?;
    Ok((format!("{prefix}{{value}}{suffix}"), name.to_string()))
}

/// Maps E2B's egress options onto a native create. `stored_hosts` gives a secret's stored binding (its
/// `HOST[:PORT][/PREFIX]` targets), `None` when the store has no such secret.
pub fn map(
    allow_internet: Option<bool>,
    network: Option<&NetworkConfig>,
    stored_hosts: impl Fn(&str) -> Result<Option<Vec<String>>, E2bError>,
) -> Result<Mapped, E2bError> {
    let default = NetworkConfig::default();
    let n = network.unwrap_or(&default);
    if n.egress_proxy.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(E2bError::bad("network.egressProxy is not supported: the sandbox's egress goes through this daemon's gateway; leave it out"));
    }
    if n.mask_request_host.is_some() {
        return Err(E2bError::bad("network.maskRequestHost is not supported by this daemon; leave it out"));
    }
    if n.allow_public_traffic == Some(true) {
        return Err(E2bError::bad(
            "network.allowPublicTraffic=true is not offered: get_host traffic always needs the owner's key or the sandbox's traffic token; leave it out",
        ));
    }
    if n.https_ports.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(E2bError::bad("network.httpsPorts is not supported: get_host forwards plain HTTP to the sandbox's ports; leave it out"));
    }
    for (i, d) in n.dns_servers.iter().flatten().enumerate() {
        // Accepted and not needed: the guest's names are answered by the gateway from the policy.
        if d.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(E2bError::bad(format!("network.dnsServers[{i}]: {:?} is not an IPv4 address", shown(d))));
        }
    }
    let allow_out = n.allow_out.as_deref().unwrap_or_default();
    let deny_out = n.deny_out.as_deref().unwrap_or_default();
    if allow_out.len() > MAX_ENTRIES || deny_out.len() > MAX_ENTRIES {
        return Err(E2bError::bad(format!("network.allowOut/denyOut: at most {MAX_ENTRIES} entries each")));
    }
    match allow_internet {
        Some(false) if !allow_out.is_empty() => {
            return Err(E2bError::bad(
                "allow_internet_access=False blocks everything, but network.allowOut allows hosts; give one or the other",
            ))
        }
        Some(true) if n.allow_out.is_none() => {
            return Err(E2bError::bad(
                "allow_internet_access=True: Hutch sandboxes reach only the hosts you allow (the native default denies everything); pass network={'allow_out': ['api.example.com', ...]} instead",
            ))
        }
        _ => {}
    }
    let mut denied = Vec::new();
    for (i, d) in deny_out.iter().enumerate() {
        if is_address(d) {
            continue;
        }
        let p = HostPattern::parse(d).map_err(|e| E2bError::bad(format!("network.denyOut[{i}]: {:?}: {e}", shown(d))))?;
        denied.push(p);
    }
    let mut allow = Vec::new();
    for (i, a) in allow_out.iter().enumerate() {
        if is_address(a) {
            return Err(E2bError::bad(format!(
                "network.allowOut[{i}]: {:?} is an address or range; this daemon's gateway allows host names (example.com, *.example.com)",
                shown(a)
            )));
        }
        let p = HostPattern::parse(a).map_err(|e| E2bError::bad(format!("network.allowOut[{i}]: {:?}: {e}", shown(a))))?;
        if denied.iter().any(|d| d.covers(&p)) {
            continue;
        }
        if let Some(d) = denied.iter().find(|d| p.covers(d)) {
            return Err(E2bError::bad(format!(
                "network.denyOut: {d} lies inside network.allowOut[{i}] {p}; this daemon cannot allow a wildcard except some names: list the allowed names instead"
            )));
        }
        allow.push(AllowSpec { host: p.to_string(), ports: None, methods: None, paths: None });
    }
    let mut headers: BTreeMap<String, SecretHeader> = BTreeMap::new();
    let rules = n.rules.as_ref().map(|r| r.iter().collect::<Vec<_>>()).unwrap_or_default();
    if rules.len() > MAX_ENTRIES {
        return Err(E2bError::bad(format!("network.rules: at most {MAX_ENTRIES} hosts")));
    }
    for (host, list) in rules {
        let at = format!("network.rules[{:?}]", shown(host));
        let p = HostPattern::parse(host).map_err(|e| E2bError::bad(format!("{at}: {e}")))?;
        for (j, rule) in list.iter().enumerate() {
            for (name, value) in rule.transform.as_ref().and_then(|t| t.headers.as_ref()).into_iter().flatten() {
                let field = format!("{at}[{j}].transform.headers.{}", shown(name));
                let (template, secret) = secret_template(&field, value)?;
                let Some(bound) = stored_hosts(&secret)? else {
                    return Err(E2bError::bad(format!("{field}: secret {secret} is not in this daemon's store (`hutch secret set {secret} --hosts {p}`)")));
                };
                let within = bound.iter().filter_map(|t| SecretTarget::parse(t).ok()).any(|t| t.narrowed_to(&p).is_some());
                if !within {
                    return Err(E2bError::bad(format!(
                        "{field}: secret {secret} is not bound to {p} (its hosts: {}); an operator binds it with `hutch secret set {secret} --hosts ...`",
                        bound.join(", ")
                    )));
                }
                let e = headers.entry(secret.clone()).or_insert_with(|| SecretHeader { hosts: vec![], header: name.clone(), value: template.clone() });
                if !e.header.eq_ignore_ascii_case(name) || e.value != template {
                    return Err(E2bError::bad(format!("{field}: secret {secret} is already used in another header or form; each secret goes into one header")));
                }
                if !e.hosts.contains(&p.to_string()) {
                    e.hosts.push(p.to_string());
                }
            }
        }
    }
    Ok(Mapped {
        policy: (!allow.is_empty()).then_some(PolicySpec { allow }),
        secrets: headers.keys().cloned().collect(),
        secret_headers: headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(v: serde_json::Value) -> NetworkConfig {
        serde_json::from_value(v).unwrap()
    }

    fn store(name: &str) -> Result<Option<Vec<String>>, E2bError> {
        Ok(match name {
            "TOK" => Some(vec!["*.example.test:443".into()]),
            "OTHER" => Some(vec!["elsewhere.test".into()]),
            _ => None,
        })
    }

    fn hosts(m: &Mapped) -> Vec<String> {
        m.policy.iter().flat_map(|p| p.allow.iter().map(|a| a.host.clone())).collect()
    }

    #[test]
    fn defaults_are_never_more_open_than_the_native_api() {
        assert_eq!(map(None, None, store).unwrap(), Mapped::default());
        assert_eq!(map(Some(false), None, store).unwrap(), Mapped::default());
        assert!(map(Some(true), None, store).unwrap_err().message.contains("allow_internet_access"));
        let e = map(Some(false), Some(&net(serde_json::json!({"allowOut": ["a.test"]}))), store).unwrap_err();
        assert!(e.message.contains("allow_internet_access") && e.message.contains("allowOut"), "{}", e.message);
        // Only denials: still nothing allowed.
        assert_eq!(map(None, Some(&net(serde_json::json!({"denyOut": ["1.1.1.1"]}))), store).unwrap(), Mapped::default());
    }

    #[test]
    fn deny_wins_over_allow() {
        let m = map(None, Some(&net(serde_json::json!({"allowOut": ["a.example.test", "B.example.test", "*.x.test"], "denyOut": ["b.example.test", "0.0.0.0/0"]}))), store).unwrap();
        assert_eq!(hosts(&m), vec!["a.example.test", "*.x.test"]);
        let m = map(None, Some(&net(serde_json::json!({"allowOut": ["a.x.test"], "denyOut": ["*.x.test"]}))), store).unwrap();
        assert!(m.policy.is_none());
        let e = map(None, Some(&net(serde_json::json!({"allowOut": ["*.x.test"], "denyOut": ["bad.x.test"]}))), store).unwrap_err();
        assert!(e.message.contains("network.denyOut") && e.message.contains("allowOut[0]"), "{}", e.message);
        let e = map(None, Some(&net(serde_json::json!({"allowOut": ["10.0.0.0/8"]}))), store).unwrap_err();
        assert!(e.message.contains("network.allowOut[0]"), "{}", e.message);
        let e = map(None, Some(&net(serde_json::json!({"allowOut": ["a.test", "bad host"]}))), store).unwrap_err();
        assert!(e.message.contains("network.allowOut[1]"), "{}", e.message);
    }

    #[test]
    fn transforms_become_secret_headers_on_bound_hosts() {
        let rules = |v: &str, host: &str| net(serde_json::json!({"allowOut": [host], "rules": {host: [{"transform": {"headers": {"Authorization": v}}}]}}));
        let m = map(None, Some(&rules("Bearer ${e2b.secrets.TOK}", "api.example.test")), store).unwrap();
        assert_eq!(m.secrets, vec!["TOK"]);
        let h = &m.secret_headers["TOK"];
        assert_eq!((h.hosts.clone(), h.header.as_str(), h.value.as_str()), (vec!["api.example.test".to_string()], "Authorization", "Bearer {value}"));
        for (v, host, want) in [
            ("Bearer ${e2b.secrets.NOPE}", "api.example.test", "not in this daemon's store"),
            ("Bearer ${e2b.secrets.OTHER}", "api.example.test", "not bound to api.example.test"),
            ("Bearer ${e2b.secrets.TOK}", "example.test", "not bound"),
            ("Bearer literal", "api.example.test", "literal header value"),
            ("${e2b.identity.tokens.aws}", "api.example.test", "workload identity"),
            ("${e2b.secrets.TOK}${e2b.secrets.TOK}", "api.example.test", "one placeholder"),
            ("${e2b.secrets.openai-key}", "api.example.test", "secret name"),
            ("${e2b.secrets.TOK", "api.example.test", "not closed"),
        ] {
            let e = map(None, Some(&rules(v, host)), store).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(e.message.contains(want) && e.message.contains("network.rules"), "{v}: {}", e.message);
        }
        let two = net(serde_json::json!({"rules": {"a.example.test": [{"transform": {"headers": {"X-A": "${e2b.secrets.TOK}"}}}], "b.example.test": [{"transform": {"headers": {"X-B": "${e2b.secrets.TOK}"}}}]}}));
        assert!(map(None, Some(&two), store).unwrap_err().message.contains("one header"));
        let e = serde_json::from_value::<NetworkConfig>(serde_json::json!({"bogus": 1})).unwrap_err();
        assert!(e.to_string().contains("bogus"));
        assert!(map(None, Some(&net(serde_json::json!({"egressProxy": {"address": "p:1"}}))), store).is_err());
        assert!(map(None, Some(&net(serde_json::json!({"allowPublicTraffic": true}))), store).is_err());
        assert!(map(None, Some(&net(serde_json::json!({"allowPublicTraffic": false, "dnsServers": ["8.8.8.8"]}))), store).is_ok());
    }
}
