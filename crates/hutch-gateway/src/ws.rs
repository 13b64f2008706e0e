//! WebSocket connections carried through inspection. The upgrade request is checked, swapped and
//! audited like any request (see `forward`); once both sides switched, bytes are relayed both
//! ways through fixed-size buffers. While the run holds secret values, frames from the upstream
//! are parsed and their payloads masked as one stream per message (same-length stand-ins, so
//! frame lengths stay true; a value split across the fragments of a message is found), and the
//! upstream may not use extensions (no compression: RSV bits refused) or masked frames. Frames
//! from the sandbox are relayed as they are: nothing is swapped into them (a secret goes only into
//! the upgrade request's bound header) and placeholders inside them are not flagged.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::audit::AuditRecord;
use crate::mask::{Encoding, Masker};
use crate::Inner;

/// Bytes read at a time in each direction.
const CHUNK: usize = 16 << 10;

/// A switched connection waiting for both sides to hand over their streams.
pub(crate) struct PendingUpgrade {
    pub(crate) vm: OnUpgrade,
    pub(crate) up: OnUpgrade,
    /// Present while the run holds values: frames toward the sandbox are masked.
    pub(crate) masker: Option<Masker>,
    /// The upgrade request's audit line, reused for the line that ends the WebSocket.
    pub(crate) rec: AuditRecord,
}

/// Relays until both sides closed (or one failed); writes one audit line at the end.
pub(crate) async fn relay(inner: &Inner, p: PendingUpgrade) -> Result<(), String> {
    let mut rec = p.rec;
    rec.status = None;
    rec.flags.retain(|f| f == "websocket");
    rec.flags.push("websocket_closed".into());
    let found: Arc<std::sync::Mutex<BTreeSet<String>>> = Arc::default();
    let mut up_n = 0u64;
    let mut down_n = 0u64;
    let result = async {
        let vm = p
            .vm
            .await
            .map_err(|e| format!("WebSocket switch with the sandbox failed: {e}"))?;
        let up = p
            .up
            .await
            .map_err(|e| format!("WebSocket switch with the upstream failed: {e}"))?;
        let (mut vr, mut vw) = tokio::io::split(TokioIo::new(vm));
        let (mut ur, mut uw) = tokio::io::split(TokioIo::new(up));
        let to_up = async {
            copy(&mut vr, &mut uw, &mut up_n).await?;
            let _ = uw.shutdown().await;
            Ok::<(), String>(())
        };
        let to_vm = async {
            match p.masker {
                Some(m) => copy_masked(&mut ur, &mut vw, FrameMasker::new(m), &mut down_n, &found).await?,
                None => copy(&mut ur, &mut vw, &mut down_n).await?,
            }
            let _ = vw.shutdown().await;
            Ok::<(), String>(())
        };
        tokio::try_join!(to_up, to_vm).map(|_| ())
    }
    .await;
    rec.bytes_up = up_n;
    rec.bytes_down = down_n;
    rec.flags
        .extend(found.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
    if let Err(e) = &result {
        rec.reason = Some(e.clone());
    }
    inner.auditor.emit(&rec);
    result
}

async fn copy<R, W>(r: &mut R, w: &mut W, count: &mut u64) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        *count += n as u64;
    }
}

async fn copy_masked<R, W>(
    r: &mut R,
    w: &mut W,
    mut fm: FrameMasker,
    count: &mut u64,
    found: &std::sync::Mutex<BTreeSet<String>>,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    loop {
        let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            fm.finish(&mut out);
        } else {
            fm.push(&buf[..n], &mut out)?;
        }
        {
            let mut f = found.lock().unwrap_or_else(|p| p.into_inner());
            for (name, enc) in fm.found.drain(..) {
                f.insert(format!("masked_in_websocket:{name}:{}", enc.as_str()));
            }
        }
        if !out.is_empty() {
            w.write_all(&out).await.map_err(|e| e.to_string())?;
            *count += out.len() as u64;
            out.clear();
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Masks the payloads of server-to-client WebSocket frames in a byte stream. The payloads of one
/// message's fragments are searched as one text; headers go out unchanged, each just before its
/// payload. At most `max_len - 1` payload bytes are held back, and none once a message is
/// complete. A control frame (ping, pong, close) is searched on its own and sends what was held
/// first, so a value split by a control frame between two fragments is not found.
pub(crate) struct FrameMasker {
    masker: Masker,
    keep: usize,
    /// Header bytes of the frame being read.
    hdr: Vec<u8>,
    in_frame: bool,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// The current frame completes a message (FIN, or a control frame).
    ends_message: bool,
    /// Payload bytes not yet written; `emitted` is the stream position of the first.
    payload: Vec<u8>,
    emitted: u64,
    /// Frame headers waiting for the payload before them to be written, by stream position.
    headers: VecDeque<(u64, Vec<u8>)>,
    pub(crate) found: Vec<(String, Encoding)>,
}

impl FrameMasker {
    pub(crate) fn new(masker: Masker) -> FrameMasker {
        FrameMasker {
            keep: masker.max_len().saturating_sub(1),
            masker,
            hdr: Vec::with_capacity(14),
            in_frame: false,
            left: 0,
            ends_message: false,
            payload: Vec::new(),
            emitted: 0,
            headers: VecDeque::new(),
            found: Vec::new(),
        }
    }

    /// Takes the next bytes from the upstream; appends what may go to the sandbox to `out`.
    pub(crate) fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !data.is_empty() {
            if !self.in_frame {
                self.hdr.push(data[0]);
                data = &data[1..];
                if let Some((len, ends_message)) = parse_header(&self.hdr)? {
                    let pos = self.emitted + self.payload.len() as u64;
                    self.headers.push_back((pos, std::mem::take(&mut self.hdr)));
                    self.in_frame = true;
                    self.left = len;
                    self.ends_message = ends_message;
                    if len == 0 {
                        self.end_frame(out);
                    }
                }
                continue;
            }
            let n = usize::try_from(self.left).unwrap_or(usize::MAX).min(data.len());
            self.payload.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.left -= n as u64;
            if self.left == 0 {
                self.end_frame(out);
            }
        }
        self.drain(false, out);
        Ok(())
    }

    /// The upstream closed: everything held goes out (an unfinished header as it is).
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        self.drain(true, out);
        out.append(&mut self.hdr);
    }

    fn end_frame(&mut self, out: &mut Vec<u8>) {
        self.in_frame = false;
        if self.ends_message {
            self.drain(true, out);
        }
    }

    /// Masks and writes the payload that can no longer start a value (all of it at a message's
    /// end), with the headers that belong before it.
    fn drain(&mut self, at_end: bool, out: &mut Vec<u8>) {
        let safe_end = if at_end {
            self.payload.len()
        } else {
            self.payload.len().saturating_sub(self.keep)
        };
        let mut masked = Vec::with_capacity(safe_end);
        let mut i = 0;
        while i < safe_end {
            match self.masker.find(&self.payload, i) {
                // A match starting before `safe_end` is complete: `keep` bytes follow it.
                Some(f) if f.start < safe_end => {
                    masked.extend_from_slice(&self.payload[i..f.start]);
                    masked.extend_from_slice(&self.masker.stand_in(f.secret, f.end - f.start));
                    self.found
                        .push((self.masker.name(f.secret).to_string(), f.encoding));
                    i = f.end;
                }
                _ => {
                    masked.extend_from_slice(&self.payload[i..safe_end]);
                    i = safe_end;
                }
            }
        }
        self.payload.drain(..i);
        let end = self.emitted + masked.len() as u64;
        let mut off = 0usize;
        while let Some((pos, _)) = self.headers.front() {
            if *pos > end {
                break;
            }
            let upto = usize::try_from(*pos - self.emitted).unwrap_or(masked.len());
            out.extend_from_slice(&masked[off..upto]);
            off = upto;
            if let Some((_, h)) = self.headers.pop_front() {
                out.extend_from_slice(&h);
            }
        }
        out.extend_from_slice(&masked[off..]);
        self.emitted = end;
    }
}

/// `Some((payload length, completes a message))` once `hdr` is a whole frame header.
fn parse_header(hdr: &[u8]) -> Result<Option<(u64, bool)>, String> {
    if hdr.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (hdr[0], hdr[1]);
    if b0 & 0x70 != 0 {
        return Err("the upstream sent a WebSocket frame with RSV bits set (an extension such as compression), which the mask can't read through".into());
    }
    if b1 & 0x80 != 0 {
        return Err("the upstream sent a masked WebSocket frame (servers must not)".into());
    }
    let fin = b0 & 0x80 != 0;
    let control = b0 & 0x08 != 0;
    let (need, len) = match b1 & 0x7f {
        126 => (4, hdr.get(2..4).map(|b| u64::from(u16::from_be_bytes([b[0], b[1]])))),
        127 => (
            10,
            hdr.get(2..10)
                .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        ),
        n => (2, Some(u64::from(n))),
    };
    if hdr.len() < need {
        return Ok(None);
    }
    Ok(len.map(|l| (l, fin || control)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "sk-RealValue-0123456789abcdef";

    fn masker() -> Masker {
        Masker::new(vec![(
            "KEY".into(),
            VALUE.as_bytes().to_vec(),
            b"hutch-ph-KEY-000000000000000000".to_vec(),
        )])
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n < 65536 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `stream` in pieces of `step` bytes; returns what the sandbox gets.
    fn run(stream: &[u8], step: usize) -> (Vec<u8>, Vec<(String, Encoding)>) {
        let mut fm = FrameMasker::new(masker());
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            fm.push(piece, &mut out).expect("push");
        }
        fm.finish(&mut out);
        (out, fm.found)
    }

    #[test]
    fn values_are_masked_within_and_across_fragments_and_lengths_stay_true() {
        let text = format!("{{\"echo\":\"{VALUE}\"}}");
        let (a, b) = text.as_bytes().split_at(14);
        let mut stream = frame(true, 1, b"hello");
        stream.extend(frame(false, 1, a));
        stream.extend(frame(true, 0, b));
        stream.extend(frame(true, 9, b"ping"));
        let big = format!("{}{VALUE}{}", "x".repeat(70_000), "y".repeat(10));
        stream.extend(frame(true, 2, big.as_bytes()));
        for step in [1, 3, 7, 100, 16384, stream.len()] {
            let (out, found) = run(&stream, step);
            assert_eq!(out.len(), stream.len(), "step {step}");
            let s = String::from_utf8_lossy(&out);
            assert!(!s.contains(VALUE), "step {step}");
            assert!(found.len() >= 2, "step {step}: {found:?}");
            // Headers are where they were: the masked stream parses as the same frames.
            let mut fm = FrameMasker::new(masker());
            let mut again = Vec::new();
            fm.push(&out, &mut again).expect("reparse");
        }
    }

    #[test]
    fn a_split_value_across_fragments_is_masked_but_a_finished_message_is_not_held() {
        let (a, b) = VALUE.as_bytes().split_at(9);
        let mut fm = FrameMasker::new(masker());
        let mut out = Vec::new();
        fm.push(&frame(true, 1, b"done"), &mut out).expect("push");
        assert_eq!(out, frame(true, 1, b"done"), "a whole message goes out at once");
        out.clear();
        fm.push(&frame(false, 1, a), &mut out).expect("push");
        fm.push(&frame(true, 0, b), &mut out).expect("push");
        assert!(!String::from_utf8_lossy(&out).contains(&VALUE[..9]), "{out:?}");
        assert_eq!(fm.found.len(), 1);
    }

    #[test]
    fn compressed_or_masked_frames_are_refused() {
        let mut fm = FrameMasker::new(masker());
        let mut out = Vec::new();
        assert!(fm.push(&[0xC1, 0x01, b'x'], &mut out).is_err());
        let mut fm = FrameMasker::new(masker());
        assert!(fm.push(&[0x81, 0x81, 1, 2, 3, 4, b'x'], &mut out).is_err());
    }
}
