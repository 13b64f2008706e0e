//! Putting a stored result into the user's working tree, on request only. The decision is made on exactly the
//! bytes that are applied: the stored patch is read once, parsed, its sensitive paths refused unless allowed,
//! git's reading compared, then the same bytes go to `git apply`, which checks every hunk before writing any
//! file (all or nothing), refuses to write through symlinks, and runs with an empty scratch repository as its
//! git directory so neither the user's repository config nor their index is involved.

use crate::git::init_scratch;
use crate::host::HostRepo;
use crate::import::same_paths_as_git;
use crate::patch::{self, Sensitive};
use crate::store::Stored;
use crate::RepoError;

#[derive(Debug)]
pub struct Applied {
    /// Files created, changed or deleted.
    pub files: usize,
    /// Sensitive paths that were applied (only with `allow_sensitive`).
    pub sensitive: Vec<Sensitive>,
}

pub fn apply(repo: &HostRepo, stored: &Stored, allow_sensitive: bool) -> Result<Applied, RepoError> {
    let id = &stored.meta.id;
    let bytes = stored.apply_patch()?;
    let parsed = patch::parse(&bytes)
        .map_err(|e| RepoError::Apply(format!("the stored patch of sandbox {id} is damaged ({e}); nothing was changed")))?;
    if parsed.is_empty() {
        return Ok(Applied { files: 0, sensitive: vec![] });
    }
    let sensitive = parsed.sensitive();
    if !sensitive.is_empty() && !allow_sensitive {
        return Err(RepoError::Sensitive { id: id.clone(), list: sensitive });
    }
    let scratch = tempfile::Builder::new().prefix("hutch-apply-").tempdir().map_err(crate::io_err("cannot create a scratch directory"))?;
    let g = init_scratch(&scratch.path().join("git"), &repo.object_format)?.work_tree(&repo.top);
    same_paths_as_git(&g, &bytes, &parsed)?;
    g.run_input("apply", ["apply", "--whitespace=nowarn", "-"], Some(&bytes)).map_err(|e| {
        let why = match e {
            RepoError::Git { stderr, .. } => stderr,
            other => other.to_string(),
        };
        RepoError::Apply(format!(
            "the changes of sandbox {id} do not apply to the working tree, which changed since the sandbox started; nothing was changed.\n{why}\nThe VM's commits are in refs/hutch/{id}; its patch is {}",
            stored.dir.join(crate::store::APPLY_PATCH).display()
        ))
    })?;
    Ok(Applied { files: parsed.files.len(), sensitive })
}
