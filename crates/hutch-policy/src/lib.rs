//! Hutch egress policy: host-user input (a TOML file and flags) parsed once into a checked,
//! deny-by-default form, plus the name canonicalization and address classification every
//! gateway decision is made with. Pure: the only I/O is reading the files the user names.

mod addr;
mod envfile;
mod name;
mod policy;
mod rule;
mod secret;

pub use addr::{classify, AddrClass};
pub use envfile::{EnvEntry, EnvFile, EnvFileError};
pub use name::{parse_ipv4_loose, HostName, HostPattern, NameError, NameErrorKind, PatternError};
pub use policy::{
    CheckedPolicy, Phase, PhasedPolicy, Pin, PolicyError, PolicyInput, PolicyLayer, UpstreamCa,
};
pub use rule::{AllowRule, DenyReason, Method, PathPrefix, RuleId, DEFAULT_PORTS};
pub use secret::{
    InjectTemplate, LoadedSecret, SecretName, SecretSource, SecretSpec, SecretValue, MIN_SECRET_LEN,
};
