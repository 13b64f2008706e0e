//! Secrets: which hosts each is bound to, where its value comes from on the host, and the value
//! type that never prints itself.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use zeroize::Zeroize;

use std::collections::BTreeSet;

use crate::name::HostName;
use crate::name::HostPattern;
use crate::rule::{is_token_byte, method_override, JudgedPath, Method, PathPrefix};

/// Shortest value accepted: masking a very short value in responses would corrupt them.
pub const MIN_SECRET_LEN: usize = 8;

/// A secret's name, `[A-Za-z_][A-Za-z0-9_]*` like an environment variable.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct SecretName(String);

impl SecretName {
    pub(crate) fn parse(s: &str) -> Result<SecretName, String> {
        let mut bytes = s.bytes();
        let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') || s.len() > 64 {
            return Err(format!(
                "secret name {s:?} must be a letter or '_' followed by letters, digits or '_' (at most 64)"
            ));
        }
        Ok(SecretName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the host reads a secret's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(v) => write!(f, "${v}"),
            SecretSource::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

/// A header the gateway adds, on bound hosts, when the client sent no header of that name:
/// `prefix + value + suffix`, split from a template such as `Bearer {value}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InjectTemplate {
    header: String,
    #[serde(skip)]
    prefix: String,
    #[serde(skip)]
    suffix: String,
}

impl InjectTemplate {
    pub(crate) fn parse(header: &str, template: &str) -> Result<InjectTemplate, String> {
        if header.is_empty() || !header.bytes().all(is_token_byte) {
            return Err(format!("header name {header:?} is not an HTTP header name"));
        }
        let mut parts = template.split("{value}");
        let (prefix, suffix) = match (parts.next(), parts.next(), parts.next()) {
            (Some(p), Some(s), None) => (p, s),
            _ => {
                return Err(format!(
                    "value template {template:?} must contain \"{{value}}\" exactly once"
                ))
            }
        };
        if !template.bytes().all(is_header_value_byte) {
            return Err(format!(
                "value template {template:?} contains characters not allowed in a header"
            ));
        }
        Ok(InjectTemplate {
            header: header.to_ascii_lowercase(),
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// Lowercase header name.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// The header value for `value`; the caller keeps the result away from logs.
    pub fn render(&self, value: &SecretValue) -> String {
        format!("{}{}{}", self.prefix, value.expose(), self.suffix)
    }
}

fn is_header_value_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b)
}

/// Where a secret may be used: a host pattern, optionally one port and one path prefix
/// (`HOST[:PORT][/PREFIX]`, e.g. `api.anthropic.com:443/v1/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecretTarget {
    pub(crate) pattern: HostPattern,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<PathPrefix>,
}

impl SecretTarget {
    /// `HOST[:PORT][/PREFIX]`.
    pub fn parse(s: &str) -> Result<SecretTarget, String> {
        let (hostport, path) = match s.find('/') {
            Some(i) => (&s[..i], Some(PathPrefix::parse(&s[i..])?)),
            None => (s, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => {
                let port = match p.parse::<u16>() {
                    Ok(0) | Err(_) => {
                        return Err(format!("port {p:?} is not a number from 1 to 65535"))
                    }
                    Ok(n) => n,
                };
                (h, Some(port))
            }
            None => (hostport, None),
        };
        let pattern = HostPattern::parse(host).map_err(|e| e.to_string())?;
        Ok(SecretTarget {
            pattern,
            port,
            path,
        })
    }

    pub fn pattern(&self) -> &HostPattern {
        &self.pattern
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    pub fn path(&self) -> Option<&PathPrefix> {
        self.path.as_ref()
    }

    /// This target limited to the names `pattern` matches (same port and path), or `None` when it
    /// does not cover them all: how a binding is narrowed to fewer hosts, never widened.
    pub fn narrowed_to(&self, pattern: &HostPattern) -> Option<SecretTarget> {
        self.pattern.covers(pattern).then(|| SecretTarget {
            pattern: pattern.clone(),
            port: self.port,
            path: self.path.clone(),
        })
    }

    fn matches(&self, host: &HostName, port: u16, path: Option<&JudgedPath<'_>>) -> bool {
        self.pattern.matches(host)
            && self.port.map_or(true, |p| p == port)
            && match (&self.path, path) {
                (None, _) => true,
                (Some(prefix), Some(judged)) => judged.under(prefix),
                (Some(_), None) => false,
            }
    }
}

impl fmt::Display for SecretTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.pattern)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        if let Some(p) = &self.path {
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

/// Where in a request a secret's placeholder is put in place of the value. The default is one
/// named header; the rest are opt-ins, because a host that stores or reflects what it is sent
/// can give a value swapped there back to the sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SwapScope {
    /// The request header (lowercase) whose value may carry the placeholder.
    pub header: String,
    /// Also in request bodies (buffered, up to the body cap).
    pub body: bool,
    /// Also in the query string.
    pub query: bool,
    /// Also in every other request header.
    pub any_header: bool,
}

impl SwapScope {
    /// True when the secret may be swapped anywhere but its one header.
    pub fn widened(&self) -> bool {
        self.body || self.query || self.any_header
    }
}

/// One secret binding in checked form (no value: values are loaded separately).
#[derive(Clone, Debug, Serialize)]
pub struct SecretSpec {
    pub(crate) name: SecretName,
    pub(crate) targets: Vec<SecretTarget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) methods: Option<BTreeSet<Method>>,
    #[serde(skip)]
    pub(crate) source: SecretSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inject: Option<InjectTemplate>,
    pub(crate) swap: SwapScope,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) preset: Option<&'static str>,
}

impl SecretSpec {
    pub fn name(&self) -> &SecretName {
        &self.name
    }

    /// Every place the secret may be used.
    pub fn targets(&self) -> &[SecretTarget] {
        &self.targets
    }

    /// The host patterns of its targets (a pattern may repeat).
    pub fn hosts(&self) -> impl Iterator<Item = &HostPattern> {
        self.targets.iter().map(|t| &t.pattern)
    }

    pub fn methods(&self) -> Option<&BTreeSet<Method>> {
        self.methods.as_ref()
    }

    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    pub fn inject(&self) -> Option<&InjectTemplate> {
        self.inject.as_ref()
    }

    pub fn swap(&self) -> &SwapScope {
        &self.swap
    }

    pub fn in_body(&self) -> bool {
        self.swap.body
    }

    /// The preset the binding came from, if any.
    pub fn preset(&self) -> Option<&'static str> {
        self.preset
    }

    /// True when some request to `name` may carry this secret (on any port, path or method):
    /// such hosts are always inspected.
    pub fn is_bound_to(&self, name: &HostName) -> bool {
        self.targets.iter().any(|t| t.pattern.matches(name))
    }

    /// True when a request `method target` to `host:port` may carry this secret. `target` may
    /// carry a query; a path that path prefixes can't judge is in no prefix. A method override
    /// (header or parameter) puts the request outside any method limit.
    pub fn applies(
        &self,
        host: &HostName,
        port: u16,
        method: &str,
        target: &str,
        header_names: &[&str],
    ) -> bool {
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m.as_str() == method)
                || method_override(target, header_names).is_some()
            {
                return false;
            }
        }
        let judged = JudgedPath::new(target).ok();
        self.targets
            .iter()
            .any(|t| t.matches(host, port, judged.as_ref()))
    }

    /// The scope in words, for error messages and listings: `api.test:443/v1/ methods GET,POST header x-api-key`.
    pub fn describe(&self) -> String {
        let mut s = self
            .targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if let Some(m) = &self.methods {
            let m: Vec<&str> = m.iter().map(Method::as_str).collect();
            s.push_str(&format!(" methods {}", m.join(",")));
        }
        s.push_str(&format!(" header {}", self.swap.header));
        for (on, what) in [
            (self.swap.body, "body"),
            (self.swap.query, "query"),
            (self.swap.any_header, "any header"),
        ] {
            if on {
                s.push_str(&format!(" +{what}"));
            }
        }
        s
    }
}

/// A secret's value. Debug and Display never show it; the bytes are wiped on drop.
pub struct SecretValue(String);

impl SecretValue {
    /// Checks that `value` can travel in an HTTP header. `what` names it in errors (never the value).
    pub fn new(value: String, what: &str) -> Result<SecretValue, String> {
        let v = SecretValue(value);
        if v.0.len() < MIN_SECRET_LEN {
            return Err(format!("{what} is shorter than {MIN_SECRET_LEN} characters; masking it in responses would corrupt them"));
        }
        if !v.0.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ') {
            return Err(format!(
                "{what} contains control or non-ASCII characters, which an HTTP header can't carry"
            ));
        }
        Ok(v)
    }

    /// The real value, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret binding with its value loaded from the host.
#[derive(Debug)]
pub struct LoadedSecret {
    pub spec: SecretSpec,
    pub value: SecretValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_narrow_but_never_widen() {
        let t = SecretTarget::parse("*.example.com:443/v1/").expect("target");
        let one = HostPattern::parse("api.example.com").expect("pattern");
        assert_eq!(t.narrowed_to(&one).expect("covered").to_string(), "api.example.com:443/v1/");
        let deeper = HostPattern::parse("*.eu.example.com").expect("pattern");
        assert!(t.narrowed_to(&deeper).is_some());
        let apex = HostPattern::parse("example.com").expect("pattern");
        assert!(t.narrowed_to(&apex).is_none(), "a wildcard never covers its apex");
        let exact = SecretTarget::parse("api.example.com").expect("target");
        assert!(exact.narrowed_to(&HostPattern::parse("*.api.example.com").expect("p")).is_none());
    }

    /// Threat 12 (secrets in logs and error messages): the value never prints.
    #[test]
    fn threat12_value_never_prints() {
        let v = SecretValue::new("ghp_realvalue123456".into(), "secret GH").expect("valid");
        assert!(!format!("{v:?}").contains("realvalue"));
        assert!(!format!("{v}").contains("realvalue"));
        let loaded = LoadedSecret {
            spec: SecretSpec {
                name: SecretName::parse("GH").expect("name"),
                targets: vec![],
                methods: None,
                source: SecretSource::Env("GH".into()),
                inject: None,
                swap: SwapScope {
                    header: "authorization".into(),
                    body: false,
                    query: false,
                    any_header: false,
                },
                preset: None,
            },
            value: v,
        };
        assert!(!format!("{loaded:?}").contains("realvalue"));
        let err =
            SecretValue::new("bad\r\nvalue-secret".into(), "secret GH").expect_err("CRLF refused");
        assert!(!err.contains("value-secret"), "{err}");
        assert!(SecretValue::new("short".into(), "secret GH").is_err());
    }

    #[test]
    fn templates_and_names() {
        let t = InjectTemplate::parse("Authorization", "Bearer {value}").expect("template");
        assert_eq!(t.header(), "authorization");
        let v = SecretValue::new("abcdefgh12".into(), "x").expect("valid");
        assert_eq!(t.render(&v), "Bearer abcdefgh12");
        assert!(InjectTemplate::parse("authorization", "Bearer").is_err());
        assert!(InjectTemplate::parse("authorization", "{value}{value}").is_err());
        assert!(InjectTemplate::parse("bad header", "{value}").is_err());
        assert!(InjectTemplate::parse("x", "a\r\n{value}").is_err());
        assert!(SecretName::parse("GITHUB_TOKEN").is_ok());
        assert!(SecretName::parse("1X").is_err());
        assert!(SecretName::parse("A-B").is_err());
    }
}
