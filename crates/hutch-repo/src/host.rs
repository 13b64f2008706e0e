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
        // One process says where everything is (it runs before the VM can start); paths are one a line, so one
        // holding a newline makes more lines, and then each is asked for on its own.
        let args = ["rev-parse", "--path-format=absolute", "--show-toplevel", "--git-dir", "--git-common-dir", "--show-object-format"];
        let out = match g.run("rev-parse (where the repository is)", args) {
            Ok(out) => out,
            Err(RepoError::Git { stderr, .. })
                if stderr.contains("not a git repository") || stderr.contains("must be run in a work tree") =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let lines: Vec<&[u8]> = out.strip_suffix(b"\n").unwrap_or(&out).split(|&b| b == b'\n').collect();
        let (top, git_dir, common_dir, object_format) = match lines[..] {
            [top, git_dir, common_dir, format] => (
                path_from_output(top),
                path_from_output(git_dir),
                path_from_output(common_dir),
                String::from_utf8_lossy(format).into_owned(),
            ),
            _ => {
                let top = path_from_output(&g.run("rev-parse --show-toplevel", ["rev-parse", "--path-format=absolute", "--show-toplevel"])?);
                let g = Git::discover(&top);
                let abs = |what: &str| -> Result<PathBuf, RepoError> {
                    Ok(path_from_output(&g.run(&format!("rev-parse {what}"), ["rev-parse", "--path-format=absolute", what])?))
                };
                let (git_dir, common_dir) = (abs("--git-dir")?, abs("--git-common-dir")?);
                (top, git_dir, common_dir, g.line("rev-parse --show-object-format", ["rev-parse", "--show-object-format"])?)
            }
        };
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
    pub(crate) scratch: tempfile::TempDir,
    pub(crate) git: Git,
    /// The user's HEAD when the snapshot was taken.
    pub base: Option<Oid>,
    /// The working-tree commit (parent: `base`).
    pub commit: Oid,
    /// Its tree: the VM's collection step starts from it.
    pub tree: Oid,
    /// The working tree has no files at all.
    pub empty: bool,
    pub branch: Option<String>,
    /// The VM's `/workspace` as a read-only erofs image: a fresh repository holding HEAD's history and the
    /// snapshot's objects, HEAD checked out in its index and the user's working tree over it. Shared by every
    /// run of the same tree (cached by content key), never written after it is made.
    pub image: PathBuf,
    /// The full image a delta `image` takes its unchanged files' data from (attached in the workspace base slot,
    /// given to erofs as its extra device); `None`: `image` is self-contained.
    pub image_base: Option<PathBuf>,
    /// The image was already in the cache.
    pub image_reused: bool,
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

/// Bumped when the layout of workspace images changes.
const IMAGE_RECIPE: u32 = 2;
/// Under `.git` in the image: an index of the snapshot's tree (git ignores files it does not know there).
pub(crate) const SNAPSHOT_INDEX: &str = "hutch-snapshot-index";
/// The workspace image cache keeps at most this many bytes (least recently used images go first).
const IMAGE_CACHE_BYTES: u64 = 8 << 30;

impl Snapshot {
    /// Takes the snapshot with the built-in credential list. Reads the user's work tree and objects; writes only
    /// in a scratch directory and, for a tree not seen before, a new image in `image_cache`.
    pub fn take(repo: &HostRepo, image_cache: &Path) -> Result<Snapshot, RepoError> {
        Self::take_filtered(repo, image_cache, &CredentialFilter::default())
    }

    /// Takes the snapshot; untracked files that `credentials` calls credentials are left out.
    pub fn take_filtered(repo: &HostRepo, image_cache: &Path, credentials: &CredentialFilter) -> Result<Snapshot, RepoError> {
        Self::take_inner(repo, Some(image_cache), credentials)
    }

    /// Takes the snapshot commit only, without a workspace image (`image` is empty): for a sandbox on a daemon,
    /// which makes the image itself from the snapshot's bundle (see [`crate::remote`]).
    pub fn take_commit(repo: &HostRepo, credentials: &CredentialFilter) -> Result<Snapshot, RepoError> {
        Self::take_inner(repo, None, credentials)
    }

    fn take_inner(repo: &HostRepo, image_cache: Option<&Path>, credentials: &CredentialFilter) -> Result<Snapshot, RepoError> {
        let t0 = std::time::Instant::now();
        let (scratch, git) = scratch_borrowing(repo)?;
        let gd = scratch.path().join("git");
        // The user's own ignore list is data, so it is honoured.
        if let Ok(ex) = std::fs::read(repo.common_dir.join("info/exclude")) {
            std::fs::create_dir_all(gd.join("info")).map_err(io_err("cannot write the scratch repository"))?;
            std::fs::write(gd.join("info/exclude"), ex).map_err(io_err("cannot write the scratch repository"))?;
        }
        let index = scratch.path().join("index");
        let (tree, CredentialOutcome { left_out, tracked: tracked_credentials, held_back_changes }) =
            select_files(&git, repo, &index, credentials)?;
        let _ = std::fs::remove_file(&index);
        let empty = tree == git.line("hash-object", ["hash-object", "-t", "tree", "/dev/null"])?;
        let mut args: Vec<&str> = vec!["commit-tree", "-m", "hutch: working tree snapshot"];
        if let Some(h) = &repo.head {
            args.extend(["-p", h.as_str()]);
        }
        args.push(&tree);
        let commit = git.line("commit-tree", &args)?;
        let commit = Oid::parse(&commit).ok_or_else(|| RepoError::Git { action: "commit-tree".into(), stderr: commit.clone() })?;
        let tree = Oid::parse(&tree).ok_or_else(|| RepoError::Git { action: "write-tree".into(), stderr: tree.clone() })?;
        git.run("update-ref", ["update-ref", "refs/hutch/snapshot", commit.as_str()])?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "snapshot: working tree committed");
        let spec = WorkspaceSpec {
            object_format: &repo.object_format,
            base: repo.head.as_ref(),
            tree: &tree,
            branch: repo.branch.as_deref(),
            prefix: &repo.prefix,
        };
        let (image, git_meta, image_reused) = match image_cache {
            Some(cache) => {
                let kept = kept_dir(repo, cache);
                let made = workspace_image(scratch.path(), &git, &spec, cache, Some(&kept))?;
                remember_image(repo, cache, &made.0);
                made
            }
            None => (PathBuf::new(), Default::default(), false),
        };
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, reused = image_reused, image = %image.display(), "snapshot: workspace image ready");
        Ok(Snapshot {
            git,
            base: repo.head.clone(),
            commit,
            tree,
            empty,
            branch: repo.branch.clone(),
            image,
            image_base: None,
            image_reused,
            git_meta,
            scratch,
            left_out,
            tracked_credentials,
            held_back_changes,
        })
    }

    /// The scratch directory (downloads, temporary indexes).
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }
}

/// A scratch repository (`<tmp>/git`) that borrows the user's objects (read-only, through `alternates`).
pub(crate) fn scratch_borrowing(repo: &HostRepo) -> Result<(tempfile::TempDir, Git), RepoError> {
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
    Ok((scratch, git))
}

/// Where the name of the image this work tree's last snapshot used is kept: one small file per work tree (and
/// start directory, since that is part of the image) in the image cache.
fn last_image_record(repo: &HostRepo, cache: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(repo.top.as_os_str().as_bytes());
    h.update([0]);
    h.update(repo.git_dir.as_os_str().as_bytes());
    h.update([0]);
    h.update(repo.prefix.as_os_str().as_bytes());
    cache.join(format!("last-{}", &hex::encode(h.finalize())[..32]))
}

fn remember_image(repo: &HostRepo, cache: &Path, image: &Path) {
    let Some(name) = image.file_name() else { return };
    let record = last_image_record(repo, cache);
    let tmp = record.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, name.as_bytes()).is_ok() && std::fs::rename(&tmp, &record).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The image the last snapshot of this work tree used, if it is still in the cache: a guess at the image the
/// next snapshot will use, so that a VM can be started with it while the snapshot is taken (the snapshot decides;
/// a wrong guess only costs that VM). Reads two small files; hashes nothing.
/// Returns the image and the base image it needs in the base slot, if any.
pub fn predicted_image(repo: &HostRepo, cache: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    let name = std::fs::read(last_image_record(repo, cache)).ok()?;
    let name = std::str::from_utf8(&name).ok()?;
    let ok = name.starts_with("ws-") && name.ends_with(".erofs") && !name.contains('/') && name.len() < 100;
    let image = cache.join(name);
    (ok && image.is_file()).then_some((image, None))
}

/// Which files of the work tree go into the VM, as a tree in the scratch repository: `git add -A` (tracked files
/// and untracked ones that are not ignored) over a temporary index, less the credential files `credentials`
/// leaves out. The one place that decides it.
///
/// A copy of the user's index brings its stat data (only files changed since git last looked are hashed) and its
/// sparse-checkout bits; the user's index itself is never written. An index git cannot use from here (a split
/// index, say) falls back to HEAD's tree.
fn select_files(git: &Git, repo: &HostRepo, index: &Path, credentials: &CredentialFilter) -> Result<(String, CredentialOutcome), RepoError> {
    let wt = git.clone().work_tree(&repo.top).index(index).excludes(user_excludes_file());
    let copied = std::fs::symlink_metadata(repo.git_dir.join("index")).is_ok_and(|m| m.is_file())
        && std::fs::copy(repo.git_dir.join("index"), index).is_ok()
        && wt.ok(["add", "-A"]);
    if !copied {
        let _ = std::fs::remove_file(index);
        match &repo.head {
            Some(h) => wt.run("read-tree", ["read-tree", h.as_str()])?,
            None => wt.run("read-tree", ["read-tree", "--empty"])?,
        };
        wt.run("add -A (working tree snapshot)", ["add", "-A"])?;
    }
    let outcome = leave_out_credentials(git, &wt, repo.head.as_ref(), credentials)?;
    Ok((wt.line("write-tree", ["write-tree"])?, outcome))
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

/// What a workspace image holds; equal specs make equal images, so the image is cached by its digest.
pub(crate) struct WorkspaceSpec<'a> {
    pub(crate) object_format: &'a str,
    pub(crate) base: Option<&'a Oid>,
    pub(crate) tree: &'a Oid,
    pub(crate) branch: Option<&'a str>,
    pub(crate) prefix: &'a Path,
}

impl WorkspaceSpec<'_> {
    fn key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!(
            "recipe={IMAGE_RECIPE}\nformat={}\nbase={}\ntree={}\nbranch={}\nprefix=",
            self.object_format,
            self.base.map(Oid::as_str).unwrap_or("-"),
            self.tree,
            self.branch.unwrap_or("-"),
        ));
        h.update(self.prefix.as_os_str().as_bytes());
        hex::encode(h.finalize())[..32].to_string()
    }
}

/// The image for `spec` from the cache, or made and added to it. Returns (image, git metadata digests, reused).
/// A new image is made from the work tree's kept workspace directory when it is free (`kept`, updated in place:
/// only what changed since the tree it holds is written), else from a fresh one in `scratch`.
pub(crate) fn workspace_image(
    scratch: &Path,
    git: &Git,
    spec: &WorkspaceSpec<'_>,
    cache: &Path,
    kept: Option<&Path>,
) -> Result<(PathBuf, std::collections::BTreeMap<String, String>, bool), RepoError> {
    let key = spec.key();
    let image = cache.join(format!("ws-{key}.erofs"));
    let meta = cache.join(format!("ws-{key}.json"));
    if let (true, Ok(text)) = (image.is_file(), std::fs::read_to_string(&meta)) {
        if let Ok(git_meta) = serde_json::from_str(&text) {
            // Recently used images stay in the cache longest.
            if let Ok(f) = std::fs::File::open(&image) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return Ok((image, git_meta, true));
        }
    }
    std::fs::create_dir_all(cache).map_err(io_err(format!("cannot create the workspace image cache {}", cache.display())))?;
    let lock = kept.and_then(KeptLock::try_take);
    let (ws, git_meta) = match (&lock, kept) {
        (Some(_), Some(k)) => {
            let t0 = std::time::Instant::now();
            let gm = match update_kept(k, git, spec) {
                Ok(gm) => {
                    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "snapshot: kept workspace updated");
                    gm
                }
                Err(why) => {
                    tracing::debug!("snapshot: kept workspace not usable ({why}); making it afresh");
                    let _ = std::fs::remove_file(k.join(KEPT_STATE));
                    remove_dir_if_present(&k.join("ws"))?;
                    std::fs::create_dir_all(k).map_err(io_err("cannot create the kept workspace"))?;
                    let (gm, pack) = prepare_workspace(&k.join("ws"), git, spec)?;
                    write_kept_state(k, spec, &pack, 0, &gm)?;
                    gm
                }
            };
            (k.join("ws"), gm)
        }
        _ => {
            let ws = scratch.join("ws");
            (ws.clone(), prepare_workspace(&ws, git, spec)?.0)
        }
    };
    // Made under private names and renamed, so concurrent runs of the same tree never see a half-made image;
    // the JSON goes first because a lookup trusts an image only with its JSON beside it.
    let nonce = format!("{}-{}", std::process::id(), scratch.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let tmp_image = cache.join(format!(".ws-{key}.erofs.{nonce}"));
    let tmp_meta = cache.join(format!(".ws-{key}.json.{nonce}"));
    let made = (|| {
        mkfs_erofs(&ws, &tmp_image)?;
        let json = serde_json::to_string(&git_meta).map_err(|e| RepoError::Project(e.to_string()))?;
        std::fs::write(&tmp_meta, json).map_err(io_err("cannot write the workspace image's metadata"))?;
        std::fs::rename(&tmp_meta, &meta).map_err(io_err("cannot install the workspace image"))?;
        std::fs::rename(&tmp_image, &image).map_err(io_err("cannot install the workspace image"))
    })();
    let _ = std::fs::remove_file(&tmp_image);
    let _ = std::fs::remove_file(&tmp_meta);
    if lock.is_none() {
        let _ = std::fs::remove_dir_all(&ws);
    }
    drop(lock);
    made?;
    evict(cache, &image);
    Ok((image, git_meta, false))
}

fn remove_dir_if_present(dir: &Path) -> Result<(), RepoError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RepoError::Io { what: format!("cannot remove {}", dir.display()), source: e }),
    }
}

/// The kept workspace directory of a work tree: `<cache>/kept-<id>/` holding `ws/` (the last image's content,
/// checked out) and `state.json`.
fn kept_dir(repo: &HostRepo, cache: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(repo.top.as_os_str().as_bytes());
    h.update([0]);
    h.update(repo.git_dir.as_os_str().as_bytes());
    cache.join(format!("kept-{}", &hex::encode(h.finalize())[..32]))
}

const KEPT_STATE: &str = "state.json";
/// Kept directories (one per work tree), least recently used removed first.
const KEPT_MAX: usize = 4;
/// History packs a kept workspace may collect before it is made afresh.
const KEPT_MAX_PACKS: u32 = 16;

/// What a kept workspace holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptState {
    format: u32,
    object_format: String,
    base: Option<String>,
    tree: String,
    branch: Option<String>,
    prefix: PathBuf,
    /// The pack of the tree's objects that HEAD's history lacks (the uncommitted files): replaced on each
    /// update, so nothing of an earlier tree's uncommitted files stays in later images.
    snapshot_pack: String,
    history_packs: u32,
    git_meta: std::collections::BTreeMap<String, String>,
}

fn write_kept_state(k: &Path, spec: &WorkspaceSpec<'_>, snapshot_pack: &str, history_packs: u32, gm: &std::collections::BTreeMap<String, String>) -> Result<(), RepoError> {
    let st = KeptState {
        format: 1,
        object_format: spec.object_format.to_string(),
        base: spec.base.map(|b| b.to_string()),
        tree: spec.tree.to_string(),
        branch: spec.branch.map(str::to_string),
        prefix: spec.prefix.to_path_buf(),
        snapshot_pack: snapshot_pack.to_string(),
        history_packs,
        git_meta: gm.clone(),
    };
    let json = serde_json::to_vec(&st).map_err(|e| RepoError::Project(e.to_string()))?;
    std::fs::write(k.join(KEPT_STATE), json).map_err(io_err("cannot write the kept workspace's state"))
}

/// An exclusive `flock` on `<kept>.lock`; released when dropped.
struct KeptLock {
    _file: std::fs::File,
}

impl KeptLock {
    fn try_take(kept: &Path) -> Option<KeptLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(kept.with_extension("lock")).ok()?;
        // SAFETY: flock on a descriptor this function owns; it takes no pointers.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (r == 0).then_some(KeptLock { _file: f })
    }
}

/// Writes a pack of what `revs` (rev-list arguments, one a line) name from the scratch repository into the
/// workspace repository `gd`; returns its name.
fn write_pack(scratch: &Git, gd: &Path, revs: &str) -> Result<String, RepoError> {
    let pack = gd.join("objects/pack/pack");
    let out = scratch.run_input("pack-objects (workspace)", [OsStr::new("pack-objects"), OsStr::new("-q"), OsStr::new("--revs"), pack.as_os_str()], Some(revs.as_bytes()))?;
    let name = String::from_utf8_lossy(&out).trim().to_string();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RepoError::Git { action: "pack-objects (workspace)".into(), stderr: format!("unexpected output {name:?}") });
    }
    Ok(name)
}

/// Moves the kept workspace from the tree it holds to `spec`'s, writing only what differs: a pack of HEAD's new
/// commits (only when the old HEAD is an ancestor of the new one, so the image still holds exactly HEAD's
/// history), a new pack of the tree's objects beyond HEAD (the old one goes), the files that differ between the
/// two trees (`read-tree -m -u`, which keeps the stat data of the others), the index moved to HEAD, the refs.
/// An error (the reason) means the caller makes it afresh.
fn update_kept(k: &Path, scratch: &Git, spec: &WorkspaceSpec<'_>) -> Result<std::collections::BTreeMap<String, String>, String> {
    let text = std::fs::read(k.join(KEPT_STATE)).map_err(|e| format!("no state: {e}"))?;
    let st: KeptState = serde_json::from_slice(&text).map_err(|e| format!("state: {e}"))?;
    if st.format != 1 || st.object_format != spec.object_format || st.branch.as_deref() != spec.branch || st.prefix != spec.prefix {
        return Err("another format, branch or start directory".into());
    }
    if st.history_packs >= KEPT_MAX_PACKS {
        return Err("too many packs".into());
    }
    // Without a state the directory is made afresh next time: an update cut short leaves none.
    std::fs::remove_file(k.join(KEPT_STATE)).map_err(|e| format!("state: {e}"))?;
    let ws = k.join("ws");
    let gd = ws.join(".git");
    let g = Git::at(&gd).work_tree(&ws);
    let e = |e: RepoError| e.to_string();
    let mut history_packs = st.history_packs;
    match (st.base.as_deref(), spec.base.map(Oid::as_str)) {
        (Some(old), Some(new)) if old != new => {
            if !scratch.ok(["merge-base", "--is-ancestor", old, new]) {
                return Err("HEAD moved to a commit that does not contain the old one".into());
            }
            write_pack(scratch, &gd, &format!("{new}\n^{old}\n")).map_err(e)?;
            history_packs += 1;
        }
        (Some(_), Some(_)) | (None, None) => {}
        _ => return Err("HEAD was born or unborn since".into()),
    }
    let snap_revs = match spec.base {
        Some(b) => format!("{}\n^{b}\n", spec.tree),
        None => format!("{}\n", spec.tree),
    };
    let snapshot_pack = write_pack(scratch, &gd, &snap_revs).map_err(e)?;
    let idx = gd.join(SNAPSHOT_INDEX);
    g.clone().index(&idx).run("read-tree -m -u (kept workspace)", ["read-tree", "-m", "-u", st.tree.as_str(), spec.tree.as_str()]).map_err(e)?;
    if snapshot_pack != st.snapshot_pack {
        for ext in ["pack", "idx", "rev"] {
            let _ = std::fs::remove_file(gd.join(format!("objects/pack/pack-{}.{ext}", st.snapshot_pack)));
        }
    }
    // The update must have led exactly to the new tree; anything else remakes the directory.
    let got = g.clone().index(&idx).line("write-tree (kept workspace)", ["write-tree"]).map_err(e)?;
    if got != spec.tree.as_str() {
        return Err(format!("the updated index holds tree {got}, not {}", spec.tree));
    }
    let index = gd.join("index");
    std::fs::copy(&idx, &index).map_err(|e| format!("index: {e}"))?;
    let gi = g.clone().index(&index);
    match spec.base {
        Some(b) => gi.run("read-tree -m (kept workspace)", ["read-tree", "-m", b.as_str()]).map_err(e)?,
        None => gi.run("read-tree (kept workspace)", ["read-tree", "--empty"]).map_err(e)?,
    };
    match (spec.base, spec.branch) {
        (Some(b), Some(br)) => {
            gi.run("update-ref (kept workspace)", ["update-ref", &format!("refs/heads/{br}"), b.as_str()]).map_err(e)?;
        }
        (Some(b), None) => {
            gi.run("update-ref (kept workspace)", ["update-ref", "--no-deref", "HEAD", b.as_str()]).map_err(e)?;
        }
        _ => {}
    }
    std::fs::create_dir_all(ws.join(spec.prefix)).map_err(|e| format!("start directory: {e}"))?;
    // Dated after every file they describe (see `prepare_workspace`).
    for f in [&index, &idx] {
        if let Ok(f) = std::fs::File::options().append(true).open(f) {
            let _ = f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(2));
        }
    }
    let gm = git_meta_digests(&gd).map_err(|e| format!("git metadata: {e}"))?;
    if gm != st.git_meta {
        return Err("its git metadata changed".into());
    }
    write_kept_state(k, spec, &snapshot_pack, history_packs, &gm).map_err(e)?;
    Ok(gm)
}

/// Packs `dir` into a read-only erofs image at `out`: files owned by root, modification times kept (the index's
/// stat data matches them), no extended attributes from the host.
fn mkfs_erofs(dir: &Path, out: &Path) -> Result<(), RepoError> {
    let o = std::process::Command::new("mkfs.erofs")
        // Without tail packing the inodes lie together instead of one per block beside each file's last bytes:
        // a cold `git status` over 10,000 files in the VM reads ~250 blocks instead of ~5,000.
        .args(["--quiet", "--all-root", "--preserve-mtime", "-x-1", "-Enoinline_data"])
        .arg(out)
        .arg(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RepoError::Io { what: "cannot run mkfs.erofs (install it with `apt-get install erofs-utils`)".into(), source: e })?;
    if !o.status.success() {
        return Err(RepoError::Project(format!("mkfs.erofs failed: {}", crate::git::stderr_text(&o.stderr))));
    }
    use std::os::unix::fs::PermissionsExt;
    // Readable by the unprivileged VMM, writable by nobody.
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o444)).map_err(io_err("cannot protect the workspace image"))
}

/// Removes the least recently used images while the cache holds more than its budget (never `keep`), and kept
/// workspaces beyond [`KEPT_MAX`] (never one in use).
fn evict(cache: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(cache) else { return };
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("kept-") && e.path().is_dir())
        .map(|e| (std::fs::metadata(e.path().join(KEPT_STATE)).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    kept.sort();
    kept.reverse();
    for (_, dir) in kept.into_iter().skip(KEPT_MAX) {
        if let Some(_lock) = KeptLock::try_take(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let Ok(rd) = std::fs::read_dir(cache) else { return };
    let mut images: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ws-") && e.file_name().to_string_lossy().ends_with(".erofs"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    images.sort();
    let mut total: u64 = images.iter().map(|i| i.1).sum();
    for (_, len, path) in images {
        if total <= IMAGE_CACHE_BYTES {
            break;
        }
        if path == keep {
            continue;
        }
        // A VMM that has the image open keeps reading it after the unlink.
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("json"));
        total = total.saturating_sub(len);
    }
}

/// Makes the VM's `/workspace` on the host. Under emulation every git process in the VM costs ~0.1-0.4 s and
/// indexing a pack most of a second; here they take milliseconds. The repository is new (no hooks, no host
/// config, no remotes): one pack written straight from the scratch repository (HEAD's history and the snapshot
/// tree, so no index-pack), HEAD as the user had it (branch, detached, or unborn), the index at HEAD and the
/// user's working tree over it, so their uncommitted changes show as changes. The index keeps the stat data of
/// the files as written here, and the image keeps their times: with `core.checkStat=minimal` git in the VM
/// trusts it and `git status` hashes nothing. Host-side git here runs hardened like everywhere else.
fn prepare_workspace(ws: &Path, scratch: &Git, spec: &WorkspaceSpec<'_>) -> Result<(std::collections::BTreeMap<String, String>, String), RepoError> {
    let parent = ws.parent().unwrap_or(ws);
    Git::discover(parent).run(
        "init (workspace)",
        [
            OsStr::new("-c"),
            OsStr::new("init.defaultBranch=main"),
            OsStr::new("init"),
            OsStr::new("-q"),
            OsStr::new("--template="),
            OsStr::new(&format!("--object-format={}", spec.object_format)),
            ws.as_os_str(),
        ],
    )?;
    // Without templates: no sample hooks, but the directories a clone has, so tools in the VM find them.
    for d in ["hooks", "info", "objects/pack"] {
        std::fs::create_dir_all(ws.join(".git").join(d)).map_err(io_err("cannot create the workspace repository"))?;
    }
    // Two packs: HEAD's history, and the tree's objects beyond it (the uncommitted files), which a kept workspace
    // replaces on each update.
    let gd = ws.join(".git");
    let snapshot_pack = match spec.base {
        Some(b) => {
            write_pack(scratch, &gd, &format!("{b}\n"))?;
            write_pack(scratch, &gd, &format!("{}\n^{b}\n", spec.tree))?
        }
        None => write_pack(scratch, &gd, &format!("{}\n", spec.tree))?,
    };
    let g = Git::at(&ws.join(".git")).work_tree(ws).index(&ws.join(".git/index"));
    match (spec.base, spec.branch) {
        (Some(b), Some(br)) => {
            let r = format!("refs/heads/{br}");
            g.run("update-ref (workspace)", ["update-ref", r.as_str(), b.as_str()])?;
            g.run("symbolic-ref (workspace)", ["symbolic-ref", "HEAD", r.as_str()])?;
        }
        (Some(b), None) => {
            g.run("update-ref (workspace)", ["update-ref", "--no-deref", "HEAD", b.as_str()])?;
        }
        (None, Some(br)) => {
            g.run("symbolic-ref (workspace)", ["symbolic-ref", "HEAD", format!("refs/heads/{br}").as_str()])?;
        }
        (None, None) => {}
    };
    // The snapshot's files, written once; then the index moves to HEAD keeping the stat data of every file HEAD
    // has unchanged (a one-tree `read-tree -m`).
    g.run("read-tree (workspace)", ["read-tree", spec.tree.as_str()])?;
    g.run("checkout-index (workspace)", ["checkout-index", "-a", "-f", "-u"])?;
    // The snapshot's own index, stat data included: the VM's collection starts from it instead of reading the
    // tree again (a second or more of emulated git for a large tree).
    std::fs::copy(ws.join(".git/index"), ws.join(".git").join(SNAPSHOT_INDEX)).map_err(io_err("cannot write the workspace's snapshot index"))?;
    match spec.base {
        Some(b) => g.run("read-tree -m (workspace)", ["read-tree", "-m", b.as_str()])?,
        None => g.run("read-tree (workspace)", ["read-tree", "--empty"])?,
    };
    let config = ws.join(".git/config");
    let mut text = std::fs::read_to_string(&config).map_err(io_err("cannot read the workspace's git config"))?;
    // Inode numbers, devices and change times differ between this directory and the image in the VM; sizes and
    // modification times do not.
    text.push_str("[core]\n\tcheckStat = minimal\n\ttrustctime = false\n[user]\n\tname = Hutch Sandbox\n\temail = sandbox@hutch.invalid\n");
    std::fs::write(&config, text).map_err(io_err("cannot write the workspace's git config"))?;
    // The directory the command starts in exists even when it holds only ignored files on the host.
    std::fs::create_dir_all(ws.join(spec.prefix)).map_err(io_err("cannot create the start directory in the workspace"))?;
    // An index no newer than its files makes git in the VM re-read them ("racily clean"); this one is dated
    // after every file it describes.
    if let Ok(f) = std::fs::File::options().append(true).open(ws.join(".git/index")) {
        let _ = f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(2));
    }
    let gm = git_meta_digests(&ws.join(".git")).map_err(io_err("cannot read the workspace's git metadata"))?;
    Ok((gm, snapshot_pack))
}

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
    use std::os::unix::fs::PermissionsExt;

    /// Where tests keep workspace images (shared, like the real cache).
    pub(crate) fn test_cache() -> PathBuf {
        std::env::temp_dir().join("hutch-test-workspace-images")
    }

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
        assert_eq!(repo.git_dir, r.canonicalize().unwrap().join(".git"));
        assert_eq!(repo.common_dir, repo.git_dir);
        assert_eq!(repo.object_format, "sha1");
    }

    /// Where the repository is comes from one `rev-parse` whose answers are one a line: a path holding a newline
    /// makes it ask again one question at a time, with the same answers.
    #[test]
    fn discovery_of_a_repository_whose_path_holds_a_newline() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("odd\nname");
        std::fs::create_dir(&r).unwrap();
        Git::discover(&r).run("init", ["init", "-q", "-b", "main"]).unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        let repo = HostRepo::discover(&r.join("sub")).unwrap().unwrap();
        assert_eq!(repo.top, r.canonicalize().unwrap());
        assert_eq!(repo.git_dir, repo.top.join(".git"));
        assert_eq!(repo.common_dir, repo.git_dir);
        assert_eq!(repo.object_format, "sha1");
        assert_eq!(repo.prefix, PathBuf::from("sub"));
        assert_eq!(repo.branch.as_deref(), Some("main"));
        assert!(repo.head.is_none());
    }

    #[test]
    fn snapshot_holds_the_working_tree_and_leaves_the_repo_alone() {
        let (_t, r) = sample_repo();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let index_before = std::fs::read(r.join(".git/index")).unwrap();
        let refs_before = Git::at(&repo.git_dir).run("show-ref", ["show-ref"]).unwrap();
        let snap = Snapshot::take(&repo, &test_cache()).unwrap();
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        assert_eq!(String::from_utf8(files).unwrap(), ".gitignore\na.txt\nnew.txt\nsub/b.txt\n");
        let a = snap.git.run("show", ["show", &format!("{}:a.txt", snap.commit)]).unwrap();
        assert_eq!(a, b"one\ntwo\n");
        let parent = snap.git.line("rev-parse", ["rev-parse", &format!("{}^", snap.commit)]).unwrap();
        assert_eq!(Some(parent.as_str()), repo.head.as_ref().map(Oid::as_str));
        assert_eq!(std::fs::read(r.join(".git/index")).unwrap(), index_before, "the user's index is untouched");
        assert_eq!(Git::at(&repo.git_dir).run("show-ref", ["show-ref"]).unwrap(), refs_before, "no refs were added");
        // The image is a complete repository: HEAD's history, its index at HEAD (stat data kept), the snapshot's
        // tree over it; it is read-only and a second snapshot of the same tree reuses it untouched.
        let x = tempfile::tempdir().unwrap();
        let ws = x.path().join("ws");
        let out = std::process::Command::new("fsck.erofs").arg(format!("--extract={}", ws.display())).arg(&snap.image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let g = Git::at(&ws.join(".git")).work_tree(&ws).index(&ws.join(".git/index"));
        g.run("fsck", ["fsck", "--no-dangling", "--connectivity-only"]).unwrap();
        assert_eq!(g.line("rev-parse", ["rev-parse", "HEAD"]).unwrap(), repo.head.as_ref().unwrap().as_str());
        g.run("cat-file", ["cat-file", "-e", snap.tree.as_str()]).unwrap();
        assert_eq!(std::fs::metadata(&snap.image).unwrap().permissions().mode() & 0o222, 0, "the image is read-only");
        let digest = |p: &Path| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(p).unwrap()));
        let before = digest(&snap.image);
        let again = Snapshot::take(&repo, &test_cache()).unwrap();
        assert!(again.image_reused);
        assert_eq!(again.image, snap.image);
        assert_eq!(digest(&again.image), before);
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
        let snap = Snapshot::take(&repo, &test_cache()).unwrap();
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
        let snap = Snapshot::take(&repo, &test_cache()).unwrap();
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
        // The workspace image has none of them either.
        let x = tempfile::tempdir().unwrap();
        let ws = x.path().join("ws");
        let out = std::process::Command::new("fsck.erofs").arg(format!("--extract={}", ws.display())).arg(&snap.image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(ws.join("config/.env.example").is_file());
        assert!(!ws.join("config/.env").exists() && !ws.join("deploy/id_rsa").exists() && !ws.join("staged.pem").exists());
        let image = std::fs::read(&snap.image).unwrap();
        for v in ["untracked-real-value", "uncommitted-real-value"] {
            assert!(!image.windows(v.len()).any(|w| w == v.as_bytes()), "{v}");
        }
        // The user's index still has the staged file.
        let staged = Git::at(&r.join(".git")).work_tree(&r).run("ls-files", ["ls-files", "staged.pem"]).unwrap();
        assert_eq!(staged, b"staged.pem\n");

        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let user = CredentialRules::parse(&s(&["*.txt"]), &s(&["id_rsa"]), "test").unwrap();
        let snap = Snapshot::take_filtered(&repo, &test_cache(), &CredentialFilter::new(vec![user])).unwrap();
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        let files = String::from_utf8(files).unwrap();
        assert!(files.contains("deploy/id_rsa\n") && !files.contains("new.txt") && files.contains("a.txt"), "{files}");
        assert!(!files.contains("config/.env\n"), "{files}");
    }

    /// A new tree of a work tree whose earlier tree was made into an image: the kept workspace is updated (only
    /// the changed files written) and the image holds exactly the new tree and HEAD's history, nothing of an
    /// earlier tree's uncommitted files.
    #[test]
    fn a_new_tree_updates_the_kept_workspace_and_holds_only_the_new_tree() {
        let (_t, r) = sample_repo();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(r.join("old.txt"), "only-in-the-first-tree\n").unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let s1 = Snapshot::take(&repo, cache.path()).unwrap();
        assert!(!s1.image_reused);
        let old_blob = s1.git.line("rev-parse", ["rev-parse", &format!("{}:old.txt", s1.commit)]).unwrap();
        // The next tree: a file gone, one changed, one new, and a new commit on top of HEAD.
        std::fs::remove_file(r.join("old.txt")).unwrap();
        std::fs::write(r.join("a.txt"), "one\ntwo\nthree\n").unwrap();
        std::fs::create_dir_all(r.join("c")).unwrap();
        std::fs::write(r.join("c/d.txt"), "dee\n").unwrap();
        std::fs::write(r.join("sub/b.txt"), "bee two\n").unwrap();
        let g = Git::at(&r.join(".git")).work_tree(&r);
        g.run("commit", ["commit", "-q", "-m", "second", "sub/b.txt"]).unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let s2 = Snapshot::take(&repo, cache.path()).unwrap();
        assert!(!s2.image_reused);
        let state: KeptState = serde_json::from_slice(&std::fs::read(kept_dir(&repo, cache.path()).join(KEPT_STATE)).unwrap()).unwrap();
        assert_eq!(state.tree, s2.tree.to_string(), "the kept workspace holds the new tree");
        assert_eq!(state.history_packs, 1, "HEAD's new commit came as a pack of its own");
        let x = tempfile::tempdir().unwrap();
        let ws = x.path().join("ws");
        let out = std::process::Command::new("fsck.erofs").arg(format!("--extract={}", ws.display())).arg(&s2.image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let gw = Git::at(&ws.join(".git")).work_tree(&ws).index(&ws.join(".git/index"));
        gw.run("fsck", ["fsck", "--no-dangling", "--connectivity-only"]).unwrap();
        assert_eq!(gw.line("rev-parse", ["rev-parse", "HEAD"]).unwrap(), repo.head.as_ref().unwrap().as_str());
        let snap_index = Git::at(&ws.join(".git")).index(&ws.join(".git").join(SNAPSHOT_INDEX));
        assert_eq!(snap_index.line("write-tree", ["write-tree"]).unwrap(), s2.tree.as_str());
        assert_eq!(std::fs::read_to_string(ws.join("a.txt")).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(std::fs::read_to_string(ws.join("c/d.txt")).unwrap(), "dee\n");
        assert!(!ws.join("old.txt").exists());
        assert!(!gw.ok(["cat-file", "-e", old_blob.as_str()]), "the earlier tree's uncommitted file is not in the image");
        let image = std::fs::read(&s2.image).unwrap();
        let needle = b"only-in-the-first-tree";
        assert!(!image.windows(needle.len()).any(|w| w == needle));
        // git in the image sees the uncommitted changes against HEAD, and nothing else.
        let st = gw.run("status", ["status", "--porcelain"]).unwrap();
        assert_eq!(String::from_utf8_lossy(&st), " M a.txt\n D gone.txt\n?? c/\n?? new.txt\n");
        // The same tree again: the image is reused.
        let s3 = Snapshot::take(&repo, cache.path()).unwrap();
        assert!(s3.image_reused && s3.image == s2.image);
        assert_eq!(predicted_image(&repo, cache.path()), Some((s3.image.clone(), None)), "the next run's guess is this image");
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
        let snap = Snapshot::take(&repo, &test_cache()).unwrap();
        assert_eq!(snap.base, None);
        let files = snap.git.run("ls-tree", ["ls-tree", "-r", "--name-only", snap.commit.as_str()]).unwrap();
        assert_eq!(files, b"f\n");
    }
}
