//! `hutch diff --from ID` / `hutch apply --from ID`: a daemon sandbox's change (see `detach`) fetched over the API
//! into the repository it came from and imported like a local run's (`hutch_repo::remote::import_export`, every
//! check again here), after which the ordinary `diff`/`apply` show and apply it by its id.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use hutch_repo::remote::{ExportMeta, CHANGES_PATCH, COMMITS_BUNDLE, SNAPSHOT_BUNDLE};
use hutch_repo::{store, HostRepo, Limits};
use tokio::io::AsyncWriteExt;

use crate::remote::Api;

/// Caps on what is downloaded (the daemon has its own, smaller ones).
const SNAPSHOT_MAX: u64 = 1 << 30;
const BUNDLE_MAX: u64 = 512 << 20;
const PATCH_MAX: u64 = 64 << 20;

/// A download directory under the repository's `.git/hutch`, removed however the fetch ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes sandbox `id`'s change available under its id in this repository's results; `Ok(false)` when the sandbox
/// changed nothing (said on stderr).
pub async fn fetch(repo: &HostRepo, id: &str) -> anyhow::Result<bool> {
    let api = Api::new(&crate::detach::conn_from_env()?)?;
    let meta: ExportMeta = api
        .json(reqwest::Method::GET, &format!("/v1/sandboxes/{id}/change"), None::<&()>)
        .await
        .with_context(|| format!("fetching sandbox {id}'s change from {}", api.base))?;
    if meta.id != id {
        return Err(anyhow!("the daemon answered for sandbox {:?}, not {id}", meta.id));
    }
    if let Some(e) = &meta.error {
        return Err(anyhow!("the daemon could not take sandbox {id}'s change: {}", hutch_text::escape_lines(e.as_bytes())));
    }
    if !meta.changed {
        eprintln!("hutch: sandbox {id} changed nothing in /workspace");
        return Ok(false);
    }
    let results = repo.results_dir();
    // Fetched before and not collected again since: the local copy is the change.
    if let Ok(local) = store::load(&results, Some(id)) {
        if local.meta.id == id && local.meta.created_unix >= meta.collected_unix {
            return Ok(true);
        }
        std::fs::remove_dir_all(&local.dir).with_context(|| format!("remove the older copy {}", local.dir.display()))?;
    }
    std::fs::create_dir_all(&results).with_context(|| format!("create {}", results.display()))?;
    let dir = Scratch(results.join(format!(".fetch-{id}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
    meta.write(&dir.0)?;
    let want = [(true, SNAPSHOT_BUNDLE, SNAPSHOT_MAX), (meta.commits_bundle, COMMITS_BUNDLE, BUNDLE_MAX), (meta.changes_patch, CHANGES_PATCH, PATCH_MAX)];
    for (_, name, cap) in want.iter().filter(|w| w.0) {
        download(&api, &format!("/v1/sandboxes/{id}/change/{name}"), &dir.0.join(name), *cap).await.with_context(|| format!("downloading {name} of sandbox {id}"))?;
    }
    let stored = hutch_repo::remote::import_export(repo, &dir.0, &Limits::default())?;
    Ok(stored.is_some())
}

async fn download(api: &Api, path: &str, to: &Path, cap: u64) -> anyhow::Result<()> {
    let mut resp = api.send(api.req(reqwest::Method::GET, path)).await?;
    let mut f = tokio::fs::File::create(to).await.with_context(|| format!("create {}", to.display()))?;
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await.context("the download broke off")? {
        n += chunk.len() as u64;
        if n > cap {
            return Err(anyhow!("larger than the limit of {} MiB", cap >> 20));
        }
        f.write_all(&chunk).await.with_context(|| format!("write {}", to.display()))?;
    }
    f.flush().await?;
    Ok(())
}
