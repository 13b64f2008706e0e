//! Credential files in the working tree (threat 12): `.env`, private keys, token files, cloud credentials,
//! Terraform state. Everything in the VM can reach the model provider as context, and from there anywhere the
//! agent may send it, so a real key in such a file would defeat the gateway. Untracked files that match are
//! left out of the snapshot that goes into the VM; tracked ones go in (their content is already in the
//! history that goes in) and are named in a warning.
//!
//! The built-in list is typed (like [`crate::sensitive`]); the user's config and an approved `hutch.toml` add
//! patterns (`exclude`) or let files through (`include`) in a gitignore-like syntax ([`PathPattern`]), and
//! `hutch run --include PATH` lets one file through for one run. Higher sources decide first: the flags, the
//! user's config, the approved `hutch.toml`, then the built-in list; within one source, `exclude` wins.

use std::fmt;

/// What kind of credential a built-in rule is about (for documentation and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CredentialKind {
    /// `.env`, `.env.*` (not the example, sample, template or dist copies), `.envrc`.
    EnvFile,
    /// `*.pem`, `*.key`, `*.ppk`, `*.p8`.
    PrivateKey,
    /// `id_rsa*`, `id_ed25519*`, `id_ecdsa*`, `id_dsa*` (not `*.pub`).
    SshKey,
    /// `*.keystore`, `*.jks`, `*.p12`, `*.pfx`, `*.kdbx`.
    KeyStore,
    /// Tools' token and password files: `.npmrc`, `.pypirc`, `.netrc`, `.git-credentials`,
    /// `.docker/config.json`, `.cargo/credentials(.toml)`, `.gem/credentials`, `.pgpass`, `.my.cnf`, `.htpasswd`.
    ToolCredentials,
    /// `.aws/credentials`, `credentials.json`, `application_default_credentials.json`, `.kube/config`.
    CloudCredentials,
    /// `*.tfstate`, `*.tfstate.backup`, `.terraform/`, `*.tfvars`.
    Terraform,
    /// `secrets.yml`, `secrets.yaml`, `secrets.json`, `secrets.toml`, `.secrets`.
    SecretsFile,
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialKind::EnvFile => "environment file",
            CredentialKind::PrivateKey => "private key",
            CredentialKind::SshKey => "SSH key",
            CredentialKind::KeyStore => "key store",
            CredentialKind::ToolCredentials => "tool credentials",
            CredentialKind::CloudCredentials => "cloud credentials",
            CredentialKind::Terraform => "Terraform state or variables",
            CredentialKind::SecretsFile => "secrets file",
        })
    }
}

/// How a built-in rule matches a repository-relative path (ASCII case-insensitively: the tree may come from, or
/// land on, a case-folding filesystem, and `.ENV` holds the same kind of thing as `.env`).
#[derive(Debug, Clone, Copy)]
enum Match {
    /// The file name matches this glob (`*` and `?`), unless it matches one of the exceptions.
    Name(&'static str, &'static [&'static str]),
    /// A directory of this name at any depth: everything under it.
    Dir(&'static str),
    /// The path ends with these components (`.aws`, `credentials`).
    Tail(&'static [&'static str]),
}

use CredentialKind::*;
use Match::*;

/// Copies of an env file that carry no values by convention.
const ENV_EXAMPLES: &[&str] = &[".env*.example", ".env*.sample", ".env*.template", ".env*.dist", ".env*.defaults"];
const PUBLIC_KEY: &[&str] = &["*.pub"];

const RULES: &[(Match, CredentialKind)] = &[
    (Name(".env", &[]), EnvFile),
    (Name(".env.*", ENV_EXAMPLES), EnvFile),
    (Name(".envrc", &[]), EnvFile),
    (Name("*.pem", &[]), PrivateKey),
    (Name("*.key", &[]), PrivateKey),
    (Name("*.ppk", &[]), PrivateKey),
    (Name("*.p8", &[]), PrivateKey),
    (Name("id_rsa*", PUBLIC_KEY), SshKey),
    (Name("id_ed25519*", PUBLIC_KEY), SshKey),
    (Name("id_ecdsa*", PUBLIC_KEY), SshKey),
    (Name("id_dsa*", PUBLIC_KEY), SshKey),
    (Name("*.keystore", &[]), KeyStore),
    (Name("*.jks", &[]), KeyStore),
    (Name("*.p12", &[]), KeyStore),
    (Name("*.pfx", &[]), KeyStore),
    (Name("*.kdbx", &[]), KeyStore),
    (Name(".npmrc", &[]), ToolCredentials),
    (Name(".pypirc", &[]), ToolCredentials),
    (Name(".netrc", &[]), ToolCredentials),
    (Name("_netrc", &[]), ToolCredentials),
    (Name(".git-credentials", &[]), ToolCredentials),
    (Name(".pgpass", &[]), ToolCredentials),
    (Name(".my.cnf", &[]), ToolCredentials),
    (Name(".htpasswd", &[]), ToolCredentials),
    (Tail(&[".docker", "config.json"]), ToolCredentials),
    (Tail(&[".cargo", "credentials"]), ToolCredentials),
    (Tail(&[".cargo", "credentials.toml"]), ToolCredentials),
    (Tail(&[".gem", "credentials"]), ToolCredentials),
    (Tail(&[".aws", "credentials"]), CloudCredentials),
    (Tail(&[".kube", "config"]), CloudCredentials),
    (Name("credentials.json", &[]), CloudCredentials),
    (Name("application_default_credentials.json", &[]), CloudCredentials),
    (Name("*.tfstate", &[]), Terraform),
    (Name("*.tfstate.backup", &[]), Terraform),
    (Name("*.tfvars", &[]), Terraform),
    (Dir(".terraform"), Terraform),
    (Name("secrets.yml", &[]), SecretsFile),
    (Name("secrets.yaml", &[]), SecretsFile),
    (Name("secrets.json", &[]), SecretsFile),
    (Name("secrets.toml", &[]), SecretsFile),
    (Name(".secrets", &[]), SecretsFile),
];

/// `*` (any run of bytes, `/` never occurs here) and `?` (one byte) against one path component.
fn glob(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && pat[p] == b'*' {
            back = Some((p, n));
            p += 1;
        } else if p < pat.len() && (pat[p] == b'?' || pat[p].eq_ignore_ascii_case(&name[n])) {
            p += 1;
            n += 1;
        } else if let Some((bp, bn)) = back {
            p = bp + 1;
            n = bn + 1;
            back = Some((bp, bn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// The kind of the first built-in rule that matches `path` (repository-relative, `/`-separated), if any.
pub fn builtin(path: &[u8]) -> Option<CredentialKind> {
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let last = comps.last().copied().unwrap_or_default();
    RULES.iter().find_map(|(m, kind)| {
        let hit = match *m {
            Name(g, except) => glob(g.as_bytes(), last) && !except.iter().any(|e| glob(e.as_bytes(), last)),
            Dir(d) => comps[..comps.len().saturating_sub(1)].iter().any(|c| eq(c, d)),
            Tail(t) => comps.len() >= t.len() && comps[comps.len() - t.len()..].iter().zip(t).all(|(c, n)| eq(c, n)),
        };
        hit.then_some(*kind)
    })
}

/// A path pattern from a config file or `--include`, in a subset of gitignore's syntax: `*` and `?` within one
/// component; a pattern with a `/` at its start or middle is anchored at the repository's top, one without
/// matches at any depth (as does one starting with `**/`); a trailing `/` matches directories only; a pattern
/// that names a directory covers everything under it. Matching ignores ASCII case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    comps: Vec<String>,
    anchored: bool,
    dir_only: bool,
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        if s.is_empty() {
            return Err("an empty pattern matches nothing; remove it".into());
        }
        if s.len() > 4096 {
            return Err("is longer than 4096 bytes".into());
        }
        if s.chars().any(|c| c.is_control()) {
            return Err("contains a control character".into());
        }
        if s.contains('\\') || s.contains('[') || s.contains('!') {
            return Err("uses `\\`, `[` or `!`, which hutch does not support; use `*` and `?`".into());
        }
        let mut rest = s;
        let mut anchored = false;
        if let Some(r) = rest.strip_prefix("**/") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix('/') {
            rest = r;
            anchored = true;
        }
        let dir_only = rest.ends_with('/');
        let body = rest.trim_end_matches('/');
        if body.is_empty() {
            return Err("names no file or directory".into());
        }
        if !anchored && !s.starts_with("**/") && body.contains('/') {
            anchored = true;
        }
        let comps: Vec<String> = body.split('/').map(str::to_string).collect();
        for c in &comps {
            if c.is_empty() {
                return Err("has an empty component (`//`)".into());
            }
            if c == "." || c == ".." {
                return Err(format!("has a `{c}` component; write paths from the repository's top"));
            }
            if c.contains("**") {
                return Err("uses `**` other than as a leading `**/`".into());
            }
        }
        Ok(PathPattern { text: s.to_string(), comps, anchored, dir_only })
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches `path` (repository-relative, `/`-separated) or a directory above it.
    pub fn matches(&self, path: &[u8]) -> bool {
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        let n = self.comps.len();
        if comps.len() < n {
            return false;
        }
        let starts = if self.anchored { 0..=0 } else { 0..=comps.len() - n };
        starts.into_iter().any(|s| {
            let end = s + n;
            (!self.dir_only || end < comps.len()) && self.comps.iter().zip(&comps[s..end]).all(|(p, c)| glob(p.as_bytes(), c))
        })
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A `[credentials]` table as written (the user's config and `hutch.toml`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredentials {
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub include: Vec<String>,
}

/// One source's `[credentials]`: patterns to leave out besides the built-in list, and files to send anyway.
#[derive(Debug, Clone, Default)]
pub struct CredentialRules {
    pub exclude: Vec<PathPattern>,
    pub include: Vec<PathPattern>,
}

impl CredentialRules {
    /// From a `[credentials]` table's lists; `origin` names the table in errors (`config.toml [credentials]`).
    pub fn parse(exclude: &[String], include: &[String], origin: &str) -> Result<CredentialRules, String> {
        let list = |v: &[String], key: &str| -> Result<Vec<PathPattern>, String> {
            v.iter().enumerate().map(|(i, s)| PathPattern::parse(s).map_err(|e| format!("{origin}: {key}[{i}] = {s:?}: {e}"))).collect()
        };
        Ok(CredentialRules { exclude: list(exclude, "exclude")?, include: list(include, "include")? })
    }

    /// From a parsed `[credentials]` table.
    pub fn from_raw(raw: &RawCredentials, origin: &str) -> Result<CredentialRules, String> {
        Self::parse(&raw.exclude, &raw.include, origin)
    }

    pub fn is_empty(&self) -> bool {
        self.exclude.is_empty() && self.include.is_empty()
    }

    /// `Some(true)` to leave `path` out, `Some(false)` to send it, `None` when this source says nothing.
    fn decide(&self, path: &[u8]) -> Option<bool> {
        if self.exclude.iter().any(|p| p.matches(path)) {
            Some(true)
        } else if self.include.iter().any(|p| p.matches(path)) {
            Some(false)
        } else {
            None
        }
    }
}

/// Which working-tree files are credentials: the sources from highest to lowest, then the built-in list.
#[derive(Debug, Clone, Default)]
pub struct CredentialFilter {
    layers: Vec<CredentialRules>,
}

impl CredentialFilter {
    /// `layers` highest first: `--include` flags, the user's config, the approved `hutch.toml`.
    pub fn new(layers: Vec<CredentialRules>) -> CredentialFilter {
        CredentialFilter { layers }
    }

    /// Whether `path` is a credential file that stays out of the VM unless tracked.
    pub fn is_credential(&self, path: &[u8]) -> bool {
        self.layers.iter().find_map(|l| l.decide(path)).unwrap_or_else(|| builtin(path).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Class 12 (secrets on disk images): the list and the like are recognised at any depth, in any case.
    #[test]
    fn class_12_credential_files_are_recognised() {
        let cases: &[(&str, CredentialKind)] = &[
            (".env", EnvFile),
            ("config/.env", EnvFile),
            (".ENV", EnvFile),
            (".env.local", EnvFile),
            ("app/.env.production", EnvFile),
            (".env.example.local", EnvFile),
            (".envrc", EnvFile),
            ("certs/server.pem", PrivateKey),
            ("config/master.key", PrivateKey),
            ("deploy/id_rsa", SshKey),
            ("id_ed25519", SshKey),
            ("keys/id_ecdsa_backup", SshKey),
            ("id_dsa", SshKey),
            ("android/release.keystore", KeyStore),
            ("release.jks", KeyStore),
            ("cert.P12", KeyStore),
            ("cert.pfx", KeyStore),
            (".npmrc", ToolCredentials),
            ("web/.npmrc", ToolCredentials),
            (".pypirc", ToolCredentials),
            (".netrc", ToolCredentials),
            (".git-credentials", ToolCredentials),
            (".docker/config.json", ToolCredentials),
            ("home/.docker/config.json", ToolCredentials),
            (".cargo/credentials.toml", ToolCredentials),
            (".aws/credentials", CloudCredentials),
            ("ops/.aws/credentials", CloudCredentials),
            ("credentials.json", CloudCredentials),
            (".kube/config", CloudCredentials),
            ("infra/terraform.tfstate", Terraform),
            ("terraform.tfstate.backup", Terraform),
            (".terraform/providers/x/lock.json", Terraform),
            ("infra/.terraform/terraform.tfstate", Terraform),
            ("prod.tfvars", Terraform),
            ("config/secrets.yml", SecretsFile),
            ("secrets.json", SecretsFile),
        ];
        for (p, want) in cases {
            assert_eq!(builtin(p.as_bytes()), Some(*want), "{p}");
            assert!(CredentialFilter::default().is_credential(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn class_12_examples_public_keys_and_ordinary_files_are_not_credentials() {
        for p in [
            ".env.example",
            "config/.env.sample",
            ".env.template",
            ".env.dist",
            ".env.local.example",
            ".ENV.EXAMPLE",
            "deploy/id_rsa.pub",
            "id_ed25519.pub",
            "src/env.rs",
            "environment.md",
            ".envs/readme",
            "keys.md",
            "src/key.rs",
            "docs/pem-format.md",
            "docker/config.json",
            ".aws/config",
            "aws/credentials",
            "credentials.json.md",
            "terraform/main.tf",
            ".terraform.lock.hcl",
            "terraform",
            "secrets.md",
            "id_rsa_docs/readme.md",
        ] {
            assert_eq!(builtin(p.as_bytes()), None, "{p}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob(b"*.pem", b"a.pem"));
        assert!(glob(b"*.pem", b".pem"));
        assert!(!glob(b"*.pem", b"a.pem.txt"));
        assert!(glob(b"id_rsa*", b"id_rsa"));
        assert!(glob(b"a*b*c", b"aXbYbZc"));
        assert!(!glob(b"a*b*c", b"aXbYbZ"));
        assert!(glob(b"?.key", b"x.KEY"));
        assert!(!glob(b"?.key", b"xy.key"));
        assert!(glob(b"*", b""));
    }

    #[test]
    fn patterns_follow_gitignore_anchoring() {
        let m = |p: &str, path: &str| PathPattern::parse(p).unwrap().matches(path.as_bytes());
        assert!(m("config/.env", "config/.env"));
        assert!(!m("config/.env", "sub/config/.env"), "a pattern with a slash is anchored");
        assert!(m("**/config/.env", "sub/config/.env"));
        assert!(m("/.env", ".env") && !m("/.env", "a/.env"));
        assert!(m(".env", "a/b/.env"), "a bare name matches at any depth");
        assert!(m("*.pem", "certs/x.pem"));
        assert!(m("fixtures", "test/fixtures/key.pem"), "a directory covers what is under it");
        assert!(m("fixtures/", "fixtures/key.pem") && !m("fixtures/", "fixtures"), "a trailing slash: directories only");
        assert!(m("test/fixtures/*.pem", "test/fixtures/a.pem") && !m("test/fixtures/*.pem", "test/fixtures/a.key"));
        assert!(m("Config/.ENV", "config/.env"));
        for bad in ["", "/", "a//b", "../x", "a/./b", "a/**/b", "[ab]", "!x", "a\\b", "a\nb"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn class_12_higher_sources_decide_and_exclude_wins_within_one() {
        let rules = |ex: &[&str], inc: &[&str]| {
            let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
            CredentialRules::parse(&s(ex), &s(inc), "test").unwrap()
        };
        let user = rules(&["*.secret", "local/"], &["*.pem", "test/fixtures/"]);
        let project = rules(&["private/"], &["config/.env", "certs/server.pem"]);
        let flags = rules(&[], &["local/keep.txt"]);
        let f = CredentialFilter::new(vec![flags, user, project]);
        assert!(!f.is_credential(b"certs/a.pem"), "the user removed *.pem");
        assert!(f.is_credential(b"x/db.secret"), "the user added *.secret");
        assert!(!f.is_credential(b"config/.env"), "the approved project's include");
        assert!(f.is_credential(b"private/notes.txt"), "the project's own exclude");
        assert!(!f.is_credential(b"test/fixtures/id_rsa"));
        assert!(!f.is_credential(b"local/keep.txt"), "--include beats the user's exclude");
        assert!(f.is_credential(b"local/other.txt"));
        assert!(f.is_credential(b"deploy/id_rsa"), "the built-in list below them");
        let both = CredentialFilter::new(vec![rules(&["a.env"], &["*.env"])]);
        assert!(both.is_credential(b"a.env") && !both.is_credential(b"b.env"), "within one source, exclude wins");
        let e = CredentialRules::parse(&["ok".into(), "../x".into()], &[], "cfg [credentials]").unwrap_err();
        assert!(e.contains("cfg [credentials]: exclude[1] = \"../x\""), "{e}");
    }
}
