//! Multiplexing over the one channel: a yamux connection driven by its own task, with a cheap handle that opens
//! streams and a queue of streams the peer opened.

use std::future::poll_fn;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// One multiplexed, bidirectional byte stream.
pub type Stream = Compat<yamux::Stream>;

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("the channel to the guest is closed")]
    Closed,
    #[error("multiplexer")]
    Yamux(#[source] yamux::ConnectionError),
}

#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// The host: opens streams with odd ids.
    Client,
    /// The guest agent.
    Server,
}

type OpenReply = oneshot::Sender<Result<Stream, MuxError>>;

/// Handle to a running session; clone freely. The session ends when the underlying channel does.
#[derive(Clone)]
pub struct Session {
    open_tx: mpsc::Sender<OpenReply>,
}

/// Most streams the peer may have queued before we accept them; beyond this they are refused.
const INBOUND_QUEUE: usize = 64;

impl Session {
    /// Starts driving `io`; returns the handle, the streams the peer opens, and the driver task (which ends with
    /// the channel).
    pub fn start<S>(io: S, role: Role) -> (Session, mpsc::Receiver<Stream>, tokio::task::JoinHandle<Result<(), MuxError>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut cfg = yamux::Config::default();
        cfg.set_max_num_streams(1024);
        // Fewer, larger frames: every write on the virtio port is a costly exit under emulation.
        cfg.set_split_send_size(128 * 1024);
        let mode = match role {
            Role::Client => yamux::Mode::Client,
            Role::Server => yamux::Mode::Server,
        };
        let conn = yamux::Connection::new(io.compat(), cfg, mode);
        let (open_tx, open_rx) = mpsc::channel(16);
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
        let task = tokio::spawn(drive(conn, open_rx, in_tx));
        (Session { open_tx }, in_rx, task)
    }

    /// Opens a new stream to the peer.
    pub async fn open(&self) -> Result<Stream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| MuxError::Closed)?;
        rx.await.map_err(|_| MuxError::Closed)?
    }
}

async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    in_tx: mpsc::Sender<Stream>,
) -> Result<(), MuxError>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending: Option<OpenReply> = None;
    let mut handles_open = true;
    poll_fn(|cx| loop {
        if pending.is_none() && handles_open {
            match open_rx.poll_recv(cx) {
                Poll::Ready(Some(reply)) => pending = Some(reply),
                Poll::Ready(None) => handles_open = false,
                Poll::Pending => {}
            }
        }
        if pending.is_some() {
            if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                if let Some(reply) = pending.take() {
                    let _ = reply.send(r.map(|s| s.compat()).map_err(MuxError::Yamux));
                }
                continue;
            }
        }
        match conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) => {
                // A full queue means nobody accepts; dropping the stream resets it for the peer.
                let _ = in_tx.try_send(stream.compat());
                continue;
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(MuxError::Yamux(e))),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn streams_both_ways_and_large_transfer() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, _cin, _ct) = Session::start(a, Role::Client);
        let (server, mut sin, _st) = Session::start(b, Role::Server);
        let echo = tokio::spawn(async move {
            let mut s = sin.recv().await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            s.shutdown().await.unwrap();
            buf.len()
        });
        let mut s = client.open().await.unwrap();
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut s);
        let writer = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let reader = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(writer, reader);
        n.unwrap();
        assert_eq!(echo.await.unwrap(), data.len());
        assert!(back == data, "echoed bytes differ");
        // The server may open streams too (network tunnels use this).
        drop(server);
    }
}
