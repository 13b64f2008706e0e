//! Builds a real image into a temp cache, interrupts a build, boots the image under QEMU
//! (TCG) and checks the agent ran as PID 1 after switch_root, then exercises reuse,
//! partial rebuilds and removal. Needs root, apt, mmdebstrap and QEMU; says so and skips
//! when they are missing.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use hutch_image::{host_tsc_khz, Cache, Image, ImageSpec, Progress, SpinnerProgress};

const MARKER: &str = "hutch-test-agent-ok";
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
const CHILD_CACHE_ENV: &str = "HUTCH_IMAGE_TEST_CHILD_CACHE";
const CHILD_AGENT_ENV: &str = "HUTCH_IMAGE_TEST_CHILD_AGENT";

/// The agent: a script (the Debian rootfs has /bin/sh) that reports how it was started and
/// powers the VM off through sysrq, since there is no init system to ask.
fn agent_script(tag: &str) -> String {
    format!(
        "#!/bin/sh\n\
         root=$(grep ' / ' /proc/mounts | tail -n 1 | cut -d' ' -f1)\n\
         run=$(grep ' /run ' /proc/mounts | tail -n 1 | cut -d' ' -f3)\n\
         echo \"{MARKER} tag={tag} pid=$$ argv=$0,$1 release=$(uname -r) mode=$(stat -c %a \"$0\") \
         root=$root run=$run\"\n\
         echo o > /proc/sysrq-trigger\n\
         sleep 30\n"
    )
}

fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("building a rootfs needs root".into());
    }
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("sha256sum", "coreutils"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} not found (apt-get install {package})"));
        }
    }
    None
}

/// Run in a child process by `image_lifecycle`, which kills it in the middle of the build.
#[test]
#[ignore = "helper: image_lifecycle runs it in a child process and kills it"]
fn helper_child_build() -> Result<()> {
    let cache = std::env::var(CHILD_CACHE_ENV).context("run by image_lifecycle only")?;
    let agent = std::env::var(CHILD_AGENT_ENV).context("run by image_lifecycle only")?;
    Cache::at(cache).ensure(&ImageSpec::default_for(agent), &hutch_image::SilentProgress)?;
    bail!("the build finished before it was killed")
}

#[test]
fn image_lifecycle() -> Result<()> {
    if let Some(reason) = missing_prerequisite() {
        eprintln!("SKIP image_lifecycle: {reason}");
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let cache_dir = work.path().join("cache");
    let cache = Cache::at(&cache_dir);
    let agent_one = work.path().join("agent-one");
    let agent_two = work.path().join("agent-two");
    std::fs::write(&agent_one, agent_script("one"))?;
    std::fs::write(&agent_two, agent_script("two"))?;
    let spec_one = ImageSpec::default_for(&agent_one);
    let spec_two = ImageSpec::default_for(&agent_two);

    // 1. A build killed halfway leaves nothing in the cache proper, and no mounts.
    interrupted_build(&cache_dir, &agent_one)?;

    // 2. The next build reaps the leftovers and builds what is missing. Two builders at
    //    once: one builds, the other waits for it and builds nothing.
    let (a, b) = (SpinnerProgress::new(), SpinnerProgress::new());
    let started = Instant::now();
    let (image, image_b) = std::thread::scope(|s| {
        let first = s.spawn(|| cache.ensure(&spec_one, &a));
        let second = s.spawn(|| Cache::at(&cache_dir).ensure(&spec_one, &b));
        (first.join(), second.join())
    });
    let image = image.map_err(|_| anyhow::anyhow!("builder panicked"))??;
    let image_b = image_b.map_err(|_| anyhow::anyhow!("builder panicked"))??;
    eprintln!(
        "build after interruption: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    ensure!(image == image_b, "concurrent builders disagree");
    let (builder, waiter) = if a.timings().is_empty() {
        (&b, &a)
    } else {
        (&a, &b)
    };
    print_timings(builder);
    ensure!(
        waiter.timings().is_empty(),
        "both builders built: {:?}",
        waiter.timings()
    );
    ensure!(
        builder
            .timings()
            .iter()
            .any(|(s, _)| s.contains("mmdebstrap")),
        "the killed rootfs build was not redone: {:?}",
        builder.timings()
    );
    let leftovers: Vec<_> = std::fs::read_dir(cache_dir.join("tmp"))?.collect();
    ensure!(leftovers.is_empty(), "tmp/ not reaped: {leftovers:?}");
    let mounts = mounts_under(&cache_dir)?;
    ensure!(mounts.is_empty(), "mounts left under the cache: {mounts:?}");
    check_image(&cache, &image)?;

    // 3. Boot it: the agent runs as PID 1 from /run, on the root disk, with our kernel.
    let rootfs_before = fingerprint(&image.rootfs)?;
    let line = boot_to_marker(&image, work.path(), true)?;
    let fields = parse_marker(&line);
    ensure!(fields.get("tag") == Some(&"one"), "{line}");
    ensure!(
        fields.get("pid") == Some(&"1"),
        "agent is not PID 1: {line}"
    );
    ensure!(
        fields.get("argv") == Some(&"/run/hutch-agent,init"),
        "argv: {line}"
    );
    ensure!(fields.get("mode") == Some(&"755"), "mode: {line}");
    ensure!(fields.get("root") == Some(&"/dev/vda"), "root: {line}");
    ensure!(fields.get("run") == Some(&"tmpfs"), "/run: {line}");
    ensure!(
        fields.get("release") == Some(&image.kernel_release.as_str()),
        "guest uname -r differs from the manifest's {}: {line}",
        image.kernel_release
    );
    ensure!(
        fingerprint(&image.rootfs)? == rootfs_before,
        "booting through an overlay modified the shared rootfs"
    );

    // 4. Same spec again: a cache hit that builds nothing and touches nothing.
    let before = mtimes(&image)?;
    let progress = SpinnerProgress::new();
    let started = Instant::now();
    let again = cache.ensure(&spec_one, &progress)?;
    eprintln!("cache hit: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    ensure!(again == image, "a second ensure returned a different image");
    ensure!(
        progress.timings().is_empty(),
        "cache hit ran build stages: {:?}",
        progress.timings()
    );
    ensure!(mtimes(&image)? == before, "a cache hit modified files");
    ensure!(
        cache.lookup(&spec_one)?.as_ref() == Some(&image),
        "lookup misses a built image"
    );
    ensure!(
        cache.lookup(&spec_two)?.is_none(),
        "lookup found an image never built"
    );

    // 5. Another agent rebuilds only the initramfs.
    let progress = SpinnerProgress::new();
    let started = Instant::now();
    let image_two = cache.ensure(&spec_two, &progress)?;
    eprintln!(
        "agent change rebuild: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    print_timings(&progress);
    let stages: Vec<String> = progress.timings().into_iter().map(|(s, _)| s).collect();
    ensure!(
        stages.len() == 2 && stages[0].starts_with("Building the initramfs"),
        "expected only an initramfs build, got {stages:?}"
    );
    ensure!(image_two.key != image.key && image_two.initrd != image.initrd);
    ensure!(image_two.kernel == image.kernel && image_two.rootfs == image.rootfs);
    ensure!(
        mtimes(&image)? == before,
        "rebuilding the initramfs touched shared components"
    );
    let line = boot_to_marker(&image_two, work.path(), false)?;
    ensure!(parse_marker(&line).get("tag") == Some(&"two"), "{line}");

    // A component damaged by hand is noticed and rebuilt, not served; snapshots taken of
    // the old bytes go.
    let snapshot = cache.snapshot_dir(&image_two)?.join("snap");
    std::fs::write(&snapshot, b"x")?;
    std::fs::remove_file(&image_two.initrd)?;
    ensure!(
        cache.lookup(&spec_two)?.is_none(),
        "lookup served an image missing its initrd"
    );
    let rebuilt = cache.ensure(&spec_two, &hutch_image::SilentProgress)?;
    ensure!(rebuilt.initrd == image_two.initrd && rebuilt.initrd.is_file());
    ensure!(
        !snapshot.exists(),
        "a snapshot of the deleted initrd survived"
    );

    // 6. Without a root disk /init says why and powers the VM off by itself.
    let boot = boot(&image, None, false)?;
    ensure!(
        boot.output.contains("hutch-init: no root disk"),
        "no failure line:\n{}",
        boot.output
    );
    ensure!(
        boot.exited_by_itself,
        "QEMU did not exit after /init failed:\n{}",
        boot.output
    );

    // 7. Listing and removal: shared components go with the last image using them.
    let listed: Vec<String> = cache.list()?.into_iter().map(|m| m.key).collect();
    let mut expected = vec![image.key.clone(), image_two.key.clone()];
    expected.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    ensure!(sorted == expected, "list: {listed:?}");
    std::fs::write(cache.snapshot_dir(&image)?.join("snap"), b"x")?;
    let removed = cache.remove(&image.key[..12])?;
    eprintln!("removed: {removed:?}");
    let initrd_one = format!("initrd/{}", image.manifest.initrd.key);
    ensure!(
        removed == vec![format!("images/{}", image.key), initrd_one],
        "{removed:?}"
    );
    ensure!(!image.dir.exists() && !image.initrd.exists());
    ensure!(
        image.kernel.exists() && image.rootfs.exists(),
        "shared parts removed too early"
    );
    ensure!(cache.lookup(&spec_one)?.is_none());
    let removed = cache.remove(&image_two.key)?;
    ensure!(removed.len() == 4, "{removed:?}");
    for dir in ["images", "kernels", "initrd", "rootfs", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(cache_dir.join(dir))?.collect();
        ensure!(
            left.is_empty(),
            "{dir}/ not empty after removing everything: {left:?}"
        );
    }
    let locks: Vec<_> = std::fs::read_dir(cache_dir.join("locks"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    ensure!(locks == ["cache.lock"], "stale lock files: {locks:?}");
    Ok(())
}

/// Starts a build in a child process, kills it (SIGKILL) while mmdebstrap runs, and checks
/// what is left.
fn interrupted_build(cache_dir: &Path, agent: &Path) -> Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "helper_child_build", "--ignored", "--nocapture"])
        .env(CHILD_CACHE_ENV, cache_dir)
        .env(CHILD_AGENT_ENV, agent)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let tmp = cache_dir.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(300);
    // Wait until mmdebstrap has unpacked something into the rootfs tree.
    loop {
        let tree_started = std::fs::read_dir(&tmp).ok().is_some_and(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("rootfs-")
                    && std::fs::read_dir(e.path().join("staging/tree/usr"))
                        .is_ok_and(|mut d| d.next().is_some())
            })
        });
        if tree_started {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!("the child build ended ({status}) before mmdebstrap got going");
        }
        ensure!(Instant::now() < deadline, "mmdebstrap never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    child.kill()?;
    child.wait()?;
    // Its tools get SIGTERM when it dies; wait for every process working in the cache.
    let gone_by = Instant::now() + Duration::from_secs(60);
    loop {
        let busy = processes_mentioning(cache_dir);
        if busy.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < gone_by,
            "processes outlived the killed build: {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for dir in ["rootfs", "images"] {
        let entries: Vec<_> = std::fs::read_dir(cache_dir.join(dir))
            .map(|d| d.collect())
            .unwrap_or_default();
        ensure!(
            entries.is_empty(),
            "a killed build left {dir}/ entries: {entries:?}"
        );
    }
    // mmdebstrap's own mounts (proc, dev...) lived in a private mount namespace and died
    // with it; only the staging tmpfs may remain, for the next build's reaper.
    let left = mounts_under(cache_dir)?;
    ensure!(
        left.iter()
            .all(|l| l.contains(" - tmpfs hutch-rootfs-staging ")),
        "a killed build left foreign mounts under the cache: {left:?}"
    );
    eprintln!("killed build left {} staging mount(s)", left.len());
    let leftovers = std::fs::read_dir(&tmp)?.count();
    eprintln!("killed build left {leftovers} entries in tmp/ for the reaper");
    ensure!(leftovers > 0, "expected the killed build's temp dir");
    Ok(())
}

/// Lines of /proc/self/mountinfo for mount points under `dir`.
fn mounts_under(dir: &Path) -> Result<Vec<String>> {
    let prefix = format!("{}/", dir.display());
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&prefix)))
        .map(str::to_owned)
        .collect())
}

fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
            (cmdline.contains(&needle) || cwd.starts_with(path)).then_some(cmdline)
        })
        .collect()
}

fn check_image(cache: &Cache, image: &Image) -> Result<()> {
    let m = &image.manifest;
    ensure!(image.key == m.key && image.dir == cache.root().join("images").join(&image.key));
    ensure!(
        m.kernel.package.starts_with("linux-image-") && m.kernel.package.ends_with("-cloud-amd64")
    );
    ensure!(image.kernel_release == m.kernel.release && !m.kernel.release.is_empty());
    ensure!(m.kernel.bytes == std::fs::metadata(&image.kernel)?.len());
    // bzImage: "HdrS" at 0x202.
    let kernel = std::fs::read(&image.kernel)?;
    ensure!(
        kernel.get(0x202..0x206) == Some(b"HdrS".as_slice()),
        "vmlinuz is not a bzImage"
    );
    ensure!(!m.initrd.modules.load_order.is_empty());
    let rootfs = std::fs::metadata(&image.rootfs)?;
    ensure!(
        rootfs.mode() & 0o222 == 0,
        "the shared rootfs must be read-only"
    );
    ensure!(
        rootfs.len() >= 4 << 30 && rootfs.blocks() * 512 < rootfs.len(),
        "rootfs not sparse"
    );
    let blkid = Command::new("blkid").arg(&image.rootfs).output()?;
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    ensure!(
        blkid.contains("LABEL=\"hutch-root\"") && blkid.contains("TYPE=\"ext4\""),
        "{blkid}"
    );
    eprintln!(
        "sizes: vmlinuz {} KiB, initrd {} KiB ({} modules), rootfs {} MiB content / {} MiB allocated / {} GiB disk",
        m.kernel.bytes >> 10,
        m.initrd.bytes >> 10,
        m.initrd.modules.load_order.len(),
        m.rootfs.content_bytes >> 20,
        m.rootfs.allocated_bytes >> 20,
        m.rootfs.image_bytes >> 30
    );
    Ok(())
}

fn print_timings(progress: &SpinnerProgress) {
    progress.finish();
    for (stage, took) in progress.timings() {
        eprintln!("  {:6.2}s  {stage}", took.as_secs_f64());
    }
}

/// sha256, size and mtime of a file.
fn fingerprint(path: &Path) -> Result<(String, u64, SystemTime)> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum failed");
    let sum = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let meta = std::fs::metadata(path)?;
    Ok((sum, meta.len(), meta.modified()?))
}

fn mtimes(image: &Image) -> Result<Vec<SystemTime>> {
    [
        &image.kernel,
        &image.initrd,
        &image.rootfs,
        &image.dir.join("manifest.json"),
    ]
    .iter()
    .map(|p| Ok(std::fs::metadata(p)?.modified()?))
    .collect()
}

fn parse_marker(line: &str) -> std::collections::HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

struct Boot {
    output: String,
    marker: Option<(String, Duration)>,
    exited_by_itself: bool,
}

/// Boots `image` with a fresh qcow2 overlay of its rootfs and returns the agent's marker
/// line; a boot that hangs (TCG timer calibration) is retried once.
fn boot_to_marker(image: &Image, work: &Path, report: bool) -> Result<String> {
    let overlay = work.join("overlay.qcow2");
    for attempt in 1..=2 {
        let _ = std::fs::remove_file(&overlay);
        let created = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.rootfs)
            .arg(&overlay)
            .status()?;
        ensure!(created.success(), "qemu-img create failed");
        let boot = boot(image, Some(&overlay), report)?;
        std::fs::remove_file(&overlay)?;
        if let Some((line, took)) = boot.marker {
            eprintln!(
                "boot to agent: {:.2}s (attempt {attempt})",
                took.as_secs_f64()
            );
            return Ok(line);
        }
        if boot.exited_by_itself {
            bail!(
                "the guest stopped without running the agent:\n{}",
                boot.output
            );
        }
        eprintln!("boot attempt {attempt} hung; output:\n{}", boot.output);
    }
    bail!("the guest hung twice")
}

fn boot(image: &Image, disk: Option<&Path>, report: bool) -> Result<Boot> {
    let khz = host_tsc_khz().context("host TSC frequency unknown")?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&image.kernel)
    .arg("-initrd")
    .arg(&image.initrd)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={khz} no_timer_check cryptomgr.notests"
    ));
    if let Some(disk) = disk {
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=none,id=root,format=qcow2",
                disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"]);
    }
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        forward_lines(child.stdout.take().context("stdout")?, tx.clone()),
        forward_lines(child.stderr.take().context("stderr")?, tx),
    ];
    let mut output = String::new();
    let mut marker = None;
    let deadline = started + BOOT_DEADLINE;
    let exited_by_itself = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if marker.is_none() && line.contains(MARKER) {
                    marker = Some((line.trim().to_owned(), started.elapsed()));
                }
                if report {
                    eprintln!("  guest: {line}");
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break wait_or_kill(&mut child, deadline)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline {
            break wait_or_kill(&mut child, deadline)?;
        }
    };
    for reader in readers {
        let _ = reader.join();
    }
    Ok(Boot {
        output,
        marker,
        exited_by_itself,
    })
}

/// True if QEMU exits before `deadline`; otherwise kills it and returns false.
fn wait_or_kill(child: &mut Child, deadline: Instant) -> Result<bool> {
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn forward_lines(
    stream: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    })
}
