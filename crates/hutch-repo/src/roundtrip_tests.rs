//! Round trips without a VM: the guest scripts run against a temporary directory standing in for the VM's
//! `/workspace`, with real git, and the host side imports and applies what they produce. Hostile output is
//! crafted by hand. (The integration tests in hutch-cli do the same through a real VM.)

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::git::Git;
use crate::guest::{collect_argv, parse_report, Collected, Workspace};
use crate::host::tests::{sample_repo, test_cache};
use crate::host::{HostRepo, Snapshot};
use crate::{apply, import, store, Limits, RepoError, SensitiveKind};

struct FakeVm {
    _dir: tempfile::TempDir,
    home: PathBuf,
    ws: PathBuf,
    staging: PathBuf,
}

impl FakeVm {
    fn new() -> FakeVm {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&staging).unwrap();
        FakeVm { ws: dir.path().join("workspace"), home, staging, _dir: dir }
    }

    fn sh(&self, script: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("guest")
            .args(args)
            .current_dir(self.staging.parent().unwrap())
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("SNAPSHOT_INDEX", crate::host::SNAPSHOT_INDEX)
            .env_remove("GIT_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "guest script failed: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// What the agent does in the VM.
    fn run(&self, script: &str) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&self.ws)
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "agent")
            .env("GIT_AUTHOR_EMAIL", "agent@vm")
            .env("GIT_COMMITTER_NAME", "agent")
            .env("GIT_COMMITTER_EMAIL", "agent@vm")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The workspace image's content as the VM sees it (without an overlay: the collection scans the whole tree).
    fn setup(&self, snap: &Snapshot) -> Workspace {
        crate::host::tests::extract_image(&snap.image, snap.image_base.as_deref(), &self.ws);
        let mut ws = Workspace::new(snap, "/workspace".into());
        ws.overlay = false;
        ws
    }

    fn collect(&self, ws: &Workspace, snap: &Snapshot) -> Collected {
        let argv = collect_argv(ws, self.ws.to_str().unwrap(), self.staging.to_str().unwrap());
        let out = self.sh(&argv[2], &argv[4..].iter().map(String::as_str).collect::<Vec<_>>());
        let (head, bundle, patch, git_meta_changed) = parse_report(ws, &out).unwrap();
        let dest = snap.dir().join("dl");
        std::fs::create_dir_all(&dest).unwrap();
        assert!(patch, "without an overlay the whole tree is scanned and a patch made");
        let patch = dest.join("changes.patch");
        std::fs::copy(self.staging.join("out/changes.patch"), &patch).unwrap();
        let bundle = bundle.then(|| {
            let b = dest.join("commits.bundle");
            std::fs::copy(self.staging.join("out/commits.bundle"), &b).unwrap();
            b
        });
        Collected { head, bundle, patch: Some(patch), git_meta_changed }
    }
}

/// Every file under `root` except `.git` and ignored `*.log`: content (or link target) and mode.
fn listing(root: &Path) -> BTreeMap<String, (String, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (String, u32)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".git" || rel == "start" || rel.ends_with(".log") {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(rel, (format!("-> {}", std::fs::read_link(&p).unwrap().display()), 0o120000));
            } else if m.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, (String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(), m.permissions().mode() & 0o111));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn host_git(repo: &HostRepo) -> Git {
    Git::at(&repo.git_dir).work_tree(&repo.top)
}

/// The user's refs, index and working tree, to show they are untouched.
fn fingerprint(repo: &HostRepo) -> (String, Vec<u8>, BTreeMap<String, (String, u32)>) {
    let refs = host_git(repo).line("for-each-ref", ["for-each-ref", "refs/heads", "refs/tags"]).unwrap();
    (refs, std::fs::read(repo.git_dir.join("index")).unwrap(), listing(&repo.top))
}

fn hutch_refs(repo: &HostRepo) -> String {
    host_git(repo).line("for-each-ref", ["for-each-ref", "refs/hutch"]).unwrap()
}

#[test]
fn commits_and_edits_come_back_and_apply_exactly() {
    let (_t, r) = sample_repo();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    // The VM sees the user's uncommitted state: modified, untracked, deleted; not the ignored file.
    let mut expected_start = listing(&r);
    expected_start.retain(|k, _| !k.ends_with(".log"));
    assert_eq!(listing(&vm.ws), expected_start);
    vm.run("git status --porcelain | grep -q '^ M a.txt' && git log --format=%s | grep -qx first && test -z \"$(git remote)\"");

    vm.run(
        "echo three >> a.txt && git commit -qam 'vm: add three' && echo c > c.txt && git add c.txt && git commit -qm 'vm: add c' \
         && echo changed > sub/b.txt && rm new.txt && printf 'bin\\000ary' > blob.bin && ln -s sub/b.txt link \
         && mkdir -p tools && printf '#!/bin/sh\\necho hi\\n' > tools/run.sh && chmod +x tools/run.sh",
    );
    let before = fingerprint(&repo);
    let c = vm.collect(&ws, &snap);
    assert!(c.bundle.is_some());
    let stored = import(&repo, &snap, "abc123", &c, &Limits::default()).unwrap().expect("changes");
    assert_eq!(fingerprint(&repo), before, "import leaves branches, index and working tree alone");
    assert_eq!(stored.meta.commit_count, 2);
    assert_eq!(stored.meta.commits[0].subject, "vm: add c");
    assert!(stored.meta.sensitive.is_empty(), "{:?}", stored.meta.sensitive);
    let vm_head = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(&vm.ws).output().unwrap().stdout;
    let r_ref = host_git(&repo).line("rev-parse", ["rev-parse", "refs/hutch/abc123"]).unwrap();
    assert_eq!(r_ref, String::from_utf8_lossy(&vm_head).trim());

    let applied = apply(&repo, &store::load(&repo.results_dir(), Some("abc")).unwrap(), false).unwrap();
    assert!(applied.files >= 6, "{applied:?}");
    assert_eq!(listing(&r), listing(&vm.ws), "the working tree now matches the VM's");
    // A second apply finds the changes already there and changes nothing.
    let now = listing(&r);
    let again = apply(&repo, &stored, false).unwrap_err();
    assert!(matches!(again, RepoError::Apply(_)), "{again}");
    assert_eq!(listing(&r), now);
}

#[test]
fn nothing_changed_means_nothing_stored() {
    let (_t, r) = sample_repo();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    let c = vm.collect(&ws, &snap);
    assert!(import(&repo, &snap, "abc123", &c, &Limits::default()).unwrap().is_none());
    assert_eq!(hutch_refs(&repo), "");
}

#[test]
fn unborn_branch_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("repo");
    std::fs::create_dir(&r).unwrap();
    Git::discover(&r).run("init", ["init", "-q", "-b", "main"]).unwrap();
    std::fs::write(r.join("f"), "x\n").unwrap();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    vm.run("git add f && git commit -qm init && echo y > g");
    let stored = import(&repo, &snap, "def456", &vm.collect(&ws, &snap), &Limits::default()).unwrap().unwrap();
    assert_eq!(stored.meta.commit_count, 1);
    apply(&repo, &stored, false).unwrap();
    assert_eq!(std::fs::read_to_string(r.join("g")).unwrap(), "y\n");
}

#[test]
fn sensitive_changes_need_the_flag_and_vm_git_metadata_never_leaves() {
    let (_t, r) = sample_repo();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let config_before = std::fs::read(repo.git_dir.join("config")).unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    vm.run(
        "printf '#!/bin/sh\\necho pwned\\n' > .git/hooks/post-checkout && chmod +x .git/hooks/post-checkout \
         && git config core.hooksPath /tmp/evil-hooks && mkdir -p .vscode && echo '{\"tasks\":[]}' > .vscode/tasks.json \
         && echo ok > plain.txt",
    );
    let c = vm.collect(&ws, &snap);
    assert_eq!(c.git_meta_changed, vec![".git/config".to_string(), ".git/hooks/post-checkout".to_string()]);
    let stored = import(&repo, &snap, "bad001", &c, &Limits::default()).unwrap().unwrap();
    assert_eq!(stored.meta.sensitive.len(), 1);
    assert_eq!(stored.meta.sensitive[0].path, ".vscode/tasks.json");
    assert_eq!(stored.meta.sensitive[0].kind, SensitiveKind::Editor);
    assert_eq!(stored.meta.vm_git_metadata.len(), 2);

    let before = listing(&r);
    let e = apply(&repo, &stored, false).unwrap_err();
    assert!(matches!(e, RepoError::Sensitive { .. }), "{e}");
    assert!(e.to_string().contains(".vscode/tasks.json") && e.to_string().contains("--allow-sensitive"), "{e}");
    assert_eq!(listing(&r), before, "a refused apply changes nothing (not even the harmless file)");

    apply(&repo, &stored, true).unwrap();
    assert!(r.join(".vscode/tasks.json").is_file() && r.join("plain.txt").is_file());
    assert!(!repo.git_dir.join("hooks/post-checkout").exists());
    assert_eq!(std::fs::read(repo.git_dir.join("config")).unwrap(), config_before);
}

/// Imports hostile output; checks it is refused with `want` in the message and nothing reached the repo.
fn refused(repo: &HostRepo, snap: &Snapshot, c: &Collected, limits: &Limits, want: &str) {
    let before = fingerprint(repo);
    let e = import(repo, snap, "eee000", c, limits).expect_err(want);
    let msg = e.to_string();
    assert!(matches!(e, RepoError::Refused(_)), "{msg}");
    assert!(msg.contains(want), "wanted {want:?} in: {msg}");
    assert_eq!(fingerprint(repo), before);
    assert_eq!(hutch_refs(repo), "", "no ref was created");
    assert!(store::list(&repo.results_dir()).is_empty(), "nothing was stored");
}

#[test]
fn hostile_patches_are_refused_and_change_nothing() {
    let (_t, r) = sample_repo();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    let c = vm.collect(&ws, &snap);
    let with_patch = |text: &str| {
        std::fs::write(c.patch.as_ref().unwrap(), text).unwrap();
        Collected { head: c.head.clone(), bundle: None, patch: c.patch.clone(), git_meta_changed: vec![] }
    };
    let new_file = |p: &str| {
        format!("diff --git a/{p} b/{p}\nnew file mode 100644\nindex 0000000..7898192\n--- /dev/null\n+++ b/{p}\n@@ -0,0 +1 @@\n+a\n")
    };
    let l = Limits::default();
    refused(&repo, &snap, &with_patch(&new_file("../escape.txt")), &l, "component");
    refused(&repo, &snap, &with_patch(&new_file("sub/../../escape.txt")), &l, "component");
    refused(&repo, &snap, &with_patch(&new_file("/tmp/abs.txt")), &l, "absolute");
    refused(&repo, &snap, &with_patch(&new_file(".git/hooks/post-checkout")), &l, ".git");
    refused(&repo, &snap, &with_patch(&new_file("x/.GIT/config")), &l, ".git");
    refused(&repo, &snap, &with_patch("not a patch\n"), &l, "malformed");
    refused(&repo, &snap, &with_patch(&new_file("a.txt").replace("+++ b/a.txt", "+++ b/../a.txt")), &l, "inconsistent");
    // A patch that parses but does not apply to the VM's own HEAD.
    let stale = "diff --git a/a.txt b/a.txt\nindex 0000000..7898192 100644\n--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-nope\n+a\n";
    refused(&repo, &snap, &with_patch(stale), &l, "does not apply");
    // Size: over the limit is refused before parsing.
    refused(&repo, &snap, &with_patch(&new_file("big.txt")), &Limits { max_patch: 10, ..l }, "larger than");
}

#[test]
fn symlinks_out_of_the_tree_are_refused() {
    for (script, want) in [
        ("ln -s /etc/passwd evil", "evil"),
        ("ln -s ../../../../etc/passwd evil", "points outside"),
        // Each link stays inside on its own; followed through each other they leave the tree.
        ("mkdir d && ln -s .. d/a && ln -s d/a/.. b", "points outside"),
        ("git init -q vendored && echo x > vendored/f && git -C vendored add f && git -C vendored commit -qm x", "nested git repository"),
    ] {
        let (_t, r) = sample_repo();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let snap = Snapshot::take(&repo, &test_cache()).unwrap();
        let vm = FakeVm::new();
        let ws = vm.setup(&snap);
        vm.run(script);
        let c = vm.collect(&ws, &snap);
        refused(&repo, &snap, &c, &Limits::default(), want);
        // The same, committed, comes back through the bundle and is refused there too.
        let vm = FakeVm::new();
        let ws = vm.setup(&snap);
        vm.run(&format!("{script} && git add -A && git commit -qm evil"));
        let c = vm.collect(&ws, &snap);
        assert!(c.bundle.is_some());
        let want = if want == "evil" { "absolute" } else { want };
        refused(&repo, &snap, &c, &Limits::default(), want);
    }
}

#[test]
fn hostile_bundles_are_refused_and_change_nothing() {
    let (_t, r) = sample_repo();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    vm.run("echo more >> a.txt && git commit -qam more && git tag -a -m t v1");
    let c = vm.collect(&ws, &snap);
    let good = std::fs::read(c.bundle.as_ref().unwrap()).unwrap();
    let l = Limits::default();

    // Garbage, truncation, a flipped byte in the pack.
    for (bytes, want) in [
        (b"not a bundle at all\n".to_vec(), "corrupt"),
        (good[..good.len() / 2].to_vec(), "VM's commit"),
        (
            {
                let mut b = good.clone();
                let n = b.len();
                b[n - 30] ^= 0xff;
                b
            },
            "VM's commit",
        ),
    ] {
        std::fs::write(c.bundle.as_ref().unwrap(), &bytes).unwrap();
        refused(&repo, &snap, &c, &l, want);
    }
    std::fs::write(c.bundle.as_ref().unwrap(), &good).unwrap();

    // A bundle with more refs than its HEAD.
    let extra = snap.dir().join("extra.bundle");
    let base = snap.base.as_ref().unwrap().as_str();
    vm.run(&format!("git bundle create -q {} HEAD refs/tags/v1 ^{base}", extra.display()));
    let c2 = Collected { bundle: Some(extra), ..vm.collect(&ws, &snap) };
    refused(&repo, &snap, &c2, &l, "exactly its HEAD");

    // A reported HEAD that is not the bundle's.
    let c3 = Collected { head: snap.base.clone(), ..vm.collect(&ws, &snap) };
    refused(&repo, &snap, &c3, &l, "exactly its HEAD");

    // A commit whose tree has an entry named `.GIT` (made with plumbing; porcelain refuses).
    vm.run(
        "blob=$(echo evil | git hash-object -w --stdin) && sub=$(printf '100644 blob %s\\tconfig\\n' $blob | git mktree) \
         && tree=$(printf '040000 tree %s\\t.GIT\\n' $sub | git mktree) && c=$(git commit-tree -p HEAD -m evil $tree) \
         && fix=$(git commit-tree -p $c -m fix HEAD^{tree}) && git update-ref HEAD $fix",
    );
    let c4 = vm.collect(&ws, &snap);
    refused(&repo, &snap, &c4, &l, ".git");
}

#[test]
fn type_changes_in_the_working_tree_arrive() {
    let (_t, r) = sample_repo();
    // `sub/` (a directory in HEAD) becomes a file, `a.txt` (a file) becomes a directory, plus a symlink.
    std::fs::remove_dir_all(r.join("sub")).unwrap();
    std::fs::write(r.join("sub"), "now a file\n").unwrap();
    std::fs::remove_file(r.join("a.txt")).unwrap();
    std::fs::create_dir(r.join("a.txt")).unwrap();
    std::fs::write(r.join("a.txt/inner"), "inside\n").unwrap();
    std::os::unix::fs::symlink("a.txt/inner", r.join("ln")).unwrap();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    vm.setup(&snap);
    let mut want = listing(&r);
    want.retain(|k, _| !k.ends_with(".log"));
    assert_eq!(listing(&vm.ws), want);
}

#[test]
fn an_empty_repository_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("repo");
    std::fs::create_dir(&r).unwrap();
    Git::discover(&r).run("init", ["init", "-q", "-b", "main"]).unwrap();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    assert!(snap.empty);
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    assert!(import(&repo, &snap, "0a0a0a", &vm.collect(&ws, &snap), &Limits::default()).unwrap().is_none());
    vm.run("echo first > f && git add f && git commit -qm first && echo more > g");
    let stored = import(&repo, &snap, "0b0b0b", &vm.collect(&ws, &snap), &Limits::default()).unwrap().unwrap();
    assert_eq!(stored.meta.commit_count, 1);
    apply(&repo, &stored, false).unwrap();
    assert_eq!(listing(&r), listing(&vm.ws));
}

#[test]
fn apply_is_all_or_nothing_when_the_working_tree_moved_on() {
    let (_t, r) = sample_repo();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    let snap = Snapshot::take(&repo, &test_cache()).unwrap();
    let vm = FakeVm::new();
    let ws = vm.setup(&snap);
    vm.run("echo vm >> a.txt && echo c > c.txt && echo d > sub/d.txt");
    let stored = import(&repo, &snap, "aa0001", &vm.collect(&ws, &snap), &Limits::default()).unwrap().unwrap();
    // The user edits the same line meanwhile: a.txt no longer applies; c.txt and sub/d.txt would.
    std::fs::write(r.join("a.txt"), "one\nuser's own edit\n").unwrap();
    let before = listing(&r);
    let e = apply(&repo, &stored, false).unwrap_err();
    assert!(e.to_string().contains("do not apply") && e.to_string().contains("a.txt"), "{e}");
    assert_eq!(listing(&r), before, "nothing was written");
}

#[test]
fn apply_never_writes_through_a_symlink_in_the_working_tree() {
    let (t, r) = sample_repo();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, r.join("lnk")).unwrap();
    let repo = HostRepo::discover(&r).unwrap().unwrap();
    // A stored patch (as if the import had been fooled) creating a file under the user's symlink.
    let patch = "diff --git a/lnk/x b/lnk/x\nnew file mode 100644\nindex 0000000..7898192\n--- /dev/null\n+++ b/lnk/x\n@@ -0,0 +1 @@\n+a\n";
    let meta = store::ResultMeta {
        id: "cc0001".into(),
        created_unix: 0,
        base: None,
        vm_head: None,
        reference: None,
        commits: vec![],
        commit_count: 0,
        stat: String::new(),
        files: 1,
        sensitive: vec![],
        vm_git_metadata: vec![],
    };
    let stored = store::save(&repo.results_dir(), &meta, patch.as_bytes(), b"").unwrap();
    let e = apply(&repo, &stored, true).unwrap_err();
    assert!(e.to_string().contains("beyond a symbolic link"), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}
