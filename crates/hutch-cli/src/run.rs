//! `hutch run`: one command in a fresh sandbox, output streamed live, its exit code returned, the VM destroyed
//! whatever happens (normal end, error, timeout, Ctrl-C, SIGTERM, VM crash). On a terminal the command gets a
//! pseudo-terminal in the VM and hutch's terminal goes raw for as long as it runs (see `term`).

use std::time::Duration;

use anyhow::Context;
use hutch_proto::{ExecEvent, ExecInput, ExecRequest};
use hutch_sandbox::envcache::Start;
use hutch_sandbox::{Host, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;

/// How the command ended, as hutch's exit code.
enum Ending {
    /// Not ended: the start-up steps are done and the command comes next.
    Continue,
    Exited(i32),
    SpawnFailed { message: String, not_found: bool },
    Timeout(Duration),
    Signal(&'static str, i32),
    /// The VM went away; the guest's last console lines (escaped), read before the VM is destroyed.
    VmGone(String),
    /// The user typed `Enter ~ .` in a terminal session.
    Escaped,
}

pub async fn run(mut a: RunArgs) -> anyhow::Result<i32> {
    if a.detach {
        return crate::detach::run(a).await;
    }
    if a.daemon {
        return crate::remote::run_via_daemon(a).await;
    }
    // Every input is read and checked before anything is created: flags, the user's config, hutch.toml, policies,
    // secrets.
    let tty = crate::term::wanted(a.tty, a.no_tty)?;
    let explicit = crate::config::Explicit::from_command_line();
    let user = crate::config::UserConfig::load(a.config.as_deref())?;
    let mut repo = crate::repo::RunRepo::prepare(&a, &user.credentials)?;
    crate::config::apply_resources(&mut a, explicit, &user, repo.project());
    a.env.splice(0..0, crate::image::default_env(a.vm.image));
    let egress = crate::egress::build(&a.egress, &user, repo.project(), repo.has_setup())?;
    let t0 = std::time::Instant::now();
    let (cache, image) = crate::image::ensure_named(a.vm.image).await?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "run: image found");
    let ws_cache = cache.root().join("workspaces");
    let host = Host::new(image, cache.root().to_path_buf())?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "run: host capabilities detected");
    let mut cfg = crate::image::sandbox_config(&a.vm);
    cfg.cold = a.cold || !a.kernel_args.is_empty();
    cfg.boot_timeout = a.boot_timeout;
    cfg.extra_kernel_args = a.kernel_args.clone();
    cfg.egress = egress;
    cfg.env = a.env.clone();
    crate::image::warn_if_tcg(&host, &cfg)?;

    let plan = crate::envcache::plan(&a, &user, &repo, &cfg.egress, &host.image.key, cache.root())?;

    // The VM is restored while the working-tree snapshot is taken, with the image the last snapshot of this work
    // tree used (an unchanged tree uses it again). The snapshot decides: a VM started with another image is
    // destroyed before anything ran in it, and the run starts one with the right image.
    let guess = match (&plan, cfg.cold) {
        (None, false) => repo.predicted_image(&ws_cache),
        _ => None,
    };
    let speculative = guess.map(|(img, base)| {
        let (h, mut c) = (host.clone(), cfg.clone());
        c.workspace_image = Some(img.clone());
        c.workspace_base = base.clone();
        let task = tokio::spawn(async move {
            let quiet = |n: &str| tracing::debug!("speculative start: {}", hutch_text::escape_lines(n.as_bytes()));
            let sb = Sandbox::create_with_notes(&h, &c, &quiet).await?;
            // The image is mounted too while the snapshot may still run; a wrong guess destroys the VM anyway.
            let t = std::time::Instant::now();
            let mounted = sb.client().mount_workspace(hutch_repo::guest::WORKSPACE, c.workspace_base.is_some()).await;
            tracing::debug!(ms = t.elapsed().as_millis() as u64, ok = mounted.is_ok(), "repo: workspace mounted");
            Ok::<_, hutch_sandbox::SandboxError>((sb, mounted.is_ok()))
        });
        ((img, base), task)
    });
    let snapped = tokio::task::block_in_place(|| repo.snapshot(&mut a, &ws_cache));
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "run: working tree snapshot taken");
    cfg.workspace_image = repo.workspace_image();
    cfg.workspace_base = repo.workspace_base();
    let mut early = None;
    if let Some(((img, base), task)) = speculative {
        match task.await {
            // Both slots must hold what the snapshot names: a delta image over another base reads wrong data.
            Ok(Ok((sb, mounted))) if snapped.is_ok() && cfg.workspace_image.as_ref() == Some(&img) && cfg.workspace_base == base => {
                if mounted {
                    repo.workspace_mounted();
                }
                early = Some(sb);
            }
            Ok(Ok((sb, _))) => {
                tracing::debug!("speculative start: the tree changed; starting again with its image");
                sb.destroy().await;
            }
            Ok(Err(e)) => tracing::debug!("speculative start failed: {}", hutch_sandbox::error_chain(&e)),
            Err(e) => tracing::debug!("speculative start failed: {e}"),
        }
    }
    snapped?;

    // Signals are watched from before the VM exists, so a Ctrl-C during start-up also cleans up.
    let mut sigs = Signals {
        int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
        term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
        hup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
    };
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + t);
    let warn = |n: &str| eprintln!("hutch: warning: {}", hutch_text::escape_lines(n.as_bytes()));

    // Where the VM comes from: an environment snapshot (the setup's result), or the image snapshot followed by the
    // setup (captured afterwards when this run builds the entry for its key).
    let mut start = match &plan {
        None => Start::Fresh { lock: None },
        Some(p) => p.start(&warn),
    };
    let (sandbox, ending) = loop {
        let created = match early.take() {
            Some(sb) => sb,
            None => tokio::select! {
                r = create(&host, &cfg, &mut start, plan.as_ref(), &warn) => r?,
                _ = sigs.int.recv() => return Ok(130),
                _ = sigs.term.recv() => return Ok(143),
                _ = sigs.hup.recv() => return Ok(129),
            },
        };
        let sandbox = created;
        tracing::info!(id = %sandbox.id, mode = ?sandbox.start.mode, took_ms = sandbox.start.took.as_millis() as u64, "sandbox started");
        if sandbox.start.snapshot_wanted {
            rebuild_snapshot_in_background(&a.vm, cache.root());
        }
        let setup_t0 = std::time::Instant::now();
        let prepared = {
            let prep = async {
                match &start {
                    Start::Cached { entry, just_made } => {
                        if !*just_made {
                            eprintln!(
                                "hutch: setup: cached (key {}…, made {} ago)",
                                &entry.meta.key[..8],
                                crate::envcache::age(entry.age_secs())
                            );
                        }
                        // Also in the VM just restored from the entry this run made: the command starts from the
                        // same state every later run of this key will (a fresh /workspace over the current tree,
                        // the copy-ins), whatever the setup wrote into /workspace.
                        repo.replace_workspace(sandbox.client()).await?;
                        copy_in(&sandbox, &a).await?;
                        if *just_made {
                            sandbox.gateway().enter_phase(hutch_gateway::Phase::Agent).context("ending the setup phase")?;
                        } else {
                            repo.maintenance(sandbox.client(), sandbox.gateway(), &a.command).await?;
                        }
                    }
                    Start::Fresh { .. } => {
                        repo.enter_workspace(sandbox.client()).await?;
                        // Copied-in files are in place before the setup script runs.
                        copy_in(&sandbox, &a).await?;
                        repo.setup(sandbox.client(), sandbox.gateway(), &a.command).await?;
                    }
                }
                anyhow::Ok(None)
            };
            guard(prep, &sandbox, deadline, a.timeout, &mut sigs).await
        };
        match prepared {
            Ok(None) => {}
            Ok(Some(stop)) => break (sandbox, Ok(stop)),
            Err(e) => break (sandbox, Err(e)),
        }
        let Some(p) = &plan else { break (sandbox, Ok(Ending::Continue)) };
        let setup_ms = setup_t0.elapsed().as_millis() as u64;
        // The setup succeeded and its connections are cut: the VM becomes the entry, and the command runs in a VM
        // restored from it (which also proves the entry restores).
        let captured = tokio::select! {
            r = p.capture(sandbox, &mut start, setup_ms, &warn) => r,
            _ = sigs.int.recv() => return Ok(130),
            _ = sigs.term.recv() => return Ok(143),
            _ = sigs.hup.recv() => return Ok(129),
        };
        match captured {
            Err(sandbox) => break (sandbox, Ok(Ending::Continue)),
            Ok(Some(entry)) => eprintln!("hutch: setup: stored in the environment cache (key {}…)", &entry.meta.key[..8]),
            Ok(None) => {}
        }
    };

    let ending = match ending {
        Ok(Ending::Continue) => guard(async { if tty { exec_tty(&sandbox, &a).await.map(Some) } else { exec(&sandbox, &a).await.map(Some) } }, &sandbox, deadline, a.timeout, &mut sigs).await.and_then(|r| match r {
            Some(stop) => Ok(stop),
            None => Err(anyhow::anyhow!("the command ended without a status")),
        }),
        other => other,
    };

    // Copy-out happens for any ending where the VM is still there to answer.
    let mut copy_err = None;
    if matches!(ending, Ok(Ending::Exited(_))) {
        repo.collect(sandbox.client(), &sandbox.id).await;
        for c in &a.copy_out {
            if let Err(e) = copy_out(&sandbox, &c.guest, &c.host, a.copy_out_max).await {
                copy_err = Some(e.context(format!("copy-out {} -> {}", c.guest, c.host.display())));
                break;
            }
        }
    }
    // The console is the guest's: read while the sandbox directory still exists, and escaped.
    let ending = ending.map(|e| match e {
        Ending::VmGone(_) => Ending::VmGone(hutch_sandbox::console_tail(sandbox.console_log())),
        e => e,
    });
    let denied = sandbox.gateway().summary();
    sandbox.destroy().await;
    // A program can leave the cursor anywhere (raw output stops at any column): hutch's own messages after an
    // ending the program did not choose start on a line of their own.
    if tty && !matches!(ending, Ok(Ending::Exited(_) | Ending::SpawnFailed { .. })) {
        eprintln!();
    }
    crate::egress::print_denials(&denied);

    let code = match ending? {
        Ending::Continue => 0,
        Ending::Exited(c) => c,
        Ending::SpawnFailed { message, not_found } => {
            eprintln!("hutch: {}", hutch_text::escape_lines(message.as_bytes()));
            if not_found {
                127
            } else {
                126
            }
        }
        Ending::Timeout(t) => {
            eprintln!("hutch: timed out after {:.1}s; the VM was destroyed", t.as_secs_f64());
            124
        }
        Ending::Signal(name, code) => {
            eprintln!("hutch: {name} received; the VM was destroyed");
            code
        }
        Ending::VmGone(console) => {
            eprintln!("hutch: the VM stopped unexpectedly; last console lines:\n{console}");
            125
        }
        Ending::Escaped => {
            eprintln!("hutch: session ended with ~.; the VM was destroyed");
            255
        }
    };
    if let Some(e) = copy_err {
        return Err(e);
    }
    repo.finish(code)
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// The VM for `start`: from the environment cache when the run has a plan, else an ordinary sandbox.
async fn create(host: &Host, cfg: &hutch_sandbox::SandboxConfig, start: &mut Start, plan: Option<&crate::envcache::Plan>, warn: &(dyn Fn(&str) + Sync)) -> anyhow::Result<Sandbox> {
    match plan {
        Some(p) => Ok(p.create(host, cfg, start, warn).await?),
        None => Ok(Sandbox::create_with_notes(host, cfg, warn).await?),
    }
}

async fn copy_in(sandbox: &Sandbox, a: &RunArgs) -> anyhow::Result<()> {
    for c in &a.copy_in {
        sandbox.client().put_host_file(&c.host, &c.guest).await.with_context(|| format!("copy-in {} -> {}", c.host.display(), c.guest))?;
    }
    Ok(())
}

/// Runs `work` unless the deadline passes, a signal arrives or the VM goes away first: `Ok(None)` when `work`
/// finished (its own ending, if any, is returned as `Some`).
async fn guard(
    work: impl std::future::Future<Output = anyhow::Result<Option<Ending>>>,
    sandbox: &Sandbox,
    deadline: Option<tokio::time::Instant>,
    timeout: Option<Duration>,
    sigs: &mut Signals,
) -> anyhow::Result<Option<Ending>> {
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = work => r,
        _ = sleep => Ok(Some(Ending::Timeout(timeout.unwrap_or_default()))),
        _ = sigs.int.recv() => Ok(Some(Ending::Signal("SIGINT", 130))),
        _ = sigs.term.recv() => Ok(Some(Ending::Signal("SIGTERM", 143))),
        _ = sigs.hup.recv() => Ok(Some(Ending::Signal("SIGHUP", 129))),
        _ = sandbox.channel_closed() => Ok(Some(Ending::VmGone(String::new()))),
    }
}

async fn exec(sandbox: &Sandbox, a: &RunArgs) -> anyhow::Result<Ending> {
    let req = ExecRequest { argv: a.command.clone(), env: a.env.clone(), cwd: a.workdir.clone(), stdin: true, tty: None };
    let handle = sandbox.client().exec(req).await?;
    let mut input = handle.input;
    let mut events = handle.events;
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; hutch_proto::CHUNK];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = input.send(ExecInput::StdinEof).await;
                    return;
                }
                Ok(n) => {
                    if input.send(ExecInput::Stdin(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let result = loop {
        match events.next().await {
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Stdout(b)) => {
                stdout.write_all(&b).await.context("write to stdout")?;
                stdout.flush().await.context("write to stdout")?;
            }
            Some(ExecEvent::Stderr(b)) => {
                stderr.write_all(&b).await.context("write to stderr")?;
                stderr.flush().await.context("write to stderr")?;
            }
            Some(ExecEvent::Exited(st)) => break Ending::Exited(st.as_shell_code()),
            Some(ExecEvent::SpawnFailed { message, not_found }) => break Ending::SpawnFailed { message, not_found },
            None => break Ending::VmGone(String::new()),
        }
    };
    stdin_task.abort();
    Ok(result)
}

/// The command on a pseudo-terminal in the VM, sized like the user's, with the user's terminal raw: every key
/// (Ctrl-C, Ctrl-Z, Ctrl-\\ included) goes to the guest as bytes and the guest's terminal decides what it means;
/// the guest's output goes to the terminal byte for byte. Keys are forwarded by a task of their own, so a guest
/// that does not read its input never stops its output from being shown (nor the other way round).
async fn exec_tty(sandbox: &Sandbox, a: &RunArgs) -> anyhow::Result<Ending> {
    // The terminal's variables come first, so `--env` and the image's defaults win over them.
    let mut env = crate::term::user_env();
    env.extend(a.env.iter().cloned());
    let req = ExecRequest { argv: a.command.clone(), env, cwd: a.workdir.clone(), stdin: true, tty: Some(crate::term::size()) };
    let handle = sandbox.client().exec(req).await?;
    let mut input = handle.input;
    let mut events = handle.events;
    let raw = crate::term::RawMode::enter()?;
    let mut keys = crate::term::Keyboard::start()?;
    let (local_tx, mut local_rx) = tokio::sync::mpsc::channel::<crate::term::Key>(1);
    let forward = tokio::spawn(async move {
        use crate::term::Key;
        loop {
            let sent = match keys.next().await {
                Key::Input(b) => input.send(ExecInput::Stdin(b)).await,
                Key::Resize(s) => input.send(ExecInput::Resize(s)).await,
                // A terminal has no end of input but the user's ^D, which is a byte; stdin closing (the terminal
                // went away) leaves the program running, as it would in ssh until its next read fails.
                Key::Eof => continue,
                k @ (Key::End | Key::Help) => {
                    if local_tx.send(k).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let result = loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ExecEvent::Started { .. }) => {}
                Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => {
                    stdout.write_all(&b).await.context("write to the terminal")?;
                    stdout.flush().await.context("write to the terminal")?;
                }
                Some(ExecEvent::Exited(st)) => break Ending::Exited(st.as_shell_code()),
                Some(ExecEvent::SpawnFailed { message, not_found }) => break Ending::SpawnFailed { message, not_found },
                None => break Ending::VmGone(String::new()),
            },
            k = local_rx.recv() => match k {
                Some(crate::term::Key::End) => break Ending::Escaped,
                Some(_) => {
                    stdout.write_all(crate::term::ESCAPE_HELP.as_bytes()).await.context("write to the terminal")?;
                    stdout.flush().await.context("write to the terminal")?;
                }
                None => {}
            },
        }
    };
    forward.abort();
    drop(raw);
    Ok(result)
}

async fn copy_out(sandbox: &Sandbox, guest: &str, host: &std::path::Path, max: u64) -> anyhow::Result<()> {
    // Written next to the destination and renamed into place, so a failed copy never leaves a partial file.
    let dir = host.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(".hutch-copy-{}", hutch_sandbox::new_id()));
    let mut f = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).await.with_context(|| format!("create {}", tmp.display()))?;
    let r = sandbox.client().get_file_sparse(guest, &mut f, max).await;
    drop(f);
    match r {
        Ok(meta) => {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(meta.mode & 0o777));
            std::fs::rename(&tmp, host).with_context(|| format!("move into {}", host.display()))?;
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if matches!(e, hutch_sandbox::SandboxError::TooLarge { .. }) {
                return Err(anyhow::anyhow!("{e} (the limit is --copy-out-max; raise it, e.g. --copy-out-max 8G, to take the file)"));
            }
            Err(e.into())
        }
    }
}

/// Starts `hutch image build` for this run's image and size as a detached process (its own session, output in
/// the cache's `snapshot-rebuild.log`), so that the next run restores again. It outlives this run on purpose;
/// concurrent builds of the same snapshot are harmless (each works in its own directory and renames into place).
fn rebuild_snapshot_in_background(vm: &crate::cli::VmArgs, cache_root: &std::path::Path) {
    let log_path = cache_root.join("snapshot-rebuild.log");
    let spawned = (|| -> anyhow::Result<u32> {
        let exe = std::env::current_exe().context("find the hutch binary")?;
        let log = std::fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["image", "build", "--image", vm.image.name()])
            .arg(format!("--cpus={}", vm.cpus))
            .arg(format!("--memory={}", vm.memory))
            .env("HUTCH_CACHE_DIR", cache_root)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(accel) = vm.accel {
            cmd.arg(format!("--accel={accel}"));
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd.spawn()?.id())
    })();
    match spawned {
        Ok(pid) => eprintln!("hutch: rebuilding the snapshot in the background (pid {pid}, log {})", log_path.display()),
        Err(e) => eprintln!("hutch: warning: cannot rebuild the snapshot in the background ({e:#}); `hutch image build` makes it"),
    }
}
