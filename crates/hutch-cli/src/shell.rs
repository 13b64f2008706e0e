//! `hutch shell ID` (and `hutch exec --tty`): a terminal session in a sandbox. The local terminal goes raw, so
//! every key (Ctrl-C included) reaches the guest's terminal as bytes and the guest decides what they mean;
//! SIGWINCH becomes a resize; `Enter ~ .` ends the client; the terminal is restored however the session ends.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Args;
use futures::{SinkExt, StreamExt};
use hutch_daemon::model::{ClientMsg, ServerMsg, StreamExec, TtySize};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::remote::{parse_id, Api, Conn};
use crate::term::Key;

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

fn size() -> TtySize {
    let s = crate::term::size();
    TtySize { rows: s.rows, cols: s.cols }
}

pub async fn interactive(api: &Api, id: &str, argv: Vec<String>, env: BTreeMap<String, String>, cwd: Option<String>) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!("a terminal session needs a terminal on stdin and stdout; use `hutch exec` without --tty for pipes");
    }
    let mut env = env;
    for (k, v) in crate::term::user_env() {
        env.entry(k).or_insert(v);
    }
    let spec = StreamExec { argv, env, cwd, tty: Some(size()), stdin: None };
    let ws = api.exec_ws(id, &spec).await?;
    let (mut tx, mut rx) = ws.split();
    let raw = crate::term::RawMode::enter()?;
    let mut keys = crate::term::Keyboard::start()?;
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
                        eprintln!("hutch: {}", crate::term::escape_controls(&message));
                        return Ok(125);
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 125,
                Some(Ok(_)) => {}
            },
            k = keys.next() => match k {
                Key::Input(b) => {
                    if tx.send(Message::Binary(b.into())).await.is_err() {
                        break 125;
                    }
                }
                Key::Eof => {
                    if stdin_open {
                        stdin_open = false;
                        let eof = serde_json::to_string(&ClientMsg::StdinEof).unwrap_or_default();
                        let _ = tx.send(Message::Text(eof.into())).await;
                    }
                }
                Key::Resize(s) => {
                    let msg = serde_json::to_string(&ClientMsg::Resize { rows: s.rows, cols: s.cols }).unwrap_or_default();
                    let _ = tx.send(Message::Text(msg.into())).await;
                }
                Key::Help => {
                    stdout.write_all(crate::term::ESCAPE_HELP.as_bytes()).await.ok();
                    stdout.flush().await.ok();
                }
                Key::End => {
                    drop(raw);
                    let _ = tx.close().await;
                    eprintln!("hutch: session ended with ~.");
                    return Ok(255);
                }
            },
        }
    };
    drop(raw);
    let _ = tx.close().await;
    Ok(code)
}
