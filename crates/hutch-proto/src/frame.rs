//! Length-delimited frames holding bincode-encoded messages, over any async byte stream.

use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{self, LengthDelimitedCodec};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel i/o")]
    Io(#[source] std::io::Error),
    #[error("malformed message")]
    Decode(#[source] bincode::Error),
    #[error("cannot encode message")]
    Encode(#[source] bincode::Error),
    #[error("peer closed the stream")]
    Closed,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(crate::MAX_FRAME).new_codec()
}

/// Writes one frame holding `msg`, in the same format as [`Framed`], for a stream whose remaining bytes are raw.
pub async fn write_header<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    use tokio::io::AsyncWriteExt;
    let body = bincode::serialize(msg).map_err(FrameError::Encode)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await.map_err(FrameError::Io)?;
    w.flush().await.map_err(FrameError::Io)
}

/// Reads exactly one frame (nothing after it), for a stream whose remaining bytes are raw.
pub async fn read_header<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > crate::MAX_FRAME {
        return Err(FrameError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::Io)?;
    bincode::deserialize(&body).map_err(FrameError::Decode)
}

/// A typed message stream: `send` and `recv` whole messages.
pub struct Framed<S> {
    inner: codec::Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    pub fn new(io: S) -> Self {
        Self { inner: codec::Framed::new(io, codec()) }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = bincode::serialize(msg).map_err(FrameError::Encode)?;
        SinkExt::<bytes::Bytes>::send(&mut self.inner, bytes.into()).await.map_err(FrameError::Io)
    }

    /// The next message; `Closed` at a clean end of stream.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        match self.inner.next().await {
            Some(Ok(buf)) => bincode::deserialize(&buf).map_err(FrameError::Decode),
            Some(Err(e)) => Err(FrameError::Io(e)),
            None => Err(FrameError::Closed),
        }
    }

    /// The underlying stream, for a protocol whose remaining bytes are raw. Only where the peer sends nothing
    /// before it reads an answer (bytes already buffered would be lost).
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }

    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Splits into independent send and receive halves (e.g. stdin pump vs output reader).
    pub fn split(self) -> (FramedSend<tokio::io::WriteHalf<S>>, FramedRecv<tokio::io::ReadHalf<S>>) {
        let parts = self.inner.into_parts();
        let (r, w) = tokio::io::split(parts.io);
        // Frames already buffered must be decoded before the next read: `from_parts` marks the buffer readable,
        // while a fresh reader with a pre-filled buffer would wait for new bytes first (and hang if none come).
        let mut read_parts = codec::FramedParts::new::<bytes::Bytes>(r, codec());
        read_parts.read_buf = parts.read_buf;
        (FramedSend { inner: codec::FramedWrite::new(w, codec()) }, FramedRecv { inner: codec::Framed::from_parts(read_parts) })
    }
}

pub struct FramedSend<W> {
    inner: codec::FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> FramedSend<W> {
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = bincode::serialize(msg).map_err(FrameError::Encode)?;
        SinkExt::<bytes::Bytes>::send(&mut self.inner, bytes.into()).await.map_err(FrameError::Io)
    }

    pub async fn close(&mut self) -> Result<(), FrameError> {
        SinkExt::<bytes::Bytes>::close(&mut self.inner).await.map_err(FrameError::Io)
    }
}

pub struct FramedRecv<R> {
    inner: codec::Framed<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> FramedRecv<R> {
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        match self.inner.next().await {
            Some(Ok(buf)) => bincode::deserialize(&buf).map_err(FrameError::Decode),
            Some(Err(e)) => Err(FrameError::Io(e)),
            None => Err(FrameError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_buffered_before_a_split_are_delivered_without_new_bytes() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut sender = Framed::new(a);
        // Three frames in one burst: the first `recv` buffers all of them.
        for i in 0..3u32 {
            sender.send(&i).await.unwrap();
        }
        let mut receiver = Framed::new(b);
        assert_eq!(receiver.recv::<u32>().await.unwrap(), 0);
        let (_tx, mut rx) = receiver.split();
        let next = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv::<u32>()).await;
        assert_eq!(next.expect("buffered frame not delivered").unwrap(), 1);
        assert_eq!(rx.recv::<u32>().await.unwrap(), 2);
        drop(sender);
    }
}
