//! Running one process for the host: argv, env, cwd, stdin in; stdout and stderr streamed out separately and
//! live; exit status; signals to the process group; the group killed if the host goes away.

use std::process::Stdio;
use std::time::Duration;

use hutch_proto::mux::Stream;
use hutch_proto::{ExecEvent, ExecInput, ExecRequest, ExitStatus, Framed, CHUNK};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// How long to keep reading output after the process exits, when a background child still holds the pipes.
const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// `keep`: set when the host suspended the session; the process then survives the channel's end (its output
/// is read and dropped, its stdin stays open).
pub async fn run(framed: Framed<Stream>, req: ExecRequest, base_env: Vec<(String, String)>, keep: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let (mut tx, mut rx) = framed.split();
    let Some(program) = req.argv.first() else {
        let _ = tx.send(&ExecEvent::SpawnFailed { message: "empty command".into(), not_found: false }).await;
        return;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&req.argv[1..]).env_clear();
    for (k, v) in base_env.iter().chain(req.env.iter()) {
        cmd.env(k, v);
    }
    cmd.current_dir(req.cwd.as_deref().unwrap_or("/root"));
    cmd.kill_on_drop(true);
    let pty = match req.tty {
        Some(size) => match setup_pty(&mut cmd, size, &base_env, &req.env) {
            Ok(master) => Some(master),
            Err(e) => {
                let _ = tx.send(&ExecEvent::SpawnFailed { message: format!("cannot create a terminal: {e}"), not_found: false }).await;
                return;
            }
        },
        None => {
            cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() });
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.process_group(0);
            None
        }
    };
    let spawned = cmd.spawn();
    // The parent's copies of the terminal's slave end must go, or the master never sees EOF.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let not_found = e.kind() == std::io::ErrorKind::NotFound;
            let message = format!("cannot run {program:?}: {e}");
            let _ = tx.send(&ExecEvent::SpawnFailed { message, not_found }).await;
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    if tx.send(&ExecEvent::Started { pid }).await.is_err() {
        return;
    }
    let pgid = Pid::from_raw(pid as i32);

    let (ev_tx, mut ev_rx) = mpsc::channel::<ExecEvent>(8);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, ev_tx.clone(), ExecEvent::Stdout));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, ev_tx.clone(), ExecEvent::Stderr));
    }
    if let Some(master) = &pty {
        tokio::spawn(pump(master.clone(), ev_tx.clone(), ExecEvent::Stdout));
    }
    drop(ev_tx);

    let mut stdin: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> = match (&pty, child.stdin.take()) {
        (Some(master), _) => Some(Box::new(master.clone())),
        (None, Some(pipe)) => Some(Box::new(pipe)),
        (None, None) => None,
    };
    let master = pty.clone();
    let keep_in = keep.clone();
    let input = tokio::spawn(async move {
        loop {
            match rx.recv::<ExecInput>().await {
                Ok(ExecInput::Stdin(bytes)) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&bytes).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(ExecInput::Resize(size)) => {
                    if let Some(m) = &master {
                        m.set_window_size(size);
                    }
                }
                // A terminal has no end-of-input short of the user's ^D, which arrives as bytes.
                Ok(ExecInput::StdinEof) if master.is_none() => stdin = None,
                Ok(ExecInput::StdinEof) => {}
                Ok(ExecInput::Signal(n)) => {
                    if let Ok(sig) = Signal::try_from(n) {
                        let _ = killpg(pgid, sig);
                    }
                }
                Err(_) if keep_in.load(std::sync::atomic::Ordering::SeqCst) => {
                    // Suspended: the process lives on; its stdin stays open until it exits.
                    let _stdin = stdin;
                    std::future::pending::<()>().await;
                    return;
                }
                Err(_) => {
                    // The host is gone: nobody will read the output, so the process must not outlive it.
                    let _ = killpg(pgid, Signal::SIGKILL);
                    return;
                }
            }
        }
    });

    let mut status = None;
    let mut outputs_open = true;
    let mut host_gone = false;
    while status.is_none() || outputs_open {
        tokio::select! {
            ev = ev_rx.recv(), if outputs_open => match ev {
                // After a suspend the output has no reader; it is dropped so that the process never blocks on it.
                Some(_) if host_gone => {}
                Some(ev) => {
                    if tx.send(&ev).await.is_err() {
                        if keep.load(std::sync::atomic::Ordering::SeqCst) {
                            host_gone = true;
                            continue;
                        }
                        let _ = killpg(pgid, Signal::SIGKILL);
                        input.abort();
                        return;
                    }
                }
                None => outputs_open = false,
            },
            st = child.wait(), if status.is_none() => {
                status = Some(match st {
                    Ok(st) => to_status(st),
                    Err(_) => ExitStatus::Code(255),
                });
            },
            _ = tokio::time::sleep(DRAIN_IDLE), if status.is_some() => outputs_open = false,
        }
    }
    input.abort();
    if let (Some(st), false) = (status, host_gone) {
        let _ = tx.send(&ExecEvent::Exited(st)).await;
    }
    let _ = tx.close().await;
}

/// Opens a pseudo-terminal of `size`, makes its slave end the command's stdio and controlling terminal (in a new
/// session), and returns the master end.
fn setup_pty(
    cmd: &mut tokio::process::Command,
    size: hutch_proto::TtySize,
    base_env: &[(String, String)],
    env: &[(String, String)],
) -> std::io::Result<crate::port::Port> {
    let ws = nix::pty::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&ws), None).map_err(std::io::Error::from)?;
    let slave = std::fs::File::from(pty.slave);
    cmd.stdin(Stdio::from(slave.try_clone()?));
    cmd.stdout(Stdio::from(slave.try_clone()?));
    cmd.stderr(Stdio::from(slave));
    if !base_env.iter().chain(env.iter()).any(|(k, _)| k == "TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    // SAFETY: setsid and ioctl are async-signal-safe; between fork and exec we only make the child a session
    // leader and take fd 0 (the slave) as its controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    crate::port::Port::from_file(std::fs::File::from(pty.master))
}

fn to_status(st: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        (None, None) => ExitStatus::Code(255),
    }
}

async fn pump<R: AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<ExecEvent>, wrap: fn(Vec<u8>) -> ExecEvent) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(wrap(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}
