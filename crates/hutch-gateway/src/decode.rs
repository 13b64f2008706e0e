//! Decoding compressed response bodies (gzip, deflate, br, zstd) on connections whose responses
//! are masked, so the mask reads what the client would read. Decoding is bounded: output is
//! read in small pieces and counted, and a body that decodes past the cap is refused as a
//! decompression bomb instead of being inflated further.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, ReadBuf};

use crate::http::BoxError;

/// Decoded bytes read at a time: what one poll can add to memory.
const PIECE: usize = 16 << 10;

/// Most codings stacked in one `Content-Encoding` that are undone.
const MAX_LAYERS: usize = 2;

/// A content coding the gateway can undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    /// RFC 9110's `deflate`: the zlib format.
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// The codings a response's `Content-Encoding` lists, in the order they were applied
/// (`identity` skipped). An error names a coding the gateway cannot undo.
pub(crate) fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, String> {
    let mut out = Vec::new();
    for v in headers.get_all(header::CONTENT_ENCODING) {
        let v = String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
        for token in v.split(',').map(str::trim) {
            let c = match token {
                "" | "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                "br" => Coding::Brotli,
                "zstd" => Coding::Zstd,
                other => {
                    return Err(format!(
                        "Content-Encoding {} (the gateway decodes only gzip, deflate, br and zstd)",
                        crate::audit::sanitize(other)
                    ))
                }
            };
            out.push(c);
        }
    }
    if out.len() > MAX_LAYERS {
        return Err(format!(
            "Content-Encoding stacks {} codings (at most {MAX_LAYERS} are decoded)",
            out.len()
        ));
    }
    Ok(out)
}

/// How the codings are shown in the audit log: `gzip`, `gzip+br`.
pub(crate) fn label(codings: &[Coding]) -> String {
    codings
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("decompression bomb refused: the {coding} body decodes to more than {cap} bytes")]
    Bomb { coding: String, cap: u64 },
    #[error("cannot decode the {coding} body: {message}")]
    Corrupt { coding: String, message: String },
}

/// A response body read as a byte stream (trailers are dropped: a decoded body has none).
struct BodyReader<B> {
    body: B,
    chunk: Bytes,
    done: bool,
}

impl<B> AsyncRead for BodyReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let data = match self.as_mut().poll_fill_buf(cx) {
            Poll::Ready(Ok(d)) => d,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<B> AsyncBufRead for BodyReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.chunk.is_empty() && !this.done {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(io::Error::other(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(d) = frame.into_data() {
                        this.chunk = d;
                    }
                }
            }
        }
        Poll::Ready(Ok(&this.chunk[..]))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        self.chunk.advance(amt);
    }
}

type Reader = Pin<Box<dyn AsyncRead + Send>>;

/// A compressed body being decoded, with a cap on what it may decode to.
pub(crate) struct Decoder {
    /// In a mutex only so the body is `Sync` (it is only ever used through `&mut`).
    reader: std::sync::Mutex<Reader>,
    produced: u64,
    cap: u64,
    coding: String,
    /// Decoded bytes read ahead by [`Decoder::read_prefix`], handed out first by the body.
    first: Option<Bytes>,
    buf: Vec<u8>,
    done: bool,
}

impl Decoder {
    /// Undoes `codings` (in the order they were applied) over `body`.
    pub(crate) fn new<B>(body: B, codings: &[Coding], cap: u64) -> Decoder
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let body = BodyReader {
            body,
            chunk: Bytes::new(),
            done: false,
        };
        let mut reader: Reader = Box::pin(body);
        for c in codings.iter().rev() {
            // Each layer reads the one before it (the innermost reads the body).
            let src: Pin<Box<dyn AsyncBufRead + Send>> =
                Box::pin(tokio::io::BufReader::with_capacity(PIECE, reader));
            reader = match c {
                Coding::Gzip => {
                    let mut d = GzipDecoder::new(src);
                    d.multiple_members(true);
                    Box::pin(d)
                }
                Coding::Deflate => Box::pin(ZlibDecoder::new(src)),
                Coding::Brotli => Box::pin(BrotliDecoder::new(src)),
                Coding::Zstd => Box::pin(ZstdDecoder::new(src)),
            };
        }
        Decoder {
            reader: std::sync::Mutex::new(reader),
            produced: 0,
            cap,
            coding: label(codings),
            first: None,
            buf: vec![0u8; PIECE],
            done: false,
        }
    }

    fn corrupt(&self, e: io::Error) -> DecodeError {
        DecodeError::Corrupt {
            coding: self.coding.clone(),
            message: e.to_string(),
        }
    }

    fn count(&mut self, n: usize) -> Result<(), DecodeError> {
        self.produced += n as u64;
        if self.produced > self.cap {
            return Err(DecodeError::Bomb {
                coding: self.coding.clone(),
                cap: self.cap,
            });
        }
        Ok(())
    }

    /// Decodes until the end or until more than `limit` bytes came out. Returns what came out
    /// and whether that is all of it; when it is not, the body goes on from there.
    pub(crate) async fn read_prefix(&mut self, limit: usize) -> Result<(Bytes, bool), DecodeError> {
        let mut out = Vec::new();
        loop {
            let reader = self.reader.get_mut().unwrap_or_else(|p| p.into_inner());
            let n = match reader.read(&mut self.buf).await {
                Ok(n) => n,
                Err(e) => return Err(self.corrupt(e)),
            };
            if n == 0 {
                self.done = true;
                return Ok((Bytes::from(out), true));
            }
            self.count(n)?;
            out.extend_from_slice(&self.buf[..n]);
            if out.len() > limit {
                let out = Bytes::from(out);
                self.first = Some(out.clone());
                return Ok((out, false));
            }
        }
    }

    /// The rest of the decoded body, starting with what [`Decoder::read_prefix`] read.
    pub(crate) fn into_body(self) -> DecodedBody {
        DecodedBody { dec: self }
    }
}

/// A decoded body, streamed; fails with [`DecodeError::Bomb`] past the cap.
pub(crate) struct DecodedBody {
    dec: Decoder,
}

impl Body for DecodedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let dec = &mut self.dec;
        if let Some(first) = dec.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if dec.done {
            return Poll::Ready(None);
        }
        let reader = dec.reader.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut rb = ReadBuf::new(&mut dec.buf);
        match reader.as_mut().poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                dec.done = true;
                Poll::Ready(Some(Err(Box::new(dec.corrupt(e)))))
            }
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    dec.done = true;
                    return Poll::Ready(None);
                }
                let data = Bytes::copy_from_slice(rb.filled());
                if let Err(e) = dec.count(n) {
                    dec.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.dec.done && self.dec.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncWriteExt;

    async fn encode(c: Coding, data: &[u8]) -> Vec<u8> {
        use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZlibEncoder, ZstdEncoder};
        let mut out = Vec::new();
        match c {
            Coding::Gzip => {
                let mut e = GzipEncoder::new(&mut out);
                e.write_all(data).await.expect("write");
                e.shutdown().await.expect("finish");
            }
            Coding::Deflate => {
                let mut e = ZlibEncoder::new(&mut out);
                e.write_all(data).await.expect("write");
                e.shutdown().await.expect("finish");
            }
            Coding::Brotli => {
                let mut e = BrotliEncoder::new(&mut out);
                e.write_all(data).await.expect("write");
                e.shutdown().await.expect("finish");
            }
            Coding::Zstd => {
                let mut e = ZstdEncoder::new(&mut out);
                e.write_all(data).await.expect("write");
                e.shutdown().await.expect("finish");
            }
        }
        out
    }

    #[tokio::test]
    async fn each_coding_round_trips_and_stacks() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd] {
            let z = encode(c, &data).await;
            let mut d = Decoder::new(Full::new(Bytes::from(z)), &[c], 1 << 30);
            let (got, done) = d.read_prefix(usize::MAX).await.expect("decode");
            assert!(done, "{c:?}");
            assert_eq!(got.as_ref(), &data[..], "{c:?}");
        }
        // gzip then br: br is undone first.
        let z = encode(Coding::Brotli, &encode(Coding::Gzip, &data).await).await;
        let d = Decoder::new(Full::new(Bytes::from(z)), &[Coding::Gzip, Coding::Brotli], 1 << 30);
        let got = d.into_body().collect().await.expect("stream").to_bytes();
        assert_eq!(got.as_ref(), &data[..]);
    }

    #[tokio::test]
    async fn a_bomb_stops_at_the_cap() {
        let zeros = vec![0u8; 8 << 20];
        for c in [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd] {
            let z = encode(c, &zeros).await;
            let mut d = Decoder::new(Full::new(Bytes::from(z.clone())), &[c], 1 << 20);
            match d.read_prefix(usize::MAX).await {
                Err(DecodeError::Bomb { cap, .. }) => assert_eq!(cap, 1 << 20),
                other => panic!("{c:?}: {other:?}"),
            }
            // Streaming: fails, having handed out at most the cap plus one piece.
            let mut body = Decoder::new(Full::new(Bytes::from(z)), &[c], 1 << 20).into_body();
            let mut total = 0usize;
            let mut failed = false;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => total += f.data_ref().map_or(0, |d| d.len()),
                    Err(e) => {
                        assert!(e.to_string().contains("decompression bomb"), "{e}");
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed && total <= (1 << 20) + PIECE, "{c:?}: {total}");
        }
    }

    #[test]
    fn unknown_and_deep_codings_are_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, "gzip, identity".parse().expect("v"));
        assert_eq!(codings(&h), Ok(vec![Coding::Gzip]));
        h.insert(header::CONTENT_ENCODING, "compress".parse().expect("v"));
        assert!(codings(&h).is_err_and(|e| e.contains("compress")));
        h.insert(header::CONTENT_ENCODING, "gzip, br, zstd".parse().expect("v"));
        assert!(codings(&h).is_err());
    }

    #[tokio::test]
    async fn corrupt_input_is_an_error() {
        let mut d = Decoder::new(Full::new(Bytes::from_static(b"not gzip at all")), &[Coding::Gzip], 1 << 20);
        assert!(matches!(d.read_prefix(1024).await, Err(DecodeError::Corrupt { .. })));
    }
}
