//! Finding real secret values in response bytes, in the forms a reflecting server can give them
//! back: as they are; with any of their characters percent-encoded, JSON- or C-escaped or written
//! as HTML character references (mixed freely); in base64 (standard and URL-safe, at each of the
//! three alignments a value can have inside a longer encoded text); in hex (either case). Masks
//! replace what was found, in place and with the same length when the length must stay true.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use memchr::memmem;

/// The form a value was found in, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Encoding {
    Literal,
    /// Some characters percent-encoded, `\uXXXX`/`\xXX`/`\/` escaped or `&#..;` references.
    Escaped,
    Base64,
    Base64Url,
    Hex,
}

impl Encoding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Encoding::Literal => "literal",
            Encoding::Escaped => "escaped",
            Encoding::Base64 => "base64",
            Encoding::Base64Url => "base64url",
            Encoding::Hex => "hex",
        }
    }
}

/// Longest encoding of one character the escape matcher accepts (`\u0041`, `&#120;`).
const MAX_ESCAPE: usize = 6;

struct Needle {
    finder: memmem::Finder<'static>,
    encoding: Encoding,
    /// Searched in an ASCII-lowercased copy of the text.
    fold_case: bool,
}

struct Value {
    name: String,
    bytes: Vec<u8>,
    /// What a literal match becomes when the length may change.
    placeholder: Vec<u8>,
    needles: Vec<Needle>,
}

/// One match: `[start, end)` is the value of secret `secret` in `encoding`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Found {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) secret: usize,
    pub(crate) encoding: Encoding,
}

/// Every held secret value with its encoded forms.
pub(crate) struct Masker {
    values: Vec<Value>,
    max_len: usize,
}

impl Masker {
    /// `values` are `(name, real value, placeholder)`.
    pub(crate) fn new(values: Vec<(String, Vec<u8>, Vec<u8>)>) -> Masker {
        let mut max_len = 0;
        let values = values
            .into_iter()
            .map(|(name, bytes, placeholder)| {
                max_len = max_len.max(bytes.len() * MAX_ESCAPE);
                let needles = encoded_needles(&bytes);
                Value {
                    name,
                    bytes,
                    placeholder,
                    needles,
                }
            })
            .collect();
        Masker { values, max_len }
    }

    /// The same values lowercased, for text that was lowercased on the way (header names).
    pub(crate) fn folded(&self) -> Masker {
        Masker::new(
            self.values
                .iter()
                .map(|v| {
                    (
                        v.name.clone(),
                        v.bytes.to_ascii_lowercase(),
                        v.placeholder.clone(),
                    )
                })
                .collect(),
        )
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub(crate) fn name(&self, secret: usize) -> &str {
        &self.values[secret].name
    }

    /// Longest span a match can cover: what a stream must hold back to catch a value split
    /// across frames.
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    /// The first match starting at or after `from` (the longest one among those starting at the
    /// same place).
    pub(crate) fn find(&self, hay: &[u8], from: usize) -> Option<Found> {
        let mut best: Option<Found> = None;
        let mut consider = |f: Found| {
            let better = match best {
                None => true,
                Some(b) => f.start < b.start || (f.start == b.start && f.end > b.end),
            };
            if better {
                best = Some(f);
            }
        };
        let mut folded: Option<Vec<u8>> = None;
        for (i, v) in self.values.iter().enumerate() {
            for n in &v.needles {
                let text: &[u8] = if n.fold_case {
                    folded.get_or_insert_with(|| hay[from..].to_ascii_lowercase())
                } else {
                    &hay[from..]
                };
                if let Some(m) = n.finder.find(text) {
                    consider(Found {
                        start: from + m,
                        end: from + m + n.finder.needle().len(),
                        secret: i,
                        encoding: n.encoding,
                    });
                }
            }
            if let Some(f) = find_escaped(hay, from, &v.bytes) {
                consider(Found { secret: i, ..f });
            }
        }
        best
    }

    /// Every match in `data`, replaced: a literal value by the placeholder (the length changes),
    /// anything else by a same-length stand-in. `None` when nothing was found.
    pub(crate) fn mask_buffer(&self, data: &[u8], found: &mut Vec<(usize, Encoding)>) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut i = 0;
        while let Some(f) = self.find(data, i) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(data.len()));
            o.extend_from_slice(&data[i..f.start]);
            if f.encoding == Encoding::Literal {
                o.extend_from_slice(&self.values[f.secret].placeholder);
            } else {
                o.extend_from_slice(&self.stand_in(f.secret, f.end - f.start));
            }
            found.push((f.secret, f.encoding));
            i = f.end;
        }
        let mut o = out?;
        o.extend_from_slice(&data[i..]);
        Some(o)
    }

    /// `len` bytes that show a value was masked: the placeholder cut or padded with `x`.
    pub(crate) fn stand_in(&self, secret: usize, len: usize) -> Vec<u8> {
        let mut s: Vec<u8> = self.values[secret]
            .placeholder
            .iter()
            .copied()
            .take(len)
            .collect();
        s.resize(len, b'x');
        s
    }
}

fn encoded_needles(value: &[u8]) -> Vec<Needle> {
    let mut out: Vec<Needle> = Vec::new();
    let mut push = |bytes: Vec<u8>, encoding: Encoding, fold_case: bool| {
        if bytes.len() < 8 || out.iter().any(|n| n.finder.needle() == bytes.as_slice()) {
            return;
        }
        out.push(Needle {
            finder: memmem::Finder::new(&bytes).into_owned(),
            encoding,
            fold_case,
        });
    };
    // Inside a longer base64 text the value starts at one of three offsets within a 3-byte
    // group; the characters that encode only value bytes are fixed for each. At most two value
    // bytes at either end are mixed with their neighbours and stay visible.
    for skip in 0..3 {
        let rest = &value[skip.min(value.len())..];
        let whole = rest.len() / 3 * 3;
        if whole == 0 {
            continue;
        }
        let std = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&rest[..whole]);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&rest[..whole]);
        push(std.into_bytes(), Encoding::Base64, false);
        push(url.into_bytes(), Encoding::Base64Url, false);
    }
    push(hex::encode(value).into_bytes(), Encoding::Hex, true);
    out
}

fn hex_digit(b: u8) -> Option<u32> {
    (b as char).to_digit(16)
}

/// How many bytes at `hay[i..]` spell the character `c` (as itself or escaped), if they do.
fn spells(hay: &[u8], i: usize, c: u8) -> Option<(usize, bool)> {
    let b = *hay.get(i)?;
    if b == c {
        return Some((1, false));
    }
    let at = |k: usize| hay.get(i + k).copied();
    let hex_n = |from: usize, n: usize| -> Option<u32> {
        (0..n).try_fold(0u32, |acc, k| Some(acc * 16 + hex_digit(at(from + k)?)?))
    };
    let c = u32::from(c);
    match b {
        b'%' if hex_n(1, 2)? == c => Some((3, true)),
        b'\\' => match at(1)? {
            b'u' | b'U' if hex_n(2, 4)? == c => Some((6, true)),
            b'x' if hex_n(2, 2)? == c => Some((4, true)),
            b'/' if c == u32::from(b'/') => Some((2, true)),
            _ => None,
        },
        b'&' if at(1)? == b'#' => {
            let (digits_at, radix) = match at(2)? {
                b'x' | b'X' => (3, 16),
                _ => (2, 10),
            };
            let mut n = 0u32;
            let mut k = digits_at;
            while let Some(d) = at(k).and_then(|d| (d as char).to_digit(radix)) {
                n = n.saturating_mul(radix).saturating_add(d);
                k += 1;
                if k > MAX_ESCAPE {
                    return None;
                }
            }
            (k > digits_at && at(k)? == b';' && n == c && k < MAX_ESCAPE).then_some((k + 1, true))
        }
        _ => None,
    }
}

/// The first place at or after `from` where `value` is spelled with at least one escaped
/// character (plain copies are the literal needle's job, but are found here too).
fn find_escaped(hay: &[u8], from: usize, value: &[u8]) -> Option<Found> {
    let first = *value.first()?;
    let mut i = from;
    while i < hay.len() {
        let b = hay[i];
        if b == first || b == b'%' || b == b'\\' || b == b'&' {
            let mut at = i;
            let mut escaped = false;
            let mut ok = true;
            for &c in value {
                match spells(hay, at, c) {
                    Some((n, e)) => {
                        at += n;
                        escaped |= e;
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                return Some(Found {
                    start: i,
                    end: at,
                    secret: 0,
                    encoding: if escaped {
                        Encoding::Escaped
                    } else {
                        Encoding::Literal
                    },
                });
            }
        }
        i += 1;
    }
    None
}

/// Secret names and encodings found by a streaming mask, read when the request's audit line is
/// written.
pub(crate) type FoundLog = Arc<Mutex<Vec<(String, Encoding)>>>;

/// A response body with secret values masked on the fly (same-length stand-ins, so a declared
/// length stays true), holding back just enough bytes to catch a value split across frames.
pub(crate) struct MaskingBody<B> {
    inner: B,
    masker: Masker,
    keep: usize,
    pending: BytesMut,
    trailers: Option<Frame<Bytes>>,
    done: bool,
    log: FoundLog,
}

impl<B> MaskingBody<B> {
    pub(crate) fn new(inner: B, masker: Masker, log: FoundLog) -> MaskingBody<B> {
        let keep = masker.max_len().saturating_sub(1);
        MaskingBody {
            inner,
            masker,
            keep,
            pending: BytesMut::new(),
            trailers: None,
            done: false,
            log,
        }
    }

    /// Emits everything that can no longer be the start of a value (all of it at the end).
    fn drain(&mut self, at_end: bool) -> Option<Bytes> {
        let safe_end = if at_end {
            self.pending.len()
        } else {
            self.pending.len().saturating_sub(self.keep)
        };
        if safe_end == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(safe_end);
        let mut i = 0;
        loop {
            match self.masker.find(&self.pending, i) {
                // A match starting before `safe_end` is complete: `keep` bytes follow it.
                Some(f) if f.start < safe_end => {
                    out.extend_from_slice(&self.pending[i..f.start]);
                    out.extend_from_slice(&self.masker.stand_in(f.secret, f.end - f.start));
                    i = f.end;
                    self.log
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((self.masker.name(f.secret).to_string(), f.encoding));
                }
                _ => {
                    let end = safe_end.max(i);
                    out.extend_from_slice(&self.pending[i..end]);
                    i = end;
                    break;
                }
            }
        }
        let _ = self.pending.split_to(i);
        (!out.is_empty()).then(|| Bytes::from(out))
    }
}

impl<B> Body for MaskingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                if let Some(b) = this.drain(true) {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.pending.extend_from_slice(&data);
                        if let Some(b) = this.drain(false) {
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                    }
                    Err(trailers) => {
                        // Trailers end the body: what is held back goes out first.
                        this.trailers = Some(trailers);
                        this.done = true;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // Replacements keep the length, so the inner hint still holds.
        let mut h = self.inner.size_hint();
        let held = self.pending.len() as u64;
        h.set_lower(h.lower() + held);
        if let Some(u) = h.upper() {
            h.set_upper(u + held);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    const VALUE: &str = "sk-Real/Value+42_x";

    fn masker() -> Masker {
        Masker::new(vec![(
            "K".into(),
            VALUE.as_bytes().to_vec(),
            b"hutch-ph-K-0123456789abcdef".to_vec(),
        )])
    }

    fn forms() -> Vec<(String, Encoding)> {
        let v = VALUE.as_bytes();
        let mut out = vec![(VALUE.to_string(), Encoding::Literal)];
        let b64 = base64::engine::general_purpose::STANDARD;
        let b64u = base64::engine::general_purpose::URL_SAFE;
        for prefix in ["", "a", "ab", "abc", "abcd"] {
            let mut x = prefix.as_bytes().to_vec();
            x.extend_from_slice(v);
            x.extend_from_slice(b"tail");
            out.push((b64.encode(&x), Encoding::Base64));
            out.push((b64u.encode(&x), Encoding::Base64Url));
        }
        out.push((hex::encode(v), Encoding::Hex));
        out.push((hex::encode_upper(v), Encoding::Hex));
        let all_pct: String = v.iter().map(|b| format!("%{b:02X}")).collect();
        out.push((all_pct, Encoding::Escaped));
        let one_pct = VALUE.replacen("R", "%52", 1);
        out.push((one_pct, Encoding::Escaped));
        let json: String = v.iter().map(|b| format!("\\u{b:04x}")).collect();
        out.push((json, Encoding::Escaped));
        out.push((VALUE.replace('/', "\\/"), Encoding::Escaped));
        let mixed: String = v
            .iter()
            .enumerate()
            .map(|(i, b)| match i % 4 {
                0 => format!("%{b:02x}"),
                1 => format!("\\u00{b:02X}"),
                2 => format!("&#{b};"),
                _ => (*b as char).to_string(),
            })
            .collect();
        out.push((mixed, Encoding::Escaped));
        out
    }

    /// Class 17 (encoded reflection): every form is found and masked, wherever it sits, and the
    /// first and last characters alone are not enough to rebuild the value.
    #[test]
    fn class_17_every_encoding_is_found_and_masked() {
        let m = masker();
        for (form, enc) in forms() {
            let text = format!("{{\"echo\":\"{form}\"}}");
            let mut found = Vec::new();
            let out = m
                .mask_buffer(text.as_bytes(), &mut found)
                .unwrap_or_else(|| panic!("{enc:?} form not found: {form}"));
            let got = found.first().map(|f| f.1);
            // A URL-safe form without '-' or '_' is the standard form too.
            let same = got == Some(enc) || (enc == Encoding::Base64Url && got == Some(Encoding::Base64));
            assert!(same, "{form}: found {got:?}, want {enc:?}");
            let out = String::from_utf8_lossy(&out).into_owned();
            assert!(!out.contains(&form), "{form} still in {out}");
            // Decoding what is left must not give the value back.
            for decoded in decodings(&out) {
                assert!(!decoded.windows(VALUE.len() - 4).any(|w| VALUE.as_bytes().windows(VALUE.len() - 4).any(|x| x == w)), "{enc:?}: {out}");
            }
        }
        let mut found = Vec::new();
        assert!(m.mask_buffer(b"nothing to see: sk-Real/Valu", &mut found).is_none());
    }

    /// What a client could decode from `s` (base64 of any tail, hex, and the text itself).
    fn decodings(s: &str) -> Vec<Vec<u8>> {
        let inner = s.trim_start_matches("{\"echo\":\"").trim_end_matches("\"}");
        let mut out = vec![inner.as_bytes().to_vec()];
        for skip in 0..4 {
            let t = &inner[skip.min(inner.len())..];
            let t = &t[..t.len() / 4 * 4];
            for e in [
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                if let Ok(d) = e.decode(t.trim_end_matches('=')) {
                    out.push(d);
                }
            }
        }
        if let Ok(d) = hex::decode(inner) {
            out.push(d);
        }
        out
    }

    /// Class 17: a value split across frames, in any encoding, is masked in a stream, and the
    /// stream keeps its length.
    #[tokio::test]
    async fn class_17_streaming_mask_across_frames_in_every_encoding() {
        for (form, enc) in forms() {
            let text = format!("head {form} middle {form} end").into_bytes();
            for split in [1, 2, 3, 5, 7, 13, text.len()] {
                let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = text
                    .chunks(split)
                    .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                    .collect();
                let log = FoundLog::default();
                let body = MaskingBody::new(
                    StreamBody::new(futures::stream::iter(frames)),
                    masker(),
                    log.clone(),
                );
                let out = body.collect().await.expect("collect").to_bytes();
                assert_eq!(out.len(), text.len(), "{enc:?} split {split}");
                let s = String::from_utf8_lossy(&out);
                assert!(!s.contains(&form), "{enc:?} split {split}: {s}");
                let log = log.lock().expect("log");
                assert_eq!(log.len(), 2, "{enc:?} split {split}: {log:?}");
                assert!(
                    log.iter().all(|(n, e)| n == "K"
                        && (*e == enc || (enc == Encoding::Base64Url && *e == Encoding::Base64))),
                    "{log:?}"
                );
            }
        }
    }
}
