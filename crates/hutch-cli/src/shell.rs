//! `hutch shell ID` (and `hutch exec --tty`), `hutch attach ID`: a terminal session in a sandbox. The local
//! terminal goes raw, so every key (Ctrl-C included) reaches the guest's terminal as bytes and the guest decides
//! what they mean; SIGWINCH becomes a resize; `Enter ~ .` ends the client (and, for `attach`, only the client:
//! the daemon keeps the session); the terminal is restored however the session ends.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Args;
use futures::{SinkExt, StreamExt};
use hutch_daemon::model::{ClientMsg, ServerMsg, StreamExec, TtySize};
use hutch_daemon::terminal::TerminalAttach;
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

/// `hutch attach ID [-- CMD]`: the sandbox's terminal session, which outlives this client.
#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_id)]
    pub id: String,
    /// Start CMD in the background and return at once (needs CMD); `hutch attach ID` joins it later.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Environment variable for CMD (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = crate::remote::parse_kv)]
    pub env: Vec<(String, String)>,
    /// Working directory for CMD in the VM.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Start this command on a new terminal session; without it, join the running one.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub async fn attach(a: AttachArgs) -> anyhow::Result<i32> {
    if a.detach && a.command.is_empty() {
        bail!("--detach starts a command in the background: give it after --, e.g. `hutch attach --detach ID -- claude`");
    }
    if !a.detach {
        need_terminal()?;
    }
    let api = Api::new(&a.conn)?;
    let start = (!a.command.is_empty()).then(|| {
        let mut env: BTreeMap<String, String> = a.env.into_iter().collect();
        for (k, v) in crate::term::user_env() {
            env.entry(k).or_insert(v);
        }
        StreamExec { argv: a.command, env, cwd: a.workdir, tty: None, stdin: None }
    });
    let first = TerminalAttach { start, size: size(), detach: a.detach };
    let mut ws = api.ws(&format!("/v1/sandboxes/{}/terminal/ws", a.id), &first).await?;
    if a.detach {
        return match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(ServerMsg::Started { .. }) => {
                    eprintln!("hutch: started in sandbox {id}; `hutch attach {id}` joins it", id = a.id);
                    Ok(0)
                }
                Ok(ServerMsg::Error { message }) => bail!("{}", hutch_text::escape_lines(message.as_bytes())),
                _ => bail!("the daemon answered something unexpected"),
            },
            _ => bail!("the daemon closed the session without an answer"),
        };
    }
    drive(ws, Escape::Detach(&a.id)).await
}

fn need_terminal() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!("a terminal session needs a terminal on stdin and stdout; use `hutch exec` without --tty for pipes");
    }
    Ok(())
}

pub async fn interactive(api: &Api, id: &str, argv: Vec<String>, env: BTreeMap<String, String>, cwd: Option<String>) -> anyhow::Result<i32> {
    need_terminal()?;
    let mut env = env;
    for (k, v) in crate::term::user_env() {
        env.entry(k).or_insert(v);
    }
    let spec = StreamExec { argv, env, cwd, tty: Some(size()), stdin: None };
    let ws = api.exec_ws(id, &spec).await?;
    drive(ws, Escape::End).await
}

/// What `Enter ~ .` means.
enum Escape<'a> {
    /// End the session (an exec's command dies with its stream).
    End,
    /// Leave a session that goes on without this client.
    Detach(&'a str),
}

use crate::remote::Ws;

/// The terminal raw, keys and resizes to the daemon, output to the terminal, until the command exits, the
/// daemon goes away or the user types the escape.
async fn drive(ws: Ws, escape: Escape<'_>) -> anyhow::Result<i32> {
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
                        eprintln!("\nhutch: {}", hutch_text::escape_lines(message.as_bytes()));
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
                    return Ok(match escape {
                        Escape::End => {
                            eprintln!("\nhutch: session ended with ~.");
                            255
                        }
                        Escape::Detach(id) => {
                            eprintln!("\nhutch: detached; the session goes on (`hutch attach {id}` joins it again)");
                            0
                        }
                    });
                }
            },
        }
    };
    drop(raw);
    let _ = tx.close().await;
    Ok(code)
}
