//! One session with a host: handshake, then each stream the host opens is dispatched to its handler.

use std::sync::{Arc, Mutex};

use hutch_proto::mux::{Role, Stream};
use hutch_proto::{handshake, Framed, HandshakeError, Reply, Request, Session};
use tokio::io::{AsyncRead, AsyncWrite};

/// What the agent keeps between requests of a session (and across sessions: a restored VM keeps it too, and the
/// host's `Init` replaces it).
#[derive(Default, Clone)]
pub struct State {
    pub env: Arc<Mutex<Vec<(String, String)>>>,
    /// The attached host session, for connections the guest starts (egress).
    pub session: crate::net::SessionSlot,
    /// Set by the identity: end the agent (and so the VM) when the host session ends.
    pub exit_on_disconnect: Arc<std::sync::atomic::AtomicBool>,
    /// Per session: set by `Suspend`, so that this session's processes outlive it (the host comes back).
    pub keep: Arc<std::sync::atomic::AtomicBool>,
    /// Per session: ends it from a handler (`Suspend`).
    pub end: Arc<tokio::sync::Notify>,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The channel closed or broke: the session's processes were killed.
    HostGone,
    /// The host asked for it (`Suspend`): the processes run on and the agent waits for the next host.
    Suspended,
}

impl State {
    pub fn base_env(&self) -> Vec<(String, String)> {
        match self.env.lock() {
            Ok(env) => env.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("handshake")]
    Handshake(#[source] HandshakeError),
}

/// Serves until the host goes away. `announce` sends `Ready` first (cold boot, after a suspend); a restored guest
/// does not.
pub async fn session<S>(mut io: S, state: &State, announce: bool) -> Result<Ended, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if announce {
        let ready = handshake::Ready { protocol: hutch_proto::PROTOCOL_VERSION, agent_version: crate::AGENT_VERSION.into() };
        handshake::write_msg(&mut io, &handshake::HandshakeMsg::Ready(ready)).await.map_err(ServeError::Handshake)?;
    }
    handshake::guest_accept(&mut io, crate::AGENT_VERSION).await.map_err(ServeError::Handshake)?;
    let (session, mut inbound, driver) = Session::start(io, Role::Server);
    set_session(state, Some(session));
    let mut this = state.clone();
    this.keep = Default::default();
    this.end = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = inbound.recv() => match s {
                Some(stream) => {
                    tasks.spawn(handle(stream, this.clone()));
                }
                None => break,
            },
            _ = this.end.notified() => break,
        }
    }
    if this.keep.load(std::sync::atomic::Ordering::SeqCst) {
        // Suspended: the processes go on (their exec handlers see the channel gone and keep draining output);
        // the multiplexer stops here so that the next bytes on the port are the next host's handshake.
        tasks.detach_all();
        driver.abort();
        let _ = driver.await;
        set_session(state, None);
        return Ok(Ended::Suspended);
    }
    // The channel is gone: whatever the old host started dies with it (exec handlers kill their process groups).
    tasks.shutdown().await;
    set_session(state, None);
    let _ = driver.await;
    Ok(Ended::HostGone)
}

fn set_session(state: &State, s: Option<Session>) {
    match state.session.lock() {
        Ok(mut slot) => *slot = s,
        Err(p) => *p.into_inner() = s,
    }
}

async fn handle(stream: Stream, state: State) {
    let mut framed = Framed::new(stream);
    let req: Request = match framed.recv().await {
        Ok(r) => r,
        Err(_) => return,
    };
    match req {
        Request::Init(id) => {
            let r = crate::identity::apply(&id, &state);
            let _ = framed.send(&Reply::from_result(r)).await;
        }
        Request::Exec(req) => crate::exec::run(framed, req, state.base_env(), state.keep.clone()).await,
        Request::PutFile(put) => crate::files::put(framed, put).await,
        Request::PutArchive(put) => crate::files::put_archive(framed, put).await,
        Request::MountWorkspace(m) => {
            let r = tokio::task::spawn_blocking(move || crate::workspace::mount_workspace(&m))
                .await
                .unwrap_or_else(|e| Err(format!("mounting the workspace failed: {e}")));
            let _ = framed.send(&Reply::from_result(r)).await;
        }
        Request::WorkspaceUntouched => {
            let _ = framed.send(&Reply::from_result(crate::workspace::untouched())).await;
        }
        Request::GetFile { path } => crate::files::get(framed, &path).await,
        Request::Ping => {
            let _ = framed.send(&Reply::Ok).await;
        }
        Request::Respawn => {
            crate::identity::forget_ca();
            nix::unistd::sync();
            let _ = framed.send(&Reply::Ok).await;
            // Let the reply leave before the port closes with this process.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            std::process::exit(crate::init::RESPAWN_CODE);
        }
        Request::Suspend => {
            state.keep.store(true, std::sync::atomic::Ordering::SeqCst);
            nix::unistd::sync();
            let _ = framed.send(&Reply::Ok).await;
            // Let the reply leave before the multiplexer stops.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            state.end.notify_one();
        }
        Request::Connect { port } => {
            let tcp = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(t) => Ok(t),
                Err(_) => tokio::net::TcpStream::connect(("::1", port)).await,
            };
            match tcp {
                Ok(mut tcp) => {
                    if framed.send(&Reply::Ok).await.is_err() {
                        return;
                    }
                    let mut s = framed.into_inner();
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut tcp).await;
                }
                Err(e) => {
                    let _ = framed.send(&Reply::Err(format!("nothing accepts connections on port {port} in the sandbox ({e})"))).await;
                }
            }
        }
        Request::PowerOff => {
            nix::unistd::sync();
            let _ = framed.send(&Reply::Ok).await;
            // The init process powers the VM off when the agent exits.
            std::process::exit(0);
        }
    }
}
