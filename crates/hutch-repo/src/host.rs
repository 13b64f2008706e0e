//! The user's repository on the host, and the snapshot that goes into the VM: HEAD's history plus one commit
//! holding the working tree as `git add -A` sees it (uncommitted and untracked-not-ignored files), built in a
//! scratch repository that borrows the user's objects, so the user's index, refs and config are never written.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::os::unix::fs::MetadataExt;

use crate::credentials::CredentialFilter;
use crate::git::{init_scratch, path_from_output, user_excludes_file, Git, Oid};
use crate::image::{workspace_image, WorkTree, WorkspaceSpec};
use crate::{io_err, RepoError};

/// The empty tree's id in each object format.
pub(crate) fn empty_tree(object_format: &str) -> &'static str {
    if object_format == "sha256" {
        "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321"
    } else {
        "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    }
}

/// Bytes in an object id of this format.
pub(crate) fn oid_len(object_format: &str) -> usize {
    if object_format == "sha256" {
        32
    } else {
        20
    }
}

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
    /// The blob device the image reads its committed files' data from (attached beside it), if it has one.
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

pub(crate) use crate::image::SNAPSHOT_INDEX;

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
        let empty = tree == empty_tree(&repo.object_format);
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
        let made = match image_cache {
            Some(cache) => {
                // The scratch index says which of the user's files git has vouched for: those are copied into the
                // image as they are, the rest come from git. An index this cannot read only costs speed.
                let parsed = std::fs::read(&index).ok().and_then(|b| crate::index::parse(&b, oid_len(&repo.object_format)).ok());
                let index_mtime = std::fs::metadata(&index).map(|m| (m.mtime(), m.mtime_nsec())).unwrap_or((0, 0));
                let work = parsed.as_ref().map(|ix| WorkTree { top: &repo.top, entries: ix.entries.iter().map(|e| (e.path.as_slice(), e)).collect(), index_mtime });
                let last = last_image(repo, cache);
                let made = workspace_image(scratch.path(), &git, &spec, cache, work.as_ref(), last.as_deref())?;
                remember_image(repo, cache, &made.image);
                Some(made)
            }
            None => None,
        };
        let _ = std::fs::remove_file(&index);
        let (image, image_base, git_meta, image_reused) = match made {
            Some(m) => (m.image, m.blob, m.git_meta, m.reused),
            None => (PathBuf::new(), None, Default::default(), false),
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
            image_base,
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
/// Returns the image and the blob device it needs in the base slot, if any.
pub fn predicted_image(repo: &HostRepo, cache: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    let image = last_image(repo, cache)?;
    let blob = crate::image::blob_of(&image);
    if blob.as_ref().is_some_and(|b| !b.is_file()) {
        return None;
    }
    Some((image, blob))
}

fn last_image(repo: &HostRepo, cache: &Path) -> Option<PathBuf> {
    let name = std::fs::read(last_image_record(repo, cache)).ok()?;
    let name = std::str::from_utf8(&name).ok()?;
    let ok = name.starts_with("ws-") && name.ends_with(".erofs") && !name.contains('/') && name.len() < 100;
    let image = cache.join(name);
    (ok && image.is_file()).then_some(image)
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

/// Writes a pack of what `revs` (rev-list arguments, one a line) name from the scratch repository into the
/// repository `gd`; returns its name.
pub(crate) fn write_pack(scratch: &Git, gd: &Path, revs: &str) -> Result<String, RepoError> {
    pack_with(scratch, gd, &["--revs"], revs.as_bytes())
}

/// Writes a pack of exactly the objects `oids` (hex) into the repository `gd`: no history walk.
pub(crate) fn write_pack_of(scratch: &Git, gd: &Path, oids: &[String]) -> Result<String, RepoError> {
    let list: Vec<u8> = oids.iter().flat_map(|o| o.bytes().chain(std::iter::once(b'\n'))).collect();
    pack_with(scratch, gd, &[], &list)
}

fn pack_with(scratch: &Git, gd: &Path, flags: &[&str], input: &[u8]) -> Result<String, RepoError> {
    let pack = gd.join("objects/pack/pack");
    let mut args: Vec<&OsStr> = vec![OsStr::new("pack-objects"), OsStr::new("-q")];
    args.extend(flags.iter().map(OsStr::new));
    args.push(pack.as_os_str());
    let out = scratch.run_input("pack-objects (workspace)", args, Some(input))?;
    let name = String::from_utf8_lossy(&out).trim().to_string();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RepoError::Git { action: "pack-objects (workspace)".into(), stderr: format!("unexpected output {name:?}") });
    }
    Ok(name)
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

    /// Extracts a snapshot's workspace image (with its blob device) into `to`, checking it on the way.
    pub(crate) fn extract_image(image: &Path, blob: Option<&Path>, to: &Path) {
        let mut c = std::process::Command::new("fsck.erofs");
        if let Some(b) = blob {
            c.arg(format!("--device={}", b.display()));
        }
        let out = c.arg(format!("--extract={}", to.display())).arg(image).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

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
        extract_image(&snap.image, snap.image_base.as_deref(), &ws);
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
        extract_image(&snap.image, snap.image_base.as_deref(), &ws);
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

    /// A new tree of a work tree whose earlier tree was made into an image: the new image reads HEAD's files from
    /// the blob device of an ancestor commit (only HEAD's history is on it) and holds exactly the new tree and
    /// HEAD's history, nothing of an earlier tree's uncommitted files.
    #[test]
    fn a_new_tree_is_a_small_image_over_the_blob_device_and_holds_only_the_new_tree() {
        let (_t, r) = sample_repo();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(r.join("old.txt"), "only-in-the-first-tree\n").unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let s1 = Snapshot::take(&repo, cache.path()).unwrap();
        assert!(!s1.image_reused);
        let blob1 = s1.image_base.clone().expect("a repository with a HEAD has a blob device");
        let old_blob = s1.git.line("rev-parse", ["rev-parse", &format!("{}:old.txt", s1.commit)]).unwrap();
        let blob_bytes = std::fs::read(&blob1).unwrap();
        assert!(!blob_bytes.windows(22).any(|w| w == b"only-in-the-first-tree"), "the blob device holds only committed files");
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
        assert_eq!(s2.image_base.as_ref(), Some(&blob1), "HEAD's parent's blob device serves the new HEAD");
        let x = tempfile::tempdir().unwrap();
        let ws = x.path().join("ws");
        extract_image(&s2.image, s2.image_base.as_deref(), &ws);
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
        assert_eq!(predicted_image(&repo, cache.path()), Some((s3.image.clone(), s3.image_base.clone())), "the next run's guess is this image");
        // History rewritten: the old blob device's commit is not in the new HEAD's history, so it is not used.
        g.run("checkout", ["checkout", "-q", "--orphan", "other"]).unwrap();
        g.run("commit", ["commit", "-q", "-m", "unrelated"]).unwrap();
        let repo = HostRepo::discover(&r).unwrap().unwrap();
        let s4 = Snapshot::take(&repo, cache.path()).unwrap();
        let blob4 = s4.image_base.clone().unwrap();
        assert_ne!(blob4, blob1, "a HEAD without the blob device's commit in its history gets its own");
        let ws4 = x.path().join("ws4");
        extract_image(&s4.image, Some(&blob4), &ws4);
        let gw4 = Git::at(&ws4.join(".git")).work_tree(&ws4).index(&ws4.join(".git/index"));
        gw4.run("fsck", ["fsck", "--no-dangling", "--connectivity-only"]).unwrap();
        assert_eq!(gw4.line("rev-list", ["rev-list", "--count", "HEAD"]).unwrap(), "1");
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

    /// Host-side snapshot timings for a repository named by `HUTCH_SNAPSHOT_REPO` (not run by default): a first
    /// snapshot (blob device and image made), the same tree again, and a new tree (one file changed).
    #[test]
    #[ignore]
    fn snapshot_timings() {
        let Some(dir) = std::env::var_os("HUTCH_SNAPSHOT_REPO") else { return };
        let _ = tracing_subscriber::fmt().with_env_filter("hutch_repo=debug").with_test_writer().try_init();
        let dir = PathBuf::from(dir);
        let cache = tempfile::tempdir().unwrap();
        let repo = HostRepo::discover(&dir).unwrap().unwrap();
        let time = |what: &str| {
            let t = std::time::Instant::now();
            let s = Snapshot::take(&repo, cache.path()).unwrap();
            println!("{what:<40} {:>8.1} ms (reused {})", t.elapsed().as_secs_f64() * 1e3, s.image_reused);
        };
        time("first snapshot (blob device + image)");
        time("same tree");
        for i in 0..3 {
            std::fs::write(dir.join("hutch-timing.txt"), format!("{i}\n")).unwrap();
            time("new tree");
        }
        let _ = std::fs::remove_file(dir.join("hutch-timing.txt"));
    }
}
