//! A writer of read-only erofs images: the workspace image made straight from the snapshot's files (no checkout
//! directory, no `mkfs.erofs`, large sequential writes instead of one system call per 4 KiB), and delta images
//! whose unchanged file data stays in an earlier image that the VM attaches as a second device.
//!
//! The layout is the simplest the kernel reads (Linux 5.16 and later): 4 KiB blocks, no compression, no extended
//! attributes, every inode "extended" (its own modification time). Data in this image is in whole blocks ("flat
//! plain"); data on the second device is one chunk whose index names that device (as `mkfs.erofs --blobdev`
//! makes). Block 0 holds the superblock and the device table, then file data in the order it was appended, then
//! directory blocks, then the inode table, root first.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Block size (the guest's page size: the only one its erofs reads).
pub const BLOCK: u64 = 4096;

const MAGIC: u32 = 0xE0F5_E1E2;
const SUPERBLOCK_OFFSET: u64 = 1024;
const DIRENT_SIZE: usize = 12;
/// The device table's slot offset, in 128-byte slots from the image's start: right after the superblock.
const DEVT_SLOTOFF: u16 = 9;
const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Chunk indexes (with a device id each) follow the inode.
const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// Data layouts, in `i_format` from bit 1.
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_CHUNK_BASED: u16 = 4;
const NAME_MAX: usize = 255;

const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("cannot write the image")]
    Io(#[source] std::io::Error),
    #[error("{path:?} is both a file and a directory in the image")]
    Conflict { path: String },
    #[error("the path {path:?} has an empty, `.`, `..` or over-long (>255 byte) name")]
    BadName { path: String },
    #[error("the image is too large for its block addresses")]
    TooLarge,
    #[error("a file changed size while it was copied ({copied} of {expected} bytes)")]
    ShortRead { copied: u64, expected: u64 },
}

fn io(e: std::io::Error) -> ErofsError {
    ErofsError::Io(e)
}

/// Where a file's bytes are: `len` bytes from block `block` of device `device` (0: this image; 1: the base
/// device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub device: u16,
    pub block: u32,
    pub len: u64,
}

impl Extent {
    /// The same bytes, as seen from an image that has this one's file as its base device.
    pub fn on_base(self) -> Extent {
        Extent { device: 1, ..self }
    }
}

/// A second-device base image: its size in blocks.
#[derive(Debug, Clone, Copy)]
pub struct Base {
    pub blocks: u32,
}

type Children = BTreeMap<Vec<u8>, Node>;

#[derive(Debug)]
enum Node {
    Dir(BTreeMap<Vec<u8>, Node>),
    File { perm: u16, data: Extent, mtime: Option<(u64, u32)> },
    Symlink(Extent),
}

/// An image being written: data first (as the caller appends it), the tree last ([`Writer::finish`]).
pub struct Writer {
    file: File,
    next_block: u64,
    root: BTreeMap<Vec<u8>, Node>,
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

impl Writer {
    /// Creates (truncates) the image file at `path`.
    pub fn create(path: &Path) -> Result<Writer, ErofsError> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(io)?;
        Ok(Writer { file, next_block: 1, root: BTreeMap::new() })
    }

    fn claim(&mut self, len: u64) -> Result<u32, ErofsError> {
        if len == 0 {
            return Ok(0);
        }
        let block = u32::try_from(self.next_block).map_err(|_| ErofsError::TooLarge)?;
        self.next_block += len.div_ceil(BLOCK);
        if self.next_block >= u64::from(u32::MAX) {
            return Err(ErofsError::TooLarge);
        }
        Ok(block)
    }

    /// Appends bytes as one file's data.
    pub fn append_bytes(&mut self, bytes: &[u8]) -> Result<Extent, ErofsError> {
        let block = self.claim(bytes.len() as u64)?;
        self.file.write_all_at(bytes, u64::from(block) * BLOCK).map_err(io)?;
        Ok(Extent { device: 0, block, len: bytes.len() as u64 })
    }

    /// Reserves room for `len` bytes of one file's data, to be filled with [`copy_at`] (from any thread).
    pub fn reserve(&mut self, len: u64) -> Result<Extent, ErofsError> {
        Ok(Extent { device: 0, block: self.claim(len)?, len })
    }

    /// The image file (for [`copy_at`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends `len` bytes of `src` (from its start) as one file's data, copied inside the kernel where it can.
    pub fn append_file(&mut self, src: &File, len: u64) -> Result<Extent, ErofsError> {
        let x = self.reserve(len)?;
        copy_at(&self.file, x, src)?;
        Ok(x)
    }

    /// Appends exactly `len` bytes read from `r` as one file's data.
    pub fn append_reader<R: Read + ?Sized>(&mut self, r: &mut R, len: u64) -> Result<Extent, ErofsError> {
        let block = self.claim(len)?;
        self.copy_from(r, u64::from(block) * BLOCK, len)?;
        Ok(Extent { device: 0, block, len })
    }

    fn copy_from<R: Read + ?Sized>(&mut self, r: &mut R, at: u64, len: u64) -> Result<(), ErofsError> {
        write_from(&self.file, r, at, len)
    }

    /// The directory holding `path`'s last component (made as needed), and that component.
    fn parent_of<'a>(&mut self, path: &'a [u8]) -> Result<(&mut Children, &'a [u8]), ErofsError> {
        let mut parts = path.split(|&b| b == b'/').peekable();
        let mut dir = &mut self.root;
        while let Some(part) = parts.next() {
            if part.is_empty() || part == b"." || part == b".." || part.len() > NAME_MAX {
                return Err(ErofsError::BadName { path: show(path) });
            }
            if parts.peek().is_none() {
                return Ok((dir, part));
            }
            let node = dir.entry(part.to_vec()).or_insert_with(|| Node::Dir(BTreeMap::new()));
            dir = match node {
                Node::Dir(d) => d,
                _ => return Err(ErofsError::Conflict { path: show(path) }),
            };
        }
        Err(ErofsError::BadName { path: show(path) })
    }

    fn insert(&mut self, path: &[u8], node: Node) -> Result<(), ErofsError> {
        let (dir, name) = self.parent_of(path)?;
        match dir.get(name) {
            None => {
                dir.insert(name.to_vec(), node);
                Ok(())
            }
            Some(Node::Dir(_)) if matches!(node, Node::Dir(_)) => Ok(()),
            Some(_) => Err(ErofsError::Conflict { path: show(path) }),
        }
    }

    /// A regular file at `path` (slash-separated, relative) with permission bits `perm` and its data at `data`;
    /// `mtime` overrides the image's time for this file.
    pub fn add_file(&mut self, path: &[u8], perm: u16, data: Extent, mtime: Option<(u64, u32)>) -> Result<(), ErofsError> {
        self.insert(path, Node::File { perm: perm & 0o7777, data, mtime })
    }

    /// A symbolic link whose target is the `data.len` bytes at `data`.
    pub fn add_symlink(&mut self, path: &[u8], data: Extent) -> Result<(), ErofsError> {
        self.insert(path, Node::Symlink(data))
    }

    /// A directory (made, with its parents, if it is not there yet).
    pub fn add_dir(&mut self, path: &[u8]) -> Result<(), ErofsError> {
        self.insert(path, Node::Dir(BTreeMap::new()))
    }

    /// Writes directories, inodes and the superblock. Every inode gets `time` (seconds, nanoseconds) unless its
    /// file says otherwise. With `base`, extents on device 1 are that device's blocks. Returns the image's size in bytes.
    pub fn finish(mut self, time: (u64, u32), base: Option<Base>) -> Result<u64, ErofsError> {
        // Inodes in depth-first order, root first (the superblock's root inode number is 16 bits).
        let root = std::mem::take(&mut self.root);
        let mut order: Vec<Flat<'_>> = Vec::new();
        flatten(&root, 0, &mut order);
        let count = order.len() as u64;
        // Each inode's place in the table, in 32-byte slots: 64 bytes, or 96 with a chunk index.
        let mut slots: Vec<u64> = Vec::with_capacity(order.len() + 1);
        let mut at = 0u64;
        for f in &order {
            slots.push(at);
            at += if f.on_base() { 3 } else { 2 };
        }
        slots.push(at);
        // Directory blocks, in inode order.
        let mut dir_data: Vec<(usize, Extent)> = Vec::new();
        let mut blocks_out: Vec<u8> = Vec::new();
        let dir_start = self.next_block;
        for (i, f) in order.iter().enumerate() {
            if let FlatKind::Dir { children, parent } = &f.kind {
                let start_len = blocks_out.len();
                let mut names: Vec<(&[u8], u64, u8)> = Vec::with_capacity(children.len() + 2);
                names.push((b".", slots[i], 2));
                names.push((b"..", slots[*parent], 2));
                for (name, idx) in children {
                    names.push((name.as_slice(), slots[*idx], order[*idx].file_type()));
                }
                names.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let size = dir_blocks(&names, &mut blocks_out);
                let block = self.claim((blocks_out.len() - start_len) as u64)?;
                dir_data.push((i, Extent { device: 0, block, len: size }));
            }
        }
        self.file.write_all_at(&blocks_out, dir_start * BLOCK).map_err(io)?;
        let meta_blkaddr = self.next_block;
        let meta_bytes = slots.last().copied().unwrap_or(0) * 32;
        self.claim(meta_bytes)?;
        let mut table = vec![0u8; meta_bytes as usize];
        let mut dirs = dir_data.into_iter().peekable();
        for (i, f) in order.iter().enumerate() {
            let (mode, data, nlink, mtime) = match &f.kind {
                FlatKind::Dir { children, .. } => {
                    let ext = match dirs.peek() {
                        Some((j, e)) if *j == i => {
                            let e = *e;
                            dirs.next();
                            e
                        }
                        _ => Extent { device: 0, block: 0, len: 0 },
                    };
                    let subdirs = children.iter().filter(|(_, c)| matches!(order[*c].kind, FlatKind::Dir { .. })).count();
                    (S_IFDIR | 0o755, ext, 2 + subdirs as u32, None)
                }
                FlatKind::File { perm, data, mtime } => (S_IFREG | perm, *data, 1, *mtime),
                FlatKind::Symlink(data) => (S_IFLNK | 0o777, *data, 1, None),
            };
            let (secs, nsecs) = mtime.unwrap_or(time);
            let at = (slots[i] * 32) as usize;
            let ino = &mut table[at..(slots[i + 1] * 32) as usize];
            let chunked = data.device != 0 && data.len > 0;
            let layout = if chunked { LAYOUT_CHUNK_BASED } else { LAYOUT_FLAT_PLAIN };
            ino[0..2].copy_from_slice(&(1 | layout << 1).to_le_bytes()); // extended inode
            ino[4..6].copy_from_slice(&mode.to_le_bytes());
            ino[8..16].copy_from_slice(&data.len.to_le_bytes());
            if chunked {
                // One chunk as large as the file, its index right after the inode.
                let bits = chunk_bits(data.len);
                ino[16..18].copy_from_slice(&(bits | CHUNK_FORMAT_INDEXES).to_le_bytes());
                ino[66..68].copy_from_slice(&data.device.to_le_bytes());
                ino[68..72].copy_from_slice(&data.block.to_le_bytes());
            } else {
                ino[16..20].copy_from_slice(&data.block.to_le_bytes());
            }
            ino[20..24].copy_from_slice(&((i + 1) as u32).to_le_bytes());
            ino[32..40].copy_from_slice(&secs.to_le_bytes());
            ino[40..44].copy_from_slice(&nsecs.to_le_bytes());
            ino[44..48].copy_from_slice(&nlink.to_le_bytes());
        }
        self.file.write_all_at(&table, meta_blkaddr * BLOCK).map_err(io)?;
        let total = self.next_block;
        let blocks = u32::try_from(total).map_err(|_| ErofsError::TooLarge)?;
        let mut sb = [0u8; 128];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[12] = 12; // log2 of the block size
        sb[14..16].copy_from_slice(&0u16.to_le_bytes()); // root inode number
        sb[16..24].copy_from_slice(&count.to_le_bytes());
        sb[24..32].copy_from_slice(&time.0.to_le_bytes());
        sb[32..36].copy_from_slice(&time.1.to_le_bytes());
        sb[36..40].copy_from_slice(&blocks.to_le_bytes());
        sb[40..44].copy_from_slice(&(meta_blkaddr as u32).to_le_bytes());
        let uuid = uuid_of(&table, time);
        sb[48..64].copy_from_slice(&uuid);
        if let Some(b) = base {
            sb[80..84].copy_from_slice(&(FEATURE_INCOMPAT_DEVICE_TABLE | FEATURE_INCOMPAT_CHUNKED_FILE).to_le_bytes());
            sb[86..88].copy_from_slice(&1u16.to_le_bytes());
            sb[88..90].copy_from_slice(&DEVT_SLOTOFF.to_le_bytes());
            let mut slot = [0u8; 128];
            slot[..4].copy_from_slice(b"base");
            slot[64..68].copy_from_slice(&b.blocks.to_le_bytes());
            self.file.write_all_at(&slot, u64::from(DEVT_SLOTOFF) * 128).map_err(io)?;
        }
        self.file.write_all_at(&sb, SUPERBLOCK_OFFSET).map_err(io)?;
        self.file.set_len(total * BLOCK).map_err(io)?;
        Ok(total * BLOCK)
    }
}

impl Writer {
    /// Ends a data-only file (a blob device: no filesystem, just the appended data at their blocks); returns its
    /// size in bytes.
    pub fn finish_data(self) -> Result<u64, ErofsError> {
        let len = self.next_block * BLOCK;
        self.file.set_len(len).map_err(io)?;
        Ok(len)
    }
}

/// Copies `x.len` bytes of `src` (from its start) into the reserved extent `x` of the image `dst`, inside the
/// kernel where it can. A source shorter than that is an error ([`ErofsError::ShortRead`]).
pub fn copy_at(dst: &File, x: Extent, src: &File) -> Result<(), ErofsError> {
    let start = u64::from(x.block) * BLOCK;
    let len = x.len;
    let mut done = 0u64;
    while done < len {
        let mut off_in = done as i64;
        let mut off_out = (start + done) as i64;
        let want = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both descriptors are open for the call's duration; the offsets are locals this call owns.
        let n = unsafe {
            libc::copy_file_range(std::os::fd::AsRawFd::as_raw_fd(src), &mut off_in, std::os::fd::AsRawFd::as_raw_fd(dst), &mut off_out, want, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    let mut rest = std::io::Read::take(SrcAt { file: src, pos: done }, len - done);
                    return write_from(dst, &mut rest, start + done, len - done);
                }
                Some(libc::EINTR) => continue,
                _ => return Err(io(e)),
            }
        }
        if n == 0 {
            return Err(ErofsError::ShortRead { copied: done, expected: len });
        }
        done += n as u64;
    }
    Ok(())
}

fn write_from<R: Read + ?Sized>(dst: &File, r: &mut R, at: u64, len: u64) -> Result<(), ErofsError> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => return Err(ErofsError::ShortRead { copied: done, expected: len }),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        dst.write_all_at(&buf[..n], at + done).map_err(io)?;
        done += n as u64;
    }
    Ok(())
}

/// Reads a file from a position on (the fallback when the kernel cannot copy between the two files).
struct SrcAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for SrcAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// log2 of the chunk size (in blocks) that holds `len` bytes in one chunk.
fn chunk_bits(len: u64) -> u16 {
    let blocks = len.div_ceil(BLOCK).max(1);
    (64 - (blocks - 1).leading_zeros()) as u16
}

enum FlatKind<'a> {
    Dir { children: Vec<(&'a Vec<u8>, usize)>, parent: usize },
    File { perm: u16, data: Extent, mtime: Option<(u64, u32)> },
    Symlink(Extent),
}

struct Flat<'a> {
    kind: FlatKind<'a>,
}

impl Flat<'_> {
    fn on_base(&self) -> bool {
        match &self.kind {
            FlatKind::File { data, .. } | FlatKind::Symlink(data) => data.device != 0 && data.len > 0,
            FlatKind::Dir { .. } => false,
        }
    }

    fn file_type(&self) -> u8 {
        match self.kind {
            FlatKind::Dir { .. } => 2,
            FlatKind::File { .. } => 1,
            FlatKind::Symlink(_) => 7,
        }
    }
}

fn flatten<'a>(dir: &'a BTreeMap<Vec<u8>, Node>, parent: usize, out: &mut Vec<Flat<'a>>) -> usize {
    let me = out.len();
    out.push(Flat { kind: FlatKind::Dir { children: Vec::new(), parent } });
    let mut children = Vec::with_capacity(dir.len());
    // Files first, each directory's inodes together (a `git status` reads them in that order), then subtrees.
    for (name, node) in dir {
        match node {
            Node::File { perm, data, mtime } => {
                children.push((name, out.len()));
                out.push(Flat { kind: FlatKind::File { perm: *perm, data: *data, mtime: *mtime } });
            }
            Node::Symlink(data) => {
                children.push((name, out.len()));
                out.push(Flat { kind: FlatKind::Symlink(*data) });
            }
            Node::Dir(_) => {}
        }
    }
    for (name, node) in dir {
        if let Node::Dir(sub) = node {
            let idx = flatten(sub, me, out);
            children.push((name, idx));
        }
    }
    if let FlatKind::Dir { children: c, .. } = &mut out[me].kind {
        *c = children;
    }
    me
}

/// Appends a directory's blocks (entries sorted by name, each block its entries then their names) to `out`;
/// returns the directory's size (the last block counts only as far as it is used).
fn dir_blocks(names: &[(&[u8], u64, u8)], out: &mut Vec<u8>) -> u64 {
    let block = BLOCK as usize;
    let start = out.len();
    let mut i = 0;
    let mut last_used = 0;
    while i < names.len() {
        let mut used = 0;
        let mut j = i;
        while j < names.len() && used + DIRENT_SIZE + names[j].0.len() <= block {
            used += DIRENT_SIZE + names[j].0.len();
            j += 1;
        }
        let base = out.len();
        out.resize(base + block, 0);
        let mut nameoff = (j - i) * DIRENT_SIZE;
        for (k, (name, nid, ft)) in names[i..j].iter().enumerate() {
            let d = base + k * DIRENT_SIZE;
            out[d..d + 8].copy_from_slice(&nid.to_le_bytes());
            out[d + 8..d + 10].copy_from_slice(&(nameoff as u16).to_le_bytes());
            out[d + 10] = *ft;
            out[base + nameoff..base + nameoff + name.len()].copy_from_slice(name);
            nameoff += name.len();
        }
        last_used = used;
        i = j;
    }
    let blocks = (out.len() - start) / block;
    (blocks.saturating_sub(1) * block + last_used) as u64
}

/// A filesystem id derived from the image's content (the same tree gives the same id).
fn uuid_of(table: &[u8], time: (u64, u32)) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(table);
    h.update(time.0.to_le_bytes());
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fsck_extract(image: &Path, device: Option<&Path>, to: &Path) {
        let mut c = std::process::Command::new("fsck.erofs");
        if let Some(d) = device {
            c.arg(format!("--device={}", d.display()));
        }
        let out = c.arg(format!("--extract={}", to.display())).arg("--no-preserve-owner").arg(image).output().expect("fsck.erofs (erofs-utils) runs");
        assert!(out.status.success(), "fsck.erofs refused the image: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    /// A tree with the shapes a repository has: nested directories, a directory big enough for several blocks,
    /// names sorting before `.`, an executable, an empty file, a symlink, a file over one block.
    fn sample(w: &mut Writer) -> Vec<(Vec<u8>, Vec<u8>, u32)> {
        let mut files = vec![];
        for i in 0..600 {
            files.push((format!("big/dir/file-with-a-long-name-{i:05}.txt").into_bytes(), format!("content {i}\n").into_bytes(), 0o644));
        }
        files.push((b"-dash".to_vec(), b"first by name\n".to_vec(), 0o644));
        files.push((b"run.sh".to_vec(), b"#!/bin/sh\necho hi\n".to_vec(), 0o755));
        files.push((b"empty".to_vec(), vec![], 0o644));
        files.push((b"a/b/c/deep.bin".to_vec(), (0..10_000u32).flat_map(|x| x.to_le_bytes()).collect(), 0o644));
        for (p, data, perm) in &files {
            let e = w.append_bytes(data).unwrap();
            w.add_file(p, *perm as u16, e, None).unwrap();
        }
        let t = w.append_bytes(b"../run.sh").unwrap();
        w.add_symlink(b"a/link", t).unwrap();
        w.add_dir(b"emptydir/inner").unwrap();
        files
    }

    fn check_tree(root: &Path, files: &[(Vec<u8>, Vec<u8>, u32)]) {
        for (p, data, perm) in files {
            let f = root.join(std::str::from_utf8(p).unwrap());
            assert_eq!(&std::fs::read(&f).unwrap(), data, "{}", f.display());
            assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o111, perm & 0o111, "{}", f.display());
        }
        assert_eq!(std::fs::read_link(root.join("a/link")).unwrap(), Path::new("../run.sh"));
        assert!(root.join("emptydir/inner").is_dir());
        assert_eq!(std::fs::read_dir(root.join("big/dir")).unwrap().count(), 600);
    }

    #[test]
    fn an_image_reads_back_exactly() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("a.erofs");
        let mut w = Writer::create(&img).unwrap();
        let files = sample(&mut w);
        let size = w.finish((1_700_000_000, 5), None).unwrap();
        assert_eq!(size, std::fs::metadata(&img).unwrap().len());
        fsck_extract(&img, None, &t.path().join("out"));
        check_tree(&t.path().join("out"), &files);
        let m = std::fs::symlink_metadata(t.path().join("out/run.sh")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::mtime(&m), 1_700_000_000, "the image's time is every file's");
    }

    #[test]
    fn a_delta_image_reads_unchanged_data_from_its_base() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base.erofs");
        let mut w = Writer::create(&base).unwrap();
        let kept = w.append_bytes(&vec![7u8; 9000]).unwrap();
        w.add_file(b"kept.bin", 0o644, kept, None).unwrap();
        let gone = w.append_bytes(b"old\n").unwrap();
        w.add_file(b"dir/changed.txt", 0o644, gone, None).unwrap();
        let base_size = w.finish((1_700_000_000, 0), None).unwrap();

        let delta = t.path().join("delta.erofs");
        let mut w = Writer::create(&delta).unwrap();
        let mapped = kept.on_base();
        w.add_file(b"kept.bin", 0o644, mapped, None).unwrap();
        w.add_file(b"dir/renamed.bin", 0o755, mapped, Some((1_800_000_000, 0))).unwrap();
        let new = w.append_bytes(b"new\n").unwrap();
        w.add_file(b"dir/changed.txt", 0o644, new, None).unwrap();
        let size = w.finish((1_700_000_100, 0), Some(Base { blocks: (base_size / BLOCK) as u32 })).unwrap();
        assert!(size < 8 * BLOCK, "the delta holds no copy of the base's data ({size} bytes)");
        let out = t.path().join("out");
        fsck_extract(&delta, Some(&base), &out);
        assert_eq!(std::fs::read(out.join("kept.bin")).unwrap(), vec![7u8; 9000]);
        assert_eq!(std::fs::read(out.join("dir/renamed.bin")).unwrap(), vec![7u8; 9000]);
        assert_eq!(std::fs::read(out.join("dir/changed.txt")).unwrap(), b"new\n");
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut w = Writer::create(&t.path().join("x.erofs")).unwrap();
        let e = w.append_bytes(b"x").unwrap();
        w.add_file(b"f", 0o644, e, None).unwrap();
        assert!(matches!(w.add_file(b"f/g", 0o644, e, None), Err(ErofsError::Conflict { .. })));
        assert!(matches!(w.add_dir(b"f"), Err(ErofsError::Conflict { .. })));
        for bad in [&b""[..], b"/abs", b"a//b", b"a/./b", b"../x", b"a/"] {
            assert!(matches!(w.add_file(bad, 0o644, e, None), Err(ErofsError::BadName { .. })), "{bad:?}");
        }
        let long = vec![b'n'; 256];
        assert!(matches!(w.add_file(&long, 0o644, e, None), Err(ErofsError::BadName { .. })));
    }
}
