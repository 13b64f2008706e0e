//! Byte plumbing for sandbox connections: metering against the sandbox's byte budget, idle
//! detection, replaying sniffed bytes, and splicing two streams.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Total bytes a sandbox may move through its gateway, both directions together.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// Charges `n` bytes; false once the budget is spent.
    fn charge(&self, n: u64) -> bool {
        self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n) <= self.limit
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Counters for one sandbox-side connection.
#[derive(Debug)]
pub(crate) struct Meter {
    /// Sandbox to internet.
    pub(crate) up: AtomicU64,
    /// Internet to sandbox.
    pub(crate) down: AtomicU64,
    pub(crate) budget_exhausted: AtomicBool,
    start: Instant,
    last_activity_ms: AtomicU64,
    budget: Arc<Budget>,
}

impl Meter {
    pub(crate) fn new(budget: Arc<Budget>) -> Arc<Meter> {
        Arc::new(Meter {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            budget_exhausted: AtomicBool::new(false),
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            budget,
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn charge(&self, n: usize) -> io::Result<()> {
        self.touch();
        if self.budget.charge(n as u64) {
            Ok(())
        } else {
            self.budget_exhausted.store(true, Ordering::Relaxed);
            Err(io::Error::other("sandbox byte budget exhausted"))
        }
    }

    pub(crate) fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Resolves once the connection has seen no bytes in either direction for `idle`.
    pub(crate) async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
            let quiet = self.start.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// The sandbox side of a connection, counted and charged to the sandbox's budget.
pub(crate) struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, meter: Arc<Meter>) -> Metered<S> {
        meter.touch();
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                this.meter.up.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(this.meter.charge(n))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                this.meter.down.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(this.meter.charge(n).map(|()| n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.meter.down.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(this.meter.charge(n).map(|()| n))
            }
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A stream that first yields bytes already read from it (while sniffing), then the rest.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Copies both ways until both sides close, an error, or `idle` passes without traffic.
/// `first` is written to `b` before anything else (bytes sniffed from `a`).
pub(crate) async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    first: &[u8],
    meter: &Meter,
    idle: Duration,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    b.write_all(first).await?;
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(a, b, 64 * 1024, 64 * 1024) => r.map(|_| ()),
        () = meter.idle(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Threat 16 (exhaustion): the byte budget is shared by a sandbox's connections and enforced.
    #[tokio::test]
    async fn threat16_budget_cuts_off_connection() {
        let budget = Arc::new(Budget::new(1000));
        let (a, mut b) = tokio::io::duplex(4096);
        let meter = Meter::new(budget.clone());
        let mut m = Metered::new(a, meter.clone());
        b.write_all(&[7u8; 600]).await.expect("write");
        let mut buf = [0u8; 600];
        m.read_exact(&mut buf).await.expect("within budget");
        let meter2 = Meter::new(budget.clone());
        let (a2, mut b2) = tokio::io::duplex(4096);
        let mut m2 = Metered::new(a2, meter2.clone());
        b2.write_all(&[7u8; 600]).await.expect("write");
        let err = m2.read_exact(&mut buf).await.expect_err("over budget");
        assert!(err.to_string().contains("budget"), "{err}");
        assert!(meter2.budget_exhausted.load(Ordering::Relaxed));
        assert!(budget.used() >= 1200);
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_inner() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.expect("write");
        drop(b);
        let mut p = Prefixed::new(b"hello".to_vec(), a);
        let mut s = String::new();
        p.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "hello world");
    }
}
