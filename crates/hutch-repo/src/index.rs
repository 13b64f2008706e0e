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

/// Git's rule for paths it will put in an index, less the platform-specific spellings of `.git`.
fn check_path(p: &[u8]) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty path");
    }
    if p[0] == b'/' {
        return Err("absolute path");
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => return Err("empty path component"),
            b"." | b".." => return Err("`.` or `..` path component"),
            _ if c.eq_ignore_ascii_case(b".git") => return Err("`.git` path component"),
            _ => {}
        }
    }
    if p.contains(&0) {
        return Err("NUL in path");
    }
    Ok(())
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
                // Git takes the length from the field; the NUL must sit right there and nowhere before.
                let name = rest.get(..=name_field).ok_or(IndexError::Truncated("entry path"))?;
                match memchr::memchr(0, name) {
                    Some(i) if i == name_field => i,
                    _ => return Err(entry_err(n, &name[..name_field], "path length does not match its field")),
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
        if deferred.is_none() {
            if e.mode == MODE_DIR {
                sparse_dir = true;
            } else if let Err(what) = check_mode(e.mode).and_then(|_| check_path(&e.path)) {
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
        let start = out.len();
        for w in [e.ctime.0, e.ctime.1, e.mtime.0, e.mtime.1, e.dev, e.ino, e.mode, e.uid, e.gid, e.size] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(&e.oid);
        let ext = needs_extended(e);
        // Fits: NAME_MASK is 12 bits.
        let mut flags = e.path.len().min(usize::from(NAME_MASK)) as u16 | (u16::from(e.stage) << FLAG_STAGE_SHIFT);
        if e.assume_valid {
            flags |= FLAG_ASSUME_VALID;
        }
        if ext {
            flags |= FLAG_EXTENDED;
        }
        out.extend_from_slice(&flags.to_be_bytes());
        if ext {
            let mut x = 0u16;
            if e.skip_worktree {
                x |= XFLAG_SKIP_WORKTREE;
            }
            if e.intent_to_add {
                x |= XFLAG_INTENT_TO_ADD;
            }
            out.extend_from_slice(&x.to_be_bytes());
        }
        out.extend_from_slice(&e.path);
        out.resize(start + padded_len(oid_len, ext, e.path.len()), 0);
    }
    let sum = checksum(&out, oid_len);
    out.extend_from_slice(&sum);
    Ok(out)
}
