//! The initramfs component: a compressed newc cpio holding static busybox, the kernel modules
//! the guest needs (in load order), the agent, and `/init`, which mounts the root disk and
//! hands PID 1 over to the agent.
//!
//! Contract of `/init` (kernel command line needs nothing special; `console=ttyS0 quiet
//! panic=-1` is what Hutch passes):
//! 1. mounts proc, sysfs, devtmpfs; loads the modules of the [`ModulePlan`];
//! 2. waits up to 5 s for `/dev/vda`, mounts it (ext4, rw) on `/newroot`, a tmpfs on
//!    `/newroot/run`, copies `/hutch-agent` to `/newroot/run/hutch-agent` (mode 0755);
//! 3. moves `/dev`, `/proc`, `/sys` into the new root and runs
//!    `switch_root /newroot /run/hutch-agent init`: the agent is PID 1 with argv
//!    `["/run/hutch-agent", "init"]`, stdin/stdout/stderr on the console, the kernel's
//!    default environment (`PATH=/sbin:/usr/sbin:/bin:/usr/bin`, `HOME=/`, `TERM=linux`);
//! 4. on any failure prints one line `hutch-init: <what failed>` and powers off.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{ImageError, IoContext};
use crate::modules::ModulePlan;
use crate::spec::Agent;
use crate::tools::{self, Tool};

/// The `/init` script; `@MODULES@` becomes the module names in load order. Quiet and without
/// sleeps on the happy path: it polls for the disk only if it is not there yet.
pub const INIT_TEMPLATE: &str = r#"#!/bin/busybox sh
# /init of a Hutch guest, written by hutch-image: load drivers, mount the root disk,
# hand PID 1 to the agent.
fail() {
	echo "hutch-init: $*"
	poweroff -f
	exit 1
}
mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
for m in @MODULES@; do
	insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m"
done
n=0
while [ ! -b /dev/vda ]; do
	n=$((n + 1))
	[ "$n" -le 500 ] || fail "no root disk: /dev/vda did not appear within 5 s (attach the rootfs as a virtio-blk device)"
	usleep 10000
done
mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda (ext4) on /newroot"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run || fail "cannot mount a tmpfs on /newroot/run"
cp /hutch-agent /newroot/run/hutch-agent || fail "cannot copy the agent to /newroot/run/hutch-agent"
chmod 0755 /newroot/run/hutch-agent || fail "cannot make /newroot/run/hutch-agent executable"
for d in dev proc sys; do
	mount --move "/$d" "/newroot/$d" || fail "cannot move /$d into the new root"
done
exec switch_root /newroot /run/hutch-agent init
"#;

/// The busybox applets `/init` calls (as symlinks in `/bin`).
const APPLETS: &[&str] = &[
    "chmod",
    "cp",
    "insmod",
    "mount",
    "poweroff",
    "sh",
    "switch_root",
    "usleep",
];

/// How the cpio archive is compressed; the Debian kernel unpacks all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    Lz4,
}

/// Chosen by measurement (Debian 6.1 cloud kernel under TCG, same 4.2 MiB archive): the
/// kernel's "unpack initramfs" step took ~90 ms with lz4 (1.9 MiB), ~90 ms uncompressed,
/// ~115 ms with gzip -9 (1.6 MiB) and ~140-260 ms with zstd -19 (1.4 MiB). lz4 unpacks as
/// fast as no compression at half the size.
pub(crate) const COMPRESSION: Compression = Compression::Lz4;

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }

    pub(crate) fn tool(self) -> Tool {
        match self {
            Compression::Gzip => tools::GZIP,
            Compression::Zstd => tools::ZSTD,
            Compression::Lz4 => tools::LZ4,
        }
    }

    fn command(self) -> Result<Command, ImageError> {
        let args: &[&str] = match self {
            Compression::Gzip => &["-n", "-9", "-c"],
            Compression::Zstd => &["-q", "-19", "-T0", "-c"],
            // The kernel reads only the legacy lz4 frame format (-l).
            Compression::Lz4 => &["-q", "-l", "-9", "-c"],
        };
        let mut cmd = self.tool().command()?;
        cmd.args(args);
        Ok(cmd)
    }
}

/// The init script for `plan`.
pub(crate) fn init_script(plan: &ModulePlan) -> String {
    let names: Vec<&str> = plan.load_order.iter().map(|m| m.name.as_str()).collect();
    INIT_TEMPLATE.replace("@MODULES@", &names.join(" "))
}

/// Writes the compressed initramfs to `out`. `modules_root` is the kernel's
/// `lib/modules/<release>` directory the plan's paths are relative to.
pub(crate) fn build(
    plan: &ModulePlan,
    modules_root: &Path,
    busybox: &[u8],
    agent: &Agent,
    compression: Compression,
    out: &Path,
) -> Result<(), ImageError> {
    let mut compressor = compression.command()?;
    let shown = tools::describe(&compressor);
    let file = File::create(out).ctx("creating", out)?;
    let mut child = compressor
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            command: shown.clone(),
            source,
        })?;
    let stdin = child.stdin.take().ok_or_else(|| ImageError::Spawn {
        command: shown.clone(),
        source: std::io::Error::other("no stdin pipe"),
    })?;
    let written = write_archive(BufWriter::new(stdin), plan, modules_root, busybox, agent);
    let output = child
        .wait_with_output()
        .map_err(|source| ImageError::Spawn {
            command: shown.clone(),
            source,
        })?;
    written?;
    if !output.status.success() {
        return Err(ImageError::CommandFailed {
            command: shown,
            status: output.status.to_string(),
            stderr_tail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            hint: String::new(),
        });
    }
    Ok(())
}

fn write_archive<W: Write>(
    w: W,
    plan: &ModulePlan,
    modules_root: &Path,
    busybox: &[u8],
    agent: &Agent,
) -> Result<(), ImageError> {
    let init = init_script(plan);
    let mut archive = Archive { w, ino: 0 };
    let pipe = Path::new("initramfs compressor pipe");
    let io = |e: std::io::Error| ImageError::io("writing", pipe, e);
    for dir in ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"] {
        archive.dir(dir).map_err(io)?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    archive
        .char_device("dev/console", 0o600, 5, 1)
        .map_err(io)?;
    archive.file("bin/busybox", 0o755, busybox).map_err(io)?;
    for applet in APPLETS {
        archive
            .symlink(&format!("bin/{applet}"), "busybox")
            .map_err(io)?;
    }
    archive.file("init", 0o755, init.as_bytes()).map_err(io)?;
    archive
        .file("hutch-agent", 0o755, &agent.bytes)
        .map_err(io)?;
    for module in &plan.load_order {
        let src = modules_root.join(&module.path);
        let bytes = std::fs::read(&src).ctx("reading kernel module", &src)?;
        archive
            .file(&format!("lib/modules/{}.ko", module.name), 0o644, &bytes)
            .map_err(io)?;
    }
    let mut w = cpio::newc::trailer(archive.w).map_err(io)?;
    w.flush().map_err(io)
}

/// A newc archive being written: root-owned entries, zero mtimes, fresh inode numbers.
struct Archive<W: Write> {
    w: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry_with(cpio::NewcBuilder::new(name).mode(mode), data)
    }

    fn entry_with(&mut self, builder: cpio::NewcBuilder, data: &[u8]) -> std::io::Result<()> {
        self.ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| std::io::Error::other("file too large for a newc archive (4 GiB)"))?;
        // `Builder::write` takes the writer by value; a `&mut W` lends it for one entry.
        let mut writer = builder.ino(self.ino).uid(0).gid(0).write(&mut self.w, size);
        writer.write_all(data)?;
        writer.finish()?;
        Ok(())
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        let b = cpio::NewcBuilder::new(name).mode(0o040_755).nlink(2);
        self.entry_with(b, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, 0o100_000 | perm, data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> std::io::Result<()> {
        self.entry(name, 0o120_777, target.as_bytes())
    }

    fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> std::io::Result<()> {
        let b = cpio::NewcBuilder::new(name)
            .mode(0o020_000 | perm)
            .rdev_major(major)
            .rdev_minor(minor);
        self.entry_with(b, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::ModuleFile;

    fn plan() -> ModulePlan {
        ModulePlan {
            load_order: vec![
                ModuleFile {
                    name: "virtio_ring".into(),
                    path: "kernel/drivers/virtio/virtio_ring.ko".into(),
                },
                ModuleFile {
                    name: "virtio".into(),
                    path: "kernel/drivers/virtio/virtio.ko".into(),
                },
            ],
            builtin: vec![],
            absent: vec![],
        }
    }

    #[test]
    fn init_lists_modules_in_order_and_never_sleeps_unconditionally() {
        let init = init_script(&plan());
        assert!(init.contains("for m in virtio_ring virtio; do"), "{init}");
        assert!(init.ends_with("exec switch_root /newroot /run/hutch-agent init\n"));
        // The only wait is the poll for a disk that is not there yet.
        let lines: Vec<&str> = init.lines().map(str::trim).collect();
        let sleeps: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].contains("sleep"))
            .collect();
        assert_eq!(sleeps.len(), 1, "{init}");
        assert!(
            lines[..sleeps[0]].contains(&"while [ ! -b /dev/vda ]; do"),
            "{init}"
        );
        // Every applet /init calls is linked.
        for applet in [
            "mount",
            "insmod",
            "usleep",
            "cp",
            "chmod",
            "switch_root",
            "poweroff",
        ] {
            assert!(APPLETS.contains(&applet), "{applet}");
            assert!(init.contains(applet), "{applet}");
        }
    }

    #[test]
    fn init_parses_as_shell() {
        let init = init_script(&plan());
        let out = Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&init)
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn archive_lists_with_the_cpio_tool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(modules.join("kernel/drivers/virtio")).expect("mkdir");
        for m in &plan().load_order {
            std::fs::write(modules.join(&m.path), m.name.as_bytes()).expect("write");
        }
        let agent = Agent {
            bytes: b"#!/bin/sh\necho hi\n".to_vec(),
            sha256: String::new(),
        };
        let mut raw = Vec::new();
        write_archive(&mut raw, &plan(), &modules, b"busybox-bytes", &agent).expect("archive");
        let mut cpio = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio tool installed (apt-get install cpio)");
        cpio.stdin
            .take()
            .expect("stdin")
            .write_all(&raw)
            .expect("feed");
        let out = cpio.wait_with_output().expect("cpio");
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "init",
            "hutch-agent",
            "bin/sh -> busybox",
            "lib/modules/virtio_ring.ko",
            "dev/console",
        ] {
            assert!(
                listing.contains(needle),
                "{needle} missing from:\n{listing}"
            );
        }
        assert!(listing
            .lines()
            .any(|l| l.starts_with("crw-------") && l.contains("5,")));
    }
}
