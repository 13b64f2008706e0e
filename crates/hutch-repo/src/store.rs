//! Checked results of past sandboxes, kept in the repository they came from: `<git-common-dir>/hutch/<id>/`
//! holds `meta.json`, `apply.patch` (the snapshot to the VM's final tree: what `apply` applies) and
//! `changes.patch` (the VM's uncommitted changes as it sent them). The VM's commits are `refs/hutch/<id>`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::git::Oid;
use crate::patch::Sensitive;
use crate::{io_err, RepoError};

pub const APPLY_PATCH: &str = "apply.patch";
pub const CHANGES_PATCH: &str = "changes.patch";
const META: &str = "meta.json";
/// `apply` reads at most this much of a stored patch.
const MAX_STORED_PATCH: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitLine {
    pub oid: Oid,
    /// The subject as the VM wrote it, control characters escaped.
    pub subject: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultMeta {
    pub id: String,
    pub created_unix: u64,
    /// The user's HEAD when the sandbox started.
    pub base: Option<Oid>,
    /// The VM's HEAD at the end (also `refs/hutch/<id>` when set).
    pub vm_head: Option<Oid>,
    /// `refs/hutch/<id>` when it was created.
    pub reference: Option<String>,
    /// New commits, newest first (at most 1000 listed).
    pub commits: Vec<CommitLine>,
    pub commit_count: usize,
    /// `git diff --stat` of `apply.patch`.
    pub stat: String,
    pub files: usize,
    pub sensitive: Vec<Sensitive>,
    /// `.git/...` files the VM changed in its own repository; they never leave the VM.
    pub vm_git_metadata: Vec<String>,
}

/// One stored result.
#[derive(Debug, Clone)]
pub struct Stored {
    pub dir: PathBuf,
    pub meta: ResultMeta,
}

impl Stored {
    pub fn apply_patch(&self) -> Result<Vec<u8>, RepoError> {
        read_capped(&self.dir.join(APPLY_PATCH), MAX_STORED_PATCH)
    }
}

pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, RepoError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut buf = vec![];
    f.take(cap + 1).read_to_end(&mut buf).map_err(io_err(format!("cannot read {}", path.display())))?;
    if buf.len() as u64 > cap {
        return Err(RepoError::Refused(format!("{} is larger than {} MiB", path.display(), cap >> 20)));
    }
    Ok(buf)
}

/// A sandbox id or id prefix as typed by a user: lowercase hex only, so it can never name another path.
pub fn check_id(id: &str) -> Result<(), RepoError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(RepoError::NotFound(format!("{id:?} is not a sandbox id (hex digits, as printed by `hutch run`)")));
    }
    Ok(())
}

/// Writes a result atomically: into a temporary directory next to it, then renamed into place.
pub(crate) fn save(results: &Path, meta: &ResultMeta, apply_patch: &[u8], changes_patch: &[u8]) -> Result<Stored, RepoError> {
    check_id(&meta.id)?;
    // Results are the user's alone, whoever else may read the repository (each result directory is 0700 too).
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(results)
        .map_err(io_err(format!("cannot create {}", results.display())))?;
    let tmp =
        tempfile::Builder::new().prefix(".tmp-").tempdir_in(results).map_err(io_err(format!("cannot write in {}", results.display())))?;
    let w = |name: &str, data: &[u8]| std::fs::write(tmp.path().join(name), data).map_err(io_err(format!("cannot write {name}")));
    w(APPLY_PATCH, apply_patch)?;
    w(CHANGES_PATCH, changes_patch)?;
    w(META, &serde_json::to_vec_pretty(meta).map_err(|e| RepoError::Io { what: "cannot encode meta.json".into(), source: e.into() })?)?;
    let dir = results.join(&meta.id);
    let tmp = tmp.keep();
    std::fs::rename(&tmp, &dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        RepoError::Io { what: format!("cannot move the result into {}", dir.display()), source: e }
    })?;
    Ok(Stored { dir, meta: meta.clone() })
}

/// All stored results, oldest first.
pub fn list(results: &Path) -> Vec<Stored> {
    let mut v: Vec<Stored> = std::fs::read_dir(results)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            check_id(&name).ok()?;
            let meta: ResultMeta = serde_json::from_slice(&std::fs::read(e.path().join(META)).ok()?).ok()?;
            (meta.id == name).then(|| Stored { dir: e.path(), meta })
        })
        .collect();
    v.sort_by(|a, b| (a.meta.created_unix, &a.meta.id).cmp(&(b.meta.created_unix, &b.meta.id)));
    v
}

/// The result named by `id` (a unique prefix is enough), or the newest one.
pub fn load(results: &Path, id: Option<&str>) -> Result<Stored, RepoError> {
    let all = list(results);
    match id {
        None => all
            .into_iter()
            .last()
            .ok_or_else(|| RepoError::NotFound("no sandbox results in this repository yet (`hutch run` inside it makes one)".into())),
        Some(id) => {
            check_id(id)?;
            let mut hits: Vec<Stored> = all.into_iter().filter(|s| s.meta.id.starts_with(id)).collect();
            match hits.len() {
                1 => Ok(hits.remove(0)),
                0 => Err(RepoError::NotFound(format!("no sandbox result {id} in this repository"))),
                n => Err(RepoError::NotFound(format!("{id} matches {n} sandbox results; give more digits"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, t: u64) -> ResultMeta {
        ResultMeta {
            id: id.into(),
            created_unix: t,
            base: None,
            vm_head: None,
            reference: None,
            commits: vec![],
            commit_count: 0,
            stat: String::new(),
            files: 0,
            sensitive: vec![],
            vm_git_metadata: vec![],
        }
    }

    #[test]
    fn saved_results_load_by_prefix_or_newest() {
        let t = tempfile::tempdir().unwrap();
        save(t.path(), &meta("aaa111", 10), b"p1", b"c1").unwrap();
        save(t.path(), &meta("aab222", 20), b"p2", b"c2").unwrap();
        assert_eq!(load(t.path(), None).unwrap().meta.id, "aab222");
        assert_eq!(load(t.path(), Some("aaa")).unwrap().apply_patch().unwrap(), b"p1");
        assert!(load(t.path(), Some("aa")).unwrap_err().to_string().contains("matches 2"));
        assert!(load(t.path(), Some("ccc")).unwrap_err().to_string().contains("no sandbox result"));
        assert!(load(t.path(), Some("../x")).unwrap_err().to_string().contains("not a sandbox id"));
        assert!(save(t.path(), &meta("aaa111", 30), b"", b"").is_err(), "an existing result is never replaced");
        let leftovers: Vec<_> =
            std::fs::read_dir(t.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".tmp")).collect();
        assert!(leftovers.is_empty());
    }
}
