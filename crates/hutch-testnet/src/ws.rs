//! `/ws/echo`: a WebSocket server (the RFC 6455 handshake here, frames by tungstenite). A text
//! message `headers` is answered with the upgrade request's headers as JSON (a host that reflects
//! what it was sent); `headers-split-N` with the same JSON in fragments of N bytes (a value split
//! across frames); anything else is echoed. The upgrade request is recorded like any request.

use futures::{SinkExt, StreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::body::{full, RespBody};
use crate::Seen;

fn bad(msg: &str) -> Response<RespBody> {
    let mut r = Response::new(full(format!("testnet: {msg}\n")));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}

pub(crate) fn echo(parts: &mut http::request::Parts, seen: &Seen) -> Response<RespBody> {
    let Some(key) = parts.headers.get("sec-websocket-key") else {
        return bad("/ws/echo wants a WebSocket opening handshake");
    };
    let Some(on) = parts.extensions.remove::<OnUpgrade>() else {
        return bad("this connection cannot switch protocols");
    };
    let accept = derive_accept_key(key.as_bytes());
    let reflected = serde_json::to_string(&seen.headers).unwrap_or_default();
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let sent = match msg {
                Message::Text(t) if t.as_str() == "headers" => ws.send(Message::text(reflected.clone())).await,
                Message::Text(t) if t.as_str().starts_with("headers-split-") => {
                    let n = t.as_str()["headers-split-".len()..].parse::<usize>().unwrap_or(7).max(1);
                    let pieces: Vec<&[u8]> = reflected.as_bytes().chunks(n).collect();
                    let mut r = Ok(());
                    for (i, p) in pieces.iter().enumerate() {
                        let op = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
                        let frame = Frame::message(bytes::Bytes::copy_from_slice(p), op, i + 1 == pieces.len());
                        r = ws.feed(Message::Frame(frame)).await;
                        if r.is_err() {
                            break;
                        }
                    }
                    match r {
                        Ok(()) => ws.flush().await,
                        e => e,
                    }
                }
                m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await,
                Message::Close(_) => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
