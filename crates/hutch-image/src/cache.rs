//! The image cache: where it lives, how inputs map to keys, and building only what is missing.
//!
//! Layout under the cache root:
//! ```text
//! kernels/<key>/{vmlinuz, config, modules/<release>/..., kernel.json}
//! initrd/<key>/{initrd.img, initrd.json}
//! rootfs/<key>/{rootfs.ext4, rootfs.json}      rootfs.ext4 is never modified once built
//! images/<key>/{manifest.json, snapshots/}
//! locks/   cache.lock (shared by builders and readers, exclusive for removal),
//!          <kind>-<key>.lock (one builder per component)
//! tmp/     builds in progress (<name>/ + <name>.lock); leftovers of dead builds are reaped
//! state/   remembered apt answers
//! ```
//! A component directory appears by one rename of a finished build, so a directory present
//! under its key is complete.
//!
//! Two caches take part for an ordinary user: the system cache ([`SYSTEM_CACHE`], filled by
//! root, world-readable, never written by users) and the user's own (mode 0700), which holds
//! everything the user's runs write. A user's lookup tries the own cache, then the system cache
//! without taking any lock there (its entries appear by rename, so one that is present is
//! complete); a component the system cache has is linked from the user's cache, not rebuilt.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::elf::{self, Executable};
use crate::error::{ImageError, IoContext};
use crate::fsutil::{self, BuildDir, Lock, LockKind};
use crate::initramfs::{self, COMPRESSION, INIT_TEMPLATE};
use crate::kernel::{self, KernelPackage};
use crate::key::{key_of, ImageInputs, InitrdInputs, RootfsInputs, RECIPE_VERSION};
use crate::manifest::{
    InitrdEntry, InitrdInfo, KernelEntry, Manifest, RootfsEntry, MANIFEST_FORMAT,
};
use crate::modules::{self, WANTED_MODULES};
use crate::progress::Progress;
use crate::rootfs::{self, Sources};
use crate::spec::{sha256_hex, CheckedSpec, ImageSpec};
use crate::tools::{self, Tool, BUSYBOX_PACKAGE, BUSYBOX_PATH};

pub(crate) const KERNELS: &str = "kernels";
/// A kind of cache component: its directory, lock name, and the files a complete one has.
struct ComponentKind {
    dir: &'static str,
    lock: &'static str,
    files: &'static [&'static str],
    /// Host tools its build runs.
    tools: fn() -> Vec<Tool>,
    needs_root: bool,
}
impl ComponentKind {
    fn is_complete(&self, dir: &Path) -> bool {
        self.files.iter().all(|f| dir.join(f).is_file())
    }
}
const KERNEL: ComponentKind = ComponentKind {
    dir: KERNELS,
    lock: "kernel",
    files: &[kernel::VMLINUZ, kernel::INFO],
    tools: || vec![tools::APT_CACHE, tools::APT_GET, tools::DPKG_DEB],
    needs_root: false,
};
const INITRD: ComponentKind = ComponentKind {
    dir: INITRDS,
    lock: "initrd",
    files: &[INITRD_IMG, INITRD_INFO],
    tools: || vec![tools::MODINFO, COMPRESSION.tool()],
    needs_root: false,
};
const ROOTFS: ComponentKind = ComponentKind {
    dir: ROOTFSES,
    lock: "rootfs",
    files: &[rootfs::IMAGE, rootfs::INFO],
    tools: || vec![tools::UNSHARE, tools::MMDEBSTRAP, tools::MKFS_EXT4],
    needs_root: true,
};
pub(crate) const INITRDS: &str = "initrd";
pub(crate) const ROOTFSES: &str = "rootfs";
pub(crate) const IMAGES: &str = "images";
pub(crate) const LOCKS: &str = "locks";
pub(crate) const TMP: &str = "tmp";
const STATE: &str = "state";
const MANIFEST: &str = "manifest.json";
const SNAPSHOTS: &str = "snapshots";
pub(crate) const INITRD_IMG: &str = "initrd.img";
const INITRD_INFO: &str = "initrd.json";

/// A built image, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub key: String,
    /// `images/<key>`: the manifest, and room for artifacts derived from this image.
    pub dir: PathBuf,
    /// bzImage for `-kernel`.
    pub kernel: PathBuf,
    /// Compressed cpio for `-initrd`.
    pub initrd: PathBuf,
    /// Raw ext4 root disk; shared and read-only: use it only as the backing file of a
    /// per-sandbox copy-on-write overlay, never write to it.
    pub rootfs: PathBuf,
    /// Where this process makes and keeps boot snapshots of this image: `dir/snapshots`, or,
    /// for an image from the shared cache, the same place in the user's own cache.
    pub snapshots: PathBuf,
    /// The shared cache's snapshots of this image (read-only), when the image came from there.
    pub shared_snapshots: Option<PathBuf>,
    /// `uname -r` in the guest.
    pub kernel_release: String,
    pub manifest: Manifest,
}

/// Where root builds the images every user shares.
pub const SYSTEM_CACHE: &str = "/var/lib/hutch";

/// A cache directory of images and their components.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    /// Another cache (the system cache, for an ordinary user) read for images and components,
    /// never written to.
    shared: Option<PathBuf>,
}

/// Everything an image's keys depend on, gathered and checked before anything is built.
struct Plan {
    spec: CheckedSpec,
    sources: Sources,
    busybox: Vec<u8>,
    kernel_package: KernelPackage,
    kernel_key: String,
    rootfs_inputs: RootfsInputs,
    rootfs_key: String,
    initrd_inputs: InitrdInputs,
    initrd_key: String,
    image_inputs: ImageInputs,
    image_key: String,
}

impl Cache {
    /// The own cache: `$HUTCH_CACHE_DIR` if set; else [`SYSTEM_CACHE`] for root; else
    /// `$XDG_CACHE_HOME/hutch` or `~/.cache/hutch`. For a user who is not root, the system
    /// cache (`$HUTCH_SYSTEM_CACHE_DIR` if set, empty for none) is read as well, never written;
    /// a `HUTCH_CACHE_DIR` naming the system cache means just that.
    pub fn from_env() -> Result<Cache, ImageError> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let is_root = nix::unistd::geteuid().is_root();
        let system = match std::env::var_os("HUTCH_SYSTEM_CACHE_DIR") {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(std::path::absolute(&v).ctx("resolving HUTCH_SYSTEM_CACHE_DIR", v)?),
            None => Some(PathBuf::from(SYSTEM_CACHE)),
        };
        let user_default = || {
            if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
                Ok(xdg.join("hutch"))
            } else if let Some(home) = var("HOME").filter(|p| p.is_absolute()) {
                Ok(home.join(".cache/hutch"))
            } else {
                Err(ImageError::NoCacheDir(
                    "neither XDG_CACHE_HOME nor HOME is set",
                ))
            }
        };
        let explicit = match var("HUTCH_CACHE_DIR") {
            Some(dir) => Some(std::path::absolute(&dir).ctx("resolving HUTCH_CACHE_DIR", dir)?),
            None => None,
        };
        if is_root {
            let root = explicit.unwrap_or_else(|| PathBuf::from(SYSTEM_CACHE));
            return Ok(Cache { root, shared: None });
        }
        let same = |a: &Path, b: &Path| match (fs::canonicalize(a), fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        let root = match explicit {
            Some(dir) if !system.as_deref().is_some_and(|s| same(&dir, s)) => dir,
            _ => user_default()?,
        };
        let shared = system.filter(|s| !same(&root, s));
        Ok(Cache { root, shared })
    }

    /// A cache at `root` (created when first built into).
    pub fn at(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into(), shared: None }
    }

    /// This cache, also reading images and components from `shared` (never writing there).
    pub fn with_shared(mut self, shared: Option<PathBuf>) -> Cache {
        self.shared = shared;
        self
    }

    /// The read-only cache images are also taken from, if any.
    pub fn shared(&self) -> Option<&Path> {
        self.shared.as_deref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cached image for `spec`, if all of it is built; builds nothing. Asks apt which
    /// kernel is current (answer remembered while apt's lists are unchanged). The own cache is
    /// tried first, then the shared one.
    pub fn lookup(&self, spec: &ImageSpec) -> Result<Option<Image>, ImageError> {
        let own = self.root.join(IMAGES).is_dir();
        let shared = self.shared.as_ref().is_some_and(|s| s.join(IMAGES).is_dir());
        if !own && !shared {
            return Ok(None);
        }
        let plan = self.plan(spec)?;
        if own {
            let _shared = self.cache_lock(LockKind::Shared)?;
            if let Some(image) = self.load_image(&plan.image_key)? {
                return Ok(Some(image));
            }
        }
        self.load_shared_image(&plan.image_key)
    }

    /// The image for `spec`, building whichever of its components are not cached yet.
    pub fn ensure(&self, spec: &ImageSpec, progress: &dyn Progress) -> Result<Image, ImageError> {
        let result = self.ensure_inner(spec, progress);
        progress.finish();
        result
    }

    fn ensure_inner(&self, spec: &ImageSpec, progress: &dyn Progress) -> Result<Image, ImageError> {
        self.create_root()?;
        for dir in [IMAGES, LOCKS, TMP, STATE] {
            let path = self.root.join(dir);
            fs::create_dir_all(&path).ctx("creating cache directory", path)?;
        }
        let plan = self.plan(spec)?;
        let _shared = self.cache_lock(LockKind::Shared)?;
        if let Some(image) = self.load_image(&plan.image_key)? {
            return Ok(image);
        }
        if let Some(image) = self.load_shared_image(&plan.image_key)? {
            return Ok(image);
        }
        let _building = Lock::acquire(
            &self.lock_path("image", &plan.image_key),
            LockKind::Exclusive,
        )?;
        if let Some(image) = self.load_image(&plan.image_key)? {
            return Ok(image); // another process built it while we waited
        }
        fsutil::reap(&self.root.join(TMP))?;
        // Say what is missing now rather than after building the other components.
        for (kind, key) in [
            (&KERNEL, &plan.kernel_key),
            (&INITRD, &plan.initrd_key),
            (&ROOTFS, &plan.rootfs_key),
        ] {
            if kind.is_complete(&self.root.join(kind.dir).join(key))
                || self.shared_component(kind, key).is_some()
            {
                continue;
            }
            if kind.needs_root && !nix::unistd::geteuid().is_root() && !crate::rootless::available() {
                return Err(ImageError::NeedsRoot {
                    shared: self.shared.clone(),
                    rootless: crate::rootless::describe(&crate::rootless::blockers_for_me()),
                });
            }
            for tool in (kind.tools)() {
                tool.find()?;
            }
        }

        let kernel_dir = self.ensure_component(&KERNEL, &plan.kernel_key, |dir| {
            kernel::build(&plan.kernel_package, dir, progress).map(drop)
        })?;
        let kernel_info = kernel::read_info(&kernel_dir)?;

        let initrd_dir = self.ensure_component(&INITRD, &plan.initrd_key, |dir| {
            progress.stage(&format!(
                "Building the initramfs (busybox, kernel modules of {}, agent)",
                kernel_info.release
            ));
            let modules_root = kernel::modules_dir(&kernel_dir, &kernel_info.release);
            let module_plan = modules::plan(&modules_root, &kernel_info.release, WANTED_MODULES)?;
            initramfs::build(
                &module_plan,
                &modules_root,
                &plan.busybox,
                &plan.spec.agent,
                COMPRESSION,
                &dir.join(INITRD_IMG),
            )?;
            let info = InitrdInfo {
                inputs: plan.initrd_inputs.clone(),
                modules: module_plan,
            };
            fsutil::write_json(&dir.join(INITRD_INFO), &info)
        })?;

        let rootfs_dir = self.ensure_component(&ROOTFS, &plan.rootfs_key, |dir| {
            rootfs::build(&plan.spec, &plan.sources, dir, progress).map(drop)
        })?;

        progress.stage("Writing the image manifest");
        let manifest = self.manifest(&plan, &kernel_dir, &initrd_dir, &rootfs_dir)?;
        let build = BuildDir::create(&self.root.join(TMP), "image")?;
        fsutil::write_json(&build.path().join(MANIFEST), &manifest)?;
        let dest = self.image_dir(&plan.image_key);
        if dest.exists() {
            // An image whose component was deleted by hand and has just been rebuilt: its
            // snapshots were taken of the old bytes, so they go with the old manifest.
            self.discard(&dest)?;
        }
        build.persist(&dest)?;
        self.publish(&dest)?;
        self.load_image(&plan.image_key)?.ok_or_else(|| {
            ImageError::io(
                "reading back the image just built in",
                self.image_dir(&plan.image_key),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }

    /// Manifests of all cached images, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>, ImageError> {
        let mut manifests = Vec::new();
        for key in self.image_keys()? {
            if let Some(m) = self.read_manifest(&key)? {
                manifests.push(m);
            }
        }
        manifests.sort_by(|a, b| (a.created_unix, &a.key).cmp(&(b.created_unix, &b.key)));
        Ok(manifests)
    }

    /// Manifests of the shared cache's images (read-only here), oldest first.
    pub fn list_shared(&self) -> Result<Vec<Manifest>, ImageError> {
        match &self.shared {
            Some(shared) => Cache::at(shared).list(),
            None => Ok(Vec::new()),
        }
    }

    /// Removes the image whose key starts with `key_prefix`, with its snapshots, and then
    /// every component no remaining image uses. Returns what was removed (paths relative to
    /// the cache root). Waits for builds in progress to finish first.
    pub fn remove(&self, key_prefix: &str) -> Result<Vec<String>, ImageError> {
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || !key_prefix
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(ImageError::BadKeyPrefix(key_prefix.to_owned()));
        }
        if !self.root.join(IMAGES).is_dir() {
            return Err(self.not_found(key_prefix));
        }
        let _exclusive = self.cache_lock(LockKind::Exclusive)?;
        let matches: Vec<String> = self
            .image_keys()?
            .into_iter()
            .filter(|k| k.starts_with(key_prefix))
            .collect();
        let key = match matches.as_slice() {
            [] => return Err(self.not_found(key_prefix)),
            [one] => one.clone(),
            _ => {
                return Err(ImageError::AmbiguousImage {
                    prefix: key_prefix.to_owned(),
                    keys: matches,
                })
            }
        };
        let mut removed = Vec::new();
        self.discard(&self.image_dir(&key))?;
        removed.push(format!("{IMAGES}/{key}"));

        let mut used = BTreeSet::new();
        for other in self.list()? {
            used.insert(format!("{KERNELS}/{}", other.kernel.key));
            used.insert(format!("{INITRDS}/{}", other.initrd.key));
            used.insert(format!("{ROOTFSES}/{}", other.rootfs.key));
        }
        for kind in [&KERNEL, &INITRD, &ROOTFS] {
            for component in list_names(&self.root.join(kind.dir))? {
                let rel = format!("{}/{component}", kind.dir);
                if used.contains(&rel) {
                    continue;
                }
                self.discard(&self.root.join(&rel))?;
                removed.push(rel);
            }
        }
        self.remove_stale_locks()?;
        fsutil::reap(&self.root.join(TMP))?;
        Ok(removed)
    }

    /// No own image starts with `key_prefix`: says so, or that the image is a shared one.
    fn not_found(&self, key_prefix: &str) -> ImageError {
        let shared = self.list_shared().unwrap_or_default();
        match &self.shared {
            Some(dir) if shared.iter().any(|m| m.key.starts_with(key_prefix)) => ImageError::SharedImage {
                prefix: key_prefix.to_owned(),
                cache: dir.clone(),
            },
            _ => ImageError::UnknownImage(key_prefix.to_owned()),
        }
    }

    /// `images/<key>/snapshots` of the own cache, created if missing: where artifacts derived
    /// from a booted image (VM snapshots) live, so that removing the image removes them too.
    pub fn snapshot_dir(&self, image: &Image) -> Result<PathBuf, ImageError> {
        self.create_root()?;
        let dir = &image.snapshots;
        fs::create_dir_all(dir).ctx("creating directory", dir)?;
        Ok(dir.clone())
    }

    /// Creates the own cache's top directory: private (0700) for a user's cache, so that no
    /// other user reaches its sandboxes, locks or snapshots; world-readable for the system
    /// cache root builds, whose images every user reads.
    pub fn create_root(&self) -> Result<(), ImageError> {
        use std::os::unix::fs::DirBuilderExt;
        if self.root.is_dir() {
            return Ok(());
        }
        if let Some(parent) = self.root.parent() {
            fs::create_dir_all(parent).ctx("creating directory", parent)?;
        }
        let mode = if nix::unistd::geteuid().is_root() { 0o755 } else { 0o700 };
        match fs::DirBuilder::new().mode(mode).create(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                Err(ImageError::io("creating cache directory", &self.root, e))
            }
            _ => Ok(()),
        }
    }

    /// Makes a finished entry of a cache root builds readable by every user and writable by
    /// none but its owner, whatever root's umask was.
    fn publish(&self, path: &Path) -> Result<(), ImageError> {
        if nix::unistd::geteuid().is_root() {
            fsutil::publish_tree(path)?;
        }
        Ok(())
    }

    /// The shared cache's complete `kind` component under `key`, if there is one.
    fn shared_component(&self, kind: &ComponentKind, key: &str) -> Option<PathBuf> {
        let dir = self.shared.as_ref()?.join(kind.dir).join(key);
        kind.is_complete(&dir).then_some(dir)
    }

    /// Gathers and checks all inputs and computes every key; builds nothing.
    fn plan(&self, spec: &ImageSpec) -> Result<Plan, ImageError> {
        let spec = CheckedSpec::check(spec)?;
        let busybox = load_busybox()?;
        let sources = Sources::from_host()?;
        if !sources.has_suite(&spec.suite) {
            return Err(ImageError::InvalidSpec(format!(
                "suite `{}` is not in the host apt sources {}; add it there (and run `apt-get \
                 update`) or pick a suite it lists",
                spec.suite,
                sources.path.display()
            )));
        }
        let memo = |root: &Path| root.join(STATE).join("kernel-package.json");
        let kernel_package = kernel::resolve(
            &memo(&self.root),
            self.shared.as_deref().map(memo).as_deref(),
        )?;
        let kernel_key = key_of(&kernel_package.inputs());
        let rootfs_inputs = sources.inputs(&spec);
        let rootfs_key = key_of(&rootfs_inputs);
        let initrd_inputs = initrd_inputs(&kernel_key, &spec, &busybox);
        let initrd_key = key_of(&initrd_inputs);
        let image_inputs = ImageInputs {
            recipe: RECIPE_VERSION,
            kernel_key: kernel_key.clone(),
            initrd_key: initrd_key.clone(),
            rootfs_key: rootfs_key.clone(),
        };
        let image_key = key_of(&image_inputs);
        Ok(Plan {
            spec,
            sources,
            busybox,
            kernel_package,
            kernel_key,
            rootfs_inputs,
            rootfs_key,
            initrd_inputs,
            initrd_key,
            image_inputs,
            image_key,
        })
    }

    /// `<dir>/<key>`, built with `build` (into an empty temp dir) unless already there.
    fn ensure_component(
        &self,
        kind: &ComponentKind,
        key: &str,
        build: impl FnOnce(&Path) -> Result<(), ImageError>,
    ) -> Result<PathBuf, ImageError> {
        let dest = self.root.join(kind.dir).join(key);
        if kind.is_complete(&dest) {
            return Ok(dest);
        }
        let _lock = Lock::acquire(&self.lock_path(kind.lock, key), LockKind::Exclusive)?;
        if kind.is_complete(&dest) {
            return Ok(dest);
        }
        if dest.exists() || dest.is_symlink() {
            // Only a hand-made deletion inside the cache gets here; build it afresh.
            self.discard(&dest)?;
        }
        if let Some(shared) = self.shared_component(kind, key) {
            // Built already where this user may read but not write: linked, not rebuilt. The
            // link appears by one rename, like a build.
            let tmp = BuildDir::create(&self.root.join(TMP), kind.lock)?;
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&shared, &link).ctx("linking", &link)?;
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).ctx("creating directory", parent)?;
            }
            fs::rename(&link, &dest).ctx("moving link into place at", &dest)?;
            return Ok(dest);
        }
        let tmp = BuildDir::create(&self.root.join(TMP), kind.lock)?;
        build(tmp.path())?;
        tmp.persist(&dest)?;
        self.publish(&dest)?;
        Ok(dest)
    }

    fn manifest(
        &self,
        plan: &Plan,
        kernel_dir: &Path,
        initrd_dir: &Path,
        rootfs_dir: &Path,
    ) -> Result<Manifest, ImageError> {
        let kernel_info = kernel::read_info(kernel_dir)?;
        let initrd_info: InitrdInfo = read_json(&initrd_dir.join(INITRD_INFO))?;
        let rootfs_info = rootfs::read_info(rootfs_dir)?;
        let rel = |dir: &str, key: &str, file: &str| format!("{dir}/{key}/{file}");
        let kernel_path = rel(KERNELS, &plan.kernel_key, kernel::VMLINUZ);
        let initrd_path = rel(INITRDS, &plan.initrd_key, INITRD_IMG);
        let rootfs_path = rel(ROOTFSES, &plan.rootfs_key, rootfs::IMAGE);
        let size = |rel: &str| -> Result<fs::Metadata, ImageError> {
            let path = self.root.join(rel);
            fs::metadata(&path).ctx("inspecting", path)
        };
        let rootfs_meta = size(&rootfs_path)?;
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            key: plan.image_key.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            kernel: KernelEntry {
                key: plan.kernel_key.clone(),
                package: kernel_info.package,
                version: kernel_info.version,
                release: kernel_info.release,
                bytes: size(&kernel_path)?.len(),
                path: kernel_path,
            },
            initrd: InitrdEntry {
                key: plan.initrd_key.clone(),
                bytes: size(&initrd_path)?.len(),
                path: initrd_path,
                inputs: initrd_info.inputs,
                modules: initrd_info.modules,
            },
            rootfs: RootfsEntry {
                key: plan.rootfs_key.clone(),
                path: rootfs_path,
                image_bytes: rootfs_meta.len(),
                allocated_bytes: rootfs_meta.blocks() * 512,
                content_bytes: rootfs_info.content_bytes,
                inputs: plan.rootfs_inputs.clone(),
            },
            inputs: plan.image_inputs.clone(),
        })
    }

    /// The image with this key if its manifest and all its files are present.
    fn load_image(&self, key: &str) -> Result<Option<Image>, ImageError> {
        load_image_in(&self.root, key, None)
    }

    /// The shared cache's image with this key, read without any lock: its entries appear by
    /// rename and are removed by rename, so one whose files are all present is complete.
    fn load_shared_image(&self, key: &str) -> Result<Option<Image>, ImageError> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        load_image_in(shared, key, Some(self.image_dir(key).join(SNAPSHOTS)))
    }

    pub(crate) fn read_manifest(&self, key: &str) -> Result<Option<Manifest>, ImageError> {
        let path = self.image_dir(key).join(MANIFEST);
        if !path.is_file() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    pub(crate) fn image_keys(&self) -> Result<Vec<String>, ImageError> {
        list_names(&self.root.join(IMAGES))
    }

    pub(crate) fn image_dir(&self, key: &str) -> PathBuf {
        self.root.join(IMAGES).join(key)
    }

    fn lock_path(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(LOCKS).join(format!("{kind}-{key}.lock"))
    }

    pub(crate) fn cache_lock(&self, kind: LockKind) -> Result<Lock, ImageError> {
        let dir = self.root.join(LOCKS);
        fs::create_dir_all(&dir).ctx("creating cache directory", &dir)?;
        Lock::acquire(&dir.join("cache.lock"), kind)
    }

    /// Deletes the lock files of entries that do not exist (removed ones, failed builds).
    /// Only called with the cache lock held exclusively, when no build holds any lock.
    pub(crate) fn remove_stale_locks(&self) -> Result<(), ImageError> {
        let dir = self.root.join(LOCKS);
        for entry in fs::read_dir(&dir).ctx("listing", &dir)? {
            let entry = entry.ctx("listing", &dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((kind, key)) = name.strip_suffix(".lock").and_then(|n| n.split_once('-'))
            else {
                continue;
            };
            let entry_dir = match kind {
                "image" => IMAGES,
                "kernel" => KERNELS,
                "initrd" => INITRDS,
                "rootfs" => ROOTFSES,
                _ => continue,
            };
            if !self.root.join(entry_dir).join(key).exists() {
                fs::remove_file(entry.path()).ctx("removing", entry.path())?;
            }
        }
        Ok(())
    }

    /// Takes `path` out of the cache in one rename, then deletes it, so a crash midway
    /// leaves only a temp dir for the reaper, never a half-deleted entry.
    pub(crate) fn discard(&self, path: &Path) -> Result<(), ImageError> {
        let trash = BuildDir::create(&self.root.join(TMP), "removed")?;
        fs::rename(path, trash.path().join("entry")).ctx("moving out of the cache", path)?;
        drop(trash);
        Ok(())
    }
}

/// The image `key` of the cache at `root`. `own_snapshots`: for an image of a shared cache,
/// where this user's snapshots of it go.
fn load_image_in(
    root: &Path,
    key: &str,
    own_snapshots: Option<PathBuf>,
) -> Result<Option<Image>, ImageError> {
    let dir = root.join(IMAGES).join(key);
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(None);
    }
    let manifest: Manifest = read_json(&path)?;
    let kernel = root.join(&manifest.kernel.path);
    let initrd = root.join(&manifest.initrd.path);
    let rootfs = root.join(&manifest.rootfs.path);
    if ![&kernel, &initrd, &rootfs].iter().all(|p| p.is_file()) {
        return Ok(None);
    }
    let (snapshots, shared_snapshots) = match own_snapshots {
        Some(own) => (own, Some(dir.join(SNAPSHOTS))),
        None => (dir.join(SNAPSHOTS), None),
    };
    Ok(Some(Image {
        key: key.to_owned(),
        dir,
        kernel,
        initrd,
        rootfs,
        snapshots,
        shared_snapshots,
        kernel_release: manifest.kernel.release.clone(),
        manifest,
    }))
}

fn initrd_inputs(kernel_key: &str, spec: &CheckedSpec, busybox: &[u8]) -> InitrdInputs {
    InitrdInputs {
        recipe: RECIPE_VERSION,
        kernel_key: kernel_key.to_owned(),
        modules: WANTED_MODULES.iter().map(|m| (*m).to_owned()).collect(),
        init_sha256: sha256_hex(INIT_TEMPLATE.as_bytes()),
        busybox_sha256: sha256_hex(busybox),
        agent_sha256: spec.agent.sha256.clone(),
        compression: COMPRESSION.name().to_owned(),
    }
}

fn load_busybox() -> Result<Vec<u8>, ImageError> {
    let missing = ImageError::MissingTool {
        tool: "static busybox (/bin/busybox)",
        package: BUSYBOX_PACKAGE,
    };
    let bytes = fs::read(BUSYBOX_PATH).map_err(|_| missing)?;
    match elf::inspect(&bytes) {
        Ok(Executable::StaticElf) => Ok(bytes),
        _ => Err(ImageError::MissingTool {
            tool: "static busybox (/bin/busybox is not a static x86_64 binary)",
            package: BUSYBOX_PACKAGE,
        }),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let bytes = fs::read(path).ctx("reading", path)?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

/// Names of the 64-hex-digit key directories in `dir` (anything else is not ours).
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("listing", dir, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Agent;

    fn spec_with_agent(bytes: &[u8], extras: &[&str]) -> CheckedSpec {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent");
        fs::write(&path, bytes).expect("write agent");
        CheckedSpec {
            suite: "bookworm".into(),
            packages: {
                let mut p: Vec<String> = crate::spec::BASE_PACKAGES
                    .iter()
                    .chain(extras)
                    .map(|s| s.to_string())
                    .collect();
                p.sort();
                p.dedup();
                p
            },
            npm_packages: Vec::new(),
            agent: Agent::load(&path).expect("agent"),
        }
    }

    fn keys(spec: &CheckedSpec, kernel_version: &str, sources: &str) -> (String, String, String) {
        let kernel = KernelPackage {
            name: "linux-image-6.1.0-56-cloud-amd64".into(),
            version: kernel_version.into(),
        };
        let kernel_key = key_of(&kernel.inputs());
        let sources = Sources {
            path: "/etc/apt/sources.list.d/debian.sources".into(),
            text: sources.into(),
        };
        let rootfs_key = key_of(&sources.inputs(spec));
        let initrd_key = key_of(&initrd_inputs(&kernel_key, spec, b"busybox"));
        (kernel_key, initrd_key, rootfs_key)
    }

    #[test]
    fn agent_changes_only_the_initramfs() {
        let a = keys(&spec_with_agent(b"#!/bin/sh\necho a\n", &[]), "1", "src");
        let b = keys(&spec_with_agent(b"#!/bin/sh\necho b\n", &[]), "1", "src");
        assert_eq!(a.0, b.0, "kernel key");
        assert_ne!(a.1, b.1, "initrd key");
        assert_eq!(a.2, b.2, "rootfs key");
        assert_eq!(
            a,
            keys(&spec_with_agent(b"#!/bin/sh\necho a\n", &[]), "1", "src")
        );
    }

    #[test]
    fn packages_and_sources_change_only_the_rootfs() {
        let agent = b"#!/bin/sh\n";
        let base = keys(&spec_with_agent(agent, &[]), "1", "src");
        let extra = keys(&spec_with_agent(agent, &["jq"]), "1", "src");
        let other_sources = keys(&spec_with_agent(agent, &[]), "1", "other");
        assert_eq!((&base.0, &base.1), (&extra.0, &extra.1));
        assert_ne!(base.2, extra.2);
        assert_eq!((&base.0, &base.1), (&other_sources.0, &other_sources.1));
        assert_ne!(base.2, other_sources.2);
        // A base package given again as an extra changes nothing.
        assert_eq!(base, keys(&spec_with_agent(agent, &["git"]), "1", "src"));
    }

    #[test]
    fn kernel_version_changes_kernel_and_initramfs() {
        let spec = spec_with_agent(b"#!/bin/sh\n", &[]);
        let old = keys(&spec, "6.1.192-1", "src");
        let new = keys(&spec, "6.1.192-2", "src");
        assert_ne!(old.0, new.0);
        assert_ne!(old.1, new.1);
        assert_eq!(old.2, new.2);
    }

    #[test]
    fn remove_checks_its_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path());
        for bad in ["", "XYZ", "../x", &"a".repeat(65)] {
            assert!(
                matches!(cache.remove(bad), Err(ImageError::BadKeyPrefix(_))),
                "{bad}"
            );
        }
        let msg = cache.remove("abc").expect_err("empty cache").to_string();
        assert_eq!(msg, "no cached image key starts with `abc`");
    }

    #[test]
    fn remove_refuses_ambiguous_prefixes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path());
        for key in ["ab".repeat(32), format!("ab{}", "c".repeat(62))] {
            fs::create_dir_all(dir.path().join(IMAGES).join(key)).expect("mkdir");
        }
        let err = cache.remove("ab").expect_err("ambiguous");
        assert!(
            matches!(err, ImageError::AmbiguousImage { ref keys, .. } if keys.len() == 2),
            "{err}"
        );
        assert!(err.to_string().contains("give more digits"));
    }

    #[test]
    fn suites_missing_from_the_host_sources_are_refused_before_building() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path());
        let mut spec = ImageSpec::default_for("/bin/busybox");
        spec.suite = "hutch-no-such-suite".into();
        match cache.ensure(&spec, &crate::SilentProgress) {
            Err(ImageError::InvalidSpec(msg)) => {
                assert!(msg.contains("hutch-no-such-suite"), "{msg}")
            }
            Err(ImageError::NoAptSources(_)) => {
                eprintln!("SKIP: this host has no apt sources file")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(list_names(&dir.path().join(KERNELS))
            .expect("ls")
            .is_empty());
    }

    #[test]
    fn lookup_in_an_empty_cache_finds_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path().join("none"));
        let spec = ImageSpec::default_for("/bin/busybox");
        assert_eq!(cache.lookup(&spec).expect("lookup"), None);
        assert!(
            !dir.path().join("none").exists(),
            "lookup must not create the cache"
        );
        assert!(cache.list().expect("list").is_empty());
    }
}
