//! Coding agents in the agents image, for real: the real Claude Code and Codex CLIs run in a VM
//! against a fake of their model API on loopback (hutch-testnet's `model_api`, HTTPS with its own
//! CA), reached through the gateway with `--allow`, `--resolve` and `--upstream-ca`. The VM holds
//! only a placeholder for the API key; the fake accepts nothing but the real key, so a finished
//! turn shows the gateway injected it. The fake makes the agent run a command with its shell tool
//! in the VM: a commit in `/workspace`, which must come back to the host repository as
//! `refs/hutch/<id>`.
//!
//! The image is built (or found) with `hutch image build --image agents`; when npm packages cannot
//! be downloaded here the tests say so and skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use common::*;
use hutch_testnet::model_api::{Answer, Call, FakeModelApi, Script, ANTHROPIC_HOST, OPENAI_HOST};

/// What a real key looks like; the fake accepts only this one.
const REAL_KEY: &str = "sk-ant-api03-hutchTEST0real0key0never0in0the0vm0Zq9xWv7Lr3Kp2Nm8Bc5Df1Gh4Jk6-AbCdEfAA";

/// Whether the agents image and its snapshot are ready; `Err` says why not (the test skips).
fn agents_image() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let t0 = Instant::now();
            let out = hutch().args(["image", "build", "--image", "agents"]).stdin(Stdio::null()).output().expect("spawn hutch image build");
            let stderr = text(&out.stderr);
            if out.status.success() {
                eprintln!("agents image ready in {:.1}s:\n{}{stderr}", t0.elapsed().as_secs_f64(), text(&out.stdout));
                return Ok(());
            }
            // Only a registry that cannot be reached is a reason to skip; any other failure is a defect.
            let unreachable = [
                "behind a proxy", // npm's hint after any network error
                "ENOTFOUND",
                "EAI_AGAIN",
                "ECONNREFUSED",
                "ECONNRESET",
                "ETIMEDOUT",
                "ENETUNREACH",
                "UNABLE_TO_GET_ISSUER_CERT",
                "SELF_SIGNED_CERT",
            ];
            if stderr.contains("npm could not install") && unreachable.iter().any(|e| stderr.contains(e)) {
                return Err(format!("the npm registry is unreachable from this host, so the agents image cannot be built:\n{stderr}"));
            }
            panic!("hutch image build --image agents failed ({:?}):\n{stderr}", out.status.code());
        })
        .clone()
}

macro_rules! need_agents_image {
    () => {
        if let Err(why) = agents_image() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "User")
        .env("GIT_AUTHOR_EMAIL", "user@host")
        .env("GIT_COMMITTER_NAME", "User")
        .env("GIT_COMMITTER_EMAIL", "user@host")
        .args(args)
        .output()
        .expect("spawn git");
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

/// A repository with one commit, and a private data directory for hutch.
fn repo() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("project");
    std::fs::create_dir(&dir).expect("mkdir");
    git(&dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README.md"), "# project\n").expect("write");
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "first"]);
    (t, dir)
}

fn sandbox_id(stderr: &str) -> String {
    let i = stderr.find("changes from sandbox ").unwrap_or_else(|| panic!("no changes header in: {stderr}"));
    stderr[i + "changes from sandbox ".len()..].chars().take_while(char::is_ascii_hexdigit).collect()
}

fn dump(out: &Output) -> String {
    format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The fake asks the agent to run this with its shell tool: a commit in the workspace, and a line
/// that shows the command ran (its output goes back to the model as the tool result).
fn command(agent: &str) -> String {
    format!(
        "cd /workspace && echo 'hello from {agent}' > proof.txt && git add proof.txt && \
         git -c user.name={agent} -c user.email={agent}@example.test commit -qm 'proof from {agent}' && \
         echo \"committed $(git rev-parse --short HEAD) as $(id -un)\""
    )
}
const FINAL: &str = "Done: proof.txt is committed.";
const PROMPT: &str = "Commit a file named proof.txt that says hello.";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Agent {
    Claude,
    Codex,
}

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Agent::Claude => "claude",
            Agent::Codex => "codex",
        }
    }

    /// `--secret` for the agent's key: scoped to the API's host and the header the agent uses.
    fn secret_flag(self) -> String {
        let (host, var) = self.api();
        match self {
            Agent::Claude => format!("{var}:x-api-key@{host}"),
            Agent::Codex => format!("{var}@{host}"),
        }
    }

    /// The API host and the variable holding its key.
    fn api(self) -> (&'static str, &'static str) {
        match self {
            Agent::Claude => (ANTHROPIC_HOST, "ANTHROPIC_API_KEY"),
            // `codex exec` takes an API key from CODEX_API_KEY.
            Agent::Codex => (OPENAI_HOST, "CODEX_API_KEY"),
        }
    }

    /// The tool the fake's call goes to.
    fn tool(self) -> &'static str {
        match self {
            Agent::Claude => "Bash",
            Agent::Codex => "exec",
        }
    }

    /// `sh -c` script and its arguments: show what the VM's environment holds for the key, run the
    /// agent non-interactively with permission prompts off, report its peak memory.
    fn script(self, fake: &FakeModelApi) -> Vec<String> {
        let (_, var) = self.api();
        let run = match self {
            Agent::Claude => r#"claude --dangerously-skip-permissions -p "$2""#,
            Agent::Codex => r#"codex exec -c "openai_base_url=$1" --dangerously-bypass-approvals-and-sandbox "$2""#,
        };
        let script = format!(
            r#"echo "vm-key=${var}"
exec python3 -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
print("agent-peak-rss-mib=%d" % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024))
sys.exit(rc)' {run}"#
        );
        vec![script, "sh".into(), fake.openai_base_url(), PROMPT.into()]
    }
}

/// One `hutch run` of an agent in a fresh repository, and what everyone saw.
struct AgentRun {
    agent: Agent,
    out: Output,
    stdout: String,
    stderr: String,
    calls: Vec<Call>,
    audit: String,
    records: Vec<serde_json::Value>,
    dir: PathBuf,
    head_before: String,
    /// `HOST:PORT` of the API, the one destination allowed.
    api_dest: String,
    _tmp: tempfile::TempDir,
}

impl AgentRun {
    /// The agent in the agents image, with `extra` flags for `hutch run`.
    fn start(agent: Agent, extra: &[&str]) -> AgentRun {
        let script = Script { api_key: REAL_KEY.into(), command: command(agent.name()), final_text: FINAL.into() };
        let fake = FakeModelApi::start(script).expect("start the fake API");
        let (host, var) = agent.api();
        let (tmp, dir) = repo();
        let head_before = git(&dir, &["rev-parse", "HEAD"]);
        let audit = tmp.path().join("audit.jsonl");
        // Claude Code finds the API through ANTHROPIC_BASE_URL; Codex is given its URL in the script.
        let base_url = match agent {
            Agent::Claude => vec!["--env".to_string(), format!("ANTHROPIC_BASE_URL={}", fake.anthropic_base_url())],
            Agent::Codex => vec![],
        };
        let t0 = Instant::now();
        let out = hutch()
            .current_dir(&dir)
            .env("XDG_DATA_HOME", tmp.path().join("data"))
            .env(var, REAL_KEY)
            .args(["run", "--image", "agents"])
            .args(fake.hutch_args(host))
            // Claude Code sends its key in x-api-key, Codex as a Bearer token.
            .args(["--secret", &agent.secret_flag()])
            .args(base_url)
            .arg("--audit")
            .arg(&audit)
            .args(extra)
            .args(["--", "sh", "-c"])
            .args(agent.script(&fake))
            .stdin(Stdio::null())
            .output()
            .expect("spawn hutch run");
        let took = t0.elapsed();
        let calls = fake.calls();
        let stdout = text(&out.stdout);
        let peak = stdout.lines().find_map(|l| l.strip_prefix("agent-peak-rss-mib=")).unwrap_or("?");
        eprintln!("hutch run with {agent:?}: {:.1}s wall, agent peak RSS {peak} MiB, {} API calls", took.as_secs_f64(), calls.len());
        for c in &calls {
            eprintln!("  {} {} model={:?} stream={} tools={} -> {:?}", c.method, c.path, c.model, c.stream, c.tools.len(), c.answer);
        }
        let audit = std::fs::read_to_string(&audit).unwrap_or_default();
        let records: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("audit line")).collect();
        let denied: Vec<_> = records.iter().filter(|r| r["decision"] == "deny").collect();
        eprintln!("denied by the gateway during the run: {}", denied.len());
        for d in &denied {
            eprintln!("  {d}");
        }
        let api_dest = format!("{host}:{}", fake.port());
        AgentRun { agent, stderr: text(&out.stderr), stdout, out, calls, audit, records, dir, head_before, api_dest, _tmp: tmp }
    }

    fn dump(&self) -> String {
        dump(&self.out)
    }

    /// The whole turn happened as scripted, with the key injected, and the commit came back.
    fn assert_turn_and_commit(&self) {
        let (stdout, calls, name) = (&self.stdout, &self.calls, self.agent.name());
        let (_, var) = self.agent.api();
        assert_eq!(self.out.status.code(), Some(0), "{}", self.dump());

        // The VM held a placeholder, never the key; the API got the real key on every call.
        let vm_key = stdout.lines().find_map(|l| l.strip_prefix("vm-key=")).unwrap_or_else(|| panic!("no vm-key line: {}", self.dump()));
        assert!(vm_key.starts_with(&format!("hutch-ph-{var}-")), "the VM's key is not a placeholder: {vm_key:?}");
        assert!(!vm_key.contains(REAL_KEY));
        assert!(!calls.is_empty(), "the API was never called: {}", self.dump());
        for c in calls.iter().filter(|c| c.path.starts_with("/v1/")) {
            assert_eq!(c.key.as_deref(), Some(REAL_KEY), "{} {} carried another key", c.method, c.path);
            assert_ne!(c.answer, Answer::Unauthorized);
        }

        // The turn: a tool call, the command ran in the VM and its output went back, then the answer.
        assert!(calls.iter().any(|c| c.answer == Answer::ToolUse && c.tools.iter().any(|t| t == self.agent.tool())), "{calls:?}");
        let result = assert_a_tool_call_ran_in_the_vm(&calls).join("\n");
        assert!(calls.iter().any(|c| c.answer == Answer::FinalText), "{calls:?}");
        assert!(stdout.contains(FINAL), "{name} printed the final answer: {}", self.dump());

        // The commit came back as refs/hutch/<id>; the user's branch and working tree are untouched.
        let dir = &self.dir;
        let hutch_ref = format!("refs/hutch/{}", sandbox_id(&self.stderr));
        assert_eq!(git(dir, &["show", &format!("{hutch_ref}:proof.txt")]), format!("hello from {name}\n"));
        assert_eq!(git(dir, &["log", "-1", "--format=%s|%an", &hutch_ref]).trim(), format!("proof from {name}|{name}"));
        assert_eq!(git(dir, &["rev-parse", &format!("{hutch_ref}~1")]), self.head_before, "one commit on top of the user's HEAD");
        assert_eq!(git(dir, &["rev-parse", "HEAD"]), self.head_before);
        assert!(!dir.join("proof.txt").exists(), "nothing is applied without --apply");

        // The key is nowhere in what hutch showed or logged; its injection is audited by name.
        for (what, t) in [("stdout", stdout), ("stderr", &self.stderr), ("audit log", &self.audit), ("tool result", &result)] {
            assert!(!t.contains(REAL_KEY), "the real key is in the {what}");
        }
        assert!(
            self.records.iter().any(|r| r["event"] == "request" && r["secrets"].as_array().is_some_and(|s| s.iter().any(|x| x == var))),
            "the audit log records the key's injection by name: {}",
            self.audit
        );
    }

    fn denied(&self) -> Vec<&serde_json::Value> {
        self.records.iter().filter(|r| r["decision"] == "deny").collect()
    }
}

#[test]
fn claude_code_runs_a_command_in_the_vm_with_the_key_injected_and_the_commit_comes_back() {
    need_agents_image!();
    let run = AgentRun::start(Agent::Claude, &[]);
    run.assert_turn_and_commit();
    // The image's environment turns off what the gateway would only deny.
    assert!(run.denied().is_empty(), "nothing needed denying: {:?}", run.denied());
}

/// With telemetry, error reporting and update checks back on, Claude Code's requests anywhere but
/// the allowed API port are denied by the gateway and audited, and the turn still completes.
#[test]
fn claude_code_with_nonessential_traffic_on_is_denied_elsewhere_and_still_works() {
    need_agents_image!();
    let run = AgentRun::start(Agent::Claude, &["--env", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=", "--env", "DISABLE_AUTOUPDATER="]);
    run.assert_turn_and_commit();
    let denied = run.denied();
    assert!(!denied.is_empty(), "Claude Code made no request the gateway had to deny; is nonessential traffic on? {}", run.audit);
    for d in &denied {
        assert_ne!(d["dest"].as_str(), Some(run.api_dest.as_str()), "the allowed API was denied: {d}");
    }
}

/// Codex (`codex exec`) against a fake Responses API: its code-mode `exec` tool runs the command
/// through `exec_command` in the VM; the same key, placeholder and repository checks as for Claude.
/// Codex tries the API over WebSocket first; the gateway does not carry upgrades on connections it
/// inspects (those that get a secret), so it falls back to HTTPS, which must still finish the turn.
#[test]
fn codex_runs_a_command_in_the_vm_with_the_key_injected_and_the_commit_comes_back() {
    need_agents_image!();
    let run = AgentRun::start(Agent::Codex, &[]);
    run.assert_turn_and_commit();
    for d in run.denied() {
        if d["dest"].as_str() == Some(run.api_dest.as_str()) {
            assert!(d["reason"].as_str().is_some_and(|r| r.contains("upgrade")), "the API was denied something but a WebSocket upgrade: {d}");
        }
    }
}

/// Claude Code's own first-run state, written in the VM before it starts, so that its interface opens on the
/// prompt instead of the onboarding screens (theme, the API key question, folder trust, the bypass-permissions
/// warning) every fresh VM would otherwise show. The key it approves is the VM's placeholder (its last 20
/// characters, as Claude Code records it).
const CLAUDE_SEED: &str = r#"import json, os
os.makedirs("/root/.claude", exist_ok=True)
key = os.environ["ANTHROPIC_API_KEY"]
json.dump({"hasCompletedOnboarding": True, "theme": "dark", "bypassPermissionsModeAccepted": True,
           "customApiKeyResponses": {"approved": [key[-20:]], "rejected": []},
           "projects": {"/workspace": {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}}},
          open("/root/.claude.json", "w"))
json.dump({"skipDangerousModePermissionPrompt": True}, open("/root/.claude/settings.json", "w"))"#;

/// Codex's own first-run state: the key (the VM's placeholder) as its stored API key, the fake's URL, and
/// `/workspace` trusted, so that its interface opens on the prompt.
const CODEX_SEED: &str = r#"import json, os, sys
os.makedirs("/root/.codex", exist_ok=True)
json.dump({"OPENAI_API_KEY": os.environ["CODEX_API_KEY"]}, open("/root/.codex/auth.json", "w"))
open("/root/.codex/config.toml", "w").write('openai_base_url = "%s"\npreferred_auth_method = "apikey"\n[projects."/workspace"]\ntrust_level = "trusted"\n' % sys.argv[1])"#;

/// The real Claude Code interface on a real terminal (a tmux pane): `hutch run` gives it a terminal, its prompt
/// comes up, a typed prompt goes to the (fake) model, the tool call runs in the VM, the answer is shown, `/exit`
/// ends it, and the commit comes back. Prints the time from `hutch run` to the prompt on screen.
#[test]
fn claude_code_interactive_on_a_terminal_takes_a_typed_prompt_and_exits() {
    need_agents_image!();
    interactive(Agent::Claude);
}

/// The same for Codex's interface (`/quit` ends it).
#[test]
fn codex_interactive_on_a_terminal_takes_a_typed_prompt_and_exits() {
    need_agents_image!();
    interactive(Agent::Codex);
}

fn interactive(agent: Agent) {
    let Some(t) = Tmux::start(120, 40) else { return };
    let name = agent.name();
    let (host, var) = agent.api();
    let script = Script { api_key: REAL_KEY.into(), command: command(name), final_text: FINAL.into() };
    let fake = FakeModelApi::start(script).expect("start the fake API");
    let (tmp, dir) = repo();
    let head_before = git(&dir, &["rev-parse", "HEAD"]);
    // The key goes through a script, so it is never typed on the screen whose contents are checked for it.
    let run = tmp.path().join("run-agent");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut argv: Vec<String> = vec![env!("CARGO_BIN_EXE_hutch").into(), "run".into(), "--image".into(), "agents".into()];
    argv.extend(fake.hutch_args(host));
    argv.extend(["--secret".into(), agent.secret_flag()]);
    let start = match agent {
        Agent::Claude => {
            argv.extend(["--env".into(), format!("ANTHROPIC_BASE_URL={}", fake.anthropic_base_url())]);
            format!("python3 -c {} && exec claude --dangerously-skip-permissions", quote(CLAUDE_SEED))
        }
        Agent::Codex => format!("python3 -c {} {} && exec codex --dangerously-bypass-approvals-and-sandbox", quote(CODEX_SEED), quote(&fake.openai_base_url())),
    };
    argv.extend(["--".into(), "sh".into(), "-c".into(), start]);
    let body = format!(
        "#!/bin/sh\ncd {}\nexport HUTCH_LOG=warn XDG_DATA_HOME={} {var}={}\nexec {}\n",
        quote(&dir.display().to_string()),
        quote(&tmp.path().join("data").display().to_string()),
        quote(REAL_KEY),
        argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
    );
    std::fs::write(&run, body).expect("write the run script");
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");

    let t0 = Instant::now();
    t.line(&format!("{}; echo EXIT=$?", run.display()));
    // The prompt is up when the input box's hint shows; print each new screen on the way, for whoever debugs.
    let mut last = String::new();
    let ready = wait_until(std::time::Duration::from_secs(300), || {
        let s = t.screen();
        if s != last {
            eprintln!("--- screen at {:.1}s:\n{}", t0.elapsed().as_secs_f64(), s.trim_end());
            last = s;
        }
        match agent {
            Agent::Claude => last.contains("? for shortcuts") || last.contains("bypass permissions on"),
            Agent::Codex => last.contains("Ask Codex to do anything") && last.contains("? for shortcuts"),
        }
    });
    assert!(ready, "{name}'s prompt never came up; the screen:\n{last}");
    let to_prompt = t0.elapsed();
    eprintln!("hutch run -> {name}'s prompt on screen: {:.1}s", to_prompt.as_secs_f64());

    // Typed key by key, as a person would: Claude Code takes a burst of input for a paste, and an Enter inside a
    // paste for a new line instead of a submit.
    for ch in PROMPT.chars() {
        t.type_text(&ch.to_string());
    }
    // (The input box puts a no-break space after its ❯, so the text is looked for alone.)
    t.wait_for(PROMPT, 300);
    std::thread::sleep(std::time::Duration::from_secs(1));
    t.keys(&["Enter"]);
    let t1 = Instant::now();
    let mut last = String::new();
    let mut unchanged_since = Instant::now();
    let answered = wait_until(std::time::Duration::from_secs(300), || {
        let s = t.screen();
        if s != last {
            eprintln!("--- screen at {:.1}s after Enter:\n{}", t1.elapsed().as_secs_f64(), s.trim_end());
            last = s;
            unchanged_since = Instant::now();
        } else if agent == Agent::Claude && last.contains(PROMPT) && unchanged_since.elapsed() > std::time::Duration::from_secs(20) {
            // Still sitting in Claude Code's input box: the Enter was taken as part of the typing. Press it again.
            // (Codex shows the prompt there while it waits for its start-up; a second Enter would queue it twice.)
            eprintln!("(Enter again)");
            t.keys(&["Enter"]);
            unchanged_since = Instant::now();
        }
        t.history().contains(FINAL)
    });
    assert!(answered, "the answer never showed; the screen:\n{last}");
    eprintln!("typed prompt -> answer on screen: {:.1}s\n--- screen:\n{}", t1.elapsed().as_secs_f64(), t.screen().trim_end());
    let calls = fake.calls();
    assert!(calls.iter().any(|c| c.answer == Answer::ToolUse && c.tools.iter().any(|x| x == agent.tool())), "{calls:?}");
    assert_a_tool_call_ran_in_the_vm(&calls);
    for c in calls.iter().filter(|c| c.path.starts_with("/v1/")) {
        assert_eq!(c.key.as_deref(), Some(REAL_KEY), "the gateway put the real key on {} {}", c.method, c.path);
    }

    let quit = match agent {
        Agent::Claude => "/exit",
        Agent::Codex => "/quit",
    };
    for ch in quit.chars() {
        t.type_text(&ch.to_string());
    }
    t.wait_for(quit, 300);
    std::thread::sleep(std::time::Duration::from_secs(1));
    t.keys(&["Enter"]);
    let h = t.wait_for("EXIT=0", 300);
    assert!(!h.contains(REAL_KEY), "the real key is on the screen");
    let id = sandbox_id(&h);
    let hutch_ref = format!("refs/hutch/{id}");
    assert_eq!(git(&dir, &["show", &format!("{hutch_ref}:proof.txt")]), format!("hello from {name}\n"));
    assert_eq!(git(&dir, &["rev-parse", &format!("{hutch_ref}~1")]), head_before);
    // hutch's summary is written after the terminal is restored: plain lines at the left margin.
    assert!(h.lines().any(|l| l.starts_with("hutch: ── changes from sandbox")), "{h}");
}

/// One of the tool results the agent sent back shows the command ran in the VM. An agent may retry a tool call
/// in another form first (Codex's code mode sometimes tries a helper that does not exist), so not only the first.
fn assert_a_tool_call_ran_in_the_vm(calls: &[Call]) -> Vec<String> {
    let results: Vec<String> = calls.iter().filter_map(|c| c.tool_result.clone()).collect();
    assert!(!results.is_empty(), "no tool result came back: {calls:?}");
    assert!(results.iter().any(|r| r.contains("committed ") && r.contains(" as root")), "the command ran in the VM: {results:?}");
    results
}
