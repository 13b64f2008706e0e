//! `hutch bench`: start-up latency percentiles (hutch vs the bare VMM doing the same boot or restore), and the
//! memory an idle sandbox costs.

use std::time::{Duration, Instant};

use anyhow::Context;
use hutch_proto::handshake::{self, HandshakeMsg};
use hutch_sandbox::{Host, Sandbox};
use hutch_vmm::{Backend, Memory, Vm, VmConfig};
use tokio::io::AsyncReadExt;

use crate::cli::BenchArgs;

struct Samples {
    name: String,
    ms: Vec<f64>,
}

impl Samples {
    fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ms: vec![] }
    }
    fn push(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1000.0);
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[idx.min(v.len() - 1)]
    }
    fn print(&self) {
        println!("{:<46} p50 {:>8.1} ms   p90 {:>8.1} ms   p95 {:>8.1} ms   (n={})", self.name, self.pct(50.0), self.pct(90.0), self.pct(95.0), self.ms.len());
    }
}

/// Runs `hutch run [extra] -- cmd` and returns (wall time, time to first stdout byte).
async fn time_hutch_run(extra: &[&str], cmd: &[&str]) -> anyhow::Result<(Duration, Option<Duration>)> {
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .arg("run")
        .args(extra)
        .arg("--")
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("spawn hutch run")?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut first = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            first = Some(t0.elapsed());
        }
    }
    let st = child.wait().await?;
    if !st.success() {
        anyhow::bail!("hutch run {cmd:?} failed: {st}");
    }
    Ok((t0.elapsed(), first))
}

/// The bare VMM: QEMU started by hand on the same kernel, initramfs and disk, timed until the agent says Ready
/// (cold) or answers Hello (restore). No hutch session, identity, or exec.
async fn time_bare(host: &Host, cfg: &hutch_sandbox::SandboxConfig, snap: Option<&hutch_sandbox::snapshot::Snapshot>) -> anyhow::Result<Duration> {
    let accel = host.caps.choose(cfg.accel)?;
    let id = hutch_sandbox::new_id();
    let dir = host.sandbox_dir(&id)?;
    let disk = dir.path().join("disk.qcow2");
    let (backing, fmt) = match snap {
        Some(s) => (s.disk.clone(), "qcow2"),
        None => (host.image.rootfs.clone(), "raw"),
    };
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(&backing)
        .arg(&disk)
        .status()?;
    anyhow::ensure!(st.success(), "qemu-img failed");
    let memory = match snap {
        Some(s) => Memory::File { path: s.files.memory.clone(), shared: false },
        None => Memory::Anonymous,
    };
    let vmcfg = VmConfig {
        kernel: host.image.kernel.clone(),
        initrd: host.image.initrd.clone(),
        cmdline: hutch_sandbox::kernel_cmdline(accel),
        disk,
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        accel,
        memory,
        dir: dir.path().to_path_buf(),
        sock_dir: dir.sockets().to_path_buf(),
        workspace: None,
        workspace_base: None,
    };
    let t0 = Instant::now();
    let mut vm = match snap {
        Some(s) => host.qemu.restore(&vmcfg, &s.files).await?,
        None => host.qemu.boot(&vmcfg).await?,
    };
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        let mut s = vm.connect_agent().await?;
        if snap.is_some() {
            handshake::host_handshake(&mut s, 7, false).await?;
        } else {
            loop {
                if let HandshakeMsg::Ready(_) = handshake::read_msg(&mut s).await? {
                    break;
                }
            }
        }
        anyhow::Ok(t0.elapsed())
    })
    .await;
    vm.kill().await;
    drop(dir);
    r.context("bare VM did not come up in 60 s")?
}

/// From create (or pool take) to the first byte of `echo`'s output, and how many guest code blocks the emulator
/// had translated by then (under TCG a fresh QEMU translates everything it runs once: the dominant cost).
async fn create_to_first_output(host: &Host, cfg: &hutch_sandbox::SandboxConfig, pool: Option<&hutch_sandbox::pool::Pool>) -> anyhow::Result<(Duration, Option<u64>)> {
    let t0 = Instant::now();
    let mut sb = match pool {
        Some(p) => p.take(cfg).await?,
        None => Sandbox::create(host, cfg).await?,
    };
    let req = hutch_proto::ExecRequest { argv: vec!["echo".into(), "x".into()], env: vec![], cwd: None, stdin: false, tty: None };
    let mut h = sb.client().exec(req).await?;
    let mut first = None;
    while let Some(ev) = h.events.next().await {
        match ev {
            hutch_proto::ExecEvent::Stdout(_) if first.is_none() => first = Some(t0.elapsed()),
            hutch_proto::ExecEvent::Exited(_) => break,
            _ => {}
        }
    }
    let blocks = sb.translated_blocks().await;
    sb.destroy().await;
    Ok((first.context("no output")?, blocks))
}

fn median(v: &mut [u64]) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find(|l| l.starts_with("Pss:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// First run (setup, capture, restore) against a cached run, each to the command's first output.
async fn bench_env_cache(a: &BenchArgs) -> anyhow::Result<i32> {
    if !a.run_args.iter().any(|x| x == "--setup" || x.starts_with("--setup=")) {
        anyhow::bail!("--env-cache needs a setup script: hutch bench --env-cache -- --setup FILE [other hutch run flags]");
    }
    println!("hutch bench --env-cache: {} runs each; hutch run {}\n", a.runs, a.run_args.join(" "));
    let args: Vec<&str> = a.run_args.iter().map(String::as_str).collect();
    let mut first = Samples::new("first run (setup + store), first byte");
    let mut cached = Samples::new("cached run (restore + workspace), first byte");
    for _ in 0..a.runs {
        let mut with = args.clone();
        with.push("--refresh-cache");
        let (_, f) = time_hutch_run(&with, &["echo", "ready"]).await?;
        first.push(f.context("the first run printed nothing")?);
        let (_, f) = time_hutch_run(&args, &["echo", "ready"]).await?;
        cached.push(f.context("the cached run printed nothing")?);
    }
    first.print();
    cached.print();
    let ratio = cached.pct(50.0) / first.pct(50.0);
    println!("\ncached / first (p50): {ratio:.3} (1/{:.1}; target <= 1/10)", 1.0 / ratio);
    Ok(0)
}

pub async fn bench(a: BenchArgs) -> anyhow::Result<i32> {
    if a.env_cache {
        return bench_env_cache(&a).await;
    }
    let (cache, image) = crate::image::ensure_named(a.vm.image).await?;
    let host = Host::new(image, cache.root().to_path_buf())?;
    let cfg = crate::image::sandbox_config(&a.vm);
    let accel = crate::image::warn_if_tcg(&host, &cfg)?;
    let snap = hutch_sandbox::snapshot::ensure(&host, &cfg).await?;
    let vm_flags = [format!("--cpus={}", a.vm.cpus), format!("--memory={}", a.vm.memory), format!("--image={}", a.vm.image.name())];
    let vm_flags: Vec<&str> = vm_flags.iter().map(String::as_str).collect();
    if !a.repo.is_empty() {
        for &files in &a.repo {
            let dir = bench_repo(files, a.runs, &vm_flags).await?;
            mount_profile(&host, &cfg, &dir, &cache.root().join("workspaces"), a.runs).await?;
        }
        return Ok(0);
    }
    println!("hutch bench: accel={accel}, {} vCPU, {} MiB, {} runs each\n", cfg.cpus, cfg.memory_mib, a.runs);

    let mut restore_wall = Samples::new("hutch run -- true (restore), wall");
    let mut restore_first = Samples::new("hutch run -- echo (restore), first byte");
    let mut bare_restore = Samples::new("bare QEMU restore -> agent answers");
    for _ in 0..a.runs {
        restore_wall.push(time_hutch_run(&vm_flags, &["true"]).await?.0);
        if let (_, Some(f)) = time_hutch_run(&vm_flags, &["echo", "x"]).await? {
            restore_first.push(f);
        }
        bare_restore.push(time_bare(&host, &cfg, Some(&snap)).await?);
    }
    restore_wall.print();
    restore_first.print();
    bare_restore.print();
    println!("{:<46} {:.2}x (p50)\n", "ratio hutch first byte / bare restore", restore_first.pct(50.0) / bare_restore.pct(50.0));

    if a.cold {
        let mut cold_flags = vm_flags.clone();
        cold_flags.push("--cold");
        let mut cold_wall = Samples::new("hutch run --cold -- true, wall");
        let mut cold_first = Samples::new("hutch run --cold -- echo, first byte");
        let mut bare_cold = Samples::new("bare QEMU boot -> agent ready");
        for _ in 0..a.runs {
            cold_wall.push(time_hutch_run(&cold_flags, &["true"]).await?.0);
            if let (_, Some(f)) = time_hutch_run(&cold_flags, &["echo", "x"]).await? {
                cold_first.push(f);
            }
            bare_cold.push(time_bare(&host, &cfg, None).await?);
        }
        cold_wall.print();
        cold_first.print();
        bare_cold.print();
        println!("{:<46} {:.2}x (p50)", "ratio hutch cold first byte / bare boot", cold_first.pct(50.0) / bare_cold.pct(50.0));
        println!("{:<46} {:.2}x (p50)\n", "ratio restore / cold (first byte)", restore_first.pct(50.0) / cold_first.pct(50.0));
    }

    // In-process: from "create" to the first byte of an exec's output, by start mode.
    let mut restore_create = Samples::new("create -> first exec output (restore)");
    let mut pool_create = Samples::new("create -> first exec output (pool hit)");
    let (mut restore_blocks, mut pool_blocks) = (vec![], vec![]);
    let pool = hutch_sandbox::pool::Pool::start(host.clone(), cfg.clone(), 1);
    for _ in 0..a.runs {
        // Both on a quiet host: the pool full and its refill done, as in a daemon between creates.
        anyhow::ensure!(pool.wait_full(Duration::from_secs(120)).await, "the warm pool did not fill");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (d, b) = create_to_first_output(&host, &cfg, None).await?;
        restore_create.push(d);
        restore_blocks.extend(b);
        let (d, b) = create_to_first_output(&host, &cfg, Some(&pool)).await?;
        pool_create.push(d);
        pool_blocks.extend(b);
    }
    pool.drain().await;
    restore_create.print();
    pool_create.print();
    if let (Some(r), Some(p)) = (median(&mut restore_blocks), median(&mut pool_blocks)) {
        println!("{:<46} restore {r}, pool hit {p} (p50; the pool's were translated while it warmed up)", "guest code blocks translated by first output");
    }
    if a.cold {
        let cold_cfg = hutch_sandbox::SandboxConfig { cold: true, ..cfg.clone() };
        let mut cold_create = Samples::new("create -> first exec output (cold boot)");
        for _ in 0..a.runs.min(5) {
            cold_create.push(create_to_first_output(&host, &cold_cfg, None).await?.0);
        }
        cold_create.print();
        println!("{:<46} {:.3} (p50; the goal is at most 0.1)", "ratio restore / cold boot", restore_create.pct(50.0) / cold_create.pct(50.0));
    }
    println!("{:<46} {:.2}x (p50)", "ratio restore / bare QEMU restore", restore_create.pct(50.0) / bare_restore.pct(50.0));
    println!("{:<46} {:.2}x (p50)\n", "ratio pool hit / bare QEMU restore", pool_create.pct(50.0) / bare_restore.pct(50.0));

    // Memory and CPU of idle sandboxes: a few at once, after they settle.
    let mut boxes = Vec::new();
    for _ in 0..3 {
        boxes.push(Sandbox::create(&host, &cfg).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut pss = Samples::new("idle sandbox VMM PSS (MiB)");
    for b in &boxes {
        if let Some(k) = b.vmm_pid().and_then(pss_kib) {
            pss.ms.push(k as f64 / 1024.0);
        }
    }
    let window = Duration::from_secs(5);
    let before: Vec<Option<u64>> = boxes.iter().map(|b| b.vmm_pid().and_then(cpu_ticks)).collect();
    tokio::time::sleep(window).await;
    let after: Vec<Option<u64>> = boxes.iter().map(|b| b.vmm_pid().and_then(cpu_ticks)).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut idle_cpu = Samples::new("idle sandbox CPU (% of one core)");
    for (b, a2) in before.iter().zip(&after) {
        if let (Some(b), Some(a2)) = (b, a2) {
            idle_cpu.ms.push((a2.saturating_sub(*b)) as f64 / hz / window.as_secs_f64() * 100.0);
        }
    }
    for b in boxes {
        b.destroy().await;
    }
    println!("{:<46} p50 {:>8.1} MiB (n={})", pss.name, pss.pct(50.0), pss.ms.len());
    println!("{:<46} p50 {:>8.2} %   max {:>6.2} % (n={}, over {}s)", idle_cpu.name, idle_cpu.pct(50.0), idle_cpu.pct(100.0), idle_cpu.ms.len(), window.as_secs());
    let by_memory = mem_available_kib().and_then(|avail| {
        let per = pss.pct(50.0) * 1024.0;
        (per > 0.0).then(|| (avail as f64 / per, avail as f64 / 1048576.0))
    });
    if let Some((n, gib)) = by_memory {
        println!("{:<46} ~{n:.0} idle sandboxes (MemAvailable {gib:.1} GiB / PSS)", "host capacity by memory");
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let per_cpu = idle_cpu.pct(50.0).max(0.01);
    let by_cpu = cores * 100.0 / per_cpu;
    println!("{:<46} ~{by_cpu:.0} idle sandboxes ({cores} cores / idle CPU; each busy one takes a whole core)", "host capacity by CPU");
    if let Some((n, _)) = by_memory {
        println!("{:<46} ~{:.0} idle sandboxes ({} runs out first)", "host capacity", n.min(by_cpu), if n < by_cpu { "memory" } else { "CPU" });
    }
    Ok(0)
}

/// A generated repository of `files` files (~12 KiB of text each, in directories of 25, one commit, packed as a
/// real repository's objects are), kept in the temporary directory for the next bench.
fn bench_repository(files: u32) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("hutch-bench-repo-{files}"));
    if dir.join(".git/hutch-bench-ready").is_file() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let git = |args: &[&str]| -> anyhow::Result<()> {
        let st = std::process::Command::new("git")
            .args(["-c", "user.name=bench", "-c", "user.email=bench@hutch.invalid", "-c", "gc.auto=0"])
            .args(args)
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "git {args:?} failed in {}", dir.display());
        Ok(())
    };
    git(&["init", "-q", "-b", "main"])?;
    // A small deterministic generator: the same repository on every machine.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..files {
        let d = dir.join(format!("src/m{:03}/p{:02}", i / 1000, (i / 25) % 40));
        std::fs::create_dir_all(&d)?;
        let len = 2048 + (next() % 20480) as usize;
        let mut body = String::with_capacity(len + 64);
        while body.len() < len {
            body.push_str(&format!("{:016x} {:016x}\n", next(), next()));
        }
        std::fs::write(d.join(format!("f{i:06}.txt")), body)?;
    }
    std::fs::write(dir.join(".gitignore"), "target/\n")?;
    git(&["add", "-A"])?;
    git(&["commit", "-qm", "generated"])?;
    git(&["gc", "-q"])?;
    std::fs::write(dir.join(".git/hutch-bench-ready"), "")?;
    Ok(dir)
}

/// `hutch run -- true` in the directory `dir`: wall time and the debug log's phase times (ms) by message.
async fn time_run_in(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<(Duration, std::collections::BTreeMap<String, f64>)> {
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let out = tokio::process::Command::new(exe)
        .arg("run")
        .args(extra)
        .args(["--", "true"])
        .current_dir(dir)
        .env("HUTCH_LOG", "hutch=debug")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("spawn hutch run")?;
    let wall = t0.elapsed();
    anyhow::ensure!(out.status.success(), "hutch run in {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let mut phases = std::collections::BTreeMap::new();
    for line in strip_ansi(&String::from_utf8_lossy(&out.stderr)).lines() {
        for msg in ["run: working tree snapshot taken", "run: image found", "repo: workspace mounted", "repo: changes collected", "repo: changes imported", "sandbox started"] {
            if line.contains(msg) {
                let ms = line.split_whitespace().find_map(|w| w.strip_prefix("ms=").or_else(|| w.strip_prefix("took_ms="))).and_then(|v| v.parse::<f64>().ok());
                if let Some(ms) = ms {
                    phases.insert(msg.to_string(), ms);
                }
            }
        }
    }
    Ok((wall, phases))
}

/// The repository case: the first run (the workspace image is made), then `runs` runs of the same tree and of
/// `--no-repo`, alternating, with the split of the repository runs.
async fn bench_repo(files: u32, runs: u32, vm_flags: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    let t = Instant::now();
    let dir = tokio::task::spawn_blocking(move || bench_repository(files)).await??;
    let size = dir_size(&dir);
    println!("repository case: {files} files, {} MiB of working tree + .git ({}; ready in {:.1} s)", size >> 20, dir.display(), t.elapsed().as_secs_f64());
    // A fresh tree for the first run: an untracked file with a new name makes a new image.
    let marker = dir.join(format!("bench-{}.txt", hutch_sandbox::new_id()));
    std::fs::write(&marker, "first run\n")?;
    let first = time_run_in(&dir, vm_flags).await;
    let _ = std::fs::remove_file(&marker);
    let (first, first_phases) = first?;
    println!("{:<46} {:>8.1} ms   (snapshot + image made: {:.0} ms)", "first run of a new tree (image made), wall", first.as_secs_f64() * 1e3, first_phases.get("run: working tree snapshot taken").copied().unwrap_or(f64::NAN) - first_phases.get("run: image found").copied().unwrap_or(0.0));
    // New trees once HEAD's blob device exists (the first run made it): one file changes each time, so the image
    // holds the structure, the indexes and that file.
    let mut new_tree = Samples::new("new tree (one file changed), wall");
    let mut new_tree_host = Samples::new("  host: snapshot + image over the blob device");
    let changed = dir.join("bench-changed.txt");
    for i in 0..runs.min(3) {
        std::fs::write(&changed, format!("change {i} {}\n", hutch_sandbox::new_id()))?;
        let r = time_run_in(&dir, vm_flags).await;
        let (w, p) = r?;
        new_tree.push(w);
        new_tree_host.ms.push(p.get("run: working tree snapshot taken").copied().unwrap_or(f64::NAN) - p.get("run: image found").copied().unwrap_or(0.0));
    }
    let _ = std::fs::remove_file(&changed);
    new_tree.print();
    new_tree_host.print();
    // Warm the image cache for the unchanged tree, then measure.
    time_run_in(&dir, vm_flags).await?;
    let mut wall = Samples::new(format!("hutch run -- true, {files}-file repo, wall"));
    let mut no_repo = Samples::new("hutch run --no-repo -- true, same dir, wall");
    let (mut host, mut start, mut mount, mut collect, mut import) =
        (Samples::new("  host: snapshot (image cached)"), Samples::new("  VM start (restore)"), Samples::new("  into the VM: mount image + overlay"), Samples::new("  collection in the VM + download"), Samples::new("  import on the host"));
    let mut no_repo_flags = vm_flags.to_vec();
    no_repo_flags.push("--no-repo");
    for _ in 0..runs {
        let (w, p) = time_run_in(&dir, vm_flags).await?;
        wall.push(w);
        let ms = |k: &str| p.get(k).copied().unwrap_or(f64::NAN);
        host.ms.push(ms("run: working tree snapshot taken") - ms("run: image found"));
        start.ms.push(ms("sandbox started"));
        mount.ms.push(ms("repo: workspace mounted"));
        collect.ms.push(ms("repo: changes collected"));
        import.ms.push(ms("repo: changes imported"));
        no_repo.push(time_run_in(&dir, &no_repo_flags).await?.0);
    }
    for s in [&wall, &host, &start, &mount, &collect, &import, &no_repo] {
        s.print();
    }
    println!("{:<46} {:.2}x (p50)\n", "ratio repository / --no-repo", wall.pct(50.0) / no_repo.pct(50.0));
    Ok(dir)
}

/// In-process, with the image the runs of `dir` used: the workspace mount in a fresh VM (under TCG mostly the
/// translation of kernel code run for the first time), the same mount again in that VM (the work itself), one
/// agent round trip, and the collection's overlay check, each with the guest code blocks translated meanwhile.
async fn mount_profile(host: &Host, cfg: &hutch_sandbox::SandboxConfig, dir: &std::path::Path, ws_cache: &std::path::Path, runs: u32) -> anyhow::Result<()> {
    let repo = hutch_repo::HostRepo::discover(dir)?.context("the bench repository is not a git work tree")?;
    let (image, base) = hutch_repo::host::predicted_image(&repo, ws_cache).context("no workspace image recorded for the bench repository")?;
    let with_base = base.is_some();
    let cfg = hutch_sandbox::SandboxConfig { workspace_image: Some(image), workspace_base: base, ..cfg.clone() };
    let names = ["mount (fresh VM)", "mount again (same VM)", "ping", "upper layer empty? (in the agent)", "full overlay check (a process)"];
    let mut ms: Vec<Samples> = names.iter().map(|n| Samples::new(format!("  in-process: {n}"))).collect();
    let mut blocks: Vec<Vec<u64>> = vec![vec![]; names.len()];
    for _ in 0..runs.min(5) {
        let mut sb = Sandbox::create(host, &cfg).await?;
        let r = async {
            for (i, step) in ms.iter_mut().enumerate() {
                let b0 = sb.translated_blocks().await;
                let t = Instant::now();
                match i {
                    0 | 1 => sb.client().mount_workspace(hutch_repo::guest::WORKSPACE, with_base).await?,
                    2 => sb.client().ping().await?,
                    3 => anyhow::ensure!(sb.client().workspace_untouched().await?, "the agent says the upper layer is not empty"),
                    _ => {
                        let argv = ["/run/hutch-agent", "workspace-changes", "/var/tmp/hutch/overlay/upper", "/run/hutch/workspace-image", "/var/tmp/hutch/out"];
                        let req = hutch_proto::ExecRequest { argv: argv.map(str::to_string).to_vec(), env: vec![], cwd: Some(hutch_repo::guest::WORKSPACE.into()), stdin: false, tty: None };
                        let out = sb.client().run_request(req).await?;
                        anyhow::ensure!(out.stdout.starts_with(b"0 same\n"), "the overlay check found changes: {}", hutch_text::escape_lines(&out.stdout));
                    }
                }
                step.push(t.elapsed());
                if let (Some(a), Some(b)) = (b0, sb.translated_blocks().await) {
                    blocks[i].push(b.saturating_sub(a));
                }
            }
            anyhow::Ok(())
        }
        .await;
        sb.destroy().await;
        r?;
    }
    for (s, b) in ms.iter().zip(blocks.iter_mut()) {
        println!("{:<46} p50 {:>8.1} ms   p95 {:>8.1} ms   blocks translated p50 {}", s.name, s.pct(50.0), s.pct(95.0), median(b).map_or("-".into(), |v| v.to_string()));
    }
    println!();
    Ok(())
}

/// Log text without its colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}
