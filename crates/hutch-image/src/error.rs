//! The crate's error type: what went wrong and, where we know it, what to do about it.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while checking, building, looking up or removing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },

    #[error("invalid image spec: {0}")]
    InvalidSpec(String),

    #[error("agent binary {}: {problem}", path.display())]
    BadAgent { path: PathBuf, problem: String },

    #[error("`{command}` failed ({status}): {stderr_tail}{hint}")]
    CommandFailed {
        command: String,
        status: String,
        stderr_tail: String,
        /// Already starts with "; " when not empty.
        hint: String,
    },

    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error("Debian cloud kernel: {0}")]
    Kernel(String),

    #[error("kernel modules of {release}: {problem}")]
    Modules { release: String, problem: String },

    #[error(
        "building the root filesystem needs root (mmdebstrap and `mkfs.ext4 -d` must keep file \
         ownership), and {}: ask an administrator to run `hutch image build` (with this --image) \
         as root once, which every user then shares; a rootless build cannot run here: {rootless}; \
         `hutch doctor` says more",
        shared.as_ref().map_or("there is no system cache to take it from".to_owned(), |p| format!("the system cache {} has none for these inputs", p.display()))
    )]
    NeedsRoot { shared: Option<PathBuf>, rootless: String },

    #[error("no apt sources file: neither {} nor {} exists", .0[0].display(), .0[1].display())]
    NoAptSources([PathBuf; 2]),

    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{} is corrupt; delete it (or the cache entry holding it) and build again", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot choose a cache directory: {0}; set HUTCH_CACHE_DIR")]
    NoCacheDir(&'static str),

    #[error(
        "refusing to delete {}: a file system is mounted below it; unmount it first",
        .0.display()
    )]
    MountedBelow(PathBuf),

    #[error(
        "the image `{prefix}` is in the shared cache {}, which only root changes (`hutch image rm` as root)",
        cache.display()
    )]
    SharedImage { prefix: String, cache: PathBuf },

    #[error(
        "bad image key prefix `{0}`: give one or more hex digits of a key from the image list"
    )]
    BadKeyPrefix(String),

    #[error("no cached image key starts with `{0}`")]
    UnknownImage(String),

    #[error("key prefix `{prefix}` is ambiguous: it matches {}; give more digits", keys.join(", "))]
    AmbiguousImage { prefix: String, keys: Vec<String> },
}

impl ImageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand to attach an action and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(action, path, e))
    }
}
