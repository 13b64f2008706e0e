//! File upload and download for the host: bytes and mode, streamed in chunks.

use std::os::unix::fs::PermissionsExt;

use hutch_proto::mux::Stream;
use hutch_proto::{FileChunk, FileMeta, Framed, PutArchive, PutFile, Reply, CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub async fn put(mut framed: Framed<Stream>, put: PutFile) {
    let r = write_file(&mut framed, &put).await;
    let _ = framed.send(&Reply::from_result(r)).await;
}

async fn write_file(framed: &mut Framed<Stream>, put: &PutFile) -> Result<(), String> {
    let path = std::path::Path::new(&put.path);
    if put.parents {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
    }
    let mut file = tokio::fs::File::create(path).await.map_err(|e| format!("cannot create {}: {e}", put.path))?;
    receive(framed, &mut file, &put.path, put.size).await?;
    file.set_permissions(std::fs::Permissions::from_mode(put.mode & 0o7777))
        .await
        .map_err(|e| format!("cannot chmod {}: {e}", put.path))?;
    Ok(())
}

/// Receives an archive into a staging file, then unpacks it into `put.dir`: entries keep their modes and times,
/// belong to root, and may not land outside the directory.
pub async fn put_archive(mut framed: Framed<Stream>, put: PutArchive) {
    let r = async {
        let staging = std::path::Path::new(STAGING);
        tokio::fs::create_dir_all(staging).await.map_err(|e| format!("cannot create {STAGING}: {e}"))?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = staging.join(format!("archive-{n}.tar"));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let received = receive(&mut framed, &mut file, &put.dir, put.size).await;
        drop(file);
        let unpacked = match received {
            Ok(()) => {
                let (tmp2, dir) = (tmp.clone(), put.dir.clone());
                tokio::task::spawn_blocking(move || unpack(&tmp2, &dir)).await.unwrap_or_else(|e| Err(format!("unpacking failed: {e}")))
            }
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        unpacked
    }
    .await;
    let _ = framed.send(&Reply::from_result(r)).await;
}

/// Where uploads are staged before they are unpacked.
const STAGING: &str = "/var/tmp/hutch";

fn unpack(archive: &std::path::Path, dir: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    let f = std::fs::File::open(archive).map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    let mut a = tar::Archive::new(std::io::BufReader::new(f));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    a.unpack(dir).map_err(|e| format!("cannot unpack into {dir}: {e}"))
}

/// Reads [`FileChunk`]s into `out` until `End`; exactly `size` bytes must arrive.
async fn receive(framed: &mut Framed<Stream>, out: &mut tokio::fs::File, what: &str, size: u64) -> Result<(), String> {
    let mut written = 0u64;
    while let FileChunk::Data(bytes) = framed.recv::<FileChunk>().await.map_err(|e| format!("upload interrupted: {e}"))? {
        written += bytes.len() as u64;
        if written > size {
            return Err(format!("upload of {what} is larger than announced ({size} bytes)"));
        }
        out.write_all(&bytes).await.map_err(|e| format!("cannot write {what}: {e}"))?;
    }
    if written != size {
        return Err(format!("upload of {what} ended after {written} of {size} bytes"));
    }
    out.flush().await.map_err(|e| format!("cannot write {what}: {e}"))
}

pub async fn get(mut framed: Framed<Stream>, path: &str) {
    let opened = async {
        let file = tokio::fs::File::open(path).await.map_err(|e| format!("cannot open {path}: {e}"))?;
        let meta = file.metadata().await.map_err(|e| format!("cannot stat {path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{path} is not a regular file"));
        }
        Ok((file, FileMeta { size: meta.len(), mode: meta.permissions().mode() }))
    }
    .await;
    let (mut file, meta) = match opened {
        Ok(x) => x,
        Err(e) => {
            let _ = framed.send(&Err::<FileMeta, String>(e)).await;
            return;
        }
    };
    let size = meta.size;
    if framed.send(&Ok::<FileMeta, String>(meta)).await.is_err() {
        return;
    }
    let _ = send_contents(&mut framed, &mut file, size).await;
}

/// Sends the file's data regions as chunks and its holes as [`FileChunk::Hole`], so a sparse file costs the
/// channel and the host only its data. Ends with `End`; a read error ends without it, which the host reports as
/// a truncated download.
async fn send_contents(framed: &mut Framed<Stream>, file: &mut tokio::fs::File, size: u64) -> Result<(), ()> {
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncSeekExt;
    let fd = file.as_raw_fd();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor this function's `file` owns; no memory is passed. The tokio file has no
        // operation in flight (every one below is awaited), so moving the offset races with nothing.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        // No data after `pos` (ENXIO), or a file system without hole reporting (then the whole file is data).
        let data = if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) { size } else { pos }
        } else {
            (data as u64).min(size)
        };
        if data > pos {
            framed.send(&FileChunk::Hole(data - pos)).await.map_err(|_| ())?;
            pos = data;
            if pos >= size {
                break;
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { (hole as u64).min(size) };
        file.seek(std::io::SeekFrom::Start(pos)).await.map_err(|_| ())?;
        while pos < end {
            let want = ((end - pos) as usize).min(CHUNK);
            let n = file.read(&mut buf[..want]).await.map_err(|_| ())?;
            if n == 0 {
                // Shorter than it said: the host sees fewer bytes than announced.
                return Err(());
            }
            framed.send(&FileChunk::Data(buf[..n].to_vec())).await.map_err(|_| ())?;
            pos += n as u64;
        }
    }
    framed.send(&FileChunk::End).await.map_err(|_| ())
}
