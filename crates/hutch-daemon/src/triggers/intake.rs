//! `POST /hooks/{trigger}`: no bearer token; the HMAC signature over the raw body is the only authentication.
//! Order: rate limit, size cap (413), signature (401, before a byte is parsed), delivery id (a repeat answers
//! what the first did), JSON, filters, then the run's row written to the database before the 202.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::Digest;

use super::config::{OnConflict, Source};
use super::event::{decide, signature_ok, Decision};
use super::store::{Inserted, RunRow};
use super::Triggers;
use crate::api::AppState;

fn answer(status: StatusCode, v: serde_json::Value) -> Response {
    (status, Json(v)).into_response()
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    answer(status, json!({ "error": msg.into() }))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A delivery id as a sender gives it: 1-128 visible ASCII characters.
fn delivery_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn hook(State(st): State<AppState>, Path(name): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let Some(tr) = st.triggers.clone() else {
        return error(StatusCode::NOT_FOUND, "this daemon has no triggers (start it with `hutch serve --triggers FILE`)");
    };
    let r = receive(&tr, &name, &headers, body).await;
    tr.mgr.metrics.webhook(r.1);
    r.0
}

async fn receive(tr: &Arc<Triggers>, name: &str, headers: &HeaderMap, body: Body) -> (Response, &'static str) {
    let set = tr.set();
    let Some(t) = set.triggers.get(name).filter(|t| t.source.hmac_secret().is_some()) else {
        return (error(StatusCode::NOT_FOUND, "no webhook trigger of that name"), "unknown_trigger");
    };
    if !tr.rate_ok(&t.name, t.per_minute) {
        tracing::warn!(trigger = %t.name, "webhook rate limit reached ({} a minute); delivery refused", t.per_minute);
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, format!("more than {} deliveries a minute for this trigger; retry later", t.per_minute));
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("60"));
        return (r, "rate_limited");
    }
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than this trigger's limit of {} KiB", t.max_body >> 10));
    if header(headers, "content-length").and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > t.max_body as u64) {
        return (too_large(), "too_large");
    }
    let raw = match axum::body::to_bytes(body, t.max_body).await {
        Ok(b) => b,
        Err(e) => {
            let big = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if big || e.to_string().contains("length limit") {
                return (too_large(), "too_large");
            }
            return (error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")), "bad_body");
        }
    };
    let secret = t.source.hmac_secret().unwrap_or_default();
    let key = match tr.mgr.reveal_secret(secret) {
        Ok(Some(k)) => k,
        Ok(None) => {
            tracing::error!(trigger = %t.name, "the webhook secret {secret} is not in the daemon's store; every delivery is refused (`hutch secret set {secret}`)");
            return (error(StatusCode::SERVICE_UNAVAILABLE, "this trigger's secret is not configured on the daemon"), "no_secret");
        }
        Err(e) => return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the trigger's secret: {e}")), "error"),
    };
    if !signature_ok(key.as_bytes(), &raw, header(headers, "x-hub-signature-256")) {
        tracing::warn!(trigger = %t.name, "webhook with a missing or wrong X-Hub-Signature-256 refused");
        return (error(StatusCode::UNAUTHORIZED, "missing or wrong X-Hub-Signature-256 (HMAC-SHA256 of the raw body with the trigger's secret)"), "bad_signature");
    }
    drop(key);
    // Verified: from here on the sender is who the secret says.
    let github = matches!(t.source, Source::GitHub { .. });
    let (event, delivery) = if github {
        let Some(ev) = header(headers, "x-github-event").filter(|e| !e.is_empty() && e.len() <= 64 && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) else {
            return (error(StatusCode::BAD_REQUEST, "missing or malformed X-GitHub-Event"), "bad_request");
        };
        let Some(d) = header(headers, "x-github-delivery").filter(|d| delivery_ok(d)) else {
            return (error(StatusCode::BAD_REQUEST, "missing or malformed X-GitHub-Delivery"), "bad_request");
        };
        (ev.to_string(), d.to_string())
    } else {
        let d = match header(headers, "x-hutch-delivery") {
            Some(d) if delivery_ok(d) => d.to_string(),
            Some(_) => return (error(StatusCode::BAD_REQUEST, "malformed X-Hutch-Delivery (1-128 visible ASCII characters)"), "bad_request"),
            None => format!("sha256:{}", hex::encode(sha2::Sha256::digest(&raw))),
        };
        ("generic".to_string(), d)
    };
    if event == "ping" {
        return (answer(StatusCode::OK, json!({ "pong": true })), "ping");
    }
    let payload: serde_json::Value = match serde_json::from_slice(&raw) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        Ok(_) => return (error(StatusCode::BAD_REQUEST, "the body must be a JSON object"), "bad_request"),
        Err(e) => return (error(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")), "bad_request"),
    };
    let store = &tr.mgr.store;
    match decide(t, &event, &payload) {
        Decision::Skip(why) => {
            tracing::info!(trigger = %t.name, delivery = %hutch_text::escape(&delivery), "delivery ignored: {why}");
            if let Err(e) = store.insert_delivery(&t.name, &delivery, None) {
                return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record the delivery: {e}")), "error");
            }
            (answer(StatusCode::OK, json!({ "ignored": why })), "ignored")
        }
        Decision::Run(plan) => {
            let id = super::new_run_id();
            let plan_json = match serde_json::to_string(&plan) {
                Ok(p) => p,
                Err(e) => return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("encode the plan: {e}")), "error"),
            };
            let row = RunRow::new(id.clone(), &t.name, "webhook", &event, Some(delivery.clone()), plan_json, raw.to_vec(), plan.concurrency_key.clone());
            match store.insert_delivery(&t.name, &delivery, Some(&row)) {
                Ok(Inserted::New) => {}
                Ok(Inserted::Duplicate(run)) => {
                    tracing::info!(trigger = %t.name, delivery = %hutch_text::escape(&delivery), "duplicate delivery; nothing new started");
                    return (answer(StatusCode::OK, json!({ "duplicate": true, "run": run })), "duplicate");
                }
                Err(e) => return (error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot record the run: {e}")), "error"),
            }
            tracing::info!(trigger = %t.name, run = %id, delivery = %hutch_text::escape(&delivery), "run queued");
            tr.supersede(t, &row);
            tr.wake.notify_one();
            (answer(StatusCode::ACCEPTED, json!({ "run": id })), "accepted")
        }
    }
}

impl Triggers {
    /// With `on_conflict = "cancel"`, a new run cancels the older unfinished runs of its concurrency key.
    pub(crate) fn supersede(&self, t: &super::config::Trigger, new: &RunRow) {
        let (Some(key), Some((_, OnConflict::Cancel))) = (&new.concurrency_key, &t.job.concurrency) else { return };
        match self.mgr.store.runs_with_key(key, &new.id) {
            Ok(older) => {
                for o in older.iter().filter(|o| o.created_ms <= new.created_ms) {
                    let _ = self.cancel(&o.id, &format!("superseded by run {}", new.id));
                }
            }
            Err(e) => tracing::error!("cannot look up runs to supersede: {e}"),
        }
    }
}
