//! Guest file operations for the API. Guest paths are checked before anything runs: absolute, no `..`, no NUL,
//! bounded length; they name files inside the guest only, and no host path is ever formed from them.
//! Upload and download use the agent's file protocol; list, stat, mkdir and remove run coreutils/findutils in
//! the guest with argv (never a shell), and their errors are mapped to statuses by errno text.

use std::time::Duration;

use hutch_proto::ExitStatus;
use hutch_sandbox::AgentClient;

use crate::manager::ManagerError;
use crate::model::{FileKind, FileList, FileStat};

pub const MAX_PATH: usize = 4096;
pub const MAX_LIST: usize = 10_000;
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// A checked absolute guest path, normalized (no empty or `.` components, no trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPath(String);

impl GuestPath {
    pub fn parse(s: &str) -> Result<GuestPath, String> {
        if s.is_empty() {
            return Err("path is empty; give an absolute guest path such as /root/file.txt".into());
        }
        if s.len() > MAX_PATH {
            return Err(format!("path is longer than {MAX_PATH} bytes"));
        }
        if s.contains('\0') {
            return Err("path contains a NUL byte".into());
        }
        if !s.starts_with('/') {
            return Err(format!("path {s:?} must be absolute (start with /); it names a file in the guest"));
        }
        let mut parts = Vec::new();
        for c in s.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(format!("path {s:?} contains '..'; give the path without parent-directory steps")),
                c => parts.push(c),
            }
        }
        Ok(GuestPath(format!("/{}", parts.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }
}

/// Maps a guest error message (errno text) to the API status it deserves.
pub fn classify(path: &str, message: &str) -> ManagerError {
    let m = message.trim();
    let msg = format!("{path}: {m}");
    if m.contains("No such file or directory") {
        ManagerError::NotFound(msg)
    } else if m.contains("File exists") || m.contains("Directory not empty") {
        ManagerError::Conflict(msg)
    } else if m.contains("Is a directory") || m.contains("Not a directory") || m.contains("not a regular file") {
        ManagerError::BadInput(msg)
    } else if m.contains("No space left") || m.contains("Read-only file system") || m.contains("Permission denied") {
        ManagerError::Conflict(msg)
    } else {
        ManagerError::BadInput(msg)
    }
}

struct Ran {
    ok: bool,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs a guest tool with a fixed PATH and cwd `/`, so a user who removed their home directory still gets
/// answers. A guest that cannot run the tool at all (the user deleted it) is the sandbox's state: 409.
async fn run(client: &AgentClient, argv: &[&str]) -> Result<Ran, ManagerError> {
    let req = hutch_proto::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()), ("LC_ALL".into(), "C".into())],
        cwd: Some("/".into()),
        stdin: false,
        tty: None,
    };
    let gone = |e: hutch_sandbox::SandboxError| ManagerError::Conflict(format!("the sandbox did not answer ({})", hutch_sandbox::error_chain(&e)));
    let collect = async {
        let mut h = client.exec(req).await.map_err(gone)?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(ev) = h.events.next().await {
            match ev {
                hutch_proto::ExecEvent::Started { .. } => {}
                hutch_proto::ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                hutch_proto::ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                hutch_proto::ExecEvent::Exited(st) => {
                    return Ok(Ran { ok: st == ExitStatus::Code(0), stdout, stderr: String::from_utf8_lossy(&stderr).into_owned() })
                }
                hutch_proto::ExecEvent::SpawnFailed { message, .. } => {
                    return Err(ManagerError::Conflict(format!("the guest cannot run {} ({message}); was it removed from the sandbox?", argv[0])))
                }
            }
        }
        Err(ManagerError::Conflict("the sandbox stopped while answering".into()))
    };
    tokio::time::timeout(OP_TIMEOUT, collect)
        .await
        .map_err(|_| ManagerError::Conflict(format!("{} did not finish within {OP_TIMEOUT:?} in the guest", argv[0])))?
}

// depth, type, size, mode (octal), mtime (seconds.fraction), path; NUL-terminated so any name survives.
const FIND_FORMAT: &str = "%d\t%y\t%s\t%m\t%T@\t%p\\0";

fn parse_records(out: &[u8]) -> Vec<(u32, FileStat)> {
    let mut v = Vec::new();
    for rec in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let text = String::from_utf8_lossy(rec);
        let mut f = text.splitn(6, '\t');
        let (Some(depth), Some(ty), Some(size), Some(mode), Some(mtime), Some(path)) = (f.next(), f.next(), f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        let kind = match ty {
            "f" => FileKind::File,
            "d" => FileKind::Dir,
            "l" => FileKind::Symlink,
            _ => FileKind::Other,
        };
        let mtime_ms = mtime.parse::<f64>().map(|s| (s * 1000.0) as i64).unwrap_or(0);
        v.push((
            depth.parse().unwrap_or(0),
            FileStat { path: path.to_string(), kind, size: size.parse().unwrap_or(0), mode: mode.to_string(), mtime_ms },
        ));
    }
    v
}

pub async fn stat(client: &AgentClient, path: &GuestPath) -> Result<FileStat, ManagerError> {
    let r = run(client, &["find", path.as_str(), "-maxdepth", "0", "-printf", FIND_FORMAT]).await?;
    if !r.ok {
        return Err(classify(path.as_str(), strip_tool(&r.stderr)));
    }
    parse_records(&r.stdout).into_iter().next().map(|(_, s)| s).ok_or_else(|| ManagerError::Failed(format!("{}: no answer from find", path.as_str())))
}

pub async fn list(client: &AgentClient, path: &GuestPath) -> Result<FileList, ManagerError> {
    let r = run(client, &["find", path.as_str(), "-maxdepth", "1", "-printf", FIND_FORMAT]).await?;
    if !r.ok {
        return Err(classify(path.as_str(), strip_tool(&r.stderr)));
    }
    let mut recs = parse_records(&r.stdout);
    match recs.iter().find(|(d, _)| *d == 0) {
        Some((_, s)) if s.kind == FileKind::Dir => {}
        Some(_) => return Err(ManagerError::BadInput(format!("{} is not a directory; use stat", path.as_str()))),
        None => return Err(ManagerError::Failed(format!("{}: no answer from find", path.as_str()))),
    }
    recs.retain(|(d, _)| *d == 1);
    let mut entries: Vec<FileStat> = recs.into_iter().map(|(_, s)| s).collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.truncate(MAX_LIST);
    Ok(FileList { path: path.as_str().to_string(), entries })
}

pub async fn mkdir(client: &AgentClient, path: &GuestPath, parents: bool) -> Result<FileStat, ManagerError> {
    let argv: Vec<&str> = if parents { vec!["mkdir", "-p", "--", path.as_str()] } else { vec!["mkdir", "--", path.as_str()] };
    let r = run(client, &argv).await?;
    if !r.ok {
        return Err(classify(path.as_str(), strip_tool(&r.stderr)));
    }
    stat(client, path).await
}

pub async fn remove(client: &AgentClient, path: &GuestPath, recursive: bool) -> Result<(), ManagerError> {
    if path.is_root() {
        return Err(ManagerError::BadInput("refusing to remove / (delete the sandbox instead)".into()));
    }
    let argv: Vec<&str> = if recursive { vec!["rm", "-r", "--", path.as_str()] } else { vec!["rm", "-d", "--", path.as_str()] };
    let r = run(client, &argv).await?;
    if !r.ok {
        return Err(classify(path.as_str(), strip_tool(&r.stderr)));
    }
    Ok(())
}

/// `find: '/x': No such file or directory` -> `No such file or directory`.
fn strip_tool(stderr: &str) -> &str {
    let line = stderr.lines().next().unwrap_or(stderr);
    line.rsplit(": ").next().unwrap_or(line)
}

/// Why a download produced no body.
#[derive(Debug)]
pub enum DownloadError {
    /// The agent refused (no such file, not a regular file, ...) or its channel failed.
    Guest(hutch_sandbox::SandboxError),
    /// The download task itself died.
    Task(String),
}

/// A guest file as a streamed `application/octet-stream` response, for every API surface. The agent answers
/// with the file's metadata or an error before any byte: an error ends the download (and the writer) before
/// data, so "no data yet and EOF" means the task has its answer, which becomes an `Err`. A failure after the
/// first byte can only cut the body short: the stream ends with an error, so the client sees an incomplete
/// response, never a silently truncated file.
pub async fn stream_download(client: AgentClient, path: &GuestPath) -> Result<axum::response::Response, DownloadError> {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    use tokio::io::AsyncBufReadExt;
    let octets = [(axum::http::header::CONTENT_TYPE, "application/octet-stream")];
    let (w, r) = tokio::io::duplex(256 << 10);
    let p = path.as_str().to_string();
    let task = tokio::spawn(async move {
        let mut w = w;
        client.get_file(&p, &mut w).await
    });
    let mut reader = tokio::io::BufReader::with_capacity(256 << 10, r);
    let has_data = matches!(reader.fill_buf().await, Ok(b) if !b.is_empty());
    if !has_data {
        return match task.await {
            Ok(Ok(_)) => Ok((octets, axum::body::Body::empty()).into_response()),
            Ok(Err(e)) => Err(DownloadError::Guest(e)),
            Err(e) => Err(DownloadError::Task(format!("download task: {e}"))),
        };
    }
    let tail = futures::stream::once(async move {
        match task.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Err(std::io::Error::other(hutch_sandbox::error_chain(&e)))),
            Err(e) => Some(Err(std::io::Error::other(e.to_string()))),
        }
    })
    .filter_map(|x| async move { x });
    let body = tokio_util::io::ReaderStream::new(reader).chain(tail);
    Ok((octets, axum::body::Body::from_stream(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_checked_and_normalized() {
        assert_eq!(GuestPath::parse("/root//a/./b/").unwrap().as_str(), "/root/a/b");
        assert_eq!(GuestPath::parse("/").unwrap().as_str(), "/");
        assert!(GuestPath::parse("/root/../../etc/passwd").unwrap_err().contains(".."));
        assert!(GuestPath::parse("../etc").unwrap_err().contains("absolute"));
        assert!(GuestPath::parse("etc/passwd").unwrap_err().contains("absolute"));
        assert!(GuestPath::parse("/a\0b").unwrap_err().contains("NUL"));
        assert!(GuestPath::parse("").is_err());
        assert!(GuestPath::parse(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn find_records_and_errors_are_parsed() {
        let out = b"0\td\t4096\t755\t1700000000.5\t/root\x001\tf\t3\t644\t1700000001.25\t/root/a\tb\n\x00";
        let recs = parse_records(out);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].1.path, "/root/a\tb\n");
        assert_eq!(recs[1].1.kind, FileKind::File);
        assert_eq!(recs[1].1.mtime_ms, 1_700_000_001_250);
        assert!(matches!(classify("/x", strip_tool("find: '/x': No such file or directory\n")), ManagerError::NotFound(_)));
        assert!(matches!(classify("/x", strip_tool("rm: cannot remove '/x': Directory not empty")), ManagerError::Conflict(_)));
        assert!(matches!(classify("/x", "cannot open /x: Is a directory (os error 21)"), ManagerError::BadInput(_)));
    }
}
