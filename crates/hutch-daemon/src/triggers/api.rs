//! Run records over the API (admin tokens only: runs belong to the host's owner): `GET /v1/runs`,
//! `GET /v1/runs/{id}`, `GET /v1/runs/{id}/logs` (`?follow=true` streams until the run ends),
//! `POST /v1/runs/{id}/cancel`, `POST /v1/runs/{id}/retry`, `GET /v1/triggers`; and the webhook endpoint
//! `POST /hooks/{trigger}` (authenticated by its signature alone).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::OpenApi;

use super::store::RunRow;
use super::Triggers;
use crate::api::{ApiError, ApiQuery, AppState};
use crate::auth::Principal;
use crate::model::ErrorBody;

#[derive(Serialize, utoipa::ToSchema)]
pub struct RunList {
    pub runs: Vec<RunRow>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TriggerInfo {
    pub name: String,
    /// github, generic or schedule.
    pub source: String,
    /// The cron expression (UTC) of a schedule.
    pub schedule: Option<String>,
    /// The webhook's URL path.
    pub hook: Option<String>,
    pub max_running: usize,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TriggerList {
    pub triggers: Vec<TriggerInfo>,
    pub max_running: usize,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct RunsQuery {
    /// queued, running, succeeded, failed, cancelled or timed_out.
    pub state: Option<String>,
    pub trigger: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<u32>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogsQuery {
    /// Keep the response open and send output as it comes, until the run ends.
    #[serde(default)]
    pub follow: bool,
}

/// The routes that need a token (merged under the API's authentication).
pub fn authed_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/logs", get(run_logs))
        .route("/v1/runs/{id}/egress", get(run_egress))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/retry", post(retry_run))
        .route("/v1/triggers", get(list_triggers))
}

/// The webhook route (no token: the signature is checked by the handler).
pub fn hook_routes() -> Router<AppState> {
    Router::new().route("/hooks/{trigger}", post(super::intake::hook))
}

fn triggers(st: &AppState, who: &Principal) -> Result<Arc<Triggers>, ApiError> {
    if !who.admin {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "runs belong to the host's owner: use an admin token (`hutch token create --admin`)"));
    }
    st.triggers.clone().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this daemon has no triggers (start it with `hutch serve --triggers FILE`)"))
}

fn run_of(tr: &Triggers, id: &str) -> Result<RunRow, ApiError> {
    tr.mgr.store.run(id)?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {}", hutch_text::escape(id))))
}

#[utoipa::path(get, path = "/v1/runs", tag = "runs", security(("bearer" = [])), params(RunsQuery),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 200, description = "Runs, newest first", body = RunList),
    ))]
async fn list_runs(State(st): State<AppState>, Extension(who): Extension<Principal>, ApiQuery(q): ApiQuery<RunsQuery>) -> Result<Json<RunList>, ApiError> {
    let tr = triggers(&st, &who)?;
    let runs = tr.mgr.store.runs(q.state.as_deref(), q.trigger.as_deref(), q.limit.unwrap_or(100).min(1000))?;
    Ok(Json(RunList { runs }))
}

#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 200, description = "The run: state, reason, timings, sandbox, branch and pull request", body = RunRow),
    ))]
async fn get_run(State(st): State<AppState>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Result<Json<RunRow>, ApiError> {
    let tr = triggers(&st, &who)?;
    Ok(Json(run_of(&tr, &id)?))
}

#[utoipa::path(get, path = "/v1/runs/{id}/logs", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id"), LogsQuery),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 200, description = "The run's output (setup and command, as the VM wrote it: not escaped)", body = String, content_type = "application/octet-stream"),
    ))]
async fn run_logs(State(st): State<AppState>, Extension(who): Extension<Principal>, Path(id): Path<String>, ApiQuery(q): ApiQuery<LogsQuery>) -> Result<Response, ApiError> {
    let tr = triggers(&st, &who)?;
    let run = run_of(&tr, &id)?;
    let path = tr.log_path(&run.id);
    let headers = [(header::CONTENT_TYPE, "application/octet-stream")];
    if !q.follow {
        let bytes = tokio::fs::read(&path).await.unwrap_or_default();
        return Ok((headers, bytes).into_response());
    }
    // Follow: read what is there, then poll for more until the run has ended and everything was sent.
    struct F {
        tr: Arc<Triggers>,
        id: String,
        path: std::path::PathBuf,
        at: u64,
        done: bool,
    }
    let f = F { tr, id: run.id.clone(), path, at: 0, done: false };
    let stream = futures::stream::unfold(f, |mut f| async move {
        loop {
            if f.done {
                return None;
            }
            // A run that cannot be read any more has nothing more to send.
            let ended = !matches!(f.tr.mgr.store.run(&f.id), Ok(Some(r)) if !r.ended());
            let mut chunk = Vec::new();
            if let Ok(mut file) = tokio::fs::File::open(&f.path).await {
                if file.seek(std::io::SeekFrom::Start(f.at)).await.is_ok() {
                    let _ = (&mut file).take(256 << 10).read_to_end(&mut chunk).await;
                }
            }
            if !chunk.is_empty() {
                f.at += chunk.len() as u64;
                return Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk)), f));
            }
            if ended {
                f.done = true;
                continue;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok((headers, Body::from_stream(stream)).into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RunEgress {
    /// The gateway's audit records of the run's VM (setup phase and agent phase), oldest first.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<serde_json::Value>,
}

#[utoipa::path(get, path = "/v1/runs/{id}/egress", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 200, description = "The run's egress audit", body = RunEgress),
    ))]
async fn run_egress(State(st): State<AppState>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Result<Json<RunEgress>, ApiError> {
    let tr = triggers(&st, &who)?;
    let run = run_of(&tr, &id)?;
    let records = tr.mgr.store.audit(&run.id, 100_000)?.into_iter().filter_map(|r| serde_json::from_str(&r).ok()).collect();
    Ok(Json(RunEgress { records }))
}

#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 200, description = "Cancelled (a running run's VM is destroyed)", body = RunRow),
        (status = 409, description = "The run already ended", body = ErrorBody),
    ))]
async fn cancel_run(State(st): State<AppState>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Result<Json<RunRow>, ApiError> {
    let tr = triggers(&st, &who)?;
    let run = run_of(&tr, &id)?;
    if !tr.cancel(&run.id, &format!("cancelled by token {}", who.name))? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("run {} already ended ({})", run.id, run.state)));
    }
    for _ in 0..600 {
        let r = run_of(&tr, &id)?;
        if r.ended() {
            return Ok(Json(r));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Json(run_of(&tr, &id)?))
}

#[utoipa::path(post, path = "/v1/runs/{id}/retry", tag = "runs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 202, description = "A new run of the same event, queued", body = RunRow),
        (status = 409, description = "The run has not ended", body = ErrorBody),
    ))]
async fn retry_run(State(st): State<AppState>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Result<(StatusCode, Json<RunRow>), ApiError> {
    let tr = triggers(&st, &who)?;
    let old = run_of(&tr, &id)?;
    if !old.ended() {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("run {} is {}; retry it once it ended", old.id, old.state)));
    }
    let mut row = RunRow::new(super::new_run_id(), &old.trigger, "retry", &old.event, None, old.plan.clone(), old.payload.clone(), old.concurrency_key.clone());
    row.retry_of = Some(old.id.clone());
    tr.mgr.store.insert_run(&row)?;
    tr.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(row)))
}

#[utoipa::path(get, path = "/v1/triggers", tag = "runs", security(("bearer" = [])),
    responses(
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such run, or no triggers on this daemon", body = ErrorBody),
        (status = 200, description = "The triggers this daemon serves", body = TriggerList),
    ))]
async fn list_triggers(State(st): State<AppState>, Extension(who): Extension<Principal>) -> Result<Json<TriggerList>, ApiError> {
    let tr = triggers(&st, &who)?;
    let set = tr.set();
    let triggers = set
        .triggers
        .values()
        .map(|t| TriggerInfo {
            name: t.name.clone(),
            source: t.source.kind().into(),
            schedule: match &t.source {
                super::config::Source::Schedule { expr, .. } => Some(expr.clone()),
                _ => None,
            },
            hook: t.source.hmac_secret().map(|_| format!("/hooks/{}", t.name)),
            max_running: t.max_running,
        })
        .collect();
    Ok(Json(TriggerList { triggers, max_running: set.max_running }))
}

#[derive(OpenApi)]
#[openapi(
    paths(list_runs, get_run, run_logs, run_egress, cancel_run, retry_run, list_triggers, hook_doc),
    components(schemas(RunRow, RunList, RunEgress, TriggerInfo, TriggerList))
)]
pub struct RunsDoc;

/// A webhook delivery: `X-Hub-Signature-256: sha256=HMAC-SHA256(secret, raw body)`; GitHub sources also send
/// `X-GitHub-Event` and `X-GitHub-Delivery`, generic ones may send `X-Hutch-Delivery`.
#[utoipa::path(post, path = "/hooks/{trigger}", tag = "runs",
    params(("trigger" = String, Path, description = "The trigger's name in the triggers file")),
    request_body(content = String, content_type = "application/json", description = "The event, as the sender signed it"),
    responses(
        (status = 202, description = "A run was queued: {\"run\": ID}"),
        (status = 200, description = "Ignored by the filters ({\"ignored\": why}), a repeated delivery ({\"duplicate\": true}) or a ping"),
        (status = 400, description = "Signed, but malformed", body = ErrorBody),
        (status = 401, description = "Missing or wrong signature", body = ErrorBody),
        (status = 404, description = "No such webhook trigger", body = ErrorBody),
        (status = 413, description = "Larger than the trigger's max_body_kib", body = ErrorBody),
        (status = 429, description = "Over the trigger's per_minute", body = ErrorBody),
        (status = 500, description = "The database failed", body = ErrorBody),
        (status = 503, description = "The trigger's secret is not in the daemon's store", body = ErrorBody),
    ))]
#[allow(dead_code)]
fn hook_doc() {}
