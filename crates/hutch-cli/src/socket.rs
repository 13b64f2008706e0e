//! The daemon's unix socket: bound under a temporary name beside its place, given mode 0660 and its group, then
//! renamed into place, so that it never exists at its path with other permissions. A stale socket (nobody
//! listening) is replaced; a live one or a file that is not a socket is an error. Removed when dropped.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// A bound, listening socket file.
#[derive(Debug)]
pub struct UnixSocket {
    path: PathBuf,
    ino: u64,
    listener: std::os::unix::net::UnixListener,
}

/// Binds `path` for the members of `group` (mode 0660).
pub fn bind(path: &Path, group: &str) -> anyhow::Result<UnixSocket> {
    let gid = nix::unistd::Group::from_name(group)
        .with_context(|| format!("looking up the group {group}"))?
        .with_context(|| {
            format!(
                "the group {group} does not exist: create it (`groupadd --system {group}`, or install contrib/systemd/hutch.sysusers) \
                 and add the users who may use the daemon (`usermod -aG {group} USER`), or name another with --socket-group"
            )
        })?
        .gid;
    let path = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let parent = path.parent().filter(|p| p.is_dir()).with_context(|| {
        format!("the directory of {} does not exist: create it (the systemd unit's RuntimeDirectory=hutch makes /run/hutch)", path.display())
    })?;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                bail!("another daemon is listening on {} (stop it, or give this one another --unix)", path.display());
            }
            // Left by a daemon that died: nobody answers on it.
            std::fs::remove_file(&path).with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket: remove it or give another --unix", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let name = path.file_name().context("the socket path has no file name")?.to_string_lossy().into_owned();
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    let placed = (|| -> anyhow::Result<u64> {
        std::os::unix::fs::chown(&tmp, None, Some(gid.as_raw()))
            .with_context(|| format!("giving {} to the group {group} (the daemon's user must be in it)", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)).with_context(|| format!("chmod 0660 {}", tmp.display()))?;
        let ino = std::fs::symlink_metadata(&tmp).with_context(|| format!("inspecting {}", tmp.display()))?.ino();
        std::fs::rename(&tmp, &path).with_context(|| format!("moving the socket into place at {}", path.display()))?;
        Ok(ino)
    })();
    let ino = match placed {
        Ok(ino) => ino,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    listener.set_nonblocking(true).context("a non-blocking socket")?;
    Ok(UnixSocket { path, ino, listener })
}

impl UnixSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener for the async runtime.
    pub fn listener(&self) -> anyhow::Result<tokio::net::UnixListener> {
        let l = self.listener.try_clone().context("cloning the socket")?;
        tokio::net::UnixListener::from_std(l).context("registering the socket")
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        // Only our own socket: another daemon may have replaced a file it thought stale.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn my_group() -> String {
        nix::unistd::Group::from_gid(nix::unistd::getegid()).unwrap().unwrap().name
    }

    #[test]
    fn binds_0660_replaces_a_stale_socket_and_refuses_a_live_one_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        // A stale socket: a socket file no stream listener answers on. Not a dropped listener: a process another
        // test forks at that moment inherits its descriptor until it execs, so the listener may still answer.
        drop(std::os::unix::net::UnixDatagram::bind(&path).unwrap());
        let s = bind(&path, &my_group()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
        assert!(bind(&path, &my_group()).unwrap_err().to_string().contains("another daemon is listening"));
        drop(s);
        assert!(!path.exists(), "removed with the daemon");
        std::fs::write(&path, b"x").unwrap();
        assert!(bind(&path, &my_group()).unwrap_err().to_string().contains("is not a socket"));
        let e = bind(&dir.path().join("other.sock"), "no-such-group-hutch").unwrap_err().to_string();
        assert!(e.contains("does not exist") && e.contains("groupadd"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary names left");
    }
}
