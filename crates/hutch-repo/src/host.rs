//! The user's repository on the host, and the snapshot that goes into the VM: HEAD's history plus one commit
//! holding the working tree as `git add -A` sees it (uncommitted and untracked-not-ignored files), built in a
//! scratch repository that borrows the user's objects, so the user's index, refs and config are never written.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::credentials::CredentialFilter;
use crate::git::{init_scratch, path_from_output, user_excludes_file, Git, Oid};
use crate::{io_err, RepoError};

/// A git work tree on the host, as found from a directory inside it.
#[derive(Debug, Clone)]
pub struct HostRepo {
    /// The top of the work tree.
    pub top: PathBuf,
    /// This work tree's git directory (differs from `common_dir` in a linked worktree).
    pub git_dir: PathBuf,
    /// Where objects, refs and hutch's stored results live.
    pub common_dir: PathBuf,
    pub object_format: String,
    /// HEAD's commit; `None` on an unborn branch.
    pub head: Option<Oid>,
    /// The branch HEAD points to (`main` for `refs/heads/main`); `None` when detached.
    pub branch: Option<String>,
    /// Where the search started, relative to `top`.
    pub prefix: PathBuf,
}

impl HostRepo {
    /// The work tree containing `cwd`, or `None` when `cwd` is in none (outside any repository, in a bare
    /// repository, or inside a `.git` directory).
    pub fn discover(cwd: &Path) -> Result<Option<HostRepo>, RepoError> {
        let g = Git::discover(cwd);
        let top = match g.run("rev-parse --show-toplevel", ["rev-parse", "--show-toplevel"]) {
            Ok(out) => path_from_output(&out),
            Err(RepoError::Git { stderr, .. })
                if stderr.contains("not a git repository") || stderr.contains("must be run in a work tree") =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let g = Git::discover(&top);
        let abs = |what: &str| -> Result<PathBuf, RepoError> {
            Ok(path_from_output(&g.run(&format!("rev-parse {what}"), ["rev-parse", "--path-format=absolute", what])?))
        };
        let git_dir = abs("--git-dir")?;
        let common_dir = abs("--git-common-dir")?;
        let object_format = g.line("rev-parse --show-object-format", ["rev-parse", "--show-object-format"])?;
        if object_format != "sha1" && object_format != "sha256" {
            return Err(RepoError::Project(format!("unsupported object format {object_format:?}")));
        }
        let g = Git::at(&git_dir);
        let head = g
            .run("rev-parse HEAD", ["rev-parse", "-q", "--verify", "HEAD^{commit}"])
            .ok()
            .and_then(|o| Oid::parse(&String::from_utf8_lossy(&o)));
        let branch = g
            .run("symbolic-ref HEAD", ["symbolic-ref", "-q", "HEAD"])
            .ok()
            .and_then(|o| String::from_utf8(o).ok())
            .and_then(|s| s.trim_end().strip_prefix("refs/heads/").map(str::to_string))
            .filter(|b| !b.is_empty());
        let cwd = cwd.canonicalize().map_err(io_err(format!("cannot resolve {}", cwd.display())))?;
        let top_c = top.canonicalize().map_err(io_err(format!("cannot resolve {}", top.display())))?;
        let prefix = cwd.strip_prefix(&top_c).map(Path::to_path_buf).unwrap_or_default();
        Ok(Some(HostRepo { top: top_c, git_dir, common_dir, object_format, head, branch, prefix }))
    }

    /// Git on the user's repository (no work tree). Only for writing `refs/hutch/*` after checks.
    pub(crate) fn git(&self) -> Git {
        Git::at(&self.git_dir)
    }

    /// Where hutch keeps this repository's sandbox results.
    pub fn results_dir(&self) -> PathBuf {
        self.common_dir.join("hutch")
    }
}

/// What goes into the VM, kept until the VM's output has been imported (its objects are needed then).
#[derive(Debug)]
pub struct Snapshot {
    scratch: tempfile::TempDir,
    pub(crate) git: Git,
    /// The user's HEAD when the snapshot was taken.
    pub base: Option<Oid>,
    /// The working-tree commit (parent: `base`).
    pub commit: Oid,
    /// The working tree has no files at all.
    pub empty: bool,
    pub branch: Option<String>,
    /// A bundle of `refs/hutch/base` (when there is a HEAD) and `refs/hutch/snapshot`.
    pub bundle: PathBuf,
    /// The VM's `/workspace`, ready made: a tar of a fresh repository holding the bundle's objects, HEAD checked
    /// out and the user's working tree over it.
    pub workspace: PathBuf,
    /// SHA-256 of the workspace repository's `config`, `hooks/*` and `info/*`, by path under `.git`: what the VM
    /// starts with, to tell the user later what it changed there.
    pub(crate) git_meta: std::collections::BTreeMap<String, String>,
    /// Untracked credential files that were left out (repository-relative paths, as git spells them).
    pub left_out: Vec<Vec<u8>>,
    /// Credential files that went in because HEAD tracks them (their content is in the history anyway).
    pub tracked_credentials: Vec<Vec<u8>>,
    /// Those of them whose uncommitted changes were held back: the VM has HEAD's version.
    pub held_back_changes: Vec<Vec<u8>>,
}

impl Snapshot {
    /// Takes the snapshot with the built-in credential list. Reads the user's work tree and objects; writes only
    /// in a scratch directory.
    pub fn take(repo: &HostRepo) -> Result<Snapshot, RepoError> {
        Self::take_filtered(repo, &CredentialFilter::default())
    }

    /// Takes the snapshot; untracked files that `credentials` calls credentials are left out.
    pub fn take_filtered(repo: &HostRepo, credentials: &CredentialFilter) -> Result<Snapshot, RepoError> {
        let scratch = tempfile::Builder::new().prefix("hutch-repo-").tempdir().map_err(io_err("cannot create a scratch directory"))?;
        let gd = scratch.path().join("git");
        let git = init_scratch(&gd, &repo.object_format)?;
        let objects = repo.common_dir.join("objects");
        if objects.as_os_str().as_bytes().contains(&b'\n') {
            return Err(RepoError::Project(format!("the repository path {} contains a newline", objects.display())));
        }
        let mut alt = objects.as_os_str().as_bytes().to_vec();
        alt.push(b'\n');
        std::fs::write(gd.join("objects/info/alternates"), alt).map_err(io_err("cannot write the scratch repository"))?;
        // The user's own ignore list is data, so it is honoured.
        if let Ok(ex) = std::fs::read(repo.common_dir.join("info/exclude")) {
            std::fs::create_dir_all(gd.join("info")).map_err(io_err("cannot write the scratch repository"))?;
            std::fs::write(gd.join("info/exclude"), ex).map_err(io_err("cannot write the scratch repository"))?;
        }
        let index = scratch.path().join("index");
        let wt = git.clone().work_tree(&repo.top).index(&index).excludes(user_excludes_file());
        // A copy of the user's index brings its stat data (only changed files are hashed) and its sparse-checkout
        // bits; an index git cannot use from here (a split index, say) falls back to HEAD's tree.
        let copied = std::fs::symlink_metadata(repo.git_dir.join("index")).is_ok_and(|m| m.is_file())
            && std::fs::copy(repo.git_dir.join("index"), &index).is_ok()
            && wt.ok(["add", "-A"]);
        if !copied {
            let _ = std::fs::remove_file(&index);
            match &repo.head {
                Some(h) => wt.run("read-tree", ["read-tree", h.as_str()])?,
                None => wt.run("read-tree", ["read-tree", "--empty"])?,
            };
            wt.run("add -A (working tree snapshot)", ["add", "-A"])?;
        }
        let CredentialOutcome { left_out, tracked: tracked_credentials, held_back_changes } = leave_out_credentials(&git, &wt, repo.head.as_ref(), credentials)?;
        let tree = wt.line("write-tree", ["write-tree"])?;
        let empty = tree == git.line("hash-object", ["hash-object", "-t", "tree", "/dev/null"])?;
        let _ = std::fs::remove_file(&index);
        let mut args: Vec<&str> = vec!["commit-tree", "-m", "hutch: working tree snapshot"];
        if let Some(h) = &repo.head {
            args.extend(["-p", h.as_str()]);
        }
        args.push(&tree);
        let commit = git.line("commit-tree", &args)?;
        let commit = Oid::parse(&commit).ok_or_else(|| RepoError::Git { action: "commit-tree".into(), stderr: commit.clone() })?;
        git.run("update-ref", ["update-ref", "refs/hutch/snapshot", commit.as_str()])?;
        let mut refs = vec!["refs/hutch/snapshot"];
        if let Some(h) = &repo.head {
            git.run("update-ref", ["update-ref", "refs/hutch/base", h.as_str()])?;
            refs.push("refs/hutch/base");
        }
        let bundle = scratch.path().join("in.bundle");
        let mut args: Vec<&OsStr> = vec![OsStr::new("bundle"), OsStr::new("create"), OsStr::new("-q"), bundle.as_os_str()];
        args.extend(refs.iter().map(OsStr::new));
        git.run("bundle create (repository upload)", args)?;
        let (workspace, git_meta) = prepare_workspace(
            scratch.path(),
            &repo.object_format,
            &bundle,
            repo.head.as_ref(),
            (!empty).then_some(&commit),
            repo.branch.as_deref(),
            &repo.prefix,
        )?;
        Ok(Snapshot {
            git,
            base: repo.head.clone(),
            commit,
            empty,
            branch: repo.branch.clone(),
            bundle,
            workspace,
            git_meta,
            scratch,
            left_out,
            tracked_credentials,
            held_back_changes,
        })
    }

    /// The scratch directory (bundle, downloads, temporary indexes).
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }
}

/// Repository-relative paths as git spells them (bytes, maybe not UTF-8).
type Paths = Vec<Vec<u8>>;

/// What the credential filter did to a snapshot.
struct CredentialOutcome {
    left_out: Paths,
    tracked: Paths,
    held_back_changes: Paths,
}

/// Entries of `ls-files -s -z` or `ls-tree -r -z`: path -> (mode, object id). The field before the tab holds the
/// mode first and the object id among the rest (stage or type besides it).
fn entries(out: &[u8], id_field: usize) -> std::collections::HashMap<&[u8], (&[u8], &[u8])> {
    out.split(|&b| b == 0)
        .filter_map(|rec| {
            let tab = rec.iter().position(|&b| b == b'\t')?;
            let mut meta = rec[..tab].split(|&b| b == b' ');
            let mode = meta.next()?;
            let id = meta.nth(id_field - 1)?;
            Some((&rec[tab + 1..], (mode, id)))
        })
        .collect()
}

/// Applies the credential filter to the snapshot's index (`wt`): untracked credential files are removed; tracked
/// ones stay, at HEAD's version. "Tracked" means in HEAD's tree: only that content is already in the history that
/// goes into the VM, so a file merely staged stays out, and uncommitted changes to a tracked one (a real key put
/// into a committed template, say) are held back.
fn leave_out_credentials(scratch: &Git, wt: &Git, head: Option<&Oid>, credentials: &CredentialFilter) -> Result<CredentialOutcome, RepoError> {
    let listed = wt.run("ls-files (credential files)", ["ls-files", "-s", "-z"])?;
    let index = entries(&listed, 1);
    let mut found: Vec<&[u8]> = index.keys().copied().filter(|p| credentials.is_credential(p)).collect();
    found.sort_unstable();
    let none = CredentialOutcome { left_out: vec![], tracked: vec![], held_back_changes: vec![] };
    if found.is_empty() {
        return Ok(none);
    }
    let in_head = match head {
        Some(h) => scratch.run("ls-tree (tracked files)", ["ls-tree", "-r", "-z", "--full-tree", h.as_str()])?,
        None => vec![],
    };
    let tracked = entries(&in_head, 2);
    let (kept, out): (Vec<&[u8]>, Vec<&[u8]>) = found.into_iter().partition(|p| tracked.contains_key(p));
    let held_back: Vec<&[u8]> = kept.iter().copied().filter(|p| index.get(p) != tracked.get(p)).collect();
    if !out.is_empty() {
        let mut stdin = Vec::new();
        for p in &out {
            stdin.extend_from_slice(p);
            stdin.push(0);
        }
        wt.run_input("update-index (leave out credential files)", ["update-index", "--force-remove", "-z", "--stdin"], Some(&stdin))?;
    }
    let mut stdin = Vec::new();
    for p in &held_back {
        if let Some((mode, id)) = tracked.get(p) {
            stdin.extend_from_slice(mode);
            stdin.push(b' ');
            stdin.extend_from_slice(id);
            stdin.push(b'\t');
            stdin.extend_from_slice(p);
            stdin.push(0);
        }
    }
    if !stdin.is_empty() {
        wt.run_input("update-index (HEAD's version of tracked credential files)", ["update-index", "-z", "--index-info"], Some(&stdin))?;
    }
    let owned = |v: Vec<&[u8]>| v.into_iter().map(<[u8]>::to_vec).collect();
    Ok(CredentialOutcome { left_out: owned(out), tracked: owned(kept), held_back_changes: owned(held_back) })
}

/// Makes the VM's `/workspace` on the host and packs it as a tar. Under emulation every git process in the VM
/// costs ~0.1-0.4 s and indexing the pack most of a second; here they take milliseconds, and the VM only
/// unpacks. The repository is new (no hooks, no host config, no remotes): only the bundle's objects, HEAD as
/// the user had it (branch, detached, or unborn), the index at HEAD and the user's working tree over it, so
/// their uncommitted changes show as changes. Host-side git here runs hardened like everywhere else.
fn prepare_workspace(
    scratch: &Path,
    object_format: &str,
    bundle: &Path,
    base: Option<&Oid>,
    snapshot: Option<&Oid>,
    branch: Option<&str>,
    prefix: &Path,
) -> Result<(PathBuf, std::collections::BTreeMap<String, String>), RepoError> {
    let ws = scratch.join("ws");
    Git::discover(scratch).run(
        "init (workspace)",
        [
            OsStr::new("-c"),
            OsStr::new("init.defaultBranch=main"),
            OsStr::new("init"),
            OsStr::new("-q"),
            OsStr::new("--template="),
            OsStr::new(&format!("--object-format={object_format}")),
            ws.as_os_str(),
        ],
    )?;
    // Without templates: no sample hooks, but the directories a clone has, so tools in the VM find them.
    for d in ["hooks", "info"] {
        std::fs::create_dir_all(ws.join(".git").join(d)).map_err(io_err("cannot create the workspace repository"))?;
    }
    let g = Git::at(&ws.join(".git")).work_tree(&ws).index(&ws.join(".git/index"));
    let mut fetch: Vec<&OsStr> = ["fetch", "-q", "--no-tags", "--no-write-fetch-head"].map(OsStr::new).to_vec();
    fetch.push(bundle.as_os_str());
    fetch.push(OsStr::new("refs/hutch/snapshot"));
    if base.is_some() {
        fetch.push(OsStr::new("refs/hutch/base"));
    }
    g.run("fetch (workspace)", fetch)?;
    match (base, branch) {
        (Some(b), Some(br)) => g.run("checkout (workspace)", ["checkout", "-q", "-B", br, b.as_str()])?,
        (Some(b), None) => g.run("checkout (workspace)", ["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", b.as_str()])?,
        (None, Some(br)) => g.run("symbolic-ref (workspace)", ["symbolic-ref", "HEAD", format!("refs/heads/{br}").as_str()])?,
        (None, None) => vec![],
    };
    if let Some(snap) = snapshot {
        let source = format!("--source={}", snap.as_str());
        g.run("restore (workspace)", ["restore", source.as_str(), "--worktree", "--", ":/"])?;
    }
    let config = ws.join(".git/config");
    let mut text = std::fs::read_to_string(&config).map_err(io_err("cannot read the workspace's git config"))?;
    text.push_str("[user]\n\tname = Hutch Sandbox\n\temail = sandbox@hutch.invalid\n");
    std::fs::write(&config, text).map_err(io_err("cannot write the workspace's git config"))?;
    // The directory the command starts in exists even when it holds only ignored files on the host.
    std::fs::create_dir_all(ws.join(prefix)).map_err(io_err("cannot create the start directory in the workspace"))?;
    let git_meta = git_meta_digests(&ws.join(".git")).map_err(io_err("cannot read the workspace's git metadata"))?;
    let tar_path = scratch.join("workspace.tar");
    let file = std::fs::File::create(&tar_path).map_err(io_err("cannot create the workspace archive"))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    // Links are archived as links: the VM gets the tree exactly as git describes it.
    tar.follow_symlinks(false);
    tar.append_dir_all(".", &ws).map_err(io_err("cannot pack the workspace"))?;
    tar.into_inner().and_then(|w| w.into_inner().map_err(|e| e.into_error())).map_err(io_err("cannot pack the workspace"))?;
    std::fs::remove_dir_all(&ws).map_err(io_err("cannot remove the workspace staging directory"))?;
    Ok((tar_path, git_meta))
}

/// Digests of a repository's `config` and the regular files directly in `hooks/` and `info/`, keyed by path
/// relative to the git directory (the form the VM reports them in at the end).
pub(crate) fn git_meta_digests(git_dir: &Path) -> std::io::Result<std::collections::BTreeMap<String, String>> {
    use sha2::{Digest, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let mut files = vec!["config".to_string()];
    for d in ["hooks", "info"] {
        if let Ok(rd) = std::fs::read_dir(git_dir.join(d)) {
            for e in rd.flatten() {
                if e.file_type()?.is_file() {
                    files.push(format!("{d}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    for f in files {
        let bytes = std::fs::read(git_dir.join(&f))?;
        out.insert(f, hex::encode(Sha256::digest(&bytes)));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::credentials::CredentialRules;

    /// A real repository with one commit, an uncommitted change, an untracked file and an ignored one.
    pub(crate) fn sample_repo() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("repo");
        std::fs::create_dir(&r).unwrap();
        let g = Git::discover(&r);
        g.run("init", ["init", "-q", "-b", "main"]).unwrap();
        std::fs::write(r.join("a.txt"), "one\n").unwrap();
        std::fs::write(r.join(".gitignore"), "*.log\n").unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/b.txt"), "bee\n").unwrap();
        std::fs::write(r.join("gone.txt"), "bye\n").unwrap();
        let g = Git::at(&r.join(".git")).work_tree(&r);
        g.run("add", ["add", "-A"]).unwrap();
        g.run("commit", ["commit", "-q", "-m", "first"]).unwrap();
        std::fs::write(r.join("a.txt"), "one\ntwo\n").unwrap();
        std::fs::write(r.join("new.txt"), "untracked\n").unwrap();
        std::fs::write(r.join("debug.log"), "ignored\n").unwrap();
        std::fs::remove_file(r.join("gone.txt")).unwrap();
        (t, r)
    }

    #[test]
    fn discovery_finds_top_head_branch_and_prefix() {
        let (t, r) = sample_repo();
        let repo = HostRepo::discover(&r.join("sub")).unwrap().unwrap();
        assert_eq!(repo.top, r.canonicalize().unwrap());
        assert_eq!(repo.branch.as_deref(), Some("main"));
        assert_eq!(repo.prefix, PathBuf::from("sub"));
        assert!(repo.head.is_some());
        assert!(HostRepo::discover(t.path()).unwrap().is_none(), "outside any repository");
        assert!(HostRepo::discover(&r.join(".git")).unwrap().is_none(), "inside .git there is no work tree");
    }

    #[test]
    fn snapshot_holds_the_working_tree_and_leaves_the_repo_alone() {
        let (_t, r) = sample_repo();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let index_before = std::fs::read(r.join(".git/index")).unwrap();
        let refs_before = Git::at(&repo.git_dir).run("show-ref", ["show-ref"]).unwrap();
        let snap = Snapshot::take(&repo).unwrap();
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        assert_eq!(String::from_utf8(files).unwrap(), ".gitignore\na.txt\nnew.txt\nsub/b.txt\n");
        let a = snap.git.run("show", ["show", &format!("{}:a.txt", snap.commit)]).unwrap();
        assert_eq!(a, b"one\ntwo\n");
        let parent = snap.git.line("rev-parse", ["rev-parse", &format!("{}^", snap.commit)]).unwrap();
        assert_eq!(Some(parent.as_str()), repo.head.as_ref().map(Oid::as_str));
        assert_eq!(std::fs::read(r.join(".git/index")).unwrap(), index_before, "the user's index is untouched");
        assert_eq!(Git::at(&repo.git_dir).run("show-ref", ["show-ref"]).unwrap(), refs_before, "no refs were added");
        let heads = snap.git.run("bundle", ["bundle", "list-heads", snap.bundle.to_str().unwrap()]).unwrap();
        let heads = String::from_utf8(heads).unwrap();
        assert!(heads.contains("refs/hutch/base") && heads.contains("refs/hutch/snapshot"), "{heads}");
        // The bundle is self-contained: a fresh repository can fetch it.
        let t2 = tempfile::tempdir().unwrap();
        let g2 = init_scratch(&t2.path().join("x"), "sha1").unwrap();
        g2.run("fetch", ["fetch", "-q", snap.bundle.to_str().unwrap(), "refs/hutch/*:refs/hutch/*"]).unwrap();
    }

    #[test]
    fn staged_changes_and_skip_worktree_files_are_kept() {
        let (_t, r) = sample_repo();
        let g = Git::at(&r.join(".git")).work_tree(&r);
        std::fs::write(r.join("staged.txt"), "staged\n").unwrap();
        g.run("add", ["add", "staged.txt"]).unwrap();
        // Outside the sparse checkout: absent from the work tree, still part of the project.
        g.run("update-index", ["update-index", "--skip-worktree", "sub/b.txt"]).unwrap();
        std::fs::remove_file(r.join("sub/b.txt")).unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let snap = Snapshot::take(&repo).unwrap();
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        assert_eq!(String::from_utf8(files).unwrap(), ".gitignore\na.txt\nnew.txt\nstaged.txt\nsub/b.txt\n");
    }

    /// Class 12: untracked credential files stay out of the snapshot (and so of the VM's workspace); tracked
    /// ones stay in and are reported; the user's rules decide before the built-in list.
    #[test]
    fn class_12_untracked_credential_files_are_left_out() {
        let (_t, r) = sample_repo();
        let g = Git::at(&r.join(".git")).work_tree(&r);
        std::fs::write(r.join(".env"), "TOKEN=tracked-value\n").unwrap();
        g.run("add", ["add", ".env"]).unwrap();
        g.run("commit", ["commit", "-q", "-m", "tracked env"]).unwrap();
        std::fs::create_dir_all(r.join("config")).unwrap();
        std::fs::create_dir_all(r.join("deploy")).unwrap();
        std::fs::write(r.join("config/.env"), "API_KEY=untracked-real-value\n").unwrap();
        std::fs::write(r.join("config/.env.example"), "API_KEY=\n").unwrap();
        std::fs::write(r.join("deploy/id_rsa"), "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        std::fs::write(r.join("deploy/id_rsa.pub"), "ssh-ed25519 AAAA\n").unwrap();
        std::fs::write(r.join("staged.pem"), "key\n").unwrap();
        g.run("add", ["add", "staged.pem"]).unwrap();
        std::fs::write(r.join(".env"), "TOKEN=tracked-value\nNEW=uncommitted-real-value\n").unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let snap = Snapshot::take(&repo).unwrap();
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        assert_eq!(
            String::from_utf8(files).unwrap(),
            ".env\n.gitignore\na.txt\nconfig/.env.example\ndeploy/id_rsa.pub\nnew.txt\nsub/b.txt\n"
        );
        let mut out = snap.left_out.clone();
        out.sort();
        assert_eq!(out, [b"config/.env".to_vec(), b"deploy/id_rsa".to_vec(), b"staged.pem".to_vec()], "a staged file is not history");
        assert_eq!(snap.tracked_credentials, [b".env".to_vec()]);
        assert_eq!(snap.held_back_changes, [b".env".to_vec()], "an uncommitted change to a tracked one is held back");
        let env = snap.git.run("show", ["show", &format!("{}:.env", snap.commit)]).unwrap();
        assert_eq!(env, b"TOKEN=tracked-value\n", "HEAD's version went in");
        // The workspace tar has none of them either.
        let tar = std::fs::read(&snap.workspace).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> = a.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        assert!(names.iter().any(|n| n.ends_with("config/.env.example")), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with("config/.env") || n.ends_with("deploy/id_rsa") || n.ends_with("staged.pem")), "{names:?}");
        for v in ["untracked-real-value", "uncommitted-real-value"] {
            assert!(!tar.windows(v.len()).any(|w| w == v.as_bytes()), "{v}");
        }
        // The user's index still has the staged file.
        let staged = Git::at(&r.join(".git")).work_tree(&r).run("ls-files", ["ls-files", "staged.pem"]).unwrap();
        assert_eq!(staged, b"staged.pem\n");

        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let user = CredentialRules::parse(&s(&["*.txt"]), &s(&["id_rsa"]), "test").unwrap();
        let snap = Snapshot::take_filtered(&repo, &CredentialFilter::new(vec![user])).unwrap();
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        let files = String::from_utf8(files).unwrap();
        assert!(files.contains("deploy/id_rsa\n") && !files.contains("new.txt") && files.contains("a.txt"), "{files}");
        assert!(!files.contains("config/.env\n"), "{files}");
    }

    #[test]
    fn unborn_branch_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("repo");
        std::fs::create_dir(&r).unwrap();
        Git::discover(&r).run("init", ["init", "-q", "-b", "trunk"]).unwrap();
        std::fs::write(r.join("f"), "x").unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        assert_eq!(repo.head, None);
        assert_eq!(repo.branch.as_deref(), Some("trunk"));
        let snap = Snapshot::take(&repo).unwrap();
        assert_eq!(snap.base, None);
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        assert_eq!(files, b"f\n");
    }
}
