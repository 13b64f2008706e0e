//! Hutch egress policy: host-user input (a TOML file and flags) parsed once into a checked,
//! deny-by-default form, plus the name canonicalization and address classification every
//! gateway decision is made with. Pure: the only I/O is reading the files the user names.

mod addr;
mod envfile;
mod name;
mod policy;
mod preset;
mod rule;
mod secret;

pub use addr::{classify, AddrClass};
pub use envfile::{EnvEntry, EnvFile, EnvFileError};
pub use name::{parse_ipv4_loose, HostName, HostPattern, NameError, NameErrorKind, PatternError};
pub use policy::{
    CheckedPolicy, Phase, PhasedPolicy, Pin, PolicyError, PolicyInput, PolicyLayer, UpstreamCa,
    DEFAULT_SECRET_HEADER,
};
pub use preset::{preset, Preset, PRESETS};
pub use rule::{
    method_override, AllowRule, DenyReason, JudgedPath, Method, PathPrefix, RuleId, DEFAULT_PORTS,
    METHOD_OVERRIDE_HEADERS,
};
pub use secret::{
    InjectTemplate, LoadedSecret, SecretName, SecretSource, SecretSpec, SecretTarget, SecretValue,
    SwapScope, MIN_SECRET_LEN,
};
