//! Cache keys: each component's key is the SHA-256 of a canonical JSON description of
//! everything that goes into it (struct fields serialize in declaration order, lists are
//! sorted where order carries no meaning), so equal inputs give equal keys and any change to
//! an input gives a new key.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped whenever a build step changes in a way that changes its output, so old cache
/// entries are not mistaken for new ones.
pub const RECIPE_VERSION: u32 = 1;

/// The Debian metapackage that names the current cloud kernel.
pub(crate) const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Inputs of the kernel component: the exact Debian package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInputs {
    pub recipe: u32,
    pub package: String,
    pub version: String,
}

/// Inputs of the rootfs component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsInputs {
    pub recipe: u32,
    pub suite: String,
    pub variant: String,
    /// Sorted, deduplicated.
    pub packages: Vec<String>,
    /// Path of the host apt sources file given to mmdebstrap (informational).
    pub sources_file: String,
    /// SHA-256 of that file's content: the mirrors and suites the packages come from.
    pub sources_sha256: String,
    /// npm packages installed on top, if any. Left out of the JSON when absent, so images
    /// without npm packages keep the keys they had before npm support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub npm: Option<NpmInputs>,
}

/// Inputs of the npm step of a rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpmInputs {
    /// `NAME@VERSION`, sorted by name.
    pub packages: Vec<String>,
    /// SHA-256 of the script that installs them.
    pub hook_sha256: String,
}

/// Inputs of the initramfs component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitrdInputs {
    pub recipe: u32,
    pub kernel_key: String,
    /// Modules asked for, in the order asked; the load order is derived from these and the
    /// kernel's own dependency data.
    pub modules: Vec<String>,
    /// SHA-256 of the /init template text.
    pub init_sha256: String,
    pub busybox_sha256: String,
    pub agent_sha256: String,
    pub compression: String,
}

/// Inputs of a whole image: its three components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInputs {
    pub recipe: u32,
    pub kernel_key: String,
    pub initrd_key: String,
    pub rootfs_key: String,
}

/// SHA-256 (hex) of the canonical JSON of `inputs`.
pub(crate) fn key_of<T: Serialize>(inputs: &T) -> String {
    // Serializing these plain structs of strings and integers cannot fail.
    let json = serde_json::to_vec(inputs).unwrap_or_default();
    hex::encode(Sha256::digest(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn initrd() -> InitrdInputs {
        InitrdInputs {
            recipe: RECIPE_VERSION,
            kernel_key: "k".repeat(64),
            modules: vec!["virtio".into(), "virtio_blk".into()],
            init_sha256: "i".repeat(64),
            busybox_sha256: "b".repeat(64),
            agent_sha256: "a".repeat(64),
            compression: "zstd".into(),
        }
    }

    fn rootfs() -> RootfsInputs {
        RootfsInputs {
            recipe: RECIPE_VERSION,
            suite: "bookworm".into(),
            variant: "minbase".into(),
            packages: vec!["curl".into(), "git".into()],
            sources_file: "/etc/apt/sources.list.d/debian.sources".into(),
            sources_sha256: "s".repeat(64),
            npm: None,
        }
    }

    fn with_npm() -> RootfsInputs {
        RootfsInputs {
            npm: Some(NpmInputs {
                packages: vec!["@scope/a@1.0.0".into(), "b@2.0.0".into()],
                hook_sha256: "h".repeat(64),
            }),
            ..rootfs()
        }
    }

    #[test]
    fn keys_are_stable() {
        // A fixed value: if this changes, every existing cache entry is orphaned, so the
        // change must come with a RECIPE_VERSION bump (and this constant updated).
        let inputs = KernelInputs {
            recipe: 1,
            package: "linux-image-6.1.0-56-cloud-amd64".into(),
            version: "6.1.192-2".into(),
        };
        assert_eq!(
            serde_json::to_string(&inputs).expect("serializes"),
            r#"{"recipe":1,"package":"linux-image-6.1.0-56-cloud-amd64","version":"6.1.192-2"}"#
        );
        assert_eq!(key_of(&inputs), key_of(&inputs.clone()));
        assert_eq!(key_of(&inputs).len(), 64);
        assert_eq!(key_of(&initrd()), key_of(&initrd()));
        // Without npm packages a rootfs serializes as it did before they existed, so the
        // default image's cached rootfs stays valid.
        assert_eq!(
            serde_json::to_string(&rootfs()).expect("serializes"),
            format!(
                r#"{{"recipe":1,"suite":"bookworm","variant":"minbase","packages":["curl","git"],"sources_file":"/etc/apt/sources.list.d/debian.sources","sources_sha256":"{}"}}"#,
                "s".repeat(64)
            )
        );
        let old: RootfsInputs =
            serde_json::from_str(&serde_json::to_string(&rootfs()).expect("serializes"))
                .expect("a rootfs.json written before npm support still reads");
        assert_eq!(old, rootfs());
    }

    #[test]
    fn every_initrd_input_changes_the_key() {
        let base = key_of(&initrd());
        let variants: Vec<fn(&mut InitrdInputs)> = vec![
            |i| i.recipe += 1,
            |i| i.kernel_key = "x".into(),
            |i| i.modules.push("overlay".into()),
            |i| i.modules.reverse(),
            |i| i.init_sha256 = "x".into(),
            |i| i.busybox_sha256 = "x".into(),
            |i| i.agent_sha256 = "x".into(),
            |i| i.compression = "gzip".into(),
        ];
        for (n, change) in variants.iter().enumerate() {
            let mut inputs = initrd();
            change(&mut inputs);
            assert_ne!(key_of(&inputs), base, "change {n} kept the key");
        }
    }

    #[test]
    fn every_rootfs_input_changes_the_key() {
        let base = key_of(&rootfs());
        let variants: Vec<fn(&mut RootfsInputs)> = vec![
            |r| r.recipe += 1,
            |r| r.suite = "trixie".into(),
            |r| r.variant = "apt".into(),
            |r| r.packages.push("zstd".into()),
            |r| r.sources_sha256 = "x".into(),
            |r| *r = with_npm(),
        ];
        for (n, change) in variants.iter().enumerate() {
            let mut inputs = rootfs();
            change(&mut inputs);
            assert_ne!(key_of(&inputs), base, "change {n} kept the key");
        }
    }

    #[test]
    fn every_npm_input_changes_the_key() {
        let base = key_of(&with_npm());
        let variants: Vec<fn(&mut NpmInputs)> = vec![
            |n| n.packages[1] = "b@2.0.1".into(),
            |n| n.packages.push("c@1.0.0".into()),
            |n| n.packages.clear(),
            |n| n.hook_sha256 = "x".into(),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut inputs = with_npm();
            change(inputs.npm.as_mut().expect("npm"));
            assert_ne!(key_of(&inputs), base, "change {i} kept the key");
        }
    }

    #[test]
    fn field_boundaries_cannot_collide() {
        // "ab"+"c" and "a"+"bc" must not hash alike: JSON quoting keeps fields apart.
        let mut a = rootfs();
        a.packages = vec!["ab".into(), "c".into()];
        let mut b = rootfs();
        b.packages = vec!["a".into(), "bc".into()];
        assert_ne!(key_of(&a), key_of(&b));
    }
}
