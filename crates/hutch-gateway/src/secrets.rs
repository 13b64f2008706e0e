//! Secrets inside one gateway: per-sandbox random placeholders, swapping them for real values on
//! bound hosts over intercepted TLS only and only in the secret's own phase, flagging them
//! anywhere else, and masking real values that come back in responses. A secret whose phase
//! has ended loses its value; its placeholder is still recognized, and flagged.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use hutch_policy::{HostName, InjectTemplate, LoadedSecret, Phase, SecretValue};
use memchr::memmem;

use crate::GatewayError;

pub(crate) struct Secret {
    pub(crate) name: String,
    /// The phase whose requests may carry it.
    phase: Phase,
    /// `None` once its phase has ended (the value is wiped when dropped).
    value: Option<SecretValue>,
    pub(crate) placeholder: String,
    spec: hutch_policy::SecretSpec,
}

/// What a request did with secrets, for its audit line.
#[derive(Default, Debug)]
pub(crate) struct Report {
    pub(crate) used: BTreeSet<String>,
    pub(crate) flags: BTreeSet<String>,
}

/// How a request may treat placeholders.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// Intercepted TLS to a verified upstream: bound placeholders are swapped.
    Tls,
    /// Plaintext: nothing is ever swapped.
    Plaintext,
}

pub(crate) struct SecretTable {
    secrets: Vec<Secret>,
    /// The gateway's current phase: only its secrets are swapped.
    current: Phase,
}

impl SecretTable {
    /// Every phase's secrets, each with a placeholder of its own (a name bound in two phases
    /// gets two placeholders).
    pub(crate) fn new(
        loaded: Vec<(Phase, LoadedSecret)>,
        current: Phase,
    ) -> Result<SecretTable, GatewayError> {
        let mut secrets = Vec::with_capacity(loaded.len());
        for (phase, LoadedSecret { spec, value }) in loaded {
            let name = spec.name().as_str().to_string();
            let placeholder = loop {
                let mut raw = [0u8; 16];
                getrandom::getrandom(&mut raw).map_err(GatewayError::Random)?;
                let p = format!("hutch-ph-{name}-{}", hex::encode(raw));
                if !p.contains(value.expose()) && !value.expose().contains(&p) {
                    break p;
                }
            };
            secrets.push(Secret {
                name,
                phase,
                value: Some(value),
                placeholder,
                spec,
            });
        }
        Ok(SecretTable { secrets, current })
    }

    /// Moves to `phase`: the secrets of earlier phases lose their values.
    pub(crate) fn enter(&mut self, phase: Phase) {
        self.current = phase;
        for s in &mut self.secrets {
            if s.phase < phase {
                s.value = None;
            }
        }
    }

    pub(crate) fn placeholders(&self, phase: Phase) -> Vec<(String, String)> {
        self.secrets
            .iter()
            .filter(|s| s.phase == phase)
            .map(|s| (s.name.clone(), s.placeholder.clone()))
            .collect()
    }

    /// The value, if `s` may be used now: its phase is the current one.
    fn usable<'a>(&self, s: &'a Secret) -> Option<&'a SecretValue> {
        s.value.as_ref().filter(|_| s.phase == self.current)
    }

    pub(crate) fn bound_patterns(&self) -> Vec<hutch_policy::HostPattern> {
        self.secrets
            .iter()
            .flat_map(|s| s.spec.hosts().iter().cloned())
            .collect()
    }

    pub(crate) fn any_bound_to(&self, host: &HostName) -> bool {
        self.secrets.iter().any(|s| s.spec.is_bound_to(host))
    }

    /// True when request bodies to `host` must be buffered to swap placeholders.
    pub(crate) fn body_swap_for(&self, host: &HostName) -> bool {
        self.secrets
            .iter()
            .any(|s| self.usable(s).is_some() && s.spec.in_body() && s.spec.is_bound_to(host))
    }

    /// The value to put in place of `s`'s placeholder on a request to `host`, if any.
    fn swaps<'a>(
        &self,
        s: &'a Secret,
        host: &HostName,
        channel: Channel,
    ) -> Option<&'a SecretValue> {
        self.usable(s)
            .filter(|_| channel == Channel::Tls && s.spec.is_bound_to(host))
    }

    fn flag_unswapped(&self, s: &Secret, host: &HostName, channel: Channel, report: &mut Report) {
        let kind = if s.phase != self.current {
            "placeholder_out_of_phase"
        } else if s.spec.is_bound_to(host) && channel == Channel::Plaintext {
            "placeholder_over_plaintext"
        } else {
            "possible_exfiltration"
        };
        report.flags.insert(format!("{kind}:{}", s.name));
    }

    /// Swaps placeholders in header values where allowed; flags every other placeholder.
    pub(crate) fn rewrite_headers(
        &self,
        headers: &mut HeaderMap,
        host: &HostName,
        channel: Channel,
        report: &mut Report,
    ) {
        for value in headers.values_mut() {
            let mut bytes: Option<Vec<u8>> = None;
            for s in &self.secrets {
                let current = bytes.as_deref().unwrap_or(value.as_bytes());
                if memmem::find(current, s.placeholder.as_bytes()).is_none() {
                    continue;
                }
                if let Some(value) = self.swaps(s, host, channel) {
                    bytes = Some(replace_all(
                        current,
                        s.placeholder.as_bytes(),
                        value.expose().as_bytes(),
                    ));
                    report.used.insert(s.name.clone());
                } else {
                    self.flag_unswapped(s, host, channel, report);
                }
            }
            if let Some(b) = bytes {
                // Values were checked to be header-safe when loaded, so this cannot fail.
                if let Ok(v) = HeaderValue::from_bytes(&b) {
                    *value = v;
                }
            }
        }
    }

    /// Placeholders in the request target are never swapped (URLs end up in logs): flagged only.
    pub(crate) fn scan_target(
        &self,
        target: &str,
        host: &HostName,
        channel: Channel,
        report: &mut Report,
    ) {
        for s in &self.secrets {
            if target.contains(&s.placeholder) {
                if self.swaps(s, host, channel).is_some() {
                    report
                        .flags
                        .insert(format!("placeholder_in_url_not_swapped:{}", s.name));
                } else {
                    self.flag_unswapped(s, host, channel, report);
                }
            }
        }
    }

    /// Adds templated headers for bound secrets the client sent no header for.
    pub(crate) fn inject(&self, headers: &mut HeaderMap, host: &HostName, report: &mut Report) {
        for s in &self.secrets {
            let Some(t): Option<&InjectTemplate> = s.spec.inject() else {
                continue;
            };
            let Some(secret) = self.usable(s) else {
                continue;
            };
            if !s.spec.is_bound_to(host) || headers.contains_key(t.header()) {
                continue;
            }
            let (Ok(name), Ok(mut value)) = (
                http::HeaderName::from_bytes(t.header().as_bytes()),
                HeaderValue::from_str(&t.render(secret)),
            ) else {
                continue;
            };
            value.set_sensitive(true);
            headers.insert(name, value);
            report.used.insert(s.name.clone());
        }
    }

    /// Swaps placeholders of bound `in_body` secrets in a buffered body; flags the rest.
    pub(crate) fn rewrite_body(
        &self,
        body: &[u8],
        host: &HostName,
        channel: Channel,
        report: &mut Report,
    ) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for s in &self.secrets {
            let current = out.as_deref().unwrap_or(body);
            if memmem::find(current, s.placeholder.as_bytes()).is_none() {
                continue;
            }
            let Some(value) = self.swaps(s, host, channel) else {
                self.flag_unswapped(s, host, channel, report);
                continue;
            };
            if s.spec.in_body() {
                out = Some(replace_all(
                    current,
                    s.placeholder.as_bytes(),
                    value.expose().as_bytes(),
                ));
                report.used.insert(s.name.clone());
            } else {
                report
                    .flags
                    .insert(format!("placeholder_in_body_not_swapped:{}", s.name));
            }
        }
        out
    }

    /// Replaces real values in response header values with placeholders.
    pub(crate) fn mask_headers(&self, headers: &mut HeaderMap, report: &mut Report) {
        for value in headers.values_mut() {
            if let Some(masked) = self.mask(value.as_bytes(), report) {
                if let Ok(v) = HeaderValue::from_bytes(&masked) {
                    *value = v;
                }
            }
        }
    }

    /// Replaces real values (of every phase whose values are still held) with placeholders in a
    /// buffered response body.
    pub(crate) fn mask(&self, data: &[u8], report: &mut Report) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for s in &self.secrets {
            let Some(value) = &s.value else { continue };
            let current = out.as_deref().unwrap_or(data);
            if memmem::find(current, value.expose().as_bytes()).is_some() {
                out = Some(replace_all(
                    current,
                    value.expose().as_bytes(),
                    s.placeholder.as_bytes(),
                ));
                report
                    .flags
                    .insert(format!("masked_in_response:{}", s.name));
            }
        }
        out
    }

    /// Needles for streaming masks: each value and a same-length stand-in, so that a body's
    /// declared length stays true.
    pub(crate) fn stream_needles(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.secrets
            .iter()
            .filter_map(|s| {
                let value = s.value.as_ref()?;
                let len = value.expose().len();
                let mut stand_in: Vec<u8> =
                    s.placeholder.as_bytes().iter().copied().take(len).collect();
                stand_in.resize(len, b'x');
                Some((value.expose().as_bytes().to_vec(), stand_in))
            })
            .collect()
    }
}

fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut last = 0;
    for m in memmem::find_iter(hay, from) {
        out.extend_from_slice(&hay[last..m]);
        out.extend_from_slice(to);
        last = m + from.len();
    }
    out.extend_from_slice(&hay[last..]);
    out
}

/// A response body with secret values replaced on the fly, holding back just enough bytes to
/// catch a value split across frames.
pub(crate) struct MaskingBody<B> {
    inner: B,
    needles: Vec<(memmem::Finder<'static>, Vec<u8>)>,
    keep: usize,
    pending: BytesMut,
    trailers: Option<Frame<Bytes>>,
    done: bool,
    pub(crate) hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<B> MaskingBody<B> {
    pub(crate) fn new(inner: B, needles: Vec<(Vec<u8>, Vec<u8>)>) -> MaskingBody<B> {
        let keep = needles
            .iter()
            .map(|(v, _)| v.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        let needles = needles
            .into_iter()
            .map(|(v, r)| (memmem::Finder::new(&v).into_owned(), r))
            .collect();
        MaskingBody {
            inner,
            needles,
            keep,
            pending: BytesMut::new(),
            trailers: None,
            done: false,
            hits: Default::default(),
        }
    }

    /// Emits everything that can no longer be the start of a value (all of it at the end).
    fn drain(&mut self, at_end: bool) -> Option<Bytes> {
        let safe_end = if at_end {
            self.pending.len()
        } else {
            self.pending.len().saturating_sub(self.keep)
        };
        if safe_end == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(safe_end);
        let mut i = 0;
        loop {
            let next = self
                .needles
                .iter()
                .filter_map(|(f, r)| {
                    f.find(&self.pending[i..])
                        .map(|m| (i + m, f.needle().len(), r))
                })
                .filter(|(m, _, _)| *m < safe_end)
                .min_by_key(|(m, _, _)| *m);
            match next {
                Some((m, len, replacement)) => {
                    out.extend_from_slice(&self.pending[i..m]);
                    out.extend_from_slice(replacement);
                    i = m + len;
                    self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                None => {
                    let end = safe_end.max(i);
                    out.extend_from_slice(&self.pending[i..end]);
                    i = end;
                    break;
                }
            }
        }
        let _ = self.pending.split_to(i);
        (!out.is_empty()).then(|| Bytes::from(out))
    }
}

impl<B> Body for MaskingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                if let Some(b) = this.drain(true) {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.pending.extend_from_slice(&data);
                        if let Some(b) = this.drain(false) {
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                    }
                    Err(trailers) => {
                        // Trailers end the body: what is held back goes out first.
                        this.trailers = Some(trailers);
                        this.done = true;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // Replacements keep the length, so the inner hint still holds.
        let mut h = self.inner.size_hint();
        let held = self.pending.len() as u64;
        h.set_lower(h.lower() + held);
        if let Some(u) = h.upper() {
            h.set_upper(u + held);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn table() -> SecretTable {
        let policy = hutch_policy::CheckedPolicy::from_toml_str(
            "allow = [\"a.test\", \"b.test\"]\n[secrets.A]\nhosts=[\"a.test\"]\nin_body=true\n[secrets.B]\nhosts=[\"b.test\"]\ninject={header=\"x-key\", value=\"K {value}\"}\n",
            std::path::Path::new("t.toml"),
        )
        .expect("policy");
        let loaded = policy
            .load_secrets_with(|v| {
                Some(if v == "A" {
                    "AAAA-real-value".into()
                } else {
                    "BBBB-real-value".into()
                })
            })
            .expect("load");
        SecretTable::new(
            loaded.into_iter().map(|l| (Phase::Agent, l)).collect(),
            Phase::Agent,
        )
        .expect("table")
    }

    fn host(s: &str) -> HostName {
        HostName::parse(s).expect("host")
    }

    /// Threat 6 (credential laundering): a placeholder is swapped only for its own host over TLS.
    #[test]
    fn threat6_swap_only_for_bound_host_over_tls() {
        let t = table();
        let ph = t.placeholders(Phase::Agent);
        let a_ph = &ph[0].1;
        assert!(a_ph.starts_with("hutch-ph-A-") && a_ph.len() == "hutch-ph-A-".len() + 32);
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {a_ph}")).expect("hv"),
        );
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &host("a.test"), Channel::Tls, &mut r);
        assert_eq!(h["authorization"], "Bearer AAAA-real-value");
        assert!(r.used.contains("A") && r.flags.is_empty());

        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {a_ph}")).expect("hv"),
        );
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &host("b.test"), Channel::Tls, &mut r);
        assert_eq!(h["authorization"], format!("Bearer {a_ph}").as_str());
        assert!(r.flags.contains("possible_exfiltration:A"), "{r:?}");

        let mut r = Report::default();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_str(a_ph).expect("hv"));
        t.rewrite_headers(&mut h, &host("a.test"), Channel::Plaintext, &mut r);
        assert_eq!(h["authorization"], a_ph.as_str());
        assert!(r.flags.contains("placeholder_over_plaintext:A"), "{r:?}");
    }

    #[test]
    fn threat6_inject_and_body() {
        let t = table();
        let ph = t.placeholders(Phase::Agent);
        let mut h = HeaderMap::new();
        let mut r = Report::default();
        t.inject(&mut h, &host("b.test"), &mut r);
        assert_eq!(h["x-key"], "K BBBB-real-value");
        let mut h2 = HeaderMap::new();
        h2.insert("x-key", HeaderValue::from_static("client-chose"));
        t.inject(&mut h2, &host("b.test"), &mut Report::default());
        assert_eq!(h2["x-key"], "client-chose");
        let body = format!("{{\"token\":\"{}\",\"other\":\"{}\"}}", ph[0].1, ph[1].1);
        let mut r = Report::default();
        let out = t
            .rewrite_body(body.as_bytes(), &host("a.test"), Channel::Tls, &mut r)
            .expect("changed");
        let out = String::from_utf8(out).expect("utf8");
        assert!(
            out.contains("AAAA-real-value") && out.contains(&ph[1].1),
            "{out}"
        );
        assert!(r.flags.contains("possible_exfiltration:B"));
    }

    /// A setup-phase secret is swapped only during setup; afterwards its value is gone and its
    /// placeholder is flagged wherever it is sent, also on its own host.
    #[test]
    fn setup_secret_is_never_swapped_after_its_phase() {
        let policy = hutch_policy::CheckedPolicy::from_toml_str(
            "allow = [\"a.test\"]\n[secrets.S]\nhosts=[\"a.test\"]\nin_body=true\ninject={header=\"x-key\", value=\"{value}\"}\n",
            std::path::Path::new("t.toml"),
        )
        .expect("policy");
        let setup = policy
            .load_secrets_with(|_| Some("SETUP-real-value".into()))
            .expect("load");
        let agent = policy
            .load_secrets_with(|_| Some("AGENT-real-value".into()))
            .expect("load");
        let mut t = SecretTable::new(
            setup
                .into_iter()
                .map(|l| (Phase::Setup, l))
                .chain(agent.into_iter().map(|l| (Phase::Agent, l)))
                .collect(),
            Phase::Setup,
        )
        .expect("table");
        let setup_ph = t.placeholders(Phase::Setup)[0].1.clone();
        let agent_ph = t.placeholders(Phase::Agent)[0].1.clone();
        assert_ne!(
            setup_ph, agent_ph,
            "one name in two phases has two placeholders"
        );
        let a = host("a.test");
        let send = |t: &SecretTable, ph: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", HeaderValue::from_str(ph).expect("hv"));
            let mut r = Report::default();
            t.rewrite_headers(&mut h, &a, Channel::Tls, &mut r);
            let body = t.rewrite_body(ph.as_bytes(), &a, Channel::Tls, &mut r);
            let mut injected = HeaderMap::new();
            t.inject(&mut injected, &a, &mut r);
            (
                h["authorization"].to_str().expect("ascii").to_string(),
                body,
                injected,
                r,
            )
        };

        let (h, body, injected, r) = send(&t, &setup_ph);
        assert_eq!(h, "SETUP-real-value");
        assert_eq!(body.as_deref(), Some(&b"SETUP-real-value"[..]));
        assert_eq!(
            injected["x-key"], "SETUP-real-value",
            "only the current phase's secret is injected"
        );
        assert!(r.used.contains("S") && r.flags.is_empty(), "{r:?}");
        let (h, _, _, r) = send(&t, &agent_ph);
        assert_eq!(
            h, agent_ph,
            "the agent phase's secret is not swapped during setup"
        );
        assert!(r.flags.contains("placeholder_out_of_phase:S"), "{r:?}");

        t.enter(Phase::Agent);
        let (h, body, injected, r) = send(&t, &setup_ph);
        assert_eq!(
            h, setup_ph,
            "not swapped after its phase, not even on its own host"
        );
        assert!(body.is_none(), "nor in a body");
        assert_eq!(injected["x-key"], "AGENT-real-value");
        assert!(r.flags.contains("placeholder_out_of_phase:S"), "{r:?}");
        let (h, _, _, r) = send(&t, &agent_ph);
        assert_eq!(h, "AGENT-real-value");
        assert!(r.flags.is_empty(), "{r:?}");
        assert!(
            t.secrets
                .iter()
                .filter(|s| s.phase == Phase::Setup)
                .all(|s| s.value.is_none()),
            "the setup value is dropped"
        );
        assert_eq!(t.stream_needles().len(), 1);
    }

    /// Threat 6 (reflection): real values echoed back are masked, also across frame boundaries.
    #[tokio::test]
    async fn threat6_streaming_mask_across_frames() {
        let t = table();
        let text = b"xxAAAA-real-valueyyBBBB-real-valuezzAAAA-real-value".to_vec();
        for split in 1..text.len() {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = text
                .chunks(split)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let body = MaskingBody::new(
                StreamBody::new(futures::stream::iter(frames)),
                t.stream_needles(),
            );
            let out = body.collect().await.expect("collect").to_bytes();
            assert_eq!(out.len(), text.len(), "length preserved at split {split}");
            let s = String::from_utf8_lossy(&out);
            assert!(!s.contains("real-value"), "split {split}: {s}");
        }
    }
}
