//! The version handshake that precedes multiplexing. It reads exactly its own bytes, never more, so that the
//! yamux session that follows starts on a clean boundary.
//!
//! Cold boot: the guest announces [`Ready`] once it has opened its port; the host answers [`Hello`]; the guest
//! answers [`HelloAck`]. Snapshot restore: the guest was snapshotted waiting for a `Hello` (its `Ready` went to
//! the host that made the snapshot), so the restoring host sends `Hello` at once.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Marks the start of every handshake frame so that either end can skip stale bytes.
pub const MAGIC: [u8; 8] = *b"HUTCH\x00P1";
const MAX_HANDSHAKE_FRAME: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub protocol: u32,
    pub agent_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    /// Echoed in the ack so that a stale ack is never mistaken for a fresh one.
    pub session: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloAck {
    pub protocol: u32,
    pub session: u64,
    pub agent_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HandshakeMsg {
    Ready(Ready),
    Hello(Hello),
    HelloAck(HelloAck),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("channel i/o during handshake")]
    Io(#[source] std::io::Error),
    #[error("peer closed the channel during the handshake")]
    Closed,
    #[error("malformed handshake frame")]
    Decode(#[source] bincode::Error),
    #[error("handshake frame of {0} bytes is too large")]
    TooLarge(usize),
    #[error("protocol version mismatch: host speaks {host}, guest agent speaks {guest}; rebuild the image (`hutch image build`)")]
    Version { host: u32, guest: u32 },
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &HandshakeMsg) -> Result<(), HandshakeError> {
    let body = bincode::serialize(msg).map_err(HandshakeError::Decode)?;
    let mut buf = Vec::with_capacity(12 + body.len());
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await.map_err(HandshakeError::Io)?;
    w.flush().await.map_err(HandshakeError::Io)
}

/// Reads the next handshake message, skipping any bytes before the magic. Reads byte by byte up to the magic
/// and then exactly the frame, so nothing after it is consumed.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<HandshakeMsg, HandshakeError> {
    read_frame(r).await
}

async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, HandshakeError> {
    let mut matched = 0;
    while matched < MAGIC.len() {
        let mut b = [0u8; 1];
        let n = r.read(&mut b).await.map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        if b[0] == MAGIC[matched] {
            matched += 1;
        } else {
            matched = usize::from(b[0] == MAGIC[0]);
        }
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(eof_as_closed)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HANDSHAKE_FRAME {
        return Err(HandshakeError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(eof_as_closed)?;
    bincode::deserialize(&body).map_err(HandshakeError::Decode)
}

fn eof_as_closed(e: std::io::Error) -> HandshakeError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HandshakeError::Closed
    } else {
        HandshakeError::Io(e)
    }
}

/// Host side. `wait_ready` is true on a cold boot (wait for the guest's `Ready` before speaking), false after a
/// snapshot restore (the guest already waits for `Hello`).
pub async fn host_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    session: u64,
    wait_ready: bool,
) -> Result<HelloAck, HandshakeError> {
    if wait_ready {
        loop {
            match read_msg(io).await? {
                HandshakeMsg::Ready(r) if r.protocol != crate::PROTOCOL_VERSION => {
                    return Err(HandshakeError::Version { host: crate::PROTOCOL_VERSION, guest: r.protocol })
                }
                HandshakeMsg::Ready(_) => break,
                _ => continue,
            }
        }
    }
    write_msg(io, &HandshakeMsg::Hello(Hello { protocol: crate::PROTOCOL_VERSION, session })).await?;
    loop {
        match read_msg(io).await? {
            HandshakeMsg::HelloAck(ack) if ack.session == session => {
                if ack.protocol != crate::PROTOCOL_VERSION {
                    return Err(HandshakeError::Version { host: crate::PROTOCOL_VERSION, guest: ack.protocol });
                }
                return Ok(ack);
            }
            // A `Ready` from a guest that came up after our `Hello` was sent, or a stale ack.
            _ => continue,
        }
    }
}

/// Guest side, after `Ready` was sent (or after a restore): wait for a `Hello`, answer it.
pub async fn guest_accept<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, agent_version: &str) -> Result<Hello, HandshakeError> {
    loop {
        if let HandshakeMsg::Hello(h) = read_msg(io).await? {
            let ack = HelloAck { protocol: crate::PROTOCOL_VERSION, session: h.session, agent_version: agent_version.into() };
            write_msg(io, &HandshakeMsg::HelloAck(ack)).await?;
            if h.protocol != crate::PROTOCOL_VERSION {
                return Err(HandshakeError::Version { host: h.protocol, guest: crate::PROTOCOL_VERSION });
            }
            return Ok(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cold_handshake_then_bytes_follow_untouched() {
        let (mut host, mut guest) = tokio::io::duplex(4096);
        let g = tokio::spawn(async move {
            // Garbage before the magic must be skipped.
            guest.write_all(b"noise\x00HUT").await.unwrap();
            write_msg(&mut guest, &HandshakeMsg::Ready(Ready { protocol: crate::PROTOCOL_VERSION, agent_version: "t".into() })).await.unwrap();
            let h = guest_accept(&mut guest, "t").await.unwrap();
            let mut rest = [0u8; 5];
            guest.read_exact(&mut rest).await.unwrap();
            (h, rest)
        });
        let ack = host_handshake(&mut host, 42, true).await.unwrap();
        assert_eq!(ack.session, 42);
        host.write_all(b"yamux").await.unwrap();
        let (h, rest) = g.await.unwrap();
        assert_eq!(h.session, 42);
        assert_eq!(&rest, b"yamux");
    }

    #[tokio::test]
    async fn version_mismatch_is_reported() {
        let (mut host, mut guest) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            write_msg(&mut guest, &HandshakeMsg::Ready(Ready { protocol: 999, agent_version: "t".into() })).await.unwrap();
        });
        let err = host_handshake(&mut host, 1, true).await.unwrap_err();
        assert!(matches!(err, HandshakeError::Version { guest: 999, .. }), "{err}");
    }
}
