//! Shared by the sandbox-level VM tests: the guest agent binary and a host with the default image.

use std::path::PathBuf;

use hutch_sandbox::Host;

pub fn agent() -> PathBuf {
    if let Some(p) = std::env::var_os("HUTCH_AGENT") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-gnu/release/hutch-agent");
    assert!(p.is_file(), "build the guest agent first (scripts/build), or set HUTCH_AGENT");
    p
}

pub fn host() -> Host {
    let cache = hutch_image::Cache::from_env().expect("cache");
    let spec = hutch_image::ImageSpec::default_for(agent());
    let image = cache.ensure(&spec, &hutch_image::SilentProgress).expect("image");
    Host::new(image, cache.root().to_path_buf()).expect("host")
}
