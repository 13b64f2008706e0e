//! `hutch run`: one command in a fresh sandbox, output streamed live, its exit code returned, the VM destroyed
//! whatever happens (normal end, error, timeout, Ctrl-C, SIGTERM, VM crash). On a terminal the command gets a
//! pseudo-terminal in the VM and hutch's terminal goes raw for as long as it runs (see `term`).

use std::time::Duration;

use anyhow::Context;
use hutch_proto::{ExecEvent, ExecInput, ExecRequest};
use hutch_sandbox::{Host, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;

/// How the command ended, as hutch's exit code.
enum Ending {
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
    // Every input is read and checked before anything is created: flags, the user's config, hutch.toml, policies,
    // secrets.
    let tty = crate::term::wanted(a.tty, a.no_tty)?;
    let explicit = crate::config::Explicit::from_command_line();
    let user = crate::config::UserConfig::load(a.config.as_deref())?;
    let mut repo = crate::repo::RunRepo::prepare(&a, &user.credentials)?;
    crate::config::apply_resources(&mut a, explicit, &user, repo.project());
    a.env.splice(0..0, crate::image::default_env(a.vm.image));
    let egress = crate::egress::build(&a.egress, &user, repo.project(), repo.has_setup())?;
    repo.snapshot(&mut a)?;
    let t0 = std::time::Instant::now();
    let (cache, image) = crate::image::ensure_named(a.vm.image).await?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "run: image found");
    let host = Host::new(image, cache.root().to_path_buf())?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "run: host capabilities detected");
    let mut cfg = crate::image::sandbox_config(&a.vm);
    cfg.cold = a.cold || !a.kernel_args.is_empty();
    cfg.boot_timeout = a.boot_timeout;
    cfg.extra_kernel_args = a.kernel_args.clone();
    cfg.egress = egress;
    cfg.env = a.env.clone();
    crate::image::warn_if_tcg(&host, &cfg)?;

    // Signals are watched from before the VM exists, so a Ctrl-C during start-up also cleans up.
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;

    let sandbox = tokio::select! {
        r = Sandbox::create_with_notes(&host, &cfg, &|n| eprintln!("hutch: warning: {n}")) => r?,
        _ = sigint.recv() => return Ok(130),
        _ = sigterm.recv() => return Ok(143),
        _ = sighup.recv() => return Ok(129),
    };
    tracing::info!(id = %sandbox.id, mode = ?sandbox.start.mode, took_ms = sandbox.start.took.as_millis() as u64, "sandbox started");
    if sandbox.start.snapshot_wanted {
        rebuild_snapshot_in_background(&a.vm, cache.root());
    }

    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + t);
    let ending = {
        let work = async {
            repo.enter_workspace(sandbox.client()).await?;
            // Copied-in files are in place before the setup script runs.
            for c in &a.copy_in {
                sandbox
                    .client()
                    .put_host_file(&c.host, &c.guest)
                    .await
                    .with_context(|| format!("copy-in {} -> {}", c.host.display(), c.guest))?;
            }
            repo.setup(sandbox.client(), sandbox.gateway(), &a.command).await?;
            let ending = if tty { exec_tty(&sandbox, &a).await? } else { exec(&sandbox, &a).await? };
            anyhow::Ok(ending)
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let vm_gone = sandbox.channel_closed();
        tokio::select! {
            r = work => r,
            _ = sleep => Ok(Ending::Timeout(a.timeout.unwrap_or_default())),
            _ = sigint.recv() => Ok(Ending::Signal("SIGINT", 130)),
            _ = sigterm.recv() => Ok(Ending::Signal("SIGTERM", 143)),
            _ = sighup.recv() => Ok(Ending::Signal("SIGHUP", 129)),
            _ = vm_gone => Ok(Ending::VmGone(String::new())),
        }
    };

    // Copy-out happens for any ending where the VM is still there to answer.
    let mut copy_err = None;
    if matches!(ending, Ok(Ending::Exited(_))) {
        repo.collect(sandbox.client(), &sandbox.id).await;
        for c in &a.copy_out {
            if let Err(e) = copy_out(&sandbox, &c.guest, &c.host).await {
                copy_err = Some(e.context(format!("copy-out {} -> {}", c.guest, c.host.display())));
                break;
            }
        }
    }
    // The console is the guest's: read while the sandbox directory still exists, and escaped.
    let ending = ending.map(|e| match e {
        Ending::VmGone(_) => Ending::VmGone(crate::term::escape_controls(&hutch_sandbox::console_tail(sandbox.console_log()))),
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
        Ending::Exited(c) => c,
        Ending::SpawnFailed { message, not_found } => {
            eprintln!("hutch: {}", crate::term::escape_controls(&message));
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

async fn copy_out(sandbox: &Sandbox, guest: &str, host: &std::path::Path) -> anyhow::Result<()> {
    // Written next to the destination and renamed into place, so a failed copy never leaves a partial file.
    let dir = host.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(".hutch-copy-{}", hutch_sandbox::new_id()));
    let mut f = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).await.with_context(|| format!("create {}", tmp.display()))?;
    let r = sandbox.client().get_file(guest, &mut f).await;
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
