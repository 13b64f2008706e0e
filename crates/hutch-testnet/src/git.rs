//! Git smart HTTP: each request under `/NAME.git/` runs `git http-backend` as a CGI program on
//! a bare repository the test created, with the host's git configuration shut out.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::body::{full, RespBody};
use crate::{io_err, TestNetError};

/// Largest CGI output read (test repositories are tiny).
const MAX_CGI_OUTPUT: u64 = 256 << 20;
const CGI_TIMEOUT: Duration = Duration::from_secs(120);

fn valid_repo_name(name: &str) -> bool {
    name.len() > 4
        && name.ends_with(".git")
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The repository a request path belongs to, if it names one that exists.
pub(crate) fn repo_of(root: &Path, route: &str) -> Option<String> {
    let first = route.strip_prefix('/')?.split('/').next()?;
    (valid_repo_name(first) && root.join(first).is_dir()).then(|| first.to_string())
}

/// Git with no system or user configuration, so the host's settings cannot change what a test sees.
fn git(home: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("git");
    c.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "hutch testnet")
        .env("GIT_AUTHOR_EMAIL", "testnet@example.test")
        .env("GIT_COMMITTER_NAME", "hutch testnet")
        .env("GIT_COMMITTER_EMAIL", "testnet@example.test");
    c
}

fn run(mut c: std::process::Command) -> Result<String, TestNetError> {
    let shown = format!("{c:?}");
    let out = c.output().map_err(io_err(format!("cannot run {shown}")))?;
    if !out.status.success() {
        return Err(TestNetError::Command {
            command: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn create_repo(
    root: &Path,
    name: &str,
    files: &[(&str, &str)],
    home: &Path,
) -> Result<PathBuf, TestNetError> {
    if !valid_repo_name(name) {
        return Err(TestNetError::BadRepoName(name.to_string()));
    }
    let bare = root.join(name);
    let mut c = git(home);
    c.args(["init", "-q", "--bare", "-b", "main"]).arg(&bare);
    run(c)?;
    let mut c = git(home);
    c.arg("-C")
        .arg(&bare)
        .args(["config", "http.receivepack", "true"]);
    run(c)?;
    let work = tempfile::Builder::new()
        .prefix("work-")
        .tempdir_in(home)
        .map_err(io_err("cannot create a work tree"))?;
    for (path, content) in files {
        let p = work.path().join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("cannot create {}", parent.display())))?;
        }
        std::fs::write(&p, content).map_err(io_err(format!("cannot write {}", p.display())))?;
    }
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "-A"],
        &["commit", "-q", "--allow-empty", "-m", "initial"],
    ] {
        let mut c = git(home);
        c.arg("-C").arg(work.path()).args(args);
        run(c)?;
    }
    let mut c = git(home);
    c.arg("-C")
        .arg(work.path())
        .args(["push", "-q"])
        .arg(&bare)
        .arg("main");
    run(c)?;
    Ok(bare)
}

pub(crate) fn refs(root: &Path, name: &str, home: &Path) -> Result<String, TestNetError> {
    if !valid_repo_name(name) {
        return Err(TestNetError::BadRepoName(name.to_string()));
    }
    let mut c = git(home);
    c.arg("-C").arg(root.join(name)).args([
        "for-each-ref",
        "--format=%(refname) %(objectname)",
        "refs/heads",
    ]);
    run(c)
}

pub(crate) fn in_repo(dir: &Path, args: &[&str], home: &Path) -> Result<String, TestNetError> {
    let mut c = git(home);
    c.arg("-C").arg(dir).args(args);
    run(c)
}

fn fail(status: StatusCode, msg: String) -> Response<RespBody> {
    let mut r = Response::new(full(msg));
    *r.status_mut() = status;
    r
}

pub(crate) async fn serve(
    root: &Path,
    _repo: &str,
    parts: &http::request::Parts,
    body: Bytes,
) -> Response<RespBody> {
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let home = root.parent().unwrap_or(root);
    let mut cmd = tokio::process::Command::from(git(home));
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header(header::CONTENT_TYPE))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header(header::CONTENT_ENCODING))
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_USER", "testnet")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = parts
        .headers
        .get("git-protocol")
        .and_then(|v| v.to_str().ok())
    {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("testnet: cannot run git http-backend: {e}\n"),
            )
        }
    };
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "testnet: git http-backend has no pipes\n".into(),
        );
    };
    // Input and output are moved at the same time: git may answer before it has read everything.
    let feed = async move {
        let _ = stdin.write_all(&body).await;
        drop(stdin);
    };
    let collect = async move {
        let mut out = Vec::new();
        let r = stdout.take(MAX_CGI_OUTPUT).read_to_end(&mut out).await;
        r.map(|_| out)
    };
    let errors = async move {
        let mut err = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut err).await;
        err
    };
    let done = tokio::time::timeout(CGI_TIMEOUT, async {
        let ((), out, err) = tokio::join!(feed, collect, errors);
        let status = child.wait().await;
        (out, err, status)
    })
    .await;
    let (out, err, status) = match done {
        Ok(x) => x,
        Err(_) => {
            return fail(
                StatusCode::GATEWAY_TIMEOUT,
                "testnet: git http-backend timed out\n".into(),
            )
        }
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("testnet: reading git http-backend: {e}\n"),
            )
        }
    };
    if !matches!(status, Ok(s) if s.success()) && out.is_empty() {
        return fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "testnet: git http-backend failed: {}\n",
                String::from_utf8_lossy(&err)
            ),
        );
    }
    cgi_response(&out)
}

/// Turns CGI output (header lines, a blank line, the body) into a response.
fn cgi_response(out: &[u8]) -> Response<RespBody> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let (consumed, parsed) = match httparse::parse_headers(out, &mut headers) {
        Ok(httparse::Status::Complete((n, h))) => (n, h),
        Ok(httparse::Status::Partial) => {
            return fail(
                StatusCode::BAD_GATEWAY,
                "testnet: git http-backend output has no end of headers\n".into(),
            )
        }
        Err(e) => {
            return fail(
                StatusCode::BAD_GATEWAY,
                format!("testnet: bad git http-backend headers: {e}\n"),
            )
        }
    };
    let mut resp = Response::new(full(Bytes::copy_from_slice(&out[consumed..])));
    for h in parsed.iter() {
        if h.name.eq_ignore_ascii_case("status") {
            let code = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.split_whitespace().next())
                .and_then(|c| c.parse::<u16>().ok());
            match code.and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(s) => *resp.status_mut() = s,
                None => {
                    return fail(
                        StatusCode::BAD_GATEWAY,
                        "testnet: bad Status from git http-backend\n".into(),
                    )
                }
            }
            continue;
        }
        let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return fail(
                StatusCode::BAD_GATEWAY,
                "testnet: bad header from git http-backend\n".into(),
            );
        };
        resp.headers_mut().append(name, value);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(r: Response<RespBody>) -> Vec<u8> {
        r.into_body().collect().await.expect("body").to_bytes().to_vec()
    }

    #[tokio::test]
    async fn cgi_output_becomes_a_response() {
        let r = cgi_response(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nmissing");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(body(r).await, b"missing");
        let r = cgi_response(
            b"Content-Type: application/x-git-upload-pack-advertisement\n\n001e# service",
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body(r).await, b"001e# service");
        assert_eq!(
            cgi_response(b"Content-Type: x").status(),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn repository_names_are_checked() {
        for bad in ["repo", ".git", "../x.git", "a/b.git", ".hidden.git"] {
            assert!(!valid_repo_name(bad), "{bad}");
        }
        assert!(valid_repo_name("repo.git"));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            create_repo(dir.path(), "../evil.git", &[], dir.path()),
            Err(TestNetError::BadRepoName(_))
        ));
    }
}
