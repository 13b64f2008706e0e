//! Response bodies: whole buffers, and a generated stream of N bytes for throughput tests that
//! costs no memory per byte.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

pub(crate) type RespBody = BoxBody<Bytes, std::io::Error>;

pub(crate) fn full(data: impl Into<Bytes>) -> RespBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

const CHUNK: usize = 64 << 10;

/// `len` bytes of a fixed pattern, in 64 KiB frames.
pub(crate) struct Repeat {
    left: u64,
    chunk: Bytes,
}

impl Repeat {
    pub(crate) fn new(len: u64) -> Repeat {
        let pattern: Vec<u8> = (0..CHUNK).map(|i| b'a' + (i % 26) as u8).collect();
        Repeat {
            left: len,
            chunk: Bytes::from(pattern),
        }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn repeat_yields_exactly_len_bytes() {
        for len in [0u64, 1, CHUNK as u64, CHUNK as u64 + 7, 3 * CHUNK as u64] {
            let got = Repeat::new(len)
                .collect()
                .await
                .expect("collect")
                .to_bytes();
            assert_eq!(got.len() as u64, len);
            assert!(got
                .iter()
                .enumerate()
                .all(|(i, b)| *b == b'a' + ((i % CHUNK) % 26) as u8));
        }
    }
}
