//! The forge's REST API, GitHub's shape: `POST /repos/{owner}/{repo}/pulls` and
//! `POST /repos/{owner}/{repo}/issues/{n}/comments`, with the token as a bearer token. Redirects are not
//! followed (the token goes to the configured host only); answers are read up to a cap.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::retry::{self, Failure, RetryPolicy};
use crate::{ForgeError, ForgeRepo, SecretToken};

/// Largest answer read from the API.
const MAX_ANSWER: usize = 1 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// TLS for the API: the repository's CA file alone, or the system's roots.
pub(crate) fn tls_config(repo: &ForgeRepo) -> Result<rustls::ClientConfig, ForgeError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &repo.ca_file {
        Some(p) => {
            let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ForgeError::Config(format!("cannot read the forge's CA file {}: {e}", p.display())))?;
            if certs.is_empty() {
                return Err(ForgeError::Config(format!("the forge's CA file {} holds no certificate", p.display())));
            }
            for c in certs {
                roots.add(c).map_err(|e| ForgeError::Config(format!("unusable CA certificate in {}: {e}", p.display())))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ForgeError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

pub(crate) struct Api<'a> {
    repo: &'a ForgeRepo,
    token: &'a SecretToken,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct Pull {
    number: u64,
    html_url: String,
}

#[derive(Deserialize)]
struct Comment {
    id: u64,
}

impl<'a> Api<'a> {
    pub(crate) fn new(repo: &'a ForgeRepo, token: &'a SecretToken) -> Result<Api<'a>, ForgeError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(repo)?)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(15))
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("hutch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ForgeError::Config(format!("cannot build the forge's HTTP client: {e}")))?;
        Ok(Api { repo, token, http })
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/repos/{}/{}/{rest}", self.repo.api_base.trim_end_matches('/'), self.repo.owner, self.repo.name)
    }

    /// Opens a pull request from `head` into `base`; its number and web URL.
    pub(crate) async fn open_pull(&self, head: &str, base: &str, title: &str, body: &str, policy: RetryPolicy) -> Result<(u64, String), ForgeError> {
        let json = serde_json::json!({ "head": head, "base": base, "title": title, "body": body });
        let what = "opening the pull request";
        let p: Pull = retry::run(policy, what, || self.post(what, self.url("pulls"), &json)).await?;
        Ok((p.number, hutch_text::escape(&p.html_url).into_owned()))
    }

    /// Comments on issue (or pull request) `n`; the comment's id.
    pub(crate) async fn comment(&self, n: u64, body: &str, policy: RetryPolicy) -> Result<u64, ForgeError> {
        let json = serde_json::json!({ "body": body });
        let what = "posting the comment";
        let c: Comment = retry::run(policy, what, || self.post(what, self.url(&format!("issues/{n}/comments")), &json)).await?;
        Ok(c.id)
    }

    /// The open pull request whose head is `branch` of `owner`, if there is one.
    pub(crate) async fn find_pull(&self, owner: &str, branch: &str, policy: RetryPolicy) -> Result<Option<(u64, String)>, ForgeError> {
        let what = "looking up the pull request";
        let url = format!("{}?state=open&head={owner}:{branch}", self.url("pulls"));
        let list: Vec<Pull> = retry::run(policy, what, || self.send(what, self.http.get(url.clone()))).await?;
        Ok(list.into_iter().next().map(|p| (p.number, hutch_text::escape(&p.html_url).into_owned())))
    }

    async fn post<T: serde::de::DeserializeOwned>(&self, what: &str, url: String, json: &serde_json::Value) -> Result<T, Failure> {
        self.send(what, self.http.post(url).json(json)).await
    }

    async fn send<T: serde::de::DeserializeOwned>(&self, what: &str, rb: reqwest::RequestBuilder) -> Result<T, Failure> {
        let sent = rb
            .bearer_auth(self.token.expose())
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => return Err(Failure::Transient(self.token.redact(&error_chain(&e)))),
        };
        let status = resp.status();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if body.len() + c.len() > MAX_ANSWER {
                        return Err(Failure::Fatal(ForgeError::Rejected {
                            what: what.into(),
                            status: status.as_u16(),
                            message: format!("the answer is larger than {MAX_ANSWER} bytes"),
                        }));
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => return Err(Failure::Transient(self.token.redact(&error_chain(&e)))),
            }
        }
        let message = || hutch_text::shorten(&self.token.redact(&hutch_text::escape_bytes(&message_of(&body))), 500);
        match status.as_u16() {
            200..=299 => serde_json::from_slice(&body).map_err(|e| {
                Failure::Fatal(ForgeError::Rejected { what: what.into(), status: status.as_u16(), message: format!("unexpected answer: {e}") })
            }),
            401 | 403 => Err(Failure::Fatal(ForgeError::Unauthorized { what: what.into(), status: status.as_u16() })),
            500..=599 => Err(Failure::Transient(format!("HTTP {}: {}", status.as_u16(), message()))),
            s => Err(Failure::Fatal(ForgeError::Rejected { what: what.into(), status: s, message: message() })),
        }
    }
}

/// The `message` of a GitHub-style error body, else the body itself.
fn message_of(body: &[u8]) -> Vec<u8> {
    #[derive(Deserialize)]
    struct E {
        message: String,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(e) => e.message.into_bytes(),
        Err(_) => body.to_vec(),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
