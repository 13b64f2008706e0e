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

    pub(crate) fn matches(&self, path: &str) -> bool {
        let p = self.0.as_str();
        path == p
            || (path.starts_with(p)
                && (p.ends_with('/') || path.as_bytes().get(p.len()) == Some(&b'/')))
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| seg == "." || seg == "..")
}

/// Encoded dots, slashes, backslashes and semicolons, double encoding (`%25`) and overlong UTF-8
/// (`%c0`, `%c1`): servers decode these differently, so a path rule can't judge a path holding them.
fn has_encoded_separator(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ["%2e", "%2f", "%5c", "%3b", "%25", "%c0", "%c1", "%00"]
        .iter()
        .any(|e| lower.contains(e))
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

    /// Decides one HTTP request on a connection this rule allowed. `target` is the request
    /// target's path with or without a query; `header_names` are the request's header names (any
    /// case), so that method overrides can be seen.
    pub fn check_request(
        &self,
        method: &str,
        target: &str,
        header_names: &[&str],
    ) -> Result<(), DenyReason> {
        if let Some(methods) = &self.methods {
            if !methods.iter().any(|m| m.as_str() == method) {
                return Err(DenyReason::MethodNotAllowed {
                    method: method.to_string(),
                    rule: self.public(),
                });
            }
            if let Some(how) = method_override(target, header_names) {
                return Err(DenyReason::MethodOverride {
                    how,
                    rule: self.public(),
                });
            }
        }
        if let Some(paths) = &self.paths {
            let judged = JudgedPath::new(target)?;
            if !paths.iter().any(|p| judged.under(p)) {
                return Err(DenyReason::PathNotAllowed {
                    path: judged.raw.to_string(),
                    rule: self.public(),
                });
            }
        }
        Ok(())
    }
}

/// Headers that servers and frameworks read as "treat this request as method X".
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] =
    ["x-http-method-override", "x-http-method", "x-method-override"];

/// Query parameters with the same meaning (Rails, Laravel, Symfony, ...).
const METHOD_OVERRIDE_PARAMS: [&str; 4] = [
    "_method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// How `target` and `header_names` ask the server to use another method than the request line's, if they do.
pub fn method_override(target: &str, header_names: &[&str]) -> Option<String> {
    if let Some(h) = header_names
        .iter()
        .find(|h| METHOD_OVERRIDE_HEADERS.iter().any(|o| h.eq_ignore_ascii_case(o)))
    {
        return Some(format!("header {}", h.to_ascii_lowercase()));
    }
    let query = target.split_once('?').map(|(_, q)| q)?;
    let query = query.split('#').next().unwrap_or(query);
    for pair in query.split(['&', ';']) {
        let name = pair.split('=').next().unwrap_or(pair);
        let decoded = percent_decode_lossy(name).to_ascii_lowercase();
        // `_method[]` and similar spellings are read the same way by some frameworks.
        let base = decoded.trim_end_matches("[]");
        if METHOD_OVERRIDE_PARAMS.contains(&base) {
            return Some(format!("query parameter {base}"));
        }
    }
    None
}

fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A request path as path rules judge it: the path as sent, and the same path with `;`
/// parameters removed from every segment (as Tomcat, Jetty and Spring read it). Both readings
/// must be free of dot segments and encoded separators, and both must fall under a prefix.
#[derive(Debug)]
pub struct JudgedPath<'a> {
    raw: &'a str,
    stripped: String,
}

impl<'a> JudgedPath<'a> {
    /// `target` may carry a query; it is not part of the path.
    pub fn new(target: &'a str) -> Result<JudgedPath<'a>, DenyReason> {
        let raw = target.split(['?', '#']).next().unwrap_or(target);
        let stripped = raw
            .split('/')
            .map(|seg| seg.split(';').next().unwrap_or(seg))
            .collect::<Vec<_>>()
            .join("/");
        let ambiguous = |p: &str| {
            !p.starts_with('/')
                || p.bytes().any(|b| b == b'\\' || b.is_ascii_control())
                || has_dot_segment(p)
                || has_encoded_separator(p)
        };
        if ambiguous(raw) || ambiguous(&stripped) {
            return Err(DenyReason::PathAmbiguous {
                path: raw.to_string(),
            });
        }
        Ok(JudgedPath { raw, stripped })
    }

    /// True when both readings are under `prefix`.
    pub fn under(&self, prefix: &PathPrefix) -> bool {
        prefix.matches(self.raw) && prefix.matches(&self.stripped)
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
    #[error("path {path} has dot-segments (also with ;parameters), backslashes or encoded separators that path rules can't judge")]
    PathAmbiguous { path: String },
    #[error("method override ({how}) not allowed by {rule}")]
    MethodOverride { how: String, rule: String },
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
            for e in [r.check_request("POST", "/ok/x", &[]), r.check_request("GET", "/no", &[]), r.check_request("GET", "/ok/x", &["x-http-method"])] {
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
        assert!(r.check_request("GET", "/repos", &[]).is_ok());
        assert!(r.check_request("GET", "/repos/a/b?x=1", &[]).is_ok());
        assert!(r.check_request("HEAD", "/users/x", &[]).is_ok());
        assert!(matches!(
            r.check_request("POST", "/repos", &[]),
            Err(DenyReason::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("get", "/repos", &[]),
            Err(DenyReason::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("GET", "/reposx", &[]),
            Err(DenyReason::PathNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("GET", "/users", &[]),
            Err(DenyReason::PathNotAllowed { .. })
        ));
        assert!(matches!(
            r.check_request("GET", "/gists", &[]),
            Err(DenyReason::PathNotAllowed { .. })
        ));
        // The query is not part of the path match.
        assert!(matches!(
            r.check_request("GET", "/x?/repos/", &[]),
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
                    r.check_request("GET", p, &[]),
                    Err(DenyReason::PathAmbiguous { .. })
                ),
                "{p}"
            );
        }
        // Without path rules the gateway does not judge paths.
        assert!(rule(None, None).check_request("GET", "/a/../b", &[]).is_ok());
    }

    /// Class 19 (request-semantics bypasses): on a method-restricted rule, method-override headers and
    /// parameters are refused; `;` parameters in dot segments and encoded dots, slashes and semicolons
    /// do not escape a path prefix, while `;` parameters in ordinary segments are judged both ways.
    #[test]
    fn class_19_method_overrides_and_path_parameters() {
        let r = rule(Some(&["GET"]), Some(&["/ok/"]));
        assert!(r.check_request("GET", "/ok/x", &["accept", "user-agent"]).is_ok());
        for h in ["X-HTTP-Method-Override", "x-http-method", "X-Method-Override"] {
            assert!(
                matches!(
                    r.check_request("GET", "/ok/x", &["accept", h]),
                    Err(DenyReason::MethodOverride { .. })
                ),
                "{h}"
            );
        }
        for q in [
            "/ok/x?_method=DELETE",
            "/ok/x?a=1&_METHOD=delete",
            "/ok/x?%5fmethod=DELETE",
            "/ok/x?_method[]=DELETE",
            "/ok/x?x-http-method-override=PUT",
            "/ok/x?a=1;_method=DELETE",
        ] {
            assert!(
                matches!(
                    r.check_request("GET", q, &[]),
                    Err(DenyReason::MethodOverride { .. })
                ),
                "{q}"
            );
        }
        // Without a method limit, overrides are the server's business.
        assert!(rule(None, Some(&["/ok/"]))
            .check_request("GET", "/ok/x?_method=DELETE", &["x-http-method-override"])
            .is_ok());
        for p in [
            "/ok/..;/secret",
            "/ok/..;jsessionid=1/secret",
            "/ok/.;x/../secret",
            "/ok/%2e%2e;/secret",
            "/ok/..%3b/secret",
            "/ok/%252e%252e/secret",
            "/ok/%c0%ae%c0%ae/secret",
        ] {
            assert!(
                matches!(
                    r.check_request("GET", p, &[]),
                    Err(DenyReason::PathAmbiguous { .. })
                ),
                "{p}"
            );
        }
        assert!(r.check_request("GET", "/ok/a;jsessionid=1/b", &[]).is_ok());
        // `/ok;x/` is `/ok/` to a server that drops parameters but not to one that keeps them.
        assert!(matches!(
            r.check_request("GET", "/ok;x/secret", &[]),
            Err(DenyReason::PathNotAllowed { .. })
        ));
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
