//! Host names: the one canonical form every decision is made on (lowercase A-labels, LDH + dot),
//! recognition of IP literals in all the spellings resolvers accept, and allow-rule name patterns.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};
use serde::{Serialize, Serializer};

/// Longest DNS name in presentation form without the trailing dot.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A canonical host name: lowercase ASCII, A-labels for internationalized labels, labels of
/// letters, digits and inner hyphens, no trailing dot, never an IP literal.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// Canonicalizes `input` (UTS-46 to A-labels, lowercase, one trailing dot stripped) or says
    /// why it is not an acceptable host name. IP literals in any spelling are refused here.
    pub fn parse(input: &str) -> Result<HostName, NameError> {
        canonicalize(input).map_err(|kind| NameError {
            input: input.to_string(),
            kind,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `other` equal to this name or a subdomain of it on a label boundary.
    pub fn is_same_or_parent_of(&self, other: &HostName) -> bool {
        other.0 == self.0 || is_strict_subdomain(&other.0, &self.0)
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName({})", self.0)
    }
}

impl Serialize for HostName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Why a string is not an acceptable host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host name {:?} {kind}", input)]
pub struct NameError {
    input: String,
    kind: NameErrorKind,
}

impl NameError {
    pub fn kind(&self) -> &NameErrorKind {
        &self.kind
    }

    /// The IP address, when the input was an IP literal in some spelling.
    pub fn ip_literal(&self) -> Option<IpAddr> {
        match self.kind {
            NameErrorKind::IpLiteral(ip) => Some(ip),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameErrorKind {
    #[error("is empty")]
    Empty,
    #[error("contains {0}, which is never part of a host name")]
    ForbiddenChar(&'static str),
    #[error("is the IP address {0}: Hutch dials names only (allow a name and pin it with --resolve NAME:PORT:ADDR)")]
    IpLiteral(IpAddr),
    #[error("ends in a numeric label, which resolvers and URL parsers read as an IPv4 address")]
    NumericName,
    #[error("contains ':' but is not an IPv6 literal (give ports separately from names)")]
    Colon,
    #[error("is not a valid internationalized domain name (UTS-46 processing failed)")]
    Idna,
    #[error("contains {0:?} after IDNA processing; only letters, digits, '-' and '.' are allowed")]
    NotLdh(char),
    #[error("has an empty label")]
    EmptyLabel,
    #[error("has a label longer than 63 characters")]
    LabelTooLong,
    #[error("has a label that starts or ends with '-'")]
    HyphenAtEdge,
    #[error("is longer than 253 characters")]
    TooLong,
}

fn canonicalize(input: &str) -> Result<HostName, NameErrorKind> {
    if input.is_empty() {
        return Err(NameErrorKind::Empty);
    }
    for c in input.chars() {
        let what = match c {
            '\0' => "a NUL byte",
            '\r' | '\n' => "CR or LF",
            c if c.is_control() => "a control character",
            c if c.is_whitespace() => "whitespace",
            _ => continue,
        };
        return Err(NameErrorKind::ForbiddenChar(what));
    }
    // Colons never appear in names: this is an IPv6 literal (maybe bracketed, maybe with a zone
    // id) and must be recognized as one before '%' is rejected as a character.
    if input.contains(':') || input.starts_with('[') {
        return Err(match parse_ipv6_literal(input) {
            Some(ip) => NameErrorKind::IpLiteral(embedded_or_self(ip)),
            None => NameErrorKind::Colon,
        });
    }
    if input.contains('%') {
        return Err(NameErrorKind::ForbiddenChar("'%'"));
    }
    let ascii = Uts46::new()
        .to_ascii(
            input.as_bytes(),
            AsciiDenyList::EMPTY,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map_err(|_| NameErrorKind::Idna)?;
    let mut name: &str = &ascii;
    if let Some(stripped) = name.strip_suffix('.') {
        name = stripped;
    }
    if name.is_empty() {
        return Err(NameErrorKind::Empty);
    }
    // UTS-46 maps full-width digits and dots, so numeric forms are judged after mapping.
    let last = name.rsplit('.').next().unwrap_or(name);
    if is_numeric_label(last) {
        return Err(match parse_ipv4_loose(name) {
            Some(v4) => NameErrorKind::IpLiteral(IpAddr::V4(v4)),
            None => NameErrorKind::NumericName,
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(NameErrorKind::NotLdh(c));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameErrorKind::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameErrorKind::LabelTooLong);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(NameErrorKind::HyphenAtEdge);
        }
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameErrorKind::TooLong);
    }
    Ok(HostName(name.to_ascii_lowercase()))
}

/// The WHATWG URL "ends in a number" test: decimal digits, or `0x` followed by hex digits.
fn is_numeric_label(label: &str) -> bool {
    if !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(rest) => rest.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// inet_aton(3) semantics: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x); the last
/// part fills the remaining bytes. `127.1`, `0x7f.1`, `2130706433`, `0177.0.0.1` all parse.
pub fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        nums.push(parse_ipv4_part(p)?);
    }
    let (last, init) = nums.split_last()?;
    let mut value: u64 = 0;
    for n in init {
        if *n > 255 {
            return None;
        }
        value = (value << 8) | n;
    }
    let rest_bits = 8 * (4 - init.len() as u32);
    if *last >= (1u64 << rest_bits) {
        return None;
    }
    value = (value << rest_bits) | last;
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_part(p: &str) -> Option<u64> {
    // Long runs of digits would overflow; no valid part needs more than 11 characters.
    if p.len() > 12 {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        if h.is_empty() {
            return Some(0);
        }
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

fn parse_ipv6_literal(input: &str) -> Option<Ipv6Addr> {
    let inner = match input.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']')?,
        None => input,
    };
    // A zone id (`fe80::1%eth0`, or `%25eth0` as URLs spell it) names an interface, not a host.
    let addr = inner.split('%').next().unwrap_or(inner);
    addr.parse().ok()
}

/// v4-mapped IPv6 addresses are reported as the IPv4 address they carry.
fn embedded_or_self(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

fn is_strict_subdomain(name: &str, parent: &str) -> bool {
    name.len() > parent.len() + 1
        && name.ends_with(parent)
        && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
}

/// The host part of an allow rule or secret binding: one exact name, or `*.suffix` for every
/// name strictly below `suffix` on a label boundary (never `suffix` itself).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(HostName),
    Subdomains(HostName),
}

/// Why a string is not an acceptable host pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("'*' is only allowed as the whole first label, as in *.example.com")]
    MisplacedWildcard,
    #[error("*.{0} is too broad: a wildcard must sit below a domain of at least two labels")]
    TooBroad(HostName),
}

impl HostPattern {
    pub fn parse(input: &str) -> Result<HostPattern, PatternError> {
        if let Some(suffix) = input.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(PatternError::MisplacedWildcard);
            }
            let name = HostName::parse(suffix)?;
            if !name.as_str().contains('.') {
                return Err(PatternError::TooBroad(name));
            }
            return Ok(HostPattern::Subdomains(name));
        }
        if input.contains('*') {
            return Err(PatternError::MisplacedWildcard);
        }
        Ok(HostPattern::Exact(HostName::parse(input)?))
    }

    pub fn matches(&self, name: &HostName) -> bool {
        match self {
            HostPattern::Exact(n) => n == name,
            HostPattern::Subdomains(suffix) => is_strict_subdomain(name.as_str(), suffix.as_str()),
        }
    }

    /// True when every name `other` matches is also matched by `self`.
    pub fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (_, HostPattern::Exact(n)) => self.matches(n),
            (HostPattern::Exact(_), HostPattern::Subdomains(_)) => false,
            (HostPattern::Subdomains(a), HostPattern::Subdomains(b)) => a.is_same_or_parent_of(b),
        }
    }

    /// Higher is more specific; an exact name beats any wildcard, a longer suffix beats a shorter.
    pub(crate) fn specificity(&self) -> usize {
        match self {
            HostPattern::Exact(_) => usize::MAX,
            HostPattern::Subdomains(s) => s.as_str().len(),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => write!(f, "{n}"),
            HostPattern::Subdomains(n) => write!(f, "*.{n}"),
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPattern({self})")
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> String {
        match HostName::parse(input) {
            Ok(n) => n.as_str().to_string(),
            Err(e) => panic!("{input:?} should parse: {e}"),
        }
    }

    fn kind(input: &str) -> NameErrorKind {
        match HostName::parse(input) {
            Ok(n) => panic!("{input:?} should be refused, got {n}"),
            Err(e) => e.kind().clone(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    /// Threat 3 (name canonicalization): case, trailing dot, IDNA forms all land on one spelling.
    #[test]
    fn threat3_canonical_forms() {
        let table = [
            ("example.com", "example.com"),
            ("EXAMPLE.COM", "example.com"),
            ("Example.Com.", "example.com"),
            ("api.GitHub.com", "api.github.com"),
            ("bücher.de", "xn--bcher-kva.de"),
            ("BÜCHER.de", "xn--bcher-kva.de"),
            ("xn--bcher-kva.de", "xn--bcher-kva.de"),
            // Full-width dot U+FF0E and ideographic full stop U+3002 map to '.' under UTS-46.
            ("example\u{ff0e}com", "example.com"),
            ("example\u{3002}com", "example.com"),
            // Full-width letters map to ASCII.
            ("\u{ff45}xample.com", "example.com"),
            ("a-b.example.com", "a-b.example.com"),
            ("123abc.example.com", "123abc.example.com"),
        ];
        for (input, want) in table {
            assert_eq!(ok(input), want, "input {input:?}");
        }
    }

    /// Threat 3: every IP-literal spelling is recognized as an address, never taken as a name.
    #[test]
    fn threat3_ip_literals_in_all_spellings() {
        let table = [
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("0x7f.1", "127.0.0.1"),
            ("0X7F.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("0", "0.0.0.0"),
            ("169.254.169.254", "169.254.169.254"),
            ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%25eth0]", "fe80::1"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("[::ffff:7f00:1]", "127.0.0.1"),
            ("fd00:ec2::254", "fd00:ec2::254"),
            // Full-width digits and dots map to an IPv4 literal under UTS-46.
            (
                "\u{ff11}\u{ff12}\u{ff17}\u{ff0e}\u{ff10}\u{ff0e}\u{ff10}\u{ff0e}\u{ff11}",
                "127.0.0.1",
            ),
        ];
        for (input, want) in table {
            assert_eq!(
                kind(input),
                NameErrorKind::IpLiteral(ip(want)),
                "input {input:?}"
            );
        }
    }

    /// Threat 3: numeric final labels that are not valid addresses are still not names.
    #[test]
    fn threat3_numeric_names_refused() {
        for input in [
            "256.256.256.256",
            "1.2.3.4.5",
            "example.123",
            "0x",
            "08.1",
            "4294967296",
        ] {
            let k = kind(input);
            assert!(
                matches!(k, NameErrorKind::NumericName | NameErrorKind::IpLiteral(_)),
                "{input:?} gave {k:?}"
            );
        }
        assert_eq!(kind("example.123"), NameErrorKind::NumericName);
        assert_eq!(kind("4294967296"), NameErrorKind::NumericName);
    }

    /// Threat 4 (parser differentials): bytes that split names differently in other parsers.
    #[test]
    fn threat4_forbidden_bytes_refused() {
        let table = [
            ("exa\0mple.com", NameErrorKind::ForbiddenChar("a NUL byte")),
            (
                "example.com\r\nHost: evil.com",
                NameErrorKind::ForbiddenChar("CR or LF"),
            ),
            ("example.com\n", NameErrorKind::ForbiddenChar("CR or LF")),
            ("exam%70le.com", NameErrorKind::ForbiddenChar("'%'")),
            (
                "exa\u{7}mple.com",
                NameErrorKind::ForbiddenChar("a control character"),
            ),
            ("exa mple.com", NameErrorKind::ForbiddenChar("whitespace")),
            ("example.com/path", NameErrorKind::NotLdh('/')),
            ("user@example.com", NameErrorKind::NotLdh('@')),
            ("under_score.com", NameErrorKind::NotLdh('_')),
            ("example..com", NameErrorKind::EmptyLabel),
            (".example.com", NameErrorKind::EmptyLabel),
            ("example.com..", NameErrorKind::EmptyLabel),
            ("-example.com", NameErrorKind::HyphenAtEdge),
            ("", NameErrorKind::Empty),
            (".", NameErrorKind::Empty),
            ("example.com:443", NameErrorKind::Colon),
        ];
        for (input, want) in table {
            assert_eq!(kind(input), want, "input {input:?}");
        }
        // Full-width percent sign maps to '%' under UTS-46 and is then refused as non-LDH.
        assert_eq!(kind("exam\u{ff05}70le.com"), NameErrorKind::NotLdh('%'));
    }

    #[test]
    fn threat4_length_limits() {
        let label64 = "a".repeat(64);
        assert_eq!(kind(&format!("{label64}.com")), NameErrorKind::LabelTooLong);
        let label63 = "a".repeat(63);
        ok(&format!("{label63}.com"));
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(long.len() > 253);
        assert_eq!(kind(&long), NameErrorKind::TooLong);
    }

    /// Threat 9 (IDN lookalikes, matching bugs): lookalikes become xn-- labels that match nothing.
    #[test]
    fn threat9_lookalikes_do_not_match() {
        let allowed = HostPattern::parse("github.com").expect("pattern");
        let wildcard = HostPattern::parse("*.github.com").expect("pattern");
        // Cyrillic 'і' (U+0456) and 'о' (U+043E) in place of Latin letters.
        for input in [
            "g\u{456}thub.com",
            "api.g\u{456}thub.com",
            "github.c\u{43e}m",
            "gіthub.com",
        ] {
            let name = HostName::parse(input).expect("lookalikes are valid IDNs");
            assert!(name.as_str().contains("xn--"), "{input:?} -> {name}");
            assert!(!allowed.matches(&name), "{input:?} matched {allowed}");
            assert!(!wildcard.matches(&name), "{input:?} matched {wildcard}");
        }
        // A full-width dot is normalized and then matches correctly.
        let fw = HostName::parse("api\u{ff0e}github\u{ff0e}com").expect("full-width dots");
        assert!(wildcard.matches(&fw));
    }

    /// Threat 9: suffix and prefix tricks against exact and wildcard rules.
    #[test]
    fn threat9_label_boundaries() {
        let exact = HostPattern::parse("allowed.com").expect("pattern");
        let wildcard = HostPattern::parse("*.allowed.com").expect("pattern");
        let table = [
            ("allowed.com", true, false),
            ("ALLOWED.COM.", true, false),
            ("api.allowed.com", false, true),
            ("a.b.allowed.com", false, true),
            ("allowed.com.evil.com", false, false),
            ("evilallowed.com", false, false),
            ("api.evilallowed.com", false, false),
            ("allowed.co", false, false),
            ("xallowed.com", false, false),
            ("allowed.com.", true, false),
        ];
        for (input, want_exact, want_wild) in table {
            let name = HostName::parse(input).expect("valid name");
            assert_eq!(exact.matches(&name), want_exact, "exact vs {input:?}");
            assert_eq!(wildcard.matches(&name), want_wild, "wildcard vs {input:?}");
        }
    }

    #[test]
    fn patterns_parse_and_cover() {
        assert!(matches!(
            HostPattern::parse("*.com"),
            Err(PatternError::TooBroad(_))
        ));
        assert!(matches!(
            HostPattern::parse("*"),
            Err(PatternError::MisplacedWildcard)
        ));
        assert!(matches!(
            HostPattern::parse("a.*.com"),
            Err(PatternError::MisplacedWildcard)
        ));
        assert!(matches!(
            HostPattern::parse("*.*.com"),
            Err(PatternError::MisplacedWildcard)
        ));
        assert!(matches!(
            HostPattern::parse("*.127.0.0.1"),
            Err(PatternError::Name(_))
        ));
        let w = HostPattern::parse("*.Bücher.DE").expect("idn wildcard");
        assert_eq!(w.to_string(), "*.xn--bcher-kva.de");
        let sub = HostPattern::parse("*.api.example.com").expect("pattern");
        let top = HostPattern::parse("*.example.com").expect("pattern");
        let one = HostPattern::parse("x.example.com").expect("pattern");
        assert!(top.covers(&sub));
        assert!(top.covers(&one));
        assert!(!sub.covers(&top));
        assert!(!one.covers(&top));
        assert!(!top.covers(&HostPattern::parse("example.com").expect("pattern")));
    }

    #[test]
    fn ipv4_loose_parser_rejects_overflow() {
        assert_eq!(parse_ipv4_loose("1.2.3.256"), None);
        assert_eq!(parse_ipv4_loose("1.2.65536"), None);
        assert_eq!(parse_ipv4_loose("256.1"), None);
        assert_eq!(parse_ipv4_loose("09"), None);
        assert_eq!(
            parse_ipv4_loose("1.2.65535"),
            Some(Ipv4Addr::new(1, 2, 255, 255))
        );
    }
}
