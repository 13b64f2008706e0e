//! The repository through a daemon (`hutch run --detach`, `hutch diff/apply --from ID`). The client takes the
//! usual [`Snapshot`] (without an image) and sends its commit as a git bundle with a [`SnapshotSpec`]. The daemon
//! rebuilds the same `Snapshot` from it ([`Snapshot::from_upload`]: the same workspace image code as `hutch run`),
//! collects the VM's change with [`crate::collect`], runs every check of [`crate::check`] and writes an export
//! directory ([`export`]): `meta.json`, the snapshot commit as a bundle over its base, the VM's commits bundle
//! and patch as the VM sent them. The client fetches that directory and [`import_export`] rebuilds the snapshot
//! over the user's own objects and runs the ordinary [`crate::import`], checks included: the daemon's verdict is
//! a summary, never a reason to skip a check here.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::git::{init_scratch, Git, Oid};
use crate::guest::Collected;
use crate::host::{scratch_borrowing, HostRepo, Snapshot};
use crate::image::{workspace_image, WorkspaceSpec};
use crate::import::{check, commit_lines, Start};
use crate::patch::Sensitive;
use crate::store::{self, CommitLine, Stored};
use crate::{io_err, Limits, RepoError};

pub const META: &str = "meta.json";
pub const SNAPSHOT_BUNDLE: &str = "snapshot.bundle";
pub const COMMITS_BUNDLE: &str = "commits.bundle";
pub const CHANGES_PATCH: &str = "changes.patch";
/// The files of an export besides `meta.json`, as the daemon serves them.
pub const EXPORT_FILES: [&str; 3] = [SNAPSHOT_BUNDLE, COMMITS_BUNDLE, CHANGES_PATCH];
/// The ref the snapshot commit travels under in both bundles' repositories.
const SNAPSHOT_REF: &str = "refs/hutch/snapshot";
const META_MAX: u64 = 16 << 20;

/// What the daemon needs besides the bundle to rebuild a snapshot, and what the client checks a fetched change
/// against. Every field is checked before use ([`SnapshotSpec::check`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// `sha1` or `sha256`.
    pub object_format: String,
    /// The user's HEAD when the snapshot was taken (`None`: an unborn branch).
    pub base: Option<Oid>,
    /// The working-tree commit (parent: `base`) and its tree.
    pub commit: Oid,
    pub tree: Oid,
    pub branch: Option<String>,
    /// Where the user was in the work tree, relative to its top (`/`-separated; empty at the top).
    #[serde(default)]
    pub prefix: String,
}

impl SnapshotSpec {
    pub fn check(&self) -> Result<(), RepoError> {
        let bad = |m: String| Err(RepoError::Project(format!("snapshot: {m}")));
        if self.object_format != "sha1" && self.object_format != "sha256" {
            return bad(format!("object format {:?} is neither sha1 nor sha256", self.object_format));
        }
        if self.prefix.len() > 4096 || self.prefix.chars().any(char::is_control) {
            return bad("the start directory is longer than 4096 bytes or holds control characters".into());
        }
        let p = Path::new(&self.prefix);
        if !p.components().all(|c| matches!(c, Component::Normal(n) if n != ".git")) {
            return bad(format!("the start directory {:?} is not a plain relative path", self.prefix));
        }
        if let Some(b) = &self.branch {
            let ok = !b.is_empty()
                && b.len() <= 255
                && !b.starts_with(['-', '/', '.'])
                && !b.contains("..")
                && !b.contains("//")
                && !b.ends_with(['/', '.'])
                && !b.ends_with(".lock")
                && !b.contains("@{")
                && b.bytes().all(|c| c > b' ' && c != 0x7f && !b"~^:?*[\\".contains(&c));
            if !ok {
                return bad(format!("{:?} is not a branch name", crate::path::show(b.as_bytes())));
            }
        }
        Ok(())
    }

    fn prefix_path(&self) -> PathBuf {
        PathBuf::from(&self.prefix)
    }
}

/// A daemon's export of one sandbox's change (its `meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportMeta {
    pub id: String,
    /// When the daemon collected it (seconds since the epoch).
    pub collected_unix: u64,
    pub snapshot: SnapshotSpec,
    /// The command's exit code.
    pub exit_code: Option<i32>,
    /// The VM changed something; then the files below are there as flagged.
    pub changed: bool,
    /// Why there is no change to fetch: the collection failed or the daemon's checks refused it.
    #[serde(default)]
    pub error: Option<String>,
    pub vm_head: Option<Oid>,
    pub commits_bundle: bool,
    pub changes_patch: bool,
    pub commits: Vec<CommitLine>,
    pub commit_count: usize,
    pub stat: String,
    pub files: usize,
    pub sensitive: Vec<Sensitive>,
    pub vm_git_metadata: Vec<String>,
}

impl ExportMeta {
    /// A result without a change: nothing changed, or `error` says why nothing can be fetched.
    pub fn empty(id: &str, snapshot: &SnapshotSpec, exit_code: Option<i32>, error: Option<String>) -> ExportMeta {
        ExportMeta {
            id: id.to_string(),
            collected_unix: now(),
            snapshot: snapshot.clone(),
            exit_code,
            changed: false,
            error,
            vm_head: None,
            commits_bundle: false,
            changes_patch: false,
            commits: vec![],
            commit_count: 0,
            stat: String::new(),
            files: 0,
            sensitive: vec![],
            vm_git_metadata: vec![],
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), RepoError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| RepoError::Io { what: "cannot encode meta.json".into(), source: e.into() })?;
        std::fs::write(dir.join(META), json).map_err(io_err("cannot write meta.json"))
    }

    pub fn read(dir: &Path) -> Result<ExportMeta, RepoError> {
        let bytes = store::read_capped(&dir.join(META), META_MAX)?;
        let m: ExportMeta = serde_json::from_slice(&bytes).map_err(|e| RepoError::Refused(format!("meta.json is not an export: {e}")))?;
        m.snapshot.check()?;
        store::check_id(&m.id)?;
        Ok(m)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Snapshot {
    /// What a daemon needs besides the bundle.
    pub fn spec(&self, repo: &HostRepo) -> SnapshotSpec {
        SnapshotSpec {
            object_format: repo.object_format.clone(),
            base: self.base.clone(),
            commit: self.commit.clone(),
            tree: self.tree.clone(),
            branch: self.branch.clone(),
            prefix: repo.prefix.to_str().filter(|p| !p.contains(['\n', '\0'])).unwrap_or("").to_string(),
        }
    }

    /// Writes the snapshot commit with its whole history as a git bundle (what `hutch run` would have put into
    /// the workspace image's repository). Returns its size.
    pub fn write_bundle(&self, path: &Path) -> Result<u64, RepoError> {
        self.git.run("bundle create (snapshot)", [std::ffi::OsStr::new("bundle"), "create".as_ref(), "-q".as_ref(), path.as_os_str(), SNAPSHOT_REF.as_ref()])?;
        Ok(std::fs::metadata(path).map_err(io_err("cannot read the snapshot bundle"))?.len())
    }

    /// On a daemon: the snapshot a client uploaded (a bundle of its commit with full history), checked against
    /// `spec`, with its workspace image made (or found) in `image_cache` exactly as `hutch run` makes it.
    /// Its scratch directory is made in `scratch_in` (`.snap-*`), so a daemon can clear what a crash left there.
    pub fn from_upload(bundle: &Path, spec: &SnapshotSpec, image_cache: &Path, scratch_in: &Path) -> Result<Snapshot, RepoError> {
        spec.check()?;
        let scratch = tempfile::Builder::new().prefix(".snap-").tempdir_in(scratch_in).map_err(io_err("cannot create a scratch directory"))?;
        let git = init_scratch(&scratch.path().join("git"), &spec.object_format)?;
        fetch_snapshot(&git, bundle, spec).map_err(|e| refused(e, "the uploaded snapshot bundle"))?;
        let empty = spec.tree.as_str() == crate::host::empty_tree(&spec.object_format);
        let prefix = spec.prefix_path();
        let ws = WorkspaceSpec {
            object_format: &spec.object_format,
            base: spec.base.as_ref(),
            tree: &spec.tree,
            branch: spec.branch.as_deref(),
            prefix: &prefix,
        };
        let made = workspace_image(scratch.path(), &git, &ws, image_cache, None, None)?;
        let (image, image_base, git_meta, image_reused) = (made.image, made.blob, made.git_meta, made.reused);
        Ok(Snapshot {
            scratch,
            git,
            base: spec.base.clone(),
            commit: spec.commit.clone(),
            tree: spec.tree.clone(),
            empty,
            branch: spec.branch.clone(),
            image,
            image_base,
            image_reused,
            git_meta,
            left_out: vec![],
            tracked_credentials: vec![],
            held_back_changes: vec![],
        })
    }
}

fn refused(e: RepoError, what: &str) -> RepoError {
    match e {
        RepoError::Git { stderr, .. } => RepoError::Refused(format!("{what}: {stderr}")),
        other => other,
    }
}

/// Fetches `SNAPSHOT_REF` from `bundle` into `git` and checks that it is the commit `spec` names, with its tree
/// and its parent.
fn fetch_snapshot(git: &Git, bundle: &Path, spec: &SnapshotSpec) -> Result<(), RepoError> {
    let spec_ref = format!("+{SNAPSHOT_REF}:{SNAPSHOT_REF}");
    git.run(
        "fetch (snapshot bundle)",
        [std::ffi::OsStr::new("fetch"), "-q".as_ref(), "--no-tags".as_ref(), "--no-write-fetch-head".as_ref(), bundle.as_os_str(), spec_ref.as_ref()],
    )?;
    let got = git.line("rev-parse", ["rev-parse", "--verify", "-q", &format!("{SNAPSHOT_REF}^{{commit}}")])?;
    if got != spec.commit.as_str() {
        return Err(RepoError::Refused(format!("the bundle holds commit {got}, not {}", spec.commit)));
    }
    let tree = git.line("rev-parse", ["rev-parse", &format!("{got}^{{tree}}")])?;
    if tree != spec.tree.as_str() {
        return Err(RepoError::Refused(format!("commit {got} has tree {tree}, not {}", spec.tree)));
    }
    let parents = git.line("rev-list", ["rev-list", "--parents", "-n", "1", got.as_str()])?;
    let parents: Vec<&str> = parents.split(' ').skip(1).collect();
    let want: Vec<&str> = spec.base.iter().map(Oid::as_str).collect();
    if parents != want {
        return Err(RepoError::Refused(format!("commit {got} has parents {parents:?}, not {want:?}")));
    }
    Ok(())
}

/// On a daemon, after the VM's change was collected (`c`, files under `snap.dir()`): every check `hutch run`
/// makes, then the export in `out` (an empty directory): `meta.json`, the snapshot commit as a bundle over its
/// base, and the VM's bundle and patch as it sent them. A change the checks refuse is an error.
pub fn export(snap: &Snapshot, spec: &SnapshotSpec, id: &str, exit_code: Option<i32>, c: &Collected, limits: &Limits, out: &Path) -> Result<ExportMeta, RepoError> {
    store::check_id(id)?;
    let start = Start { base: snap.base.as_ref(), commit: &snap.commit, tree: &snap.tree };
    let checked = check(&snap.git, start, snap.dir(), c, limits)?;
    if checked.is_empty() {
        let mut m = ExportMeta::empty(id, spec, exit_code, None);
        m.vm_git_metadata = c.git_meta_changed.clone();
        m.write(out)?;
        return Ok(m);
    }
    let base = snap.base.as_ref().map(Oid::as_str);
    let mut args: Vec<std::ffi::OsString> = vec!["bundle".into(), "create".into(), "-q".into(), out.join(SNAPSHOT_BUNDLE).into(), SNAPSHOT_REF.into()];
    if let Some(b) = base {
        args.push(format!("^{b}").into());
    }
    snap.git.run("bundle create (snapshot over its base)", &args)?;
    if let Some(b) = &c.bundle {
        std::fs::copy(b, out.join(COMMITS_BUNDLE)).map_err(io_err("cannot keep the VM's commits bundle"))?;
    }
    if let Some(p) = &c.patch {
        std::fs::copy(p, out.join(CHANGES_PATCH)).map_err(io_err("cannot keep the VM's patch"))?;
    }
    let lines = commit_lines(&snap.git, c.head.as_ref(), base)?;
    let m = ExportMeta {
        id: id.to_string(),
        collected_unix: now(),
        snapshot: spec.clone(),
        exit_code,
        changed: true,
        error: None,
        vm_head: c.head.clone(),
        commits_bundle: c.bundle.is_some(),
        changes_patch: c.patch.is_some(),
        commits: lines,
        commit_count: checked.commits.len(),
        stat: checked.stat.clone(),
        files: checked.applied.files.len(),
        sensitive: checked.applied.sensitive(),
        vm_git_metadata: c.git_meta_changed.clone(),
    };
    m.write(out)?;
    Ok(m)
}

/// On the client, in the repository the sandbox started from: the fetched export in `dir` imported like a local
/// run's change (`refs/hutch/<id>`, `.git/hutch/<id>/`), every check run again here. Refused when this
/// repository's HEAD is not the commit the sandbox started from. `Ok(None)`: the sandbox changed nothing.
pub fn import_export(repo: &HostRepo, dir: &Path, limits: &Limits) -> Result<Option<Stored>, RepoError> {
    let m = ExportMeta::read(dir)?;
    if let Some(e) = &m.error {
        return Err(RepoError::Refused(format!("the daemon could not take sandbox {}'s change: {e}", m.id)));
    }
    if !m.changed {
        return Ok(None);
    }
    let s = &m.snapshot;
    if s.object_format != repo.object_format {
        return Err(RepoError::Project(format!(
            "sandbox {} ran a {} repository and this one is {}; fetch its change in the repository it came from",
            m.id, s.object_format, repo.object_format
        )));
    }
    if repo.head != s.base {
        let show = |o: Option<&Oid>| o.map(|o| o.short().to_string()).unwrap_or_else(|| "an unborn branch".into());
        return Err(RepoError::Project(format!(
            "sandbox {} started from {}{}, but this repository's HEAD is {}: its change is fetched only in the repository and at the commit it came from (check out {} first); nothing was changed",
            m.id,
            show(s.base.as_ref()),
            s.branch.as_deref().map(|b| format!(" (branch {})", crate::path::show(b.as_bytes()))).unwrap_or_default(),
            show(repo.head.as_ref()),
            show(s.base.as_ref()),
        )));
    }
    let (scratch, git) = scratch_borrowing(repo)?;
    fetch_snapshot(&git, &dir.join(SNAPSHOT_BUNDLE), s).map_err(|e| refused(e, "the fetched snapshot does not fit this repository"))?;
    let empty = s.tree.as_str() == crate::host::empty_tree(&s.object_format);
    let snap = Snapshot {
        scratch,
        git,
        base: s.base.clone(),
        commit: s.commit.clone(),
        tree: s.tree.clone(),
        empty,
        branch: s.branch.clone(),
        image: PathBuf::new(),
        image_base: None,
        image_reused: false,
        git_meta: Default::default(),
        left_out: vec![],
        tracked_credentials: vec![],
        held_back_changes: vec![],
    };
    let c = Collected {
        head: m.vm_head.clone(),
        bundle: m.commits_bundle.then(|| dir.join(COMMITS_BUNDLE)),
        patch: m.changes_patch.then(|| dir.join(CHANGES_PATCH)),
        git_meta_changed: m.vm_git_metadata.clone(),
    };
    crate::import(repo, &snap, &m.id, &c, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::tests::{sample_repo, test_cache};

    fn spec() -> SnapshotSpec {
        SnapshotSpec {
            object_format: "sha1".into(),
            base: None,
            commit: Oid::parse(&"a".repeat(40)).unwrap(),
            tree: Oid::parse(&"b".repeat(40)).unwrap(),
            branch: Some("main".into()),
            prefix: "sub/dir".into(),
        }
    }

    #[test]
    fn specs_with_hostile_paths_or_names_are_refused() {
        assert!(spec().check().is_ok());
        for p in ["../x", "/etc", "a/../../b", "a/.git/x", "a\nb"] {
            let s = SnapshotSpec { prefix: p.into(), ..spec() };
            assert!(s.check().is_err(), "{p}");
        }
        for b in ["", "-x", "a..b", "a b", "x.lock", "a:b", "/a", "a/"] {
            let s = SnapshotSpec { branch: Some(b.into()), ..spec() };
            assert!(s.check().is_err(), "{b}");
        }
        let s = SnapshotSpec { object_format: "md5".into(), ..spec() };
        assert!(s.check().is_err());
    }

    /// The whole trip without a VM: the client's snapshot as a bundle, rebuilt on the "daemon" with its image,
    /// a change made in a copy of the workspace, exported, and imported in the user's repository; an import at
    /// another HEAD is refused.
    #[test]
    fn snapshot_bundle_round_trip_and_export_import() {
        let (_t, r) = sample_repo();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let snap = Snapshot::take_commit(&repo, &Default::default()).unwrap();
        assert_eq!(snap.image, PathBuf::new());
        let x = tempfile::tempdir().unwrap();
        let bundle = x.path().join("up.bundle");
        snap.write_bundle(&bundle).unwrap();
        let spec = snap.spec(&repo);
        let daemon = Snapshot::from_upload(&bundle, &spec, &test_cache(), x.path()).unwrap();
        assert!(daemon.image.is_file());
        let wrong = SnapshotSpec { tree: spec.base.clone().unwrap(), ..spec.clone() };
        assert!(Snapshot::from_upload(&bundle, &wrong, &test_cache(), x.path()).is_err());

        // The "VM": the workspace extracted, a commit and an uncommitted file, then the collect script.
        let ws = x.path().join("ws");
        crate::host::tests::extract_image(&daemon.image, daemon.image_base.as_deref(), &ws);
        let vm = |args: &[&str]| {
            let o = std::process::Command::new("git")
                .args(args)
                .current_dir(&ws)
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
            o.stdout
        };
        std::fs::write(ws.join("a.txt"), "changed in the vm\n").unwrap();
        vm(&["commit", "-qam", "vm commit"]);
        std::fs::write(ws.join("later.txt"), "uncommitted\n").unwrap();
        let head = Oid::parse(&String::from_utf8_lossy(&vm(&["rev-parse", "HEAD"]))).unwrap();
        let out = daemon.dir().join("out");
        std::fs::create_dir_all(&out).unwrap();
        vm(&["bundle", "create", "-q", out.join("commits.bundle").to_str().unwrap(), "HEAD", &format!("^{}", spec.base.clone().unwrap())]);
        vm(&["add", "-A"]);
        let patch = vm(&["diff", "--cached", "--binary", "--full-index", "--no-renames", "HEAD"]);
        std::fs::write(out.join("changes.patch"), patch).unwrap();
        let c = Collected { head: Some(head), bundle: Some(out.join("commits.bundle")), patch: Some(out.join("changes.patch")), git_meta_changed: vec![] };
        let exp = x.path().join("export");
        std::fs::create_dir(&exp).unwrap();
        let m = export(&daemon, &spec, "0123456789ab", Some(0), &c, &Limits::default(), &exp).unwrap();
        assert!(m.changed && m.commit_count == 1 && m.files == 2, "{m:?}");
        drop(daemon);

        let stored = import_export(&repo, &exp, &Limits::default()).unwrap().unwrap();
        let p = String::from_utf8(stored.apply_patch().unwrap()).unwrap();
        assert!(p.contains("+changed in the vm") && p.contains("+uncommitted"), "{p}");
        assert_eq!(stored.meta.commit_count, 1);

        // Another HEAD: refused, naming both.
        let g = Git::at(&r.join(".git")).work_tree(&r);
        g.run("commit", ["commit", "-q", "--allow-empty", "-m", "moved on"]).unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let e = import_export(&repo, &exp, &Limits::default()).unwrap_err().to_string();
        assert!(e.contains("started from") && e.contains("HEAD is"), "{e}");
    }
}
