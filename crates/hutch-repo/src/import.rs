//! Checking what the VM sent and, only if every check passes, importing it: the bundle is verified and
//! fetched into the scratch repository (never first into the user's); every tree entry the VM's commits and
//! patch add or change is checked (names, modes, symlinks resolved within the tree); the patch must parse
//! strictly and git must read the same paths from it. Then the commits are fetched into `refs/hutch/<id>` and
//! the patch from the snapshot to the VM's final tree is stored for `diff` and `apply`.

use std::ffi::OsStr;

use crate::git::{Git, Oid};
use crate::guest::Collected;
use crate::host::{HostRepo, Snapshot};
use crate::patch::{self, Patch};
use crate::path::{check_path, show, Links};
use crate::store::{self, CommitLine, ResultMeta, Stored};
use crate::{Limits, RepoError};

const MAX_LINK_TARGET: usize = 4096;

fn refused(e: RepoError, what: &str) -> RepoError {
    match e {
        RepoError::Git { stderr, .. } => RepoError::Refused(format!("{what}: {stderr}")),
        other => other,
    }
}

/// Where the VM started: its HEAD (`None`: an unborn branch) and the commit and tree its working tree held.
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    pub base: Option<&'a Oid>,
    /// A commit whose tree is `tree` (the snapshot commit; the base itself when the VM started from a clean
    /// checkout).
    pub commit: &'a Oid,
    pub tree: &'a Oid,
}

/// The VM's output after every check passed, in the repository the checks ran in.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The VM's new commits (in the checking repository as `refs/hutch/vm` when they came in a bundle), newest
    /// first, each with its first parent.
    pub commits: Vec<(String, Option<String>)>,
    /// The tree the VM ended with: its HEAD plus its uncommitted changes.
    pub final_tree: String,
    /// `start.commit` to `final_tree` as a binary patch, and its strict parse (paths, sensitivity).
    pub apply_patch: Vec<u8>,
    pub applied: Patch,
    /// `git diff --stat` of `apply_patch`, control characters escaped.
    pub stat: String,
    /// The VM's patch of uncommitted changes as it sent it (empty when there was none).
    pub patch_bytes: Vec<u8>,
    /// The VM's HEAD is not where it started.
    pub head_moved: bool,
}

impl Checked {
    /// Nothing to import or deliver.
    pub fn is_empty(&self) -> bool {
        self.commits.is_empty() && self.applied.is_empty() && !self.head_moved
    }
}

/// Checks and imports the VM's output. `Ok(None)`: the VM changed nothing.
pub fn import(repo: &HostRepo, snap: &Snapshot, id: &str, c: &Collected, limits: &Limits) -> Result<Option<Stored>, RepoError> {
    store::check_id(id)?;
    // The VM's HEAD did not move and its working tree is the snapshot's: there is nothing to check or import,
    // and no git process needs to say so.
    if c.bundle.is_none() && c.patch.is_none() && c.head == snap.base {
        return Ok(None);
    }
    let g = &snap.git;
    let base = snap.base.as_ref().map(Oid::as_str);
    if c.bundle.is_none() {
        if let Some(head) = &c.head {
            if !repo.git().ok(["cat-file", "-e", &format!("{head}^{{commit}}")]) {
                return Err(RepoError::Refused(format!("the VM's HEAD {head} is neither in its bundle nor in this repository")));
            }
        }
    }
    let start = Start { base: snap.base.as_ref(), commit: &snap.commit, tree: &snap.tree };
    let checked = check(g, start, snap.dir(), c, limits)?;
    if checked.is_empty() {
        return Ok(None);
    }
    let Checked { commits, apply_patch, applied, stat, patch_bytes, .. } = checked;

    let lines = commit_lines(g, c.head.as_ref(), base)?;

    // Only now does anything reach the user's repository: the checked commits, under hutch's own ref.
    let reference = format!("refs/hutch/{id}");
    match (&c.bundle, &c.head) {
        (Some(bundle), Some(_)) => {
            let mut args = vec![
                OsStr::new("fetch"),
                OsStr::new("-q"),
                OsStr::new("--no-tags"),
                OsStr::new("--no-write-fetch-head"),
                bundle.as_os_str(),
            ];
            let spec = format!("+HEAD:{reference}");
            args.push(OsStr::new(&spec));
            repo.git().run("fetch (VM commits)", args)?;
        }
        (None, Some(head)) => {
            repo.git().run("update-ref", ["update-ref", &reference, head.as_str()])?;
        }
        _ => {}
    }
    let meta = ResultMeta {
        id: id.to_string(),
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        base: snap.base.clone(),
        vm_head: c.head.clone(),
        reference: c.head.as_ref().map(|_| reference.clone()),
        commits: lines,
        commit_count: commits.len(),
        stat,
        files: applied.files.len(),
        sensitive: applied.sensitive(),
        vm_git_metadata: c.git_meta_changed.clone(),
    };
    store::save(&repo.results_dir(), &meta, &apply_patch, &patch_bytes).map(Some)
}

/// The VM's new commits for display (at most 1000, newest first), subjects escaped.
pub(crate) fn commit_lines(g: &Git, head: Option<&Oid>, base: Option<&str>) -> Result<Vec<CommitLine>, RepoError> {
    let mut lines = vec![];
    if let Some(head) = head {
        let mut args = vec!["log", "--no-show-signature", "--format=%H %s", "-n", "1000", head.as_str()];
        if let Some(b) = base {
            args.extend(["--not", b]);
        }
        for l in g.run("log", &args)?.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let (oid, subject) = l.split_at(l.iter().position(|&b| b == b' ').unwrap_or(l.len()));
            if let Some(oid) = Oid::parse(&String::from_utf8_lossy(oid)) {
                lines.push(CommitLine { oid, subject: show(subject.strip_prefix(b" ").unwrap_or(subject)) });
            }
        }
    }
    Ok(lines)
}

/// Every check of the VM's output, run in `g` (a scratch repository that holds, or borrows, the objects of
/// `start`): the bundle verified, holding exactly the VM's HEAD, and fetched to `refs/hutch/vm`; every new
/// commit's changes checked; the patch parsed strictly, compared with git's reading and applied to the VM's HEAD
/// in a temporary index under `scratch`; the combined change from `start.commit` parsed again. Nothing outside
/// `g` is written.
pub fn check(g: &Git, start: Start<'_>, scratch: &std::path::Path, c: &Collected, limits: &Limits) -> Result<Checked, RepoError> {
    let empty_tree = g.line("hash-object", ["hash-object", "-t", "tree", "/dev/null"])?;
    let base = start.base.map(Oid::as_str);

    // Commits: from a verified bundle into the scratch repository, or an existing commit.
    if let Some(bundle) = &c.bundle {
        let head = c.head.as_ref().ok_or_else(|| RepoError::Refused("a commit bundle without a HEAD".into()))?;
        let b = bundle.as_os_str();
        g.run("bundle verify", [OsStr::new("bundle"), OsStr::new("verify"), OsStr::new("-q"), b])
            .map_err(|e| refused(e, "the VM's commit bundle is corrupt or incomplete"))?;
        let heads = g
            .run("bundle list-heads", [OsStr::new("bundle"), OsStr::new("list-heads"), b])
            .map_err(|e| refused(e, "the VM's commit bundle is unreadable"))?;
        let heads = String::from_utf8_lossy(&heads);
        let want = format!("{head} HEAD");
        let lines: Vec<&str> = heads.lines().collect();
        if lines != [want.as_str()] {
            let got: Vec<String> = lines.iter().map(|l| show(l.as_bytes())).collect();
            return Err(RepoError::Refused(format!(
                "the VM's commit bundle should hold exactly its HEAD {head}, it holds [{}]",
                got.join(", ")
            )));
        }
        g.run(
            "fetch (VM commits into scratch)",
            [
                OsStr::new("fetch"),
                OsStr::new("-q"),
                OsStr::new("--no-tags"),
                OsStr::new("--no-write-fetch-head"),
                b,
                OsStr::new("+HEAD:refs/hutch/vm"),
            ],
        )
        .map_err(|e| refused(e, "the VM's commits failed git's checks"))?;
    } else if let Some(head) = &c.head {
        if !g.ok(["cat-file", "-e", &format!("{head}^{{commit}}")]) {
            return Err(RepoError::Refused(format!("the VM's HEAD {head} is neither in its bundle nor in this repository")));
        }
    }

    let mut commits: Vec<(String, Option<String>)> = vec![];
    if let Some(head) = &c.head {
        let mut args = vec!["rev-list", "--parents", head.as_str()];
        if let Some(b) = base {
            args.extend(["--not", b]);
        }
        let out = g.line("rev-list", &args)?;
        for l in out.lines() {
            let mut it = l.split(' ');
            let c = it.next().unwrap_or_default().to_string();
            commits.push((c, it.next().map(str::to_string)));
            if commits.len() > limits.max_commits {
                return Err(RepoError::Refused(format!("the VM made more than {} commits", limits.max_commits)));
            }
        }
    }
    for (c, parent) in &commits {
        check_change(g, parent.as_deref().unwrap_or(&empty_tree), c, &format!("commit {}", &c[..12.min(c.len())]))?;
    }

    // Uncommitted changes: parsed strictly, compared with git's reading, applied to the VM's HEAD in a
    // temporary index (no work tree anywhere), and the resulting tree checked like a commit. A VM that reports
    // its working tree unchanged ends at the tree it started with.
    let head_tree = c.head.as_ref().map(Oid::to_string).unwrap_or_else(|| empty_tree.clone());
    let (final_tree, patch_bytes) = match &c.patch {
        Some(p) => vm_patch_tree(g, scratch, c, p, &head_tree, limits)?,
        None => {
            if c.head.as_ref().map(Oid::as_str) != base {
                check_change(g, &head_tree, start.tree.as_str(), "the VM's uncommitted changes")?;
            }
            (start.tree.to_string(), vec![])
        }
    };

    // The combined change: from the commit the VM started with to its final tree.
    let apply_patch = g.run(
        "diff-tree (snapshot to final tree)",
        [
            "diff-tree",
            "-p",
            "--binary",
            "--full-index",
            "--no-renames",
            "--no-ext-diff",
            "--no-textconv",
            "--no-color",
            start.commit.as_str(),
            &final_tree,
        ],
    )?;
    let applied = patch::parse(&apply_patch).map_err(|e| RepoError::Refused(format!("the combined patch is unsafe: {e}")))?;
    let stat = g.run("diff-tree --stat", ["diff-tree", "--stat=100", "--no-color", start.commit.as_str(), &final_tree])?;
    let head_moved = c.head.as_ref().map(Oid::as_str) != base;
    Ok(Checked { commits, final_tree, apply_patch, applied, stat: show_keep_lines(&stat), patch_bytes, head_moved })
}

/// The VM's final tree from its patch (checked), and the patch's bytes.
fn vm_patch_tree(g: &Git, scratch: &std::path::Path, c: &Collected, path: &std::path::Path, head_tree: &str, limits: &Limits) -> Result<(String, Vec<u8>), RepoError> {
    let size = std::fs::metadata(path).map_err(crate::io_err("cannot read the downloaded patch"))?.len();
    if size > limits.max_patch {
        return Err(RepoError::Refused(format!(
            "the VM's patch of uncommitted changes is larger than the limit of {}",
            crate::size(limits.max_patch)
        )));
    }
    let patch_bytes = store::read_capped(path, limits.max_patch)?;
    let parsed = patch::parse(&patch_bytes).map_err(|e| RepoError::Refused(format!("the VM's patch is malformed or unsafe: {e}")))?;
    same_paths_as_git(g, &patch_bytes, &parsed).map_err(|e| refused(e, "the VM's patch"))?;
    let index = scratch.join("vm.index");
    let gi = g.clone().index(&index);
    match &c.head {
        Some(h) => gi.run("read-tree", ["read-tree", h.as_str()])?,
        None => gi.run("read-tree", ["read-tree", "--empty"])?,
    };
    if !parsed.is_empty() {
        gi.run_input("apply --cached", ["apply", "--cached", "--whitespace=nowarn", "-"], Some(&patch_bytes))
            .map_err(|e| refused(e, "the VM's patch does not apply to its own HEAD"))?;
    }
    let final_tree = gi.line("write-tree", ["write-tree"])?;
    let _ = std::fs::remove_file(&index);
    check_change(g, head_tree, &final_tree, "the VM's uncommitted changes")?;
    Ok((final_tree, patch_bytes))
}

/// Text from git for display: control characters escaped, lines kept.
fn show_keep_lines(b: &[u8]) -> String {
    b.split(|&c| c == b'\n').map(show).collect::<Vec<_>>().join("\n").trim_end().to_string()
}

/// Checks every entry that differs between two tree-ishes in the scratch repository: each path, each mode,
/// and, when a symlink was added or changed, every symlink of the new tree resolved within it.
pub(crate) fn check_change(g: &Git, from: &str, to: &str, what: &str) -> Result<(), RepoError> {
    let out = g.run("diff-tree", ["diff-tree", "-r", "-t", "-z", "--raw", "--no-renames", "--full-index", from, to])?;
    let mut fields = out.split(|&b| b == 0);
    let mut links_changed = false;
    while let Some(info) = fields.next() {
        if info.is_empty() {
            continue;
        }
        let path = fields.next().ok_or_else(|| RepoError::Git { action: "diff-tree".into(), stderr: "truncated output".into() })?;
        // `:<old mode> <new mode> <old oid> <new oid> <status>`
        let info = String::from_utf8_lossy(info);
        let parts: Vec<&str> = info.trim_start_matches(':').split(' ').collect();
        let (Some(new_mode), Some(status)) = (parts.get(1), parts.get(4)) else {
            return Err(RepoError::Git { action: "diff-tree".into(), stderr: format!("unexpected output {info:?}") });
        };
        check_path(path).map_err(|p| RepoError::Refused(format!("{what}: the path {:?} {p}", show(path))))?;
        if *status == "D" {
            continue;
        }
        match *new_mode {
            "100644" | "100755" | "040000" => {}
            "120000" => links_changed = true,
            "160000" => {
                return Err(RepoError::Refused(format!(
                    "{what}: {:?} is a nested git repository (submodule), which cannot be exported",
                    show(path)
                )))
            }
            m => return Err(RepoError::Refused(format!("{what}: {:?} has the file mode {m}", show(path)))),
        }
    }
    if links_changed {
        let links = tree_links(g, to)?;
        links.check_all().map_err(|(p, problem)| RepoError::Refused(format!("{what}: the symlink {:?} {problem}", show(&p))))?;
    }
    Ok(())
}

/// Every symlink in a tree, with its target.
fn tree_links(g: &Git, tree: &str) -> Result<Links, RepoError> {
    let out = g.run("ls-tree", ["ls-tree", "-r", "-z", "--full-tree", tree])?;
    let mut paths = vec![];
    let mut oids = vec![];
    for e in out.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        // `<mode> SP <type> SP <oid> TAB <path>`
        let Some(tab) = e.iter().position(|&b| b == b'\t') else { continue };
        let head = String::from_utf8_lossy(&e[..tab]);
        let mut it = head.split(' ');
        if it.next() != Some("120000") {
            continue;
        }
        let oid = it.nth(1).unwrap_or_default().to_string();
        paths.push(e[tab + 1..].to_vec());
        oids.push(oid);
    }
    let mut links = Links::default();
    if oids.is_empty() {
        return Ok(links);
    }
    let input: String = oids.iter().map(|o| format!("{o}\n")).collect();
    let out = g.run_input("cat-file --batch", ["cat-file", "--batch"], Some(input.as_bytes()))?;
    let mut rest: &[u8] = &out;
    for path in paths {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| RepoError::Git { action: "cat-file".into(), stderr: "truncated output".into() })?;
        let header = String::from_utf8_lossy(&rest[..nl]).to_string();
        let size: usize = header
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RepoError::Git { action: "cat-file".into(), stderr: header.clone() })?;
        if size > MAX_LINK_TARGET {
            return Err(RepoError::Refused(format!("the symlink {:?} has a {size}-byte target", show(&path))));
        }
        let body = rest
            .get(nl + 1..nl + 1 + size)
            .ok_or_else(|| RepoError::Git { action: "cat-file".into(), stderr: "truncated output".into() })?;
        links.insert(path, body.to_vec());
        rest = rest.get(nl + 2 + size..).unwrap_or_default();
    }
    Ok(links)
}

/// Git's own reading of the patch must name exactly the paths hutch's parser found; any difference means the
/// patch is ambiguous, and an ambiguous patch is refused.
pub(crate) fn same_paths_as_git(g: &Git, bytes: &[u8], parsed: &Patch) -> Result<(), RepoError> {
    if parsed.is_empty() {
        return Ok(());
    }
    let out = g.run_input("apply --numstat", ["apply", "--numstat", "-z", "-"], Some(bytes))?;
    // `added TAB deleted TAB path NUL`, or for renames `added TAB deleted TAB NUL old NUL new NUL`.
    let mut seen: Vec<Vec<u8>> = vec![];
    let mut it = out.split(|&b| b == 0).peekable();
    while let Some(f) = it.next() {
        if f.is_empty() {
            continue;
        }
        let mut cols = f.splitn(3, |&b| b == b'\t');
        let (_, _, p) = (cols.next(), cols.next(), cols.next().unwrap_or_default());
        if p.is_empty() {
            seen.extend(it.next().map(<[u8]>::to_vec));
            seen.extend(it.next().map(<[u8]>::to_vec));
        } else {
            seen.push(p.to_vec());
        }
    }
    seen.sort();
    seen.dedup();
    if seen != parsed.all_paths() {
        return Err(RepoError::Refused(format!(
            "git reads the patch's paths as {:?}, hutch as {:?}; an ambiguous patch is refused",
            seen.iter().map(|p| show(p)).collect::<Vec<_>>(),
            parsed.all_paths().iter().map(|p| show(p)).collect::<Vec<_>>()
        )));
    }
    Ok(())
}
