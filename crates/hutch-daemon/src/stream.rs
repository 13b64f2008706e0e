//! Streaming exec: a WebSocket session (stdin, signals, resize in; stdout, stderr, exit out; a PTY when asked)
//! and Server-Sent Events (output and exit out, stdin given up front). Output is forwarded as it arrives, with
//! back-pressure all the way to the guest: nothing is buffered without bound. A client that goes away ends
//! the process (the agent kills the process group when its stream closes).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use hutch_proto::{ExecEvent, ExecInput};
use hutch_sandbox::client::ExecEvents;

use crate::api::{check_exec, ApiError, ApiJson, AppState, SandboxId};
use crate::auth::Principal;
use crate::manager::{Live, ManagerError};
use crate::model::{ClientMsg, ServerMsg, StreamExec, WS_STDERR, WS_STDOUT};

const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
const WS_MESSAGE_MAX: usize = 1 << 20;

fn exit_msg(st: hutch_proto::ExitStatus) -> ServerMsg {
    ServerMsg::Exit {
        exit_code: st.as_shell_code(),
        signal: match st {
            hutch_proto::ExitStatus::Signal(s) => Some(s),
            hutch_proto::ExitStatus::Code(_) => None,
        },
    }
}

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_else(|_| "{\"type\":\"error\",\"message\":\"encoding\"}".into()).into())
}

/// `GET /v1/sandboxes/{id}/exec/ws`: checked before the upgrade, so a bad id or a stopped sandbox is an
/// ordinary JSON error response.
pub async fn ws(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let live = st.mgr.running(&who, &id)?;
    let upgrade = upgrade.map_err(|r| ApiError::new(axum::http::StatusCode::BAD_REQUEST, format!("{} (this endpoint speaks WebSocket)", r.body_text())))?;
    Ok(upgrade.max_message_size(WS_MESSAGE_MAX).on_upgrade(move |socket| ws_session(socket, live)).into_response())
}

async fn ws_session(socket: WebSocket, live: Arc<Live>) {
    let (mut tx, mut rx) = socket.split();
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, rx.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<StreamExec>(&t).map_err(|e| format!("the first message must be a StreamExec JSON object: {e}")),
        Ok(Some(Ok(_))) => Err("the first message must be a text frame holding a StreamExec JSON object".to_string()),
        Ok(_) => return,
        Err(_) => Err(format!("no StreamExec message within {FIRST_MESSAGE_TIMEOUT:?}")),
    };
    let req = first.and_then(|s| {
        if s.stdin.is_some() {
            return Err("stdin is sent as binary frames on a WebSocket, not in the StreamExec".to_string());
        }
        check_exec(&s.argv, &s.env, s.cwd.as_deref(), true, s.tty).map_err(|e| e.message)
    });
    let req = match req {
        Ok(r) => r,
        Err(message) => {
            let _ = tx.send(text(&ServerMsg::Error { message })).await;
            let _ = tx.close().await;
            return;
        }
    };
    let handle = match live.client.exec(req).await {
        Ok(h) => h,
        Err(e) => {
            let _ = tx.send(text(&ServerMsg::Error { message: format!("sandbox {}: {}", live.id, hutch_sandbox::error_chain(&e)) })).await;
            let _ = tx.close().await;
            return;
        }
    };
    let mut input = handle.input;
    let mut events = handle.events;

    let inbound = async {
        while let Some(msg) = rx.next().await {
            let r = match msg {
                Ok(Message::Binary(b)) => input.send(ExecInput::Stdin(b.to_vec())).await,
                Ok(Message::Text(t)) => match serde_json::from_str::<ClientMsg>(&t) {
                    Ok(ClientMsg::StdinEof) => input.send(ExecInput::StdinEof).await,
                    Ok(ClientMsg::Signal { signal }) => input.send(ExecInput::Signal(signal)).await,
                    Ok(ClientMsg::Resize { rows, cols }) if rows > 0 && cols > 0 => {
                        input.send(ExecInput::Resize(hutch_proto::TtySize { rows, cols })).await
                    }
                    // A bad control message is dropped rather than ending a session the user may be typing in.
                    _ => Ok(()),
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
    };
    let outbound = async {
        loop {
            let msg = match events.next().await {
                Some(ExecEvent::Started { pid }) => text(&ServerMsg::Started { pid }),
                Some(ExecEvent::Stdout(b)) => Message::Binary(tagged(WS_STDOUT, &b).into()),
                Some(ExecEvent::Stderr(b)) => Message::Binary(tagged(WS_STDERR, &b).into()),
                Some(ExecEvent::Exited(st)) => {
                    let _ = tx.send(text(&exit_msg(st))).await;
                    break;
                }
                Some(ExecEvent::SpawnFailed { message, not_found }) => {
                    let _ = tx.send(text(&ServerMsg::Error { message: message.clone() })).await;
                    let _ = tx.send(text(&ServerMsg::Exit { exit_code: if not_found { 127 } else { 126 }, signal: None })).await;
                    break;
                }
                None => {
                    let _ = tx.send(text(&ServerMsg::Error { message: format!("sandbox {} stopped while the command ran", live.id) })).await;
                    break;
                }
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        let _ = tx.close().await;
    };
    // The session ends when the process exits (outbound) or the client leaves (inbound): dropping the exec's
    // stream then makes the agent kill what is left.
    tokio::select! {
        _ = outbound => {}
        _ = inbound => {}
    }
}

fn tagged(tag: u8, b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(b.len() + 1);
    v.push(tag);
    v.extend_from_slice(b);
    v
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec/stream", tag = "exec", security(("bearer" = [])),
    params(("id" = String, Path, description = "Sandbox id (12 lowercase hex digits)", pattern = "^[0-9a-f]{12}$")),
    request_body = StreamExec,
    responses(
        (status = 200, description = "Server-Sent Events, each a ServerMsg (event name = its type)", body = crate::model::SseEvent, content_type = "text/event-stream"),
        (status = 400, description = "Bad input, named", body = crate::model::ErrorBody),
        (status = 401, description = "No valid token", body = crate::model::ErrorBody),
        (status = 404, description = "No such sandbox for this token", body = crate::model::ErrorBody),
        (status = 409, description = "The sandbox is not running", body = crate::model::ErrorBody),
        (status = 413, description = "Body too large", body = crate::model::ErrorBody),
        (status = 415, description = "Not JSON", body = crate::model::ErrorBody),
    ))]
pub async fn sse(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    ApiJson(body): ApiJson<StreamExec>,
) -> Result<Response, ApiError> {
    let req = check_exec(&body.argv, &body.env, body.cwd.as_deref(), body.stdin.is_some(), body.tty)?;
    let live = st.mgr.running(&who, &id)?;
    let handle = live.client.exec(req).await.map_err(|e| ManagerError::Conflict(format!("sandbox {id} did not answer: {}", hutch_sandbox::error_chain(&e))))?;
    let (go, _sig, feeder) = crate::api::feed_input(handle.input, body.stdin.map(String::into_bytes));
    /// Aborts the stdin feeder (which holds the input half) when the event stream is dropped.
    struct Feeder(tokio::task::JoinHandle<()>);
    impl Drop for Feeder {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    struct St {
        events: ExecEvents,
        _feeder: Feeder,
        go: Option<tokio::sync::oneshot::Sender<()>>,
        queue: std::collections::VecDeque<ServerMsg>,
        done: bool,
        id: String,
    }
    let state = St { events: handle.events, _feeder: Feeder(feeder), go: Some(go), queue: Default::default(), done: false, id };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.queue.is_empty() {
            if s.done {
                return None;
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            match s.events.next().await {
                Some(ExecEvent::Started { pid }) => {
                    if let Some(g) = s.go.take() {
                        let _ = g.send(());
                    }
                    s.queue.push_back(ServerMsg::Started { pid });
                }
                Some(ExecEvent::Stdout(b)) => s.queue.push_back(ServerMsg::Stdout { data: b64.encode(b) }),
                Some(ExecEvent::Stderr(b)) => s.queue.push_back(ServerMsg::Stderr { data: b64.encode(b) }),
                Some(ExecEvent::Exited(st)) => {
                    s.done = true;
                    s.queue.push_back(exit_msg(st));
                }
                Some(ExecEvent::SpawnFailed { message, not_found }) => {
                    s.done = true;
                    s.queue.push_back(ServerMsg::Error { message });
                    s.queue.push_back(ServerMsg::Exit { exit_code: if not_found { 127 } else { 126 }, signal: None });
                }
                None => {
                    s.done = true;
                    s.queue.push_back(ServerMsg::Error { message: format!("sandbox {} stopped while the command ran", s.id) });
                }
            }
        }
        let msg = s.queue.pop_front()?;
        let name = match &msg {
            ServerMsg::Started { .. } => "started",
            ServerMsg::Stdout { .. } => "stdout",
            ServerMsg::Stderr { .. } => "stderr",
            ServerMsg::Exit { .. } => "exit",
            ServerMsg::Error { .. } => "error",
        };
        let ev = Event::default().event(name).data(serde_json::to_string(&msg).unwrap_or_default());
        Some((Ok::<Event, Infallible>(ev), s))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
