//! The host tools the builds shell out to: finding them (naming the apt package when one is
//! missing) and running them with their stderr kept for error messages.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::ImageError;

/// A host program and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub(crate) const APT_CACHE: Tool = Tool {
    name: "apt-cache",
    package: "apt",
};
pub(crate) const APT_GET: Tool = Tool {
    name: "apt-get",
    package: "apt",
};
pub(crate) const DPKG_DEB: Tool = Tool {
    name: "dpkg-deb",
    package: "dpkg",
};
pub(crate) const MODINFO: Tool = Tool {
    name: "modinfo",
    package: "kmod",
};
pub(crate) const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
};
pub(crate) const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};
pub(crate) const UNSHARE: Tool = Tool {
    name: "unshare",
    package: "util-linux",
};
pub(crate) const ZSTD: Tool = Tool {
    name: "zstd",
    package: "zstd",
};
pub(crate) const LZ4: Tool = Tool {
    name: "lz4",
    package: "lz4",
};
pub(crate) const GZIP: Tool = Tool {
    name: "gzip",
    package: "gzip",
};

/// The static busybox that goes into every initramfs. Only the `busybox-static` package puts a
/// static binary here; the plain `busybox` package's one is dynamic and would not run in the
/// initramfs, which is checked separately.
pub(crate) const BUSYBOX_PATH: &str = "/bin/busybox";
pub(crate) const BUSYBOX_PACKAGE: &str = "busybox-static";

/// sbin directories are searched too: a non-root PATH often lacks them, and `modinfo` and
/// `mkfs.ext4` live there.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

impl Tool {
    pub fn find(self) -> Result<PathBuf, ImageError> {
        let from_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        from_path
            .into_iter()
            .chain(EXTRA_DIRS.iter().map(PathBuf::from))
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable_file(candidate))
            .ok_or(ImageError::MissingTool {
                tool: self.name,
                package: self.package,
            })
    }

    /// A [`command`] for this tool.
    pub fn command(self) -> Result<Command, ImageError> {
        Ok(command(self.find()?))
    }
}

/// A `Command` with stdin closed (no tool ever waits on a terminal) that is sent SIGTERM
/// if the thread that started it dies, so a killed build does not leave mmdebstrap or apt
/// running on in a directory the next build will reap.
pub(crate) fn command(program: impl AsRef<OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and makes only the prctl
    // system call, which is async-signal-safe; it allocates nothing and touches no state
    // shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    cmd
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `cmd` to completion, capturing its output; a non-zero exit becomes
/// [`ImageError::CommandFailed`] carrying the tail of stderr and `hint` (what to do).
pub(crate) fn run(cmd: &mut Command, hint: &str) -> Result<Output, ImageError> {
    let shown = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ImageError::Spawn {
            command: shown.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(output);
    }
    Err(ImageError::CommandFailed {
        command: shown,
        status: output.status.to_string(),
        stderr_tail: tail(&output.stderr, &output.stdout),
        hint: if hint.is_empty() {
            String::new()
        } else {
            format!("; {hint}")
        },
    })
}

/// Stdout of a successful run, as text.
pub(crate) fn run_text(cmd: &mut Command, hint: &str) -> Result<String, ImageError> {
    let out = run(cmd, hint)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line as a user would type it (program name without its directory).
pub(crate) fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    std::iter::once(program)
        .chain(
            cmd.get_args()
                .map(|a: &OsStr| a.to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last few lines of stderr (or of stdout when stderr is empty), enough to see the cause
/// without drowning the message in a tool's progress chatter.
fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    const LINES: usize = 12;
    const CHARS: usize = 1500;
    let text = if stderr.iter().all(u8::is_ascii_whitespace) {
        String::from_utf8_lossy(stdout)
    } else {
        String::from_utf8_lossy(stderr)
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(LINES);
    let mut joined = lines[start..].join(" | ");
    if joined.len() > CHARS {
        let mut cut = joined.len() - CHARS;
        while !joined.is_char_boundary(cut) {
            cut += 1;
        }
        joined = format!("...{}", &joined[cut..]);
    }
    if joined.is_empty() {
        "no output".to_owned()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let tool = Tool {
            name: "hutch-no-such-tool",
            package: "hutch-no-such-package",
        };
        let err = tool.find().expect_err("tool should be missing");
        assert_eq!(
            err.to_string(),
            "hutch-no-such-tool not found: install it with `apt-get install hutch-no-such-package`"
        );
    }

    #[test]
    fn failed_command_reports_stderr_tail_and_hint() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one >&2; echo two >&2; exit 3"]);
        let err = run(&mut cmd, "do the thing").expect_err("command fails");
        let msg = err.to_string();
        assert!(msg.contains("one | two"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.ends_with("; do the thing"), "{msg}");
    }
}
