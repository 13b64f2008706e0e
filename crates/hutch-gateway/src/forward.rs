//! Request-by-request forwarding for connections the gateway inspects (intercepted TLS and
//! plaintext HTTP): authority and rule checks, placeholder swapping and flagging, size caps,
//! one upstream connection per sandbox connection to exactly the checked address, response
//! masking, and one audit line per request.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::audit::{AuditEvent, AuditRecord, Verdict, Via};
use crate::http::{
    audit_path, check_request_authority, full, is_upgrade, origin_form, strip_hop_by_hop, text,
    BoxError, GwBody,
};
use crate::secrets::{Channel, MaskingBody, Report};
use crate::upstream::{dial, Decided, Refusal};
use crate::{Inner, PhaseState};

/// Which way requests travel to the upstream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Upstream {
    /// Fresh verified TLS; placeholders of bound secrets are swapped.
    Tls,
    /// Plaintext TCP; nothing is swapped.
    Plain,
}

pub(crate) struct Forwarder {
    inner: Arc<Inner>,
    decided: Decided,
    upstream: Upstream,
    via: Via,
    /// The connection dialed while deciding, used for the first request.
    first: std::sync::Mutex<Option<(TcpStream, SocketAddr)>>,
    sender: tokio::sync::Mutex<Option<SendRequest<GwBody>>>,
    /// The phase the connection was decided under.
    phase: Arc<PhaseState>,
}

impl Forwarder {
    pub(crate) fn new(
        inner: Arc<Inner>,
        decided: Decided,
        upstream: Upstream,
        via: Via,
        first: Option<(TcpStream, SocketAddr)>,
        phase: Arc<PhaseState>,
    ) -> Forwarder {
        Forwarder {
            inner,
            decided,
            upstream,
            via,
            first: std::sync::Mutex::new(first),
            sender: tokio::sync::Mutex::new(None),
            phase,
        }
    }

    fn channel(&self) -> Channel {
        match self.upstream {
            Upstream::Tls => Channel::Tls,
            Upstream::Plain => Channel::Plaintext,
        }
    }

    fn deny(&self, mut rec: AuditRecord, status: StatusCode, reason: String) -> Response<GwBody> {
        rec.decision = Verdict::Deny;
        rec.status = Some(status.as_u16());
        let refusal = Refusal {
            dest: self.decided.dest(),
            reason: reason.clone(),
            status,
        };
        rec.reason = Some(reason);
        self.inner.auditor.emit(&rec);
        text(status, refusal.message())
    }

    /// Handles one request end to end; never fails (errors become gateway responses).
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<GwBody> {
        let d = &self.decided;
        let secret_host = self.inner.state().secrets.any_bound_to(&d.name);
        let mut rec = AuditRecord::new(
            &self.inner.sandbox_id,
            self.phase.phase,
            AuditEvent::Request,
            self.via,
            d.dest(),
            Verdict::Allow,
        );
        rec.method = Some(crate::audit::sanitize(req.method().as_str()));
        rec.path = Some(audit_path(req.uri(), secret_host));
        rec.rule = Some(d.rule.to_string());
        rec.mode = Some(match self.upstream {
            Upstream::Tls => crate::audit::Mode::TlsIntercept,
            Upstream::Plain => crate::audit::Mode::Http,
        });

        if let Err(e) = check_request_authority(&req, &d.name, d.port) {
            let status = if self.upstream == Upstream::Tls {
                StatusCode::MISDIRECTED_REQUEST
            } else {
                StatusCode::BAD_REQUEST
            };
            return self.deny(rec, status, format!("authority mismatch: {e}"));
        }
        if is_upgrade(&req) {
            return self.deny(
                rec,
                StatusCode::FORBIDDEN,
                "protocol upgrades (WebSocket, h2c) are not carried on inspected connections"
                    .into(),
            );
        }
        if req.method() == Method::CONNECT {
            return self.deny(rec, StatusCode::FORBIDDEN, "CONNECT inside a tunnel".into());
        }
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        if let Err(reason) = d.rule.check_request(req.method().as_str(), &target) {
            return self.deny(rec, StatusCode::FORBIDDEN, reason.to_string());
        }

        let (mut parts, body) = req.into_parts();
        let mut report = Report::default();
        let channel = self.channel();
        strip_hop_by_hop(&mut parts.headers);
        {
            // One look at the secrets under the lock: the phase cannot change half way.
            let state = self.inner.state();
            let secrets = &state.secrets;
            secrets.scan_target(&target, &d.name, channel, &mut report);
            secrets.rewrite_headers(&mut parts.headers, &d.name, channel, &mut report);
            if channel == Channel::Tls {
                secrets.inject(&mut parts.headers, &d.name, &mut report);
            }
        }
        if secret_host {
            // Compressed responses would hide an echoed value from the mask.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        parts.uri = origin_form(&parts.uri);

        let limits = &self.inner.limits;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let capped = channel == Channel::Tls;
        if capped && declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
            rec.secrets = report.used.iter().cloned().collect();
            return self.deny(
                rec,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over the {} byte cap", limits.max_body_bytes),
            );
        }
        let up_bytes = Arc::new(AtomicU64::new(0));
        let over_cap = Arc::new(AtomicBool::new(false));
        let body_swap =
            channel == Channel::Tls && self.inner.state().secrets.body_swap_for(&d.name);
        let body: GwBody = if body_swap {
            let collected = match Limited::new(body, limits.max_body_bytes).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    let too_large = e.is::<LengthLimitError>();
                    let (status, why) = if too_large {
                        (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("request body over the {} byte cap", limits.max_body_bytes),
                        )
                    } else {
                        (
                            StatusCode::BAD_REQUEST,
                            format!("cannot read request body: {e}"),
                        )
                    };
                    return self.deny(rec, status, why);
                }
            };
            let rewritten =
                self.inner
                    .state()
                    .secrets
                    .rewrite_body(&collected, &d.name, channel, &mut report);
            let bytes = match rewritten {
                Some(b) => Bytes::from(b),
                None => collected,
            };
            up_bytes.store(bytes.len() as u64, Ordering::Relaxed);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            full(bytes)
        } else if capped {
            Counting::new(
                Limited::new(body, limits.max_body_bytes),
                up_bytes.clone(),
                over_cap.clone(),
            )
            .boxed()
        } else {
            Counting::new(
                body.map_err(BoxError::from),
                up_bytes.clone(),
                over_cap.clone(),
            )
            .boxed()
        };
        rec.secrets = report.used.iter().cloned().collect();
        rec.flags = report.flags.iter().cloned().collect();
        let is_head = parts.method == Method::HEAD;
        let upstream_req = Request::from_parts(parts, body);

        let resp = match self.send(upstream_req).await {
            Ok(r) => r,
            Err(_) if over_cap.load(Ordering::Relaxed) => {
                rec.bytes_up = up_bytes.load(Ordering::Relaxed);
                let why = format!("request body over the {} byte cap", limits.max_body_bytes);
                return self.deny(rec, StatusCode::PAYLOAD_TOO_LARGE, why);
            }
            Err(e) => {
                rec.status = Some(StatusCode::BAD_GATEWAY.as_u16());
                rec.reason = Some(e.clone());
                rec.bytes_up = up_bytes.load(Ordering::Relaxed);
                self.inner.auditor.emit(&rec);
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("hutch: upstream request to {} failed: {e}\n", d.dest()),
                );
            }
        };
        rec.status = Some(resp.status().as_u16());
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        let mut mask_report = Report::default();
        let no_body = is_head
            || rparts.status.is_informational()
            || rparts.status == StatusCode::NO_CONTENT
            || rparts.status == StatusCode::NOT_MODIFIED;
        let body: GwBody = if channel == Channel::Tls && secret_host {
            self.inner
                .state()
                .secrets
                .mask_headers(&mut rparts.headers, &mut mask_report);
            let length = rparts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if no_body {
                rbody.map_err(BoxError::from).boxed()
            } else if length.is_some_and(|n| n <= limits.max_mask_bytes as u64) {
                match Limited::new(rbody, limits.max_mask_bytes).collect().await {
                    Ok(c) => {
                        let data = c.to_bytes();
                        let masked = self.inner.state().secrets.mask(&data, &mut mask_report);
                        let data = match masked {
                            Some(m) => Bytes::from(m),
                            None => data,
                        };
                        rparts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
                        full(data)
                    }
                    Err(e) => {
                        rec.reason = Some(format!("upstream response body failed: {e}"));
                        self.inner.auditor.emit(&rec);
                        return text(
                            StatusCode::BAD_GATEWAY,
                            format!("hutch: upstream response from {} failed: {e}\n", d.dest()),
                        );
                    }
                }
            } else {
                // Streamed bodies are masked in place with same-length stand-ins.
                let needles = self.inner.state().secrets.stream_needles();
                let masking = MaskingBody::new(rbody, needles);
                masking.map_err(BoxError::from).boxed()
            }
        } else {
            rbody.map_err(BoxError::from).boxed()
        };
        rec.flags.extend(mask_report.flags);
        let audited = Audited {
            inner: body,
            down: 0,
            up: up_bytes,
            rec: Some(rec),
            gateway: self.inner.clone(),
        };
        Response::from_parts(rparts, audited.boxed())
    }

    async fn send(&self, req: Request<GwBody>) -> Result<Response<Incoming>, String> {
        let mut guard = self.sender.lock().await;
        let reuse = guard.as_ref().is_some_and(|s| !s.is_closed());
        if !reuse {
            *guard = Some(self.connect().await?);
        }
        let sender = guard.as_mut().ok_or("no upstream connection")?;
        sender
            .ready()
            .await
            .map_err(|e| format!("upstream connection closed: {e}"))?;
        let fut = sender.send_request(req);
        drop(guard);
        fut.await.map_err(|e| e.to_string())
    }

    async fn connect(&self) -> Result<SendRequest<GwBody>, String> {
        let taken = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (tcp, _addr) = match taken {
            Some(t) => t,
            None => dial(&self.decided, self.inner.limits.connect_timeout)
                .await
                .map_err(|r: Refusal| r.reason)?,
        };
        let builder = hyper::client::conn::http1::Builder::new();
        match self.upstream {
            Upstream::Tls => {
                let tls = self
                    .phase
                    .upstream_tls
                    .connect(&self.decided.name, tcp, self.inner.limits.connect_timeout)
                    .await
                    .map_err(|e| format!("upstream TLS to {} failed: {e}", self.decided.dest()))?;
                let (sender, conn) = builder
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(sender)
            }
            Upstream::Plain => {
                let (sender, conn) = builder
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(sender)
            }
        }
    }
}

/// Counts the data bytes of a request body as they go upstream, and notes when a size cap
/// cut it off (so the sandbox gets 413, not 502).
struct Counting<B> {
    inner: B,
    count: Arc<AtomicU64>,
    over_cap: Arc<AtomicBool>,
}

impl<B> Counting<B> {
    fn new(inner: B, count: Arc<AtomicU64>, over_cap: Arc<AtomicBool>) -> Counting<B> {
        Counting {
            inner,
            count,
            over_cap,
        }
    }
}

impl<B> Body for Counting<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                if e.is::<LengthLimitError>() {
                    self.over_cap.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes the request's audit line when it is finished or dropped, with
/// the bytes that actually went each way.
struct Audited {
    inner: GwBody,
    down: u64,
    up: Arc<AtomicU64>,
    rec: Option<AuditRecord>,
    gateway: Arc<Inner>,
}

impl Body for Audited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.down += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = e.to_string();
                if let Some(rec) = self.rec.as_mut() {
                    rec.reason = Some(format!("response body failed: {msg}"));
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.bytes_up = self.up.load(Ordering::Relaxed);
            rec.bytes_down = self.down;
            self.gateway.auditor.emit(&rec);
        }
    }
}
