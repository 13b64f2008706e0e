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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::audit::{AuditEvent, AuditRecord, Verdict, Via};
use crate::http::{
    audit_path, check_request_authority, full, is_upgrade, origin_form, strip_hop_by_hop, text,
    BoxError, GwBody,
};
use crate::mask::{Encoding, FoundLog, MaskingBody};
use crate::secrets::{Channel, ReqCtx, Report, WatchBody};
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

/// What the first request goes over.
enum First {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// One upstream connection: HTTP/1.1 (requests one at a time) or HTTP/2 (multiplexed).
enum Sender {
    H1(SendRequest<GwBody>),
    H2(hyper::client::conn::http2::SendRequest<GwBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

pub(crate) struct Forwarder {
    inner: Arc<Inner>,
    decided: Decided,
    upstream: Upstream,
    via: Via,
    /// The connection dialed while deciding, used for the first request.
    first: std::sync::Mutex<Option<First>>,
    sender: tokio::sync::Mutex<Option<Sender>>,
    /// Offer `h2` to the upstream when (re)connecting: the sandbox speaks HTTP/2 here.
    offer_h2: bool,
    /// The phase the connection was decided under.
    phase: Arc<PhaseState>,
    /// WebSocket upgrades are carried (the connection's server hands its stream over).
    upgrades: bool,
    /// A WebSocket switched by the last request, for the connection to relay.
    pending: std::sync::Mutex<Option<crate::ws::PendingUpgrade>>,
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
            first: std::sync::Mutex::new(first.map(|(t, _)| First::Tcp(t))),
            sender: tokio::sync::Mutex::new(None),
            offer_h2: false,
            phase,
            upgrades: false,
            pending: std::sync::Mutex::new(None),
        }
    }

    /// Lets this forwarder switch connections to WebSocket; the caller relays
    /// [`Forwarder::take_upgrade`] after its server connection ends.
    pub(crate) fn with_upgrades(mut self) -> Forwarder {
        self.upgrades = true;
        self
    }

    /// Uses `tls`, already connected to the upstream (ALPN decided), for the first request;
    /// later connections offer `h2` again when `offer_h2`.
    pub(crate) fn with_upstream_tls(
        mut self,
        tls: tokio_rustls::client::TlsStream<TcpStream>,
        offer_h2: bool,
    ) -> Forwarder {
        self.first = std::sync::Mutex::new(Some(First::Tls(Box::new(tls))));
        self.offer_h2 = offer_h2;
        self
    }

    pub(crate) fn take_upgrade(&self) -> Option<crate::ws::PendingUpgrade> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).take()
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

    /// A response that may not reach the sandbox: 502 with the reason, audited.
    fn refuse_response(&self, mut rec: AuditRecord, up: &AtomicU64, why: String) -> Response<GwBody> {
        rec.reason = Some(why.clone());
        rec.status = Some(StatusCode::BAD_GATEWAY.as_u16());
        rec.bytes_up = up.load(Ordering::Relaxed);
        self.inner.auditor.emit(&rec);
        text(
            StatusCode::BAD_GATEWAY,
            format!("hutch: response from {} refused: {why}\n", self.decided.dest()),
        )
    }

    /// Handles one request end to end; never fails (errors become gateway responses).
    pub(crate) async fn handle<B>(self: Arc<Self>, mut req: Request<B>) -> Response<GwBody>
    where
        B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    {
        let d = &self.decided;
        let (secret_host, widened, masking, has_secrets) = {
            let st = self.inner.state();
            (
                st.secrets.any_bound_to(&d.name),
                st.secrets.any_widened(),
                st.secrets.holds_values(),
                !st.secrets.is_empty(),
            )
        };
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

        if req.version() == http::Version::HTTP_2 && !req.headers().contains_key(header::HOST) {
            // HTTP/2 names the host in `:authority`; it is checked (and sent on) as Host.
            if let Some(a) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().insert(header::HOST, a);
            }
        }
        if let Err(e) = check_request_authority(&req, &d.name, d.port) {
            let status = if self.upstream == Upstream::Tls {
                StatusCode::MISDIRECTED_REQUEST
            } else {
                StatusCode::BAD_REQUEST
            };
            return self.deny(rec, status, format!("authority mismatch: {e}"));
        }
        let ws = is_upgrade(&req);
        if ws {
            if let Err(why) = websocket_request(&req, self.upgrades) {
                return self.deny(rec, StatusCode::FORBIDDEN, why);
            }
        }
        if req.method() == Method::CONNECT {
            return self.deny(rec, StatusCode::FORBIDDEN, "CONNECT inside a tunnel".into());
        }
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let header_names: Vec<String> = req
            .headers()
            .keys()
            .map(|k| k.as_str().to_string())
            .collect();
        let names: Vec<&str> = header_names.iter().map(String::as_str).collect();
        if let Err(reason) = d.rule.check_request(req.method().as_str(), &target, &names) {
            return self.deny(rec, StatusCode::FORBIDDEN, reason.to_string());
        }
        // A value stored on a host can be read back in pieces each shorter than the mask's
        // needle; no piece would match, so ranges are refused where a value can be stored.
        if (secret_host || widened)
            && (req.headers().contains_key(header::RANGE)
                || req.headers().contains_key(header::IF_RANGE))
        {
            return self.deny(
                rec,
                StatusCode::FORBIDDEN,
                "Range requests are refused on hosts that can hold a secret (a value read back in pieces can't be masked)".into(),
            );
        }

        // Taken before the request is consumed; resolves once the 101 went to the sandbox.
        let vm_upgrade = ws.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let mut report = Report::default();
        let channel = self.channel();
        strip_hop_by_hop(&mut parts.headers);
        if ws {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if masking {
                // Compressed frames would hide a value from the mask.
                parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            }
        }
        let method = parts.method.as_str().to_string();
        let ctx = ReqCtx {
            host: &d.name,
            port: d.port,
            method: &method,
            target: &target,
            header_names: &names,
            channel,
        };
        let new_target = {
            // One look at the secrets under the lock: the phase cannot change half way.
            let state = self.inner.state();
            let secrets = &state.secrets;
            let t = secrets.rewrite_target(&ctx, &mut report);
            secrets.rewrite_headers(&mut parts.headers, &ctx, &mut report);
            if channel == Channel::Tls {
                secrets.inject(&mut parts.headers, &ctx, &mut report);
            }
            t
        };
        if masking {
            // Compressed responses are decoded before masking; asking for identity saves the work.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        parts.uri = match new_target.as_deref().map(str::parse::<http::Uri>) {
            Some(Ok(u)) => u,
            _ => origin_form(&parts.uri),
        };

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
        let body_swap = channel == Channel::Tls && self.inner.state().secrets.body_swap_for(&ctx);
        let watched: Option<Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>>;
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
            watched = None;
            let rewritten = self
                .inner
                .state()
                .secrets
                .rewrite_body(&collected, &ctx, &mut report);
            let bytes = match rewritten {
                Some(b) => Bytes::from(b),
                None => collected,
            };
            up_bytes.store(bytes.len() as u64, Ordering::Relaxed);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            full(bytes)
        } else {
            let body: GwBody = if capped {
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
            if has_secrets {
                // Placeholders in a streamed body are not swapped, but they are flagged.
                let watch = self.inner.state().secrets.body_watch(&ctx);
                let w = WatchBody::new(body, watch);
                watched = Some(w.seen.clone());
                w.boxed()
            } else {
                watched = None;
                body
            }
        };
        rec.secrets = report.used.iter().cloned().collect();
        rec.flags = report.flags.iter().cloned().collect();
        if ws {
            rec.flags.push("websocket".into());
        }
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
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return match vm_upgrade {
                Some(vm) => self.switch(rec, resp, vm, masking, &up_bytes),
                None => self.refuse_response(
                    rec,
                    &up_bytes,
                    "a 101 answer to a request that asked for no upgrade".into(),
                ),
            };
        }
        let (mut rparts, rbody) = resp.into_parts();
        let mut codings = Vec::new();
        if masking {
            let refused = refused_response(&rparts, secret_host || widened)
                .map(Err)
                .unwrap_or_else(|| crate::decode::codings(&rparts.headers));
            match refused {
                Ok(c) => codings = c,
                Err(why) => {
                    rec.flags.push("encoded_response_refused".into());
                    return self.refuse_response(rec, &up_bytes, why);
                }
            }
        }
        strip_hop_by_hop(&mut rparts.headers);
        let mut found: Vec<(String, &'static str, Encoding)> = Vec::new();
        let no_body = is_head
            || rparts.status.is_informational()
            || rparts.status == StatusCode::NO_CONTENT
            || rparts.status == StatusCode::NOT_MODIFIED;
        let stream_log = FoundLog::default();
        // How masked values are labelled: `literal`, or `literal+gzip` inside a decoded body.
        let mut coding_label = None;
        let body: GwBody = if masking {
            let masker = self.inner.state().secrets.masker();
            mask_head(&masker, &mut rparts, &mut found);
            if !codings.is_empty() {
                // The sandbox gets the decoded body, identity-encoded.
                let label = crate::decode::label(&codings);
                rec.flags.push(format!("decoded:{label}"));
                rparts.headers.remove(header::CONTENT_ENCODING);
                rparts.headers.remove(header::CONTENT_LENGTH);
                coding_label = Some(label);
            }
            let length = rparts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if no_body {
                rbody.map_err(BoxError::from).boxed()
            } else if !codings.is_empty() {
                let cap = limits.max_decoded_bytes;
                let mut dec = crate::decode::Decoder::new(rbody, &codings, cap);
                let buffered = limits.max_mask_bytes.min(usize::try_from(cap).unwrap_or(usize::MAX));
                match dec.read_prefix(buffered).await {
                    Ok((data, true)) => {
                        let mut hits = Vec::new();
                        let data = match masker.mask_buffer(&data, &mut hits) {
                            Some(m) => Bytes::from(m),
                            None => data,
                        };
                        for (i, enc) in hits {
                            found.push((masker.name(i).to_string(), "response", enc));
                        }
                        rparts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
                        full(data)
                    }
                    // Too large to hold: masked while streaming, still capped.
                    Ok((_, false)) => MaskingBody::new(dec.into_body(), masker, stream_log.clone()).boxed(),
                    Err(e) => {
                        if matches!(e, crate::decode::DecodeError::Bomb { .. }) {
                            rec.flags.push("decompression_bomb".into());
                        }
                        return self.refuse_response(rec, &up_bytes, e.to_string());
                    }
                }
            } else if length.is_some_and(|n| n <= limits.max_mask_bytes as u64) {
                match Limited::new(rbody, limits.max_mask_bytes).collect().await {
                    Ok(c) => {
                        let data = c.to_bytes();
                        let mut hits = Vec::new();
                        let data = match masker.mask_buffer(&data, &mut hits) {
                            Some(m) => Bytes::from(m),
                            None => data,
                        };
                        for (i, enc) in hits {
                            found.push((masker.name(i).to_string(), "response", enc));
                        }
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
                MaskingBody::new(rbody, masker, stream_log.clone())
                    .map_err(BoxError::from)
                    .boxed()
            }
        } else {
            rbody.map_err(BoxError::from).boxed()
        };
        for (name, place, enc) in found {
            let flag = match (&coding_label, place) {
                (Some(c), "response") => format!("masked_in_{place}:{name}:{}+{c}", enc.as_str()),
                _ => format!("masked_in_{place}:{name}:{}", enc.as_str()),
            };
            if !rec.flags.contains(&flag) {
                rec.flags.push(flag);
            }
        }
        let audited = Audited {
            inner: body,
            down: 0,
            up: up_bytes,
            rec: Some(rec),
            gateway: self.inner.clone(),
            stream_log: masking.then_some(stream_log),
            coding_label,
            watched,
        };
        Response::from_parts(rparts, audited.boxed())
    }

    /// The upstream switched to WebSocket: the 101 goes to the sandbox (head masked), and the
    /// two streams wait for the connection to relay them.
    fn switch(
        &self,
        mut rec: AuditRecord,
        mut resp: Response<Incoming>,
        vm: hyper::upgrade::OnUpgrade,
        masking: bool,
        up_bytes: &AtomicU64,
    ) -> Response<GwBody> {
        let upgrade = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        if upgrade.as_deref() != Some("websocket") {
            return self.refuse_response(
                rec,
                up_bytes,
                "the upstream switched to a protocol other than websocket".into(),
            );
        }
        if masking && resp.headers().contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
            return self.refuse_response(
                rec,
                up_bytes,
                "the upstream chose a WebSocket extension (compression) the gateway did not offer and can't mask through".into(),
            );
        }
        let up = hyper::upgrade::on(&mut resp);
        let (mut rparts, _) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        rparts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        rparts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let masker = masking.then(|| self.inner.state().secrets.masker());
        if let Some(m) = &masker {
            let mut found = Vec::new();
            mask_head(m, &mut rparts, &mut found);
            for (name, place, enc) in found {
                rec.flags.push(format!("masked_in_{place}:{name}:{}", enc.as_str()));
            }
        }
        rec.bytes_up = up_bytes.load(Ordering::Relaxed);
        self.inner.auditor.emit(&rec);
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(crate::ws::PendingUpgrade {
            vm,
            up,
            masker,
            rec,
        });
        Response::from_parts(rparts, crate::http::empty())
    }

    async fn send(&self, mut req: Request<GwBody>) -> Result<Response<Incoming>, String> {
        let mut guard = self.sender.lock().await;
        let reuse = guard.as_ref().is_some_and(|s| !s.is_closed());
        if !reuse {
            *guard = Some(self.connect().await?);
        }
        match guard.as_mut().ok_or("no upstream connection")? {
            Sender::H1(sender) => {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("upstream connection closed: {e}"))?;
                *req.version_mut() = http::Version::HTTP_11;
                let fut = sender.send_request(req);
                drop(guard);
                fut.await.map_err(|e| e.to_string())
            }
            Sender::H2(sender) => {
                if req.headers().contains_key(header::UPGRADE) {
                    return Err("the upstream speaks HTTP/2 on this connection: a WebSocket upgrade can't be carried over it".into());
                }
                // Requests are multiplexed: no waiting for one another.
                let mut sender = sender.clone();
                drop(guard);
                to_h2(&mut req)?;
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("upstream connection closed: {e}"))?;
                sender.send_request(req).await.map_err(|e| e.to_string())
            }
        }
    }

    async fn connect(&self) -> Result<Sender, String> {
        let taken = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let first = match taken {
            Some(f) => f,
            None => {
                let (tcp, _) = dial(&self.decided, self.inner.limits.connect_timeout)
                    .await
                    .map_err(|r: Refusal| r.reason)?;
                First::Tcp(tcp)
            }
        };
        let tls = match (first, self.upstream) {
            (First::Tls(tls), _) => *tls,
            (First::Tcp(tcp), Upstream::Tls) => self
                .phase
                .upstream_tls
                .connect(
                    &self.decided.name,
                    tcp,
                    self.inner.limits.connect_timeout,
                    self.offer_h2,
                )
                .await
                .map_err(|e| format!("upstream TLS to {} failed: {e}", self.decided.dest()))?,
            (First::Tcp(tcp), Upstream::Plain) => {
                let (sender, conn) = hyper::client::conn::http1::Builder::new()
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                return Ok(Sender::H1(sender));
            }
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Sender::H2(sender));
        }
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Sender::H1(sender))
    }
}

/// An origin-form HTTP/1.1-shaped request made fit for an HTTP/2 upstream: the (checked) Host
/// becomes the `:authority` of an absolute `https` target.
fn to_h2(req: &mut Request<GwBody>) -> Result<(), String> {
    let host = req
        .headers_mut()
        .remove(header::HOST)
        .ok_or("request has no Host header")?;
    let host = host.to_str().map_err(|_| "Host header is not ASCII")?;
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = format!("https://{host}{pq}")
        .parse()
        .map_err(|e| format!("cannot form the HTTP/2 target: {e}"))?;
    *req.version_mut() = http::Version::HTTP_2;
    Ok(())
}

/// An HTTP/2 request body that, when dropped unfinished (a request refused before its body was
/// read), is read to its end in the background (bounded) instead of being reset: clients such as
/// curl report a reset stream as an error and never show the refusal.
pub(crate) struct Drained(Option<Incoming>);

/// Most bytes, and longest time, spent reading a refused request's body.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

impl Drained {
    pub(crate) fn new(body: Incoming) -> Drained {
        Drained(Some(body))
    }
}

impl Body for Drained {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.0.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().map_or(true, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            if !b.is_end_stream() {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tokio::time::timeout(DRAIN_TIME, Limited::new(b, DRAIN_BYTES).collect()).await;
                    });
                }
            }
        }
    }
}

/// Whether an upgrade request may be carried: only a WebSocket opening handshake (RFC 6455: GET,
/// HTTP/1.1, `Upgrade: websocket`), and only on connections that hand their stream over.
fn websocket_request<B>(req: &Request<B>, carried: bool) -> Result<(), String> {
    let upgrade: Vec<String> = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_ascii_lowercase())
        .collect();
    if upgrade != ["websocket"] {
        return Err(format!(
            "only WebSocket upgrades are carried (Upgrade: {})",
            crate::audit::sanitize(&upgrade.join(", "))
        ));
    }
    if req.method() != Method::GET || req.version() != http::Version::HTTP_11 {
        return Err("a WebSocket opening handshake is a GET over HTTP/1.1".into());
    }
    if !carried {
        return Err("WebSocket is carried on CONNECT tunnels and transparent connections, not on absolute-form proxy requests".into());
    }
    Ok(())
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

/// Why a response can't be handed to the sandbox on a connection whose responses are masked:
/// a transfer coding the mask can't see through, or a piece of a larger whole. (Content
/// codings are decoded, see [`crate::decode`].)
fn refused_response(parts: &http::response::Parts, may_hold: bool) -> Option<String> {
    for v in parts.headers.get_all(header::TRANSFER_ENCODING) {
        let v = String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
        if v.split(',').map(str::trim).any(|t| !t.is_empty() && t != "chunked") {
            return Some(format!(
                "Transfer-Encoding {} (only chunked is read)",
                crate::audit::sanitize(&v)
            ));
        }
    }
    if may_hold
        && (parts.status == StatusCode::PARTIAL_CONTENT
            || parts.headers.contains_key(header::CONTENT_RANGE))
    {
        return Some("a partial (Range) response from a host that can hold a secret".into());
    }
    None
}

/// Masks the status line's reason phrase (always replaced by the standard one), header names
/// (a header named after a value is dropped) and header values.
fn mask_head(
    masker: &crate::mask::Masker,
    parts: &mut http::response::Parts,
    found: &mut Vec<(String, &'static str, Encoding)>,
) {
    if let Some(reason) = parts.extensions.remove::<hyper::ext::ReasonPhrase>() {
        let mut hits = Vec::new();
        if masker.mask_buffer(reason.as_bytes(), &mut hits).is_some() {
            for (i, enc) in hits {
                found.push((masker.name(i).to_string(), "status_line", enc));
            }
        }
    }
    // Header names are lowercase on the wire to us: compare with lowercased values.
    let folded = masker.folded();
    let names: Vec<http::HeaderName> = parts.headers.keys().cloned().collect();
    for name in names {
        let mut hits = Vec::new();
        if folded.mask_buffer(name.as_str().as_bytes(), &mut hits).is_some() {
            parts.headers.remove(&name);
            for (i, enc) in hits {
                found.push((masker.name(i).to_string(), "header_name", enc));
            }
        }
    }
    for value in parts.headers.values_mut() {
        let mut hits = Vec::new();
        if let Some(masked) = masker.mask_buffer(value.as_bytes(), &mut hits) {
            *value = HeaderValue::from_bytes(&masked)
                .unwrap_or_else(|_| HeaderValue::from_static("hutch-masked"));
            for (i, enc) in hits {
                found.push((masker.name(i).to_string(), "header", enc));
            }
        }
    }
}

/// A response body that writes the request's audit line when it is finished or dropped, with
/// the bytes that actually went each way and what was masked or noticed while streaming.
struct Audited {
    inner: GwBody,
    down: u64,
    up: Arc<AtomicU64>,
    rec: Option<AuditRecord>,
    gateway: Arc<Inner>,
    stream_log: Option<FoundLog>,
    /// The codings a streamed body was decoded from, for its masking flags.
    coding_label: Option<String>,
    watched: Option<Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>>,
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
                let bomb = e.downcast_ref::<crate::decode::DecodeError>().is_some_and(|d| {
                    matches!(d, crate::decode::DecodeError::Bomb { .. })
                });
                if let Some(rec) = self.rec.as_mut() {
                    rec.reason = Some(format!("response body failed: {msg}"));
                    if bomb {
                        rec.flags.push("decompression_bomb".into());
                    }
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
            let mut late: Vec<String> = Vec::new();
            if let Some(log) = &self.stream_log {
                for (name, enc) in log.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    match &self.coding_label {
                        Some(c) => late.push(format!("masked_in_response:{name}:{}+{c}", enc.as_str())),
                        None => late.push(format!("masked_in_response:{name}:{}", enc.as_str())),
                    }
                }
            }
            if let Some(w) = &self.watched {
                late.extend(w.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
            }
            for f in late {
                if !rec.flags.contains(&f) {
                    rec.flags.push(f);
                }
            }
            self.gateway.auditor.emit(&rec);
        }
    }
}
