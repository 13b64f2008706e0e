//! A fake of the model APIs coding agents call, for tests that run the real Claude Code and Codex
//! CLIs in a VM: the Anthropic Messages API (`POST /v1/messages`) and the OpenAI Responses API
//! (`POST /v1/responses`), over HTTPS on 127.0.0.1 (port 0) with its own test CA and a
//! certificate for `api.anthropic.com` and `api.openai.com`. It answers a conversation that makes
//! the agent run one shell command through its tool and then gives a final text answer, and it
//! accepts only the real API key: a request with any other key gets the API's own 401. Every
//! request is recorded with what it was answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use crate::{io_err, TestNetError};

/// Names the fake's certificate is for.
pub const ANTHROPIC_HOST: &str = "api.anthropic.com";
pub const OPENAI_HOST: &str = "api.openai.com";

/// The id of the one tool call the fake makes; the tool result that answers it ends the turn.
pub const TOOL_USE_ID: &str = "toolu_hutch_test_01";
/// The same for the Responses API.
pub const CALL_ID: &str = "call_hutch_test_01";

/// Largest request body read (agents send their whole system prompt and tool list each time).
const MAX_BODY: usize = 16 << 20;
const MAX_CONNECTIONS: usize = 64;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the fake model does.
#[derive(Clone, Debug)]
pub struct Script {
    /// The only key accepted (`x-api-key`, or `authorization: Bearer`).
    pub api_key: String,
    /// The shell command the model asks the Bash tool to run.
    pub command: String,
    /// The final answer, after the command's result came back.
    pub final_text: String,
}

/// How the fake answered a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A request for anything but `/v1/messages` (a connectivity check, an unknown path).
    Other(StatusCode),
    /// 401: the request carried no key or a key other than the real one.
    Unauthorized,
    /// 400: not a Messages request the fake understands.
    BadRequest(String),
    /// The tool call that runs [`Script::command`]: Claude Code's Bash tool, or Codex's `exec`
    /// (JavaScript that calls its `exec_command` tool).
    ToolUse,
    /// [`Script::final_text`], after the tool result arrived.
    FinalText,
    /// A short text, for requests that offer no shell tool (titles, summaries).
    PlainText,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The key the request carried (x-api-key, else a Bearer token), if any.
    pub key: Option<String>,
    pub model: Option<String>,
    pub stream: bool,
    /// Names of the tools the request offered (Responses API: also those inside namespaces).
    pub tools: Vec<String>,
    /// The text of the result of the fake's tool call, when the request carried one.
    pub tool_result: Option<String>,
    pub answer: Answer,
}

/// The running fake. Dropping it stops the server and deletes its files.
pub struct FakeModelApi {
    addr: SocketAddr,
    ca_file: std::path::PathBuf,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for FakeModelApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeModelApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeModelApi {
    /// Starts the fake on a thread and runtime of its own.
    pub fn start(script: Script) -> Result<FakeModelApi, TestNetError> {
        let dir = tempfile::Builder::new()
            .prefix("hutch-model-api-")
            .tempdir()
            .map_err(io_err("cannot create a temporary directory"))?;
        let pki = crate::pki::TestPki::new(&[ANTHROPIC_HOST, OPENAI_HOST])?;
        let ca_file = dir.path().join("model-api-ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem)
            .map_err(io_err(format!("cannot write {}", ca_file.display())))?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hutch-model-api")
            .enable_all()
            .build()
            .map_err(io_err("cannot start the fake model API's runtime"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (script, log) = (Arc::new(script), calls.clone());
        // This server speaks HTTP/1.1 only.
        let mut h1_only = (*pki.server_config).clone();
        h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(h1_only));
        let thread = std::thread::Builder::new()
            .name("hutch-model-api".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::bind("127.0.0.1:0").await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(TestNetError::Io {
                                what: "cannot bind the fake model API".into(),
                                source: e,
                            }));
                            return;
                        }
                    };
                    let _ = ready_tx.send(
                        listener
                            .local_addr()
                            .map_err(io_err("fake model API address")),
                    );
                    tokio::select! {
                        _ = stop_rx => {}
                        () = serve(listener, acceptor, script, log) => {}
                    }
                });
            })
            .map_err(io_err("cannot start the fake model API's thread"))?;
        let addr = ready_rx.recv().map_err(|_| TestNetError::ServerThread)??;
        Ok(FakeModelApi {
            addr,
            ca_file,
            calls,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The CA its certificate chains to, as a PEM file (for `--upstream-ca`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// `https://api.anthropic.com:PORT`: Claude Code's `ANTHROPIC_BASE_URL`.
    pub fn anthropic_base_url(&self) -> String {
        format!("https://{ANTHROPIC_HOST}:{}", self.addr.port())
    }

    /// `https://api.openai.com:PORT/v1`: Codex's `openai_base_url`.
    pub fn openai_base_url(&self) -> String {
        format!("https://{OPENAI_HOST}:{}/v1", self.addr.port())
    }

    /// `hutch run` flags that allow `host` (one of the fake's names) on the fake's port, pin it
    /// to the fake and trust the fake's CA upstream.
    pub fn hutch_args(&self, host: &str) -> Vec<String> {
        let p = self.addr.port();
        vec![
            "--allow".into(),
            format!("{host}:{p}"),
            "--resolve".into(),
            format!("{host}:{p}:127.0.0.1"),
            "--upstream-ca".into(),
            self.ca_file.display().to_string(),
        ]
    }

    /// Every request so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FakeModelApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Call>>>,
) {
    crate::server::accept_loop(listener, MAX_CONNECTIONS, move |tcp| {
        let (acceptor, script, log) = (acceptor.clone(), script.clone(), log.clone());
        async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = service_fn(move |req: Request<Incoming>| {
                let (script, log) = (script.clone(), log.clone());
                async move { Ok::<_, Infallible>(handle(&script, &log, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        }
    })
    .await;
}

async fn handle(
    script: &Script,
    log: &Mutex<Vec<Call>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                &format!("cannot read the body: {e}"),
            )
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let (call, resp) = respond(script, &parts.method, &path, &parts.headers, &body);
    log.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    resp
}

/// The answer to one request, and its record; no I/O, so tests call it directly.
pub(crate) fn respond(
    script: &Script,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (Call, Response<Full<Bytes>>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let key = header("x-api-key")
        .or_else(|| header("authorization").and_then(|a| a.strip_prefix("Bearer ")))
        .map(str::to_string);
    let mut call = Call {
        method: method.to_string(),
        path: path.to_string(),
        key: key.clone(),
        model: None,
        stream: false,
        tools: Vec::new(),
        tool_result: None,
        answer: Answer::Other(StatusCode::NOT_FOUND),
    };
    let route = path.split('?').next().unwrap_or(path);
    let api = match route {
        "/v1/messages" if method == Method::POST => Api::Messages,
        "/v1/responses" if method == Method::POST => Api::Responses,
        _ => {
            // Agents may check that the API answers before they start; any status will do.
            let check = route == "/" && (method == Method::GET || method == Method::HEAD);
            let status = if check {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            call.answer = Answer::Other(status);
            return (
                call,
                error(
                    status,
                    "not_found_error",
                    "the fake model API serves POST /v1/messages and /v1/responses",
                ),
            );
        }
    };
    if key.as_deref() != Some(script.api_key.as_str()) {
        call.answer = Answer::Unauthorized;
        return (
            call,
            error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            ),
        );
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            call.answer = Answer::BadRequest("the body is not a JSON object".into());
            return (
                call,
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "the body is not a JSON object",
                ),
            );
        }
    };
    call.model = req["model"].as_str().map(str::to_string);
    call.stream = req["stream"].as_bool().unwrap_or(false);
    match api {
        Api::Messages => messages(script, &req, call),
        Api::Responses => responses(script, &req, call),
    }
}

enum Api {
    Messages,
    Responses,
}

/// Anthropic Messages: a Bash tool call, then the final text once its result is back.
fn messages(script: &Script, req: &Value, mut call: Call) -> (Call, Response<Full<Bytes>>) {
    call.tools = req["tools"].as_array().map_or_else(Vec::new, |t| {
        t.iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect()
    });
    let Some(messages) = req["messages"].as_array().filter(|m| !m.is_empty()) else {
        call.answer = Answer::BadRequest("no messages".into());
        return (
            call,
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "messages: at least one message is required",
            ),
        );
    };
    call.tool_result = messages.last().and_then(tool_result_text);
    let model = call.model.clone().unwrap_or_else(|| "claude-fake".into());
    let (blocks, stop_reason, answer) = if call.tool_result.is_some() {
        (
            vec![json!({"type": "text", "text": script.final_text})],
            "end_turn",
            Answer::FinalText,
        )
    } else if call.tools.iter().any(|t| t == "Bash") {
        let input =
            json!({"command": script.command, "description": "Run the command the test asked for"});
        (
            vec![json!({"type": "tool_use", "id": TOOL_USE_ID, "name": "Bash", "input": input})],
            "tool_use",
            Answer::ToolUse,
        )
    } else {
        (
            vec![json!({"type": "text", "text": "ok"})],
            "end_turn",
            Answer::PlainText,
        )
    };
    call.answer = answer;
    let resp = if call.stream {
        sse(&model, &blocks, stop_reason)
    } else {
        message(&model, &blocks, stop_reason)
    };
    (call, resp)
}

/// OpenAI Responses, the way Codex uses it: tools arrive as `tools` or, in code mode, inside an
/// `additional_tools` input item, grouped in namespaces. The command runs through the `exec`
/// tool (JavaScript in which Codex's other tools, `exec_command` among them, are functions of
/// `tools`), then the final text comes once its output is back.
fn responses(script: &Script, req: &Value, mut call: Call) -> (Call, Response<Full<Bytes>>) {
    let Some(input) = req["input"].as_array() else {
        call.answer = Answer::BadRequest("no input list".into());
        return (
            call,
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "input: a list of items is required",
            ),
        );
    };
    let mut tools = Vec::new();
    collect_tool_names(&req["tools"], &mut tools);
    for item in input.iter().filter(|i| i["type"] == "additional_tools") {
        collect_tool_names(&item["tools"], &mut tools);
    }
    call.tools = tools;
    call.tool_result = input
        .iter()
        .find(|i| {
            (i["type"] == "custom_tool_call_output" || i["type"] == "function_call_output")
                && i["call_id"] == CALL_ID
        })
        .map(|i| output_text(&i["output"]));
    let item = if call.tool_result.is_some() {
        call.answer = Answer::FinalText;
        json!({"type": "message", "id": "msg_hutch_test", "role": "assistant", "content": [{"type": "output_text", "text": script.final_text}]})
    } else if call.tools.iter().any(|t| t == "exec") {
        call.answer = Answer::ToolUse;
        let cmd = Value::String(script.command.clone());
        let code = format!(
            "const r = await tools.exec_command({{cmd: {cmd}}});\ntext(JSON.stringify(r));\n"
        );
        json!({"type": "custom_tool_call", "id": "ctc_hutch_test", "status": "completed", "call_id": CALL_ID, "name": "exec", "input": code})
    } else {
        call.answer = Answer::PlainText;
        json!({"type": "message", "id": "msg_hutch_test", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]})
    };
    let usage = json!({"input_tokens": 12, "input_tokens_details": null, "output_tokens": 8, "output_tokens_details": null, "total_tokens": 20});
    let events = [
        json!({"type": "response.created", "response": {"id": "resp_hutch_test"}}),
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        json!({"type": "response.completed", "response": {"id": "resp_hutch_test", "usage": usage}}),
    ];
    (
        call,
        with_type(
            StatusCode::OK,
            "text/event-stream",
            sse_events(&events).into_bytes(),
        ),
    )
}

/// Tool names in a Responses `tools` list, descending into namespaces.
fn collect_tool_names(tools: &Value, out: &mut Vec<String>) {
    for tool in tools.as_array().into_iter().flatten() {
        if tool["type"] == "namespace" {
            collect_tool_names(&tool["tools"], out);
        } else if let Some(name) = tool["name"].as_str() {
            out.push(name.to_string());
        }
    }
}

/// A tool output given as a string or as a list of text parts.
fn output_text(output: &Value) -> String {
    match output {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The text of a `tool_result` block for [`TOOL_USE_ID`] in `message` (content given as a string
/// or as text blocks).
fn tool_result_text(message: &Value) -> Option<String> {
    let blocks = message["content"].as_array()?;
    let result = blocks
        .iter()
        .find(|b| b["type"] == "tool_result" && b["tool_use_id"] == TOOL_USE_ID)?;
    Some(output_text(&result["content"]))
}

fn usage() -> Value {
    json!({"input_tokens": 12, "output_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
}

fn message_head(model: &str, content: Value, stop_reason: Value) -> Value {
    json!({
        "id": "msg_hutch_test",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": usage(),
    })
}

fn message(model: &str, blocks: &[Value], stop_reason: &str) -> Response<Full<Bytes>> {
    let body = message_head(model, Value::Array(blocks.to_vec()), json!(stop_reason));
    with_type(
        StatusCode::OK,
        "application/json",
        body.to_string().into_bytes(),
    )
}

/// The same message as server-sent events, the way the API streams it: each block opened,
/// filled by one delta and closed.
fn sse(model: &str, blocks: &[Value], stop_reason: &str) -> Response<Full<Bytes>> {
    let mut events = vec![
        json!({"type": "message_start", "message": message_head(model, json!([]), Value::Null)}),
    ];
    for (index, block) in blocks.iter().enumerate() {
        let (start, delta) = if block["type"] == "tool_use" {
            let start =
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}});
            (
                start,
                json!({"type": "input_json_delta", "partial_json": block["input"].to_string()}),
            )
        } else {
            (
                json!({"type": "text", "text": ""}),
                json!({"type": "text_delta", "text": block["text"]}),
            )
        };
        events.push(json!({"type": "content_block_start", "index": index, "content_block": start}));
        events.push(json!({"type": "content_block_delta", "index": index, "delta": delta}));
        events.push(json!({"type": "content_block_stop", "index": index}));
    }
    events.push(json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": 8}}));
    events.push(json!({"type": "message_stop"}));
    with_type(
        StatusCode::OK,
        "text/event-stream",
        sse_events(&events).into_bytes(),
    )
}

/// Server-sent events named after their `type`.
fn sse_events(events: &[Value]) -> String {
    let mut out = String::new();
    for e in events {
        let name = e["type"].as_str().unwrap_or("message");
        out.push_str(&format!("event: {name}\ndata: {e}\n\n"));
    }
    out
}

/// An error in the API's own shape.
fn error(status: StatusCode, kind: &str, text: &str) -> Response<Full<Bytes>> {
    let body = json!({"type": "error", "error": {"type": kind, "message": text}});
    with_type(status, "application/json", body.to_string().into_bytes())
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script() -> Script {
        Script {
            api_key: "sk-real".into(),
            command: "echo hi > /root/x".into(),
            final_text: "all done".into(),
        }
    }

    fn call(headers: &[(&str, &str)], path: &str, body: Value) -> (Call, StatusCode, String) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let (call, resp) = respond(
            &script(),
            &Method::POST,
            path,
            &h,
            body.to_string().as_bytes(),
        );
        let status = resp.status();
        let bytes = futures_body(resp);
        (call, status, bytes)
    }

    fn futures_body(resp: Response<Full<Bytes>>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes = rt
            .block_on(resp.into_body().collect())
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    fn ask(tools: &[&str], messages: Value, stream: bool) -> Value {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| json!({"name": t, "input_schema": {}}))
            .collect();
        json!({"model": "claude-x", "stream": stream, "tools": tools, "messages": messages})
    }

    #[test]
    fn only_the_real_key_is_served() {
        let body = ask(&["Bash"], json!([{"role": "user", "content": "hi"}]), false);
        for headers in [
            vec![],
            vec![("x-api-key", "placeholder")],
            vec![("authorization", "Bearer sk-realx")],
        ] {
            let (c, status, text) = call(&headers, "/v1/messages", body.clone());
            assert_eq!(
                (c.answer, status),
                (Answer::Unauthorized, StatusCode::UNAUTHORIZED)
            );
            assert!(text.contains("authentication_error"), "{text}");
        }
        let (c, status, _) = call(
            &[("authorization", "Bearer sk-real")],
            "/v1/messages?beta=true",
            body,
        );
        assert_eq!((c.answer, status), (Answer::ToolUse, StatusCode::OK));
        assert_eq!(c.key.as_deref(), Some("sk-real"));
    }

    #[test]
    fn a_turn_is_a_tool_call_then_the_final_text() {
        let key = [("x-api-key", "sk-real")];
        let (c, _, text) = call(
            &key,
            "/v1/messages",
            ask(
                &["Read", "Bash"],
                json!([{"role": "user", "content": "go"}]),
                false,
            ),
        );
        assert_eq!(c.answer, Answer::ToolUse);
        let msg: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(msg["stop_reason"], "tool_use");
        assert_eq!(msg["content"][0]["input"]["command"], "echo hi > /root/x");

        let messages = json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": TOOL_USE_ID, "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_USE_ID, "content": [{"type": "text", "text": "out"}]}]},
        ]);
        let (c, _, text) = call(&key, "/v1/messages", ask(&["Bash"], messages, true));
        assert_eq!(
            (c.answer, c.tool_result.as_deref()),
            (Answer::FinalText, Some("out"))
        );
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(text.contains(r#""text":"all done""#), "{text}");

        let (c, _, _) = call(
            &key,
            "/v1/messages",
            ask(&[], json!([{"role": "user", "content": "title?"}]), true),
        );
        assert_eq!(c.answer, Answer::PlainText);
    }

    #[test]
    fn tool_input_streams_as_one_json_delta() {
        let (_, _, text) = call(
            &[("x-api-key", "sk-real")],
            "/v1/messages",
            ask(&["Bash"], json!([{"role": "user", "content": "go"}]), true),
        );
        let delta = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str::<Value>(d).expect("json"))
            .find(|e| e["type"] == "content_block_delta")
            .expect("a delta");
        let input: Value = serde_json::from_str(
            delta["delta"]["partial_json"]
                .as_str()
                .expect("partial json"),
        )
        .expect("json");
        assert_eq!(input["command"], "echo hi > /root/x");
    }

    #[test]
    fn other_requests_are_answered_and_bad_ones_refused() {
        let (c, status, _) = call(&[], "/", json!({}));
        assert_eq!(
            (c.answer, status),
            (Answer::Other(StatusCode::NOT_FOUND), StatusCode::NOT_FOUND),
            "POST / is not a check"
        );
        let (c, _, _) = call(
            &[("x-api-key", "sk-real")],
            "/v1/messages",
            json!({"model": "m", "messages": []}),
        );
        assert!(matches!(c.answer, Answer::BadRequest(_)), "{:?}", c.answer);
        let (c, status, _) = call(&[("x-api-key", "sk-real")], "/v1/messages", json!([1, 2]));
        assert_eq!(
            (matches!(c.answer, Answer::BadRequest(_)), status),
            (true, StatusCode::BAD_REQUEST)
        );
    }

    fn codex_request(input_extra: Vec<Value>) -> Value {
        let tools = json!([{"type": "namespace", "name": "functions", "tools": [
            {"type": "custom", "name": "exec", "description": "... `await tools.exec_command(...)` ..."},
            {"type": "function", "name": "wait"},
            {"type": "namespace", "name": "clock", "tools": [{"type": "function", "name": "sleep"}]}
        ]}]);
        let mut input = vec![
            json!({"type": "additional_tools", "role": "developer", "tools": tools}),
            json!({"type": "message", "role": "user", "content": "go"}),
        ];
        input.extend(input_extra);
        json!({"model": "gpt-x", "stream": true, "input": input})
    }

    fn events(text: &str) -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).expect("json"))
            .collect()
    }

    #[test]
    fn codex_runs_the_command_through_exec_then_gets_the_final_text() {
        let key = [("authorization", "Bearer sk-real")];
        let (c, status, text) = call(&key, "/v1/responses", codex_request(vec![]));
        assert_eq!((c.answer, status), (Answer::ToolUse, StatusCode::OK));
        assert_eq!(
            c.tools,
            ["exec", "wait", "sleep"],
            "names inside namespaces count"
        );
        let evs = events(&text);
        let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let item = &evs[1]["item"];
        assert_eq!(
            (
                item["type"].as_str(),
                item["name"].as_str(),
                item["call_id"].as_str()
            ),
            (Some("custom_tool_call"), Some("exec"), Some(CALL_ID))
        );
        let code = item["input"].as_str().expect("code");
        assert!(
            code.contains(r#"tools.exec_command({cmd: "echo hi > /root/x"})"#),
            "{code}"
        );

        let output = json!({"type": "custom_tool_call_output", "call_id": CALL_ID, "output": [{"type": "input_text", "text": "Script completed"}, {"type": "input_text", "text": "{\"output\":\"wrote\\n\"}"}]});
        let (c, _, text) = call(&key, "/v1/responses", codex_request(vec![output]));
        assert_eq!(c.answer, Answer::FinalText);
        assert!(
            c.tool_result
                .as_deref()
                .is_some_and(|r| r.contains("wrote")),
            "{:?}",
            c.tool_result
        );
        assert_eq!(events(&text)[1]["item"]["content"][0]["text"], "all done");

        let (c, status, _) = call(
            &[("x-api-key", "sk-other")],
            "/v1/responses",
            codex_request(vec![]),
        );
        assert_eq!(
            (c.answer, status),
            (Answer::Unauthorized, StatusCode::UNAUTHORIZED)
        );
        let (c, _, _) = call(
            &key,
            "/v1/responses",
            json!({"model": "m", "input": [{"type": "message", "role": "user", "content": "hi"}]}),
        );
        assert_eq!(c.answer, Answer::PlainText, "no shell tool offered");
    }
}
