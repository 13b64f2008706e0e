//! The guest's side, driven from the host over the agent: mount the snapshot's image at `/workspace` under a
//! writable overlay (a fresh repository: neutral identity, no remotes, the working tree as the user had it), run
//! a setup script, and at the end pack the VM's new commits into a bundle and the paths the overlay says changed
//! into a patch and download them under size caps. Everything the guest reports back is treated as hostile by the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use hutch_proto::{ExecEvent, ExecRequest, ExitStatus};
use hutch_sandbox::AgentClient;
use tokio::io::AsyncWrite;

use crate::git::Oid;
use crate::host::Snapshot;
use crate::{io_err, Limits, RepoError};

/// Where the repository is in the VM.
pub const WORKSPACE: &str = hutch_proto::WORKSPACE_DIR;
const STAGING: &str = "/var/tmp/hutch";

/// The agent binary in the guest (it lists the overlay's changes).
const AGENT: &str = "/run/hutch-agent";
/// The overlay's upper layer and the mounted image in the guest (see `hutch-agent`'s `workspace` module).
const UPPER: &str = "/var/tmp/hutch/overlay/upper";
const LOWER: &str = "/run/hutch/workspace-image";

/// Arguments: workspace, staging directory, base commit (or empty), the overlay's upper and lower directories
/// (or empty: then the whole tree is scanned), and `reported` when `workspace-changes` already ran (its report
/// is in `<staging>/out.report`). Writes `<staging>/out/changes.patch` (unless the working tree is
/// the snapshot's and HEAD did not move) and, when there are new commits, `<staging>/out/commits.bundle`; prints
/// the report [`parse_report`] reads.
///
/// With an overlay, one agent process reads its upper layer: the changed paths (into `out/paths`), whether
/// anything under `.git` that can move HEAD was written, and the digests of the git metadata. The working tree's
/// final state is then the snapshot's index (made on the host, in the image) with only those paths added again
/// (`git add -A` limited to them): work proportional to the change, not to the tree, and no git process at all
/// when nothing changed. Files rewritten with the same content hash to the same blobs, so they are no change.
pub(crate) const COLLECT: &str = r#"set -eu
ws=$1 base=$3 upper=$4 lower=$5 out=$2/out
cd "$ws"
if [ -n "$upper" ]; then
  [ "${6:-}" = reported ] || "$AGENT" workspace-changes "$upper" "$lower" "$out" > "$out.report"
  { read -r npaths refs; } < "$out.report"
else
  rm -rf "$out"
  mkdir -p "$out"
  npaths=all refs=moved
fi
head=$base bundle=no
if [ "$refs" = moved ]; then
  head=$(git rev-parse -q --verify 'HEAD^{commit}' || true)
  if [ -n "$head" ] && [ "$head" != "$base" ]; then
    if [ -n "$base" ]; then n=$(git rev-list --count "$head" "^$base"); else n=1; fi
    if [ "$n" -gt 0 ]; then git bundle create -q "$out/commits.bundle" HEAD ${base:+"^$base"}; bundle=yes; fi
  fi
fi
patch=unchanged
if [ "$npaths" != 0 ] || [ "$refs" = moved ]; then
  export GIT_INDEX_FILE="$ws/.git/$SNAPSHOT_INDEX" GIT_LITERAL_PATHSPECS=1
  case $npaths in
    0) ;;
    all) git add -A ;;
    *) git add -A --pathspec-from-file="$out/paths" --pathspec-file-nul ;;
  esac
  git diff --cached --binary --full-index --no-renames --no-ext-diff --no-textconv --no-color "${head:-$(git hash-object -t tree /dev/null)}" > "$out/changes.patch"
  patch=yes
fi
echo "head ${head:--}"
echo "bundle $bundle"
echo "patch $patch"
if [ -n "$upper" ]; then
  { read -r _; while IFS= read -r l; do echo "$l"; done; } < "$out.report"
else
  cd .git && sha256sum config hooks/* info/* 2>/dev/null || true
fi
"#;

/// The repository as set up in the VM.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub base: Option<Oid>,
    /// The workspace is an overlay over the image (the collection reads its upper layer); `false` only where
    /// no overlay exists (tests standing in for the VM).
    pub overlay: bool,
    /// The directory the command starts in: `/workspace` plus where the user was in the work tree.
    pub cwd: String,
    /// Digests of the VM's `.git/config`, hooks and `info/` right after setup, to tell the user later what the
    /// VM changed there (those files never leave the VM).
    git_meta: BTreeMap<String, String>,
}

impl Workspace {
    /// The VM's starting point: the snapshot's base and the digests of the git metadata it was given.
    pub(crate) fn new(snap: &Snapshot, cwd: String) -> Workspace {
        Workspace { base: snap.base.clone(), overlay: true, cwd, git_meta: snap.git_meta.clone() }
    }

    /// A repository the VM cloned itself at `workspace` (an event-triggered run): no image and no overlay, so
    /// the collection scans the whole working tree against `base` (the commit the clone checked out, as the VM
    /// reported it; the host checks the change against the forge's copy of it before delivering anything).
    pub fn cloned(base: Oid, cwd: String) -> Workspace {
        Workspace { base: Some(base), overlay: false, cwd, git_meta: BTreeMap::new() }
    }
}

/// What came back from the VM, on the host, not yet checked.
#[derive(Debug)]
pub struct Collected {
    /// The VM's HEAD as it reported it.
    pub head: Option<Oid>,
    pub bundle: Option<PathBuf>,
    /// The VM's uncommitted changes against its HEAD; `None`: its working tree is the snapshot's, unchanged.
    pub patch: Option<PathBuf>,
    /// `.git/...` files the VM added, changed or removed (informational; never exported).
    pub git_meta_changed: Vec<String>,
}

/// Where streamed output goes.
pub type Tee<'a> = &'a mut (dyn FnMut(&[u8]) + Send);

/// One guest process's result.
#[derive(Debug)]
pub struct ExecResult {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// The end of stderr (or, when streaming, of all output).
    pub tail: Vec<u8>,
}

const TAIL: usize = 16 * 1024;

fn push_tail(tail: &mut Vec<u8>, b: &[u8]) {
    tail.extend_from_slice(b);
    if tail.len() > TAIL {
        tail.drain(..tail.len() - TAIL);
    }
}

/// Runs a process in the guest. Stdout is collected up to `stdout_cap` (more is an error) unless `tee` is
/// given, in which case all output goes to `tee` and only its tail is kept.
pub async fn exec(
    client: &AgentClient,
    argv: Vec<String>,
    cwd: Option<&str>,
    stdout_cap: usize,
    tee: Option<Tee<'_>>,
) -> Result<ExecResult, RepoError> {
    exec_with_env(client, argv, vec![], cwd, stdout_cap, tee).await
}

/// [`exec`] with `env` added to the sandbox's base environment (later entries win).
async fn exec_with_env(
    client: &AgentClient,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<&str>,
    stdout_cap: usize,
    mut tee: Option<Tee<'_>>,
) -> Result<ExecResult, RepoError> {
    let req = ExecRequest { argv, env, cwd: cwd.map(str::to_string), stdin: false, tty: None };
    let mut h = client.exec(req).await?;
    let mut stdout = vec![];
    let mut tail = vec![];
    while let Some(ev) = h.events.next().await {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => match tee.as_mut() {
                Some(t) => {
                    t(&b);
                    push_tail(&mut tail, &b);
                }
                None => {
                    if stdout.len() + b.len() > stdout_cap {
                        return Err(RepoError::Refused(format!("a guest step printed more than {stdout_cap} bytes")));
                    }
                    stdout.extend_from_slice(&b);
                }
            },
            ExecEvent::Stderr(b) => {
                if let Some(t) = tee.as_mut() {
                    t(&b);
                }
                push_tail(&mut tail, &b);
            }
            ExecEvent::Exited(status) => return Ok(ExecResult { status, stdout, tail }),
            ExecEvent::SpawnFailed { message, .. } => return Err(RepoError::Guest(message)),
        }
    }
    Err(RepoError::Guest("the agent channel closed before the process ended".into()))
}

fn failed(what: &str, r: &ExecResult) -> RepoError {
    RepoError::Guest(format!("{what} failed (exit {}): {}", r.status.as_shell_code(), crate::git::stderr_text(&r.tail)))
}

/// Where a command started from `prefix` (relative to the work tree's top) runs in the VM.
pub fn guest_cwd(prefix: &Path) -> String {
    match prefix.to_str().filter(|p| !p.is_empty() && !p.contains(['\n', '\0'])) {
        Some(p) => format!("{WORKSPACE}/{p}"),
        None => WORKSPACE.to_string(),
    }
}

/// Mounts the snapshot's image (attached to the sandbox as its workspace drive) with a writable overlay at
/// `/workspace`. Nothing is copied or unpacked: the guest reads the image's blocks as it needs them.
pub async fn setup_workspace(client: &AgentClient, snap: &Snapshot, prefix: &Path) -> Result<Workspace, RepoError> {
    client.mount_workspace(WORKSPACE, snap.image_base.is_some()).await?;
    Ok(Workspace::new(snap, guest_cwd(prefix)))
}

/// The workspace of a VM that mounted `snap`'s image already (`AgentClient::mount_workspace` at
/// [`WORKSPACE`], started before the snapshot was known, with the image it turned out to use).
pub fn mounted_workspace(snap: &Snapshot, prefix: &Path) -> Workspace {
    Workspace::new(snap, guest_cwd(prefix))
}

/// Runs a setup script (its bytes, uploaded as they were read and hashed) as root in the VM, from `cwd`, with
/// `env` on top of the sandbox's base environment (the setup phase's secret placeholders), passing its output to
/// `tee`.
pub async fn run_setup(
    client: &AgentClient,
    script: &[u8],
    cwd: &str,
    env: Vec<(String, String)>,
    tee: Tee<'_>,
) -> Result<ExecResult, RepoError> {
    let path = format!("{STAGING}/setup");
    client.put_file(&path, 0o700, script.len() as u64, script).await?;
    let argv = if script.starts_with(b"#!") { vec![path] } else { vec!["sh".into(), path] };
    exec_with_env(client, argv, env, Some(cwd), 0, Some(tee)).await
}

/// Packs and downloads what the VM changed into `dest` (a host directory that exists).
pub async fn collect(client: &AgentClient, ws: &Workspace, dest: &Path, limits: &Limits) -> Result<Collected, RepoError> {
    let env = vec![("AGENT".into(), AGENT.into()), ("SNAPSHOT_INDEX".into(), crate::host::SNAPSHOT_INDEX.into())];
    let mut report = None;
    let unchanged = || {
        let head = ws.base.as_ref().map(|o| o.to_string()).unwrap_or_else(|| "-".into());
        format!("head {head}\nbundle no\npatch unchanged\n").into_bytes()
    };
    // An empty upper layer (the agent looks, no process runs): the workspace is the image, so HEAD is the base,
    // nothing changed and the git metadata is what the host put in the image. An agent that cannot tell leaves it
    // to the full check below.
    if ws.overlay && matches!(client.workspace_untouched().await, Ok(true)) {
        return Ok(Collected { head: ws.base.clone(), bundle: None, patch: None, git_meta_changed: vec![] });
    }
    if ws.overlay {
        // The upper layer first, by the agent alone: when it says nothing changed (the common case of a command
        // that only reads), that is the whole report, and no shell or git process runs at all.
        let argv = [AGENT, "workspace-changes", UPPER, LOWER, &format!("{STAGING}/out")].map(str::to_string).to_vec();
        let r = exec_with_env(client, argv, env.clone(), Some(WORKSPACE), 1 << 20, None).await?;
        if r.status != ExitStatus::Code(0) {
            return Err(failed("reading the overlay's changes in /workspace", &r));
        }
        if let Some(rest) = r.stdout.strip_prefix(b"0 same\n".as_slice()) {
            let mut text = unchanged();
            text.extend_from_slice(rest);
            report = Some(text);
        }
    }
    let stdout = match report {
        Some(r) => r,
        None => {
            let mut argv = collect_argv(ws, WORKSPACE, STAGING);
            if ws.overlay {
                argv.push("reported".into());
            }
            let r = exec_with_env(client, argv, env, Some("/"), 1 << 20, None).await?;
            if r.status != ExitStatus::Code(0) {
                return Err(failed("collecting the changes in /workspace", &r));
            }
            r.stdout
        }
    };
    let (head, bundle, patch, git_meta_changed) = parse_report(ws, &stdout)?;
    let patch = if patch {
        let p = dest.join("changes.patch");
        download(client, &format!("{STAGING}/out/changes.patch"), &p, limits.max_patch, "patch of uncommitted changes").await?;
        Some(p)
    } else {
        None
    };
    let bundle = if bundle {
        let b = dest.join("commits.bundle");
        download(client, &format!("{STAGING}/out/commits.bundle"), &b, limits.max_bundle, "bundle of new commits").await?;
        Some(b)
    } else {
        None
    };
    Ok(Collected { head, bundle, patch, git_meta_changed })
}

/// The collection step's command line.
pub(crate) fn collect_argv(ws: &Workspace, workspace: &str, staging: &str) -> Vec<String> {
    let base = ws.base.as_ref().map(|o| o.to_string()).unwrap_or_default();
    let (upper, lower) = if ws.overlay { (UPPER, LOWER) } else { ("", "") };
    let mut argv = vec!["sh".to_string(), "-c".to_string()];
    argv.extend([COLLECT, "hutch-collect", workspace, staging, &base, upper, lower].map(str::to_string));
    argv
}

/// Reads the collect step's report: the VM's HEAD, whether a bundle and a patch were made, and digests of its
/// git metadata (compared with those taken at setup).
pub(crate) fn parse_report(ws: &Workspace, stdout: &[u8]) -> Result<(Option<Oid>, bool, bool, Vec<String>), RepoError> {
    let text = String::from_utf8_lossy(stdout);
    let mut lines = text.lines();
    let head =
        match lines.next().and_then(|l| l.strip_prefix("head ")) {
            Some("-") => None,
            Some(h) => Some(Oid::parse(h).ok_or_else(|| {
                RepoError::Refused(format!("the VM reported HEAD {:?}, not an object id", crate::path::show(h.as_bytes())))
            })?),
            None => return Err(RepoError::Refused("the VM's report has no HEAD line".into())),
        };
    let bundle = match lines.next() {
        Some("bundle yes") => true,
        Some("bundle no") => false,
        _ => return Err(RepoError::Refused("the VM's report has no bundle line".into())),
    };
    let patch = match lines.next() {
        Some("patch yes") => true,
        Some("patch unchanged") => false,
        _ => return Err(RepoError::Refused("the VM's report has no patch line".into())),
    };
    let after = parse_meta(lines.collect::<Vec<_>>().join("\n").as_bytes());
    let mut changed: Vec<String> = ws
        .git_meta
        .iter()
        .filter(|(p, h)| after.get(*p) != Some(h))
        .map(|(p, _)| p.clone())
        .chain(after.keys().filter(|p| !ws.git_meta.contains_key(*p)).cloned())
        .map(|p| format!(".git/{p}"))
        .collect();
    changed.sort();
    changed.dedup();
    Ok((head, bundle, patch, changed))
}

fn parse_meta(out: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| {
            let (h, p) = l.split_once("  ")?;
            (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| (crate::path::show(p.as_bytes()), h.to_string()))
        })
        .take(10_000)
        .collect()
}

async fn download(client: &AgentClient, guest: &str, host: &Path, cap: u64, what: &str) -> Result<(), RepoError> {
    let file = tokio::fs::File::create(host).await.map_err(io_err(format!("cannot create {}", host.display())))?;
    let mut w = Capped { inner: file, written: 0, cap, exceeded: false };
    let r = client.get_file(guest, &mut w).await;
    if w.exceeded {
        return Err(RepoError::Refused(format!("the VM's {what} is larger than the limit of {}", crate::size(cap))));
    }
    r?;
    Ok(())
}

/// A writer that refuses to grow past `cap` bytes, so a VM cannot fill the host's disk.
struct Capped<W> {
    inner: W,
    written: u64,
    cap: u64,
    exceeded: bool,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Capped<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.written + buf.len() as u64 > self.cap {
            self.exceeded = true;
            return Poll::Ready(Err(std::io::Error::other("size limit exceeded")));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written += *n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_metadata_digests_parse() {
        let h = "a".repeat(64);
        let out = format!("{h}  config\n{h}  hooks/pre-commit.sample\nnot a line\n{}  bad\n", "z".repeat(64));
        let m = parse_meta(out.as_bytes());
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("config"), Some(&h));
    }

    #[tokio::test]
    async fn capped_writer_stops_at_the_limit() {
        use tokio::io::AsyncWriteExt;
        let mut w = Capped { inner: Vec::new(), written: 0, cap: 10, exceeded: false };
        w.write_all(b"12345").await.unwrap();
        assert!(w.write_all(b"678901").await.is_err());
        assert!(w.exceeded);
        assert_eq!(w.inner.len(), 5);
    }
}
