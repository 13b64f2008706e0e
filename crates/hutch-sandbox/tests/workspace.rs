//! The workspace drive slots with real VMs: a multi-device erofs image (metadata in the workspace slot, file data
//! in the base slot, its extra device) and a self-contained image, in restored and cold-booted VMs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::host;
use hutch_sandbox::{Sandbox, SandboxConfig, StartMode};

const TARGET: &str = "/workspace";

/// A file the test can recognise byte for byte: a marker unique to this run, then enough distinct data to span
/// several chunks of the image.
fn content(tag: &str) -> Vec<u8> {
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let mut v = format!("{tag}-{nonce}\n").into_bytes();
    let mut x: u32 = 0x1234_5678 ^ nonce as u32;
    while v.len() < 3 * 4096 + 123 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(format!("{x:08x}\n").as_bytes());
    }
    v
}

fn tree(dir: &Path, data: &[u8]) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/data.txt"), data).unwrap();
    std::fs::write(dir.join("small"), b"small file\n").unwrap();
}

fn mkfs(args: &[&std::ffi::OsStr]) {
    let out = Command::new("mkfs.erofs").arg("--quiet").args(args).output().expect("mkfs.erofs (erofs-utils) is installed");
    assert!(out.status.success(), "mkfs.erofs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `(image, blob)`: an erofs image whose chunk-based files keep their data on the extra device `blob`.
fn multi_device(t: &Path, data: &[u8]) -> (PathBuf, PathBuf) {
    let src = t.join("src");
    tree(&src, data);
    let (img, blob) = (t.join("delta.erofs"), t.join("base.blob"));
    let blobdev = format!("--blobdev={}", blob.display());
    mkfs(&["--chunksize=4096".as_ref(), blobdev.as_ref(), img.as_os_str(), src.as_os_str()]);
    // The data is really on the extra device alone, so the VM can only read it through the base slot.
    let (i, b) = (std::fs::read(&img).unwrap(), std::fs::read(&blob).unwrap());
    assert!(contains(&b, &data[..64]) && !contains(&i, &data[..64]), "mkfs.erofs put the file data on the blob device");
    (img, blob)
}

async fn cat(sb: &Sandbox, path: &str) -> Vec<u8> {
    let out = sb.client().run(&["cat", path]).await.unwrap();
    assert_eq!(out.status.map(|s| s.as_shell_code()), Some(0), "cat {path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[tokio::test]
async fn multi_device_image_reads_its_data_from_the_base_slot() {
    let host = host();
    let t = tempfile::tempdir().unwrap();
    let data = content("delta");
    let (img, blob) = multi_device(t.path(), &data);
    let plain = SandboxConfig::default();
    // Made with both slots empty: the usual restore puts the images in slots the snapshot had placeholders in.
    hutch_sandbox::snapshot::ensure(&host, &plain).await.unwrap();
    for cold in [false, true] {
        let cfg = SandboxConfig { cold, workspace_image: Some(img.clone()), workspace_base: Some(blob.clone()), ..plain.clone() };
        let sb = Sandbox::create(&host, &cfg).await.unwrap();
        assert_eq!(sb.start.mode, if cold { StartMode::Cold } else { StartMode::Restored });
        // Without its extra device erofs refuses the image (its device table names one).
        let e = sb.client().mount_workspace(TARGET, false).await.expect_err("mounted a multi-device image without its base");
        assert!(hutch_sandbox::error_chain(&e).contains("cannot mount the workspace image"), "{}", hutch_sandbox::error_chain(&e));
        sb.client().mount_workspace(TARGET, true).await.unwrap();
        assert_eq!(cat(&sb, "/workspace/sub/data.txt").await, data, "cold={cold}");
        assert_eq!(cat(&sb, "/workspace/small").await, b"small file\n");
        // Mounting again (as a VM restored from an environment snapshot does) still reads the same data.
        sb.client().mount_workspace(TARGET, true).await.unwrap();
        assert_eq!(cat(&sb, "/workspace/sub/data.txt").await, data);
        assert!(sb.client().workspace_untouched().await.unwrap());
        sb.destroy().await;
    }
}

#[tokio::test]
async fn self_contained_image_mounts_with_the_base_slot_empty() {
    let host = host();
    let t = tempfile::tempdir().unwrap();
    let data = content("single");
    let src = t.path().join("src");
    tree(&src, &data);
    let img = t.path().join("single.erofs");
    mkfs(&[img.as_os_str(), src.as_os_str()]);
    let cfg = SandboxConfig { workspace_image: Some(img.clone()), ..SandboxConfig::default() };
    hutch_sandbox::snapshot::ensure(&host, &SandboxConfig::default()).await.unwrap();
    let sb = Sandbox::create(&host, &cfg).await.unwrap();
    assert_eq!(sb.start.mode, StartMode::Restored);
    // Asked for a base the image has no use for, erofs refuses (the device table is empty), and says so.
    let e = sb.client().mount_workspace(TARGET, true).await.expect_err("mounted a self-contained image with an extra device");
    assert!(hutch_sandbox::error_chain(&e).contains("extra device"), "{}", hutch_sandbox::error_chain(&e));
    sb.client().mount_workspace(TARGET, false).await.unwrap();
    assert_eq!(cat(&sb, "/workspace/sub/data.txt").await, data);
    sb.destroy().await;
}
