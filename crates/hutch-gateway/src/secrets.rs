//! Secrets inside one gateway: per-sandbox random placeholders, swapping them for real values on
//! bound hosts over intercepted TLS only and only in the secret's own phase, flagging them
//! anywhere else, and masking real values that come back in responses. A secret whose phase
//! has ended loses its value; its placeholder is still recognized, and flagged.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use hutch_policy::{HostName, InjectTemplate, LoadedSecret, Phase, SecretValue};
use memchr::memmem;

use crate::mask::Masker;
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
            .flat_map(|s| s.spec.hosts().cloned())
            .collect()
    }

    pub(crate) fn any_bound_to(&self, host: &HostName) -> bool {
        self.secrets.iter().any(|s| s.spec.is_bound_to(host))
    }

    /// True when a held secret may be swapped outside its one header (body, query, other
    /// headers): then a host that stores what it is sent can hand the value back, and every
    /// inspected response is treated as possibly carrying it.
    pub(crate) fn any_widened(&self) -> bool {
        self.secrets
            .iter()
            .any(|s| s.value.is_some() && s.spec.swap().widened())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// True when any real value is held (of any phase), so responses must be masked.
    pub(crate) fn holds_values(&self) -> bool {
        self.secrets.iter().any(|s| s.value.is_some())
    }

    /// The value to put in place of `s`'s placeholder on this request, if its binding covers it.
    fn applies<'a>(&self, s: &'a Secret, ctx: &ReqCtx<'_>) -> Option<&'a SecretValue> {
        self.usable(s).filter(|_| {
            ctx.channel == Channel::Tls
                && s.spec
                    .applies(ctx.host, ctx.port, ctx.method, ctx.target, ctx.header_names)
        })
    }

    /// Why `s`'s placeholder is left as it is on this request; `here` names the place when the
    /// binding covers the request but not that part of it.
    fn unswapped_kind(&self, s: &Secret, ctx: &ReqCtx<'_>, here: &'static str) -> &'static str {
        if s.phase != self.current {
            "placeholder_out_of_phase"
        } else if !s.spec.is_bound_to(ctx.host) {
            "possible_exfiltration"
        } else if ctx.channel == Channel::Plaintext {
            "placeholder_over_plaintext"
        } else if self.applies(s, ctx).is_none() {
            "placeholder_out_of_scope"
        } else {
            here
        }
    }

    fn flag(&self, s: &Secret, ctx: &ReqCtx<'_>, here: &'static str, report: &mut Report) {
        let kind = self.unswapped_kind(s, ctx, here);
        report.flags.insert(format!("{kind}:{}", s.name));
    }

    /// Swaps placeholders in the one header each binding names (also inside `Basic`
    /// credentials), or in any header for bindings that opt in; flags every other placeholder.
    pub(crate) fn rewrite_headers(
        &self,
        headers: &mut HeaderMap,
        ctx: &ReqCtx<'_>,
        report: &mut Report,
    ) {
        for (name, value) in headers.iter_mut() {
            let mut plain: Option<Vec<u8>> = None;
            let mut basic: Option<Vec<u8>> = decode_basic(value.as_bytes());
            let mut basic_changed = false;
            for s in &self.secrets {
                let ph = s.placeholder.as_bytes();
                let cur = plain.as_deref().unwrap_or(value.as_bytes());
                let in_plain = memmem::find(cur, ph).is_some();
                let in_basic = basic.as_deref().is_some_and(|b| memmem::find(b, ph).is_some());
                if !in_plain && !in_basic {
                    continue;
                }
                let here = name.as_str() == s.spec.swap().header || s.spec.swap().any_header;
                match self.applies(s, ctx) {
                    Some(v) if here => {
                        if in_plain {
                            plain = Some(replace_all(cur, ph, v.expose().as_bytes()));
                        }
                        if let Some(b) = basic.as_mut().filter(|_| in_basic) {
                            *b = replace_all(b, ph, v.expose().as_bytes());
                            basic_changed = true;
                        }
                        report.used.insert(s.name.clone());
                    }
                    _ => self.flag(s, ctx, "placeholder_in_header_not_swapped", report),
                }
            }
            let rebuilt = match (basic, basic_changed) {
                (Some(b), true) => Some(
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(b)
                    )
                    .into_bytes(),
                ),
                _ => plain,
            };
            if let Some(b) = rebuilt {
                // Values were checked to be header-safe when loaded, so this cannot fail.
                if let Ok(mut v) = HeaderValue::from_bytes(&b) {
                    v.set_sensitive(true);
                    *value = v;
                }
            }
        }
    }

    /// Placeholders in the request target: swapped in the query for bindings that opt in
    /// (`in_query`), otherwise flagged only (URLs end up in logs). Returns the new target.
    pub(crate) fn rewrite_target(&self, ctx: &ReqCtx<'_>, report: &mut Report) -> Option<String> {
        let (path, query) = match ctx.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (ctx.target, None),
        };
        let mut new_query: Option<String> = None;
        for s in &self.secrets {
            let ph = s.placeholder.as_str();
            let q = new_query.as_deref().or(query).unwrap_or("");
            let in_path = path.contains(ph);
            let in_query = q.contains(ph);
            if !in_path && !in_query {
                continue;
            }
            match self.applies(s, ctx) {
                Some(v) if in_query && s.spec.swap().query => {
                    new_query = Some(q.replace(ph, v.expose()));
                    report.used.insert(s.name.clone());
                    if in_path {
                        self.flag(s, ctx, "placeholder_in_url_not_swapped", report);
                    }
                }
                _ => self.flag(s, ctx, "placeholder_in_url_not_swapped", report),
            }
        }
        new_query.map(|q| format!("{path}?{q}"))
    }

    /// Adds templated headers for bound secrets the client sent no header for.
    pub(crate) fn inject(&self, headers: &mut HeaderMap, ctx: &ReqCtx<'_>, report: &mut Report) {
        for s in &self.secrets {
            let Some(t): Option<&InjectTemplate> = s.spec.inject() else {
                continue;
            };
            let Some(secret) = self.applies(s, ctx) else {
                continue;
            };
            if headers.contains_key(t.header()) {
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

    /// True when this request's body must be buffered to swap placeholders.
    pub(crate) fn body_swap_for(&self, ctx: &ReqCtx<'_>) -> bool {
        self.secrets
            .iter()
            .any(|s| s.spec.in_body() && self.applies(s, ctx).is_some())
    }

    /// Swaps placeholders of `in_body` bindings that cover the request in a buffered body; flags
    /// the rest.
    pub(crate) fn rewrite_body(
        &self,
        body: &[u8],
        ctx: &ReqCtx<'_>,
        report: &mut Report,
    ) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for s in &self.secrets {
            let current = out.as_deref().unwrap_or(body);
            if memmem::find(current, s.placeholder.as_bytes()).is_none() {
                continue;
            }
            match self.applies(s, ctx) {
                Some(value) if s.spec.in_body() => {
                    out = Some(replace_all(
                        current,
                        s.placeholder.as_bytes(),
                        value.expose().as_bytes(),
                    ));
                    report.used.insert(s.name.clone());
                }
                _ => self.flag(s, ctx, "placeholder_in_body_not_swapped", report),
            }
        }
        out
    }

    /// For a body that streams through unbuffered: each placeholder and the flag it gets there.
    pub(crate) fn body_watch(&self, ctx: &ReqCtx<'_>) -> Vec<(Vec<u8>, String)> {
        self.secrets
            .iter()
            .map(|s| {
                let kind = self.unswapped_kind(s, ctx, "placeholder_in_body_not_swapped");
                (s.placeholder.as_bytes().to_vec(), format!("{kind}:{}", s.name))
            })
            .collect()
    }

    /// A masker for every value still held (of every phase).
    pub(crate) fn masker(&self) -> Masker {
        Masker::new(
            self.secrets
                .iter()
                .filter_map(|s| {
                    let v = s.value.as_ref()?;
                    Some((
                        s.name.clone(),
                        v.expose().as_bytes().to_vec(),
                        s.placeholder.as_bytes().to_vec(),
                    ))
                })
                .collect(),
        )
    }
}

/// The decoded user:password of a `Basic` credential, if `value` is one.
fn decode_basic(value: &[u8]) -> Option<Vec<u8>> {
    let rest = value
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case(b"basic "))
        .map(|_| &value[6..])?;
    let rest = std::str::from_utf8(rest).ok()?.trim();
    base64::engine::general_purpose::STANDARD.decode(rest).ok()
}

/// What the gateway knows about one request when it decides where placeholders may be swapped.
pub(crate) struct ReqCtx<'a> {
    pub(crate) host: &'a HostName,
    pub(crate) port: u16,
    pub(crate) method: &'a str,
    /// Path and query as sent.
    pub(crate) target: &'a str,
    pub(crate) header_names: &'a [&'a str],
    pub(crate) channel: Channel,
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

/// A request body streamed upstream unchanged while placeholders in it are noted (also when
/// split across frames), so the audit line can flag them.
pub(crate) struct WatchBody<B> {
    inner: B,
    needles: Vec<(memmem::Finder<'static>, String)>,
    tail: Vec<u8>,
    keep: usize,
    pub(crate) seen: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl<B> WatchBody<B> {
    pub(crate) fn new(inner: B, watch: Vec<(Vec<u8>, String)>) -> WatchBody<B> {
        let keep = watch
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        WatchBody {
            inner,
            needles: watch
                .into_iter()
                .map(|(n, f)| (memmem::Finder::new(&n).into_owned(), f))
                .collect(),
            tail: Vec::new(),
            keep,
            seen: Default::default(),
        }
    }
}

impl<B> Body for WatchBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                let this = &mut *self;
                let mut window = std::mem::take(&mut this.tail);
                window.extend_from_slice(d);
                for (finder, flag) in &this.needles {
                    if finder.find(&window).is_some() {
                        this.seen
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(flag.clone());
                    }
                }
                let from = window.len().saturating_sub(this.keep);
                this.tail = window.split_off(from);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SecretTable {
        let policy = hutch_policy::CheckedPolicy::from_toml_str(
            "allow = [\"a.test\", \"b.test\"]\n[secrets.A]\nhosts=[\"a.test\"]\nin_body=true\n[secrets.B]\nhosts=[\"b.test:443/v1/\"]\ninject={header=\"x-key\", value=\"K {value}\"}\n",
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

    fn ctx<'a>(host: &'a HostName, target: &'a str, channel: Channel) -> ReqCtx<'a> {
        ReqCtx {
            host,
            port: 443,
            method: "GET",
            target,
            header_names: &[],
            channel,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("hv"));
        }
        h
    }

    /// Class 6 (credential laundering): a placeholder is swapped only for its own host over TLS,
    /// and only in the one header its binding names.
    #[test]
    fn class_6_swap_only_for_bound_host_over_tls_in_its_header() {
        let t = table();
        let ph = t.placeholders(Phase::Agent);
        let a_ph = &ph[0].1;
        assert!(a_ph.starts_with("hutch-ph-A-") && a_ph.len() == "hutch-ph-A-".len() + 32);
        let a = host("a.test");
        let mut h = headers(&[
            ("authorization", &format!("Bearer {a_ph}")),
            ("x-other", a_ph),
        ]);
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &ctx(&a, "/", Channel::Tls), &mut r);
        assert_eq!(h["authorization"], "Bearer AAAA-real-value");
        assert_eq!(h["x-other"], a_ph.as_str(), "only the named header");
        assert!(r.used.contains("A"));
        assert!(r.flags.contains("placeholder_in_header_not_swapped:A"), "{r:?}");

        let b = host("b.test");
        let mut h = headers(&[("authorization", &format!("Bearer {a_ph}"))]);
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &ctx(&b, "/", Channel::Tls), &mut r);
        assert_eq!(h["authorization"], format!("Bearer {a_ph}").as_str());
        assert!(r.flags.contains("possible_exfiltration:A"), "{r:?}");

        let mut r = Report::default();
        let mut h = headers(&[("authorization", a_ph)]);
        t.rewrite_headers(&mut h, &ctx(&a, "/", Channel::Plaintext), &mut r);
        assert_eq!(h["authorization"], a_ph.as_str());
        assert!(r.flags.contains("placeholder_over_plaintext:A"), "{r:?}");
    }

    /// Class 17: `Basic` credentials carry the placeholder inside base64 (git, twine); it is
    /// swapped there too, and flagged there when sent elsewhere.
    #[test]
    fn class_17_basic_credentials_are_swapped_inside() {
        let t = table();
        let a_ph = t.placeholders(Phase::Agent)[0].1.clone();
        let b64 = base64::engine::general_purpose::STANDARD;
        let basic = format!("Basic {}", b64.encode(format!("x-access-token:{a_ph}")));
        let a = host("a.test");
        let mut h = headers(&[("authorization", &basic)]);
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &ctx(&a, "/", Channel::Tls), &mut r);
        let sent = decode_basic(h["authorization"].as_bytes()).expect("basic");
        assert_eq!(sent, b"x-access-token:AAAA-real-value");
        let mut h = headers(&[("authorization", &basic)]);
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &ctx(&host("b.test"), "/", Channel::Tls), &mut r);
        assert_eq!(h["authorization"], basic.as_str());
        assert!(r.flags.contains("possible_exfiltration:A"), "{r:?}");
    }

    /// Class 17: a binding scoped to a path prefix is swapped (and injected) only there.
    #[test]
    fn class_17_scope_by_path_and_inject() {
        let t = table();
        let ph = t.placeholders(Phase::Agent);
        let b = host("b.test");
        let mut h = HeaderMap::new();
        let mut r = Report::default();
        t.inject(&mut h, &ctx(&b, "/v1/x", Channel::Tls), &mut r);
        assert_eq!(h["x-key"], "K BBBB-real-value");
        let mut h = HeaderMap::new();
        t.inject(&mut h, &ctx(&b, "/v2/x", Channel::Tls), &mut Report::default());
        assert!(h.is_empty(), "no injection outside the path scope");
        let mut h = headers(&[("x-key", &ph[1].1)]);
        let mut r = Report::default();
        t.rewrite_headers(&mut h, &ctx(&b, "/v2/x", Channel::Tls), &mut r);
        assert_eq!(h["x-key"], ph[1].1.as_str());
        assert!(r.flags.contains("placeholder_out_of_scope:B"), "{r:?}");
        let mut h2 = headers(&[("x-key", "client-chose")]);
        t.inject(&mut h2, &ctx(&b, "/v1/x", Channel::Tls), &mut Report::default());
        assert_eq!(h2["x-key"], "client-chose");

        let a = host("a.test");
        let body = format!("{{\"token\":\"{}\",\"other\":\"{}\"}}", ph[0].1, ph[1].1);
        let mut r = Report::default();
        let out = t
            .rewrite_body(body.as_bytes(), &ctx(&a, "/", Channel::Tls), &mut r)
            .expect("changed");
        let out = String::from_utf8(out).expect("utf8");
        assert!(out.contains("AAAA-real-value") && out.contains(&ph[1].1), "{out}");
        assert!(r.flags.contains("possible_exfiltration:B"));
        // Not in the query unless the binding opts in.
        let target = format!("/x?k={}", ph[0].1);
        let mut r = Report::default();
        assert!(t.rewrite_target(&ctx(&a, &target, Channel::Tls), &mut r).is_none());
        assert!(r.flags.contains("placeholder_in_url_not_swapped:A"), "{r:?}");
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
            let c = ctx(&a, "/", Channel::Tls);
            let mut h = headers(&[("x-key", ph)]);
            let mut r = Report::default();
            t.rewrite_headers(&mut h, &c, &mut r);
            let body = t.rewrite_body(ph.as_bytes(), &c, &mut r);
            let mut injected = HeaderMap::new();
            t.inject(&mut injected, &c, &mut r);
            (
                h["x-key"].to_str().expect("ascii").to_string(),
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
        assert!(!t.masker().is_empty());
    }
}
