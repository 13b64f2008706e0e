//! Git's index file (`.git/index`) as bytes: versions 2 to 4 read, version 2 (3 when flags need it) written,
//! with the stat data that lets git trust a work-tree file without reading it again. Layout per git's
//! gitformat-index documentation. Input may come from a user's repository, so every count, length and offset
//! in it is checked before use and allocations are bounded by the input's size.

use sha1::{Digest, Sha1};
use sha2::Sha256;

const SIGNATURE: &[u8; 4] = b"DIRC";
const HEADER_LEN: usize = 12;
/// ctime, mtime (two words each), dev, ino, mode, uid, gid, size: ten 32-bit words before the object id.
const STAT_LEN: usize = 40;

const FLAG_ASSUME_VALID: u16 = 0x8000;
const FLAG_EXTENDED: u16 = 0x4000;
const FLAG_STAGE_SHIFT: u16 = 12;
/// Name lengths at or above this are stored as this value; the NUL terminator gives the real length.
const NAME_MASK: u16 = 0x0fff;
const XFLAG_SKIP_WORKTREE: u16 = 0x4000;
const XFLAG_INTENT_TO_ADD: u16 = 0x2000;

const MODE_FILE: u32 = 0o100644;
const MODE_EXEC: u32 = 0o100755;
const MODE_SYMLINK: u32 = 0o120000;
const MODE_GITLINK: u32 = 0o160000;
/// A sparse index's directory entry: it stands for a whole subtree that is not listed.
const MODE_DIR: u32 = 0o040000;

/// Version 4 rebuilds each path from the previous one, so a small file could describe enormous paths.
/// Real indexes expand far less than this per input byte (an entry takes at least 64 bytes on disk and
/// paths beyond a few KiB cannot exist in a work tree); the slack covers one long path in a tiny file.
const MAX_PATH_EXPANSION: usize = 64;
const PATH_SLACK: usize = 1 << 16;

/// One index entry: a path at a merge stage, its object id, and the stat data git compares with the work tree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// (seconds, nanoseconds), as git truncates them to 32 bits.
    pub ctime: (u32, u32),
    pub mtime: (u32, u32),
    pub dev: u32,
    pub ino: u32,
    /// 0o100644, 0o100755, 0o120000 (symlink) or 0o160000 (gitlink).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File size truncated to 32 bits.
    pub size: u32,
    /// Raw bytes, 20 (SHA-1) or 32 (SHA-256).
    pub oid: Vec<u8>,
    /// 0 normally; 1-3 for the base, ours and theirs of a conflict.
    pub stage: u8,
    pub assume_valid: bool,
    pub skip_worktree: bool,
    pub intent_to_add: bool,
    /// Repository-relative, `/`-separated, as git spells it.
    pub path: Vec<u8>,
}

/// A whole index: its format version and its entries, sorted by (path bytes, stage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub version: u32,
    pub entries: Vec<Entry>,
}

#[derive(thiserror::Error, Debug)]
pub enum IndexError {
    #[error("object id length {0} is neither 20 (SHA-1) nor 32 (SHA-256)")]
    OidLen(usize),
    #[error("not a git index file (no DIRC signature)")]
    Signature,
    #[error("index version {0} is not supported (only 2, 3 and 4)")]
    Version(u32),
    #[error("index file is truncated: {0}")]
    Truncated(&'static str),
    #[error("index checksum does not match its content")]
    Checksum,
    #[error("index claims {0} entries, more than its size can hold")]
    Count(u32),
    /// `path` is escaped and shortened for display; empty when the entry's path was not read yet.
    #[error("index entry {n}{}: {what}", if path.is_empty() { String::new() } else { format!(" ({path})") })]
    Entry { n: usize, path: String, what: &'static str },
    #[error("index extension {sig}: {what}")]
    Extension { sig: String, what: &'static str },
    /// A split index (`link`) or sparse index (`sdir`, directory entries): entries are missing from this file,
    /// so it cannot say which files exist.
    #[error("{0} index: its entries do not list every file")]
    Incomplete(&'static str),
    #[error("index too large: {0}")]
    TooLarge(&'static str),
}

fn entry_err(n: usize, path: &[u8], what: &'static str) -> IndexError {
    IndexError::Entry { n, path: hutch_text::shorten(&String::from_utf8_lossy(path), 120), what }
}

fn check_oid_len(oid_len: usize) -> Result<(), IndexError> {
    match oid_len {
        20 | 32 => Ok(()),
        n => Err(IndexError::OidLen(n)),
    }
}

fn checksum(data: &[u8], oid_len: usize) -> Vec<u8> {
    if oid_len == 20 {
        Sha1::digest(data).to_vec()
    } else {
        Sha256::digest(data).to_vec()
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Bytes an entry takes in versions 2 and 3: fixed part, name, then 1-8 NULs to a multiple of 8.
fn padded_len(oid_len: usize, extended: bool, name_len: usize) -> usize {
    let fixed = STAT_LEN + oid_len + 2 + if extended { 2 } else { 0 };
    (fixed + name_len + 8) & !7
}

/// Git's rule for paths it will put in an index, less the platform-specific spellings of `.git`. One scalar
/// pass: paths are short, and this runs for every entry.
fn check_path(p: &[u8]) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty path");
    }
    if p[0] == b'/' {
        return Err("absolute path");
    }
    let component = |c: &[u8]| match c {
        [] => Err("empty path component"),
        b"." | b".." => Err("`.` or `..` path component"),
        _ if c.len() == 4 && c.eq_ignore_ascii_case(b".git") => Err("`.git` path component"),
        _ => Ok(()),
    };
    let mut start = 0;
    for (i, &b) in p.iter().enumerate() {
        if b == b'/' {
            component(&p[start..i])?;
            start = i + 1;
        } else if b == 0 {
            return Err("NUL in path");
        }
    }
    component(&p[start..])
}

fn check_mode(mode: u32) -> Result<(), &'static str> {
    match mode {
        MODE_FILE | MODE_EXEC | MODE_SYMLINK | MODE_GITLINK => Ok(()),
        _ => Err("mode is not a file, executable, symlink or gitlink"),
    }
}

/// Git's order: by path bytes, then stage; a path is either merged (stage 0 alone) or unmerged (stages 1-3).
fn check_order(prev: &Entry, next: &Entry) -> Result<(), &'static str> {
    match prev.path.as_slice().cmp(next.path.as_slice()) {
        std::cmp::Ordering::Less => Ok(()),
        std::cmp::Ordering::Greater => Err("entries are not sorted by path"),
        std::cmp::Ordering::Equal if prev.stage == 0 || next.stage == 0 => Err("path listed twice (or merged and unmerged)"),
        std::cmp::Ordering::Equal if prev.stage >= next.stage => Err("stages of a path are not sorted or repeat"),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Git's variable-length integer for version 4 prefix lengths: seven bits a byte, most significant first,
/// each continuation adding one so no value has two spellings. Returns the value and the bytes it used.
fn read_varint(b: &[u8]) -> Result<(usize, usize), IndexError> {
    let mut i = 0;
    let mut c = *b.get(i).ok_or(IndexError::Truncated("entry prefix length"))?;
    let mut val = usize::from(c & 0x7f);
    while c & 0x80 != 0 {
        i += 1;
        c = *b.get(i).ok_or(IndexError::Truncated("entry prefix length"))?;
        // Past 2^40 no previous path could be that long: stop before the shift can overflow.
        if val >= 1 << 40 {
            return Err(IndexError::TooLarge("entry prefix length"));
        }
        val = ((val + 1) << 7) | usize::from(c & 0x7f);
    }
    Ok((val, i + 1))
}

/// Reads an index file. `oid_len` is the repository's object id length (20 for SHA-1, 32 for SHA-256).
/// Refuses split and sparse indexes ([`IndexError::Incomplete`]): they do not list every file.
pub fn parse(bytes: &[u8], oid_len: usize) -> Result<Index, IndexError> {
    check_oid_len(oid_len)?;
    if bytes.len() < HEADER_LEN + oid_len {
        return Err(IndexError::Truncated("shorter than a header and checksum"));
    }
    if &bytes[..4] != SIGNATURE {
        return Err(IndexError::Signature);
    }
    let version = be32(bytes, 4);
    if !(2..=4).contains(&version) {
        return Err(IndexError::Version(version));
    }
    let count = be32(bytes, 8);
    let (body, sum) = bytes.split_at(bytes.len() - oid_len);
    // All zeros: written with index.skipHash, which leaves the checksum out.
    if sum.iter().any(|&b| b != 0) && checksum(body, oid_len) != sum {
        return Err(IndexError::Checksum);
    }

    let hdr_len = STAT_LEN + oid_len + 2;
    // Smallest possible entry: the fixed part plus a NUL and one more byte (a name byte, padding or varint).
    let min_entry = hdr_len + 2;
    let count_us = count as usize;
    if count_us > (body.len() - HEADER_LEN) / min_entry {
        return Err(IndexError::Count(count));
    }
    let mut path_budget = body.len().saturating_mul(MAX_PATH_EXPANSION).saturating_add(PATH_SLACK);
    let mut entries: Vec<Entry> = Vec::with_capacity(count_us);
    // Checks that do not affect where the next entry starts wait until the extensions have been read, so a
    // split index (whose entries can have stripped names) is reported as such rather than as a bad path.
    let mut deferred: Option<IndexError> = None;
    let mut sparse_dir = false;
    let mut pos = HEADER_LEN;

    for n in 0..count_us {
        let start = pos;
        let h = body.get(pos..pos + hdr_len).ok_or(IndexError::Truncated("entry"))?;
        let flags = be16(h, STAT_LEN + oid_len);
        pos += hdr_len;
        let extended = flags & FLAG_EXTENDED != 0;
        let mut xflags = 0u16;
        if extended {
            if version < 3 {
                return Err(entry_err(n, b"", "extended flags in a version 2 index"));
            }
            let x = body.get(pos..pos + 2).ok_or(IndexError::Truncated("entry extended flags"))?;
            xflags = be16(x, 0);
            if xflags & !(XFLAG_SKIP_WORKTREE | XFLAG_INTENT_TO_ADD) != 0 {
                return Err(entry_err(n, b"", "unknown extended flags"));
            }
            pos += 2;
        }
        let name_field = usize::from(flags & NAME_MASK);
        let rest = &body[pos..];
        let path = if version == 4 {
            let (strip, used) = read_varint(rest)?;
            let prev = entries.last().map(|e: &Entry| e.path.as_slice()).unwrap_or(b"");
            if strip > prev.len() {
                return Err(entry_err(n, b"", "prefix strips more than the previous path's length"));
            }
            let keep = prev.len() - strip;
            let suffix = &rest[used..];
            let nul = memchr::memchr(0, suffix).ok_or(IndexError::Truncated("entry path"))?;
            path_budget = path_budget
                .checked_sub(keep + nul)
                .ok_or(IndexError::TooLarge("paths expand far beyond the file's size"))?;
            let mut p = Vec::with_capacity(keep + nul);
            p.extend_from_slice(&prev[..keep]);
            p.extend_from_slice(&suffix[..nul]);
            pos += used + nul + 1;
            p
        } else {
            let nul = if name_field < usize::from(NAME_MASK) {
                // Git takes the length from the field, so the NUL must sit right there (an earlier NUL is
                // caught by the path check).
                match rest.get(name_field) {
                    Some(0) => name_field,
                    Some(_) => return Err(entry_err(n, &rest[..name_field], "path length does not match its field")),
                    None => return Err(IndexError::Truncated("entry path")),
                }
            } else {
                memchr::memchr(0, rest).ok_or(IndexError::Truncated("entry path"))?
            };
            let end = start + padded_len(oid_len, extended, nul);
            let pad = body.get(pos + nul..end).ok_or(IndexError::Truncated("entry padding"))?;
            if pad.iter().any(|&b| b != 0) {
                return Err(entry_err(n, &rest[..nul], "entry padding is not zero"));
            }
            pos = end;
            rest[..nul].to_vec()
        };
        if name_field != path.len().min(usize::from(NAME_MASK)) {
            return Err(entry_err(n, &path, "path length does not match its field"));
        }

        let e = Entry {
            ctime: (be32(h, 0), be32(h, 4)),
            mtime: (be32(h, 8), be32(h, 12)),
            dev: be32(h, 16),
            ino: be32(h, 20),
            mode: be32(h, 24),
            uid: be32(h, 28),
            gid: be32(h, 32),
            size: be32(h, 36),
            oid: h[STAT_LEN..STAT_LEN + oid_len].to_vec(),
            // Two bits: at most 3.
            stage: ((flags >> FLAG_STAGE_SHIFT) & 3) as u8,
            assume_valid: flags & FLAG_ASSUME_VALID != 0,
            skip_worktree: xflags & XFLAG_SKIP_WORKTREE != 0,
            intent_to_add: xflags & XFLAG_INTENT_TO_ADD != 0,
            path,
        };
        // A sparse index's directory entry: mode 040000, skip-worktree, path ending in `/`. Either mark will do.
        if e.mode == MODE_DIR || (e.skip_worktree && e.path.last() == Some(&b'/')) {
            sparse_dir = true;
        } else if deferred.is_none() {
            if let Err(what) = check_mode(e.mode).and_then(|_| check_path(&e.path)) {
                deferred = Some(entry_err(n, &e.path, what));
            } else if let Some(Err(what)) = entries.last().map(|p| check_order(p, &e)) {
                deferred = Some(entry_err(n, &e.path, what));
            }
        }
        entries.push(e);
    }

    while pos < body.len() {
        let h = body.get(pos..pos + 8).ok_or(IndexError::Truncated("extension header"))?;
        let sig = &h[..4];
        let size = be32(h, 4) as usize;
        let shown = || hutch_text::escape_bytes(sig);
        pos += 8;
        if size > body.len() - pos {
            return Err(IndexError::Extension { sig: shown(), what: "size runs past the end of the file" });
        }
        match sig {
            b"link" => return Err(IndexError::Incomplete("split")),
            b"sdir" => return Err(IndexError::Incomplete("sparse")),
            // Upper case first: optional, safe to ignore (cache tree, resolve-undo, untracked cache, ...).
            _ if sig[0].is_ascii_uppercase() => {}
            _ => return Err(IndexError::Extension { sig: shown(), what: "required by git but not understood" }),
        }
        pos += size;
    }
    if sparse_dir {
        return Err(IndexError::Incomplete("sparse"));
    }
    if let Some(e) = deferred {
        return Err(e);
    }
    Ok(Index { version, entries })
}

fn needs_extended(e: &Entry) -> bool {
    e.skip_worktree || e.intent_to_add
}

/// Writes an index file holding `entries` (version 2, or 3 if any entry is skip-worktree or intent-to-add),
/// with no extensions and a checksum. Entries must be sorted by (path bytes, stage) with no repeats, and hold
/// paths, modes and object ids git would accept.
pub fn write(entries: &[Entry], oid_len: usize) -> Result<Vec<u8>, IndexError> {
    check_oid_len(oid_len)?;
    let count = u32::try_from(entries.len()).map_err(|_| IndexError::TooLarge("more than 2^32-1 entries"))?;
    let mut size = HEADER_LEN + oid_len;
    let mut extended_any = false;
    for (n, e) in entries.iter().enumerate() {
        let fail = |what| entry_err(n, &e.path, what);
        if e.oid.len() != oid_len {
            return Err(fail("object id has the wrong length"));
        }
        if e.stage > 3 {
            return Err(fail("stage is above 3"));
        }
        if e.mode == MODE_DIR {
            return Err(fail("directory entries (sparse index) are not written"));
        }
        check_mode(e.mode).map_err(fail)?;
        check_path(&e.path).map_err(fail)?;
        if n > 0 {
            check_order(&entries[n - 1], e).map_err(fail)?;
        }
        let ext = needs_extended(e);
        extended_any |= ext;
        size = size
            .checked_add(padded_len(oid_len, ext, e.path.len()))
            .ok_or(IndexError::TooLarge("entries exceed the address space"))?;
    }
    let version: u32 = if extended_any { 3 } else { 2 };

    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for e in entries {
        let ext = needs_extended(e);
        // The fixed part is assembled on the stack and copied once: this loop runs for every file in a tree.
        let mut h = [0u8; STAT_LEN + 32 + 4];
        for (i, w) in [e.ctime.0, e.ctime.1, e.mtime.0, e.mtime.1, e.dev, e.ino, e.mode, e.uid, e.gid, e.size].into_iter().enumerate() {
            h[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        h[STAT_LEN..STAT_LEN + oid_len].copy_from_slice(&e.oid);
        // Fits: NAME_MASK is 12 bits.
        let mut flags = e.path.len().min(usize::from(NAME_MASK)) as u16 | (u16::from(e.stage) << FLAG_STAGE_SHIFT);
        if e.assume_valid {
            flags |= FLAG_ASSUME_VALID;
        }
        if ext {
            flags |= FLAG_EXTENDED;
        }
        let mut xflags = 0u16;
        if e.skip_worktree {
            xflags |= XFLAG_SKIP_WORKTREE;
        }
        if e.intent_to_add {
            xflags |= XFLAG_INTENT_TO_ADD;
        }
        let mut fixed = STAT_LEN + oid_len;
        h[fixed..fixed + 2].copy_from_slice(&flags.to_be_bytes());
        fixed += 2;
        if ext {
            h[fixed..fixed + 2].copy_from_slice(&xflags.to_be_bytes());
            fixed += 2;
        }
        let start = out.len();
        out.extend_from_slice(&h[..fixed]);
        out.extend_from_slice(&e.path);
        out.resize(start + padded_len(oid_len, ext, e.path.len()), 0);
    }
    let sum = checksum(&out, oid_len);
    out.extend_from_slice(&sum);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::Git;
    use std::ffi::OsStr;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    struct Repo {
        _t: tempfile::TempDir,
        w: PathBuf,
        g: Git,
        oid_len: usize,
    }

    impl Repo {
        fn new(format: &str) -> Repo {
            let t = tempfile::tempdir().unwrap();
            let w = t.path().join("w");
            let fmt = format!("--object-format={format}");
            Git::discover(t.path()).run("init", [OsStr::new("init"), OsStr::new("-q"), OsStr::new(&fmt), w.as_os_str()]).unwrap();
            let g = Git::at(&w.join(".git")).work_tree(&w);
            Repo { _t: t, w, g, oid_len: if format == "sha256" { 32 } else { 20 } }
        }

        fn git(&self, args: &[&str]) -> String {
            String::from_utf8(self.g.run("test", args).unwrap()).unwrap()
        }

        fn git_in(&self, args: &[&str], input: &str) -> String {
            String::from_utf8(self.g.run_input("test", args, Some(input.as_bytes())).unwrap()).unwrap()
        }

        fn hash(&self, content: &str) -> String {
            self.git_in(&["hash-object", "-w", "--stdin"], content).trim().to_string()
        }

        fn index_path(&self) -> PathBuf {
            self.w.join(".git/index")
        }

        fn index(&self) -> Vec<u8> {
            std::fs::read(self.index_path()).unwrap()
        }

        fn file(&self, rel: &str, content: &str) {
            let p = self.w.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
    }

    /// Longer than the 12-bit length field can hold, so git writes the 0xFFF marker.
    fn long_path() -> String {
        let mut p = "long/".to_string();
        for _ in 0..21 {
            p.push_str(&"x".repeat(200));
            p.push('/');
        }
        p.push_str("end");
        assert!(p.len() > 4095);
        p
    }

    /// Regular files, an executable, a symlink and nested directories, added with `git add -A`.
    fn populate(r: &Repo) {
        r.file("a.txt", "alpha\n");
        r.file("dir/sub/b.txt", "beta\n");
        r.file("dir/c.txt", "gamma gamma\n");
        r.file("e", "");
        r.file("run.sh", "#!/bin/sh\necho hi\n");
        std::fs::set_permissions(r.w.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a.txt", r.w.join("link")).unwrap();
        r.git(&["add", "-A"]);
    }

    /// Entries without work-tree files: a path too long for the length field, a gitlink, a three-way conflict.
    fn add_unusual(r: &Repo) {
        let blob = r.hash("long\n");
        r.git(&["update-index", "--add", "--cacheinfo", &format!("100644,{blob},{}", long_path())]);
        r.git(&["update-index", "--add", "--cacheinfo", &format!("160000,{blob},sub")]);
        let other = r.hash("other\n");
        r.git_in(
            &["update-index", "--index-info"],
            &format!("100644 {blob} 1\tconf\n100644 {other} 2\tconf\n100755 {blob} 3\tconf\n"),
        );
    }

    /// Compares every field of `idx` with what `git ls-files -s --debug` says about the same index.
    fn compare_with_git(r: &Repo, idx: &Index) {
        let out = r.git(&["ls-files", "-s", "--debug"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len() % 6, 0, "{out}");
        assert_eq!(lines.len() / 6, idx.entries.len(), "entry count");
        let num = |s: &str, key: &str| -> u32 {
            let (_, rest) = s.split_once(key).unwrap_or_else(|| panic!("{key} in {s}"));
            let v = rest.trim_start().split(|c: char| c.is_whitespace()).next().unwrap();
            u32::from_str_radix(v, if key == "flags:" { 16 } else { 10 }).unwrap()
        };
        let pair = |s: &str, key: &str| -> (u32, u32) {
            let (_, rest) = s.split_once(key).unwrap();
            let (a, b) = rest.trim().split_once(':').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        for (rec, e) in lines.chunks(6).zip(&idx.entries) {
            let (head, path) = rec[0].split_once('\t').unwrap();
            let f: Vec<&str> = head.split(' ').collect();
            assert_eq!(path.as_bytes(), e.path.as_slice());
            assert_eq!(u32::from_str_radix(f[0], 8).unwrap(), e.mode, "{path}");
            assert_eq!(f[1], hex::encode(&e.oid), "{path}");
            assert_eq!(f[2].parse::<u8>().unwrap(), e.stage, "{path}");
            assert_eq!(pair(rec[1], "ctime:"), e.ctime, "{path}");
            assert_eq!(pair(rec[2], "mtime:"), e.mtime, "{path}");
            assert_eq!(num(rec[3], "dev:"), e.dev, "{path}");
            assert_eq!(num(rec[3], "ino:"), e.ino, "{path}");
            assert_eq!(num(rec[4], "uid:"), e.uid, "{path}");
            assert_eq!(num(rec[4], "gid:"), e.gid, "{path}");
            assert_eq!(num(rec[5], "size:"), e.size, "{path}");
            let flags = num(rec[5], "flags:");
            assert_eq!(flags & 0x8000 != 0, e.assume_valid, "{path}");
            assert_eq!(flags & (1 << 30) != 0, e.skip_worktree, "{path}");
            assert_eq!(flags & (1 << 29) != 0, e.intent_to_add, "{path}");
            assert_eq!(e.oid.len(), r.oid_len);
        }
    }

    fn find<'a>(idx: &'a Index, path: &str) -> &'a Entry {
        idx.entries.iter().find(|e| e.path == path.as_bytes()).unwrap_or_else(|| panic!("{path} not in index"))
    }

    /// Stat fields of a real file came through (not just zeros), matching the file system.
    fn check_stat(r: &Repo, idx: &Index, rel: &str) {
        let e = find(idx, rel);
        let m = std::fs::symlink_metadata(r.w.join(rel)).unwrap();
        assert_eq!(e.mtime, (m.mtime() as u32, m.mtime_nsec() as u32), "{rel}");
        assert_eq!(e.ino, m.ino() as u32, "{rel}");
        assert_eq!(e.size, m.size() as u32, "{rel}");
        assert_ne!(e.ino, 0);
    }

    fn versions_and_modes(r: &Repo, version: u32) -> Index {
        let idx = parse(&r.index(), r.oid_len).unwrap();
        assert_eq!(idx.version, version);
        compare_with_git(r, &idx);
        assert_eq!(find(&idx, "run.sh").mode, 0o100755);
        assert_eq!(find(&idx, "link").mode, 0o120000);
        assert_eq!(find(&idx, "a.txt").mode, 0o100644);
        for rel in ["a.txt", "dir/sub/b.txt", "run.sh", "link", "e"] {
            check_stat(r, &idx, rel);
        }
        idx
    }

    #[test]
    fn parse_v2_matches_git() {
        let r = Repo::new("sha1");
        populate(&r);
        let bytes = r.index();
        let idx = versions_and_modes(&r, 2);
        // `git add` writes no extensions, so writing the same entries gives git's bytes exactly.
        assert_eq!(write(&idx.entries, 20).unwrap(), bytes, "write() differs from git's own index");

        // A cache-tree extension (skipped), then entries with no files: long name, gitlink, conflict stages.
        r.git(&["write-tree"]);
        add_unusual(&r);
        let idx = versions_and_modes(&r, 2);
        let long = find(&idx, &long_path());
        assert_eq!(long.path.len(), long_path().len());
        assert_eq!(find(&idx, "sub").mode, 0o160000);
        let stages: Vec<u8> = idx.entries.iter().filter(|e| e.path == b"conf").map(|e| e.stage).collect();
        assert_eq!(stages, [1, 2, 3]);
        let bytes = r.index();
        assert!(bytes.windows(4).any(|w| w == b"TREE"), "expected a cache-tree extension to skip");

        // index.skipHash: an all-zero checksum is accepted.
        r.file("a.txt", "alpha changed\n");
        r.git(&["-c", "index.skipHash=true", "add", "a.txt"]);
        let bytes = r.index();
        assert!(bytes[bytes.len() - 20..].iter().all(|&b| b == 0), "git did not skip the hash");
        let idx = versions_and_modes(&r, 2);
        assert_eq!(find(&idx, "a.txt").size, 14);
    }

    #[test]
    fn parse_v3_matches_git() {
        let r = Repo::new("sha1");
        populate(&r);
        r.git(&["update-index", "--skip-worktree", "a.txt"]);
        r.git(&["update-index", "--assume-unchanged", "dir/c.txt"]);
        r.file("new.txt", "new\n");
        r.git(&["add", "-N", "new.txt"]);
        add_unusual(&r);
        let bytes = r.index();
        let idx = versions_and_modes(&r, 3);
        assert!(find(&idx, "a.txt").skip_worktree);
        assert!(find(&idx, "dir/c.txt").assume_valid);
        assert!(find(&idx, "new.txt").intent_to_add);
        assert_eq!(idx.entries.iter().filter(|e| e.skip_worktree || e.assume_valid || e.intent_to_add).count(), 3);
        assert_eq!(write(&idx.entries, 20).unwrap(), bytes, "write() differs from git's own version 3 index");
    }

    #[test]
    fn parse_v4_matches_git() {
        let r = Repo::new("sha1");
        populate(&r);
        add_unusual(&r);
        r.git(&["update-index", "--skip-worktree", "dir/sub/b.txt"]);
        r.git(&["update-index", "--index-version", "4"]);
        let idx = versions_and_modes(&r, 4);
        assert!(find(&idx, "dir/sub/b.txt").skip_worktree);
        // Written back as version 3, the entries are the same.
        let again = parse(&write(&idx.entries, 20).unwrap(), 20).unwrap();
        assert_eq!(again.version, 3);
        assert_eq!(again.entries, idx.entries);
    }

    #[test]
    fn parse_sha256_matches_git() {
        let r = Repo::new("sha256");
        populate(&r);
        let bytes = r.index();
        let idx = versions_and_modes(&r, 2);
        assert_eq!(write(&idx.entries, 32).unwrap(), bytes);
        assert!(parse(&bytes, 20).is_err(), "a SHA-256 index read as SHA-1 must fail");
        add_unusual(&r);
        r.git(&["update-index", "--skip-worktree", "e"]);
        versions_and_modes(&r, 3);
        r.git(&["update-index", "--index-version", "4"]);
        let idx = versions_and_modes(&r, 4);
        assert!(find(&idx, "e").skip_worktree);
    }

    fn set_old_mtime(p: &Path) {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
    }

    /// An entry for a work-tree file, stat data from the file system as git records it.
    fn entry_for(w: &Path, rel: &str, oid_hex: &str) -> Entry {
        let m = std::fs::symlink_metadata(w.join(rel)).unwrap();
        let mode = if m.file_type().is_symlink() {
            0o120000
        } else if m.mode() & 0o111 != 0 {
            0o100755
        } else {
            0o100644
        };
        Entry {
            ctime: (m.ctime() as u32, m.ctime_nsec() as u32),
            mtime: (m.mtime() as u32, m.mtime_nsec() as u32),
            dev: m.dev() as u32,
            ino: m.ino() as u32,
            mode,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size() as u32,
            oid: hex::decode(oid_hex).unwrap(),
            path: rel.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// A work tree committed as HEAD (through a throwaway index), with every regular file's mtime an hour
    /// old so git does not treat it as racily clean and re-read it; then the real index removed.
    fn committed_tree(format: &str) -> (Repo, Vec<(String, String)>) {
        let r = Repo::new(format);
        r.file("a.txt", "alpha\n");
        r.file("dir/sub/b.txt", "beta\n");
        r.file("dir/c.txt", "gamma gamma\n");
        r.file("e", "");
        r.file("run.sh", "#!/bin/sh\necho hi\n");
        std::fs::set_permissions(r.w.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a.txt", r.w.join("link")).unwrap();
        for f in ["a.txt", "dir/sub/b.txt", "dir/c.txt", "e", "run.sh"] {
            set_old_mtime(&r.w.join(f));
        }
        let tmp = r.w.join(".git/tmp-index");
        let g = r.g.clone().index(&tmp);
        g.run("add", ["add", "-A"]).unwrap();
        let tree = g.line("write-tree", ["write-tree"]).unwrap();
        let commit = g.line("commit-tree", ["commit-tree", "-m", "base", &tree]).unwrap();
        r.git(&["update-ref", "HEAD", &commit]);
        std::fs::remove_file(&tmp).unwrap();
        let mut files = Vec::new();
        for f in ["a.txt", "dir/c.txt", "dir/sub/b.txt", "e", "link", "run.sh"] {
            let content = if f == "link" {
                "a.txt".to_string()
            } else {
                std::fs::read_to_string(r.w.join(f)).unwrap()
            };
            files.push((f.to_string(), r.hash(&content)));
        }
        (r, files)
    }

    fn ls_files_expected(entries: &[Entry]) -> String {
        entries
            .iter()
            .map(|e| format!("{:06o} {} {}\t{}\n", e.mode, hex::encode(&e.oid), e.stage, String::from_utf8_lossy(&e.path)))
            .collect()
    }

    #[test]
    fn written_index_is_clean_to_git() {
        for format in ["sha1", "sha256"] {
            let (r, files) = committed_tree(format);
            let entries: Vec<Entry> = files.iter().map(|(f, oid)| entry_for(&r.w, f, oid)).collect();
            std::fs::write(r.index_path(), write(&entries, r.oid_len).unwrap()).unwrap();
            assert_eq!(r.git(&["ls-files", "-s"]), ls_files_expected(&entries));
            // diff-files compares stat data only (no refresh): nothing listed means every field matched.
            assert_eq!(r.git(&["diff-files", "--name-only"]), "", "{format}");
            assert_eq!(r.git(&["status", "--porcelain"]), "", "{format}");
            r.git(&["fsck", "--no-progress"]);
            r.git(&["update-index", "--refresh"]);
            let idx = parse(&r.index(), r.oid_len).unwrap();
            assert_eq!(idx.entries, entries, "{format}: git's refreshed index kept our entries");
        }
    }

    #[test]
    fn written_stat_data_is_what_git_uses() {
        let (r, files) = committed_tree("sha1");
        let mut entries: Vec<Entry> = files.iter().map(|(f, oid)| entry_for(&r.w, f, oid)).collect();

        // Stat data right, object id of other content: git trusts the stat data and never reads a.txt, so the
        // work tree matches the index while the index differs from HEAD.
        let other = r.hash("not alpha\n");
        entries[0].oid = hex::decode(&other).unwrap();
        std::fs::write(r.index_path(), write(&entries, 20).unwrap()).unwrap();
        assert_eq!(r.git(&["diff-files", "--name-only"]), "");
        assert_eq!(r.git(&["status", "--porcelain"]), "M  a.txt\n");

        // Right object id, wrong size: git takes the file as modified.
        entries[0].oid = hex::decode(&files[0].1).unwrap();
        entries[0].size += 1;
        std::fs::write(r.index_path(), write(&entries, 20).unwrap()).unwrap();
        assert_eq!(r.git(&["status", "--porcelain"]), " M a.txt\n");
        // Control: the right size is clean.
        entries[0].size -= 1;
        std::fs::write(r.index_path(), write(&entries, 20).unwrap()).unwrap();
        assert_eq!(r.git(&["status", "--porcelain"]), "");
    }

    #[test]
    fn written_v3_with_long_names_and_flags() {
        let (r, files) = committed_tree("sha1");
        let mut entries: Vec<Entry> = files.iter().map(|(f, oid)| entry_for(&r.w, f, oid)).collect();
        let blob = r.hash("long\n");
        let empty = r.hash("");
        // Paths around the 12-bit length field's limit; no files for them, so skip-worktree keeps git quiet.
        for len in [0xffe, 0xfff, 0x1000, long_path().len()] {
            let p = if len == long_path().len() { long_path() } else { format!("z/{}", "n".repeat(len - 2)) };
            assert_eq!(p.len(), len);
            entries.push(Entry { mode: 0o100644, oid: hex::decode(&blob).unwrap(), skip_worktree: true, path: p.into_bytes(), ..Default::default() });
        }
        r.file("new.txt", "");
        entries.push(entry_for(&r.w, "new.txt", &empty));
        entries.last_mut().unwrap().intent_to_add = true;
        entries[1].assume_valid = true;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let bytes = write(&entries, 20).unwrap();
        assert_eq!(be32(&bytes, 4), 3);
        std::fs::write(r.index_path(), &bytes).unwrap();
        assert_eq!(r.git(&["ls-files", "-s"]), ls_files_expected(&entries));
        let idx = parse(&bytes, 20).unwrap();
        assert_eq!(idx.entries, entries);
        compare_with_git(&r, &idx);
        let tags = r.git(&["ls-files", "-v"]);
        assert!(tags.lines().any(|l| l == "h dir/c.txt"), "{tags}");
        assert!(tags.lines().any(|l| l == format!("S {}", long_path())), "assume-valid or skip-worktree lost");
        r.git(&["fsck", "--no-progress"]);
        // Only HEAD differs: the skip-worktree paths are new to it, new.txt is intent-to-add; git sees no
        // work-tree change (stat data of a.txt.. run.sh matched) and no deletion (skip-worktree honoured).
        let mut expected: Vec<String> = entries
            .iter()
            .filter(|e| e.skip_worktree)
            .map(|e| format!("A  {}", String::from_utf8_lossy(&e.path)))
            .collect();
        expected.push(" A new.txt".into());
        expected.sort();
        let status = r.git(&["status", "--porcelain"]);
        let mut got: Vec<&str> = status.lines().collect();
        got.sort();
        assert!(got == expected, "status differs:\n{}", status.lines().map(|l| hutch_text::shorten(l, 60)).collect::<Vec<_>>().join("\n"));
    }

    #[test]
    fn round_trip() {
        for oid_len in [20, 32] {
            let mut entries = Vec::new();
            for (i, p) in ["a", "a/b", "a/b/c", "ab", "b", "b", "b", "c", &"x".repeat(0xfff), &"y".repeat(5000)].iter().enumerate() {
                entries.push(Entry {
                    ctime: (u32::MAX, 999_999_999),
                    mtime: (i as u32, 7),
                    dev: 1 << 31,
                    ino: i as u32 * 1000,
                    mode: [0o100644, 0o100755, 0o120000, 0o160000][i % 4],
                    uid: 1000,
                    gid: u32::MAX,
                    size: i as u32 * 3,
                    oid: (0..oid_len as u8).map(|b| b.wrapping_mul(i as u8 + 1)).collect(),
                    stage: if *p == "b" { [1, 2, 3][i - 4] } else { 0 },
                    assume_valid: i % 3 == 0,
                    skip_worktree: false,
                    intent_to_add: false,
                    path: p.as_bytes().to_vec(),
                });
            }
            let v2 = write(&entries, oid_len).unwrap();
            let idx = parse(&v2, oid_len).unwrap();
            assert_eq!(idx.version, 2);
            assert_eq!(idx.entries, entries);
            entries[2].skip_worktree = true;
            entries[7].intent_to_add = true;
            entries[8].skip_worktree = true;
            entries[8].intent_to_add = true;
            let v3 = write(&entries, oid_len).unwrap();
            let idx = parse(&v3, oid_len).unwrap();
            assert_eq!(idx.version, 3);
            assert_eq!(idx.entries, entries);
            assert_eq!(parse(&write(&[], oid_len).unwrap(), oid_len).unwrap().entries, []);
        }
    }

    #[test]
    fn write_refuses_what_git_would_not_read() {
        let ok = Entry { mode: 0o100644, oid: vec![1; 20], path: b"a".to_vec(), ..Default::default() };
        let with = |f: &dyn Fn(&mut Entry)| {
            let mut e = ok.clone();
            f(&mut e);
            e
        };
        let b = with(&|e| e.path = b"b".to_vec());
        assert!(write(&[ok.clone(), b.clone()], 20).is_ok());
        assert!(write(&[b.clone(), ok.clone()], 20).is_err(), "unsorted");
        assert!(write(&[ok.clone(), ok.clone()], 20).is_err(), "duplicate");
        let s1 = with(&|e| e.stage = 1);
        let s2 = with(&|e| e.stage = 2);
        assert!(write(&[s1.clone(), s2.clone()], 20).is_ok());
        assert!(write(&[s2.clone(), s1.clone()], 20).is_err(), "stages out of order");
        assert!(write(&[ok.clone(), s1.clone()], 20).is_err(), "merged and unmerged");
        assert!(write(&[with(&|e| e.stage = 4)], 20).is_err());
        assert!(write(std::slice::from_ref(&ok), 32).is_err(), "oid length");
        assert!(write(std::slice::from_ref(&ok), 21).is_err(), "hash length");
        assert!(write(&[with(&|e| e.mode = 0o040000)], 20).is_err(), "directory");
        assert!(write(&[with(&|e| e.mode = 0o100600)], 20).is_err(), "mode");
        for p in ["", "/a", "a/", "a//b", "./a", "a/../b", ".git/config", "x/.GIT/y", "a\0b"] {
            assert!(write(&[with(&|e| e.path = p.as_bytes().to_vec())], 20).is_err(), "path {p:?}");
        }
    }

    /// A git-written index with a cache tree and a long name, in version 2 and version 4.
    fn sample_indexes() -> Vec<Vec<u8>> {
        let r = Repo::new("sha1");
        populate(&r);
        r.git(&["write-tree"]);
        add_unusual(&r);
        let v2 = r.index();
        r.git(&["update-index", "--index-version", "4"]);
        vec![v2, r.index()]
    }

    fn zero_sum(body: &[u8]) -> Vec<u8> {
        let mut b = body.to_vec();
        b.extend_from_slice(&[0; 20]);
        b
    }

    #[test]
    fn truncated_indexes_are_errors() {
        for bytes in sample_indexes() {
            let full = parse(&bytes, 20).unwrap();
            for l in 0..bytes.len() {
                assert!(parse(&bytes[..l], 20).is_err(), "prefix of {l} bytes accepted");
            }
            // Without a checksum to catch it, the structure alone must: a cut may only drop whole extensions.
            let body = &bytes[..bytes.len() - 20];
            let mut accepted = 0;
            for l in 0..body.len() {
                if let Ok(idx) = parse(&zero_sum(&body[..l]), 20) {
                    assert_eq!(idx.entries, full.entries, "cut at {l} changed the entries");
                    accepted += 1;
                }
            }
            assert!(accepted <= 2, "{accepted} cuts accepted");
        }
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        for bytes in sample_indexes() {
            let body = zero_sum(&bytes[..bytes.len() - 20]);
            let mut errors = 0;
            for i in 0..body.len() - 20 {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut b = body.clone();
                    b[i] ^= x;
                    errors += usize::from(parse(&b, 20).is_err());
                }
            }
            // Most fields are free-form (stat data, object ids), but many flips must be caught.
            println!("{errors} of {} corruptions refused", 3 * (body.len() - 20));
            assert!(errors > 200, "only {errors} corruptions refused");
        }
    }

    #[test]
    fn bad_checksum_is_refused() {
        let bytes = &sample_indexes()[0];
        let mut b = bytes.clone();
        b[100] ^= 1;
        assert!(matches!(parse(&b, 20), Err(IndexError::Checksum)), "{:?}", parse(&b, 20));
        let mut b = bytes.clone();
        *b.last_mut().unwrap() ^= 1;
        assert!(matches!(parse(&b, 20), Err(IndexError::Checksum)));
    }

    #[test]
    fn entry_count_beyond_the_data_is_refused() {
        let bytes = &sample_indexes()[0];
        for count in [u32::MAX, 1 << 24, be32(bytes, 8) + 1, be32(bytes, 8) + 2] {
            let mut body = bytes[..bytes.len() - 20].to_vec();
            body[8..12].copy_from_slice(&count.to_be_bytes());
            let sum = checksum(&body, 20);
            body.extend_from_slice(&sum);
            let e = parse(&body, 20).unwrap_err();
            println!("count {count}: {e}");
            if count > 1000 {
                assert!(matches!(e, IndexError::Count(c) if c == count), "{e}");
            }
        }
        // A small file claiming many entries.
        let mut b = write(&[], 20).unwrap();
        b.truncate(12);
        b[8..12].copy_from_slice(&1u32.to_be_bytes());
        let sum = checksum(&b, 20);
        b.extend_from_slice(&sum);
        assert!(matches!(parse(&b, 20), Err(IndexError::Count(1))));
    }

    #[test]
    fn split_index_is_refused() {
        let r = Repo::new("sha1");
        populate(&r);
        r.git(&["update-index", "--split-index"]);
        r.file("a.txt", "changed\n");
        r.git(&["add", "a.txt"]);
        let e = parse(&r.index(), 20).unwrap_err();
        assert!(matches!(e, IndexError::Incomplete("split")), "{e}");
        println!("{e}");
    }

    #[test]
    fn sparse_index_is_refused() {
        let r = Repo::new("sha1");
        r.file("in/a", "a\n");
        r.file("out/b", "b\n");
        r.file("out/deep/c", "c\n");
        r.git(&["add", "-A"]);
        r.git(&["commit", "-q", "-m", "base"]);
        if let Err(e) = r.g.run("sparse-checkout", ["sparse-checkout", "set", "--cone", "--sparse-index", "in"]) {
            println!("note: this git cannot make a sparse index ({e}); skipped");
            return;
        }
        let bytes = r.index();
        assert!(bytes.windows(4).any(|w| w == b"sdir"), "git wrote no sparse index");
        let e = parse(&bytes, 20).unwrap_err();
        assert!(matches!(e, IndexError::Incomplete("sparse")), "{e}");

        // A directory entry alone (no `sdir` extension) is refused the same way.
        let e = Entry { mode: 0o100644, oid: vec![7; 20], skip_worktree: true, path: b"out".to_vec(), ..Default::default() };
        let mut b = write(&[e], 20).unwrap();
        b[12 + 24..12 + 28].copy_from_slice(&0o040000u32.to_be_bytes());
        let n = b.len();
        b[n - 20..].fill(0);
        assert!(matches!(parse(&b, 20), Err(IndexError::Incomplete("sparse"))));
        // So is a skip-worktree entry naming a directory (`out/`), whatever its mode.
        let e = Entry { mode: 0o100644, oid: vec![7; 20], skip_worktree: true, path: b"outx".to_vec(), ..Default::default() };
        let mut b = write(&[e], 20).unwrap();
        assert_eq!(&b[12 + 64..12 + 68], b"outx");
        b[12 + 67] = b'/';
        let n = b.len();
        b[n - 20..].fill(0);
        assert!(matches!(parse(&b, 20), Err(IndexError::Incomplete("sparse"))));
        b[12 + 67] = b'y';
        assert!(parse(&b, 20).is_ok(), "control");
    }

    #[test]
    fn unknown_required_extension_is_refused() {
        let entries = [Entry { mode: 0o100644, oid: vec![1; 20], path: b"a".to_vec(), ..Default::default() }];
        let mut body = write(&entries, 20).unwrap();
        body.truncate(body.len() - 20);
        let with_ext = |sig: &[u8; 4], data: &[u8]| {
            let mut b = body.clone();
            b.extend_from_slice(sig);
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            let sum = checksum(&b, 20);
            b.extend_from_slice(&sum);
            b
        };
        assert_eq!(parse(&with_ext(b"ZZZZ", b"data"), 20).unwrap().entries, entries);
        assert!(matches!(parse(&with_ext(b"zzzz", b"data"), 20), Err(IndexError::Extension { .. })));
        assert!(matches!(parse(&with_ext(b"link", b""), 20), Err(IndexError::Incomplete("split"))));
    }

    #[test]
    fn timing_50k_entries() {
        let entries: Vec<Entry> = (0..50_000u32)
            .map(|i| Entry {
                ctime: (1_700_000_000 + i, i),
                mtime: (1_700_000_000 + i, i),
                dev: 2049,
                ino: 100_000 + i,
                mode: 0o100644,
                uid: 1000,
                gid: 1000,
                size: i % 10_000,
                oid: (0..20u32).map(|b| (i.wrapping_mul(31) ^ b) as u8).collect(),
                path: format!("src/module{:03}/sub/file{:05}.rs", i / 500, i).into_bytes(),
                ..Default::default()
            })
            .collect();
        // This thread's CPU time, not wall time: the test machine is shared, and waiting for a core is not
        // the code's cost. Best of 20 runs.
        fn cpu_now() -> Duration {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            assert_eq!(rc, 0);
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        }
        let best = |f: &mut dyn FnMut()| {
            (0..20)
                .map(|_| {
                    let t = cpu_now();
                    f();
                    cpu_now() - t
                })
                .min()
                .unwrap()
        };
        let once = |f: &mut dyn FnMut()| {
            let t = cpu_now();
            f();
            cpu_now() - t
        };
        // First calls touch fresh memory (page faults are most of the difference); later ones reuse the heap
        // and include dropping their result.
        let mut bytes = Vec::new();
        let w_cold = once(&mut || bytes = write(&entries, 20).unwrap());
        let mut parsed = None;
        let p_cold = once(&mut || parsed = Some(parse(&bytes, 20).unwrap()));
        assert_eq!(parsed.unwrap().entries, entries);
        let w = best(&mut || drop(write(&entries, 20).unwrap()));
        let p = best(&mut || drop(parse(&bytes, 20).unwrap()));
        let sha = best(&mut || drop(checksum(&bytes, 20)));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "50000 entries, {} bytes: first write {:.2} ms, first parse {:.2} ms; best of 20: write {:.2} ms, parse {:.2} ms; SHA-1 of the file {:.2} ms",
            bytes.len(),
            ms(w_cold),
            ms(p_cold),
            ms(w),
            ms(p),
            ms(sha)
        );
    }
}
