//! A small GitHub-compatible forge on the test net: private repositories at `/OWNER/NAME.git` served by
//! `git http-backend` (fetch and push) behind a token, `POST /repos/OWNER/NAME/pulls`,
//! `GET /repos/OWNER/NAME/pulls?head=OWNER:BRANCH` and `POST /repos/OWNER/NAME/issues/N/comments`, with a
//! record of everything it received (which token each request carried, pushed refs, pull request and comment
//! bodies) for tests to assert on, and injected failures (a status for the next N requests of a kind).
//!
//! A token is accepted as `Authorization: Bearer T`, `token T` (GitHub's REST spelling) or Basic with `T` as the
//! password (what git sends from a credential or an `x-access-token` header). Anything else gets 401 with
//! `WWW-Authenticate`, as GitHub answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::{full, RespBody};
use crate::TestNetError;

/// Which requests an injected failure hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ForgeRoute {
    /// `POST /repos/OWNER/NAME/pulls`.
    Pulls,
    /// `POST /repos/OWNER/NAME/issues/N/comments`.
    Comments,
    /// git fetch (`info/refs?service=git-upload-pack` and `git-upload-pack`).
    Fetch,
    /// git push (`info/refs?service=git-receive-pack` and `git-receive-pack`).
    Push,
}

/// One request the forge answered (after authentication, before any injected failure).
#[derive(Clone, Debug, Serialize)]
pub struct ForgeRequest {
    pub method: String,
    pub path: String,
    pub route: Option<ForgeRoute>,
    /// The token the request carried, in whichever form (`None`: no credentials).
    pub token: Option<String>,
    pub status: u16,
}

/// A ref update in a push, as the client sent it.
#[derive(Clone, Debug, Serialize)]
pub struct PushedRef {
    pub owner: String,
    pub repo: String,
    pub name: String,
    pub old: String,
    pub new: String,
    pub token: Option<String>,
    /// The push was accepted (git http-backend answered 200).
    pub accepted: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct PullRequest {
    pub owner: String,
    pub repo: String,
    pub number: u64,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub token: Option<String>,
    pub html_url: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct IssueComment {
    pub owner: String,
    pub repo: String,
    pub issue: u64,
    pub id: u64,
    pub body: String,
    pub token: Option<String>,
}

/// Everything the forge received, in order of arrival per kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ForgeRecord {
    pub requests: Vec<ForgeRequest>,
    pub pushes: Vec<PushedRef>,
    pub pulls: Vec<PullRequest>,
    pub comments: Vec<IssueComment>,
}

impl ForgeRecord {
    /// Whether any request carried `token`.
    pub fn saw_token(&self, token: &str) -> bool {
        self.requests.iter().any(|r| r.token.as_deref() == Some(token))
    }
}

#[derive(Debug)]
struct Fault {
    route: ForgeRoute,
    status: u16,
    left: u32,
}

#[derive(Debug)]
struct Repo {
    token: String,
    /// Issue and pull request numbers come from one counter, as on GitHub.
    next_number: u64,
}

#[derive(Debug, Default)]
struct State {
    repos: BTreeMap<(String, String), Repo>,
    faults: Vec<Fault>,
    record: ForgeRecord,
    next_comment: u64,
}

/// The forge's shared state (cheap to clone).
#[derive(Clone, Debug, Default)]
pub(crate) struct Forge {
    root: PathBuf,
    state: Arc<Mutex<State>>,
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<RespBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    r
}

fn message(status: StatusCode, msg: &str) -> Response<RespBody> {
    json(status, serde_json::json!({ "message": msg }))
}

/// The token in an `Authorization` header, in any of the forms the forge accepts.
fn token_of(parts: &http::request::Parts) -> Option<String> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" | "token" => Some(rest.to_string()),
        "basic" => {
            let raw = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
            let raw = String::from_utf8(raw).ok()?;
            raw.split_once(':').map(|(_, p)| p.to_string())
        }
        _ => None,
    }
}

/// `old new ref` commands at the start of a receive-pack request (pkt-lines up to the flush packet).
fn push_commands(body: &[u8]) -> Vec<(String, String, String)> {
    let mut out = vec![];
    let mut rest = body;
    while rest.len() >= 4 {
        let Some(len) = std::str::from_utf8(&rest[..4]).ok().and_then(|h| usize::from_str_radix(h, 16).ok()) else {
            break;
        };
        if len == 0 || len < 4 || len > rest.len() {
            break;
        }
        let line = &rest[4..len];
        let line = line.split(|&b| b == 0).next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut it = line.trim_end().splitn(3, ' ');
        if let (Some(o), Some(n), Some(r)) = (it.next(), it.next(), it.next()) {
            out.push((o.to_string(), n.to_string(), r.to_string()));
        }
        rest = &rest[len..];
    }
    out
}

impl Forge {
    pub(crate) fn new(root: PathBuf) -> Forge {
        Forge { root, state: Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn create_repo(
        &self,
        owner: &str,
        name: &str,
        files: &[(&str, &str)],
        token: &str,
        home: &Path,
    ) -> Result<PathBuf, TestNetError> {
        if !valid_part(owner) || !valid_part(name) || name.ends_with(".git") {
            return Err(TestNetError::BadRepoName(format!("{owner}/{name}")));
        }
        let dir = self.root.join(owner);
        std::fs::create_dir_all(&dir).map_err(crate::io_err(format!("cannot create {}", dir.display())))?;
        let bare = crate::git::create_repo(&dir, &format!("{name}.git"), files, home)?;
        self.lock()
            .repos
            .insert((owner.to_string(), name.to_string()), Repo { token: token.to_string(), next_number: 1 });
        Ok(bare)
    }

    pub(crate) fn repo_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.root.join(owner).join(format!("{name}.git"))
    }

    pub(crate) fn record(&self) -> ForgeRecord {
        self.lock().record.clone()
    }

    pub(crate) fn inject(&self, route: ForgeRoute, status: u16, times: u32) {
        self.lock().faults.push(Fault { route, status, left: times });
    }

    /// Whether this request is the forge's: a path under a repository it holds.
    pub(crate) fn owns(&self, path: &str) -> bool {
        self.split(path).is_some()
    }

    /// (owner, name, rest) of `/OWNER/NAME.git/REST` or `/repos/OWNER/NAME/REST` for a repository that exists;
    /// `git` tells which.
    fn split<'a>(&self, path: &'a str) -> Option<(String, String, &'a str, bool)> {
        let p = path.strip_prefix('/')?;
        let (git, owner, name, rest) = if let Some(api) = p.strip_prefix("repos/") {
            let mut it = api.splitn(3, '/');
            (false, it.next()?, it.next()?, it.next().unwrap_or(""))
        } else {
            let mut it = p.splitn(3, '/');
            let owner = it.next()?;
            let name = it.next()?.strip_suffix(".git")?;
            (true, owner, name, it.next().unwrap_or(""))
        };
        let key = (owner.to_string(), name.to_string());
        self.lock().repos.contains_key(&key).then(|| (key.0, key.1, rest, git))
    }

    fn take_fault(&self, route: Option<ForgeRoute>) -> Option<u16> {
        let route = route?;
        let mut st = self.lock();
        let f = st.faults.iter_mut().find(|f| f.route == route && f.left > 0)?;
        f.left -= 1;
        Some(f.status)
    }

    fn note(&self, parts: &http::request::Parts, route: Option<ForgeRoute>, token: &Option<String>, status: StatusCode) {
        self.lock().record.requests.push(ForgeRequest {
            method: parts.method.to_string(),
            path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            route,
            token: token.clone(),
            status: status.as_u16(),
        });
    }

    pub(crate) async fn handle(&self, parts: &http::request::Parts, body: Bytes) -> Response<RespBody> {
        let path = parts.uri.path();
        let Some((owner, name, rest, git)) = self.split(path) else {
            return message(StatusCode::NOT_FOUND, "Not Found");
        };
        let query = parts.uri.query().unwrap_or("");
        let route = if git {
            match (rest, query) {
                ("info/refs", q) if q.contains("service=git-receive-pack") => Some(ForgeRoute::Push),
                ("git-receive-pack", _) => Some(ForgeRoute::Push),
                ("info/refs", _) | ("git-upload-pack", _) => Some(ForgeRoute::Fetch),
                _ => None,
            }
        } else if rest == "pulls" && parts.method == http::Method::POST {
            Some(ForgeRoute::Pulls)
        } else if rest.starts_with("issues/") && rest.ends_with("/comments") && parts.method == http::Method::POST {
            Some(ForgeRoute::Comments)
        } else {
            None
        };
        let token = token_of(parts);
        let expected = self.lock().repos.get(&(owner.clone(), name.clone())).map(|r| r.token.clone());
        if token.is_none() || token != expected {
            let mut r = if git {
                let mut r = Response::new(full("Authentication failed\n"));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                r
            } else {
                message(StatusCode::UNAUTHORIZED, "Bad credentials")
            };
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"hutch-testnet forge\""));
            self.note(parts, route, &token, r.status());
            return r;
        }
        if let Some(status) = self.take_fault(route) {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            self.note(parts, route, &token, status);
            return message(status, "injected failure");
        }
        let resp = if git {
            let commands = if route == Some(ForgeRoute::Push) && rest == "git-receive-pack" { push_commands(&body) } else { vec![] };
            let r = crate::git::serve(&self.root, "", parts, body).await;
            let accepted = r.status() == StatusCode::OK;
            let mut st = self.lock();
            for (old, new, name_) in commands {
                st.record.pushes.push(PushedRef {
                    owner: owner.clone(),
                    repo: name.clone(),
                    name: name_,
                    old,
                    new,
                    token: token.clone(),
                    accepted,
                });
            }
            r
        } else {
            match route {
                Some(ForgeRoute::Pulls) => self.open_pull(parts, &owner, &name, &body, &token).await,
                Some(ForgeRoute::Comments) => self.comment(&owner, &name, rest, &body, &token),
                _ if rest == "pulls" && parts.method == http::Method::GET => self.list_pulls(&owner, &name, query),
                _ => message(StatusCode::NOT_FOUND, "Not Found"),
            }
        };
        self.note(parts, route, &token, resp.status());
        resp
    }

    async fn open_pull(
        &self,
        parts: &http::request::Parts,
        owner: &str,
        name: &str,
        body: &[u8],
        token: &Option<String>,
    ) -> Response<RespBody> {
        #[derive(serde::Deserialize)]
        struct Req {
            head: String,
            base: String,
            title: String,
            #[serde(default)]
            body: String,
        }
        let req: Req = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return message(StatusCode::BAD_REQUEST, &format!("Problems parsing JSON: {e}")),
        };
        // `OWNER:BRANCH` names a branch of a fork; only this repository's own branches exist here.
        let head = req.head.split_once(':').map(|(_, b)| b.to_string()).unwrap_or(req.head.clone());
        let dir = self.repo_dir(owner, name);
        for (what, branch) in [("head", &head), ("base", &req.base)] {
            let ok = tokio::process::Command::new("git")
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .arg("-C")
                .arg(&dir)
                .args(["rev-parse", "-q", "--verify"])
                .arg(format!("refs/heads/{branch}"))
                .output()
                .await
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !ok {
                return json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({ "message": "Validation Failed", "errors": [{ "resource": "PullRequest", "field": what, "code": "invalid" }] }),
                );
            }
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("localhost")
            .to_string();
        let mut st = self.lock();
        if st.record.pulls.iter().any(|p| p.owner == owner && p.repo == name && p.head == head && p.base == req.base) {
            return json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "message": "Validation Failed", "errors": [{ "resource": "PullRequest", "code": "custom", "message": format!("A pull request already exists for {owner}:{head}.") }] }),
            );
        }
        let Some(repo) = st.repos.get_mut(&(owner.to_string(), name.to_string())) else {
            return message(StatusCode::NOT_FOUND, "Not Found");
        };
        let number = repo.next_number;
        repo.next_number += 1;
        let html_url = format!("https://{host}/{owner}/{name}/pull/{number}");
        st.record.pulls.push(PullRequest {
            owner: owner.into(),
            repo: name.into(),
            number,
            head: head.clone(),
            base: req.base.clone(),
            title: req.title,
            body: req.body,
            token: token.clone(),
            html_url: html_url.clone(),
        });
        json(
            StatusCode::CREATED,
            serde_json::json!({ "number": number, "html_url": html_url, "state": "open", "head": { "ref": head }, "base": { "ref": req.base } }),
        )
    }

    fn list_pulls(&self, owner: &str, name: &str, query: &str) -> Response<RespBody> {
        let head = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("head="))
            .map(|h| h.replace("%3A", ":").replace("%3a", ":"))
            .map(|h| h.split_once(':').map(|(_, b)| b.to_string()).unwrap_or(h));
        let st = self.lock();
        let list: Vec<serde_json::Value> = st
            .record
            .pulls
            .iter()
            .filter(|p| p.owner == owner && p.repo == name && head.as_ref().map_or(true, |h| *h == p.head))
            .map(|p| serde_json::json!({ "number": p.number, "html_url": p.html_url, "state": "open", "head": { "ref": p.head }, "base": { "ref": p.base } }))
            .collect();
        json(StatusCode::OK, serde_json::Value::Array(list))
    }

    fn comment(&self, owner: &str, name: &str, rest: &str, body: &[u8], token: &Option<String>) -> Response<RespBody> {
        let n = rest.strip_prefix("issues/").and_then(|r| r.strip_suffix("/comments")).and_then(|n| n.parse::<u64>().ok());
        let Some(issue) = n.filter(|n| *n > 0) else {
            return message(StatusCode::NOT_FOUND, "Not Found");
        };
        #[derive(serde::Deserialize)]
        struct Req {
            body: String,
        }
        let req: Req = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return message(StatusCode::BAD_REQUEST, &format!("Problems parsing JSON: {e}")),
        };
        let mut st = self.lock();
        st.next_comment += 1;
        let id = 1000 + st.next_comment;
        st.record.comments.push(IssueComment {
            owner: owner.into(),
            repo: name.into(),
            issue,
            id,
            body: req.body,
            token: token.clone(),
        });
        json(StatusCode::CREATED, serde_json::json!({ "id": id }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_commands_are_read_from_pkt_lines() {
        let line = format!("{} {} refs/heads/hutch/1\0report-status side-band-64k\n", "0".repeat(40), "a".repeat(40));
        let body = format!("{:04x}{line}0000PACK...", line.len() + 4);
        let cmds = push_commands(body.as_bytes());
        assert_eq!(cmds, vec![("0".repeat(40), "a".repeat(40), "refs/heads/hutch/1".to_string())]);
        assert!(push_commands(b"zzzz").is_empty());
    }

    #[test]
    fn tokens_are_read_in_every_accepted_form() {
        let parts = |v: &str| {
            let (p, _) = http::Request::builder().header("authorization", v).body(()).unwrap().into_parts();
            p
        };
        assert_eq!(token_of(&parts("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(token_of(&parts("token abc")).as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("x-access-token:abc");
        assert_eq!(token_of(&parts(&format!("Basic {basic}"))).as_deref(), Some("abc"));
        assert_eq!(token_of(&parts("Digest abc")), None);
    }
}
