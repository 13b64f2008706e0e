//! E2B compatibility: the stock E2B SDK, pointed at `hutch serve` by `E2B_API_URL` and `E2B_SANDBOX_URL`,
//! drives Hutch sandboxes. [`control`] is E2B's REST control plane (`/v2/sandboxes`, `/sandboxes/{id}`...) over
//! the daemon's own [`Manager`]; [`envd`] is the in-sandbox daemon's protocol (Connect RPC with the JSON codec,
//! plus `/files`, `/health`, `/envs`), served by the host over the agent channel and routed by the
//! `E2b-Sandbox-Id` header. There is no second sandbox model: an E2B sandbox is a daemon sandbox whose E2B
//! facts (template name, metadata) live in reserved labels.

pub mod control;
pub mod egress;
pub mod envd;
pub mod openapi;
pub mod port;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::manager::{Manager, ManagerError};

/// The envd version the SDK is told: the feature gates up to it are implemented (commands with stdin and
/// `close_stdin`, the default user, recursive watch), the later ones (octet-stream and gzip uploads, file
/// metadata) are not, so the SDK uses the forms this layer serves.
pub const ENVD_VERSION: &str = "0.5.2";

/// Label keys under this prefix hold E2B facts and are never shown as metadata.
pub const LABEL_PREFIX: &str = "e2b.dev/";
pub const TEMPLATE_LABEL: &str = "e2b.dev/template";

/// The home of E2B's default user: the working directory of commands and the base of relative paths.
pub const HOME: &str = "/home/user";

pub struct E2bState {
    pub mgr: Arc<Manager>,
    /// Keys the per-sandbox envd access tokens. Random per daemon process: sandboxes do not outlive it.
    token_key: [u8; 32],
    pub(crate) procs: Mutex<HashMap<String, envd::Procs>>,
    /// Polling directory watchers (`watch_dir`), by watcher id.
    pub(crate) watchers: Mutex<HashMap<String, envd::Watcher>>,
}

pub type Shared = Arc<E2bState>;

impl E2bState {
    pub fn new(mgr: Arc<Manager>) -> Result<Shared, crate::DaemonError> {
        let mut token_key = [0u8; 32];
        getrandom::getrandom(&mut token_key).map_err(|e| crate::DaemonError::Internal(format!("no host randomness: {e}")))?;
        Ok(Arc::new(E2bState { mgr, token_key, procs: Mutex::new(HashMap::new()), watchers: Mutex::new(HashMap::new()) }))
    }

    /// The sandbox's envd access token: HMAC-SHA256 of its id under the process key, so nothing is stored and
    /// only the daemon can mint one.
    pub fn access_token(&self, sandbox_id: &str) -> String {
        hex::encode(hmac_sha256(&self.token_key, sandbox_id.as_bytes()))
    }

    /// The sandbox's traffic token (`get_host` forwarding without the API key): a MAC under the same key over
    /// another message, so it never equals the envd token.
    pub fn traffic_token(&self, sandbox_id: &str) -> String {
        hex::encode(hmac_sha256(&self.token_key, format!("traffic:{sandbox_id}").as_bytes()))
    }
}

fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new().chain_update(ipad).chain_update(msg).finalize();
    Sha256::new().chain_update(opad).chain_update(inner).finalize().into()
}

/// E2B's error shape, `{code, message}`, with the HTTP status as the code (the SDK reads `message`; a text body
/// would crash it instead of raising its exception).
#[derive(Debug)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError { status, message: message.into() }
    }

    pub fn bad(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "e2b: {}", self.message);
        }
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        r
    }
}

impl From<ManagerError> for E2bError {
    fn from(e: ManagerError) -> E2bError {
        E2bError::new(crate::api::manager_status(&e), hutch_sandbox::error_chain(&e))
    }
}

impl From<crate::DaemonError> for E2bError {
    fn from(e: crate::DaemonError) -> E2bError {
        ManagerError::from(e).into()
    }
}

/// The caller of a control-plane request: `X-API-Key` (E2B's header; an `e2b_…` key or a plain Hutch token),
/// else `Authorization: Bearer`.
pub fn api_principal(st: &E2bState, headers: &HeaderMap) -> Result<Principal, E2bError> {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|h| h.strip_prefix("Bearer ")))
        .map(str::trim);
    let Some(key) = key else {
        return Err(E2bError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: set E2B_API_KEY to a key from `hutch token create --name NAME --e2b`",
        ));
    };
    let token = crate::auth::from_e2b_key(key).unwrap_or_else(|| key.to_string());
    match crate::auth::authenticate(&st.mgr.store, &token)? {
        Some(p) => Ok(p),
        None => Err(E2bError::new(StatusCode::UNAUTHORIZED, "unknown or revoked API key")),
    }
}

/// The owner of sandbox `id` as a principal, if that token is still valid: envd requests carry only the
/// sandbox's access token, and act with its owner's rights (a revoked owner loses its sandboxes' envd too).
pub fn owner_principal(st: &E2bState, owner_token_id: &str) -> Result<Option<Principal>, E2bError> {
    let Some(row) = st.mgr.store.token(owner_token_id)? else { return Ok(None) };
    if row.revoked {
        return Ok(None);
    }
    Ok(Some(Principal { token_id: row.id, name: row.name, admin: row.admin, max_sandboxes: row.max_sandboxes }))
}

/// The E2B routes (control plane and envd, merged into the daemon's router: no path overlaps the native API)
/// and their state, for the Host-header layer ([`port::by_host`]) that wraps the whole daemon router.
pub fn router_and_state<S: Clone + Send + Sync + 'static>(mgr: Arc<Manager>) -> Result<(Router<S>, Shared), crate::DaemonError> {
    let st = E2bState::new(mgr)?;
    Ok((routes(st.clone()), st))
}

fn routes<S: Clone + Send + Sync + 'static>(st: Shared) -> Router<S> {
    Router::new()
        .route("/v2/sandboxes", post(control::create).get(control::list))
        .route("/sandboxes", post(control::create).get(control::list_v1))
        .route("/sandboxes/{id}", get(control::get_one).delete(control::kill))
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(control::refresh))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
        .route("/sandboxes/{id}/connect", post(control::connect))
        .route("/sandboxes/{id}/resume", post(control::connect))
        .route("/sandboxes/{id}/pause", post(control::pause))
        .route("/e2b/openapi.json", get(openapi::serve))
        .route("/v2/{*rest}", axum::routing::any(no_such_endpoint))
        .route("/health", get(envd::health))
        .route("/envs", get(envd::envs))
        .route("/files", get(envd::download).post(envd::upload).layer(DefaultBodyLimit::disable()))
        .route("/process.Process/{method}", post(envd::process_rpc))
        .route("/filesystem.Filesystem/{method}", post(envd::filesystem_rpc))
        .route("/e2b-port/{id}/{port}", axum::routing::any(port::forward).layer(DefaultBodyLimit::disable()))
        .route("/e2b-port/{id}/{port}/", axum::routing::any(port::forward).layer(DefaultBodyLimit::disable()))
        .route("/e2b-port/{id}/{port}/{*rest}", axum::routing::any(port::forward).layer(DefaultBodyLimit::disable()))
        .with_state(st)
}

async fn no_such_endpoint() -> E2bError {
    E2bError::not_found("no such endpoint in this daemon's E2B API")
}

/// Milliseconds since the epoch as RFC 3339 (UTC), as E2B's timestamps are.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Percent-decoding of one query component (`+` is a space), rejecting bad escapes and non-UTF-8.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => out.push(v),
                    None => return Err(format!("bad percent escape in {s:?}")),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_python_and_tokens_differ_per_sandbox() {
        // Expected value: python3 -c "import hmac,hashlib; print(hmac.new(b'k'*32, b'abc', hashlib.sha256).hexdigest())"
        let mac = hmac_sha256(&[b'k'; 32], b"abc");
        assert_eq!(hex::encode(mac), "af61b693912efc56e2e46f949719ea10a9e80d68f8dcfb84e26cac5330da3c74");
        let key = [7u8; 32];
        assert_ne!(hmac_sha256(&key, b"aaaaaaaaaaaa"), hmac_sha256(&key, b"aaaaaaaaaaab"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db+c").unwrap(), "a=b c");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
