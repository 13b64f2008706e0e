//! Which kernel modules the initramfs loads, and in what order. The Debian package ships no
//! `modules.dep`, so dependencies come from each module's own `depends` (and `softdep pre:`)
//! fields via `modinfo`; modules built into this kernel, or absent from it, are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext};
use crate::tools::{self, MODINFO};

/// Modules the guest needs, in the order asked. Dependencies are added ahead of them.
pub const WANTED_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
    // For the egress gateway: nftables with NAT redirection inside the guest.
    "nf_tables",
    "nft_chain_nat",
    "nft_redir",
];

/// The load plan for one kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulePlan {
    /// Modules to insmod, each after everything it depends on.
    pub load_order: Vec<ModuleFile>,
    /// Wanted modules this kernel has built in (nothing to load).
    pub builtin: Vec<String>,
    /// Wanted modules this kernel has neither built in nor as a module.
    pub absent: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleFile {
    /// Module name with `_` (as `modinfo` and `lsmod` spell it).
    pub name: String,
    /// Path below the kernel's `lib/modules/<release>/`.
    pub path: String,
}

/// How module names are compared: file names may use `-` where the module name has `_`.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// What a kernel's module tree offers.
struct ModuleTree {
    root: PathBuf,
    release: String,
    /// Loadable modules by normalized name.
    files: BTreeMap<String, PathBuf>,
    /// Modules that exist only compressed (busybox insmod cannot load those).
    compressed: BTreeSet<String>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    fn scan(root: &Path, release: &str) -> Result<Self, ImageError> {
        let mut tree = ModuleTree {
            root: root.to_owned(),
            release: release.to_owned(),
            files: BTreeMap::new(),
            compressed: BTreeSet::new(),
            builtin: BTreeSet::new(),
        };
        let builtin_list = root.join("modules.builtin");
        let text = fs::read_to_string(&builtin_list).ctx("reading", &builtin_list)?;
        for line in text.lines() {
            if let Some(name) = module_name_of(line) {
                tree.builtin.insert(name);
            }
        }
        let mut stack = vec![root.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).ctx("listing", &dir)? {
                let path = entry.ctx("listing", &dir)?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                if let Some(stem) = file.strip_suffix(".ko") {
                    tree.files.insert(normalize(stem), path.clone());
                } else if let Some(name) = module_name_of(&file) {
                    tree.compressed.insert(name);
                }
            }
        }
        Ok(tree)
    }

    fn error(&self, problem: String) -> ImageError {
        ImageError::Modules {
            release: self.release.clone(),
            problem,
        }
    }

    /// Hard dependencies, then `softdep pre:` modules that exist as files (a soft dependency
    /// may name an alias or a built-in, which need nothing).
    fn dependencies(&self, file: &Path) -> Result<(Vec<String>, Vec<String>), ImageError> {
        let modinfo = MODINFO.find()?;
        let field = |name: &str| -> Result<String, ImageError> {
            tools::run_text(tools::command(&modinfo).args(["-F", name]).arg(file), "")
        };
        let hard = field("depends")?
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(normalize)
            .collect();
        let soft = field("softdep")?
            .lines()
            .flat_map(parse_softdep_pre)
            .map(|s| normalize(&s))
            .filter(|s| self.files.contains_key(s))
            .collect();
        Ok((hard, soft))
    }
}

/// `kernel/fs/ext4/ext4.ko` (or `.ko.xz`, `.ko.zst`, `.ko.gz`) -> `ext4`.
fn module_name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))?;
    Some(normalize(stem))
}

/// "pre: a b post: c" -> ["a", "b"].
fn parse_softdep_pre(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_pre = false;
    for word in line.split_whitespace() {
        match word {
            "pre:" => in_pre = true,
            "post:" => in_pre = false,
            w if in_pre => out.push(w.to_owned()),
            _ => {}
        }
    }
    out
}

/// Computes the load plan of `wanted` for the module tree at `root` (`lib/modules/<release>`).
pub(crate) fn plan(root: &Path, release: &str, wanted: &[&str]) -> Result<ModulePlan, ImageError> {
    let tree = ModuleTree::scan(root, release)?;
    let mut builtin = Vec::new();
    let mut absent = Vec::new();
    let mut roots = Vec::new();
    for name in wanted.iter().map(|n| normalize(n)) {
        if tree.files.contains_key(&name) {
            roots.push(name);
        } else if tree.builtin.contains(&name) {
            builtin.push(name);
        } else if tree.compressed.contains(&name) {
            return Err(tree.error(format!(
                "module {name} is shipped compressed; busybox insmod loads only plain .ko files"
            )));
        } else {
            absent.push(name);
        }
    }
    let order = dependency_order(&roots, |name| {
        if let Some(file) = tree.files.get(name) {
            let (hard, soft) = tree.dependencies(file)?;
            let hard = hard.into_iter().filter(|d| !tree.builtin.contains(d));
            Ok(Some(hard.chain(soft).collect()))
        } else if tree.builtin.contains(name) {
            // Built in: present without loading, so it has no edges to follow.
            Ok(None)
        } else {
            Err(tree.error(format!(
                "a module depends on {name}, which this kernel neither has built in nor ships \
                 as a plain .ko file"
            )))
        }
    })
    .map_err(|e| match e {
        OrderError::Cycle(path) => tree.error(format!("dependency cycle: {}", path.join(" -> "))),
        OrderError::Lookup(e) => e,
    })?;
    let load_order = order
        .into_iter()
        .map(|name| {
            let file = &tree.files[&name];
            let path = file
                .strip_prefix(&tree.root)
                .unwrap_or(file)
                .to_string_lossy()
                .into_owned();
            ModuleFile { name, path }
        })
        .collect();
    Ok(ModulePlan {
        load_order,
        builtin,
        absent,
    })
}

/// A module's dependencies, or `None` for one that needs no loading.
type DepsFn<'a, E> = dyn FnMut(&str) -> Result<Option<Vec<String>>, E> + 'a;

#[derive(Debug)]
pub(crate) enum OrderError<E> {
    Cycle(Vec<String>),
    Lookup(E),
}

impl<E> From<E> for OrderError<E> {
    fn from(e: E) -> Self {
        OrderError::Lookup(e)
    }
}

/// Orders `roots` and everything they need so each module comes after its dependencies,
/// keeping the order asked wherever dependencies allow (depth-first, post-order). `deps`
/// returns a module's dependencies, or `None` for a module that needs no loading.
pub(crate) fn dependency_order<E>(
    roots: &[String],
    mut deps: impl FnMut(&str) -> Result<Option<Vec<String>>, E>,
) -> Result<Vec<String>, OrderError<E>> {
    #[derive(PartialEq)]
    enum Mark {
        InProgress,
        Done,
    }
    fn visit<E>(
        name: &str,
        deps: &mut DepsFn<'_, E>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), OrderError<E>> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::InProgress) => {
                let start = path.iter().position(|p| p == name).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(name.to_owned());
                return Err(OrderError::Cycle(cycle));
            }
            None => {}
        }
        let Some(children) = deps(name)? else {
            marks.insert(name.to_owned(), Mark::Done);
            return Ok(());
        };
        marks.insert(name.to_owned(), Mark::InProgress);
        path.push(name.to_owned());
        for child in &children {
            visit(child, deps, marks, path, out)?;
        }
        path.pop();
        marks.insert(name.to_owned(), Mark::Done);
        out.push(name.to_owned());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    let mut path = Vec::new();
    for root in roots {
        visit(root, &mut deps, &mut marks, &mut path, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn order(
        g: &BTreeMap<String, Vec<String>>,
        roots: &[&str],
    ) -> Result<Vec<String>, Vec<String>> {
        let roots: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
        dependency_order::<()>(&roots, |n| Ok(g.get(n).cloned())).map_err(|e| match e {
            OrderError::Cycle(c) => c,
            OrderError::Lookup(()) => vec![],
        })
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let g = graph(&[
            ("virtio_ring", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("vsock", &[]),
            ("vmw_vsock_virtio_transport", &["virtio", "vsock", "common"]),
            ("common", &["vsock"]),
        ]);
        let got = order(&g, &["virtio_blk", "vmw_vsock_virtio_transport"]).expect("acyclic");
        assert_eq!(
            got,
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "vsock",
                "common",
                "vmw_vsock_virtio_transport"
            ]
        );
    }

    #[test]
    fn modules_without_loading_are_left_out() {
        // "crc" is unknown to the graph: built in, so it is not loaded.
        let g = graph(&[("a", &["crc"]), ("b", &["a"])]);
        assert_eq!(order(&g, &["b"]).expect("acyclic"), ["a", "b"]);
    }

    #[test]
    fn cycles_are_reported() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert_eq!(order(&g, &["a"]).expect_err("cycle"), ["a", "b", "c", "a"]);
    }

    #[test]
    fn names_and_softdeps() {
        assert_eq!(
            module_name_of("kernel/drivers/char/hw_random/virtio-rng.ko"),
            Some("virtio_rng".into())
        );
        assert_eq!(
            module_name_of("kernel/fs/ext4/ext4.ko.zst"),
            Some("ext4".into())
        );
        assert_eq!(module_name_of("modules.order"), None);
        assert_eq!(
            parse_softdep_pre("pre: crc32c sha256 post: foo"),
            ["crc32c", "sha256"]
        );
        assert!(parse_softdep_pre("post: foo").is_empty());
    }

    /// The real thing: this host's current Debian cloud kernel, downloaded into a temp dir.
    #[test]
    fn real_kernel_plan_loads_dependencies_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let package = match crate::kernel::resolve(&dir.path().join("memo.json"), None) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIP: cannot resolve the Debian cloud kernel with apt: {e}");
                return;
            }
        };
        let out = dir.path().join("kernel");
        fs::create_dir(&out).expect("mkdir");
        let info = match crate::kernel::build(&package, &out, &crate::SilentProgress) {
            Ok(info) => info,
            Err(e @ ImageError::CommandFailed { .. }) if e.to_string().contains("apt-get") => {
                eprintln!("SKIP: cannot download {}: {e}", package.name);
                return;
            }
            Err(e) => panic!("kernel build failed: {e}"),
        };
        let root = crate::kernel::modules_dir(&out, &info.release);
        let plan = plan(&root, &info.release, WANTED_MODULES).expect("plan");
        eprintln!(
            "{}: load {:?}",
            info.release,
            plan.load_order.iter().map(|m| &m.name).collect::<Vec<_>>()
        );
        eprintln!("built in {:?}, absent {:?}", plan.builtin, plan.absent);

        let position = |name: &str| plan.load_order.iter().position(|m| m.name == name);
        let tree = ModuleTree::scan(&root, &info.release).expect("scan");
        for (i, module) in plan.load_order.iter().enumerate() {
            assert!(root.join(&module.path).is_file(), "{}", module.path);
            let (hard, soft) = tree
                .dependencies(&root.join(&module.path))
                .expect("modinfo");
            for dep in hard.iter().chain(&soft) {
                if tree.builtin.contains(dep) {
                    continue;
                }
                let at = position(dep)
                    .unwrap_or_else(|| panic!("{dep} (needed by {}) not loaded", module.name));
                assert!(at < i, "{dep} must load before {}", module.name);
            }
        }
        let mut names: Vec<&str> = plan.load_order.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            plan.load_order.len(),
            "a module is loaded twice"
        );
        // Every wanted module is accounted for exactly once.
        for wanted in WANTED_MODULES {
            let found = usize::from(position(wanted).is_some())
                + usize::from(plan.builtin.iter().any(|b| b == wanted))
                + usize::from(plan.absent.iter().any(|a| a == wanted));
            assert_eq!(found, 1, "{wanted}");
        }
        // What the guest cannot boot without must be there (module or built in).
        for needed in ["virtio_mmio", "virtio_blk"] {
            assert!(
                position(needed).is_some() || plan.builtin.iter().any(|b| b == needed),
                "{needed}"
            );
        }
        assert!(
            position("ext4").is_none(),
            "ext4 is built into Debian's kernel"
        );
    }
}
