//! The VM's `/workspace` as a read-only erofs image, written straight from git objects and the user's verified
//! files (no checkout directory, no `mkfs.erofs`), and cached.
//!
//! Two kinds of file live in the image cache:
//! - a *blob device* per commit (`blob-<key>-<nonce>.bin`, its map `blob-<key>.map`): the data of that commit's
//!   files and its history's pack, nothing else, block-aligned, with no filesystem of its own;
//! - a *workspace image* per tree (`ws-<key>.erofs`, its record `ws-<key>.json`): the whole filesystem's
//!   metadata (every directory and inode, the repository's `.git` small files and indexes), the data of files
//!   the blob device lacks (the uncommitted ones), and file data on the blob device by address (erofs's extra
//!   device).
//!
//! The VM attaches both. A blob device holds only what the history of every tree it serves already holds: it is
//! made for a commit `C` and used only for a HEAD that has `C` in its history, so no earlier uncommitted file ever
//! reaches a later VM. A new tree (a file edited) costs a small image; a new HEAD whose history contains the
//! blob device's commit adds a pack of the new commits; anything far from the blob device makes a new one.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::erofs::{self, Extent, Writer};
use crate::git::{Git, Oid};
use crate::index;
use crate::{io_err, RepoError};

/// Bumped when the layout of workspace images or blob devices changes.
const IMAGE_RECIPE: u32 = 3;
/// Under `.git` in the image: an index of the snapshot's tree (git ignores files it does not know there).
pub(crate) const SNAPSHOT_INDEX: &str = "hutch-snapshot-index";
/// The image cache keeps at most this many bytes (least recently used go first).
const IMAGE_CACHE_BYTES: u64 = 8 << 30;
/// A workspace image may add at most this share of its blob device's size as new file data before a blob device
/// for its own HEAD is made instead.
const MAX_DELTA_SHARE: u64 = 4;

/// What a workspace image holds; equal specs make equal images, so the image is cached by its digest.
pub(crate) struct WorkspaceSpec<'a> {
    pub(crate) object_format: &'a str,
    pub(crate) base: Option<&'a Oid>,
    pub(crate) tree: &'a Oid,
    pub(crate) branch: Option<&'a str>,
    pub(crate) prefix: &'a Path,
}

impl WorkspaceSpec<'_> {
    fn key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!(
            "recipe={IMAGE_RECIPE}\nformat={}\nbase={}\ntree={}\nbranch={}\nprefix=",
            self.object_format,
            self.base.map(Oid::as_str).unwrap_or("-"),
            self.tree,
            self.branch.unwrap_or("-"),
        ));
        h.update(self.prefix.as_os_str().as_bytes());
        hex::encode(h.finalize())[..32].to_string()
    }
}

fn blob_key(object_format: &str, commit: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("recipe={IMAGE_RECIPE}\nformat={object_format}\ncommit={commit}\n"));
    hex::encode(d)[..32].to_string()
}

/// The user's work tree as git last saw it: the scratch index `git add -A` wrote (its entries' stat data) and
/// that index file's modification time (an entry not older than it may have changed unseen).
pub(crate) struct WorkTree<'a> {
    pub(crate) top: &'a Path,
    pub(crate) entries: HashMap<&'a [u8], &'a index::Entry>,
    pub(crate) index_mtime: (i64, i64),
}

/// A workspace image ready to attach.
#[derive(Debug)]
pub(crate) struct Made {
    pub(crate) image: PathBuf,
    /// The blob device it reads unchanged file data from.
    pub(crate) blob: Option<PathBuf>,
    pub(crate) git_meta: BTreeMap<String, String>,
    pub(crate) reused: bool,
}

/// What `ws-<key>.json` says about an image.
#[derive(serde::Serialize, serde::Deserialize)]
struct ImageRecord {
    git_meta: BTreeMap<String, String>,
    /// The blob device's file name in the cache.
    blob: Option<String>,
}

/// What `blob-<key>.map` says about a blob device: where each object's data is.
#[derive(serde::Serialize, serde::Deserialize)]
struct BlobMap {
    commit: String,
    file: String,
    blocks: u32,
    /// Object id (hex) -> (block, length) of file data.
    blobs: HashMap<String, (u32, u64)>,
    /// The history pack's files (`pack-<hash>.pack`, `.idx`, ...) -> (block, length).
    packs: BTreeMap<String, (u32, u64)>,
}

/// The image for `spec` from the cache, or made and added to it. `last` is the image this work tree used last
/// (its blob device is the first candidate for this one's).
pub(crate) fn workspace_image(
    scratch: &Path,
    git: &Git,
    spec: &WorkspaceSpec<'_>,
    cache: &Path,
    work: Option<&WorkTree<'_>>,
    last: Option<&Path>,
) -> Result<Made, RepoError> {
    let key = spec.key();
    let image = cache.join(format!("ws-{key}.erofs"));
    if let Some(made) = cached(cache, &image) {
        return Ok(made);
    }
    std::fs::create_dir_all(cache).map_err(io_err(format!("cannot create the workspace image cache {}", cache.display())))?;
    let t0 = std::time::Instant::now();
    let entries = tree_entries(git, spec, work)?;
    let blob = match spec.base {
        Some(head) => Some(choose_blob(scratch, git, spec, head, cache, &entries, work, last)?),
        None => None,
    };
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, blob = blob.is_some(), "image: blob device ready");
    let nonce = format!("{}-{}", std::process::id(), scratch.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let tmp_image = cache.join(format!(".ws-{key}.erofs.{nonce}"));
    let tmp_meta = cache.join(format!(".ws-{key}.json.{nonce}"));
    let made = (|| -> Result<BTreeMap<String, String>, RepoError> {
        let git_meta = write_image(scratch, git, spec, &entries, work, blob.as_ref(), &tmp_image)?;
        let rec = ImageRecord { git_meta: git_meta.clone(), blob: blob.as_ref().map(|b| b.file.clone()) };
        let json = serde_json::to_vec(&rec).map_err(|e| RepoError::Project(e.to_string()))?;
        std::fs::write(&tmp_meta, json).map_err(io_err("cannot write the workspace image's record"))?;
        read_only(&tmp_image)?;
        // The record goes first: a lookup trusts an image only with its record beside it.
        std::fs::rename(&tmp_meta, image.with_extension("json")).map_err(io_err("cannot install the workspace image"))?;
        std::fs::rename(&tmp_image, &image).map_err(io_err("cannot install the workspace image"))?;
        Ok(git_meta)
    })();
    let _ = std::fs::remove_file(&tmp_image);
    let _ = std::fs::remove_file(&tmp_meta);
    let git_meta = made?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: workspace image made");
    evict(cache, &image);
    Ok(Made { image, blob: blob.map(|b| cache.join(&b.file)), git_meta, reused: false })
}

/// The cached image (and its blob device) if both are there; marks them recently used.
fn cached(cache: &Path, image: &Path) -> Option<Made> {
    let rec: ImageRecord = serde_json::from_slice(&std::fs::read(image.with_extension("json")).ok()?).ok()?;
    if !image.is_file() {
        return None;
    }
    let blob = match &rec.blob {
        Some(name) if valid_name(name, "blob-", ".bin") => Some(cache.join(name)),
        Some(_) => return None,
        None => None,
    };
    if blob.as_ref().is_some_and(|b| !b.is_file()) {
        return None;
    }
    for f in std::iter::once(image).chain(blob.as_deref()) {
        if let Ok(f) = std::fs::File::open(f) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
    Some(Made { image: image.to_path_buf(), blob, git_meta: rec.git_meta, reused: true })
}

fn valid_name(name: &str, prefix: &str, suffix: &str) -> bool {
    name.starts_with(prefix) && name.ends_with(suffix) && name.len() < 120 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// The blob device a workspace image records, by the image's path (for the VM that is started with a guess).
pub(crate) fn blob_of(image: &Path) -> Option<PathBuf> {
    let rec: ImageRecord = serde_json::from_slice(&std::fs::read(image.with_extension("json")).ok()?).ok()?;
    let name = rec.blob?;
    valid_name(&name, "blob-", ".bin").then(|| image.with_file_name(name))
}

/// One file of the snapshot's tree.
pub(crate) struct TreeEntry {
    pub(crate) path: Vec<u8>,
    pub(crate) mode: u32,
    /// Hex object id.
    pub(crate) oid: String,
}

/// The snapshot tree's entries, sorted by path: the scratch index's (they are the tree: `write-tree` made it from
/// them), else `ls-tree`.
fn tree_entries(git: &Git, spec: &WorkspaceSpec<'_>, work: Option<&WorkTree<'_>>) -> Result<Vec<TreeEntry>, RepoError> {
    let mut out = match work {
        Some(w) if w.entries.values().all(|e| e.stage == 0 && !e.intent_to_add) => {
            w.entries.values().map(|e| TreeEntry { path: e.path.clone(), mode: e.mode, oid: hex::encode(&e.oid) }).collect()
        }
        _ => ls_tree(git, spec.tree.as_str())?,
    };
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn ls_tree(git: &Git, tree: &str) -> Result<Vec<TreeEntry>, RepoError> {
    let listed = git.run("ls-tree (workspace image)", ["ls-tree", "-r", "-z", "--full-tree", tree])?;
    let mut out = Vec::new();
    for rec in listed.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let bad = || RepoError::Git { action: "ls-tree (workspace image)".into(), stderr: "unexpected output".into() };
        let tab = rec.iter().position(|&b| b == b'\t').ok_or_else(bad)?;
        let mut meta = rec[..tab].split(|&b| b == b' ');
        let mode = meta.next().and_then(|m| std::str::from_utf8(m).ok()).and_then(|m| u32::from_str_radix(m, 8).ok()).ok_or_else(bad)?;
        let oid = meta.nth(1).and_then(|o| std::str::from_utf8(o).ok()).ok_or_else(bad)?.to_string();
        out.push(TreeEntry { path: rec[tab + 1..].to_vec(), mode, oid });
    }
    Ok(out)
}

/// A loaded blob device.
struct Blob {
    file: String,
    map: BlobMap,
}

/// The blob device for a workspace image at HEAD `head`: the last image's, when its commit is in HEAD's history
/// and the image would not add too much; else the one made for `head` (made now if missing).
#[allow(clippy::too_many_arguments)]
fn choose_blob(
    scratch: &Path,
    git: &Git,
    spec: &WorkspaceSpec<'_>,
    head: &Oid,
    cache: &Path,
    entries: &[TreeEntry],
    work: Option<&WorkTree<'_>>,
    last: Option<&Path>,
) -> Result<Blob, RepoError> {
    let own = blob_key(spec.object_format, head.as_str());
    if let Some(b) = load_blob(cache, &own) {
        return Ok(b);
    }
    let earlier = last.and_then(blob_of).and_then(|p| {
        let name = p.file_name()?.to_str()?.to_string();
        // `blob-<key>-<nonce>.bin` -> its map `blob-<key>.map`.
        let key = name.strip_prefix("blob-")?.get(..32)?.to_string();
        load_blob(cache, &key).filter(|b| b.file == name)
    });
    if let Some(b) = earlier {
        let fresh: u64 = entries.iter().filter(|e| is_data(e.mode) && !b.map.blobs.contains_key(&e.oid)).map(|e| entry_size(e, work)).sum();
        let small = fresh <= u64::from(b.map.blocks) * erofs::BLOCK / MAX_DELTA_SHARE;
        if small && git.ok(["merge-base", "--is-ancestor", b.map.commit.as_str(), head.as_str()]) {
            return Ok(b);
        }
    }
    make_blob(scratch, git, head, cache, &own, work)
}

fn is_data(mode: u32) -> bool {
    mode & 0o170000 == 0o100000 || mode & 0o170000 == 0o120000
}

/// An estimate of a file's size: what git recorded of it, else a typical source file's.
fn entry_size(e: &TreeEntry, work: Option<&WorkTree<'_>>) -> u64 {
    work.and_then(|w| w.entries.get(e.path.as_slice())).map(|x| u64::from(x.size)).unwrap_or(16 << 10)
}

fn load_blob(cache: &Path, key: &str) -> Option<Blob> {
    let map: BlobMap = serde_json::from_slice(&std::fs::read(cache.join(format!("blob-{key}.map"))).ok()?).ok()?;
    if !valid_name(&map.file, "blob-", ".bin") {
        return None;
    }
    let len = std::fs::metadata(cache.join(&map.file)).ok()?.len();
    (len == u64::from(map.blocks) * erofs::BLOCK).then(|| Blob { file: map.file.clone(), map })
}

/// Makes the blob device for commit `head`: its files' data (from the user's work tree where git vouches that the
/// file is the committed one, else from git) and its history's pack.
fn make_blob(scratch: &Path, git: &Git, head: &Oid, cache: &Path, key: &str, work: Option<&WorkTree<'_>>) -> Result<Blob, RepoError> {
    let t0 = std::time::Instant::now();
    let nonce = format!("{}-{}", std::process::id(), scratch.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let file = format!("blob-{key}-{}.bin", hex::encode(nonce_bytes(&nonce)));
    let tmp = cache.join(format!(".{file}.tmp"));
    let packs_dir = scratch.join(format!("blob-pack-{key}"));
    let made = std::thread::scope(|s| {
        // The history pack is written meanwhile: it is git's work (mostly copying the user's packed data).
        let packer = s.spawn(|| {
            std::fs::create_dir_all(packs_dir.join("objects/pack")).map_err(io_err("cannot write the history pack"))?;
            crate::host::write_pack(git, &packs_dir, &format!("{head}\n"))
        });
        let mut w = Writer::create(&tmp).map_err(erofs_err)?;
        let entries = ls_tree(git, head.as_str())?;
        let mut blobs: HashMap<String, (u32, u64)> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&TreeEntry> = entries.iter().filter(|e| is_data(e.mode) && seen.insert(e.oid.as_str())).collect();
        let copied = match work {
            Some(wt) => copy_verified(&mut w, wt, &unique)?,
            None => vec![None; unique.len()],
        };
        let mut from_git: Vec<String> = Vec::new();
        for (e, x) in unique.iter().zip(copied) {
            match x {
                Some(x) => {
                    blobs.insert(e.oid.clone(), (x.block, x.len));
                }
                None => from_git.push(e.oid.clone()),
            }
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, copied = blobs.len(), from_git = from_git.len(), "image: blob device: work tree files copied");
        from_git.sort_unstable();
        from_git.dedup();
        cat_blobs(git, &from_git, |oid, r, len| {
            let x = w.append_reader(r, len).map_err(erofs_err)?;
            blobs.insert(oid.to_string(), (x.block, x.len));
            Ok(())
        })?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: blob device: files from git");
        packer.join().map_err(|_| RepoError::Project("the history pack's writer failed".into()))??;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: blob device: history packed");
        let mut packs = BTreeMap::new();
        for ent in std::fs::read_dir(packs_dir.join("objects/pack")).map_err(io_err("cannot read the history pack"))?.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let f = std::fs::File::open(ent.path()).map_err(io_err("cannot read the history pack"))?;
            let len = f.metadata().map_err(io_err("cannot read the history pack"))?.len();
            let x = w.append_file(&f, len).map_err(erofs_err)?;
            packs.insert(name, (x.block, x.len));
        }
        let bytes = w.finish_data().map_err(erofs_err)?;
        read_only(&tmp)?;
        let map = BlobMap { commit: head.to_string(), file: file.clone(), blocks: (bytes / erofs::BLOCK) as u32, blobs, packs };
        let json = serde_json::to_vec(&map).map_err(|e| RepoError::Project(e.to_string()))?;
        let tmp_map = cache.join(format!(".blob-{key}.map.{nonce}"));
        std::fs::write(&tmp_map, json).map_err(io_err("cannot write the blob device's map"))?;
        std::fs::rename(&tmp, cache.join(&file)).map_err(io_err("cannot install the blob device"))?;
        std::fs::rename(&tmp_map, cache.join(format!("blob-{key}.map"))).map_err(io_err("cannot install the blob device"))?;
        Ok(Blob { file: file.clone(), map })
    });
    let _ = std::fs::remove_dir_all(&packs_dir);
    let _ = std::fs::remove_file(&tmp);
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: blob device made");
    made
}

fn nonce_bytes(nonce: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{nonce}{:?}", std::time::SystemTime::now()));
    let mut o = [0u8; 6];
    o.copy_from_slice(&d[..6]);
    o
}

fn erofs_err(e: erofs::ErofsError) -> RepoError {
    RepoError::Project(format!("cannot write the workspace image: {e}"))
}

fn read_only(p: &Path) -> Result<(), RepoError> {
    use std::os::unix::fs::PermissionsExt;
    // Readable by the unprivileged VMM, writable by nobody.
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).map_err(io_err("cannot protect the workspace image"))
}

/// Copies regular files from the user's work tree where git's index vouches for them, two at a time: the scratch
/// index has the same object id for that path, with stat data git took when it last read the file, not racily
/// clean; the file has exactly that stat data before and after the copy. For each entry, where its data went, or
/// `None`: take it from git instead (its reserved room stays unused).
fn copy_verified(w: &mut Writer, wt: &WorkTree<'_>, list: &[&TreeEntry]) -> Result<Vec<Option<Extent>>, RepoError> {
    let mut planned: Vec<Option<(Extent, &index::Entry)>> = Vec::with_capacity(list.len());
    for e in list {
        let ie = wt.entries.get(e.path.as_slice()).copied().filter(|ie| {
            e.mode & 0o170000 == 0o100000
                && ie.mode == e.mode
                && !ie.skip_worktree
                && !ie.assume_valid
                && (i64::from(ie.mtime.0), i64::from(ie.mtime.1)) < wt.index_mtime
                && hex::encode(&ie.oid) == e.oid
        });
        planned.push(match ie {
            Some(ie) => Some((w.reserve(u64::from(ie.size)).map_err(erofs_err)?, ie)),
            None => None,
        });
    }
    let dst = w.file();
    let copy_one = |e: &TreeEntry, x: Extent, ie: &index::Entry| -> Option<Extent> {
        let same = |m: &std::fs::Metadata| {
            m.file_type().is_file()
                && m.mtime() == i64::from(ie.mtime.0)
                && m.mtime_nsec() == i64::from(ie.mtime.1)
                && m.ctime() == i64::from(ie.ctime.0)
                && m.ctime_nsec() == i64::from(ie.ctime.1)
                && m.ino() as u32 == ie.ino
                && m.size() == x.len
                && (m.mode() & 0o100 != 0) == (e.mode == 0o100755)
        };
        use std::os::unix::fs::OpenOptionsExt;
        let path = wt.top.join(std::ffi::OsStr::from_bytes(&e.path));
        // Looked at before it is opened: a path that is now a device node or a FIFO is never opened.
        if !same(&std::fs::symlink_metadata(&path).ok()?) {
            return None;
        }
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).ok()?;
        if !same(&f.metadata().ok()?) {
            return None;
        }
        erofs::copy_at(dst, x, &f).ok()?;
        same(&f.metadata().ok()?).then_some(x)
    };
    let mut out: Vec<Option<Extent>> = vec![None; list.len()];
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
    let chunk = list.len().div_ceil(workers).max(1);
    std::thread::scope(|s| {
        for ((items, plans), outs) in list.chunks(chunk).zip(planned.chunks(chunk)).zip(out.chunks_mut(chunk)) {
            s.spawn(move || {
                for ((e, plan), o) in items.iter().zip(plans).zip(outs.iter_mut()) {
                    if let Some((x, ie)) = plan {
                        *o = copy_one(e, *x, ie);
                    }
                }
            });
        }
    });
    Ok(out)
}

/// Streams the objects `oids` (hex) out of git, in order, to `each(oid, reader, length)`.
fn cat_blobs(git: &Git, oids: &[String], mut each: impl FnMut(&str, &mut dyn std::io::Read, u64) -> Result<(), RepoError>) -> Result<(), RepoError> {
    if oids.is_empty() {
        return Ok(());
    }
    let action = "cat-file (workspace image)";
    let fail = |why: String| RepoError::Git { action: action.into(), stderr: why };
    let mut child = git
        .command(["cat-file", "--batch"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(RepoError::GitMissing)?;
    let mut stdin = child.stdin.take().ok_or_else(|| fail("no stdin".into()))?;
    let list: Vec<u8> = oids.iter().flat_map(|o| o.bytes().chain(std::iter::once(b'\n'))).collect();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&list);
    });
    let stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, stdout);
    let result = (|| {
        let mut line = Vec::new();
        for oid in oids {
            line.clear();
            r.read_until(b'\n', &mut line).map_err(|e| fail(e.to_string()))?;
            let text = String::from_utf8_lossy(&line);
            let mut parts = text.trim_end().split(' ');
            let (got, kind, size) = (parts.next(), parts.next(), parts.next().and_then(|s| s.parse::<u64>().ok()));
            let (Some(got), Some("blob"), Some(size)) = (got, kind, size) else {
                return Err(fail(format!("object {oid}: {}", text.trim_end())));
            };
            if got != oid {
                return Err(fail(format!("asked for {oid}, got {got}")));
            }
            let mut body = std::io::Read::take(&mut r, size);
            each(oid, &mut body, size)?;
            if body.limit() != 0 {
                return Err(fail(format!("object {oid} was cut short")));
            }
            let mut nl = [0u8; 1];
            std::io::Read::read_exact(&mut r, &mut nl).map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    })();
    drop(r);
    let _ = child.kill();
    let _ = child.wait();
    let _ = feeder.join();
    result
}

/// Writes the workspace image for `spec` at `out`; returns the digests of its git metadata.
fn write_image(
    scratch: &Path,
    git: &Git,
    spec: &WorkspaceSpec<'_>,
    entries: &[TreeEntry],
    work: Option<&WorkTree<'_>>,
    blob: Option<&Blob>,
    out: &Path,
) -> Result<BTreeMap<String, String>, RepoError> {
    // Every file's time; the indexes are dated after it, so git in the VM trusts their stat data.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1 << 30);
    let time = (now - 10, 0u32);
    let index_time = (now - 5, 0u32);
    let stage = scratch.join("wsgit");
    let _ = std::fs::remove_dir_all(&stage);
    let gd = stage.join(".git");
    let t0 = std::time::Instant::now();
    let git_meta = stage_git_dir(&stage, git, spec, blob)?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: repository staged");
    let mut w = Writer::create(out).map_err(erofs_err)?;
    // Files: from the blob device by object id, else the user's verified file, else git.
    let mut placed: HashMap<&str, Extent> = HashMap::new();
    let mut from_git: Vec<String> = Vec::new();
    let mut local: Vec<&TreeEntry> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in entries.iter().filter(|e| is_data(e.mode) && seen.insert(e.oid.as_str())) {
        match blob.and_then(|b| b.map.blobs.get(&e.oid)) {
            Some((block, len)) => {
                placed.insert(&e.oid, Extent { device: 1, block: *block, len: *len });
            }
            None => local.push(e),
        }
    }
    let copied = match work {
        Some(wt) => copy_verified(&mut w, wt, &local)?,
        None => vec![None; local.len()],
    };
    for (e, x) in local.iter().zip(copied) {
        match x {
            Some(x) => {
                placed.insert(&e.oid, x);
            }
            None => from_git.push(e.oid.clone()),
        }
    }
    from_git.sort_unstable();
    from_git.dedup();
    let mut fetched: HashMap<String, Extent> = HashMap::new();
    cat_blobs(git, &from_git, |oid, r, len| {
        fetched.insert(oid.to_string(), w.append_reader(r, len).map_err(erofs_err)?);
        Ok(())
    })?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, from_git = from_git.len(), "image: file data placed");
    let mut snapshot_index = Vec::with_capacity(entries.len());
    for e in entries {
        check_path(&e.path)?;
        let kind = e.mode & 0o170000;
        let x = placed.get(e.oid.as_str()).or_else(|| fetched.get(&e.oid)).copied();
        match (kind, x) {
            (0o100000, Some(x)) => w.add_file(&e.path, if e.mode == 0o100755 { 0o755 } else { 0o644 }, x, None).map_err(erofs_err)?,
            (0o120000, Some(x)) => w.add_symlink(&e.path, x).map_err(erofs_err)?,
            (0o160000, _) => w.add_dir(&e.path).map_err(erofs_err)?,
            _ => return Err(RepoError::Project(format!("the tree entry {} has mode {:o}", String::from_utf8_lossy(&e.path), e.mode))),
        }
        let size = x.map(|x| x.len).unwrap_or(0);
        let stat = kind != 0o160000;
        snapshot_index.push(index::Entry {
            ctime: if stat { (time.0 as u32, 0) } else { (0, 0) },
            mtime: if stat { (time.0 as u32, 0) } else { (0, 0) },
            dev: 0,
            ino: 0,
            mode: e.mode,
            uid: 0,
            gid: 0,
            size: if stat { size as u32 } else { 0 },
            oid: hex::decode(&e.oid).map_err(|_| RepoError::Project(format!("bad object id {}", e.oid)))?,
            stage: 0,
            assume_valid: false,
            skip_worktree: false,
            intent_to_add: false,
            path: e.path.clone(),
        });
    }
    if !spec.prefix.as_os_str().is_empty() {
        w.add_dir(spec.prefix.as_os_str().as_bytes()).map_err(erofs_err)?;
    }
    // The indexes: the snapshot's (its stat data is the image's), then HEAD's: a one-tree `read-tree -m` keeps
    // the stat data of every file HEAD has unchanged, so git in the VM sees the uncommitted changes as changes.
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: tree laid out");
    let bytes = index::write(&snapshot_index, crate::host::oid_len(spec.object_format)).map_err(|e| RepoError::Project(format!("cannot write the workspace index: {e}")))?;
    let snap_idx = gd.join(SNAPSHOT_INDEX);
    std::fs::write(&snap_idx, bytes).map_err(io_err("cannot write the workspace index"))?;
    // git adds the tree cache (the VM's `write-tree` then hashes only what changed).
    let got = git.clone().index(&snap_idx).line("write-tree (workspace index)", ["write-tree"])?;
    if got != spec.tree.as_str() {
        return Err(RepoError::Project(format!("the workspace index holds tree {got}, not {}", spec.tree)));
    }
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: snapshot index written");
    let head_idx = gd.join("index");
    std::fs::copy(&snap_idx, &head_idx).map_err(io_err("cannot write the workspace index"))?;
    match spec.base {
        // (No `-u`: the work tree named is never read or written.)
        Some(b) => git.clone().work_tree(&stage).index(&head_idx).run("read-tree -m (workspace index)", ["read-tree", "-m", b.as_str()])?,
        None => git.clone().index(&head_idx).run("read-tree (workspace index)", ["read-tree", "--empty"])?,
    };
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "image: HEAD index written");
    add_git_dir(&mut w, &gd, b".git", blob, index_time)?;
    w.finish(time, blob.map(|b| erofs::Base { blocks: b.map.blocks })).map_err(erofs_err)?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(git_meta)
}

/// Git refuses trees with such paths; a tree from elsewhere (a daemon's upload) is checked again here, since a
/// `.git` in it would land in the image's own repository.
fn check_path(p: &[u8]) -> Result<(), RepoError> {
    let bad = p.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b".." || c.eq_ignore_ascii_case(b".git"));
    if bad {
        return Err(RepoError::Project(format!("the tree holds the path {:?}, which cannot be checked out", String::from_utf8_lossy(p))));
    }
    Ok(())
}

/// The image's `.git` (everything but the blob device's history pack and the indexes) in `stage/.git`: a new
/// repository (no hooks, no host config, no remotes), the packs of what the blob device lacks, HEAD as the user
/// had it.
fn stage_git_dir(stage: &Path, git: &Git, spec: &WorkspaceSpec<'_>, blob: Option<&Blob>) -> Result<BTreeMap<String, String>, RepoError> {
    std::fs::create_dir_all(stage).map_err(io_err("cannot create the workspace repository"))?;
    Git::discover(stage).run(
        "init (workspace)",
        [
            std::ffi::OsStr::new("-c"),
            std::ffi::OsStr::new("init.defaultBranch=main"),
            std::ffi::OsStr::new("init"),
            std::ffi::OsStr::new("-q"),
            std::ffi::OsStr::new("--template="),
            std::ffi::OsStr::new(&format!("--object-format={}", spec.object_format)),
            stage.as_os_str(),
        ],
    )?;
    let gd = stage.join(".git");
    // Without templates: no sample hooks, but the directories a clone has, so tools in the VM find them.
    for d in ["hooks", "info", "objects/pack"] {
        std::fs::create_dir_all(gd.join(d)).map_err(io_err("cannot create the workspace repository"))?;
    }
    // What the blob device lacks, found by comparing trees (a history walk over a large tree takes seconds).
    if let (Some(b), Some(bl)) = (spec.base, blob) {
        if bl.map.commit != b.as_str() {
            let objects = history_objects(git, &bl.map.commit, b.as_str())?;
            crate::host::write_pack_of(git, &gd, &objects)?;
        }
    } else if let Some(b) = spec.base {
        crate::host::write_pack(git, &gd, &format!("{b}\n"))?;
    }
    let snapshot_objects = match spec.base {
        Some(b) => {
            let mut o = changed_objects(git, &["diff-tree", "-r", "-t", "-z", "--no-renames", b.as_str(), spec.tree.as_str()])?;
            o.push(spec.tree.to_string());
            o
        }
        None => {
            let mut o: Vec<String> = ls_tree_all(git, spec.tree.as_str())?;
            o.push(spec.tree.to_string());
            o
        }
    };
    crate::host::write_pack_of(git, &gd, &snapshot_objects)?;
    // Refs written as files: the commit they name may be on the blob device only, where `update-ref` cannot see it.
    let write = |rel: &str, text: String| -> Result<(), RepoError> {
        let p = gd.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io_err("cannot write the workspace's refs"))?;
        }
        std::fs::write(p, text).map_err(io_err("cannot write the workspace's refs"))
    };
    if let Some(br) = spec.branch {
        let r = format!("refs/heads/{br}");
        if !Git::at(&gd).ok(["check-ref-format", r.as_str()]) {
            return Err(RepoError::Project(format!("the branch name {br:?} is not a valid ref name")));
        }
        write("HEAD", format!("ref: {r}\n"))?;
        if let Some(b) = spec.base {
            write(&r, format!("{b}\n"))?;
        }
    } else if let Some(b) = spec.base {
        write("HEAD", format!("{b}\n"))?;
    }
    let config = gd.join("config");
    let mut text = std::fs::read_to_string(&config).map_err(io_err("cannot read the workspace's git config"))?;
    // Inode numbers, devices and change times mean nothing in an image; sizes and modification times do.
    text.push_str("[core]\n\tcheckStat = minimal\n\ttrustctime = false\n[user]\n\tname = Hutch Sandbox\n\temail = sandbox@hutch.invalid\n");
    std::fs::write(&config, text).map_err(io_err("cannot write the workspace's git config"))?;
    crate::host::git_meta_digests(&gd).map_err(io_err("cannot read the workspace's git metadata"))
}

/// The objects a `diff-tree -z` run lists as added or changed (new side), less submodule commits.
fn changed_objects(git: &Git, args: &[&str]) -> Result<Vec<String>, RepoError> {
    Ok(parse_changed(&git.run("diff-tree (workspace objects)", args)?))
}

fn parse_changed(out: &[u8]) -> Vec<String> {
    let mut objects = Vec::new();
    let mut fields = out.split(|&b| b == 0);
    while let Some(rec) = fields.next() {
        if !rec.starts_with(b":") {
            continue; // a commit id line (`--stdin`)
        }
        let _path = fields.next();
        let parts: Vec<&[u8]> = rec[1..].split(|&b| b == b' ').collect();
        let [_, dst_mode, _, dst, status, ..] = parts[..] else { continue };
        if status.first().is_some_and(|s| *s == b'D') || dst_mode == b"160000" || dst.iter().all(|&c| c == b'0') {
            continue;
        }
        objects.push(String::from_utf8_lossy(dst).into_owned());
    }
    objects.sort_unstable();
    objects.dedup();
    objects
}

/// Every object of a tree (subtrees and files; not submodule commits).
fn ls_tree_all(git: &Git, tree: &str) -> Result<Vec<String>, RepoError> {
    let listed = git.run("ls-tree (workspace objects)", ["ls-tree", "-r", "-t", "-z", "--full-tree", tree])?;
    Ok(listed
        .split(|&b| b == 0)
        .filter_map(|rec| {
            let tab = rec.iter().position(|&b| b == b'\t')?;
            let mut meta = rec[..tab].split(|&b| b == b' ');
            let (_, kind, oid) = (meta.next()?, meta.next()?, meta.next()?);
            (kind != b"commit").then(|| String::from_utf8_lossy(oid).into_owned())
        })
        .collect())
}

/// The objects of `head`'s history that `old`'s history lacks: the new commits, and what each one's tree has that
/// its parents' do not (an object new since `old` first appears in some new commit's change; a few that `old`
/// also has may come along).
fn history_objects(git: &Git, old: &str, head: &str) -> Result<Vec<String>, RepoError> {
    let commits = git.run("rev-list (workspace history)", ["rev-list", head, &format!("^{old}")])?;
    let mut objects: Vec<String> = String::from_utf8_lossy(&commits).lines().map(str::to_string).collect();
    if objects.is_empty() {
        return Ok(objects);
    }
    let diffs = git.run_input("diff-tree (workspace history)", ["diff-tree", "--stdin", "-m", "-r", "-t", "-z", "--no-renames", "--root"], Some(&commits))?;
    let mut listed = parse_changed(&diffs);
    // Root trees are not in a diff's output.
    let asks: String = objects.iter().map(|c| format!("{c}^{{tree}}\n")).collect();
    let trees = git.run_input("cat-file (workspace history)", ["cat-file", "--batch-check=%(objectname)"], Some(asks.as_bytes()))?;
    listed.extend(String::from_utf8_lossy(&trees).lines().map(str::to_string));
    objects.extend(listed);
    objects.sort_unstable();
    objects.dedup();
    Ok(objects)
}

/// Adds the staged `.git` directory to the image (the blob device's history pack by address), the indexes
/// dated `index_time`.
fn add_git_dir(w: &mut Writer, dir: &Path, at: &[u8], blob: Option<&Blob>, index_time: (u64, u32)) -> Result<(), RepoError> {
    w.add_dir(at).map_err(erofs_err)?;
    if at == b".git/objects/pack" {
        for (name, (block, len)) in blob.map(|b| &b.map.packs).into_iter().flatten() {
            let p = [at, b"/", name.as_bytes()].concat();
            w.add_file(&p, 0o444, Extent { device: 1, block: *block, len: *len }, None).map_err(erofs_err)?;
        }
    }
    let rd = std::fs::read_dir(dir).map_err(io_err("cannot read the workspace repository"))?;
    let mut names: Vec<_> = rd.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let p = [at, b"/", e.file_name().as_bytes()].concat();
        let ft = e.file_type().map_err(io_err("cannot read the workspace repository"))?;
        if ft.is_dir() {
            add_git_dir(w, &e.path(), &p, blob, index_time)?;
        } else if ft.is_file() {
            let f = std::fs::File::open(e.path()).map_err(io_err("cannot read the workspace repository"))?;
            let m = f.metadata().map_err(io_err("cannot read the workspace repository"))?;
            let x = w.append_file(&f, m.len()).map_err(erofs_err)?;
            let is_index = p == b".git/index" || p == [b".git/", SNAPSHOT_INDEX.as_bytes()].concat();
            w.add_file(&p, (m.mode() & 0o777) as u16, x, is_index.then_some(index_time)).map_err(erofs_err)?;
        }
    }
    Ok(())
}

/// Removes the least recently used images and blob devices while the cache holds more than its budget (never
/// `keep` or its blob device); a blob device goes only when no remaining image names it.
fn evict(cache: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(cache) else { return };
    let mut images: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
    let mut blobs: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(m) = e.metadata() else { continue };
        let row = (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path());
        if name.starts_with("ws-") && name.ends_with(".erofs") {
            images.push(row);
        } else if name.starts_with("blob-") && name.ends_with(".bin") {
            blobs.push(row);
        }
    }
    let mut total: u64 = images.iter().chain(blobs.iter()).map(|i| i.1).sum();
    if total <= IMAGE_CACHE_BYTES {
        return;
    }
    images.sort();
    let keep_blob = blob_of(keep);
    let mut gone: Vec<PathBuf> = Vec::new();
    for (_, len, path) in &images {
        if total <= IMAGE_CACHE_BYTES {
            break;
        }
        if path == keep {
            continue;
        }
        // A VMM that has the image open keeps reading it after the unlink.
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path.with_extension("json"));
        gone.push(path.clone());
        total = total.saturating_sub(*len);
    }
    let named: std::collections::HashSet<PathBuf> =
        images.iter().filter(|i| !gone.contains(&i.2)).filter_map(|i| blob_of(&i.2)).chain(keep_blob).collect();
    blobs.sort();
    let mut removed_blobs = false;
    for (_, len, path) in blobs {
        if total <= IMAGE_CACHE_BYTES {
            break;
        }
        if named.contains(&path) {
            continue;
        }
        let _ = std::fs::remove_file(&path);
        removed_blobs = true;
        total = total.saturating_sub(len);
    }
    // Maps whose blob device is gone.
    if removed_blobs {
        for e in std::fs::read_dir(cache).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_prefix("blob-").and_then(|n| n.strip_suffix(".map")) {
                if load_blob(cache, key).is_none() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_for(top: &Path, path: &str, oid: &str) -> index::Entry {
        let m = std::fs::symlink_metadata(top.join(path)).unwrap();
        index::Entry {
            ctime: (m.ctime() as u32, m.ctime_nsec() as u32),
            mtime: (m.mtime() as u32, m.mtime_nsec() as u32),
            ino: m.ino() as u32,
            mode: 0o100644,
            size: m.size() as u32,
            oid: hex::decode(oid).unwrap(),
            path: path.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// Only files whose stat data is exactly what git's index recorded are copied from the work tree; a file
    /// changed since (its change time moves), one replaced by a symlink or a FIFO, or one git recorded too late to
    /// trust (racily clean) comes from git instead.
    #[test]
    fn work_tree_files_are_copied_only_as_git_vouched_for_them() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("wt");
        std::fs::create_dir(&top).unwrap();
        for f in ["same", "changed", "link", "fifo", "racy"] {
            if f == "racy" {
                // Later than the others by more than the file system's clock step.
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
            std::fs::write(top.join(f), format!("content of {f}\n")).unwrap();
        }
        let oid = "1111111111111111111111111111111111111111";
        let entries: Vec<index::Entry> = ["same", "changed", "link", "fifo", "racy"].iter().map(|p| entry_for(&top, p, oid)).collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Same size, same modification time, other bytes: only the change time tells.
        let m = std::fs::metadata(top.join("changed")).unwrap();
        std::fs::write(top.join("changed"), "CONTENT OF changed\n").unwrap();
        std::fs::File::options().write(true).open(top.join("changed")).unwrap().set_modified(m.modified().unwrap()).unwrap();
        std::fs::remove_file(top.join("link")).unwrap();
        std::os::unix::fs::symlink("same", top.join("link")).unwrap();
        std::fs::remove_file(top.join("fifo")).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(top.join("fifo")).status().unwrap().success());
        let racy = &entries[4];
        let wt = WorkTree {
            top: &top,
            entries: entries.iter().map(|e| (e.path.as_slice(), e)).collect(),
            index_mtime: (i64::from(racy.mtime.0), i64::from(racy.mtime.1)),
        };
        let list: Vec<TreeEntry> =
            ["same", "changed", "link", "fifo", "racy", "absent"].iter().map(|p| TreeEntry { path: p.as_bytes().to_vec(), mode: 0o100644, oid: oid.into() }).collect();
        let refs: Vec<&TreeEntry> = list.iter().collect();
        let img = t.path().join("img");
        let mut w = Writer::create(&img).unwrap();
        let got = copy_verified(&mut w, &wt, &refs).unwrap();
        assert!(got[0].is_some(), "an untouched file is copied");
        assert!(got[1..].iter().all(Option::is_none), "{got:?}");
        let x = got[0].unwrap();
        let mut buf = vec![0u8; x.len as usize];
        std::os::unix::fs::FileExt::read_exact_at(w.file(), &mut buf, u64::from(x.block) * erofs::BLOCK).unwrap();
        assert_eq!(buf, b"content of same\n");
    }
}
