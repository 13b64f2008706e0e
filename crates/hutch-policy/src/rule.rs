//! Allow rules in checked form and the decisions made with them: host+port for a connection,
//! method and path prefix for each HTTP request the gateway can see.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use crate::name::{HostName, HostPattern};

/// Ports an allow rule covers when it names none.
pub const DEFAULT_PORTS: [u16; 2] = [443, 80];

/// An HTTP method token, uppercase as HTTP spells the standard ones.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct Method(String);

impl Method {
    pub(crate) fn parse(s: &str) -> Result<Method, String> {
        if s.is_empty() || !s.bytes().all(is_token_byte) {
            return Err(format!("{s:?} is not an HTTP method token"));
        }
        let up = s.to_ascii_uppercase();
        if up == "CONNECT" {
            return Err(
                "CONNECT opens tunnels and is not a request method rule; allow the host instead"
                    .into(),
            );
        }
        Ok(Method(up))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A path prefix matched on a segment boundary: `/repos` matches `/repos` and `/repos/x`, not
/// `/reposx`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize)]
#[serde(transparent)]
pub struct PathPrefix(String);

impl PathPrefix {
    pub(crate) fn parse(s: &str) -> Result<PathPrefix, String> {
        if !s.starts_with('/') {
            return Err(format!("path prefix {s:?} must start with '/'"));
        }
        if s.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#' || b == b'\\')
        {
            return Err(format!(
                "path prefix {s:?} may not contain spaces, controls, '?', '#' or '\\'"
            ));
        }
        if has_dot_segment(s) || has_encoded_separator(s) {
            return Err(format!(
                "path prefix {s:?} may not contain '.'/'..' segments or %2e, %2f, %5c"
            ));
        }
        Ok(PathPrefix(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn matches(&self, path: &str) -> bool {
        let p = self.0.as_str();
        path == p
            || (path.starts_with(p)
                && (p.ends_with('/') || path.as_bytes().get(p.len()) == Some(&b'/')))
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| seg == "." || seg == "..")
}

fn has_encoded_separator(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
}

/// Identifies a rule for audit lines.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct RuleId(pub usize);

/// One checked allow rule.
#[derive(Clone, Debug, Serialize)]
pub struct AllowRule {
    pub(crate) id: RuleId,
    pub(crate) pattern: HostPattern,
    pub(crate) ports: BTreeSet<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) methods: Option<BTreeSet<Method>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) paths: Option<Vec<PathPrefix>>,
    /// Where the rule came from, e.g. `--allow "api.github.com"` or `policy.toml allow[2]`.
    pub(crate) origin: String,
}

impl AllowRule {
    pub fn id(&self) -> RuleId {
        self.id
    }

    pub fn pattern(&self) -> &HostPattern {
        &self.pattern
    }

    pub fn ports(&self) -> &BTreeSet<u16> {
        &self.ports
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// True when the rule limits methods or paths, so plain byte tunnels can't honour it.
    pub fn restricts_requests(&self) -> bool {
        self.methods.is_some() || self.paths.is_some()
    }

    /// Decides one HTTP request on a connection this rule allowed. `path` is the request
    /// target's path with or without a query.
    pub fn check_request(&self, method: &str, path: &str) -> Result<(), DenyReason> {
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m.as_str() == method) {
                return Err(DenyReason::MethodNotAllowed {
                    method: method.to_string(),
                    rule: self.public(),
                });
            }
        }
        if let Some(paths) = &self.paths {
            let path_only = path.split(['?', '#']).next().unwrap_or(path);
            if !path_only.starts_with('/')
                || path_only
                    .bytes()
                    .any(|b| b == b'\\' || b.is_ascii_control())
                || has_dot_segment(path_only)
                || has_encoded_separator(path_only)
            {
                return Err(DenyReason::PathAmbiguous {
                    path: path_only.to_string(),
                });
            }
            if !paths.iter().any(|p| p.matches(path_only)) {
                return Err(DenyReason::PathNotAllowed {
                    path: path_only.to_string(),
                    rule: self.public(),
                });
            }
        }
        Ok(())
    }
}

impl AllowRule {
    /// The rule as a sandbox may be told it (in a denial): what it allows and the kind of source and field it came
    /// from, never a host path (`allow pypi.org:443 methods GET (policy file allow[2])`).
    pub fn public(&self) -> String {
        format!("allow {} ({})", self.describe(), public_origin(&self.origin))
    }

    /// What the rule allows, without where it came from: `pypi.org:443,80 methods GET`.
    pub fn describe(&self) -> String {
        let mut s = self.to_string();
        if let Some(i) = s.rfind(" (") {
            s.truncate(i);
        }
        s.strip_prefix("allow ").map(str::to_string).unwrap_or(s)
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "allow {}", self.pattern)?;
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        write!(f, ":{}", ports.join(","))?;
        if let Some(m) = &self.methods {
            let m: Vec<&str> = m.iter().map(Method::as_str).collect();
            write!(f, " methods {}", m.join(","))?;
        }
        if let Some(p) = &self.paths {
            let p: Vec<&str> = p.iter().map(PathPrefix::as_str).collect();
            write!(f, " paths {}", p.join(","))?;
        }
        write!(f, " ({})", self.origin)
    }
}

/// An origin (`/home/me/p.toml: allow[2]`, `/repo/hutch.toml [policy]: setup.allow[0]`, `--allow "a.com"`)
/// reduced to its source kind and field: the file's path stays on the host.
fn public_origin(origin: &str) -> String {
    if origin.starts_with("--") {
        return origin.to_string();
    }
    let (source, field) = origin.rsplit_once(": ").unwrap_or(("", origin));
    let kind = if source.ends_with("hutch.toml [policy]") {
        "hutch.toml [policy]"
    } else if source.ends_with("[policy]") {
        "user config [policy]"
    } else {
        "policy file"
    };
    format!("{kind} {field}")
}

/// Why a destination or request is refused. The Display text is what the sandbox is told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DenyReason {
    #[error("no allow rule")]
    NoRule,
    #[error("{message}")]
    BadName { message: String },
    #[error("method {method} not allowed by {rule}")]
    MethodNotAllowed { method: String, rule: String },
    #[error("path {path} not allowed by {rule}")]
    PathNotAllowed { path: String, rule: String },
    #[error("path {path} has dot-segments, backslashes or encoded separators that path rules can't judge")]
    PathAmbiguous { path: String },
}

/// The most specific rule covering `name` on `port` (exact beats wildcard, longer suffix beats
/// shorter, earlier rule beats later).
pub(crate) fn best_rule<'a>(
    rules: &'a [AllowRule],
    name: &HostName,
    port: u16,
) -> Option<&'a AllowRule> {
    rules
        .iter()
        .filter(|r| r.ports.contains(&port) && r.pattern.matches(name))
        .max_by_key(|r| (r.pattern.specificity(), std::cmp::Reverse(r.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_name_the_source_kind_never_a_host_path() {
        for (origin, want) in [
            ("/home/me/secret-dir/p.toml: allow[2]", "(policy file allow[2])"),
            ("/srv/repo/hutch.toml [policy]: setup.allow[0]", "(hutch.toml [policy] setup.allow[0])"),
            ("/home/me/.config/hutch/config.toml [policy]: allow[1]", "(user config [policy] allow[1])"),
            ("--allow \"a.com\"", "(--allow \"a.com\")"),
        ] {
            let mut r = rule(Some(&["GET"]), Some(&["/ok/"]));
            r.origin = origin.into();
            for e in [r.check_request("POST", "/ok/x"), r.check_request("GET", "/no")] {
                let msg = e.expect_err("denied").to_string();
                assert!(msg.ends_with(want) && !msg.contains("/home") && !msg.contains("/srv"), "{msg}");
            }
        }
    }

    fn rule(methods: Option<&[&str]>, paths: Option<&[&str]>) -> AllowRule {
        AllowRule {
            id: RuleId(0),
            pattern: HostPattern::parse("api.example.com").expect("pattern"),
            ports: DEFAULT_PORTS.into_iter().collect(),
            methods: methods.map(|m| {
                m.iter()
                    .map(|s| Method::parse(s).expect("method"))
                    .collect()
            }),
            paths: paths.map(|p| {
                p.iter()
                    .map(|s| PathPrefix::parse(s).expect("path"))
                    .collect()
            }),
            origin: "test".into(),
        }
    }

    /// Threat 7 (broad allowed hosts as exfiltration channels): method and path rules.
    #[test]
    fn threat7_method_and_path_rules() {
        let r = rule(Some(&["get", "HEAD"]), Some(&["/repos", "/users/"]));
        assert!(r.check_request("GET", "/repos").is_ok());
        assert!(r.check_request("GET", "/repos/a/b?x=1").is_ok());
        assert!(r.check_request("HEAD", "/users/x").is_ok());
        assert!(matches!(
            r.check_request("POST", "/repos"),
            Err(DenyReason::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("get", "/repos"),
            Err(DenyReason::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("GET", "/reposx"),
            Err(DenyReason::PathNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("GET", "/users"),
            Err(DenyReason::PathNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("GET", "/gists"),
            Err(DenyReason::PathNotAllowed { .. })
        ));
        // The query is not part of the path match.
        assert!(matches!(
            r.check_request("GET", "/x?/repos/"),
            Err(DenyReason::PathNotAllowed { .. })
        ));
    }

    /// Threat 4/7: paths that upstream servers would normalize differently are refused.
    #[test]
    fn threat4_ambiguous_paths_refused() {
        let r = rule(None, Some(&["/repos/"]));
        for p in [
            "/repos/../gists",
            "/repos/./x",
            "/repos/%2e%2e/gists",
            "/repos/..%2Fgists",
            "/repos\\..\\x",
            "repos/",
            "*",
        ] {
            assert!(
                matches!(
                    r.check_request("GET", p),
                    Err(DenyReason::PathAmbiguous { .. })
                ),
                "{p}"
            );
        }
        // Without path rules the gateway does not judge paths.
        assert!(rule(None, None).check_request("GET", "/a/../b").is_ok());
    }

    #[test]
    fn method_and_prefix_validation() {
        assert!(Method::parse("CONNECT").is_err());
        assert!(Method::parse("GE T").is_err());
        assert!(Method::parse("").is_err());
        assert!(PathPrefix::parse("repos").is_err());
        assert!(PathPrefix::parse("/a/../b").is_err());
        assert!(PathPrefix::parse("/a?b").is_err());
        assert!(PathPrefix::parse("/a%2fb").is_err());
    }
}
