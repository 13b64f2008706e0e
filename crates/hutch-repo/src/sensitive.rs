//! Which changed paths can make code run later on the host without the user deciding to run the project
//! (threat 10): opening the folder in an editor, `cd` into it, a git command, an agent starting, a build or CI.
//! `hutch apply` refuses changes to them unless `--allow-sensitive` is given.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SensitiveKind {
    /// `.gitattributes`, `.gitmodules`, `.lfsconfig`: select filters, diff and merge drivers, submodule URLs.
    GitConfig,
    /// Hook managers: `.husky/`, `.githooks/`, `lefthook.yml`, `.pre-commit-config.yaml`.
    GitHooks,
    /// Editor and IDE settings that run tasks or tools on open: `.vscode/`, `.idea/`, `.devcontainer/`.
    Editor,
    /// Files a shell or direnv runs on `cd` or start-up: `.envrc`, `.bashrc`, `.zshrc`, `.profile`.
    Shell,
    /// Coding-agent settings and instructions: `.mcp.json`, `.claude/`, `.codex/`, `.cursor/`, `AGENTS.md`.
    Agent,
    /// Build entry points and package scripts: `Makefile`, `package.json`, `.npmrc`, `build.rs`, `.cargo/`.
    Build,
    /// CI definitions: `.github/workflows/`, `.gitlab-ci.yml`, `.circleci/`, `Jenkinsfile`.
    Ci,
    /// Hutch's own project config (`hutch.toml`).
    Hutch,
}

impl fmt::Display for SensitiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SensitiveKind::GitConfig => "git attributes or modules",
            SensitiveKind::GitHooks => "git hooks",
            SensitiveKind::Editor => "editor config",
            SensitiveKind::Shell => "shell start-up",
            SensitiveKind::Agent => "agent config",
            SensitiveKind::Build => "build script",
            SensitiveKind::Ci => "CI workflow",
            SensitiveKind::Hutch => "hutch project config",
        })
    }
}

/// How a rule matches a path (ASCII case-insensitively, since the tree may land on a case-folding filesystem).
#[derive(Debug, Clone, Copy)]
enum Match {
    /// Any component equals this name: a directory with that name anywhere, or a file or symlink named so.
    Component(&'static str),
    /// Two adjacent components, e.g. `.github` then `workflows`.
    Pair(&'static str, &'static str),
    /// The last component equals this name.
    File(&'static str),
    /// The last component ends with this suffix.
    Suffix(&'static str),
}

use Match::*;
use SensitiveKind::*;

const RULES: &[(Match, SensitiveKind)] = &[
    (File(".gitattributes"), GitConfig),
    (File(".gitmodules"), GitConfig),
    (File(".lfsconfig"), GitConfig),
    (Component(".husky"), GitHooks),
    (Component(".githooks"), GitHooks),
    (Component(".hooks"), GitHooks),
    (File("lefthook.yml"), GitHooks),
    (File("lefthook.yaml"), GitHooks),
    (File(".lefthook.yml"), GitHooks),
    (File(".pre-commit-config.yaml"), GitHooks),
    (Component(".vscode"), Editor),
    (Component(".idea"), Editor),
    (Component(".devcontainer"), Editor),
    (Component(".fleet"), Editor),
    (Component(".zed"), Editor),
    (File(".devcontainer.json"), Editor),
    (Suffix(".code-workspace"), Editor),
    (File(".envrc"), Shell),
    (Component(".direnv"), Shell),
    (File(".env"), Shell),
    (File(".bashrc"), Shell),
    (File(".bash_profile"), Shell),
    (File(".bash_login"), Shell),
    (File(".bash_logout"), Shell),
    (File(".profile"), Shell),
    (File(".zshrc"), Shell),
    (File(".zshenv"), Shell),
    (File(".zprofile"), Shell),
    (File(".zlogin"), Shell),
    (File(".inputrc"), Shell),
    (File("config.fish"), Shell),
    (File(".mcp.json"), Agent),
    (Component(".claude"), Agent),
    (Component(".codex"), Agent),
    (Component(".cursor"), Agent),
    (Component(".gemini"), Agent),
    (Component(".windsurf"), Agent),
    (Component(".continue"), Agent),
    (Component(".aider.conf.yml"), Agent),
    (File("CLAUDE.md"), Agent),
    (File("AGENTS.md"), Agent),
    (File("GEMINI.md"), Agent),
    (File(".cursorrules"), Agent),
    (File(".clinerules"), Agent),
    (File(".windsurfrules"), Agent),
    (File("copilot-instructions.md"), Agent),
    (File("Makefile"), Build),
    (File("GNUmakefile"), Build),
    (Suffix(".mk"), Build),
    (File("package.json"), Build),
    (File(".npmrc"), Build),
    (File(".yarnrc"), Build),
    (File(".yarnrc.yml"), Build),
    (File(".pnpmfile.cjs"), Build),
    (File("build.rs"), Build),
    (Component(".cargo"), Build),
    (File("justfile"), Build),
    (File(".justfile"), Build),
    (File("Taskfile.yml"), Build),
    (File("Rakefile"), Build),
    (File("setup.py"), Build),
    (File("conftest.py"), Build),
    (File("gradlew"), Build),
    (Component(".mvn"), Build),
    (File("mvnw"), Build),
    (Pair(".github", "workflows"), Ci),
    (Pair(".github", "actions"), Ci),
    (File(".gitlab-ci.yml"), Ci),
    (Component(".circleci"), Ci),
    (File(".travis.yml"), Ci),
    (File("Jenkinsfile"), Ci),
    (File("azure-pipelines.yml"), Ci),
    (Component(".buildkite"), Ci),
    (File("bitbucket-pipelines.yml"), Ci),
    (File(".drone.yml"), Ci),
    (Component(".woodpecker"), Ci),
    (File("hutch.toml"), Hutch),
];

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// The kind of the first rule that matches `path` (repository-relative, `/`-separated), if any.
pub fn classify(path: &[u8]) -> Option<SensitiveKind> {
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let last = comps.last().copied().unwrap_or_default();
    RULES.iter().find_map(|(m, kind)| {
        let hit = match *m {
            Component(n) => comps.iter().any(|c| eq(c, n)),
            Pair(a, b) => comps.windows(2).any(|w| eq(w[0], a) && eq(w[1], b)),
            File(n) => eq(last, n),
            Suffix(s) => last.len() > s.len() && last[last.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes()),
        };
        hit.then_some(*kind)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_list_is_classified() {
        let cases: &[(&str, SensitiveKind)] = &[
            (".vscode/tasks.json", Editor),
            (".vscode/settings.json", Editor),
            (".VSCode/tasks.json", Editor),
            (".vscode", Editor),
            (".idea/workspace.xml", Editor),
            ("sub/project/.idea/runConfigurations/x.xml", Editor),
            (".envrc", Shell),
            ("sub/.envrc", Shell),
            (".bashrc", Shell),
            (".zshrc", Shell),
            (".husky/pre-commit", GitHooks),
            (".pre-commit-config.yaml", GitHooks),
            (".mcp.json", Agent),
            (".claude/settings.json", Agent),
            (".codex/config.toml", Agent),
            (".cursor/rules/x.mdc", Agent),
            ("AGENTS.md", Agent),
            ("Makefile", Build),
            ("makefile", Build),
            ("lib/rules.mk", Build),
            ("package.json", Build),
            ("packages/web/package.json", Build),
            (".cargo/config.toml", Build),
            ("crates/x/build.rs", Build),
            (".github/workflows/ci.yml", Ci),
            (".gitlab-ci.yml", Ci),
            (".gitattributes", GitConfig),
            ("vendor/.gitmodules", GitConfig),
            ("hutch.toml", Hutch),
        ];
        for (p, want) in cases {
            assert_eq!(classify(p.as_bytes()), Some(*want), "{p}");
        }
    }

    #[test]
    fn ordinary_source_is_not_sensitive() {
        for p in [
            "src/main.rs",
            "README.md",
            "docs/vscode.md",
            "package-lock.json",
            "Makefile.md",
            ".mk",
            "src/envrc.rs",
            ".github/ISSUE_TEMPLATE/bug.md",
            "workflows/.github",
            ".gitignore",
        ] {
            assert_eq!(classify(p.as_bytes()), None, "{p}");
        }
    }
}
