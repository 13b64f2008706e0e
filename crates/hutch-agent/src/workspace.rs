//! The repository as a disk: the host attaches a read-only filesystem image (erofs) as a drive; the agent mounts
//! it under `/run` and puts an overlay over it at `/workspace`, whose upper layer on the VM's own disk takes every
//! write. At the end, the paths the VM touched are read off that upper layer (files, whiteouts, opaque
//! directories) instead of scanning the whole tree.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use hutch_proto::MountWorkspace;
use nix::mount::{mount, MsFlags};

/// Where the image itself is mounted (read-only).
pub const LOWER: &str = "/run/hutch/workspace-image";
/// The overlay's writable layers, on the VM's disk (not in memory: build output can be large).
pub const OVERLAY: &str = "/var/tmp/hutch/overlay";

/// The workspace drive, opened once when the agent starts (so, in a VM restored from a snapshot, already open in
/// the restored memory): under emulation, finding it through sysfs and opening it cost a fresh VM 10-30 ms of
/// kernel code run for the first time, on every run. The drive's identity (its serial, its place in device order)
/// is the snapshot's; only the image behind it changes, which is why the kernel's buffers are still dropped.
static SLOT: std::sync::OnceLock<Slot> = std::sync::OnceLock::new();
/// The workspace base drive (the extra device a delta image's unchanged data lives in), opened like [`SLOT`].
static BASE: std::sync::OnceLock<Slot> = std::sync::OnceLock::new();

struct Slot {
    serial: String,
    dev: PathBuf,
    file: std::fs::File,
}

/// At the agent's start, before it announces itself: finds and opens the workspace drives, and makes the
/// directories a first mount needs (on the VM's disk, in the snapshot), so that a restored VM's first mount does
/// none of that. A VM without a drive simply has no slot; `mount_workspace` then says so.
pub fn prepare() {
    for (slot, serial) in [(&SLOT, hutch_proto::WORKSPACE_SERIAL), (&BASE, hutch_proto::WORKSPACE_BASE_SERIAL)] {
        if let Ok(dev) = find_drive(serial) {
            if let Ok(file) = std::fs::File::open(&dev) {
                let _ = slot.set(Slot { serial: serial.to_string(), dev, file });
            }
        }
    }
    for d in [LOWER.to_string(), format!("{OVERLAY}/upper"), format!("{OVERLAY}/work")] {
        let _ = std::fs::create_dir_all(d);
    }
    // The mount point is made by the mount itself (a VM without a workspace has no `/workspace`), but made and
    // removed once here: ext4 places a top-level directory by a hash of its name, so this reads the very
    // allocation bitmaps the real one needs into the cache the snapshot keeps (~15 ms less per run under TCG).
    if std::fs::create_dir(hutch_proto::WORKSPACE_DIR).is_ok() {
        let _ = std::fs::remove_dir(hutch_proto::WORKSPACE_DIR);
    }
}

/// The drive `serial` names: the one `prepare` opened, else found and opened now.
fn open_drive<'a>(opened: &'a std::sync::OnceLock<Slot>, serial: &str, now: &'a mut Option<(PathBuf, std::fs::File)>) -> Result<(&'a Path, &'a std::fs::File), String> {
    if let Some(s) = opened.get().filter(|s| s.serial == serial) {
        return Ok((s.dev.as_path(), &s.file));
    }
    let dev = find_drive(serial)?;
    let file = std::fs::File::open(&dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    let (dev, file) = now.insert((dev, file));
    Ok((dev.as_path(), file))
}

/// Drops whatever the kernel cached of the drives, and mounts image and overlay.
pub fn mount_workspace(req: &MountWorkspace) -> Result<(), String> {
    let (mut opened, mut base_opened) = (None, None);
    let (dev, file) = open_drive(&SLOT, &req.serial, &mut opened)?;
    let base = match &req.base_serial {
        Some(serial) if *serial == req.serial => return Err(format!("the base drive {serial:?} is the image's own drive")),
        Some(serial) => Some(open_drive(&BASE, serial, &mut base_opened).map_err(|e| format!("the workspace base drive: {e}"))?),
        None => None,
    };
    // In a VM restored from an environment snapshot the setup run's workspace is still mounted, over the image
    // that was in the slot then: detach both (a process the setup left behind may still hold them) and start
    // from a new, empty upper layer, so the new image is seen whole and nothing of the old tree survives.
    let mut detached = false;
    for m in [req.target.as_str(), LOWER] {
        match nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => detached = true,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(format!("cannot detach the previous workspace at {m}: {e}")),
        }
    }
    let upper = format!("{OVERLAY}/upper");
    let work = format!("{OVERLAY}/work");
    // Nothing was mounted and the upper layer `prepare` made is still empty: it is used as it is (the overlay
    // clears its work directory itself). Anything else, or an upper layer an earlier mount may still hold, goes.
    let fresh = !detached && is_empty_dir(Path::new(&upper)) && Path::new(&work).is_dir();
    if !fresh {
        match std::fs::remove_dir_all(OVERLAY) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove the previous overlay {OVERLAY}: {e}")),
        }
    }
    flush_buffers(dev, file)?;
    if let Some((bdev, bfile)) = base {
        // The base slot was swapped under a restored VM just like the image's own.
        flush_buffers(bdev, bfile)?;
    }
    std::fs::create_dir_all(LOWER).map_err(|e| format!("cannot create {LOWER}: {e}"))?;
    mount_image(dev, file, base.map(|(d, _)| d))?;
    for d in [upper.as_str(), work.as_str(), req.target.as_str()] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {d}: {e}"))?;
    }
    // Redirects and metadata-only copies would leave changed content outside the upper layer's plain entries;
    // with both off every change there is a file, a directory, a whiteout or an opaque directory.
    let opts = format!("lowerdir={LOWER},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off,index=off,xino=off");
    mount(Some("overlay"), req.target.as_str(), Some("overlay"), MsFlags::MS_NODEV | MsFlags::MS_NOSUID, Some(opts.as_str()))
        .map_err(|e| format!("cannot mount the workspace overlay on {}: {e}", req.target))
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_none())
}

/// `Ok` when the overlay at the workspace is ours and its upper layer holds no entry at all: every write,
/// creation, deletion (whiteout), copy-up and metadata change in the overlay leaves an entry there, so the merged
/// view is exactly the image. A few syscalls, no process.
pub fn untouched() -> Result<(), String> {
    let upper = Path::new(OVERLAY).join("upper");
    let mut entries = std::fs::read_dir(&upper).map_err(|e| format!("cannot read {}: {e}", upper.display()))?;
    match entries.next() {
        None => Ok(()),
        Some(Ok(e)) => Err(format!("the upper layer holds {}", e.file_name().to_string_lossy())),
        Some(Err(e)) => Err(format!("cannot read {}: {e}", upper.display())),
    }
}

/// Mounts the image read-only on [`LOWER`]: as erofs (what hutch makes; its mount reads the superblock itself),
/// else, by the superblock's magic, as ext4 (no journal replay), so that either can be measured. With `base`, the
/// image is an erofs image whose device table names one extra device, the drive `base`.
fn mount_image(dev: &Path, file: &std::fs::File, base: Option<&Path>) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    if let Some(base) = base {
        // Extra devices are given to erofs by path, in the order of the image's device table.
        let data = format!("device={}", base.display());
        return mount(Some(dev), LOWER, Some("erofs"), ro, Some(data.as_str())).map_err(|e| {
            format!("cannot mount the workspace image {} (erofs, extra device {}) on {LOWER}: {e}", dev.display(), base.display())
        });
    }
    let erofs = match mount(Some(dev), LOWER, Some("erofs"), ro, None::<&str>) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let mut sb = [0u8; 2048];
    file.read_exact_at(&mut sb, 0).map_err(|e| format!("cannot read {}: {e}", dev.display()))?;
    if sb[1024 + 0x38..1024 + 0x3a] == 0xEF53u16.to_le_bytes() {
        return mount(Some(dev), LOWER, Some("ext4"), ro, Some("noload"))
            .map_err(|e| format!("cannot mount the workspace image {} (ext4) on {LOWER}: {e}", dev.display()));
    }
    if sb[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes() {
        return Err(format!("cannot mount the workspace image {} (erofs) on {LOWER}: {erofs}", dev.display()));
    }
    Err(format!("{} holds neither an erofs nor an ext4 filesystem", dev.display()))
}

/// The block device whose virtio serial number is `serial`.
fn find_drive(serial: &str) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("cannot list /sys/block: {e}"))?;
    for e in entries.flatten() {
        let Ok(s) = std::fs::read(e.path().join("serial")) else { continue };
        if s.trim_ascii() == serial.as_bytes() {
            return Ok(Path::new("/dev").join(e.file_name()));
        }
    }
    Err(format!("no drive with serial {serial:?} (the VM was started without that drive slot)"))
}

/// The placeholder that sat in the drive slot when the snapshot was taken was probed at boot; whatever the kernel
/// kept of it must not be read back as the image's blocks.
fn flush_buffers(dev: &Path, f: &std::fs::File) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument and only acts on the open block device `f`, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF, 0) };
    if r != 0 {
        return Err(format!("cannot flush {}: {}", dev.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `hutch-agent workspace-changes UPPER LOWER OUT`, run from the workspace with git's environment: one process
/// for what the host's collection step needs to know (under emulation each process costs a tenth of a second or
/// more). Makes `OUT` afresh and writes there `paths`: the paths the overlay's upper layer says changed
/// (NUL-separated, relative), less those git ignores, for `git add -A --pathspec-from-file`; only files are
/// named (never directories), so git never meets an ignored directory named exactly. Prints `<count> <moved|same>`
/// (whether anything that can move HEAD was written under `.git`), then the SHA-256 of `.git/config`, `hooks/*`
/// and `info/*` as `sha256sum` prints them.
pub fn changes_main(args: &[String]) -> i32 {
    let (Some(upper), Some(lower), Some(out)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("usage: hutch-agent workspace-changes UPPER LOWER OUT");
        return 2;
    };
    match changes(Path::new(upper), Path::new(lower), Path::new(out)) {
        Ok(report) => {
            let mut so = std::io::stdout().lock();
            if so.write_all(report.as_bytes()).and_then(|()| so.flush()).is_err() {
                return 1;
            }
            0
        }
        Err(e) => {
            eprintln!("hutch-agent: workspace-changes: {e}");
            1
        }
    }
}

fn changes(upper: &Path, lower: &Path, out: &Path) -> Result<String, String> {
    match std::fs::remove_dir_all(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", out.display())),
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let paths = changed_paths(upper, lower).map_err(|e| format!("reading the overlay: {e}"))?;
    let kept = without_ignored(Path::new("."), paths).map_err(|e| format!("git check-ignore: {e}"))?;
    let mut list = Vec::new();
    for p in &kept {
        list.extend_from_slice(p);
        list.push(0);
    }
    std::fs::write(out.join("paths"), list).map_err(|e| format!("cannot write {}: {e}", out.join("paths").display()))?;
    let refs = if refs_written(upper) { "moved" } else { "same" };
    let mut report = format!("{} {refs}\n", kept.len());
    report.push_str(&git_meta_digests(Path::new(".git")));
    // Also beside OUT, where the host's collection script reads it when the host ran this step on its own first
    // (one process instead of a shell and this one, when nothing changed).
    let mut beside = out.as_os_str().to_owned();
    beside.push(".report");
    std::fs::write(&beside, &report).map_err(|e| format!("cannot write {}: {e}", Path::new(&beside).display()))?;
    Ok(report)
}

/// Whether the VM wrote anything under `.git` that can change what HEAD names: HEAD itself, a ref, packed refs,
/// or the whole directory replaced. Unwritten, HEAD is still the snapshot's base.
fn refs_written(upper: &Path) -> bool {
    let g = upper.join(".git");
    match std::fs::symlink_metadata(&g) {
        Err(_) => false,
        Ok(m) if !m.is_dir() => true,
        Ok(_) => opaque(&g) || ["HEAD", "packed-refs", "refs"].iter().any(|n| std::fs::symlink_metadata(g.join(n)).is_ok()),
    }
}

fn git_meta_digests(git_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut files = vec!["config".to_string()];
    for d in ["hooks", "info"] {
        if let Ok(rd) = std::fs::read_dir(git_dir.join(d)) {
            let mut names: Vec<String> = rd.flatten().map(|e| format!("{d}/{}", e.file_name().to_string_lossy())).collect();
            names.sort();
            files.extend(names);
        }
    }
    let mut out = String::new();
    for f in files {
        if let Ok(bytes) = std::fs::read(git_dir.join(&f)) {
            let hex: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&format!("{hex}  {f}\n"));
        }
    }
    out
}

/// Every path under the overlay that may differ from the image: non-directories of the upper layer, whiteouts,
/// and the image's files hidden by an opaque directory, a whiteout or a non-directory over a directory.
pub fn changed_paths(upper: &Path, lower: &Path) -> std::io::Result<BTreeSet<Vec<u8>>> {
    let mut out = BTreeSet::new();
    walk(upper, lower, &mut Vec::new(), &mut out)?;
    Ok(out)
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn at(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn walk(upper: &Path, lower: &Path, rel: &mut Vec<u8>, out: &mut BTreeSet<Vec<u8>>) -> std::io::Result<()> {
    for e in std::fs::read_dir(at(upper, rel))? {
        let e = e?;
        let name = e.file_name();
        // The VM's own git metadata never leaves it; its commits travel as a bundle.
        if rel.is_empty() && name.as_bytes() == b".git" {
            continue;
        }
        let p = join(rel, name.as_bytes());
        let meta = std::fs::symlink_metadata(at(upper, &p))?;
        let ft = meta.file_type();
        let lower_meta = std::fs::symlink_metadata(at(lower, &p)).ok();
        let lower_dir = lower_meta.as_ref().is_some_and(|m| m.is_dir());
        if ft.is_char_device() && meta.rdev() == 0 {
            // A whiteout: the image's entry is gone.
            match &lower_meta {
                Some(_) if lower_dir => lower_files(lower, &p, out)?,
                Some(_) => {
                    out.insert(p);
                }
                None => {}
            }
        } else if ft.is_dir() {
            if lower_dir && opaque(&at(upper, &p)) {
                lower_files(lower, &p, out)?;
            } else if lower_meta.is_some() && !lower_dir {
                out.insert(p.clone());
            }
            walk(upper, lower, &mut p.clone(), out)?;
        } else {
            if lower_dir {
                lower_files(lower, &p, out)?;
            }
            out.insert(p);
        }
    }
    Ok(())
}

/// Every non-directory under `rel` in the image.
fn lower_files(lower: &Path, rel: &[u8], out: &mut BTreeSet<Vec<u8>>) -> std::io::Result<()> {
    for e in std::fs::read_dir(at(lower, rel))? {
        let e = e?;
        let p = join(rel, e.file_name().as_bytes());
        if e.file_type()?.is_dir() {
            lower_files(lower, &p, out)?;
        } else {
            out.insert(p);
        }
    }
    Ok(())
}

fn opaque(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut v = [0u8; 2];
    // SAFETY: `c` is a NUL-terminated path and `v` a writable buffer of the length passed; both outlive the call.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), c"trusted.overlay.opaque".as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    n == 1 && v[0] == b'y'
}

/// Drops the paths git ignores (tracked files are never ignored, so changes to them stay).
fn without_ignored(repo: &Path, paths: BTreeSet<Vec<u8>>) -> std::io::Result<Vec<Vec<u8>>> {
    if paths.is_empty() {
        return Ok(vec![]);
    }
    // `check-ignore` takes no pathspec magic (so not `GIT_LITERAL_PATHSPECS`); a leading `./` keeps a name that
    // starts with `:` from being read as magic. One verbose record per path, in order, says which rule decided.
    let mut input = Vec::new();
    for p in &paths {
        input.extend_from_slice(b"./");
        input.extend_from_slice(p);
        input.push(0);
    }
    let mut child = std::process::Command::new("git")
        .args(["check-ignore", "-z", "--stdin", "--verbose", "--non-matching"])
        .env_remove("GIT_LITERAL_PATHSPECS")
        .current_dir(repo)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let mut out = Vec::new();
    child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?.read_to_end(&mut out)?;
    let status = child.wait()?;
    let _ = writer.join();
    // 0: some paths are ignored; 1: none is.
    if !matches!(status.code(), Some(0 | 1)) {
        return Err(std::io::Error::other(format!("exited with {status}")));
    }
    // `<source> NUL <line> NUL <pattern> NUL <path> NUL`; a `!pattern` re-includes.
    let fields: Vec<&[u8]> = out.strip_suffix(b"\0").unwrap_or(&out).split(|&b| b == 0).collect();
    if fields.len() != paths.len() * 4 {
        return Err(std::io::Error::other(format!("{} fields for {} paths", fields.len(), paths.len())));
    }
    Ok(paths
        .into_iter()
        .zip(fields.chunks(4))
        .filter(|(_, rec)| rec[2].is_empty() || rec[2].starts_with(b"!"))
        .map(|(p, _)| p)
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(s: &BTreeSet<Vec<u8>>) -> Vec<String> {
        s.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()
    }

    fn setxattr(path: &Path, name: &std::ffi::CStr, v: &[u8]) -> bool {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a buffer of the given length, all alive during the call.
        unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) == 0 }
    }

    #[test]
    fn ignored_paths_are_dropped_but_tracked_ones_stay() {
        let t = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let st = std::process::Command::new("git").args(args).current_dir(t.path()).env("GIT_CONFIG_GLOBAL", "/dev/null").output().unwrap();
            assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        };
        git(&["init", "-q"]);
        std::fs::write(t.path().join(".gitignore"), "*.o\n!keep.o\nbuild/\n").unwrap();
        std::fs::write(t.path().join("tracked.o"), "x").unwrap();
        git(&["add", "-f", "tracked.o"]);
        let paths: BTreeSet<Vec<u8>> =
            ["a.c", "b.o", "keep.o", "tracked.o", ":odd.o", ":(top)x", "build/out", "dir/c.o"].iter().map(|p| p.as_bytes().to_vec()).collect();
        let kept = without_ignored(t.path(), paths).unwrap();
        let kept: Vec<String> = kept.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        assert_eq!(kept, [":(top)x", "a.c", "keep.o", "tracked.o"]);
    }

    #[test]
    fn upper_layer_entries_become_paths() {
        let t = tempfile::tempdir().unwrap();
        let p = |s: &str| t.path().join(s);
        for d in ["l/keep", "l/gone", "l/op/x", "l/d2f", "u/keep", "u/op/fresh", "u/.git", "u/new/deep", "u/f2d"] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        for f in ["l/a", "l/f2d", "l/rm", "l/keep/k", "l/gone/g", "l/op/x/y", "l/d2f/z", "u/a", "u/keep/changed", "u/.git/index"] {
            std::fs::write(p(f), "x").unwrap();
        }
        for f in ["u/new/deep/n", "u/d2f", "u/f2d/inner", "u/op/fresh/o"] {
            std::fs::write(p(f), "x").unwrap();
        }
        let whiteout = |s: &str| nix::sys::stat::mknod(&p(s), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o600), 0);
        let special = whiteout("u/rm").is_ok()
            && whiteout("u/gone").is_ok()
            && whiteout("u/nothing-below").is_ok()
            && setxattr(&p("u/op"), c"trusted.overlay.opaque", b"y");
        let got = names(&changed_paths(&p("u"), &p("l")).unwrap());
        let mut want = vec!["a", "d2f", "d2f/z", "f2d", "f2d/inner", "keep/changed", "new/deep/n", "op/fresh/o"];
        if special {
            // Whiteouts for a file and a directory; a whiteout with nothing below names nothing; the opaque
            // directory hides (so names) what the image had there.
            want.extend(["gone/g", "op/x/y", "rm"]);
            want.sort();
        } else {
            println!("SKIP: whiteouts and trusted xattrs need root; checked only plain entries");
        }
        assert_eq!(got, want);
    }
}
