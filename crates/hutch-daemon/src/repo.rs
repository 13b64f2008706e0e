//! Sandboxes that hold a client's repository (`hutch run --detach`, `hutch create --repo`). The client uploads
//! the working-tree snapshot `hutch run` takes, as a git bundle of its commit with a [`SnapshotSpec`]; the
//! daemon rebuilds the same snapshot and workspace image with `hutch-repo` ([`Snapshot::from_upload`]) and starts
//! the VM with that image in its workspace slot, `/workspace` mounted as `hutch run` mounts it. When a terminal
//! command ends, the VM's change is collected and checked by the same `hutch-repo` code as `hutch run`'s and kept
//! under `<data dir>/results/<id>/` (bounded: the patch, the VM's bundle and the snapshot bundle each have a
//! cap; results older than a week are removed), for `GET /v1/sandboxes/{id}/change` and its files.
//!
//! `POST /v1/sandboxes/repo`: the body is one line of JSON (a [`RepoCreate`]), a newline, then the snapshot
//! bundle (nothing when `snapshot` is absent). `Content-Length` is required.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use hutch_repo::remote::{ExportMeta, SnapshotSpec, EXPORT_FILES};
use hutch_repo::{Snapshot, Workspace};
use hutch_sandbox::AgentClient;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::api::{ApiError, AppState, SandboxId, JSON_BODY_MAX};
use crate::auth::Principal;
use crate::manager::{Live, Manager};
use crate::model::{CreateSandbox, ErrorBody, SandboxInfo};
use crate::terminal::Terminal;

/// How long the VM may take to hand over its change.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(600);
/// Results are kept this long after they were collected.
const KEEP_RESULTS: Duration = Duration::from_secs(7 * 86400);

/// Caps on what a VM may send back (smaller than `hutch run`'s bundle cap: a daemon keeps results for others).
fn limits() -> hutch_repo::Limits {
    hutch_repo::Limits { max_patch: 64 << 20, max_bundle: 256 << 20, max_commits: 10_000 }
}

/// The first line of a `POST /v1/sandboxes/repo` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoCreate {
    pub sandbox: CreateSandbox,
    /// The snapshot that follows the line as a bundle; absent: no repository (and no body after the line).
    #[serde(default)]
    pub snapshot: Option<SnapshotSpec>,
    /// Destroy the sandbox once its terminal command ended and its change was collected (`hutch run --detach`).
    #[serde(default)]
    pub end_with_command: bool,
}

/// A checked upload whose VM does not exist yet.
pub struct Pending {
    snap: Option<(Arc<Snapshot>, SnapshotSpec)>,
    end_with_command: bool,
}

impl Pending {
    /// The workspace image the VM starts with.
    pub fn image(&self) -> Option<PathBuf> {
        self.snap.as_ref().map(|(s, _)| s.image.clone())
    }

    /// The image for the workspace base slot: the full image a delta workspace image takes its data from.
    pub fn image_base(&self) -> Option<PathBuf> {
        self.snap.as_ref().and_then(|(s, _)| s.image_base.clone())
    }

    /// In the new VM: `/workspace` mounted as `hutch run` mounts it.
    pub async fn enter(self, client: &AgentClient) -> Result<Session, String> {
        let repo = match self.snap {
            Some((snap, spec)) => {
                let ws = hutch_repo::setup_workspace(client, &snap, Path::new(&spec.prefix)).await.map_err(|e| hutch_sandbox::error_chain(&e))?;
                Some(SessionRepo { snap, spec, ws })
            }
            None => None,
        };
        Ok(Session { repo, end_with_command: self.end_with_command, state: watch::channel(Collect::NotYet).0 })
    }
}

struct SessionRepo {
    snap: Arc<Snapshot>,
    spec: SnapshotSpec,
    ws: Workspace,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Collect {
    NotYet,
    Running,
    Done,
}

/// A repository sandbox's state on the daemon.
pub struct Session {
    repo: Option<SessionRepo>,
    end_with_command: bool,
    state: watch::Sender<Collect>,
}

impl Session {
    /// Where a command starts when it names no directory: the workspace, where the user was in the work tree.
    pub fn workdir(&self) -> Option<String> {
        self.repo.as_ref().map(|r| r.ws.cwd.clone())
    }
}

/// After a terminal command of a repository sandbox ends: its change is collected, checked and kept; then, for
/// `hutch run --detach`, the sandbox ends.
pub async fn after_command(mgr: Arc<Manager>, live: Arc<Live>, term: Arc<Terminal>) {
    let code = term.wait_exit().await;
    let Some(s) = &live.session else { return };
    if let (Some(repo), Some(results)) = (&s.repo, mgr.results_dir()) {
        s.state.send_replace(Collect::Running);
        let t0 = std::time::Instant::now();
        if let Err(e) = collect(repo, &live.client, &live.id, code, results).await {
            tracing::error!(id = %live.id, "cannot keep the collected change: {e}");
        }
        tracing::info!(id = %live.id, ms = t0.elapsed().as_millis() as u64, "repository change collected");
        s.state.send_replace(Collect::Done);
    }
    if s.end_with_command {
        mgr.destroy_live(&live.id, "its command ended (hutch run --detach)").await;
    }
}

/// Collects, checks and exports the VM's change into `results/<id>` (replacing an earlier one). A change that
/// cannot be collected or fails a check is kept as an export with its `error`.
async fn collect(repo: &SessionRepo, client: &AgentClient, id: &str, code: i32, results: &Path) -> std::io::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700).create(results)?;
    let work = tempfile::Builder::new().prefix(".collect-").tempdir_in(results)?;
    let (dl, out) = (work.path().join("dl"), work.path().join("out"));
    std::fs::create_dir(&dl)?;
    std::fs::create_dir(&out)?;
    let r: Result<ExportMeta, String> = match tokio::time::timeout(COLLECT_TIMEOUT, hutch_repo::collect(client, &repo.ws, &dl, &limits())).await {
        Err(_) => Err(format!("the VM did not hand over its changes within {} s", COLLECT_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(hutch_sandbox::error_chain(&e)),
        Ok(Ok(c)) => {
            let (snap, spec, id, out2) = (repo.snap.clone(), repo.spec.clone(), id.to_string(), out.clone());
            tokio::task::spawn_blocking(move || hutch_repo::remote::export(&snap, &spec, &id, Some(code), &c, &limits(), &out2).map_err(|e| hutch_sandbox::error_chain(&e)))
                .await
                .unwrap_or_else(|e| Err(format!("the check failed: {e}")))
        }
    };
    if let Err(msg) = r {
        std::fs::remove_dir_all(&out)?;
        std::fs::create_dir(&out)?;
        ExportMeta::empty(id, &repo.spec, Some(code), Some(msg)).write(&out).map_err(std::io::Error::other)?;
    }
    let dest = results.join(id);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&out, &dest)?;
    prune(results);
    Ok(())
}

/// At the daemon's start (one daemon per data directory): what a previous one left half made (uploads, snapshot
/// scratch directories, collections: the names starting with a dot) goes, and results older than a week.
pub fn clean_leftovers(results: &Path) {
    let Ok(rd) = std::fs::read_dir(results) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
    prune(results);
}

/// Removes results older than [`KEEP_RESULTS`].
fn prune(results: &Path) {
    let Ok(rd) = std::fs::read_dir(results) else { return };
    let now = std::time::SystemTime::now();
    for e in rd.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')) {
        let old = e.metadata().and_then(|m| m.modified()).map(|t| now.duration_since(t).unwrap_or_default() > KEEP_RESULTS).unwrap_or(false);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `POST /v1/sandboxes/repo`: creates a sandbox with the uploaded snapshot in `/workspace`.
#[utoipa::path(post, path = "/v1/sandboxes/repo", tag = "sandboxes", security(("bearer" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "One line of JSON, `{\"sandbox\": CreateSandbox, \"snapshot\": {object_format, base, commit, tree, branch, prefix} or null, \"end_with_command\": bool}`, a newline, then the snapshot commit as a git bundle with its history (nothing without a snapshot). Content-Length required."),
    responses(
        (status = 201, description = "Created and running, the repository mounted at /workspace", body = SandboxInfo),
        (status = 400, description = "Bad JSON line, create request or snapshot (named)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "Larger than the daemon's upload limit", body = ErrorBody),
        (status = 429, description = "At the daemon's cap or the token's quota", body = ErrorBody),
        (status = 503, description = "Shutting down, or this daemon keeps no results", body = ErrorBody),
    ))]
pub async fn create(State(st): State<AppState>, Extension(who): Extension<Principal>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ApiError::new(StatusCode::LENGTH_REQUIRED, "Content-Length is required (a JSON line, then the snapshot bundle)"))?;
    let max = st.mgr.limits.upload_max;
    if len > max + JSON_BODY_MAX as u64 {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is {len} bytes; this daemon takes snapshots of at most {max}")));
    }
    let mut stream = body.into_data_stream();
    let mut line = Vec::new();
    let mut rest = axum::body::Bytes::new();
    loop {
        let chunk = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the request body failed: {e}"))),
            None => break,
        };
        if let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..nl]);
            rest = chunk.slice(nl + 1..);
            break;
        }
        line.extend_from_slice(&chunk);
        if line.len() > JSON_BODY_MAX {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the JSON line is longer than {JSON_BODY_MAX} bytes")));
        }
    }
    let rc: RepoCreate = serde_json::from_slice(&line)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the body must start with a RepoCreate JSON object on one line: {e}")))?;
    // The request's own fields first, so a bad one costs no upload.
    st.mgr.check_create(&who, &rc.sandbox)?;
    let snap = match rc.snapshot {
        None => {
            if !rest.is_empty() || stream.next().await.is_some() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "data after the JSON line, but no snapshot is named in it"));
            }
            None
        }
        Some(spec) => {
            spec.check().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            let results = st.mgr.results_dir().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "this daemon keeps no results, so it takes no repositories"))?;
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(results)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot create {}: {e}", results.display())))?;
            let tmp = tempfile::Builder::new()
                .prefix(".upload-")
                .tempfile_in(results)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the upload: {e}")))?;
            let mut f = tokio::fs::File::create(tmp.path()).await.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the upload: {e}")))?;
            let mut n = rest.len() as u64;
            let io = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot store the upload: {e}"));
            f.write_all(&rest).await.map_err(io)?;
            while let Some(c) = stream.next().await {
                let c = c.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the upload failed: {e}")))?;
                n += c.len() as u64;
                if n > max {
                    return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the snapshot bundle is larger than this daemon's limit of {max} bytes")));
                }
                f.write_all(&c).await.map_err(io)?;
            }
            f.flush().await.map_err(io)?;
            drop(f);
            let cache = st.mgr.host.root.join("workspaces");
            let spec2 = spec.clone();
            let scratch_in = results.to_path_buf();
            let made = tokio::task::spawn_blocking(move || {
                let r = Snapshot::from_upload(tmp.path(), &spec2, &cache, &scratch_in);
                drop(tmp);
                r
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the snapshot task failed: {e}")))?;
            let snap = made.map_err(|e| {
                let status = match e {
                    hutch_repo::RepoError::Refused(_) | hutch_repo::RepoError::Project(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, format!("the snapshot cannot be used: {}", hutch_sandbox::error_chain(&e)))
            })?;
            Some((Arc::new(snap), spec))
        }
    };
    let pending = Pending { snap, end_with_command: rc.end_with_command };
    let info: SandboxInfo = st.mgr.create_with(&who, &rc.sandbox, Some(pending)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// `GET /v1/sandboxes/{id}/change`: the collected change's summary (waits for a collection in progress).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/change", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    responses(
        (status = 200, description = "The change's summary (hutch-repo's ExportMeta: snapshot, exit code, changed, error, commits, stat, sensitive paths, which files exist)", body = Object),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token, or no collected change", body = ErrorBody),
        (status = 409, description = "The command has not ended yet", body = ErrorBody),
    ))]
pub async fn change(State(st): State<AppState>, Extension(who): Extension<Principal>, SandboxId(id): SandboxId) -> Result<Json<ExportMeta>, ApiError> {
    st.mgr.visible(&who, &id)?;
    if let Ok(live) = st.mgr.running(&who, &id) {
        if let Some(s) = live.session.as_ref().filter(|s| s.repo.is_some()) {
            let mut rx = s.state.subscribe();
            // The command may have just ended, its collection not begun yet: then that collection is waited for.
            let ended = live.terminal.lock().await.as_ref().is_some_and(|t| !t.running());
            let first = *rx.borrow() == Collect::NotYet;
            if first && !ended && !results_has(&st.mgr, &id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("sandbox {id}'s command has not ended yet; its change is collected when it does (`hutch attach {id}` shows it)"),
                ));
            }
            let done = move |c: &Collect| if first { *c == Collect::Done } else { *c != Collect::Running };
            let waited = tokio::time::timeout(COLLECT_TIMEOUT, rx.wait_for(done)).await;
            if waited.is_err() {
                return Err(ApiError::new(StatusCode::CONFLICT, format!("sandbox {id}'s change is still being collected; try again")));
            }
        }
    }
    let dir = st.mgr.results_dir().map(|r| r.join(&id)).filter(|d| d.join(hutch_repo::remote::META).is_file()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} has no collected change: it was not started with a repository (`hutch run --detach` in a git work tree), its command never ended, or the change was removed after a week"),
        )
    })?;
    let m = ExportMeta::read(&dir).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("sandbox {id}'s result is unreadable: {e}")))?;
    Ok(Json(m))
}

fn results_has(mgr: &Manager, id: &str) -> bool {
    mgr.results_dir().is_some_and(|r| r.join(id).join(hutch_repo::remote::META).is_file())
}

/// `GET /v1/sandboxes/{id}/change/{file}`: one file of the collected change.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/change/{file}", tag = "sandboxes", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$"),
        ("file" = String, Path, description = "snapshot.bundle, commits.bundle or changes.patch"),
    ),
    responses(
        (status = 200, description = "The file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token, or no such file in its change", body = ErrorBody),
    ))]
pub async fn change_file(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    axum::extract::Path((id, file)): axum::extract::Path<(String, String)>,
) -> Result<Response, ApiError> {
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "not a sandbox id (12 lowercase hex digits)"));
    }
    let Some(name) = EXPORT_FILES.iter().find(|f| **f == file) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("a change has the files {}", EXPORT_FILES.join(", "))));
    };
    st.mgr.visible(&who, &id)?;
    let path = st.mgr.results_dir().map(|r| r.join(&id).join(name));
    let f = match path {
        Some(p) => tokio::fs::File::open(&p).await.ok(),
        None => None,
    };
    let f = f.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id}'s change has no {name}")))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_LENGTH, len.to_string())], body).into_response())
}
