//! Builds (or finds) an image in the cache and prints where its parts are and how long each
//! build stage took: `cargo run -p hutch-image --example build-image -- <agent> [extra-package...]`.
//! Uses `$HUTCH_CACHE_DIR` or the default cache directory.

use std::time::Instant;

use anyhow::Context;
use hutch_image::{Cache, ImageSpec, Progress, SpinnerProgress};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agent = args
        .next()
        .context("usage: build-image <agent binary> [extra-package...]")?;
    let mut spec = ImageSpec::default_for(agent);
    spec.extra_packages = args.collect();
    let cache = Cache::from_env()?;
    let progress = SpinnerProgress::new();
    let started = Instant::now();
    let image = cache.ensure(&spec, &progress)?;
    progress.finish();
    let took = started.elapsed();
    let m = &image.manifest;
    println!("image   {} ({:.3}s)", image.key, took.as_secs_f64());
    println!("cache   {}", cache.root().display());
    println!(
        "kernel  {} ({} {}, release {}, {} KiB)",
        image.kernel.display(),
        m.kernel.package,
        m.kernel.version,
        image.kernel_release,
        m.kernel.bytes >> 10
    );
    println!(
        "initrd  {} ({} KiB, {} modules)",
        image.initrd.display(),
        m.initrd.bytes >> 10,
        m.initrd.modules.load_order.len()
    );
    println!(
        "rootfs  {} ({} MiB content, {} MiB allocated, {} GiB disk)",
        image.rootfs.display(),
        m.rootfs.content_bytes >> 20,
        m.rootfs.allocated_bytes >> 20,
        m.rootfs.image_bytes >> 30
    );
    for (stage, took) in progress.timings() {
        println!("stage   {:6.2}s  {stage}", took.as_secs_f64());
    }
    Ok(())
}
