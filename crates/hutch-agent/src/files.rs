//! File upload and download for the host: bytes and mode, streamed in chunks.

use std::os::unix::fs::PermissionsExt;

use hutch_proto::mux::Stream;
use hutch_proto::{FileChunk, FileMeta, Framed, PutFile, Reply, CHUNK};
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
    let mut written = 0u64;
    loop {
        match framed.recv::<FileChunk>().await.map_err(|e| format!("upload interrupted: {e}"))? {
            FileChunk::Data(bytes) => {
                written += bytes.len() as u64;
                if written > put.size {
                    return Err(format!("upload of {} is larger than announced ({} bytes)", put.path, put.size));
                }
                file.write_all(&bytes).await.map_err(|e| format!("cannot write {}: {e}", put.path))?;
            }
            FileChunk::End => break,
        }
    }
    if written != put.size {
        return Err(format!("upload of {} ended after {written} of {} bytes", put.path, put.size));
    }
    file.flush().await.map_err(|e| format!("cannot write {}: {e}", put.path))?;
    file.set_permissions(std::fs::Permissions::from_mode(put.mode & 0o7777))
        .await
        .map_err(|e| format!("cannot chmod {}: {e}", put.path))?;
    Ok(())
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
    if framed.send(&Ok::<FileMeta, String>(meta)).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if framed.send(&FileChunk::Data(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            // A read error mid-file: end without `End`, which the host reports as a truncated download.
            Err(_) => return,
        }
    }
    let _ = framed.send(&FileChunk::End).await;
}
