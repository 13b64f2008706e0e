//! Routes of a host that launders what it is sent (threats.md class 17): it reflects a request
//! header back encoded (base64, URL-safe base64, hex, percent-encoding, JSON `\u` escapes, a
//! compressed body (gzip, deflate, br, zstd) that ignores `Accept-Encoding`; `/bomb/ENC/MIB`, a
//! small compressed body that decodes to MIB MiB), in the status line's reason phrase or as a
//! response header's name, and it stores request bodies and serves them back, also in `Range`
//! pieces, to any host name it answers for (so two allowed names can share the storage).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::{full, RespBody};
use crate::Seen;

/// Stored bodies, by key, shared by every name and port of the test net.
pub(crate) type Store = Arc<Mutex<HashMap<String, Bytes>>>;

/// Largest body `/store/KEY` keeps, and most keys.
const MAX_STORED: usize = 1 << 20;
const MAX_KEYS: usize = 1024;

fn text(status: StatusCode, msg: String) -> Response<RespBody> {
    let mut r = Response::new(full(msg));
    *r.status_mut() = status;
    r
}

/// `/reflect-enc/ENC/HEADER[?pad=N]`: the header's value with N bytes of `x` before it (so
/// every base64 alignment can be asked for), encoded as ENC.
pub(crate) async fn reflect_encoded(rest: &str, query: Option<&str>, seen: &Seen) -> Response<RespBody> {
    let Some((enc, name)) = rest.split_once('/') else {
        return text(StatusCode::BAD_REQUEST, "testnet: /reflect-enc/ENC/HEADER\n".into());
    };
    let pad = query
        .and_then(|q| q.strip_prefix("pad="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        .min(64);
    let mut raw = vec![b'x'; pad];
    raw.extend_from_slice(seen.header(&name.to_ascii_lowercase()).unwrap_or("").as_bytes());
    raw.extend_from_slice(b"-tail");
    let body: Vec<u8> = match enc {
        "base64" => base64::engine::general_purpose::STANDARD.encode(&raw).into_bytes(),
        "base64url" => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw).into_bytes(),
        "hex" => hex::encode(&raw).into_bytes(),
        "HEX" => hex::encode_upper(&raw).into_bytes(),
        "percent" => raw.iter().flat_map(|b| format!("%{b:02X}").into_bytes()).collect(),
        "json" => {
            let escaped: String = raw.iter().map(|b| format!("\\u{b:04x}")).collect();
            format!("{{\"echo\":\"{escaped}\"}}").into_bytes()
        }
        "gzip" | "deflate" | "br" | "zstd" => {
            // Sent compressed whatever the client accepts, as a careless server would.
            return match compress(enc, &raw, 1).await {
                Ok(z) => encoded(enc, z),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("testnet: {enc}: {e}\n")),
            };
        }
        _ => return text(StatusCode::BAD_REQUEST, format!("testnet: unknown encoding {enc:?}\n")),
    };
    Response::new(full(body))
}

fn encoded(enc: &str, body: Vec<u8>) -> Response<RespBody> {
    let mut r = Response::new(full(body));
    if let Ok(v) = HeaderValue::from_str(enc) {
        r.headers_mut().insert(header::CONTENT_ENCODING, v);
    }
    r
}

/// `data` repeated `times` times, compressed with `enc` (gzip, deflate (zlib), br or zstd).
async fn compress(enc: &str, data: &[u8], times: usize) -> std::io::Result<Vec<u8>> {
    use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZlibEncoder, ZstdEncoder};
    use tokio::io::{AsyncWrite, AsyncWriteExt};
    async fn run<W: AsyncWrite + Unpin>(mut w: W, data: &[u8], times: usize) -> std::io::Result<()> {
        for _ in 0..times {
            w.write_all(data).await?;
        }
        w.shutdown().await
    }
    let mut out = Vec::new();
    match enc {
        "gzip" => run(GzipEncoder::new(&mut out), data, times).await?,
        "deflate" => run(ZlibEncoder::new(&mut out), data, times).await?,
        "br" => run(BrotliEncoder::new(&mut out), data, times).await?,
        "zstd" => run(ZstdEncoder::new(&mut out), data, times).await?,
        _ => return Err(std::io::Error::other(format!("unknown encoding {enc:?}"))),
    }
    Ok(out)
}

/// `/bomb/ENC/MIB`: a small body in ENC that decodes to MIB MiB (at most 1024) of zeros.
pub(crate) async fn bomb(rest: &str) -> Response<RespBody> {
    let Some((enc, mib)) = rest.split_once('/') else {
        return text(StatusCode::BAD_REQUEST, "testnet: /bomb/ENC/MIB\n".into());
    };
    let Some(mib) = mib.parse::<usize>().ok().filter(|m| (1..=1024).contains(m)) else {
        return text(StatusCode::BAD_REQUEST, "testnet: MIB is 1 to 1024\n".into());
    };
    match compress(enc, &vec![0u8; 1 << 20], mib).await {
        Ok(z) => encoded(enc, z),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("testnet: {e}\n")),
    }
}

/// `/reflect-status/HEADER`: 200 with the header's value as the reason phrase.
pub(crate) fn reflect_status(name: &str, seen: &Seen) -> Response<RespBody> {
    let value = seen.header(&name.to_ascii_lowercase()).unwrap_or("").to_string();
    let mut r = text(StatusCode::OK, "see the status line\n".into());
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(value.into_bytes()) {
        r.extensions_mut().insert(reason);
    }
    r
}

/// `/reflect-name/HEADER`: a response header named after the header's value.
pub(crate) fn reflect_name(name: &str, seen: &Seen) -> Response<RespBody> {
    let value = seen.header(&name.to_ascii_lowercase()).unwrap_or("");
    let mut r = text(StatusCode::OK, "see the header names\n".into());
    if let Ok(n) = HeaderName::from_bytes(value.as_bytes()) {
        r.headers_mut().insert(n, HeaderValue::from_static("1"));
    }
    r
}

/// `/store/KEY`: PUT or POST keeps the body, GET serves it (honouring `Range: bytes=A-B`).
pub(crate) fn store(
    store: &Store,
    key: &str,
    method: &http::Method,
    range: Option<&str>,
    body: &Bytes,
) -> Response<RespBody> {
    let mut map = store.lock().unwrap_or_else(|p| p.into_inner());
    if method == http::Method::PUT || method == http::Method::POST {
        if body.len() > MAX_STORED || (map.len() >= MAX_KEYS && !map.contains_key(key)) {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "testnet: store full\n".into());
        }
        map.insert(key.to_string(), body.clone());
        return text(StatusCode::CREATED, format!("stored {} bytes\n", body.len()));
    }
    let Some(data) = map.get(key).cloned() else {
        return text(StatusCode::NOT_FOUND, format!("testnet: nothing stored at {key}\n"));
    };
    let parsed = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    match parsed {
        Some((a, b)) if a <= b && a < data.len() => {
            let end = b.min(data.len() - 1);
            let mut r = Response::new(full(data.slice(a..=end)));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{end}/{}", data.len())) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
        _ => Response::new(full(data)),
    }
}
