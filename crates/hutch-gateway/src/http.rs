//! HTTP pieces shared by the proxy and the inspected connections: body type, refusal responses,
//! hop-by-hop headers, and the authority checks that keep Host, SNI and CONNECT in agreement.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hutch_policy::HostName;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type GwBody = BoxBody<Bytes, BoxError>;

pub(crate) fn full(data: impl Into<Bytes>) -> GwBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty() -> GwBody {
    full(Bytes::new())
}

/// A plain-text answer from the gateway itself.
pub(crate) fn text(status: StatusCode, message: String) -> Response<GwBody> {
    let mut resp = Response::new(full(message));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        HeaderName::from_static("x-hutch"),
        HeaderValue::from_static("gateway"),
    );
    resp
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes headers that describe one hop, including those the Connection header lists.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in HOP_BY_HOP.iter().copied().map(str::to_string).chain(listed) {
        headers.remove(name.as_str());
    }
}

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        || req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Checks one `host[:port]` string against the decided name and port.
pub(crate) fn authority_matches(authority: &str, name: &HostName, port: u16) -> Result<(), String> {
    let (host, p) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p)),
        _ => (authority, None),
    };
    let parsed = HostName::parse(host).map_err(|e| e.to_string())?;
    if &parsed != name {
        return Err(format!(
            "{} does not match {name}",
            crate::audit::sanitize(authority)
        ));
    }
    if let Some(p) = p {
        if p.parse::<u16>().ok() != Some(port) {
            return Err(format!(
                "port in {} does not match {port}",
                crate::audit::sanitize(authority)
            ));
        }
    }
    Ok(())
}

/// Host header (required) and any absolute-form authority must both name the decided destination.
pub(crate) fn check_request_authority<B>(
    req: &Request<B>,
    name: &HostName,
    port: u16,
) -> Result<(), String> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h
            .to_str()
            .map_err(|_| "Host header is not ASCII".to_string())?,
        (None, _) => return Err("request has no Host header".into()),
        (Some(_), Some(_)) => return Err("request has more than one Host header".into()),
    };
    authority_matches(host, name, port).map_err(|e| format!("Host header {e}"))?;
    if let Some(auth) = req.uri().authority() {
        if auth.as_str().contains('@') {
            return Err("request target carries userinfo".into());
        }
        authority_matches(auth.as_str(), name, port).map_err(|e| format!("request target {e}"))?;
    }
    Ok(())
}

/// The request target as logged: path and query names, query values dropped when `drop_values`.
pub(crate) fn audit_path(uri: &Uri, drop_values: bool) -> String {
    let path = uri.path();
    let shown = match uri.query() {
        None => path.to_string(),
        Some(q) if drop_values => {
            let names: Vec<&str> = q
                .split('&')
                .map(|kv| kv.split('=').next().unwrap_or(""))
                .collect();
            format!(
                "{path}?{}",
                names
                    .iter()
                    .map(|n| format!("{n}="))
                    .collect::<Vec<_>>()
                    .join("&")
            )
        }
        Some(q) => format!("{path}?{q}"),
    };
    crate::audit::sanitize(&shown)
}

/// Origin-form target for the upstream request.
pub(crate) fn origin_form(uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    pq.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> HostName {
        HostName::parse(s).expect("name")
    }

    /// Threat 4/5 (parser differentials, fronting): Host must name exactly the decided host.
    #[test]
    fn threat5_authority_checks() {
        assert!(authority_matches("api.test", &n("api.test"), 443).is_ok());
        assert!(authority_matches("API.TEST.:443", &n("api.test"), 443).is_ok());
        assert!(authority_matches("api.test:8443", &n("api.test"), 443).is_err());
        assert!(authority_matches("evil.test", &n("api.test"), 443).is_err());
        assert!(authority_matches("api.test.evil.test", &n("api.test"), 443).is_err());
        assert!(authority_matches("127.0.0.1", &n("api.test"), 443).is_err());
        assert!(authority_matches("[::1]:443", &n("api.test"), 443).is_err());
        let req = Request::builder()
            .uri("https://evil.test/x")
            .header("host", "api.test")
            .body(())
            .expect("req");
        assert!(check_request_authority(&req, &n("api.test"), 443).is_err());
        let req = Request::builder()
            .uri("/x")
            .header("host", "api.test")
            .header("host", "evil.test")
            .body(())
            .expect("req");
        assert!(check_request_authority(&req, &n("api.test"), 443).is_err());
        let req = Request::builder().uri("/x").body(()).expect("req");
        assert!(check_request_authority(&req, &n("api.test"), 443).is_err());
    }

    #[test]
    fn audit_path_drops_query_values() {
        let uri: Uri = "/v1/x?token=abc&page=2".parse().expect("uri");
        assert_eq!(audit_path(&uri, true), "/v1/x?token=&page=");
        assert_eq!(audit_path(&uri, false), "/v1/x?token=abc&page=2");
    }
}
