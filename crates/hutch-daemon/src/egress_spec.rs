//! What a sandbox's egress policy is made of besides its allow rules: the operator's base (`hutch serve
//! --egress-base FILE`: pinned addresses and trusted upstream roots for every sandbox, never an allow rule or a
//! secret) and each secret's binding (the store's hosts, or fewer of them with a header the gateway adds, from a
//! create's `secret_headers`). Both become policy-file TOML that the gateway's own parser checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hutch_policy::{HostPattern, SecretTarget};
use serde::Deserialize;

use crate::model::SecretHeader;
use crate::store::SecretRow;
use crate::DaemonError;

/// How every sandbox's gateway reaches and trusts names, set by the operator.
#[derive(Debug, Clone, Default)]
pub struct EgressBase {
    /// `HOST:PORT:ADDR[,ADDR...]` (curl syntax): dialed without DNS, allowed even when loopback or private.
    pub resolve: Vec<String>,
    /// PEM files of extra roots for upstream TLS (absolute paths).
    pub upstream_ca: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    #[serde(default)]
    resolve: Vec<String>,
    #[serde(default)]
    upstream_ca: Vec<PathBuf>,
}

impl EgressBase {
    /// Reads and checks `path`: only `resolve` and `upstream_ca` (what may be reached is each sandbox's own policy).
    pub fn load(path: &Path) -> Result<EgressBase, DaemonError> {
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Io { what: format!("read {}", path.display()), source })?;
        let raw: RawBase = toml::from_str(&text).map_err(|e| {
            DaemonError::BadInput(format!(
                "--egress-base {}: {} (only `resolve` and `upstream_ca` belong here; allow rules and secrets are per sandbox)",
                path.display(),
                e.message()
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let base = EgressBase { resolve: raw.resolve, upstream_ca: raw.upstream_ca.into_iter().map(|p| if p.is_absolute() { p } else { dir.join(p) }).collect() };
        // The policy refuses a pin no rule uses: check them under rules that use them all.
        let mut allow = Vec::new();
        for (i, r) in base.resolve.iter().enumerate() {
            let (host, port) = pin_target(r).ok_or_else(|| DaemonError::BadInput(format!("--egress-base {}: resolve[{i}] {r:?} is not HOST:PORT:ADDR[,ADDR...]", path.display())))?;
            let mut t = toml::map::Map::new();
            t.insert("host".into(), toml::Value::String(host.to_string()));
            t.insert("ports".into(), toml::Value::Array(vec![toml::Value::Integer(port.into())]));
            allow.push(toml::Value::Table(t));
        }
        let mut root = toml::map::Map::new();
        root.insert("allow".into(), toml::Value::Array(allow));
        let probe = base.policy_toml_with(root)?;
        hutch_policy::CheckedPolicy::from_toml_str(&probe, path).map_err(|e| DaemonError::BadInput(format!("--egress-base {}: {e}", path.display())))?;
        Ok(base)
    }

    /// The pins a sandbox's policy uses (an allow rule permits their name and port): a policy refuses unused ones.
    pub fn used_by(&self, policy: &hutch_policy::CheckedPolicy) -> EgressBase {
        let used = |r: &String| {
            pin_target(r).and_then(|(h, p)| hutch_policy::HostName::parse(h).ok().map(|n| (n, p))).is_some_and(|(n, p)| policy.check_connect(&n, p).is_ok())
        };
        EgressBase { resolve: self.resolve.iter().filter(|r| used(r)).cloned().collect(), upstream_ca: self.upstream_ca.clone() }
    }

    /// `root` (a policy table) with this base's keys added, as TOML text.
    pub fn policy_toml_with(&self, mut root: toml::map::Map<String, toml::Value>) -> Result<String, DaemonError> {
        if !self.resolve.is_empty() {
            root.insert("resolve".into(), toml::Value::Array(self.resolve.iter().cloned().map(toml::Value::String).collect()));
        }
        if !self.upstream_ca.is_empty() {
            let paths = self.upstream_ca.iter().map(|p| p.to_str().map(|s| toml::Value::String(s.to_string()))).collect::<Option<Vec<_>>>();
            let paths = paths.ok_or_else(|| DaemonError::BadInput("--egress-base: an upstream_ca path is not UTF-8".into()))?;
            root.insert("upstream_ca".into(), toml::Value::Array(paths));
        }
        toml::to_string(&toml::Value::Table(root)).map_err(|e| DaemonError::Internal(format!("policy: {e}")))
    }
}

/// The name and port of a `HOST:PORT:ADDR[,ADDR...]` pin.
fn pin_target(r: &str) -> Option<(&str, u16)> {
    let mut it = r.splitn(3, ':');
    let (host, port, _) = (it.next()?, it.next()?.parse().ok()?, it.next()?);
    Some((host, port))
}

/// One secret as a sandbox's policy binds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretBinding {
    pub name: String,
    /// `HOST[:PORT][/PREFIX]` targets.
    pub hosts: Vec<String>,
    /// The header the gateway adds: name and value template (`{value}` once).
    pub inject: Option<(String, String)>,
}

/// Each secret's binding: the stored one, or (with a `secret_headers` entry) the stored targets narrowed to the
/// hosts asked for, with the header. Every problem names the field; a host outside the stored binding is refused,
/// so a create can only narrow what the operator bound.
pub fn bindings(rows: &[SecretRow], headers: &BTreeMap<String, SecretHeader>) -> Result<Vec<SecretBinding>, String> {
    if let Some(k) = headers.keys().find(|k| !rows.iter().any(|r| &r.name == *k)) {
        return Err(format!("secret_headers.{k}: {k} is not one of the sandbox's `secrets`; add it there"));
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(h) = headers.get(&row.name) else {
            out.push(SecretBinding { name: row.name.clone(), hosts: row.hosts.clone(), inject: None });
            continue;
        };
        let field = format!("secret_headers.{}", row.name);
        if h.hosts.is_empty() || h.hosts.len() > 64 {
            return Err(format!("{field}.hosts: give 1 to 64 hosts, got {}", h.hosts.len()));
        }
        let stored: Vec<SecretTarget> = row.hosts.iter().filter_map(|s| SecretTarget::parse(s).ok()).collect();
        let mut hosts = Vec::new();
        for (i, host) in h.hosts.iter().enumerate() {
            let shown: String = host.chars().take(80).collect();
            let p = HostPattern::parse(host).map_err(|e| format!("{field}.hosts[{i}]: {shown:?}: {e}"))?;
            let narrowed: Vec<String> = stored.iter().filter_map(|t| t.narrowed_to(&p)).map(|t| t.to_string()).collect();
            if narrowed.is_empty() {
                return Err(format!(
                    "{field}.hosts[{i}]: secret {} is not bound to {p} (its hosts: {}); bind it with `hutch secret set {} --hosts ...`",
                    row.name,
                    row.hosts.join(", "),
                    row.name
                ));
            }
            hosts.extend(narrowed);
        }
        hosts.sort();
        hosts.dedup();
        out.push(SecretBinding { name: row.name.clone(), hosts, inject: Some((h.header.clone(), h.value.clone())) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, hosts: &[&str]) -> SecretRow {
        SecretRow { name: name.into(), hosts: hosts.iter().map(|s| s.to_string()).collect(), nonce: vec![], ciphertext: vec![], created_ms: 0, updated_ms: 0 }
    }

    fn header(hosts: &[&str]) -> SecretHeader {
        SecretHeader { hosts: hosts.iter().map(|s| s.to_string()).collect(), header: "Authorization".into(), value: "Bearer {value}".into() }
    }

    #[test]
    fn headers_narrow_the_stored_binding_and_never_widen_it() {
        let rows = vec![row("TOK", &["*.example.com:443", "api.other.com"]), row("PLAIN", &["a.com"])];
        let b = bindings(&rows, &[("TOK".to_string(), header(&["api.example.com"]))].into()).unwrap();
        assert_eq!(b[0].hosts, vec!["api.example.com:443"]);
        assert_eq!(b[0].inject.as_ref().map(|i| i.0.as_str()), Some("Authorization"));
        assert_eq!(b[1], SecretBinding { name: "PLAIN".into(), hosts: vec!["a.com".into()], inject: None });
        let e = bindings(&rows, &[("TOK".to_string(), header(&["example.com"]))].into()).unwrap_err();
        assert!(e.contains("secret_headers.TOK.hosts[0]") && e.contains("not bound"), "{e}");
        let e = bindings(&rows, &[("NOPE".to_string(), header(&["a.com"]))].into()).unwrap_err();
        assert!(e.contains("secret_headers.NOPE"), "{e}");
        let e = bindings(&rows, &[("TOK".to_string(), header(&[]))].into()).unwrap_err();
        assert!(e.contains("secret_headers.TOK.hosts"), "{e}");
        assert!(bindings(&rows, &[("TOK".to_string(), header(&["*"]))].into()).is_err());
    }

    #[test]
    fn the_base_takes_pins_and_roots_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("base.toml");
        std::fs::write(&f, "resolve = [\"api.example.test:443:127.0.0.1\"]\n").unwrap();
        let b = EgressBase::load(&f).unwrap();
        assert_eq!(b.resolve.len(), 1);
        let rules = hutch_policy::CheckedPolicy::from_toml_str("allow = [\"*.example.test\"]", Path::new("p")).unwrap();
        assert_eq!(b.used_by(&rules).resolve.len(), 1);
        let other = hutch_policy::CheckedPolicy::from_toml_str("allow = [\"api.example.test:8443\"]", Path::new("p")).unwrap();
        assert!(b.used_by(&other).resolve.is_empty());
        std::fs::write(&f, "resolve = [\"nonsense\"]\n").unwrap();
        assert!(EgressBase::load(&f).is_err());
        std::fs::write(&f, "allow = [\"a.com\"]\n").unwrap();
        let e = EgressBase::load(&f).unwrap_err().to_string();
        assert!(e.contains("only `resolve` and `upstream_ca`"), "{e}");
        std::fs::write(&f, "upstream_ca = [\"missing.pem\"]\n").unwrap();
        assert!(EgressBase::load(&f).is_err());
    }
}
