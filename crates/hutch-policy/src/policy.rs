//! The checked policy: host-user input (a TOML file and command-line flags) parsed once into
//! typed rules, pins, trusted upstream roots and secret bindings. It has no constructor from
//! anything the sandbox controls, and no way to widen it after it is built.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::name::{HostName, HostPattern};
use crate::rule::{best_rule, AllowRule, DenyReason, Method, PathPrefix, RuleId, DEFAULT_PORTS};
use crate::preset::{preset, Preset};
use crate::secret::{
    InjectTemplate, LoadedSecret, SecretName, SecretSource, SecretSpec, SecretTarget, SecretValue,
    SwapScope,
};

/// The phases of a `hutch run` with a setup script: the script first, then the command (the agent). Each phase
/// has its own allow rules and secrets; pins and upstream roots are shared (they say how to reach and trust a
/// name, not whether it may be reached). Phases only move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Setup,
    Agent,
}

impl Phase {
    /// Both phases, in the order they run.
    pub const ALL: [Phase; 2] = [Phase::Setup, Phase::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Agent => "agent",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the host user gave: `--policy FILE` and the flags that add to it.
#[derive(Clone, Debug, Default)]
pub struct PolicyInput {
    /// `--policy FILE`.
    pub policy_file: Option<PathBuf>,
    /// `--allow HOST[:PORT]`, repeatable.
    pub allow: Vec<String>,
    /// `--resolve HOST:PORT:ADDR[,ADDR...]`, repeatable (curl syntax).
    pub resolve: Vec<String>,
    /// `--upstream-ca FILE`, repeatable: extra trusted roots for upstream TLS.
    pub upstream_ca: Vec<PathBuf>,
    /// `--secret NAME@HOST[,HOST...]`, value from the host environment variable `NAME`.
    pub secrets: Vec<String>,
    /// `--setup-allow HOST[:PORT]`: like `allow`, for the setup phase only.
    pub setup_allow: Vec<String>,
    /// `--setup-secret NAME@HOST[,HOST...]`: like `secrets`, for the setup phase only.
    pub setup_secrets: Vec<String>,
    /// `--secret-preset PRESET[:NAME]`, repeatable.
    pub secret_presets: Vec<String>,
    /// `--setup-secret-preset PRESET[:NAME]`: like `secret_presets`, for the setup phase only.
    pub setup_secret_presets: Vec<String>,
    /// `--inspect-all`: terminate TLS for every allowed host, not only secret-bearing and
    /// rule-restricted ones.
    pub inspect_all: bool,
}

/// A policy input that can't be used, naming the field and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Table { origin: String, message: String },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Operator-pinned addresses for one name and port (`--resolve`). Pinned addresses are dialed
/// without a DNS lookup and are allowed even when they are loopback or private.
#[derive(Clone, Debug, Serialize)]
pub struct Pin {
    pub name: HostName,
    pub port: u16,
    pub addrs: Vec<IpAddr>,
}

/// Extra trusted roots for upstream TLS, read from a PEM file at policy time.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamCa {
    pub path: PathBuf,
    #[serde(skip)]
    pub pem: String,
}

/// The policy in checked form. Deny by default: a connection is allowed only by an allow rule.
#[derive(Clone, Debug, Serialize)]
pub struct CheckedPolicy {
    rules: Vec<AllowRule>,
    pins: Vec<Pin>,
    upstream_ca: Vec<UpstreamCa>,
    secrets: Vec<SecretSpec>,
    inspect_all: bool,
}

impl CheckedPolicy {
    /// Parses and checks everything the host user gave. Reads the policy file and CA files.
    /// Setup-phase rules are refused: only [`PhasedPolicy`] has a place for them.
    pub fn from_input(input: &PolicyInput) -> Result<CheckedPolicy, PolicyError> {
        PolicyLayer::from_input(input)?.single_phase()
    }

    /// Parses a policy from TOML text alone (no flags); `path` names it in errors and anchors
    /// relative file paths.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<CheckedPolicy, PolicyError> {
        PolicyLayer::from_toml_str(text, path)?.single_phase()
    }

    /// The most specific rule allowing `name` on `port`, or why the connection is denied.
    pub fn check_connect(&self, name: &HostName, port: u16) -> Result<&AllowRule, DenyReason> {
        best_rule(&self.rules, name, port).ok_or(DenyReason::NoRule)
    }

    /// A rule allowing `name` on any port: the answer for the sandbox's DNS questions.
    pub fn allows_name(&self, name: &HostName) -> Option<&AllowRule> {
        self.rules.iter().find(|r| r.pattern().matches(name))
    }

    pub fn rule(&self, id: RuleId) -> Option<&AllowRule> {
        self.rules.get(id.0)
    }

    pub fn rules(&self) -> &[AllowRule] {
        &self.rules
    }

    /// Operator-pinned addresses for `name:port`.
    pub fn pinned(&self, name: &HostName, port: u16) -> Option<&[IpAddr]> {
        self.pins
            .iter()
            .find(|p| &p.name == name && p.port == port)
            .map(|p| p.addrs.as_slice())
    }

    pub fn upstream_ca(&self) -> &[UpstreamCa] {
        &self.upstream_ca
    }

    pub fn secrets(&self) -> &[SecretSpec] {
        &self.secrets
    }

    /// True when every allowed TLS connection is to be terminated and inspected.
    pub fn inspect_all(&self) -> bool {
        self.inspect_all
    }

    /// Loads every secret's value from the host environment and files.
    pub fn load_secrets(&self) -> Result<Vec<LoadedSecret>, PolicyError> {
        self.load_secrets_with(|var| std::env::var(var).ok())
    }

    /// Loads secret values with `env` standing in for the environment (files are still read).
    pub fn load_secrets_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<LoadedSecret>, PolicyError> {
        let mut out = Vec::with_capacity(self.secrets.len());
        for spec in &self.secrets {
            let field = format!("secret {}", spec.name);
            let raw = match &spec.source {
                SecretSource::Env(var) => env(var).ok_or_else(|| {
                    invalid(
                        &field,
                        format!("environment variable ${var} is not set on the host"),
                    )
                })?,
                SecretSource::File(path) => {
                    let mut s =
                        std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                            what: "secret file",
                            path: path.clone(),
                            source,
                        })?;
                    // Files written by editors and `echo` end in a newline that is not part of the value.
                    while s.ends_with('\n') || s.ends_with('\r') {
                        s.pop();
                    }
                    s
                }
            };
            let value = SecretValue::new(raw, &format!("the value from {}", spec.source))
                .map_err(|p| invalid(&field, p))?;
            out.push(LoadedSecret {
                spec: spec.clone(),
                value,
            });
        }
        Ok(out)
    }
}

/// One phase's rules and secrets within a layer, each secret with where it came from.
#[derive(Clone, Debug, Default)]
struct PhaseRules {
    rules: Vec<AllowRule>,
    secrets: Vec<(SecretSpec, String)>,
}

/// One source of egress policy (a `--policy` file with the flags, the `[policy]` table of a config file),
/// parsed and checked on its own but not yet merged with the others: see [`PhasedPolicy::merge`].
#[derive(Clone, Debug, Default)]
pub struct PolicyLayer {
    agent: PhaseRules,
    setup: PhaseRules,
    pins: Vec<(Pin, String)>,
    upstream_ca: Vec<UpstreamCa>,
    inspect_all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    allow: Vec<toml::Value>,
    #[serde(default)]
    resolve: Vec<String>,
    #[serde(default)]
    upstream_ca: Vec<PathBuf>,
    #[serde(default)]
    secrets: BTreeMap<String, RawSecret>,
    setup: Option<RawSetup>,
    #[serde(default)]
    inspect_all: bool,
}

/// The `[setup]` table: what the setup phase may reach, in the same format.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSetup {
    #[serde(default)]
    allow: Vec<toml::Value>,
    #[serde(default)]
    secrets: BTreeMap<String, RawSecret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    host: String,
    ports: Option<Vec<u16>>,
    methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    preset: Option<String>,
    hosts: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    header: Option<String>,
    from_env: Option<String>,
    from_file: Option<PathBuf>,
    inject: Option<RawInject>,
    #[serde(default)]
    in_body: bool,
    #[serde(default)]
    in_query: bool,
    #[serde(default)]
    in_headers: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    header: String,
    value: String,
}

impl PolicyLayer {
    /// `--policy FILE` and the flags. Reads the policy file and CA files.
    pub fn from_input(input: &PolicyInput) -> Result<PolicyLayer, PolicyError> {
        let mut l = PolicyLayer::default();
        if let Some(path) = &input.policy_file {
            let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                what: "policy file",
                path: path.clone(),
                source,
            })?;
            let raw: RawFile = toml::from_str(&text).map_err(|e| PolicyError::Syntax {
                path: path.clone(),
                message: e.to_string().trim_end().to_string(),
            })?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            l.add_raw(raw, &path.display().to_string(), &base)?;
        }
        for (phase, list, flag) in [
            (Phase::Agent, &input.allow, "--allow"),
            (Phase::Setup, &input.setup_allow, "--setup-allow"),
        ] {
            for a in list {
                let field = format!("{flag} {a:?}");
                let (pattern, port) = parse_host_port(a).map_err(|p| invalid(&field, p))?;
                let ports = port.map(|p| [p].into_iter().collect());
                l.phase_mut(phase)
                    .add_rule(pattern, ports, None, None, field)?;
            }
        }
        for r in &input.resolve {
            let field = format!("--resolve {r:?}");
            let pin = parse_pin(r).map_err(|p| invalid(&field, p))?;
            l.add_pin(pin, field)?;
        }
        for path in &input.upstream_ca {
            l.upstream_ca.push(read_ca(path, path)?);
        }
        for (phase, list, flag) in [
            (Phase::Agent, &input.secrets, "--secret"),
            (Phase::Setup, &input.setup_secrets, "--setup-secret"),
        ] {
            for s in list {
                let field = format!("{flag} {s:?}");
                let spec = parse_secret_flag(s).map_err(|p| invalid(&field, p))?;
                l.phase_mut(phase).add_secret(spec, field)?;
            }
        }
        for (phase, list, flag) in [
            (Phase::Agent, &input.secret_presets, "--secret-preset"),
            (Phase::Setup, &input.setup_secret_presets, "--setup-secret-preset"),
        ] {
            for s in list {
                let field = format!("{flag} {s:?}");
                let spec = parse_preset_flag(s).map_err(|p| invalid(&field, p))?;
                l.phase_mut(phase).add_secret(spec, field)?;
            }
        }
        l.inspect_all |= input.inspect_all;
        Ok(l)
    }

    /// A policy file's text; `path` names it in errors and anchors relative file paths.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<PolicyLayer, PolicyError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut l = PolicyLayer::default();
        l.add_raw(raw, &path.display().to_string(), &base)?;
        Ok(l)
    }

    /// A table in the policy file format inside another file (`[policy]` of a config file). `origin` names it in
    /// errors (e.g. `/home/me/.config/hutch/config.toml [policy]`); relative file paths are relative to `base`.
    pub fn from_table(
        table: &toml::Table,
        origin: &str,
        base: &Path,
    ) -> Result<PolicyLayer, PolicyError> {
        let raw: RawFile =
            toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| PolicyError::Table {
                    origin: origin.to_string(),
                    message: e.message().trim_end().to_string(),
                })?;
        let mut l = PolicyLayer::default();
        l.add_raw(raw, origin, base)?;
        Ok(l)
    }

    /// True when nothing is allowed, pinned, trusted or bound in any phase.
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
            && self.upstream_ca.is_empty()
            && !self.inspect_all
            && Phase::ALL.iter().all(|p| {
                let r = self.phase(*p);
                r.rules.is_empty() && r.secrets.is_empty()
            })
    }

    /// True when the layer allows or binds anything for the setup phase.
    pub fn has_setup(&self) -> bool {
        !self.setup.rules.is_empty() || !self.setup.secrets.is_empty()
    }

    /// The allow rules for `phase`.
    pub fn rules(&self, phase: Phase) -> &[AllowRule] {
        &self.phase(phase).rules
    }

    /// The secret bindings for `phase`.
    pub fn secrets(&self, phase: Phase) -> impl Iterator<Item = &SecretSpec> {
        self.phase(phase).secrets.iter().map(|(s, _)| s)
    }

    /// Pinned names (both phases).
    pub fn pins(&self) -> impl Iterator<Item = &Pin> {
        self.pins.iter().map(|(p, _)| p)
    }

    /// Extra upstream roots (both phases).
    pub fn upstream_ca(&self) -> &[UpstreamCa] {
        &self.upstream_ca
    }

    fn phase(&self, phase: Phase) -> &PhaseRules {
        match phase {
            Phase::Setup => &self.setup,
            Phase::Agent => &self.agent,
        }
    }

    fn phase_mut(&mut self, phase: Phase) -> &mut PhaseRules {
        match phase {
            Phase::Setup => &mut self.setup,
            Phase::Agent => &mut self.agent,
        }
    }

    /// The agent phase alone, for callers without a setup phase.
    fn single_phase(self) -> Result<CheckedPolicy, PolicyError> {
        if self.has_setup() {
            return Err(invalid(
                "setup",
                "setup-phase rules ([setup], --setup-allow, --setup-secret) apply only to the setup script of `hutch run`",
            ));
        }
        Ok(PhasedPolicy::merge(&[self])?.agent)
    }

    fn add_pin(&mut self, pin: Pin, origin: String) -> Result<(), PolicyError> {
        if let Some((_, first)) = self
            .pins
            .iter()
            .find(|(p, _)| p.name == pin.name && p.port == pin.port)
        {
            return Err(invalid(
                format!("resolve {}:{} ({origin})", pin.name, pin.port),
                format!("is pinned twice (also by {first}); list all addresses in one entry"),
            ));
        }
        self.pins.push((pin, origin));
        Ok(())
    }

    fn add_raw(&mut self, raw: RawFile, file: &str, base: &Path) -> Result<(), PolicyError> {
        self.inspect_all |= raw.inspect_all;
        self.agent
            .add_allow_values(raw.allow, &format!("{file}: allow"))?;
        for (i, r) in raw.resolve.iter().enumerate() {
            let field = format!("{file}: resolve[{i}]");
            let pin = parse_pin(r).map_err(|p| invalid(&field, p))?;
            self.add_pin(pin, field)?;
        }
        for p in &raw.upstream_ca {
            self.upstream_ca.push(read_ca(&base.join(p), p)?);
        }
        self.agent
            .add_secret_tables(raw.secrets, &format!("{file}: secrets"), base)?;
        if let Some(s) = raw.setup {
            self.setup
                .add_allow_values(s.allow, &format!("{file}: setup.allow"))?;
            self.setup
                .add_secret_tables(s.secrets, &format!("{file}: setup.secrets"), base)?;
        }
        Ok(())
    }
}

impl PhaseRules {
    fn add_allow_values(
        &mut self,
        items: Vec<toml::Value>,
        prefix: &str,
    ) -> Result<(), PolicyError> {
        for (i, item) in items.into_iter().enumerate() {
            let field = format!("{prefix}[{i}]");
            match item {
                toml::Value::String(s) => {
                    let (pattern, port) = parse_host_port(&s).map_err(|p| invalid(&field, p))?;
                    self.add_rule(pattern, port.map(|p| [p].into_iter().collect()), None, None, field)?;
                }
                toml::Value::Table(t) => {
                    let r: RawAllow = toml::Value::Table(t)
                        .try_into()
                        .map_err(|e: toml::de::Error| invalid(&field, e.message().trim_end().to_string()))?;
                    let pattern = HostPattern::parse(&r.host).map_err(|e| invalid(format!("{field}.host"), e.to_string()))?;
                    let ports = match r.ports {
                        None => None,
                        Some(p) if p.is_empty() => return Err(invalid(format!("{field}.ports"), "is empty; leave it out for 443 and 80")),
                        Some(p) => {
                            if p.contains(&0) {
                                return Err(invalid(format!("{field}.ports"), "port 0 is not a port"));
                            }
                            Some(p.into_iter().collect())
                        }
                    };
                    let methods = match r.methods {
                        None => None,
                        Some(m) if m.is_empty() => return Err(invalid(format!("{field}.methods"), "is empty, which would allow no request; leave it out to allow all")),
                        Some(m) => Some(
                            m.iter()
                                .enumerate()
                                .map(|(j, s)| Method::parse(s).map_err(|p| invalid(format!("{field}.methods[{j}]"), p)))
                                .collect::<Result<BTreeSet<_>, _>>()?,
                        ),
                    };
                    let paths = match r.paths {
                        None => None,
                        Some(p) if p.is_empty() => return Err(invalid(format!("{field}.paths"), "is empty, which would allow no request; leave it out to allow all")),
                        Some(p) => Some(
                            p.iter()
                                .enumerate()
                                .map(|(j, s)| PathPrefix::parse(s).map_err(|q| invalid(format!("{field}.paths[{j}]"), q)))
                                .collect::<Result<Vec<_>, _>>()?,
                        ),
                    };
                    self.add_rule(pattern, ports, methods, paths, field)?;
                }
                other => {
                    return Err(invalid(
                        field,
                        format!("expected a string \"HOST[:PORT]\" or a table {{ host = .., ports = [..], methods = [..], paths = [..] }}, found a {}", other.type_str()),
                    ))
                }
            }
        }
        Ok(())
    }

    fn add_secret_tables(
        &mut self,
        secrets: BTreeMap<String, RawSecret>,
        prefix: &str,
        base: &Path,
    ) -> Result<(), PolicyError> {
        for (name, s) in secrets {
            let field = format!("{prefix}.{name}");
            let sname = SecretName::parse(&name).map_err(|p| invalid(&field, p))?;
            let source = match (s.from_env, s.from_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(&field, "give from_env or from_file, not both"))
                }
                (Some(v), None) => {
                    SecretName::parse(&v).map_err(|p| {
                        invalid(
                            format!("{field}.from_env"),
                            p.replace("secret name", "variable name"),
                        )
                    })?;
                    SecretSource::Env(v)
                }
                (None, Some(f)) => SecretSource::File(base.join(f)),
                (None, None) => SecretSource::Env(name.clone()),
            };
            let preset = match &s.preset {
                Some(p) => Some(preset(p).map_err(|e| invalid(format!("{field}.preset"), e))?),
                None => None,
            };
            let mut targets = match (&s.hosts, preset) {
                (Some(h), _) if h.is_empty() => {
                    return Err(invalid(
                        format!("{field}.hosts"),
                        "is empty; a secret must be bound to at least one host",
                    ))
                }
                (Some(h), _) => h
                    .iter()
                    .enumerate()
                    .map(|(j, t)| {
                        SecretTarget::parse(t).map_err(|e| invalid(format!("{field}.hosts[{j}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                (None, Some(p)) => preset_targets(p),
                (None, None) => {
                    return Err(invalid(
                        format!("{field}.hosts"),
                        "is missing; bind the secret to hosts (\"HOST[:PORT][/PREFIX]\") or name a preset",
                    ))
                }
            };
            if let Some(paths) = &s.paths {
                if paths.is_empty() {
                    return Err(invalid(
                        format!("{field}.paths"),
                        "is empty, which would allow the secret nowhere; leave it out for every path",
                    ));
                }
                let prefixes = paths
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        PathPrefix::parse(p).map_err(|e| invalid(format!("{field}.paths[{j}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(t) = targets.iter().find(|t| t.path.is_some()) {
                    return Err(invalid(
                        format!("{field}.paths"),
                        format!("host {t} has a path of its own; give paths in one place"),
                    ));
                }
                targets = targets
                    .iter()
                    .flat_map(|t| {
                        prefixes.iter().map(move |p| SecretTarget {
                            path: Some(p.clone()),
                            ..t.clone()
                        })
                    })
                    .collect();
            }
            let methods = match (&s.methods, preset) {
                (Some(m), _) if m.is_empty() => {
                    return Err(invalid(
                        format!("{field}.methods"),
                        "is empty, which would allow the secret on no request; leave it out for every method",
                    ))
                }
                (Some(m), _) => Some(
                    m.iter()
                        .enumerate()
                        .map(|(j, x)| {
                            Method::parse(x).map_err(|e| invalid(format!("{field}.methods[{j}]"), e))
                        })
                        .collect::<Result<BTreeSet<_>, _>>()?,
                ),
                (None, Some(p)) => preset_methods(p),
                (None, None) => None,
            };
            let inject = match s.inject {
                None => None,
                Some(t) => Some(
                    InjectTemplate::parse(&t.header, &t.value)
                        .map_err(|p| invalid(format!("{field}.inject"), p))?,
                ),
            };
            let header = match (&s.header, &inject, preset) {
                (Some(h), _, _) => {
                    if h.is_empty() || !h.bytes().all(crate::rule::is_token_byte) {
                        return Err(invalid(
                            format!("{field}.header"),
                            format!("{h:?} is not an HTTP header name"),
                        ));
                    }
                    h.to_ascii_lowercase()
                }
                (None, Some(t), _) => t.header().to_string(),
                (None, None, Some(p)) => p.header.to_string(),
                (None, None, None) => DEFAULT_SECRET_HEADER.to_string(),
            };
            if let Some(t) = &inject {
                if t.header() != header {
                    return Err(invalid(
                        format!("{field}.inject"),
                        format!(
                            "adds header {}, but the secret's header is {header}; they must be the same",
                            t.header()
                        ),
                    ));
                }
            }
            let spec = SecretSpec {
                name: sname,
                targets,
                methods,
                source,
                inject,
                swap: SwapScope {
                    header,
                    body: s.in_body,
                    query: s.in_query,
                    any_header: s.in_headers,
                },
                preset: preset.map(|p| p.name),
            };
            self.add_secret(spec, field)?;
        }
        Ok(())
    }

    fn add_secret(&mut self, spec: SecretSpec, origin: String) -> Result<(), PolicyError> {
        if let Some((_, first)) = self.secrets.iter().find(|(s, _)| s.name == spec.name) {
            return Err(invalid(
                format!("secret {} ({origin})", spec.name),
                format!("is defined twice (also by {first})"),
            ));
        }
        self.secrets.push((spec, origin));
        Ok(())
    }

    fn add_rule(
        &mut self,
        pattern: HostPattern,
        ports: Option<BTreeSet<u16>>,
        methods: Option<BTreeSet<Method>>,
        paths: Option<Vec<PathPrefix>>,
        origin: String,
    ) -> Result<(), PolicyError> {
        let ports = ports.unwrap_or_else(|| DEFAULT_PORTS.into_iter().collect());
        if let Some(prev) = self
            .rules
            .iter()
            .find(|r| r.pattern == pattern && !r.ports.is_disjoint(&ports))
        {
            return Err(invalid(
                &origin,
                format!(
                    "{pattern} on the same port is already allowed by {}; merge the two rules",
                    prev.origin
                ),
            ));
        }
        let id = RuleId(self.rules.len());
        self.rules.push(AllowRule {
            id,
            pattern,
            ports,
            methods,
            paths,
            origin,
        });
        Ok(())
    }

    /// Adds a lower layer's rules and secrets under this (higher) one's: for each host pattern and port the
    /// highest layer's rule decides, and for each secret name the highest layer's binding.
    fn merge_under(&mut self, lower: &PhaseRules) {
        for r in &lower.rules {
            let taken: BTreeSet<u16> = self
                .rules
                .iter()
                .filter(|o| o.pattern == r.pattern)
                .flat_map(|o| o.ports.iter().copied())
                .collect();
            let ports: BTreeSet<u16> = r.ports.difference(&taken).copied().collect();
            if ports.is_empty() {
                continue;
            }
            let mut r = r.clone();
            r.ports = ports;
            r.id = RuleId(self.rules.len());
            self.rules.push(r);
        }
        for (s, origin) in &lower.secrets {
            if !self.secrets.iter().any(|(t, _)| t.name == s.name) {
                self.secrets.push((s.clone(), origin.clone()));
            }
        }
    }
}

impl Phase {
    fn allow_flag(self) -> &'static str {
        match self {
            Phase::Setup => "--setup-allow",
            Phase::Agent => "--allow",
        }
    }
}

/// Each phase's checked policy, merged from layers.
#[derive(Clone, Debug)]
pub struct PhasedPolicy {
    pub setup: CheckedPolicy,
    pub agent: CheckedPolicy,
}

impl PhasedPolicy {
    /// Merges layers given highest precedence first (flags, then the user's config, then a trusted project
    /// config). Per phase, for each host pattern and port the highest layer's rule decides, and for each secret
    /// name the highest layer's binding; pins (per name and port) likewise; upstream roots add up. The result is
    /// checked as a whole: every pin must serve an allow rule of some phase, and every secret's hosts must be
    /// allowed in its phase.
    pub fn merge(layers: &[PolicyLayer]) -> Result<PhasedPolicy, PolicyError> {
        let mut setup = PhaseRules::default();
        let mut agent = PhaseRules::default();
        let mut pins: Vec<(Pin, String)> = Vec::new();
        let mut upstream_ca: Vec<UpstreamCa> = Vec::new();
        for l in layers {
            setup.merge_under(&l.setup);
            agent.merge_under(&l.agent);
            for (p, origin) in &l.pins {
                if !pins
                    .iter()
                    .any(|(q, _)| q.name == p.name && q.port == p.port)
                {
                    pins.push((p.clone(), origin.clone()));
                }
            }
            for ca in &l.upstream_ca {
                if !upstream_ca.iter().any(|c| c.pem == ca.pem) {
                    upstream_ca.push(ca.clone());
                }
            }
        }
        let inspect_all = layers.iter().any(|l| l.inspect_all);
        let finish = |rules: PhaseRules| CheckedPolicy {
            rules: rules.rules,
            pins: pins.iter().map(|(p, _)| p.clone()).collect(),
            upstream_ca: upstream_ca.clone(),
            secrets: rules.secrets.into_iter().map(|(s, _)| s).collect(),
            inspect_all,
        };
        for (pin, origin) in &pins {
            let used = [&setup, &agent]
                .iter()
                .any(|r| best_rule(&r.rules, &pin.name, pin.port).is_some());
            if !used {
                return Err(invalid(
                    format!("resolve {}:{} ({origin})", pin.name, pin.port),
                    "no allow rule permits this name and port, so the pin would never be used",
                ));
            }
        }
        for (phase, rules) in [(Phase::Setup, &setup), (Phase::Agent, &agent)] {
            for (s, origin) in &rules.secrets {
                for t in &s.targets {
                    let h = &t.pattern;
                    let covered = rules.rules.iter().any(|r| {
                        r.pattern.covers(h) && t.port.map_or(true, |p| r.ports.contains(&p))
                    });
                    if !covered {
                        let which = if phase == Phase::Setup {
                            "no setup-phase allow rule"
                        } else {
                            "no allow rule"
                        };
                        return Err(invalid(
                            format!("secret {} ({origin})", s.name),
                            format!(
                                "is bound to {t}, which {which} permits; add {} {}",
                                phase.allow_flag(),
                                match t.port {
                                    Some(p) => format!("{h}:{p}"),
                                    None => h.to_string(),
                                }
                            ),
                        ));
                    }
                }
            }
        }
        Ok(PhasedPolicy {
            setup: finish(setup),
            agent: finish(agent),
        })
    }

    pub fn phase(&self, phase: Phase) -> &CheckedPolicy {
        match phase {
            Phase::Setup => &self.setup,
            Phase::Agent => &self.agent,
        }
    }
}

/// `HOST[:PORT]`: a name or `*.` pattern, optionally one port.
fn parse_host_port(s: &str) -> Result<(HostPattern, Option<u16>), String> {
    let (host, port) = if let Some((h, p)) = s.strip_prefix('[').and_then(|_| s.split_once("]:")) {
        // `[v6]:port`: split so the literal is reported as an address, not as a bad port.
        (&s[..h.len() + 1], Some(parse_port(p)?))
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').unwrap_or((s, ""));
        (h, Some(parse_port(p)?))
    } else {
        (s, None)
    };
    let pattern = HostPattern::parse(host).map_err(|e| e.to_string())?;
    Ok((pattern, port))
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port {p:?} is not a number from 1 to 65535")),
        Ok(n) => Ok(n),
    }
}

/// `HOST:PORT:ADDR[,ADDR...]` as curl's `--resolve` takes it; IPv6 addresses may be bracketed.
fn parse_pin(s: &str) -> Result<Pin, String> {
    let mut it = s.splitn(3, ':');
    let (host, port, addrs) = match (it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(a)) if !a.is_empty() => (h, p, a),
        _ => return Err("expected HOST:PORT:ADDR[,ADDR...]".into()),
    };
    let name = HostName::parse(host).map_err(|e| e.to_string())?;
    let port = parse_port(port)?;
    let addrs = addrs
        .split(',')
        .map(|a| {
            let bare = a
                .strip_prefix('[')
                .and_then(|x| x.strip_suffix(']'))
                .unwrap_or(a);
            bare.parse::<IpAddr>()
                .map_err(|_| format!("{a:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Pin { name, port, addrs })
}

/// The request header a secret is swapped in when its binding names none.
pub const DEFAULT_SECRET_HEADER: &str = "authorization";

/// `NAME[:HEADER]@HOST[:PORT][/PREFIX][,...]`, value from `$NAME`, swapped in HEADER only
/// (default: Authorization).
fn parse_secret_flag(s: &str) -> Result<SecretSpec, String> {
    let (name, targets) = s.split_once('@').ok_or(
        "expected NAME[:HEADER]@HOST[:PORT][/PREFIX][,HOST...] (or --secret-preset PRESET)",
    )?;
    let (name, header) = match name.split_once(':') {
        Some((n, h)) => {
            if h.is_empty() || !h.bytes().all(crate::rule::is_token_byte) {
                return Err(format!("{h:?} is not an HTTP header name"));
            }
            (n, h.to_ascii_lowercase())
        }
        None => (name, DEFAULT_SECRET_HEADER.to_string()),
    };
    let name = SecretName::parse(name)?;
    let targets = targets
        .split(',')
        .map(SecretTarget::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let source = SecretSource::Env(name.as_str().to_string());
    Ok(SecretSpec {
        name,
        targets,
        methods: None,
        source,
        inject: None,
        swap: SwapScope {
            header,
            body: false,
            query: false,
            any_header: false,
        },
        preset: None,
    })
}

/// `PRESET[:NAME]`: the preset's scope, value from `$NAME` (default: the preset's usual variable).
fn parse_preset_flag(s: &str) -> Result<SecretSpec, String> {
    let (p, name) = match s.split_once(':') {
        Some((p, n)) => (preset(p)?, n),
        None => {
            let p = preset(s)?;
            (p, p.default_name)
        }
    };
    let name = SecretName::parse(name)?;
    let source = SecretSource::Env(name.as_str().to_string());
    Ok(SecretSpec {
        name,
        targets: preset_targets(p),
        methods: preset_methods(p),
        source,
        inject: None,
        swap: SwapScope {
            header: p.header.to_string(),
            body: false,
            query: false,
            any_header: false,
        },
        preset: Some(p.name),
    })
}

fn preset_targets(p: &Preset) -> Vec<SecretTarget> {
    p.targets
        .iter()
        .filter_map(|t| SecretTarget::parse(t).ok())
        .collect()
}

fn preset_methods(p: &Preset) -> Option<BTreeSet<Method>> {
    p.methods
        .map(|m| m.iter().filter_map(|x| Method::parse(x).ok()).collect())
}

fn read_ca(path: &Path, shown: &Path) -> Result<UpstreamCa, PolicyError> {
    let pem = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        what: "upstream CA file",
        path: path.to_path_buf(),
        source,
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(
            format!("upstream_ca {}", shown.display()),
            "contains no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(UpstreamCa {
        path: path.to_path_buf(),
        pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_err(text: &str) -> String {
        match CheckedPolicy::from_toml_str(text, Path::new("policy.toml")) {
            Ok(_) => panic!("should fail:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn toml_ok(text: &str) -> CheckedPolicy {
        match CheckedPolicy::from_toml_str(text, Path::new("policy.toml")) {
            Ok(p) => p,
            Err(e) => panic!("should parse: {e}\n{text}"),
        }
    }

    fn name(s: &str) -> HostName {
        HostName::parse(s).expect("name")
    }

    #[test]
    fn default_deny_and_empty_allowlist() {
        let p = toml_ok("");
        assert_eq!(
            p.check_connect(&name("example.com"), 443).err(),
            Some(DenyReason::NoRule)
        );
        assert!(p.allows_name(&name("example.com")).is_none());
        let p = CheckedPolicy::from_input(&PolicyInput::default()).expect("empty input");
        assert!(p.rules().is_empty());
    }

    #[test]
    fn rules_ports_and_specificity() {
        let p = toml_ok(
            r#"
            allow = [
              "*.github.com:443",
              "example.com",
              { host = "api.github.com", ports = [443], methods = ["GET"], paths = ["/repos/"] },
            ]
            "#,
        );
        let r = p
            .check_connect(&name("api.github.com"), 443)
            .expect("allowed");
        assert!(
            r.restricts_requests(),
            "exact rule must win over the wildcard: {r}"
        );
        let r = p
            .check_connect(&name("raw.github.com"), 443)
            .expect("allowed");
        assert!(!r.restricts_requests());
        assert!(p.check_connect(&name("raw.github.com"), 80).is_err());
        assert!(p.check_connect(&name("github.com"), 443).is_err());
        assert!(p.check_connect(&name("example.com"), 80).is_ok());
        assert!(p.check_connect(&name("example.com"), 443).is_ok());
        assert!(p.check_connect(&name("example.com"), 8080).is_err());
        assert!(p.allows_name(&name("x.github.com")).is_some());
    }

    /// TOML errors name the field and say what is wrong.
    #[test]
    fn toml_errors_name_the_field() {
        let cases: &[(&str, &[&str])] = &[
            ("allow = [\"exa mple.com\"]", &["allow[0]", "whitespace"]),
            ("allow = [\"127.0.0.1\"]", &["allow[0]", "IP address 127.0.0.1"]),
            ("allow = [\"0x7f.1:443\"]", &["allow[0]", "IP address 127.0.0.1"]),
            ("allow = [\"a.com:99999\"]", &["allow[0]", "port \"99999\""]),
            ("allow = [\"*.com\"]", &["allow[0]", "too broad"]),
            ("allow = [42]", &["allow[0]", "found a integer"]),
            ("allow = [{ host = \"a.com\", method = [\"GET\"] }]", &["allow[0]", "unknown field `method`"]),
            ("allow = [{ host = \"a.com\", methods = [\"CONNECT\"] }]", &["allow[0].methods[0]", "CONNECT"]),
            ("allow = [{ host = \"a.com\", paths = [\"x\"] }]", &["allow[0].paths[0]", "must start with '/'"]),
            ("allow = [{ host = \"a.com\", ports = [] }]", &["allow[0].ports", "empty"]),
            ("allow = [{ host = \"a.com\", methods = [] }]", &["allow[0].methods", "empty"]),
            ("allow = [\"a.com\", \"A.COM.:443\"]", &["allow[1]", "already allowed by policy.toml: allow[0]"]),
            ("alow = [\"a.com\"]", &["unknown field `alow`"]),
            ("allow = \"a.com\"", &["allow", "expected a sequence"]),
            ("resolve = [\"a.com:443\"]", &["resolve[0]", "HOST:PORT:ADDR"]),
            ("resolve = [\"a.com:443:localhost\"]", &["resolve[0]", "not an IP address"]),
            ("resolve = [\"a.com:443:127.0.0.1\"]", &["resolve a.com:443", "no allow rule"]),
            ("allow=[\"a.com\"]\n[secrets.GH]\nhosts = [\"b.com\"]", &["secret GH", "bound to b.com", "--allow b.com"]),
            ("allow=[\"a.com\"]\n[secrets.GH]\nhosts = []", &["secrets.GH.hosts", "empty"]),
            ("allow=[\"a.com\"]\n[secrets.GH]\nhosts = [\"a.com\"]\nfrom_env=\"X\"\nfrom_file=\"f\"", &["secrets.GH", "not both"]),
            ("allow=[\"a.com\"]\n[secrets.GH]\nhosts = [\"a.com\"]\ninject = { header = \"authorization\", value = \"Bearer\" }", &["secrets.GH.inject", "{value}"]),
            ("allow=[\"a.com\"]\n[secrets.GH]\nhosts = [\"a.com\"]\nin_body = \"yes\"", &["in_body", "expected a boolean"]),
            ("allow=[\"a.com\"]\n[secrets.\"G-H\"]\nhosts = [\"a.com\"]", &["secrets.G-H", "secret name"]),
            ("upstream_ca = [\"/nonexistent/ca.pem\"]", &["cannot read upstream CA file /nonexistent/ca.pem"]),
        ];
        for (text, wants) in cases {
            let err = toml_err(text);
            for want in *wants {
                assert!(
                    err.contains(want),
                    "error for {text:?} should mention {want:?}, got: {err}"
                );
            }
        }
    }

    #[test]
    fn flags_merge_with_file_and_pins_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            "allow = [\"api.test:8443\"]\nresolve = [\"api.test:8443:127.0.0.1,[::1]\"]\n",
        )
        .expect("write");
        let input = PolicyInput {
            policy_file: Some(file),
            allow: vec!["other.test:9443".into(), "*.svc.test".into()],
            resolve: vec!["other.test:9443:127.0.0.2".into()],
            upstream_ca: vec![],
            secrets: vec!["TOKEN@other.test".into()],
            ..Default::default()
        };
        let p = CheckedPolicy::from_input(&input).expect("valid");
        let api = name("api.test");
        assert_eq!(p.pinned(&api, 8443).map(<[IpAddr]>::len), Some(2));
        assert!(p.pinned(&api, 443).is_none());
        assert!(p.check_connect(&name("other.test"), 9443).is_ok());
        assert!(p.check_connect(&name("a.svc.test"), 80).is_ok());
        assert_eq!(p.secrets().len(), 1);
        assert!(p.secrets()[0].is_bound_to(&name("other.test")));
        assert!(!p.secrets()[0].is_bound_to(&name("api.test")));

        let bad = PolicyInput {
            allow: vec!["[::1]:443".into()],
            ..Default::default()
        };
        let err = CheckedPolicy::from_input(&bad)
            .expect_err("ip literal")
            .to_string();
        assert!(
            err.contains("--allow") && err.contains("IP address ::1"),
            "{err}"
        );
        let bad = PolicyInput {
            secrets: vec!["TOKEN".into()],
            ..Default::default()
        };
        let err = CheckedPolicy::from_input(&bad)
            .expect_err("no hosts")
            .to_string();
        assert!(err.contains("NAME[:HEADER]@HOST"), "{err}");
    }

    #[test]
    fn secrets_load_from_env_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tok.txt"), "file-secret-value-1\n").expect("write");
        let file = dir.path().join("p.toml");
        let text = r#"
            allow = ["api.test", "*.corp.test"]
            [secrets.A]
            hosts = ["api.test"]
            from_env = "HUTCH_TEST_A"
            inject = { header = "Authorization", value = "Bearer {value}" }
            [secrets.B]
            hosts = ["*.corp.test"]
            from_file = "tok.txt"
            in_body = true
        "#;
        std::fs::write(&file, text).expect("write");
        let p = CheckedPolicy::from_input(&PolicyInput {
            policy_file: Some(file),
            ..Default::default()
        })
        .expect("valid");
        let loaded = p
            .load_secrets_with(|v| (v == "HUTCH_TEST_A").then(|| "env-secret-value-1".to_string()))
            .expect("load");
        assert_eq!(loaded[0].value.expose(), "env-secret-value-1");
        assert_eq!(
            loaded[0].spec.inject().map(InjectTemplate::header),
            Some("authorization")
        );
        assert_eq!(loaded[1].value.expose(), "file-secret-value-1");
        assert!(loaded[1].spec.in_body());
        let err = p
            .load_secrets_with(|_| None)
            .expect_err("missing env")
            .to_string();
        assert!(err.contains("$HUTCH_TEST_A is not set"), "{err}");
        let err = p
            .load_secrets_with(|_| Some("bad\nvalue-xyz".into()))
            .expect_err("newline")
            .to_string();
        assert!(
            !err.contains("value-xyz") && err.contains("control"),
            "{err}"
        );
    }

    fn layer(text: &str, file: &str) -> PolicyLayer {
        match PolicyLayer::from_toml_str(text, Path::new(file)) {
            Ok(l) => l,
            Err(e) => panic!("should parse: {e}\n{text}"),
        }
    }

    /// The setup phase has its own rules and secrets; single-phase callers refuse them.
    #[test]
    fn setup_table_is_its_own_phase() {
        let text = "allow = [\"api.test\"]\nresolve = [\"pkgs.test:443:127.0.0.1\"]\n[secrets.A]\nhosts = [\"api.test\"]\n[setup]\nallow = [\"pkgs.test\"]\n[setup.secrets.REPO]\nhosts = [\"pkgs.test\"]\n";
        let l = layer(text, "policy.toml");
        assert!(l.has_setup() && !l.is_empty());
        let p = PhasedPolicy::merge(&[l]).expect("valid");
        assert!(p.setup.check_connect(&name("pkgs.test"), 443).is_ok());
        assert!(
            p.setup.check_connect(&name("api.test"), 443).is_err(),
            "the setup phase gets only its own rules"
        );
        assert!(
            p.agent.check_connect(&name("pkgs.test"), 443).is_err(),
            "the agent phase gets only its own rules"
        );
        assert_eq!(
            p.setup
                .secrets()
                .iter()
                .map(|s| s.name().as_str())
                .collect::<Vec<_>>(),
            ["REPO"]
        );
        assert_eq!(
            p.agent
                .secrets()
                .iter()
                .map(|s| s.name().as_str())
                .collect::<Vec<_>>(),
            ["A"]
        );
        assert!(
            p.agent.pinned(&name("pkgs.test"), 443).is_some(),
            "pins are shared by both phases"
        );

        let err = CheckedPolicy::from_toml_str(text, Path::new("policy.toml"))
            .expect_err("single phase")
            .to_string();
        assert!(err.contains("setup-phase rules"), "{err}");
        let err = CheckedPolicy::from_input(&PolicyInput {
            setup_allow: vec!["pkgs.test".into()],
            ..Default::default()
        })
        .expect_err("single phase")
        .to_string();
        assert!(err.contains("setup-phase rules"), "{err}");

        let cases: &[(&str, &[&str])] = &[
            (
                "[setup]\nresolve = [\"a.com:443:127.0.0.1\"]",
                &["unknown field `resolve`"],
            ),
            (
                "[setup]\nallow = [\"*.com\"]",
                &["setup.allow[0]", "too broad"],
            ),
            (
                "allow = [\"a.com\"]\n[setup.secrets.T]\nhosts = [\"a.com\"]",
                &[
                    "secret T",
                    "setup.secrets.T",
                    "no setup-phase allow rule",
                    "--setup-allow a.com",
                ],
            ),
            (
                "[setup]\nallow = [\"a.com\"]\n[secrets.T]\nhosts = [\"a.com\"]",
                &["secret T", "--allow a.com"],
            ),
        ];
        for (text, wants) in cases {
            let err = match PolicyLayer::from_toml_str(text, Path::new("policy.toml"))
                .and_then(|l| PhasedPolicy::merge(&[l]))
            {
                Ok(_) => panic!("should fail:\n{text}"),
                Err(e) => e.to_string(),
            };
            for want in *wants {
                assert!(
                    err.contains(want),
                    "error for {text:?} should mention {want:?}, got: {err}"
                );
            }
        }
    }

    /// Layers merge by key, the higher one deciding: per host and port, per secret name, per pin.
    #[test]
    fn layers_merge_with_the_higher_layer_deciding() {
        let flags = PolicyLayer::from_input(&PolicyInput {
            allow: vec!["api.test:443".into()],
            setup_allow: vec!["pkgs.test".into()],
            resolve: vec!["pkgs.test:443:127.0.0.2".into()],
            secrets: vec!["TOKEN@api.test".into()],
            ..Default::default()
        })
        .expect("flags");
        let user = layer(
            "allow = [{ host = \"api.test\", methods = [\"GET\"] }, \"model.test\"]\n[secrets.TOKEN]\nhosts = [\"model.test\"]\n[secrets.MODEL]\nhosts = [\"model.test\"]\n",
            "/cfg/config.toml",
        );
        let project = layer(
            "allow = [\"model.test\"]\nresolve = [\"pkgs.test:443:127.0.0.3\"]\n[setup]\nallow = [\"pkgs.test\", \"git.test\"]\n",
            "/repo/hutch.toml",
        );
        let p = PhasedPolicy::merge(&[flags, user, project]).expect("merged");
        let r = p
            .agent
            .check_connect(&name("api.test"), 443)
            .expect("flag rule");
        assert!(
            !r.restricts_requests() && r.origin().starts_with("--allow"),
            "{r}"
        );
        let r = p
            .agent
            .check_connect(&name("api.test"), 80)
            .expect("the config's rule keeps port 80");
        assert!(r.restricts_requests(), "{r}");
        assert!(p
            .agent
            .check_connect(&name("model.test"), 443)
            .expect("config")
            .origin()
            .starts_with("/cfg/config.toml"));
        assert_eq!(
            p.agent
                .rules()
                .iter()
                .filter(|r| r.pattern().to_string() == "model.test")
                .count(),
            1,
            "identical rules merge"
        );
        let token = p
            .agent
            .secrets()
            .iter()
            .find(|s| s.name().as_str() == "TOKEN")
            .expect("TOKEN");
        assert!(
            token.is_bound_to(&name("api.test")) && !token.is_bound_to(&name("model.test")),
            "the flag's binding wins"
        );
        assert!(p
            .agent
            .secrets()
            .iter()
            .any(|s| s.name().as_str() == "MODEL"));
        assert!(
            p.setup.check_connect(&name("git.test"), 443).is_ok()
                && p.setup.check_connect(&name("pkgs.test"), 80).is_ok()
        );
        assert_eq!(
            p.setup.pinned(&name("pkgs.test"), 443),
            Some(&["127.0.0.2".parse::<IpAddr>().expect("ip")][..]),
            "the flag's pin wins"
        );
        for (i, r) in p.agent.rules().iter().enumerate() {
            assert_eq!(
                p.agent.rule(RuleId(i)).map(|x| x.origin()),
                Some(r.origin()),
                "rule ids are positions"
            );
        }
        // A pin only the setup phase uses is fine; one nothing uses is refused.
        let only_setup = PolicyLayer::from_input(&PolicyInput {
            setup_allow: vec!["pkgs.test:8443".into()],
            resolve: vec!["pkgs.test:8443:127.0.0.1".into()],
            ..Default::default()
        })
        .expect("layer");
        assert!(PhasedPolicy::merge(&[only_setup]).is_ok());
        let unused = PolicyLayer::from_input(&PolicyInput {
            resolve: vec!["pkgs.test:8443:127.0.0.1".into()],
            ..Default::default()
        })
        .expect("layer");
        let err = PhasedPolicy::merge(&[unused])
            .expect_err("unused pin")
            .to_string();
        assert!(
            err.contains("resolve pkgs.test:8443 (--resolve") && err.contains("never be used"),
            "{err}"
        );
    }

    /// Class 17 (secret laundering through the bound host): a secret is usable only where its
    /// binding says (host, port, path prefix, method) and only in its one header unless the policy
    /// opts in, from flags, presets and the file format alike.
    #[test]
    fn class_17_secret_scopes_from_flags_presets_and_files() {
        let p = CheckedPolicy::from_input(&PolicyInput {
            allow: vec!["api.test".into(), "api.anthropic.com".into(), "git.test:8443".into()],
            secrets: vec![
                "TOKEN@api.test:443/v1/,git.test:8443".into(),
                "KEY:X-Api-Key@api.test".into(),
            ],
            secret_presets: vec!["anthropic".into()],
            ..Default::default()
        })
        .expect("valid");
        let token = &p.secrets()[0];
        let api = name("api.test");
        assert!(token.applies(&api, 443, "POST", "/v1/messages?x=1", &[]));
        assert!(!token.applies(&api, 80, "POST", "/v1/messages", &[]), "port");
        assert!(!token.applies(&api, 443, "POST", "/v2/x", &[]), "path");
        assert!(!token.applies(&api, 443, "GET", "/v1/../v2/x", &[]), "dot segments");
        assert!(!token.applies(&api, 443, "GET", "/v1/..;/v2", &[]), ";parameters");
        assert!(token.applies(&name("git.test"), 8443, "GET", "/anything", &[]));
        assert_eq!(token.swap().header, "authorization");
        assert!(!token.swap().widened());
        assert!(token.is_bound_to(&api) && !token.is_bound_to(&name("other.test")));

        assert_eq!(p.secrets()[1].swap().header, "x-api-key");
        let claude = &p.secrets()[2];
        assert_eq!(claude.name().as_str(), "ANTHROPIC_API_KEY");
        assert_eq!(claude.swap().header, "x-api-key");
        let a = name("api.anthropic.com");
        assert!(claude.applies(&a, 443, "POST", "/v1/messages", &[]));
        assert!(!claude.applies(&a, 443, "DELETE", "/v1/messages", &[]), "method");
        assert!(
            !claude.applies(&a, 443, "POST", "/v1/messages", &["X-HTTP-Method-Override"]),
            "an override leaves the method scope"
        );
        assert!(!claude.applies(&a, 443, "POST", "/v2/x", &[]));

        let p = CheckedPolicy::from_input(&PolicyInput {
            allow: vec!["api.openai.com".into()],
            secret_presets: vec!["openai:CODEX_API_KEY".into()],
            ..Default::default()
        })
        .expect("named preset");
        assert_eq!(p.secrets()[0].name().as_str(), "CODEX_API_KEY");
        assert_eq!(p.secrets()[0].preset(), Some("openai"));

        let f = toml_ok(
            r#"
            allow = ["api.test", "store.test"]
            [secrets.A]
            hosts = ["api.test"]
            paths = ["/v1/", "/v2/"]
            methods = ["POST"]
            header = "X-Key"
            [secrets.B]
            hosts = ["store.test"]
            in_body = true
            in_query = true
            in_headers = true
            [secrets.C]
            preset = "github"
            hosts = ["api.test"]
            "#,
        );
        let a = &f.secrets()[0];
        assert_eq!(a.swap().header, "x-key");
        assert!(a.applies(&api, 443, "POST", "/v2/x", &[]));
        assert!(!a.applies(&api, 443, "GET", "/v2/x", &[]));
        assert!(!a.applies(&api, 443, "POST", "/v3/x", &[]));
        assert!(f.secrets()[1].swap().widened());
        assert_eq!(f.secrets()[2].preset(), Some("github"));

        let cases: &[(&str, &[&str])] = &[
            ("allow=[\"a.com\"]\n[secrets.A]\npreset = \"nope\"", &["secrets.A.preset", "no secret preset", "anthropic"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nfrom_env = \"A\"", &["secrets.A.hosts", "is missing"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nhosts = [\"a.com/v1/\"]\npaths = [\"/v2/\"]", &["secrets.A.paths", "a path of its own"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nhosts = [\"a.com\"]\nmethods = []", &["secrets.A.methods", "empty"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nhosts = [\"a.com\"]\nheader = \"x key\"", &["secrets.A.header", "not an HTTP header name"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nhosts = [\"a.com\"]\nheader = \"x-key\"\ninject = { header = \"authorization\", value = \"{value}\" }", &["secrets.A.inject", "must be the same"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nhosts = [\"a.com:8443\"]", &["bound to a.com:8443", "--allow a.com:8443"]),
            ("allow=[\"a.com\"]\n[secrets.A]\nhosts = [\"a.com/../x\"]", &["secrets.A.hosts[0]", "'.'/'..' segments"]),
        ];
        for (text, wants) in cases {
            let err = toml_err(text);
            for want in *wants {
                assert!(err.contains(want), "error for {text:?} should mention {want:?}, got: {err}");
            }
        }
        let err = CheckedPolicy::from_input(&PolicyInput {
            secret_presets: vec!["anthropic".into()],
            ..Default::default()
        })
        .expect_err("not allowed")
        .to_string();
        assert!(err.contains("--allow api.anthropic.com:443"), "{err}");
    }

    /// Threat 15 (agent switching off its guardrails): the serialized policy carries no secret
    /// values or sources, and there is no way to build a policy back from it.
    #[test]
    fn threat15_serialized_form_is_informational() {
        let p = toml_ok("allow = [\"api.test\"]\n[secrets.A]\nhosts=[\"api.test\"]\nfrom_env=\"HOST_ONLY_VAR\"\n");
        let json = serde_json::to_string(&p).expect("serialize");
        assert!(json.contains("api.test"));
        assert!(!json.contains("HOST_ONLY_VAR"), "{json}");
    }
}
