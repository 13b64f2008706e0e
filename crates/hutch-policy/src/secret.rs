//! Secrets: which hosts each is bound to, where its value comes from on the host, and the value
//! type that never prints itself.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use zeroize::Zeroize;

use crate::name::HostName;
use crate::name::HostPattern;
use crate::rule::is_token_byte;

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

/// One secret binding in checked form (no value: values are loaded separately).
#[derive(Clone, Debug, Serialize)]
pub struct SecretSpec {
    pub(crate) name: SecretName,
    pub(crate) hosts: Vec<HostPattern>,
    #[serde(skip)]
    pub(crate) source: SecretSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inject: Option<InjectTemplate>,
    pub(crate) in_body: bool,
}

impl SecretSpec {
    pub fn name(&self) -> &SecretName {
        &self.name
    }

    pub fn hosts(&self) -> &[HostPattern] {
        &self.hosts
    }

    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    pub fn inject(&self) -> Option<&InjectTemplate> {
        self.inject.as_ref()
    }

    pub fn in_body(&self) -> bool {
        self.in_body
    }

    /// True when requests to `name` may carry this secret.
    pub fn is_bound_to(&self, name: &HostName) -> bool {
        self.hosts.iter().any(|p| p.matches(name))
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

    /// Threat 12 (secrets in logs and error messages): the value never prints.
    #[test]
    fn threat12_value_never_prints() {
        let v = SecretValue::new("ghp_realvalue123456".into(), "secret GH").expect("valid");
        assert!(!format!("{v:?}").contains("realvalue"));
        assert!(!format!("{v}").contains("realvalue"));
        let loaded = LoadedSecret {
            spec: SecretSpec {
                name: SecretName::parse("GH").expect("name"),
                hosts: vec![],
                source: SecretSource::Env("GH".into()),
                inject: None,
                in_body: false,
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
