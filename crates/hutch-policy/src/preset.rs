//! Secret presets: where the APIs people use with coding agents expect their credential (hosts,
//! paths, methods, the one request header), so a secret can be scoped to exactly that without a
//! policy file: `--secret-preset anthropic`, or `preset = "anthropic"` in a `[secrets.NAME]` table.

/// One API's credential placement.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    /// The environment variable the API's tools read, used as the secret's name by default.
    pub default_name: &'static str,
    /// `HOST[:PORT][/PREFIX]` targets.
    pub targets: &'static [&'static str],
    /// Methods the credential is needed for (`None`: any).
    pub methods: Option<&'static [&'static str]>,
    /// The request header the client puts the credential in.
    pub header: &'static str,
    pub about: &'static str,
}

/// Every preset, by name.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "anthropic",
        default_name: "ANTHROPIC_API_KEY",
        targets: &["api.anthropic.com:443/v1/"],
        methods: Some(&["GET", "POST"]),
        header: "x-api-key",
        about: "Anthropic API (Claude Code): x-api-key on api.anthropic.com/v1/",
    },
    Preset {
        name: "openai",
        default_name: "OPENAI_API_KEY",
        targets: &["api.openai.com:443/v1/"],
        methods: Some(&["GET", "POST"]),
        header: "authorization",
        about: "OpenAI API (Codex: name it CODEX_API_KEY): Authorization: Bearer on api.openai.com/v1/",
    },
    Preset {
        name: "github",
        default_name: "GH_TOKEN",
        targets: &["api.github.com:443"],
        methods: None,
        header: "authorization",
        about: "GitHub REST and GraphQL API: Authorization on api.github.com",
    },
    Preset {
        name: "github-git",
        default_name: "GH_TOKEN",
        targets: &["github.com:443"],
        methods: Some(&["GET", "POST"]),
        header: "authorization",
        about: "git over HTTPS to github.com: Authorization: Basic (user x-access-token, the token as password)",
    },
    Preset {
        name: "npm",
        default_name: "NPM_TOKEN",
        targets: &["registry.npmjs.org:443"],
        methods: None,
        header: "authorization",
        about: "npm registry (install of private packages, publish): Authorization: Bearer on registry.npmjs.org",
    },
    Preset {
        name: "pypi",
        default_name: "TWINE_PASSWORD",
        targets: &["upload.pypi.org:443/legacy/"],
        methods: Some(&["POST"]),
        header: "authorization",
        about: "PyPI upload (twine, user __token__): Authorization: Basic on upload.pypi.org/legacy/",
    },
];

/// The preset called `name`.
pub fn preset(name: &str) -> Result<&'static Preset, String> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!(
            "no secret preset {name:?}; presets are {}",
            names.join(", ")
        )
    })
}
