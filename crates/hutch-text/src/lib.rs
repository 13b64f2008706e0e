//! Guest-chosen text made safe for a terminal or a log line. Every string a VM (or a network client) chose
//! goes through [`escape`] (or a sibling) before hutch prints or logs it: control characters could drive the
//! user's terminal (cursor moves, title changes, hyperlinks, clearing the screen), and bidirectional overrides,
//! isolates and invisible format characters could make a name read as something it is not.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must not reach a terminal or log as it is: C0 and C1 controls and DEL, bidirectional marks,
/// embeddings, overrides and isolates, zero-width and other invisible format characters (Unicode category Cf),
/// and the line and paragraph separators.
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || is_format(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Unicode general category Cf (format characters), Unicode 15. Hand-listed so that no table crate is needed;
/// the bidirectional controls (U+061C, U+200E/F, U+202A-202E, U+2066-2069) and zero-width characters
/// (U+200B-200D, U+2060, U+FEFF) are among them.
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2 | 0x180E
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
        | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
        c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
    }
}

/// `s` with every unsafe character (see [`is_unsafe`]) written as an escape (`\x1b`, `\u{202e}`, `\n`).
/// Borrowed when nothing needed escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// As [`escape`], for bytes that may not be UTF-8 (file names, console output): invalid bytes become `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    escape_bytes_keeping(b, false)
}

/// As [`escape_bytes`], but newlines and tabs stay as they are: for multi-line text such as a console tail or a
/// patch, where each line is still escaped.
pub fn escape_lines(b: &[u8]) -> String {
    escape_bytes_keeping(b, true)
}

fn escape_bytes_keeping(b: &[u8], lines: bool) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if is_unsafe(c) && !(lines && (c == '\n' || c == '\t')) {
                push_escaped(&mut out, c);
            } else {
                out.push(c);
            }
        }
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02x}"));
        }
    }
    out
}

/// At most `max` characters of `s`, escaped, with `...` when it was longer: for names in records and messages,
/// where a guest could otherwise send megabytes.
pub fn shorten(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    for c in s.chars() {
        if n == max {
            out.push_str("...");
            break;
        }
        if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
        n += 1;
    }
    out
}

/// A `Display` of guest-chosen text, escaped: `format!("{}", shown(name))`.
pub fn shown(s: &str) -> Shown<'_> {
    Shown(s)
}

pub struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", escape(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_is_borrowed_unchanged() {
        for s in ["api.example.com:443", "/root/out file.txt", "naïve café 日本語", "a\\b"] {
            assert!(matches!(escape(s), Cow::Borrowed(_)), "{s}");
        }
    }

    #[test]
    fn class_18_terminal_controls_and_bidi_are_escaped() {
        assert_eq!(escape("evil\u{202e}moc.com"), "evil\\u{202e}moc.com");
        assert_eq!(escape("a\x1b]0;title\x07b"), "a\\x1b]0;title\\x07b");
        assert_eq!(escape("x\u{9b}31m"), "x\\x9b31m");
        assert_eq!(escape("line\nnext\r"), "line\\nnext\\r");
        for c in ['\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{200e}', '\u{200f}', '\u{61c}',
            '\u{200b}', '\u{200c}', '\u{200d}', '\u{2060}', '\u{feff}', '\u{ad}', '\u{e0041}', '\u{2028}', '\u{2029}', '\u{7f}', '\0'] {
            let s = format!("a{c}b");
            let e = escape(&s);
            assert!(!e.contains(c), "{:x} left as is: {e}", c as u32);
            assert!(e.starts_with('a') && e.ends_with('b'));
        }
    }

    #[test]
    fn bytes_and_lines() {
        assert_eq!(escape_bytes(b"ok\xff\x1b[2J"), "ok\\xff\\x1b[2J");
        assert_eq!(escape_lines(b"one\n\ttwo\x1b[31m\r\n"), "one\n\ttwo\\x1b[31m\\r\n");
        assert_eq!(escape_lines("a\u{202e}b\n".as_bytes()), "a\\u{202e}b\n");
    }

    #[test]
    fn shorten_counts_characters_and_escapes() {
        assert_eq!(shorten("abcdef", 3), "abc...");
        assert_eq!(shorten("ab", 3), "ab");
        assert_eq!(shorten("\u{202e}x", 5), "\\u{202e}x");
        assert_eq!(format!("{}", shown("q\u{2067}")), "q\\u{2067}");
    }
}
