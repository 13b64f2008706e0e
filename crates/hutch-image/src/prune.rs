//! Garbage collection of images that are no longer current (a new agent binary, new packages or a new kernel
//! make a new image; the old one and its boot snapshots stay behind): the same rules as the environment cache,
//! an age since last use and a size cap over all images, least recently used first, and never an image in use.
//!
//! In use means: named by the caller (the current images), held by a live process ([`Cache::hold`], a shared
//! lock taken by every process that runs sandboxes from the image), or named on the command line of a running
//! VMM (its kernel, initramfs or image directory), which also covers other users' VMs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::{list_names, Cache, Image, IMAGES, INITRDS, KERNELS, LOCKS, ROOTFSES, TMP};
use crate::error::{ImageError, IoContext};
use crate::fsutil::{self, Lock, LockKind};

/// Beside an image's manifest: when a process last started using it (seconds since the epoch).
const USED: &str = "used";

/// Held while a process may start sandboxes from an image: a prune never removes it meanwhile.
#[derive(Debug)]
pub struct InUse {
    _lock: Lock,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Bytes allocated under `path` (sparse snapshot RAM files count for what they hold).
fn bytes_under(path: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(path) else { return 0 };
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    fs::read_dir(path).map(|rd| rd.flatten().map(|e| bytes_under(&e.path())).sum()).unwrap_or(0)
}

/// Command lines of running VMMs (any user's: /proc shows every process's command line).
fn vmm_command_lines() -> Vec<String> {
    let Ok(rd) = fs::read_dir("/proc") else { return vec![] };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.split(' ').next().is_some_and(|exe| exe.contains("qemu-system")))
        .collect()
}

impl Cache {
    /// Marks `image` as in use by this process until the value is dropped, and as just used (for the least
    /// recently used order). The mark lives in the own cache, so an image of the shared cache is protected from
    /// this user's prunes only (root's prune of the system cache still sees its running VMMs).
    pub fn hold(&self, image: &Image) -> Result<InUse, ImageError> {
        let dir = self.root().join(LOCKS);
        fs::create_dir_all(&dir).ctx("creating cache directory", &dir)?;
        let lock = Lock::acquire(&dir.join(format!("inuse-{}.lock", image.key)), LockKind::Shared)?;
        if image.dir.starts_with(self.root()) {
            let _ = fs::write(image.dir.join(USED), now_unix().to_string());
        }
        Ok(InUse { _lock: lock })
    }

    /// Removes the own cache's images other than `keep` (with their boot snapshots, and then every component no
    /// remaining image uses) that were last used more than `max_age` ago, then the least recently used ones while
    /// all images together take more than `max_bytes`. Images in use are never removed. Returns what was removed
    /// (image keys) and why. Waits for builds in progress to finish first.
    pub fn prune_images(&self, keep: &[String], max_age: Option<Duration>, max_bytes: Option<u64>) -> Result<Vec<(String, String)>, ImageError> {
        if !self.root().join(IMAGES).is_dir() {
            return Ok(vec![]);
        }
        let _exclusive = self.cache_lock(LockKind::Exclusive)?;
        let now = now_unix();
        let vmms = vmm_command_lines();
        struct Candidate {
            key: String,
            used: u64,
            bytes: u64,
            components: Vec<String>,
        }
        let mut refs: BTreeMap<String, usize> = BTreeMap::new();
        let mut all = Vec::new();
        for key in self.image_keys()? {
            let manifest = self.read_manifest(&key).ok().flatten();
            let dir = self.image_dir(&key);
            let used = fs::read_to_string(dir.join(USED)).ok().and_then(|t| t.trim().parse().ok());
            let used = used.or(manifest.as_ref().map(|m| m.created_unix)).unwrap_or(0);
            let components = manifest
                .as_ref()
                .map(|m| vec![format!("{KERNELS}/{}", m.kernel.key), format!("{INITRDS}/{}", m.initrd.key), format!("{ROOTFSES}/{}", m.rootfs.key)])
                .unwrap_or_default();
            for c in &components {
                *refs.entry(c.clone()).or_default() += 1;
            }
            let held = match Lock::try_exclusive(&self.root().join(LOCKS).join(format!("inuse-{key}.lock"))) {
                Ok(Some(_)) => false,
                Ok(None) | Err(_) => true,
            };
            let named_by_vmm = |p: &Path| vmms.iter().any(|c| c.contains(&*p.to_string_lossy()));
            let running = named_by_vmm(&dir)
                || manifest.as_ref().is_some_and(|m| named_by_vmm(&self.root().join(&m.initrd.path)));
            let in_use = keep.contains(&key) || held || running;
            all.push((Candidate { key, used, bytes: bytes_under(&dir), components }, in_use));
        }
        // What each image costs: its own directory (boot snapshots) and the components only it uses.
        for (c, _) in &mut all {
            c.bytes += c.components.iter().filter(|k| refs.get(*k) == Some(&1)).map(|k| bytes_under(&self.root().join(k))).sum::<u64>();
        }
        all.sort_by(|a, b| (a.0.used, &a.0.key).cmp(&(b.0.used, &b.0.key)));
        let mut total: u64 = all.iter().map(|(c, _)| c.bytes).sum();
        let mut removed = Vec::new();
        for (c, in_use) in &all {
            if *in_use {
                continue;
            }
            let why = if max_age.is_some_and(|a| now.saturating_sub(c.used) > a.as_secs()) {
                "not used for longer than the maximum age"
            } else if max_bytes.is_some_and(|cap| total > cap) {
                "over the size cap (least recently used)"
            } else {
                continue;
            };
            self.discard(&self.image_dir(&c.key))?;
            total = total.saturating_sub(c.bytes);
            removed.push((c.key.clone(), why.to_string()));
        }
        // Boot snapshots of the remaining images that no run used for longer than the maximum age (a size no
        // longer asked for, or one made by an older hutch under another key); never one a running VMM maps.
        if let Some(age) = max_age {
            for key in self.image_keys()? {
                let snaps = self.image_dir(&key).join("snapshots");
                let Ok(rd) = fs::read_dir(&snaps) else { continue };
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let dir = e.path();
                    if name.starts_with('.') || !dir.is_dir() {
                        continue;
                    }
                    let used = fs::read_to_string(dir.join(USED)).ok().and_then(|t| t.trim().parse::<u64>().ok());
                    let made = fs::metadata(dir.join("meta.json")).ok().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs());
                    let last = used.or(made).unwrap_or(0);
                    if now.saturating_sub(last) <= age.as_secs() || vmms.iter().any(|c| c.contains(&*dir.to_string_lossy())) {
                        continue;
                    }
                    self.discard(&dir)?;
                    removed.push((format!("{key}/snapshots/{name}"), "boot snapshot not used for longer than the maximum age".to_string()));
                }
            }
        }
        if removed.is_empty() {
            return Ok(removed);
        }
        // Components no remaining image names (no build runs now: builds hold the cache lock shared).
        let mut used = std::collections::BTreeSet::new();
        for key in self.image_keys()? {
            if let Some(m) = self.read_manifest(&key)? {
                used.insert(format!("{KERNELS}/{}", m.kernel.key));
                used.insert(format!("{INITRDS}/{}", m.initrd.key));
                used.insert(format!("{ROOTFSES}/{}", m.rootfs.key));
            }
        }
        for kind in [KERNELS, INITRDS, ROOTFSES] {
            for name in list_names(&self.root().join(kind))? {
                let rel = format!("{kind}/{name}");
                if !used.contains(&rel) {
                    self.discard(&self.root().join(&rel))?;
                }
            }
        }
        self.remove_stale_locks()?;
        fsutil::reap(&self.root().join(TMP))?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    /// An image directory with a manifest naming its components (which exist, with some bytes), a boot snapshot,
    /// and a last use `used` seconds ago.
    fn fake_image(root: &Path, key: &str, kernel: &str, initrd: &str, rootfs: &str, used_ago: u64) {
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "key": key, "created_unix": now_unix() - used_ago,
            "kernel": {"key": kernel, "package": "p", "version": "v", "release": "r", "path": format!("kernels/{kernel}/vmlinuz"), "bytes": 1},
            "initrd": {"key": initrd, "path": format!("initrd/{initrd}/initrd.img"), "bytes": 1,
                       "inputs": {"recipe": 1, "kernel_key": kernel, "modules": [], "init_sha256": "", "busybox_sha256": "", "agent_sha256": "", "compression": "lz4"},
                       "modules": {"load_order": [], "builtin": [], "absent": []}},
            "rootfs": {"key": rootfs, "path": format!("rootfs/{rootfs}/rootfs.ext4"), "image_bytes": 1, "allocated_bytes": 1, "content_bytes": 1,
                       "inputs": {"recipe": 1, "suite": "bookworm", "variant": "minbase", "packages": [], "sources_file": "", "sources_sha256": ""}},
            "inputs": {"recipe": 1, "kernel_key": kernel, "initrd_key": initrd, "rootfs_key": rootfs}
        }))
        .unwrap();
        let dir = root.join(IMAGES).join(key);
        fs::create_dir_all(dir.join("snapshots/s1")).unwrap();
        fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        fs::write(dir.join("snapshots/s1/memory"), vec![7u8; 1 << 20]).unwrap();
        fs::write(dir.join("snapshots/s1").join(USED), now_unix().to_string()).unwrap();
        fs::write(dir.join(USED), (now_unix() - used_ago).to_string()).unwrap();
        for (d, f) in [(format!("kernels/{kernel}"), "vmlinuz"), (format!("initrd/{initrd}"), "initrd.img"), (format!("rootfs/{rootfs}"), "rootfs.ext4")] {
            fs::create_dir_all(root.join(&d)).unwrap();
            fs::write(root.join(&d).join(f), vec![1u8; 64 << 10]).unwrap();
        }
    }

    fn k(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    /// A superseded image goes with its snapshots and the components only it used; the current one (and the
    /// components it shares) stays, however old; a held one stays too.
    #[test]
    fn prune_removes_superseded_images_but_never_current_or_held_ones() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let cache = Cache::at(root);
        let (cur, old, held) = (k('a'), k('b'), k('c'));
        fake_image(root, &cur, &k('1'), &k('2'), &k('3'), 90 * 24 * 3600);
        fake_image(root, &old, &k('1'), &k('4'), &k('3'), 3 * 24 * 3600);
        fake_image(root, &held, &k('1'), &k('5'), &k('3'), 3 * 24 * 3600);
        let image = Image {
            key: held.clone(),
            dir: root.join(IMAGES).join(&held),
            kernel: root.join("k"),
            initrd: root.join("i"),
            rootfs: root.join("r"),
            snapshots: root.join(IMAGES).join(&held).join("snapshots"),
            shared_snapshots: None,
            kernel_release: String::new(),
            manifest: cache.read_manifest(&held).unwrap().unwrap(),
        };
        let hold = cache.hold(&image).unwrap();
        // A boot snapshot of the current image that nothing used for days (a size no longer asked for).
        let stale = root.join(IMAGES).join(&cur).join("snapshots/s0");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("memory"), b"x").unwrap();
        fs::write(stale.join(USED), (now_unix() - 3 * 24 * 3600).to_string()).unwrap();
        let removed = cache.prune_images(std::slice::from_ref(&cur), Some(Duration::from_secs(24 * 3600)), None).unwrap();
        assert_eq!(removed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [old.clone(), format!("{cur}/snapshots/s0")], "{removed:?}");
        assert!(!stale.exists());
        assert!(!root.join(IMAGES).join(&old).exists(), "the superseded image's directory and snapshots are gone");
        assert!(!root.join(INITRDS).join(k('4')).exists(), "its own initramfs is gone");
        for kept in [format!("{IMAGES}/{cur}"), format!("{IMAGES}/{held}"), format!("{KERNELS}/{}", k('1')), format!("{ROOTFSES}/{}", k('3')), format!("{INITRDS}/{}", k('2'))] {
            assert!(root.join(&kept).exists(), "{kept} stays");
        }
        assert!(root.join(IMAGES).join(&cur).join("snapshots/s1/memory").is_file(), "the current image's snapshot stays");
        // Released, the no longer held image goes by size (the current one never does).
        drop(hold);
        let removed = cache.prune_images(std::slice::from_ref(&cur), None, Some(0)).unwrap();
        assert_eq!(removed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [held.clone()], "{removed:?}");
        assert!(root.join(IMAGES).join(&cur).join("manifest.json").is_file());
        assert!(cache.prune_images(std::slice::from_ref(&cur), Some(Duration::from_secs(3600)), Some(0)).unwrap().is_empty(), "the current image and its fresh snapshot stay");
    }
}
