//! E2B's REST control plane over the daemon's [`crate::Manager`]: create (`POST /v2/sandboxes`, 201), list
//! (`GET /v2/sandboxes`, filtered by metadata and state, paged by the `x-next-token` header), get, kill, set
//! timeout, refresh and connect. Requests are parsed into typed values first; every error is E2B's
//! `{code, message}`. A sandbox another key owns does not exist for the caller (404).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{api_principal, percent_decode, rfc3339, E2bError, Shared, ENVD_VERSION, HOME, LABEL_PREFIX, TEMPLATE_LABEL};
use crate::auth::Principal;
use crate::manager::check_labels;
use crate::model::{CreateSandbox, SandboxInfo, SandboxState};
use crate::store::now_ms;

/// E2B's default lifetime when a create names none.
const DEFAULT_TIMEOUT_SECS: u64 = 300;
const MAX_PAGE: usize = 1000;

/// `NewSandbox` as the SDK sends it. Fields this layer does not act on are accepted when they ask for nothing
/// (false, empty) and refused by name when they ask for something it cannot give.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(default)]
    timeout: Option<i64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(default)]
    auto_resume: Option<Value>,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<super::egress::NetworkConfig>,
    #[serde(default)]
    secure: Option<bool>,
    #[serde(default)]
    mcp: Option<Value>,
    #[serde(default)]
    volume_mounts: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct TimeoutBody {
    timeout: i64,
}

#[derive(Debug, Deserialize)]
struct RefreshBody {
    #[serde(default)]
    duration: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct ConnectBody {
    #[serde(default)]
    timeout: Option<i64>,
    /// `false`: resume from disk only (a reboot). Not offered: a pause here always keeps memory.
    #[serde(default)]
    memory: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PauseBody {
    /// `false`: a filesystem-only pause. Not offered: a pause here always saves memory too.
    #[serde(default)]
    memory: Option<bool>,
    #[serde(default)]
    require_healthy_guest: Option<bool>,
}

/// A JSON object body into `T`, with E2B-shaped errors; an empty body is `{}` when `T` allows it.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes, empty_ok: bool) -> Result<T, E2bError> {
    let text: &[u8] = if body.iter().all(|b| b.is_ascii_whitespace()) {
        if !empty_ok {
            return Err(E2bError::bad("the request body is empty; send a JSON object"));
        }
        b"{}"
    } else {
        body
    };
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(E2bError::bad("the body must be a JSON object"));
    }
    serde_json::from_slice(text).map_err(|e| E2bError::bad(format!("bad request body: {e}")))
}

/// The `{id}` path segment, whatever bytes it holds: one that is not even UTF-8 names no sandbox either (E2B's
/// 404 in its JSON shape, not the router's text rejection).
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, E2bError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(IdPath(id)),
            Err(_) => Err(E2bError::not_found("no such sandbox (ids are 12 lowercase hex digits)")),
        }
    }
}

/// Sandbox ids are the daemon's: 12 lowercase hex digits. Anything else names no sandbox.
fn sandbox_id(id: &str) -> Result<&str, E2bError> {
    if id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(id)
    } else {
        let shown: String = id.chars().take(40).collect();
        Err(E2bError::not_found(format!("sandbox {shown:?} not found (ids are 12 lowercase hex digits)")))
    }
}

/// The Hutch image a template name means: E2B's default `base` (or `default`, or none) is the daemon's default
/// image; an image the daemon serves by its own name (`agents`), or an alias from `hutch serve --template`;
/// anything else is E2B's 404.
fn image_for(template: &str, served: &[String], aliases: &BTreeMap<String, String>) -> Result<Option<String>, E2bError> {
    let name = match template {
        "" | "base" | "default" => return Ok(None),
        t => aliases.get(t).map(String::as_str).unwrap_or(t),
    };
    if name == "default" {
        return Ok(None);
    }
    if served.iter().any(|s| s == name) {
        return Ok(Some(name.to_string()));
    }
    let shown: String = template.chars().take(64).collect();
    let mut known: Vec<String> = vec!["base".into()];
    known.extend(served.iter().filter(|s| *s != "default").cloned());
    known.extend(aliases.keys().cloned());
    Err(E2bError::not_found(format!(
        "template {shown:?} not found: this daemon serves {} (an admin adds images with `hutch serve --image NAME` and names with `--template ALIAS=IMAGE`)",
        known.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
    )))
}

fn metadata_of(info: &SandboxInfo) -> BTreeMap<String, String> {
    info.labels.iter().filter(|(k, _)| !k.starts_with(LABEL_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn template_of(info: &SandboxInfo) -> String {
    info.labels.get(TEMPLATE_LABEL).cloned().unwrap_or_else(|| "base".into())
}

/// The create/connect answer (`Sandbox` in E2B's API).
fn created_body(st: &Shared, info: &SandboxInfo) -> Value {
    json!({
        "templateID": template_of(info),
        "sandboxID": info.id,
        "clientID": "hutch",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": st.access_token(&info.id),
        "trafficAccessToken": st.traffic_token(&info.id),
        "domain": st.mgr.e2b_domain(),
    })
}

fn listed_body(info: &SandboxInfo) -> Value {
    json!({
        "templateID": template_of(info),
        "sandboxID": info.id,
        "clientID": "hutch",
        "startedAt": rfc3339(info.started_ms.unwrap_or(info.created_ms)),
        "endAt": rfc3339(info.expires_ms),
        "cpuCount": info.cpus,
        "memoryMB": info.memory_mib,
        "diskSizeMB": 0,
        "state": if info.state == SandboxState::Paused { "paused" } else { "running" },
        "envdVersion": ENVD_VERSION,
        "metadata": metadata_of(info),
    })
}

fn detail_body(st: &Shared, info: &SandboxInfo) -> Value {
    let mut v = listed_body(info);
    if let Some(o) = v.as_object_mut() {
        o.insert("envdAccessToken".into(), Value::String(st.access_token(&info.id)));
        o.insert("domain".into(), json!(st.mgr.e2b_domain()));
    }
    v
}

/// A sandbox the caller may see and that is alive; ended ones are gone, as in E2B.
fn live_info(st: &Shared, who: &Principal, id: &str) -> Result<SandboxInfo, E2bError> {
    let id = sandbox_id(id)?;
    let row = st.mgr.visible(who, id).map_err(|_| E2bError::not_found(format!("sandbox {id} not found")))?;
    let info = st.mgr.to_info(row)?;
    if info.state.ended() {
        return Err(E2bError::not_found(format!("sandbox {id} not found (it ended: {})", info.end_reason.clone().unwrap_or_default())));
    }
    Ok(info)
}

fn check_timeout(st: &Shared, t: i64, what: &str) -> Result<u64, E2bError> {
    let max = st.mgr.limits.max_ttl.as_secs();
    if t < 0 || t as u64 > max {
        return Err(E2bError::bad(format!("{what} must be 0 to {max} seconds (this daemon's --max-ttl), got {t}")));
    }
    Ok(t as u64)
}

pub async fn create(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<Response, E2bError> {
    let who = api_principal(&st, &headers)?;
    let req: NewSandbox = parse_body(&body, false)?;
    let image = image_for(&req.template_id, &st.mgr.image_names(), &st.mgr.template_aliases())?;
    if req.auto_pause == Some(true) || req.auto_resume.as_ref().is_some_and(|v| !v.is_null() && v != &json!(false) && v != &json!({})) {
        return Err(E2bError::bad("autoPause/autoResume are not supported by this daemon (pause and resume explicitly with pause() and connect()); leave them out"));
    }
    if req.mcp.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(E2bError::bad("mcp is not supported by this daemon; leave it out"));
    }
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(E2bError::bad("volumeMounts are not supported by this daemon; copy files in with sandbox.files.write"));
    }
    let _ = req.secure;
    let egress = super::egress::map(req.allow_internet_access, req.network.as_ref(), |name| {
        Ok(st.mgr.store.secret(name)?.map(|row| row.hosts))
    })?;
    let timeout = match req.timeout {
        Some(t) if t < 1 => return Err(E2bError::bad(format!("timeout must be at least 1 second, got {t}"))),
        Some(t) => check_timeout(&st, t, "timeout")?,
        None => DEFAULT_TIMEOUT_SECS.min(st.mgr.limits.max_ttl.as_secs()),
    };
    let metadata = req.metadata.unwrap_or_default();
    if let Some(k) = metadata.keys().find(|k| k.starts_with(LABEL_PREFIX)) {
        return Err(E2bError::bad(format!("metadata key {k:?} uses the reserved prefix {LABEL_PREFIX:?}; rename it")));
    }
    check_labels(&metadata).map_err(|e| E2bError::bad(format!("metadata: {}", e.trim_start_matches("labels: "))))?;
    let mut labels = metadata;
    let template = if req.template_id.is_empty() { "base".to_string() } else { req.template_id.clone() };
    labels.insert(TEMPLATE_LABEL.to_string(), template);
    if labels.len() > 32 {
        return Err(E2bError::bad("metadata: at most 31 entries"));
    }
    let spec = CreateSandbox {
        image,
        ttl_secs: Some(timeout),
        env: req.env_vars.unwrap_or_default(),
        policy: egress.policy,
        secrets: egress.secrets,
        secret_headers: egress.secret_headers,
        labels,
        ..CreateSandbox::default()
    };
    let info = st.mgr.create(&who, &spec).await?;
    // E2B's default user works in /home/user; the SDK's relative paths and commands start there.
    if let Ok(live) = st.mgr.running(&who, &info.id) {
        if let Err(e) = live.client.run(&["mkdir", "-p", HOME]).await {
            tracing::warn!(id = %info.id, "cannot create {HOME}: {}", hutch_sandbox::error_chain(&e));
        }
    }
    Ok((StatusCode::CREATED, Json(created_body(&st, &info))).into_response())
}

#[derive(Debug)]
struct ListQuery {
    metadata: BTreeMap<String, String>,
    want_running: bool,
    want_paused: bool,
    limit: usize,
    next: Option<(i64, String)>,
    template: Option<String>,
    descending: bool,
}

fn parse_list_query(q: Option<&str>) -> Result<ListQuery, E2bError> {
    let mut out = ListQuery { metadata: BTreeMap::new(), want_running: true, want_paused: true, limit: 100, next: None, template: None, descending: false };
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).map_err(E2bError::bad)?;
        let v = percent_decode(v).map_err(E2bError::bad)?;
        match k.as_str() {
            // The SDK sends `k=v&k2=v2` (form-encoded, each part percent-encoded) as one parameter.
            "metadata" => {
                for p in v.split('&').filter(|p| !p.is_empty()) {
                    let (mk, mv) = p.split_once('=').ok_or_else(|| E2bError::bad(format!("metadata filter {p:?} is not key=value")))?;
                    let mk = percent_decode(&percent_decode(mk).map_err(E2bError::bad)?).map_err(E2bError::bad)?;
                    let mv = percent_decode(&percent_decode(mv).map_err(E2bError::bad)?).map_err(E2bError::bad)?;
                    out.metadata.insert(mk, mv);
                }
            }
            "state" => {
                out.want_running = false;
                out.want_paused = false;
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    match s {
                        "running" => out.want_running = true,
                        "paused" => out.want_paused = true,
                        other => return Err(E2bError::bad(format!("state {other:?} is not running or paused"))),
                    }
                }
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| E2bError::bad(format!("limit {v:?} is not a number")))?;
                if n == 0 || n > MAX_PAGE {
                    return Err(E2bError::bad(format!("limit must be 1 to {MAX_PAGE}, got {n}")));
                }
                out.limit = n;
            }
            "nextToken" => {
                let parsed = v.split_once('_').and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_string())));
                match parsed {
                    Some((ms, id)) if sandbox_id(&id).is_ok() => out.next = Some((ms, id)),
                    _ => return Err(E2bError::bad("nextToken is not one this daemon issued; start the listing again without it")),
                }
            }
            "template" => out.template = Some(v),
            "order" => match v.as_str() {
                "asc" => out.descending = false,
                "desc" => out.descending = true,
                other => return Err(E2bError::bad(format!("order {other:?} is not asc or desc"))),
            },
            // Accepted and not applied: every listed sandbox started within this daemon's lifetime.
            "startedAfter" => {}
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(E2bError::bad(format!("unknown query parameter {shown:?}")));
            }
        }
    }
    Ok(out)
}

pub async fn list(State(st): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Result<Response, E2bError> {
    let who = api_principal(&st, &headers)?;
    let q = parse_list_query(q.as_deref())?;
    let mut all: Vec<SandboxInfo> = st
        .mgr
        .list(&who, None, &BTreeMap::new(), false)?
        .into_iter()
        .filter(|i| match i.state {
            SandboxState::Running | SandboxState::Creating => q.want_running,
            SandboxState::Paused => q.want_paused,
            _ => false,
        })
        .filter(|i| q.metadata.iter().all(|(k, v)| i.labels.get(k) == Some(v) && !k.starts_with(LABEL_PREFIX)))
        .filter(|i| q.template.as_ref().is_none_or(|t| &template_of(i) == t))
        .collect();
    all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    if q.descending {
        all.reverse();
    }
    let start = match &q.next {
        Some((ms, id)) => all
            .iter()
            .position(|i| if q.descending { (i.created_ms, &i.id) < (*ms, id) } else { (i.created_ms, &i.id) > (*ms, id) })
            .unwrap_or(all.len()),
        None => 0,
    };
    let page: Vec<&SandboxInfo> = all[start..].iter().take(q.limit).collect();
    let more = start + page.len() < all.len();
    let body: Vec<Value> = page.iter().map(|i| listed_body(i)).collect();
    let mut r = Json(body).into_response();
    if more {
        if let Some(last) = page.last() {
            if let Ok(v) = HeaderValue::from_str(&format!("{}_{}", last.created_ms, last.id)) {
                r.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(r)
}

/// The older `GET /sandboxes`: running sandboxes, filtered by metadata, unpaged.
pub async fn list_v1(st: State<Shared>, headers: HeaderMap, q: RawQuery) -> Result<Response, E2bError> {
    list(st, headers, q).await
}

pub async fn get_one(State(st): State<Shared>, headers: HeaderMap, IdPath(id): IdPath) -> Result<Json<Value>, E2bError> {
    let who = api_principal(&st, &headers)?;
    let info = live_info(&st, &who, &id)?;
    Ok(Json(detail_body(&st, &info)))
}

pub async fn kill(State(st): State<Shared>, headers: HeaderMap, IdPath(id): IdPath) -> Result<StatusCode, E2bError> {
    let who = api_principal(&st, &headers)?;
    let info = live_info(&st, &who, &id)?;
    st.mgr.delete(&who, &info.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn set_timeout(State(st): State<Shared>, headers: HeaderMap, IdPath(id): IdPath, body: Bytes) -> Result<StatusCode, E2bError> {
    let who = api_principal(&st, &headers)?;
    let req: TimeoutBody = parse_body(&body, false)?;
    let secs = check_timeout(&st, req.timeout, "timeout")?;
    let info = live_info(&st, &who, &id)?;
    // E2B's timeout is absolute: the sandbox ends `timeout` seconds from now, sooner or later than before.
    st.mgr.store.set_expiry(&info.id, now_ms() + secs as i64 * 1000)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn refresh(State(st): State<Shared>, headers: HeaderMap, IdPath(id): IdPath, body: Bytes) -> Result<StatusCode, E2bError> {
    let who = api_principal(&st, &headers)?;
    let req: RefreshBody = parse_body(&body, true)?;
    let secs = check_timeout(&st, req.duration.unwrap_or(60), "duration")?;
    let info = live_info(&st, &who, &id)?;
    let until = now_ms() + secs as i64 * 1000;
    if until > info.expires_ms {
        st.mgr.store.set_expiry(&info.id, until)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Connect to (E2B: or resume) a sandbox: a running one answers at once (200), its timeout lengthened (never
/// shortened) to the one asked for; a paused one is resumed from disk (201) and runs `timeout` seconds from now.
pub async fn connect(State(st): State<Shared>, headers: HeaderMap, IdPath(id): IdPath, body: Bytes) -> Result<Response, E2bError> {
    let who = api_principal(&st, &headers)?;
    let req: ConnectBody = parse_body(&body, true)?;
    let info = live_info(&st, &who, &id)?;
    let secs = req.timeout.map(|t| check_timeout(&st, t, "timeout")).transpose()?;
    if info.state == SandboxState::Paused {
        if req.memory == Some(false) {
            return Err(E2bError::bad("a resume from disk only (memory=false, on_resume=\"reboot\") is not offered: this daemon resumes paused sandboxes with their memory"));
        }
        let secs = secs.unwrap_or(DEFAULT_TIMEOUT_SECS.min(st.mgr.limits.max_ttl.as_secs()));
        let info = st.mgr.resume(&who, &info.id, Some(secs.max(1))).await?;
        return Ok((StatusCode::CREATED, Json(created_body(&st, &info))).into_response());
    }
    if let Some(secs) = secs {
        let until = now_ms() + secs as i64 * 1000;
        if until > info.expires_ms {
            st.mgr.store.set_expiry(&info.id, until)?;
        }
    }
    let info = st.mgr.info(&info.id)?;
    Ok((StatusCode::OK, Json(created_body(&st, &info))).into_response())
}

/// Pauses a running sandbox to disk (memory, devices and disk layer): 204; 409 when it is paused already.
pub async fn pause(State(st): State<Shared>, headers: HeaderMap, IdPath(id): IdPath, body: Bytes) -> Result<StatusCode, E2bError> {
    let who = api_principal(&st, &headers)?;
    let req: PauseBody = parse_body(&body, true)?;
    let info = live_info(&st, &who, &id)?;
    let _ = req.require_healthy_guest;
    if req.memory == Some(false) {
        return Err(E2bError::bad("a filesystem-only pause (memory=false) is not offered: this daemon pauses with memory (mode=\"full\")"));
    }
    match info.state {
        SandboxState::Paused => return Err(E2bError::new(StatusCode::CONFLICT, format!("sandbox {} is already paused", info.id))),
        SandboxState::Running => {}
        other => return Err(E2bError::new(StatusCode::CONFLICT, format!("sandbox {} is {}; only a running sandbox can be paused", info.id, other.as_str()))),
    }
    st.mgr.pause(&who, &info.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_parse_as_the_sdk_sends_them() {
        // Sandbox.list(query=SandboxQuery(metadata={"a b": "x=y"})) -> quote, then urlencode, then httpx.
        let q = parse_list_query(Some("metadata=a%2520b%3Dx%253Dy%26k%3Dv&state=running%2Cpaused&limit=2")).unwrap();
        assert_eq!(q.metadata.get("a b").map(String::as_str), Some("x=y"));
        assert_eq!(q.metadata.get("k").map(String::as_str), Some("v"));
        assert!(q.want_running);
        assert_eq!(q.limit, 2);
        assert!(!parse_list_query(Some("state=paused")).unwrap().want_running);
        assert!(parse_list_query(Some("state=zombie")).is_err());
        assert!(parse_list_query(Some("limit=0")).is_err());
        assert!(parse_list_query(Some("nextToken=zz")).is_err());
        assert!(parse_list_query(Some("bogus=1")).is_err());
    }

    #[test]
    fn templates_map_to_images() {
        let only_default = vec!["default".to_string()];
        let none = BTreeMap::new();
        assert_eq!(image_for("base", &only_default, &none).unwrap(), None);
        assert_eq!(image_for("", &only_default, &none).unwrap(), None);
        assert_eq!(image_for("nope", &only_default, &none).unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(image_for("agents", &only_default, &none).unwrap_err().status, StatusCode::NOT_FOUND);
        let both = vec!["default".to_string(), "agents".to_string()];
        let aliases: BTreeMap<String, String> = [("node".to_string(), "agents".to_string()), ("plain".to_string(), "default".to_string())].into();
        assert_eq!(image_for("agents", &both, &aliases).unwrap().as_deref(), Some("agents"));
        assert_eq!(image_for("node", &both, &aliases).unwrap().as_deref(), Some("agents"));
        assert_eq!(image_for("plain", &both, &aliases).unwrap(), None);
        let e = image_for("nope", &both, &aliases).unwrap_err();
        assert!(e.message.contains("\"node\"") && e.message.contains("\"agents\""), "{}", e.message);
    }
}
