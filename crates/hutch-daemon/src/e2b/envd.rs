//! envd, E2B's in-sandbox daemon, served by the host: Connect RPC with the JSON codec (process and filesystem
//! services) and the HTTP endpoints `/files`, `/health`, `/envs`, for the sandbox named by the
//! `E2b-Sandbox-Id` header and authorized by its `X-Access-Token`. Everything runs in the guest through the
//! agent channel; nothing from a request forms a host path. Processes outlive the stream that started them
//! (as envd's do): a table per sandbox holds each one's input and its subscribers.
//!
//! Connect framing: unary calls are a JSON body and a JSON answer (errors: an HTTP status and
//! `{code, message}` with Connect's string code); server streams are 5-byte-prefixed messages (flags, then a
//! big-endian length) ending with an end-of-stream message (flag 0x02) that carries any error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hutch_proto::{ExecEvent, ExecInput, ExecRequest, ExitStatus, TtySize};
use hutch_sandbox::AgentClient;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{owner_principal, rfc3339, E2bError, Shared, HOME};
use crate::files::GuestPath;
use crate::manager::Live;

/// Processes tracked per sandbox; more is refused (each holds an agent stream).
const MAX_PROCS: usize = 256;
/// Streams attached to one process at once.
const MAX_SUBSCRIBERS: usize = 16;
/// Largest request message (unary body or one stream message).
const MAX_MESSAGE: usize = 1 << 20;
/// Largest multipart upload body, buffered whole to find its parts.
const MAX_MULTIPART: usize = 512 << 20;
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(60);
const B64: base64::engine::general_purpose::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The processes of one sandbox, by guest pid.
#[derive(Default)]
pub struct Procs {
    by_pid: HashMap<u32, Arc<Proc>>,
}

struct Proc {
    pid: u32,
    tag: Option<String>,
    config: Value,
    pty: bool,
    input: mpsc::Sender<ExecInput>,
    subscribers: Mutex<Vec<mpsc::Sender<Value>>>,
}

/// A Connect error: its code (Connect's names) and message.
#[derive(Debug)]
pub struct RpcError {
    code: &'static str,
    message: String,
}

impl RpcError {
    fn new(code: &'static str, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new("invalid_argument", message)
    }

    fn status(&self) -> StatusCode {
        match self.code {
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "not_found" | "unimplemented" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.json())).into_response()
    }
}

impl From<crate::manager::ManagerError> for RpcError {
    fn from(e: crate::manager::ManagerError) -> RpcError {
        use crate::manager::ManagerError as M;
        let code = match &e {
            M::BadInput(_) => "invalid_argument",
            M::NotFound(_) => "not_found",
            M::Conflict(m) if m.contains("File exists") || m.contains("Directory not empty") => "already_exists",
            M::Conflict(_) => "failed_precondition",
            M::TooMany(_) => "resource_exhausted",
            M::Unavailable(_) => "unavailable",
            M::Failed(_) | M::Daemon(_) => "internal",
        };
        RpcError::new(code, hutch_sandbox::error_chain(&e))
    }
}

/// The sandbox an envd request is for, or the answer E2B's proxy gives for a sandbox that is not there: 502
/// with "was not found" (the SDK turns that into `SandboxNotRunningException`). A wrong access token gets the
/// same answer, so a caller learns nothing about sandboxes that are not theirs.
// The error is the finished early answer, built once per failed request: its size does not matter.
#[allow(clippy::result_large_err)]
fn target(st: &Shared, headers: &HeaderMap) -> Result<Arc<Live>, Response> {
    let id = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    if id.is_empty() {
        return Err(E2bError::bad("missing E2b-Sandbox-Id header: set E2B_SANDBOX_URL to this daemon's URL and use the E2B SDK").into_response());
    }
    let shown: String = id.chars().take(40).collect();
    let gone = || E2bError::new(StatusCode::BAD_GATEWAY, format!("The sandbox {shown} was not found (or the access token does not match)")).into_response();
    let token = headers.get("x-access-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    let want = st.access_token(id);
    if token.len() != want.len() || token.bytes().zip(want.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
        return Err(gone());
    }
    let row = match st.mgr.store.sandbox(id) {
        Ok(Some(r)) => r,
        Ok(None) => return Err(gone()),
        Err(e) => return Err(E2bError::from(e).into_response()),
    };
    let who = match owner_principal(st, &row.owner) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(gone()),
        Err(e) => return Err(e.into_response()),
    };
    st.mgr.running(&who, id).map_err(|_| gone())
}

/// A guest path from a request: relative paths start at the default user's home, as in envd.
fn guest_path(p: &str) -> Result<GuestPath, RpcError> {
    let full = if p.starts_with('/') { p.to_string() } else if p.is_empty() { HOME.to_string() } else { format!("{HOME}/{p}") };
    GuestPath::parse(&full).map_err(RpcError::invalid)
}

pub async fn health(State(st): State<Shared>, headers: HeaderMap) -> Response {
    match target(&st, &headers) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

pub async fn envs(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let live = match target(&st, &headers) {
        Ok(l) => l,
        Err(r) => return r,
    };
    match st.mgr.info(&live.id) {
        Ok(info) => axum::Json(info.env).into_response(),
        Err(e) => E2bError::from(e).into_response(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Connect framing

fn is_stream_request(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/connect+"))
}

/// The request message: a unary JSON body, or the single enveloped message of a server-stream call.
fn request_message(headers: &HeaderMap, body: &Bytes) -> Result<Value, RpcError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    let payload: &[u8] = match mime {
        "application/json" => body,
        "application/connect+json" => {
            if body.len() < 5 {
                return Err(RpcError::invalid("the stream request has no message (expected a 5-byte prefix and a JSON message)"));
            }
            if body[0] & 0x01 != 0 {
                return Err(RpcError::new("unimplemented", "compressed messages are not supported; send them uncompressed"));
            }
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            if len != body.len() - 5 {
                return Err(RpcError::invalid(format!("the message prefix says {len} bytes but {} follow", body.len() - 5)));
            }
            &body[5..]
        }
        other => {
            let shown: String = other.chars().take(60).collect();
            return Err(RpcError::invalid(format!("content type {shown:?} is not served; use Connect's JSON codec (application/json or application/connect+json)")));
        }
    };
    if payload.len() > MAX_MESSAGE {
        return Err(RpcError::new("resource_exhausted", format!("the message is larger than {MAX_MESSAGE} bytes")));
    }
    if payload.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(payload).map_err(|e| RpcError::invalid(format!("the message is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(RpcError::invalid("the message must be a JSON object"));
    }
    Ok(v)
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, RpcError> {
    serde_json::from_value(v).map_err(|e| RpcError::invalid(format!("bad request message: {e}")))
}

fn frame(flags: u8, msg: &Value) -> Bytes {
    let body = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(flags);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

fn end_frame(err: Option<&RpcError>) -> Bytes {
    match err {
        Some(e) => frame(0x02, &json!({ "error": e.json() })),
        None => frame(0x02, &json!({})),
    }
}

/// A server-stream response whose messages come from `rx`; the end-of-stream message closes it.
fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) });
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/connect+json"));
    r
}

fn stream_error(e: RpcError) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(end_frame(Some(&e)));
    stream_response(rx)
}

fn unary(r: Result<Value, RpcError>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// process.Process

#[derive(Debug, Deserialize)]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PtySize {
    #[serde(default)]
    cols: u32,
    #[serde(default)]
    rows: u32,
}

#[derive(Debug, Deserialize)]
struct Pty {
    #[serde(default)]
    size: Option<PtySize>,
}

#[derive(Debug, Deserialize)]
struct StartRequest {
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Selector {
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WithSelector {
    process: Selector,
}

#[derive(Debug, Deserialize)]
struct ProcessInput {
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    pty: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SendInputRequest {
    process: Selector,
    input: ProcessInput,
}

#[derive(Debug, Deserialize)]
struct SendSignalRequest {
    process: Selector,
    #[serde(default)]
    signal: Value,
}

#[derive(Debug, Deserialize)]
struct UpdateRequest {
    process: Selector,
    #[serde(default)]
    pty: Option<Pty>,
}

fn tty_size(p: &Pty) -> Result<TtySize, RpcError> {
    let (cols, rows) = p.size.as_ref().map_or((80, 24), |s| (s.cols, s.rows));
    if !(1..=1000).contains(&cols) || !(1..=1000).contains(&rows) {
        return Err(RpcError::invalid(format!("pty size {cols}x{rows}: cols and rows must be 1 to 1000")));
    }
    Ok(TtySize { rows: rows as u16, cols: cols as u16 })
}

fn start_request(req: &StartRequest) -> Result<ExecRequest, RpcError> {
    let p = &req.process;
    if p.cmd.is_empty() {
        return Err(RpcError::invalid("process.cmd is empty; give the program to run"));
    }
    let mut argv = vec![p.cmd.clone()];
    argv.extend(p.args.iter().cloned());
    let cwd = match p.cwd.as_deref() {
        Some(c) if !c.is_empty() => guest_path(c)?.as_str().to_string(),
        _ => HOME.to_string(),
    };
    let tty = req.pty.as_ref().map(tty_size).transpose()?;
    let tty = tty.map(|t| crate::model::TtySize { rows: t.rows, cols: t.cols });
    let mut env = p.envs.clone();
    env.entry("HOME".into()).or_insert_with(|| HOME.to_string());
    let checked = crate::api::check_exec(&argv, &env, Some(&cwd), req.stdin.unwrap_or(false) || tty.is_some(), tty)
        .map_err(|e| RpcError::invalid(e.message))?;
    Ok(checked)
}

fn select(st: &Shared, sandbox: &str, sel: &Selector) -> Result<Arc<Proc>, RpcError> {
    let procs = st.procs.lock().unwrap_or_else(|p| p.into_inner());
    let table = procs.get(sandbox);
    let found = match (sel.pid, &sel.tag) {
        (Some(pid), _) => table.and_then(|t| t.by_pid.get(&pid)).cloned(),
        (None, Some(tag)) => table.and_then(|t| t.by_pid.values().find(|p| p.tag.as_ref() == Some(tag))).cloned(),
        (None, None) => return Err(RpcError::invalid("process selector is empty; give pid or tag")),
    };
    found.ok_or_else(|| match (sel.pid, &sel.tag) {
        (Some(pid), _) => RpcError::new("not_found", format!("process with pid {pid} not found")),
        (_, Some(tag)) => RpcError::new("not_found", format!("process with tag {:?} not found", tag.chars().take(64).collect::<String>())),
        _ => RpcError::new("not_found", "process not found"),
    })
}

fn event_msg(ev: Value) -> Value {
    json!({ "event": ev })
}

fn end_event(status: ExitStatus) -> Value {
    match status {
        ExitStatus::Code(c) => json!({ "end": { "exitCode": c, "exited": true, "status": format!("exit status {c}") } }),
        ExitStatus::Signal(s) => {
            let name = match s {
                9 => "killed".to_string(),
                15 => "terminated".to_string(),
                2 => "interrupt".to_string(),
                n => format!("signal {n}"),
            };
            json!({ "end": { "exitCode": -1, "exited": false, "status": format!("signal: {name}") } })
        }
    }
}

pub async fn process_rpc(State(st): State<Shared>, Path(method): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let streaming = matches!(method.as_str(), "Start" | "Connect");
    let fail = |e: RpcError| if streaming { stream_error(e) } else { e.into_response() };
    let live = match target(&st, &headers) {
        Ok(l) => l,
        Err(r) => return r,
    };
    if streaming != is_stream_request(&headers) && matches!(method.as_str(), "Start" | "Connect" | "List" | "SendInput" | "SendSignal" | "CloseStdin" | "Update") {
        return fail(RpcError::invalid(format!("process.Process/{method} is a {} call", if streaming { "server-streaming" } else { "unary" })));
    }
    let msg = match request_message(&headers, &body) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let keepalive = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(30), |s| Duration::from_secs(s.clamp(1, 300)));
    match method.as_str() {
        "Start" => match parse::<StartRequest>(msg) {
            Ok(req) => start(st, live, req, keepalive).await,
            Err(e) => stream_error(e),
        },
        "Connect" => match parse::<WithSelector>(msg).and_then(|r| select(&st, &live.id, &r.process)) {
            Ok(p) => attach(p, None, keepalive),
            Err(e) => stream_error(e),
        },
        "List" => unary(Ok(list(&st, &live.id))),
        "SendInput" => unary(send_input(&st, &live.id, msg).await),
        "SendSignal" => unary(send_signal(&st, &live.id, msg).await),
        "CloseStdin" => unary(async {
            let r: WithSelector = parse(msg)?;
            let p = select(&st, &live.id, &r.process)?;
            p.input.send(ExecInput::StdinEof).await.map_err(|_| RpcError::new("not_found", format!("process {} has ended", p.pid)))?;
            Ok(json!({}))
        }
        .await),
        "Update" => unary(async {
            let r: UpdateRequest = parse(msg)?;
            let p = select(&st, &live.id, &r.process)?;
            if let Some(pty) = &r.pty {
                if !p.pty {
                    return Err(RpcError::new("failed_precondition", format!("process {} has no pty", p.pid)));
                }
                let size = tty_size(pty)?;
                p.input.send(ExecInput::Resize(size)).await.map_err(|_| RpcError::new("not_found", format!("process {} has ended", p.pid)))?;
            }
            Ok(json!({}))
        }
        .await),
        other => {
            let shown: String = other.chars().take(40).collect();
            fail(RpcError::new("unimplemented", format!("process.Process/{shown} is not implemented by this daemon")))
        }
    }
}

fn list(st: &Shared, sandbox: &str) -> Value {
    let procs = st.procs.lock().unwrap_or_else(|p| p.into_inner());
    let list: Vec<Value> = procs
        .get(sandbox)
        .map(|t| {
            let mut v: Vec<&Arc<Proc>> = t.by_pid.values().collect();
            v.sort_by_key(|p| p.pid);
            v.into_iter()
                .map(|p| {
                    let mut o = json!({ "config": p.config, "pid": p.pid });
                    if let (Some(tag), Some(m)) = (&p.tag, o.as_object_mut()) {
                        m.insert("tag".into(), Value::String(tag.clone()));
                    }
                    o
                })
                .collect()
        })
        .unwrap_or_default();
    json!({ "processes": list })
}

async fn send_input(st: &Shared, sandbox: &str, msg: Value) -> Result<Value, RpcError> {
    let r: SendInputRequest = parse(msg)?;
    let p = select(st, sandbox, &r.process)?;
    let data = match (&r.input.stdin, &r.input.pty) {
        (Some(b), None) | (None, Some(b)) => B64.decode(b).map_err(|e| RpcError::invalid(format!("input is not base64: {e}")))?,
        (Some(_), Some(_)) => return Err(RpcError::invalid("input has both stdin and pty; give one")),
        (None, None) => Vec::new(),
    };
    for chunk in data.chunks(hutch_proto::CHUNK) {
        p.input.send(ExecInput::Stdin(chunk.to_vec())).await.map_err(|_| RpcError::new("not_found", format!("process {} has ended", p.pid)))?;
    }
    Ok(json!({}))
}

async fn send_signal(st: &Shared, sandbox: &str, msg: Value) -> Result<Value, RpcError> {
    let r: SendSignalRequest = parse(msg)?;
    let sig = match &r.signal {
        Value::String(s) if s == "SIGNAL_SIGKILL" => libc::SIGKILL,
        Value::String(s) if s == "SIGNAL_SIGTERM" => libc::SIGTERM,
        Value::Number(n) if n.as_i64() == Some(9) => libc::SIGKILL,
        Value::Number(n) if n.as_i64() == Some(15) => libc::SIGTERM,
        other => return Err(RpcError::invalid(format!("signal {other} is not SIGNAL_SIGKILL or SIGNAL_SIGTERM"))),
    };
    let p = select(st, sandbox, &r.process)?;
    p.input.send(ExecInput::Signal(sig)).await.map_err(|_| RpcError::new("not_found", format!("process {} has ended", p.pid)))?;
    Ok(json!({}))
}

/// Starts a process in the guest, records it in the sandbox's table, and streams its events to this caller.
async fn start(st: Shared, live: Arc<Live>, req: StartRequest, keepalive: Duration) -> Response {
    let exec = match start_request(&req) {
        Ok(x) => x,
        Err(e) => return stream_error(e),
    };
    if let Some(tag) = &req.tag {
        if tag.len() > 256 {
            return stream_error(RpcError::invalid("tag is longer than 256 bytes"));
        }
    }
    {
        let procs = st.procs.lock().unwrap_or_else(|p| p.into_inner());
        if procs.get(&live.id).is_some_and(|t| t.by_pid.len() >= MAX_PROCS) {
            return stream_error(RpcError::new("resource_exhausted", format!("this sandbox already runs {MAX_PROCS} tracked processes; kill some first")));
        }
    }
    let pty = exec.tty.is_some();
    let mut handle = match live.client.exec(exec).await {
        Ok(h) => h,
        Err(e) => return stream_error(RpcError::new("unavailable", format!("the sandbox did not answer: {}", hutch_sandbox::error_chain(&e)))),
    };
    let pid = match handle.events.next().await {
        Some(ExecEvent::Started { pid }) => pid,
        Some(ExecEvent::SpawnFailed { message, .. }) => return stream_error(RpcError::invalid(format!("cannot start {}: {message}", req.process.cmd))),
        _ => return stream_error(RpcError::new("unavailable", "the sandbox stopped before the process started")),
    };
    let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(64);
    let config = json!({
        "cmd": req.process.cmd,
        "args": req.process.args,
        "envs": req.process.envs,
        "cwd": req.process.cwd.clone().unwrap_or_else(|| HOME.to_string()),
    });
    let proc_ = Arc::new(Proc { pid, tag: req.tag.clone(), config, pty, input: in_tx, subscribers: Mutex::new(Vec::new()) });
    // Subscribe before any output is pumped, so the starter sees every byte.
    let first = attach(proc_.clone(), Some(()), keepalive);
    st.procs.lock().unwrap_or_else(|p| p.into_inner()).entry(live.id.clone()).or_default().by_pid.insert(pid, proc_.clone());
    // Input (stdin, signals, resizes) has its own task, so a kill gets through while output waits on a slow
    // reader.
    let mut input = handle.input;
    let input_task = tokio::spawn(async move {
        while let Some(i) = in_rx.recv().await {
            if input.send(i).await.is_err() {
                break;
            }
        }
        // Holding the input half until the process ends: closing it tells the agent the host has gone.
        std::future::pending::<()>().await;
    });
    let sandbox = live.id.clone();
    let mut events = handle.events;
    tokio::spawn(async move {
        let end = loop {
            let ev = match events.next().await {
                Some(ExecEvent::Stdout(b)) if pty => json!({ "data": { "pty": B64.encode(&b) } }),
                Some(ExecEvent::Stdout(b)) => json!({ "data": { "stdout": B64.encode(&b) } }),
                Some(ExecEvent::Stderr(b)) => json!({ "data": { "stderr": B64.encode(&b) } }),
                Some(ExecEvent::Exited(s)) => break Some(end_event(s)),
                Some(ExecEvent::Started { .. }) | Some(ExecEvent::SpawnFailed { .. }) => continue,
                None => break None,
            };
            fan_out(&proc_, event_msg(ev)).await;
        };
        // Gone from the table before the end is told, so a caller who saw the end cannot find the pid.
        {
            let mut procs = st.procs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = procs.get_mut(&sandbox) {
                t.by_pid.remove(&pid);
                if t.by_pid.is_empty() {
                    procs.remove(&sandbox);
                }
            }
        }
        let last = match end {
            Some(e) => event_msg(e),
            None => json!({ "error": { "code": "unavailable", "message": "the sandbox stopped while the process ran" } }),
        };
        fan_out(&proc_, last).await;
        proc_.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        input_task.abort();
    });
    first
}

/// Sends one event to every subscriber, waiting on each (output is paced by its readers, as in envd); a
/// subscriber that went away is dropped.
async fn fan_out(p: &Proc, ev: Value) {
    let subs: Vec<mpsc::Sender<Value>> = p.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut dead = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        if s.send(ev.clone()).await.is_err() {
            dead.push(i);
        }
    }
    if !dead.is_empty() {
        p.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| !s.is_closed());
    }
}

/// A stream of `p`'s events for one caller: the start event, then output and the end, with keepalives while
/// quiet. `_starter` marks the stream of the call that started it (the same events; kept for clarity).
fn attach(p: Arc<Proc>, _starter: Option<()>, keepalive: Duration) -> Response {
    let (ev_tx, mut ev_rx) = mpsc::channel::<Value>(16);
    {
        let mut subs = p.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| !s.is_closed());
        if subs.len() >= MAX_SUBSCRIBERS {
            return stream_error(RpcError::new("resource_exhausted", format!("process {} already has {MAX_SUBSCRIBERS} streams attached", p.pid)));
        }
        subs.push(ev_tx);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let pid = p.pid;
    drop(p);
    tokio::spawn(async move {
        if tx.send(frame(0, &json!({ "event": { "start": { "pid": pid } } }))).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(keepalive);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(v) if v.get("error").is_some() => {
                        let e = RpcError::new("unavailable", v["error"]["message"].as_str().unwrap_or("the process stream failed").to_string());
                        let _ = tx.send(end_frame(Some(&e))).await;
                        return;
                    }
                    Some(v) => {
                        let is_end = v["event"].get("end").is_some();
                        if tx.send(frame(0, &v)).await.is_err() {
                            return;
                        }
                        if is_end {
                            let _ = tx.send(end_frame(None)).await;
                            return;
                        }
                    }
                    None => {
                        let e = RpcError::new("unavailable", "the process stream ended without an end event");
                        let _ = tx.send(end_frame(Some(&e))).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    if tx.send(frame(0, &json!({ "event": { "keepalive": {} } }))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    stream_response(rx)
}

// ---------------------------------------------------------------------------------------------------------
// filesystem.Filesystem

#[derive(Debug, Deserialize)]
struct PathRequest {
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
struct ListDirRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct MoveRequest {
    source: String,
    destination: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateWatcherRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatcherIdRequest {
    #[serde(default, alias = "watcher_id")]
    watcher_id: String,
}

/// Watchers per sandbox, and in all (ones whose sandbox ended are dropped when a new one is made).
const MAX_WATCHERS_PER_SANDBOX: usize = 64;
const MAX_WATCHERS: usize = 4096;
/// Entries a watcher remembers; a bigger tree is watched only up to this many.
const MAX_WATCHED_ENTRIES: usize = 20_000;

/// A polling watcher: the directory's last listing (path -> type, size, mtime); each poll lists again and
/// reports the difference as create, remove and write events (the guest has no inotify tool, and the SDK's
/// synchronous `watch_dir` polls anyway).
pub struct Watcher {
    sandbox: String,
    root: GuestPath,
    recursive: bool,
    seen: HashMap<String, (String, String, String)>,
}

async fn snapshot(c: &AgentClient, root: &GuestPath, recursive: bool) -> Result<HashMap<String, (String, String, String)>, RpcError> {
    let mut argv = vec!["find", root.as_str(), "-mindepth", "1"];
    if !recursive {
        argv.extend(["-maxdepth", "1"]);
    }
    argv.extend(["-printf", "%y\t%s\t%T@\t%P\\0"]);
    let (ok, out, err) = run(c, &argv).await?;
    if !ok {
        return Err(fs_error(root.as_str(), &err));
    }
    let mut m = HashMap::new();
    for rec in out.split(|b| *b == 0).filter(|r| !r.is_empty()).take(MAX_WATCHED_ENTRIES) {
        let text = String::from_utf8_lossy(rec);
        let f: Vec<&str> = text.splitn(4, '\t').collect();
        if let [ty, size, mtime, rel] = f.as_slice() {
            m.insert(rel.to_string(), (ty.to_string(), size.to_string(), mtime.to_string()));
        }
    }
    Ok(m)
}

fn diff_events(old: &HashMap<String, (String, String, String)>, new: &HashMap<String, (String, String, String)>) -> Vec<Value> {
    let mut ev = Vec::new();
    let mut names: Vec<&String> = new.keys().chain(old.keys()).collect();
    names.sort();
    names.dedup();
    for n in names {
        let t = match (old.get(n), new.get(n)) {
            (None, Some(_)) => "EVENT_TYPE_CREATE",
            (Some(_), None) => "EVENT_TYPE_REMOVE",
            (Some(a), Some(b)) if a.0 != "d" && (a.1 != b.1 || a.2 != b.2) => "EVENT_TYPE_WRITE",
            _ => continue,
        };
        ev.push(json!({ "name": n, "type": t }));
    }
    ev
}

async fn create_watcher(st: &Shared, live: &Live, msg: Value) -> Result<Value, RpcError> {
    let r: CreateWatcherRequest = parse(msg)?;
    let root = guest_path(&r.path)?;
    let entry = stat(&live.client, &root).await?;
    if entry["type"] != "FILE_TYPE_DIRECTORY" {
        return Err(RpcError::invalid(format!("{} is not a directory", root.as_str())));
    }
    let seen = snapshot(&live.client, &root, r.recursive).await?;
    let mut raw = [0u8; 12];
    getrandom::getrandom(&mut raw).map_err(|e| RpcError::new("internal", format!("no host randomness: {e}")))?;
    let id = hex::encode(raw);
    let mut w = st.watchers.lock().unwrap_or_else(|p| p.into_inner());
    if w.len() >= MAX_WATCHERS {
        let live_ids: std::collections::HashSet<String> =
            w.values().map(|x| x.sandbox.clone()).filter(|s| st.mgr.store.sandbox(s).ok().flatten().is_some_and(|r| r.state == "running")).collect();
        w.retain(|_, x| live_ids.contains(&x.sandbox));
    }
    if w.len() >= MAX_WATCHERS || w.values().filter(|x| x.sandbox == live.id).count() >= MAX_WATCHERS_PER_SANDBOX {
        return Err(RpcError::new("resource_exhausted", "too many directory watchers; stop some first"));
    }
    w.insert(id.clone(), Watcher { sandbox: live.id.clone(), root, recursive: r.recursive, seen });
    Ok(json!({ "watcherId": id }))
}

async fn watcher_events(st: &Shared, live: &Live, msg: Value) -> Result<Value, RpcError> {
    let r: WatcherIdRequest = parse(msg)?;
    let (root, recursive, old) = {
        let w = st.watchers.lock().unwrap_or_else(|p| p.into_inner());
        match w.get(&r.watcher_id) {
            Some(x) if x.sandbox == live.id => (x.root.clone(), x.recursive, x.seen.clone()),
            _ => return Err(RpcError::new("not_found", "watcher not found (stopped, or never made in this sandbox)")),
        }
    };
    let new = snapshot(&live.client, &root, recursive).await?;
    let events = diff_events(&old, &new);
    if let Some(x) = st.watchers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&r.watcher_id) {
        x.seen = new;
    }
    Ok(json!({ "events": events }))
}

/// Streaming `WatchDir` streams open at once, across sandboxes: each lists its directory every
/// [`WATCH_POLL`].
const MAX_WATCH_STREAMS: usize = 64;
static WATCH_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const WATCH_POLL: Duration = Duration::from_millis(500);
/// Messages queued for a slow client; when full the watcher waits (and stops listing) until it reads.
const WATCH_QUEUE: usize = 64;
/// Events sent for one poll: a burst beyond it is cut to its first ones (in name order).
const WATCH_EVENTS_PER_POLL: usize = 1000;

/// Holds one of [`MAX_WATCH_STREAMS`] places; given back when dropped.
struct WatchSlot;

impl WatchSlot {
    fn take() -> Option<WatchSlot> {
        use std::sync::atomic::Ordering;
        let n = WATCH_STREAMS.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_WATCH_STREAMS {
            WATCH_STREAMS.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(WatchSlot)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        WATCH_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `WatchDir` as a server stream: the start event, then `filesystem` events found by listing the directory
/// every [`WATCH_POLL`] and diffing, with keepalives; bounded in streams, queue and events per poll. It ends when
/// the client goes away or the sandbox does.
async fn watch_dir_stream(live: Arc<Live>, msg: Value, keepalive: Duration) -> Response {
    let r: CreateWatcherRequest = match parse(msg) {
        Ok(r) => r,
        Err(e) => return stream_error(e),
    };
    let root = match guest_path(&r.path) {
        Ok(p) => p,
        Err(e) => return stream_error(e),
    };
    match stat(&live.client, &root).await {
        Ok(entry) if entry["type"] == "FILE_TYPE_DIRECTORY" => {}
        Ok(_) => return stream_error(RpcError::invalid(format!("{} is not a directory", root.as_str()))),
        Err(e) => return stream_error(e),
    }
    let Some(slot) = WatchSlot::take() else {
        return stream_error(RpcError::new("resource_exhausted", "too many directory watch streams; close some first"));
    };
    let mut seen = match snapshot(&live.client, &root, r.recursive).await {
        Ok(s) => s,
        Err(e) => return stream_error(e),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_QUEUE);
    let _ = tx.try_send(frame(0, &json!({ "start": {} })));
    tokio::spawn(async move {
        let _slot = slot;
        let mut poll = tokio::time::interval(WATCH_POLL);
        let mut ping = tokio::time::interval(keepalive);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = ping.tick() => {
                    if tx.send(frame(0, &json!({ "keepalive": {} }))).await.is_err() {
                        return;
                    }
                }
                _ = poll.tick() => {
                    let new = match snapshot(&live.client, &root, r.recursive).await {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(end_frame(Some(&e))).await;
                            return;
                        }
                    };
                    for ev in diff_events(&seen, &new).into_iter().take(WATCH_EVENTS_PER_POLL) {
                        if tx.send(frame(0, &json!({ "filesystem": ev }))).await.is_err() {
                            return;
                        }
                    }
                    seen = new;
                }
            }
        }
    });
    stream_response(rx)
}

fn remove_watcher(st: &Shared, live: &Live, msg: Value) -> Result<Value, RpcError> {
    let r: WatcherIdRequest = parse(msg)?;
    let mut w = st.watchers.lock().unwrap_or_else(|p| p.into_inner());
    match w.get(&r.watcher_id) {
        Some(x) if x.sandbox == live.id => {
            w.remove(&r.watcher_id);
            Ok(json!({}))
        }
        _ => Err(RpcError::new("not_found", "watcher not found")),
    }
}

/// type, size, mode (octal), mtime, owner, group, link target, depth, path; NUL-terminated records.
const FIND_FORMAT: &str = "%y\t%s\t%m\t%T@\t%u\t%g\t%l\t%d\t%p\\0";

/// Runs a guest tool with a fixed environment and cwd `/`; the first stderr line is the failure's text.
async fn run(client: &AgentClient, argv: &[&str]) -> Result<(bool, Vec<u8>, String), RpcError> {
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()), ("LC_ALL".into(), "C".into())],
        cwd: Some("/".into()),
        stdin: false,
        tty: None,
    };
    let out = tokio::time::timeout(FILE_OP_TIMEOUT, client.run_request(req))
        .await
        .map_err(|_| RpcError::new("deadline_exceeded", format!("{} did not finish within {FILE_OP_TIMEOUT:?}", argv[0])))?
        .map_err(|e| RpcError::new("unavailable", format!("the sandbox did not answer: {}", hutch_sandbox::error_chain(&e))))?;
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().next().unwrap_or("").to_string();
    Ok((out.status == Some(ExitStatus::Code(0)), out.stdout, line))
}

fn fs_error(path: &str, line: &str) -> RpcError {
    let what = line.rsplit(": ").next().unwrap_or(line).trim();
    let msg = format!("{path}: {what}");
    if what.contains("No such file or directory") {
        RpcError::new("not_found", msg)
    } else if what.contains("File exists") {
        RpcError::new("already_exists", msg)
    } else if what.contains("Permission denied") || what.contains("Read-only file system") {
        RpcError::new("permission_denied", msg)
    } else {
        RpcError::invalid(msg)
    }
}

fn permissions(ty: &str, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match ty {
        "d" => 'd',
        "l" => 'L',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// One `find` record as envd's `EntryInfo`, with its depth below the starting point.
fn entry_info(rec: &[u8]) -> Option<(u32, Value)> {
    let text = String::from_utf8_lossy(rec);
    let f: Vec<&str> = text.splitn(9, '\t').collect();
    let [ty, size, mode, mtime, owner, group, link, depth, path] = f.as_slice() else { return None };
    let mode = u32::from_str_radix(mode, 8).unwrap_or(0);
    let ms = mtime.parse::<f64>().map(|s| (s * 1000.0) as i64).unwrap_or(0);
    let name = if *path == "/" { "/".to_string() } else { path.rsplit('/').next().unwrap_or(path).to_string() };
    let file_type = match *ty {
        "f" => "FILE_TYPE_FILE",
        "d" => "FILE_TYPE_DIRECTORY",
        "l" => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    // Go's os.FileMode: the directory and symlink bits sit above the permission bits.
    let go_mode = mode
        | match *ty {
            "d" => 1u32 << 31,
            "l" => 1u32 << 27,
            _ => 0,
        };
    let mut v = json!({
        "name": name,
        "type": file_type,
        "path": path,
        "size": size.parse::<i64>().unwrap_or(0).to_string(),
        "mode": go_mode,
        "permissions": permissions(ty, mode),
        "owner": owner,
        "group": group,
        "modifiedTime": rfc3339(ms),
    });
    if *ty == "l" {
        if let Some(o) = v.as_object_mut() {
            o.insert("symlinkTarget".into(), Value::String(link.to_string()));
            o.insert("isSymlink".into(), Value::Bool(true));
        }
    }
    Some((depth.parse().unwrap_or(0), v))
}

async fn stat(client: &AgentClient, path: &GuestPath) -> Result<Value, RpcError> {
    let (ok, out, err) = run(client, &["find", path.as_str(), "-maxdepth", "0", "-printf", FIND_FORMAT]).await?;
    if !ok {
        return Err(fs_error(path.as_str(), &err));
    }
    out.split(|b| *b == 0)
        .find(|r| !r.is_empty())
        .and_then(entry_info)
        .map(|(_, v)| v)
        .ok_or_else(|| RpcError::new("internal", format!("{}: no answer from find", path.as_str())))
}

pub async fn filesystem_rpc(State(st): State<Shared>, Path(method): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let live = match target(&st, &headers) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let streaming = method == "WatchDir";
    let msg = match request_message(&headers, &body) {
        Ok(m) => m,
        Err(e) => return if streaming { stream_error(e) } else { e.into_response() },
    };
    if streaming {
        if !is_stream_request(&headers) {
            return RpcError::invalid("filesystem.Filesystem/WatchDir is a server-streaming call (application/connect+json)").into_response();
        }
        let keepalive = headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(30), |s| Duration::from_secs(s.clamp(1, 300)));
        return watch_dir_stream(live, msg, keepalive).await;
    }
    let c = &live.client;
    let r = match method.as_str() {
        "Stat" => async {
            let r: PathRequest = parse(msg)?;
            let p = guest_path(&r.path)?;
            Ok(json!({ "entry": stat(c, &p).await? }))
        }
        .await,
        "MakeDir" => async {
            let r: PathRequest = parse(msg)?;
            let p = guest_path(&r.path)?;
            match stat(c, &p).await {
                Ok(_) => return Err(RpcError::new("already_exists", format!("{} already exists", p.as_str()))),
                Err(e) if e.code == "not_found" => {}
                Err(e) => return Err(e),
            }
            let (ok, _, err) = run(c, &["mkdir", "-p", "--", p.as_str()]).await?;
            if !ok {
                return Err(fs_error(p.as_str(), &err));
            }
            Ok(json!({ "entry": stat(c, &p).await? }))
        }
        .await,
        "Move" => async {
            let r: MoveRequest = parse(msg)?;
            let (src, dst) = (guest_path(&r.source)?, guest_path(&r.destination)?);
            if src.is_root() || dst.is_root() {
                return Err(RpcError::invalid("cannot move / or onto /"));
            }
            if let Some(parent) = dst.as_str().rsplit_once('/').map(|(p, _)| p).filter(|p| !p.is_empty()) {
                let _ = run(c, &["mkdir", "-p", "--", parent]).await?;
            }
            let (ok, _, err) = run(c, &["mv", "-T", "--", src.as_str(), dst.as_str()]).await?;
            if !ok {
                return Err(fs_error(src.as_str(), &err));
            }
            Ok(json!({ "entry": stat(c, &dst).await? }))
        }
        .await,
        "ListDir" => async {
            let r: ListDirRequest = parse(msg)?;
            let p = guest_path(&r.path)?;
            let depth = r.depth.unwrap_or(1).clamp(1, 32).to_string();
            let (ok, out, err) = run(c, &["find", p.as_str(), "-maxdepth", &depth, "-printf", FIND_FORMAT]).await?;
            if !ok {
                return Err(fs_error(p.as_str(), &err));
            }
            let mut recs: Vec<(u32, Value)> = out.split(|b| *b == 0).filter(|r| !r.is_empty()).filter_map(entry_info).collect();
            match recs.iter().find(|(d, _)| *d == 0) {
                Some((_, v)) if v["type"] == "FILE_TYPE_DIRECTORY" => {}
                Some(_) => return Err(RpcError::invalid(format!("{} is not a directory", p.as_str()))),
                None => return Err(RpcError::new("not_found", format!("{} not found", p.as_str()))),
            }
            recs.retain(|(d, _)| *d > 0);
            recs.truncate(crate::files::MAX_LIST);
            Ok(json!({ "entries": recs.into_iter().map(|(_, v)| v).collect::<Vec<_>>() }))
        }
        .await,
        "Remove" => async {
            let r: PathRequest = parse(msg)?;
            let p = guest_path(&r.path)?;
            if p.is_root() {
                return Err(RpcError::invalid("refusing to remove / (kill the sandbox instead)"));
            }
            let (ok, _, err) = run(c, &["rm", "-r", "--", p.as_str()]).await?;
            if !ok {
                return Err(fs_error(p.as_str(), &err));
            }
            Ok(json!({}))
        }
        .await,
        "CreateWatcher" => create_watcher(&st, &live, msg).await,
        "GetWatcherEvents" => watcher_events(&st, &live, msg).await,
        "RemoveWatcher" => remove_watcher(&st, &live, msg),
        other => {
            let shown: String = other.chars().take(40).collect();
            Err(RpcError::new("unimplemented", format!("filesystem.Filesystem/{shown} is not implemented by this daemon")))
        }
    };
    if streaming {
        return match r {
            Ok(_) => stream_error(RpcError::new("internal", "unexpected unary answer")),
            Err(e) => stream_error(e),
        };
    }
    unary(r)
}

// ---------------------------------------------------------------------------------------------------------
// /files

#[derive(Debug, Deserialize)]
pub struct FilesQuery {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    username: Option<String>,
}

fn file_error(e: RpcError) -> Response {
    let status = match e.code {
        "not_found" => StatusCode::NOT_FOUND,
        "invalid_argument" => StatusCode::BAD_REQUEST,
        "permission_denied" => StatusCode::FORBIDDEN,
        "already_exists" => StatusCode::CONFLICT,
        "resource_exhausted" => StatusCode::PAYLOAD_TOO_LARGE,
        "unavailable" => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    E2bError::new(status, e.message).into_response()
}

fn guest_file_error(path: &str, e: hutch_sandbox::SandboxError) -> RpcError {
    match e {
        hutch_sandbox::SandboxError::Guest(m) => {
            let err = fs_error(path, &m);
            if m.contains("Is a directory") || m.contains("not a regular file") {
                RpcError::invalid(format!("{path} is a directory, not a file"))
            } else {
                err
            }
        }
        e => RpcError::new("unavailable", format!("{path}: the sandbox did not answer ({})", hutch_sandbox::error_chain(&e))),
    }
}

pub async fn download(State(st): State<Shared>, headers: HeaderMap, query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let live = match target(&st, &headers) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let Ok(Query(q)) = query else { return E2bError::bad("bad query: give ?path=").into_response() };
    let path = match guest_path(q.path.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return file_error(e),
    };
    match crate::files::stream_download(live.client.clone(), &path).await {
        Ok(r) => r,
        Err(crate::files::DownloadError::Guest(e)) => file_error(guest_file_error(path.as_str(), e)),
        Err(crate::files::DownloadError::Task(m)) => E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, m).into_response(),
    }
}

/// One part of a multipart/form-data body: its file name (the SDK puts the target path there) and bytes.
struct Part {
    filename: Option<String>,
    data: Bytes,
}

fn boundary(headers: &HeaderMap) -> Result<String, String> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.trim_start().to_ascii_lowercase().starts_with("multipart/form-data") {
        return Err("send the file as multipart/form-data (as the E2B SDK does)".into());
    }
    for param in ct.split(';').skip(1) {
        if let Some((k, v)) = param.split_once('=') {
            if k.trim().eq_ignore_ascii_case("boundary") {
                let b = v.trim().trim_matches('"');
                if b.is_empty() || b.len() > 200 {
                    return Err("the multipart boundary must be 1-200 characters".into());
                }
                return Ok(b.to_string());
            }
        }
    }
    Err("the multipart Content-Type has no boundary".into())
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    memchr_find(&hay[from..], needle).map(|i| i + from)
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - needle.len() + 1].iter().position(|b| *b == first) {
            Some(off) => {
                let at = i + off;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
            None => return None,
        }
    }
    None
}

/// Splits a buffered multipart body into its parts; every malformation is named.
fn multipart(body: &Bytes, boundary: &str) -> Result<Vec<Part>, String> {
    let delim = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut pos = find(body, delim.as_bytes(), 0).ok_or("the body has no multipart boundary line")?;
    loop {
        pos += delim.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            return Ok(parts);
        }
        if body.get(pos..pos + 2) != Some(b"\r\n") {
            return Err("a multipart boundary line is not followed by CRLF".into());
        }
        pos += 2;
        let head_end = find(body, b"\r\n\r\n", pos).ok_or("a multipart part has no end of headers")?;
        let head = std::str::from_utf8(&body[pos..head_end]).map_err(|_| "multipart part headers are not UTF-8")?;
        if head.len() > 16 << 10 {
            return Err("multipart part headers are too long".into());
        }
        let mut filename = None;
        for line in head.split("\r\n") {
            let Some((name, value)) = line.split_once(':') else { continue };
            if name.trim().eq_ignore_ascii_case("content-disposition") {
                filename = disposition_filename(value);
            }
        }
        let data_start = head_end + 4;
        let next_delim = format!("\r\n{delim}");
        let data_end = find(body, next_delim.as_bytes(), data_start).ok_or("a multipart part is not closed by its boundary")?;
        parts.push(Part { filename, data: body.slice(data_start..data_end) });
        if parts.len() > 1000 {
            return Err("at most 1000 files per upload".into());
        }
        pos = data_end + 2;
    }
}

/// `form-data; name="file"; filename="/a/b.txt"` -> `/a/b.txt` (quoted-string escapes undone).
fn disposition_filename(v: &str) -> Option<String> {
    let i = v.find("filename=")?;
    let rest = v[i + 9..].trim_start();
    if let Some(q) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return Some(percent_or_plain(&out)),
                c => out.push(c),
            }
        }
        None
    } else {
        Some(percent_or_plain(rest.split(';').next().unwrap_or("").trim()))
    }
}

/// httpx escapes `"` and control characters in file names as `%22`, `%0A`...; undo only those.
fn percent_or_plain(s: &str) -> String {
    s.replace("%22", "\"").replace("%0D", "\r").replace("%0A", "\n")
}

pub async fn upload(State(st): State<Shared>, headers: HeaderMap, query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>, body: Body) -> Response {
    let live = match target(&st, &headers) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let Ok(Query(q)) = query else { return E2bError::bad("bad query: give ?path= for a single file").into_response() };
    let b = match boundary(&headers) {
        Ok(b) => b,
        Err(m) => return E2bError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, m).into_response(),
    };
    let limit = (st.mgr.limits.upload_max as usize).min(MAX_MULTIPART);
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return E2bError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is larger than {limit} bytes (or ended early)")).into_response()
        }
    };
    let parts = match multipart(&bytes, &b) {
        Ok(p) => p,
        Err(m) => return E2bError::bad(format!("bad multipart body: {m}")).into_response(),
    };
    let files: Vec<&Part> = parts.iter().filter(|p| p.filename.is_some()).collect();
    if files.is_empty() {
        return E2bError::bad("the multipart body has no file part").into_response();
    }
    let mut out = Vec::new();
    for part in &files {
        let name = if files.len() == 1 { q.path.clone().or_else(|| part.filename.clone()) } else { part.filename.clone() };
        let path = match guest_path(name.as_deref().unwrap_or("")) {
            Ok(p) if !p.is_root() => p,
            Ok(_) => return E2bError::bad("path / is a directory; give a file path").into_response(),
            Err(e) => return file_error(e),
        };
        let data = part.data.clone();
        if let Err(e) = live.client.put_file(path.as_str(), 0o644, data.len() as u64, std::io::Cursor::new(data)).await {
            return file_error(guest_file_error(path.as_str(), e));
        }
        let base = path.as_str().rsplit('/').next().unwrap_or("").to_string();
        out.push(json!({ "name": base, "type": "file", "path": path.as_str() }));
    }
    axum::Json(out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_split_into_files() {
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/a/b.txt\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"rel\"\r\n\r\n\r\n--XyZ--\r\n",
        );
        let parts = multipart(&body, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].filename.as_deref(), Some("/a/b.txt"));
        assert_eq!(&parts[0].data[..], b"hello");
        assert_eq!(&parts[1].data[..], b"");
        assert!(multipart(&Bytes::from_static(b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nunterminated"), "XyZ").is_err());
        assert!(multipart(&Bytes::from_static(b"nothing"), "XyZ").is_err());
    }

    #[test]
    fn connect_envelopes_and_entries() {
        let f = frame(0, &json!({"a": 1}));
        assert_eq!(f[0], 0);
        assert_eq!(u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize, f.len() - 5);
        assert_eq!(end_frame(None)[0], 2);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/connect+json".parse().unwrap());
        let mut body = vec![0u8, 0, 0, 0, 2];
        body.extend_from_slice(b"{}");
        assert!(request_message(&h, &Bytes::from(body)).unwrap().is_object());
        assert!(request_message(&h, &Bytes::from_static(&[0, 0, 0, 0, 9, b'{'])).is_err());
        let (d, v) = entry_info(b"d\t4096\t755\t1700000000.5\troot\troot\t\t1\t/home/user/dir").unwrap();
        assert_eq!(d, 1);
        assert_eq!(v["name"], "dir");
        assert_eq!(v["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(v["permissions"], "drwxr-xr-x");
        assert_eq!(guest_path("x/y").unwrap().as_str(), "/home/user/x/y");
        assert!(guest_path("../etc").is_err());
    }

    #[test]
    fn watcher_polls_diff_into_events() {
        let e = |t: &str, s: &str, m: &str| (t.to_string(), s.to_string(), m.to_string());
        let old: HashMap<String, _> = [("a".to_string(), e("f", "1", "1.0")), ("gone".to_string(), e("f", "1", "1.0")), ("d".to_string(), e("d", "4096", "1.0"))].into();
        let new: HashMap<String, _> = [("a".to_string(), e("f", "2", "2.0")), ("new".to_string(), e("f", "0", "3.0")), ("d".to_string(), e("d", "4096", "5.0"))].into();
        let ev = diff_events(&old, &new);
        assert_eq!(ev, vec![json!({"name": "a", "type": "EVENT_TYPE_WRITE"}), json!({"name": "gone", "type": "EVENT_TYPE_REMOVE"}), json!({"name": "new", "type": "EVENT_TYPE_CREATE"})]);
    }
}
