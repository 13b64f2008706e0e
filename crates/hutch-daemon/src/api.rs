//! The REST API: routes, bearer-token authentication, request parsing (every rejection becomes a JSON 4xx
//! naming the problem), handlers over the [`Manager`], and the OpenAPI document generated from the handlers'
//! annotations and the model's types.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use futures::StreamExt;
use hutch_proto::{ExecEvent, ExecInput, ExecRequest, ExitStatus};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::auth::Principal;
use crate::files::{self, GuestPath};
use crate::manager::{parse_label_filter, Manager, ManagerError};
use crate::model::*;

/// Largest JSON body; file uploads have their own limit ([`crate::Limits::upload_max`]).
pub const JSON_BODY_MAX: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub mgr: Arc<Manager>,
    /// Event-triggered runs (`hutch serve --triggers`), when configured.
    pub triggers: Option<Arc<crate::triggers::Triggers>>,
}

/// An error response: a status and a message naming what is wrong (and what to do), as JSON.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        }
        let mut r = (self.status, Json(ErrorBody { error: self.message })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        r
    }
}

/// The HTTP status of a manager error, the same on every API surface (native and E2B).
pub(crate) fn manager_status(e: &ManagerError) -> StatusCode {
    match e {
        ManagerError::BadInput(_) => StatusCode::BAD_REQUEST,
        ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
        ManagerError::Conflict(_) => StatusCode::CONFLICT,
        ManagerError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        ManagerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::Failed(_) | ManagerError::Daemon(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> ApiError {
        ApiError::new(manager_status(&e), hutch_sandbox::error_chain(&e))
    }
}

impl From<crate::DaemonError> for ApiError {
    fn from(e: crate::DaemonError) -> ApiError {
        ManagerError::from(e).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = match r.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        let hint = match status {
            StatusCode::PAYLOAD_TOO_LARGE => format!(" (JSON bodies are limited to {} bytes)", JSON_BODY_MAX),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => " (send Content-Type: application/json)".to_string(),
            _ => String::new(),
        };
        ApiError::new(status, format!("{}{hint}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::bad(r.body_text())
    }
}

/// A JSON object body parsed into `T`, with JSON errors. Only an object is accepted: serde would otherwise
/// read a struct from an array too (`[null, null]`), which no client means.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "expected a JSON body (send Content-Type: application/json)"));
        }
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|r| {
            let hint = if r.status() == StatusCode::PAYLOAD_TOO_LARGE { format!(" (JSON bodies are limited to {JSON_BODY_MAX} bytes)") } else { String::new() };
            ApiError::new(r.status(), format!("{}{hint}", r.body_text()))
        })?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad("the body must be a JSON object"));
        }
        let axum::Json(v) = axum::Json::<T>::from_bytes(&bytes)?;
        Ok(ApiJson(v))
    }
}

/// `axum::extract::Query` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// A sandbox id from the path, checked for shape.
pub struct SandboxId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SandboxId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, state).await?;
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            let shown: String = id.chars().take(40).collect();
            return Err(ApiError::bad(format!("{shown:?} is not a sandbox id (ids are 12 lowercase hex digits, as returned by create)")));
        }
        Ok(SandboxId(id))
    }
}

pub fn router(mgr: Arc<Manager>) -> Router {
    router_with(mgr, None)
}

/// The router with event-triggered runs' routes (`/hooks/{trigger}`, `/v1/runs`, `/v1/triggers`).
pub fn router_with(mgr: Arc<Manager>, triggers: Option<Arc<crate::triggers::Triggers>>) -> Router {
    let state = AppState { mgr, triggers };
    let authed = Router::new()
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/v1/sandboxes/{id}/extend", post(extend_sandbox))
        .route("/v1/sandboxes/{id}/pause", post(pause_sandbox))
        .route("/v1/sandboxes/{id}/resume", post(resume_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/exec/stream", post(crate::stream::sse))
        .route("/v1/sandboxes/{id}/exec/ws", get(crate::stream::ws))
        .route("/v1/sandboxes/{id}/terminal/ws", get(crate::terminal::ws))
        .route(
            "/v1/sandboxes/{id}/files",
            get(download).put(upload).delete(remove_file).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/sandboxes/{id}/files/list", get(list_files))
        .route("/v1/sandboxes/{id}/files/stat", get(stat_file))
        .route("/v1/sandboxes/{id}/files/mkdir", post(mkdir))
        .route("/v1/sandboxes/{id}/egress", get(egress))
        // Repository sandboxes (crate::repo): create with a snapshot upload; the collected change.
        .route("/v1/sandboxes/repo", post(crate::repo::create).layer(DefaultBodyLimit::disable()))
        .route("/v1/sandboxes/{id}/change", get(crate::repo::change))
        .route("/v1/sandboxes/{id}/change/{file}", get(crate::repo::change_file))
        .route("/metrics", get(metrics))
        .merge(crate::triggers::api::authed_routes())
        .route_layer(from_fn_with_state(state.clone(), authenticate));
    // E2B's control plane and envd (crate::e2b): their own paths, auth and error shape.
    let (e2b, e2b_hosts) = match crate::e2b::router_and_state(state.mgr.clone()) {
        Ok((r, s)) => (r, Some(s)),
        Err(e) => {
            tracing::error!("the E2B routes are off: {e}");
            (Router::new(), None)
        }
    };
    let router = Router::new()
        .route("/healthz", get(health))
        .merge(e2b)
        .route("/openapi.json", get(openapi_json))
        .merge(crate::triggers::api::hook_routes())
        .merge(authed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (the API is described at /openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint (see /openapi.json)")
        })
        .layer(DefaultBodyLimit::max(JSON_BODY_MAX))
        .with_state(state);
    // `<port>-<id>.<domain>` Host headers (E2B's get_host) go to the sandbox before any route is matched.
    match e2b_hosts {
        Some(s) => router.layer(from_fn_with_state(s, crate::e2b::port::by_host)),
        None => router,
    }
}

async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    // A unix-socket connection is its peer's identity (the kernel's word, not a header).
    if let Some(crate::server::PeerPrincipal(p)) = req.extensions().get::<crate::server::PeerPrincipal>().cloned() {
        req.extensions_mut().insert(p);
        return next.run(req).await;
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))) else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing token: send `Authorization: Bearer <token>` (make one with `hutch token create --name NAME`)")
            .into_response();
    };
    match crate::auth::authenticate(&st.mgr.store, token.trim()) {
        Ok(Some(p)) => {
            // The connection has shown a token: it is no longer one an unauthenticated flood can be made of.
            if let Some(c) = req.extensions().get::<Arc<crate::server::ConnState>>() {
                c.mark_authenticated();
            }
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Ok(None) => ApiError::new(StatusCode::UNAUTHORIZED, "unknown or revoked token").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[utoipa::path(get, path = "/healthz", tag = "daemon",
    responses((status = 200, description = "The daemon is serving", body = Health)))]
async fn health(State(st): State<AppState>) -> Json<Health> {
    Json(Health {
        status: if st.mgr.is_shutting_down() { "shutting_down".into() } else { "ok".into() },
        sandboxes_running: st.mgr.live_count() as u64,
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

async fn openapi_json() -> Response {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::triggers::api::RunsDoc::openapi());
    match doc.to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("openapi: {e}")).into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "daemon", security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    ))]
async fn metrics(State(st): State<AppState>, Extension(who): Extension<Principal>) -> Result<Response, ApiError> {
    // Counts across every token's sandboxes: not for an ordinary token.
    if !who.admin {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "/metrics needs an admin token (make one with `hutch token create --name NAME --admin`)"));
    }
    st.mgr.metrics.pool_ready.set(st.mgr.pool_ready() as i64);
    let text = st.mgr.metrics.render(&st.mgr.store)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", security(("bearer" = [])),
    request_body = CreateSandbox,
    responses(
        (status = 201, description = "Created and running", body = SandboxInfo),
        (status = 400, description = "Bad input, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 429, description = "At the concurrency cap or the token's quota", body = ErrorBody),
        (status = 500, description = "The VM could not start", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    ))]
async fn create_sandbox(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<(StatusCode, Json<SandboxInfo>), ApiError> {
    let info = st.mgr.create(&who, &req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Sandboxes this token owns (all, for an admin token)", body = SandboxList),
        (status = 400, description = "Bad filter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ))]
async fn list_sandboxes(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<SandboxList>, ApiError> {
    let labels = match &q.label {
        Some(l) if l.is_empty() => return Err(ApiError::bad("label filter is empty; give key=value[,key=value...] or leave it out")),
        Some(l) => parse_label_filter(l).map_err(ApiError::bad)?,
        None => BTreeMap::new(),
    };
    let sandboxes = st.mgr.list(&who, q.state, &labels, q.all.unwrap_or(false))?;
    Ok(Json(SandboxList { sandboxes }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    responses(
        (status = 200, description = "The sandbox", body = SandboxInfo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
    ))]
async fn get_sandbox(State(st): State<AppState>, Extension(who): Extension<Principal>, SandboxId(id): SandboxId) -> Result<Json<SandboxInfo>, ApiError> {
    let row = st.mgr.visible(&who, &id)?;
    Ok(Json(st.mgr.to_info(row)?))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    responses(
        (status = 200, description = "Destroyed; its VM and files are gone", body = SandboxInfo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
        (status = 409, description = "Already ended, or still starting", body = ErrorBody),
    ))]
async fn delete_sandbox(State(st): State<AppState>, Extension(who): Extension<Principal>, SandboxId(id): SandboxId) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(st.mgr.delete(&who, &id).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/extend", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    request_body = ExtendRequest,
    responses(
        (status = 200, description = "The new expiry", body = SandboxInfo),
        (status = 400, description = "Bad input, or past the maximum lifetime", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
        (status = 409, description = "The sandbox has ended", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ))]
async fn extend_sandbox(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiJson(req): ApiJson<ExtendRequest>,
) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(st.mgr.extend(&who, &id, req.seconds)?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    responses(
        (status = 200, description = "Paused: RAM, devices and disk saved in the data directory; no VM runs", body = SandboxInfo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
        (status = 409, description = "Not running", body = ErrorBody),
    ))]
async fn pause_sandbox(State(st): State<AppState>, Extension(who): Extension<Principal>, SandboxId(id): SandboxId) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(st.mgr.pause(&who, &id).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    responses(
        (status = 200, description = "Running again, with its files and processes; its TTL starts over", body = SandboxInfo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
        (status = 409, description = "Not paused, or it cannot resume on this daemon's image", body = ErrorBody),
        (status = 429, description = "At the sandbox cap or the token's quota", body = ErrorBody),
    ))]
async fn resume_sandbox(State(st): State<AppState>, Extension(who): Extension<Principal>, SandboxId(id): SandboxId) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(st.mgr.resume(&who, &id, None).await?))
}

/// Checks argv, env and cwd of an exec into the protocol's request.
pub(crate) fn check_exec(argv: &[String], env: &BTreeMap<String, String>, cwd: Option<&str>, stdin: bool, tty: Option<TtySize>) -> Result<ExecRequest, ApiError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ApiError::bad("argv is empty; give the program and its arguments, e.g. [\"sh\", \"-c\", \"echo hi\"]"));
    }
    if argv.len() > 4096 || argv.iter().map(|a| a.len()).sum::<usize>() > 256 << 10 {
        return Err(ApiError::bad("argv is too long (at most 4096 arguments and 256 KiB)"));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad("argv contains a NUL byte"));
    }
    for (k, v) in env {
        let ok = !k.is_empty() && !k.starts_with(|c: char| c.is_ascii_digit()) && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(ApiError::bad(format!("env: {k:?} is not a valid variable name (letters, digits, _; not starting with a digit)")));
        }
        if v.contains('\0') {
            return Err(ApiError::bad(format!("env: the value of {k} contains a NUL byte")));
        }
    }
    let cwd = match cwd {
        Some(c) => Some(GuestPath::parse(c).map_err(|e| ApiError::bad(format!("cwd: {e}")))?.as_str().to_string()),
        None => None,
    };
    let tty = match tty {
        Some(t) if t.rows == 0 || t.cols == 0 || t.rows > 1000 || t.cols > 1000 => {
            return Err(ApiError::bad("tty: rows and cols must be 1 to 1000"));
        }
        Some(t) => Some(hutch_proto::TtySize { rows: t.rows, cols: t.cols }),
        None => None,
    };
    Ok(ExecRequest { argv: argv.to_vec(), env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), cwd, stdin, tty })
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command ran (or could not start: exit 127/126 and the reason on stderr)", body = ExecResult),
        (status = 400, description = "Bad input, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ))]
async fn exec(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Json<ExecResult>, ApiError> {
    let stdin = match (&body.stdin, &body.stdin_base64) {
        (Some(_), Some(_)) => return Err(ApiError::bad("give stdin or stdin_base64, not both")),
        (Some(s), None) => Some(s.as_bytes().to_vec()),
        (None, Some(b)) => Some(
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| ApiError::bad(format!("stdin_base64 is not base64: {e}")))?,
        ),
        (None, None) => None,
    };
    let timeout = match body.timeout_secs {
        Some(0) => return Err(ApiError::bad("timeout_secs must be at least 1")),
        Some(t) => Some(Duration::from_secs(t.min(30 * 86400))),
        None => None,
    };
    let req = check_exec(&body.argv, &body.env, body.cwd.as_deref(), stdin.is_some(), None)?;
    let live = st.mgr.running(&who, &id)?;
    let limit = st.mgr.limits.exec_output_max;
    let t0 = Instant::now();
    let handle = live.client.exec(req).await.map_err(|e| ManagerError::Conflict(format!("sandbox {id} did not answer: {}", hutch_sandbox::error_chain(&e))))?;
    let mut events = handle.events;
    let (go, sig_tx, feeder) = feed_input(handle.input, stdin);
    // If the client goes away, this handler is dropped mid-await: the guard then aborts the feeder, which
    // closes the command's stream, and the agent kills the command's process group.
    let feeder = AbortOnDrop(feeder);
    let mut go = Some(go);
    let (mut out, mut err, mut truncated, mut timed_out) = (Vec::new(), Vec::new(), false, false);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let status = loop {
        // After a timeout, the kill has this long to be reported before the exec is abandoned (dropping the
        // stream makes the agent kill the process group anyway).
        let wait_until = match deadline {
            Some(d) if !timed_out => Some(d),
            Some(d) => Some(d + Duration::from_secs(10)),
            None => None,
        };
        let ev = match wait_until {
            Some(d) => match tokio::time::timeout_at(d, events.next()).await {
                Ok(ev) => ev,
                Err(_) if !timed_out => {
                    timed_out = true;
                    let _ = sig_tx.try_send(libc::SIGKILL);
                    continue;
                }
                Err(_) => break ExitStatus::Signal(libc::SIGKILL),
            },
            None => events.next().await,
        };
        match ev {
            Some(ExecEvent::Started { .. }) => {
                if let Some(g) = go.take() {
                    let _ = g.send(());
                }
            }
            Some(ExecEvent::Stdout(b)) => append(&mut out, &b, limit, &mut truncated),
            Some(ExecEvent::Stderr(b)) => append(&mut err, &b, limit, &mut truncated),
            Some(ExecEvent::Exited(s)) => break s,
            Some(ExecEvent::SpawnFailed { message, not_found }) => {
                err.extend_from_slice(message.as_bytes());
                break ExitStatus::Code(if not_found { 127 } else { 126 });
            }
            None => {
                return Err(ManagerError::Conflict(format!("sandbox {id} stopped while the command ran")).into());
            }
        }
    };
    drop(feeder);
    let (encoding, stdout, stderr) = match (std::str::from_utf8(&out), std::str::from_utf8(&err)) {
        (Ok(o), Ok(e)) => ("utf8", o.to_string(), e.to_string()),
        _ => {
            let b = base64::engine::general_purpose::STANDARD;
            ("base64", b.encode(&out), b.encode(&err))
        }
    };
    Ok(Json(ExecResult {
        exit_code: status.as_shell_code(),
        signal: match status {
            ExitStatus::Signal(s) => Some(s),
            ExitStatus::Code(_) => None,
        },
        timed_out,
        encoding: encoding.into(),
        stdout,
        stderr,
        truncated,
        duration_ms: t0.elapsed().as_millis() as u64,
    }))
}

/// Feeds a command's stdin (then end of file) and forwards signals, from its own task so that a command
/// that writes before it reads cannot deadlock against us. Input starts only once `go` fires (the process has
/// started): the agent takes input from then on. The task holds the input half until it is aborted, because
/// closing it tells the agent the host has gone.
pub(crate) fn feed_input(
    mut input: hutch_sandbox::client::ExecInputSender,
    stdin: Option<Vec<u8>>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::sync::mpsc::Sender<i32>, tokio::task::JoinHandle<()>) {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::channel::<i32>(4);
    let task = tokio::spawn(async move {
        if go_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        if let Some(bytes) = stdin {
            for chunk in bytes.chunks(hutch_proto::CHUNK) {
                if let Ok(sig) = sig_rx.try_recv() {
                    let _ = input.send(ExecInput::Signal(sig)).await;
                }
                if input.send(ExecInput::Stdin(chunk.to_vec())).await.is_err() {
                    break;
                }
            }
            let _ = input.send(ExecInput::StdinEof).await;
        }
        while let Some(sig) = sig_rx.recv().await {
            let _ = input.send(ExecInput::Signal(sig)).await;
        }
        std::future::pending::<()>().await;
    });
    (go_tx, sig_tx, task)
}

/// Aborts a task when dropped (also when the future holding it is cancelled).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn append(buf: &mut Vec<u8>, b: &[u8], limit: usize, truncated: &mut bool) {
    let room = limit.saturating_sub(buf.len());
    if b.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&b[..b.len().min(room)]);
}

fn guest_path(p: &str) -> Result<GuestPath, ApiError> {
    GuestPath::parse(p).map_err(ApiError::bad)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$"), PathQuery),
    responses(
        (status = 200, description = "The file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "Bad path, or not a regular file", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
    ))]
async fn download(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let path = guest_path(&q.path)?;
    let live = st.mgr.running(&who, &id)?;
    files::stream_download(live.client.clone(), &path).await.map_err(|e| match e {
        files::DownloadError::Guest(e) => guest_error(path.as_str(), e),
        files::DownloadError::Task(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
    })
}

fn guest_error(path: &str, e: hutch_sandbox::SandboxError) -> ApiError {
    match e {
        hutch_sandbox::SandboxError::Guest(m) => files::classify(path, &m).into(),
        // The agent channel failed: the VM stopped or is going away.
        e => ApiError::new(StatusCode::CONFLICT, format!("{path}: the sandbox did not answer ({})", hutch_sandbox::error_chain(&e))),
    }
}

fn parse_mode(m: Option<&str>) -> Result<u32, ApiError> {
    match m {
        None => Ok(0o644),
        Some(s) => match u32::from_str_radix(s, 8) {
            Ok(v) if v <= 0o7777 && !s.is_empty() => Ok(v),
            _ => Err(ApiError::bad(format!("mode {s:?} must be octal permission bits such as 644 or 755"))),
        },
    }
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes (Content-Length required)"),
    responses(
        (status = 200, description = "Written", body = FileStat),
        (status = 400, description = "Bad path or mode", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox is not running, or the path is in the way", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "Larger than the daemon's upload limit", body = ErrorBody),
    ))]
async fn upload(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FileStat>, ApiError> {
    let path = guest_path(&q.path)?;
    if path.is_root() {
        return Err(ApiError::bad("path / is a directory; give a file path"));
    }
    let mode = parse_mode(q.mode.as_deref())?;
    if mode & 0o400 == 0 {
        return Err(ApiError::bad(format!("mode {:o} leaves the file unreadable to its owner; give permission bits such as 644 or 600", mode)));
    }
    // The guest is told the size before the first byte; a body of unknown length (chunked) cannot say it. A
    // request without a body is an empty file (HTTP clients send an empty PUT without a Content-Length), with the
    // mode checked above like any other.
    let declared = headers.get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    let len = match declared {
        Some(Some(n)) => n,
        Some(None) => return Err(ApiError::bad("Content-Length is not a number")),
        None => axum::body::HttpBody::size_hint(&body)
            .exact()
            .ok_or_else(|| ApiError::new(StatusCode::LENGTH_REQUIRED, "Content-Length is required for uploads (send the file with a known size)"))?,
    };
    let max = st.mgr.limits.upload_max;
    if len > max {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is {len} bytes; this daemon takes at most {max}")));
    }
    let live = st.mgr.running(&who, &id)?;
    let stream = body.into_data_stream().map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(stream);
    live.client.put_file(path.as_str(), mode, len, reader).await.map_err(|e| match e {
        hutch_sandbox::SandboxError::HostIo { .. } => ApiError::bad(format!("the upload body ended early or failed: {}", hutch_sandbox::error_chain(&e))),
        e => guest_error(path.as_str(), e),
    })?;
    Ok(Json(files::stat(&live.client, &path).await?))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$"), RemoveQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "Not running, or a non-empty directory without recursive=true", body = ErrorBody),
    ))]
async fn remove_file(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&q.path)?;
    let live = st.mgr.running(&who, &id)?;
    files::remove(&live.client, &path, q.recursive.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$"), PathQuery),
    responses(
        (status = 200, description = "The directory's entries", body = FileList),
        (status = 400, description = "Bad path, or not a directory", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox or directory", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
    ))]
async fn list_files(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<FileList>, ApiError> {
    let path = guest_path(&q.path)?;
    let live = st.mgr.running(&who, &id)?;
    Ok(Json(files::list(&live.client, &path).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$"), PathQuery),
    responses(
        (status = 200, description = "What is at the path", body = FileStat),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
    ))]
async fn stat_file(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<FileStat>, ApiError> {
    let path = guest_path(&q.path)?;
    let live = st.mgr.running(&who, &id)?;
    Ok(Json(files::stat(&live.client, &path).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    request_body = MkdirRequest,
    responses(
        (status = 200, description = "The directory", body = FileStat),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox, or a missing parent without parents=true", body = ErrorBody),
        (status = 409, description = "Not running, or something is in the way", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ))]
async fn mkdir(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> Result<Json<FileStat>, ApiError> {
    let path = guest_path(&req.path)?;
    let live = st.mgr.running(&who, &id)?;
    Ok(Json(files::mkdir(&live.client, &path, req.parents.unwrap_or(true)).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/egress", tag = "sandboxes", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    responses(
        (status = 200, description = "The sandbox's egress audit log", body = EgressLog),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = ErrorBody),
    ))]
async fn egress(State(st): State<AppState>, Extension(who): Extension<Principal>, SandboxId(id): SandboxId) -> Result<Json<EgressLog>, ApiError> {
    st.mgr.visible(&who, &id)?;
    let records = st.mgr.store.audit(&id, 100_000)?.into_iter().filter_map(|r| serde_json::from_str(&r).ok()).collect();
    Ok(Json(EgressLog { gateway_attached: true, records }))
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hutch", description = "Sandboxes as a service: disposable micro-VMs with exec, files and PTY shells. \
        Streaming exec: `GET /v1/sandboxes/{id}/exec/ws` (WebSocket; the first text frame is a StreamExec, binary frames \
        are stdin one way and stdout/stderr the other (first byte 1 or 2), text frames are ClientMsg/ServerMsg JSON) or \
        `POST /v1/sandboxes/{id}/exec/stream` (Server-Sent Events of ServerMsg)."),
    paths(
        health, metrics, create_sandbox, list_sandboxes, get_sandbox, delete_sandbox, extend_sandbox, pause_sandbox, resume_sandbox, exec,
        crate::stream::sse, download, upload, remove_file, list_files, stat_file, mkdir, egress,
        crate::repo::create, crate::repo::change, crate::repo::change_file
    ),
    components(schemas(ClientMsg, ServerMsg, StreamExec, TtySize)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;
