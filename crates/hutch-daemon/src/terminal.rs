//! Terminal sessions that outlive their clients (`hutch attach`): one command per sandbox on a pseudo-terminal,
//! started by a client and kept running by the daemon when that client goes away. Its output is read all the
//! time (a detached program never blocks on a full terminal), kept in a bounded ring for replay to the next
//! client that attaches, and sent live to every attached client. Every attached client may type; the window size
//! is the last attached client's.
//!
//! `GET /v1/sandboxes/{id}/terminal/ws`: the first text frame is a [`TerminalAttach`]; then binary frames are
//! keys, text frames are `ClientMsg::Resize`; the server sends `ServerMsg::Started`, the replay and live output
//! as binary frames tagged `WS_STDOUT`, and `ServerMsg::Exit` when the command ends. Closing the socket detaches.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{SinkExt, StreamExt};
use hutch_proto::{ExecEvent, ExecInput, ExecRequest};
use hutch_sandbox::client::AgentClient;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::api::{check_exec, ApiError, AppState, SandboxId};
use crate::auth::Principal;
use crate::manager::Live;
use crate::model::{ClientMsg, ServerMsg, StreamExec, TtySize, WS_STDOUT};

/// Output kept for a client that attaches later: several screens of a full-screen program, bounded because the
/// guest decides how much it writes.
pub const RING_MAX: usize = 256 << 10;
/// Output chunks an attached client may fall behind by before it is told to attach again. A chunk is at most
/// `hutch_proto::CHUNK` (64 KiB), so a session holds at most 8 MiB for its slowest client.
const CLIENT_LAG: usize = 128;
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
const WS_MESSAGE_MAX: usize = 1 << 20;

/// The first message on a terminal WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalAttach {
    /// Start this command on a new terminal (refused while one runs); absent: attach to the sandbox's terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StreamExec>,
    /// The client's window size; the terminal takes it on attach.
    pub size: TtySize,
    /// Start and leave at once, without output (`hutch attach --detach`).
    #[serde(default)]
    pub detach: bool,
}

#[derive(Clone, Debug)]
enum Out {
    Bytes(Arc<Vec<u8>>),
    Exit(i32),
}

/// One sandbox's terminal session.
pub struct Terminal {
    input: mpsc::Sender<ExecInput>,
    state: Mutex<Ring>,
    out: broadcast::Sender<Out>,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal").finish_non_exhaustive()
    }
}

struct Ring {
    bytes: VecDeque<u8>,
    exit: Option<i32>,
    pid: u32,
}

impl Terminal {
    async fn start(client: &AgentClient, req: ExecRequest) -> Result<Arc<Terminal>, hutch_sandbox::SandboxError> {
        let handle = client.exec(req).await?;
        let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(64);
        let (out, _) = broadcast::channel(CLIENT_LAG);
        let t = Arc::new(Terminal { input: in_tx, state: Mutex::new(Ring { bytes: VecDeque::new(), exit: None, pid: 0 }), out });
        let mut input = handle.input;
        tokio::spawn(async move {
            while let Some(m) = in_rx.recv().await {
                if input.send(m).await.is_err() {
                    return;
                }
            }
        });
        let mut events = handle.events;
        let pump = t.clone();
        tokio::spawn(async move {
            let code = loop {
                match events.next().await {
                    Some(ExecEvent::Started { pid }) => pump.ring().pid = pid,
                    Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => pump.push(b),
                    Some(ExecEvent::Exited(st)) => break st.as_shell_code(),
                    Some(ExecEvent::SpawnFailed { message, not_found }) => {
                        pump.push(format!("hutch: {message}\r\n").into_bytes());
                        break if not_found { 127 } else { 126 };
                    }
                    None => break 125,
                }
            };
            let mut r = pump.ring();
            r.exit = Some(code);
            let _ = pump.out.send(Out::Exit(code));
        });
        Ok(t)
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends to the ring and sends to the attached clients under one lock, so an attach sees every byte once.
    fn push(&self, b: Vec<u8>) {
        let mut r = self.ring();
        r.bytes.extend(&b);
        let excess = r.bytes.len().saturating_sub(RING_MAX);
        r.bytes.drain(..excess);
        let _ = self.out.send(Out::Bytes(Arc::new(b)));
    }

    pub fn running(&self) -> bool {
        self.ring().exit.is_none()
    }

    /// Waits for the command's exit code.
    pub async fn wait_exit(&self) -> i32 {
        let mut rx = self.out.subscribe();
        loop {
            if let Some(code) = self.ring().exit {
                return code;
            }
            match rx.recv().await {
                Ok(Out::Exit(code)) => return code,
                Ok(Out::Bytes(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return self.ring().exit.unwrap_or(125),
            }
        }
    }
}

/// `GET /v1/sandboxes/{id}/terminal/ws`.
pub async fn ws(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    SandboxId(id): SandboxId,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let live = st.mgr.running(&who, &id)?;
    let upgrade = upgrade.map_err(|r| ApiError::new(axum::http::StatusCode::BAD_REQUEST, format!("{} (this endpoint speaks WebSocket)", r.body_text())))?;
    let mgr = st.mgr.clone();
    Ok(upgrade.max_message_size(WS_MESSAGE_MAX).on_upgrade(move |socket| session(socket, live, mgr)).into_response())
}

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_else(|_| "{\"type\":\"error\",\"message\":\"encoding\"}".into()).into())
}

fn tagged(b: &[u8]) -> Message {
    let mut v = Vec::with_capacity(b.len() + 1);
    v.push(WS_STDOUT);
    v.extend_from_slice(b);
    Message::Binary(v.into())
}

/// The session a client asked for: a new one it starts, or the running one.
async fn open(live: &Arc<Live>, first: TerminalAttach, mgr: &Arc<crate::Manager>) -> Result<Arc<Terminal>, String> {
    let mut slot = live.terminal.lock().await;
    match first.start {
        Some(spec) => {
            if spec.stdin.is_some() {
                return Err("stdin is typed on the terminal, not given in the command".into());
            }
            if slot.as_ref().is_some_and(|t| t.running()) {
                return Err(format!("sandbox {} already has a running terminal session; `hutch attach {}` joins it", live.id, live.id));
            }
            // In a repository sandbox a command starts where the user was in the work tree, as with `hutch run`.
            let cwd = spec.cwd.clone().or_else(|| live.session.as_ref().and_then(|s| s.workdir()));
            let req = check_exec(&spec.argv, &spec.env, cwd.as_deref(), true, Some(first.size)).map_err(|e| e.message)?;
            let t = Terminal::start(&live.client, req).await.map_err(|e| format!("sandbox {}: {}", live.id, hutch_sandbox::error_chain(&e)))?;
            *slot = Some(t.clone());
            // A repository sandbox's change is collected when the command ends, attached clients or not.
            if live.session.is_some() {
                tokio::spawn(crate::repo::after_command(mgr.clone(), live.clone(), t.clone()));
            }
            Ok(t)
        }
        None => slot.clone().ok_or_else(|| format!("sandbox {} has no terminal session; `hutch attach {} -- CMD` starts one", live.id, live.id)),
    }
}

async fn session(socket: WebSocket, live: Arc<Live>, mgr: Arc<crate::Manager>) {
    let (mut tx, mut rx) = socket.split();
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, rx.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<TerminalAttach>(&t).map_err(|e| format!("the first message must be a TerminalAttach JSON object: {e}")),
        Ok(Some(Ok(_))) => Err("the first message must be a text frame holding a TerminalAttach JSON object".to_string()),
        Ok(_) => return,
        Err(_) => Err(format!("no TerminalAttach message within {FIRST_MESSAGE_TIMEOUT:?}")),
    };
    let first = first.and_then(|f| {
        if f.size.rows == 0 || f.size.cols == 0 || f.size.rows > 1000 || f.size.cols > 1000 {
            return Err("size: rows and cols must be 1 to 1000".to_string());
        }
        Ok(f)
    });
    let (size, detach) = first.as_ref().map(|f| (f.size, f.detach)).unwrap_or((TtySize { rows: 24, cols: 80 }, false));
    let term = match first {
        Ok(f) => open(&live, f, &mgr).await,
        Err(e) => Err(e),
    };
    let term = match term {
        Ok(t) => t,
        Err(message) => {
            let _ = tx.send(text(&ServerMsg::Error { message })).await;
            let _ = tx.close().await;
            return;
        }
    };
    let _ = term.input.send(ExecInput::Resize(hutch_proto::TtySize { rows: size.rows, cols: size.cols })).await;
    let (replay, exit, pid, mut out) = {
        let r = term.ring();
        (r.bytes.iter().copied().collect::<Vec<u8>>(), r.exit, r.pid, term.out.subscribe())
    };
    if tx.send(text(&ServerMsg::Started { pid })).await.is_err() || detach {
        let _ = tx.close().await;
        return;
    }
    if !replay.is_empty() && tx.send(tagged(&replay)).await.is_err() {
        return;
    }
    if let Some(code) = exit {
        let _ = tx.send(text(&ServerMsg::Exit { exit_code: code, signal: None })).await;
        let _ = tx.close().await;
        return;
    }
    let input = term.input.clone();
    let inbound = async {
        while let Some(msg) = rx.next().await {
            let m = match msg {
                Ok(Message::Binary(b)) => ExecInput::Stdin(b.to_vec()),
                Ok(Message::Text(t)) => match serde_json::from_str::<ClientMsg>(&t) {
                    Ok(ClientMsg::Resize { rows, cols }) if (1..=1000).contains(&rows) && (1..=1000).contains(&cols) => {
                        ExecInput::Resize(hutch_proto::TtySize { rows, cols })
                    }
                    // A terminal's end of input is the user's ^D; signals come from its keys. Anything else is
                    // dropped rather than ending a session others may be typing in.
                    _ => continue,
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            if input.send(m).await.is_err() {
                break;
            }
        }
    };
    let outbound = async {
        loop {
            let msg = match out.recv().await {
                Ok(Out::Bytes(b)) => tagged(&b),
                Ok(Out::Exit(code)) => {
                    let _ = tx.send(text(&ServerMsg::Exit { exit_code: code, signal: None })).await;
                    break;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let message = "this client fell behind the terminal's output; attach again to catch up".to_string();
                    let _ = tx.send(text(&ServerMsg::Error { message })).await;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        let _ = tx.close().await;
    };
    // Leaving (the socket closes) detaches this client; the session goes on.
    tokio::select! {
        _ = outbound => {}
        _ = inbound => {}
    }
}
