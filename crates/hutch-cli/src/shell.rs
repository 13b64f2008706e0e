//! `hutch shell ID` (and `hutch exec --tty`): a terminal session in a sandbox. The local terminal goes raw, so
//! every key (Ctrl-C included) reaches the guest's terminal as bytes and the guest decides what they mean;
//! SIGWINCH becomes a resize; the terminal is restored however the session ends.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Args;
use futures::{SinkExt, StreamExt};
use hutch_daemon::model::{ClientMsg, ServerMsg, StreamExec, TtySize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::Message;

use crate::remote::{parse_id, Api, Conn};

#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_id)]
    pub id: String,
    /// The program to run instead of a login shell.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub async fn shell(a: ShellArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let cmd = if a.command.is_empty() { vec!["/bin/bash".to_string(), "-l".to_string()] } else { a.command };
    interactive(&api, &a.id, cmd, BTreeMap::new(), None).await
}

/// Puts the terminal in raw mode for its lifetime.
struct RawMode;

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn size() -> TtySize {
    let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
    TtySize { rows: rows.max(1), cols: cols.max(1) }
}

pub async fn interactive(api: &Api, id: &str, argv: Vec<String>, env: BTreeMap<String, String>, cwd: Option<String>) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!("a terminal session needs a terminal on stdin and stdout; use `hutch exec` without --tty for pipes");
    }
    let mut env = env;
    if let Ok(term) = std::env::var("TERM") {
        env.entry("TERM".into()).or_insert(term);
    }
    let spec = StreamExec { argv, env, cwd, tty: Some(size()), stdin: None };
    let ws = api.exec_ws(id, &spec).await?;
    let (mut tx, mut rx) = ws.split();
    let raw = RawMode::enter()?;
    let mut winch = signal(SignalKind::window_change()).context("watch terminal size")?;
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let reader = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 || in_tx.send(buf[..n].to_vec()).await.is_err() {
                return;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stdin_open = true;
    let code = loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    stdout.write_all(&b[1..]).await.context("write to the terminal")?;
                    stdout.flush().await.ok();
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(ServerMsg::Exit { exit_code, .. }) => break exit_code,
                    Ok(ServerMsg::Error { message }) => {
                        drop(raw);
                        eprintln!("hutch: {}", hutch_text::escape_lines(message.as_bytes()));
                        reader.abort();
                        return Ok(125);
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 125,
                Some(Ok(_)) => {}
            },
            b = in_rx.recv(), if stdin_open => match b {
                Some(b) => {
                    if tx.send(Message::Binary(b.into())).await.is_err() {
                        break 125;
                    }
                }
                None => {
                    stdin_open = false;
                    let eof = serde_json::to_string(&ClientMsg::StdinEof).unwrap_or_default();
                    let _ = tx.send(Message::Text(eof.into())).await;
                }
            },
            _ = winch.recv() => {
                let s = size();
                let msg = serde_json::to_string(&ClientMsg::Resize { rows: s.rows, cols: s.cols }).unwrap_or_default();
                let _ = tx.send(Message::Text(msg.into())).await;
            }
        }
    };
    drop(raw);
    reader.abort();
    let _ = tx.close().await;
    Ok(code)
}
