//! The user's terminal during an interactive session (`hutch run` on a terminal, `hutch shell`, `hutch exec
//! --tty`): whether to use one, raw mode restored on every way out (a guard, plus a panic hook), the keys read
//! on a thread that can be stopped (so keys typed after the session are left to the shell), the `Enter ~ .`
//! escape, window-size changes, and the environment a guest terminal program needs from the user's.

use std::io::IsTerminal;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Once;

use anyhow::{bail, Context};
use hutch_proto::TtySize;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

/// What the user sees for `Enter ~ ?`. Written in raw mode, hence the `\r\n`.
pub const ESCAPE_HELP: &str = "\r\nhutch escapes (after Enter):\r\n  ~.  end the session (the VM is destroyed)\r\n  ~~  send a single ~\r\n  ~?  this help\r\n";

/// Whether a run gets a terminal: `-t` forces one (stdin must be a terminal), `-T` refuses one, and otherwise
/// it has one when stdin and stdout are both terminals, as with `docker run -it` or `ssh`.
pub fn wanted(force: bool, refuse: bool) -> anyhow::Result<bool> {
    let stdin = std::io::stdin().is_terminal();
    if refuse {
        return Ok(false);
    }
    if force {
        if !stdin {
            bail!("-t/--tty needs a terminal on stdin, and stdin is not one; drop -t (or use -T) to run without a terminal");
        }
        return Ok(true);
    }
    Ok(stdin && std::io::stdout().is_terminal())
}

/// The user's window size (stdin's terminal, else stdout's), or 80x24 when neither says.
pub fn size() -> TtySize {
    for fd in [0, 1] {
        let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own; a non-terminal fd just fails.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return TtySize { rows: ws.ws_row, cols: ws.ws_col };
        }
    }
    TtySize { rows: 24, cols: 80 }
}

/// `TERM`, `COLORTERM`, `LANG`, `LC_ALL` and `LC_*` from the user's environment, for a guest terminal program.
/// The images have only the C locales, so a locale keeps its character set and loses its language
/// (`en_US.UTF-8` becomes `C.UTF-8`); otherwise programs would silently fall back to ASCII.
pub fn user_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter_map(|(k, v)| match k.as_str() {
            "TERM" | "COLORTERM" => plain(&v).then_some((k, v)),
            _ if is_locale_var(&k) => {
                let l = guest_locale(&v);
                Some((k, l.to_string()))
            }
            _ => None,
        })
        .collect();
    env.sort();
    env
}

fn plain(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

fn is_locale_var(k: &str) -> bool {
    k == "LANG" || k.strip_prefix("LC_").is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
}

fn guest_locale(v: &str) -> &'static str {
    let l = v.to_ascii_lowercase();
    if l.is_empty() || l == "c" || l == "posix" {
        "C"
    } else if l.contains(".utf-8") || l.contains(".utf8") {
        "C.UTF-8"
    } else {
        "C"
    }
}

/// The terminal in raw mode for the guard's lifetime. A panic anywhere restores it before the panic message is
/// printed; dropping the guard (normal end, error, a signal's branch, the VM's death) restores it too. Only
/// SIGKILL leaves it raw, as it would for any program (`reset` or `stty sane` fix that).
pub struct RawMode(());

impl RawMode {
    pub fn enter() -> anyhow::Result<RawMode> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // Harmless when the terminal is not raw: crossterm restores only what it saved.
                let _ = crossterm::terminal::disable_raw_mode();
                previous(info);
            }));
        });
        crossterm::terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// What the user did at the keyboard (or the window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// Bytes for the guest, exactly as typed or pasted, escapes removed.
    Input(Vec<u8>),
    /// stdin ended.
    Eof,
    /// `Enter ~ .`: end the session.
    End,
    /// `Enter ~ ?`: show the escapes.
    Help,
    /// The window changed size.
    Resize(TtySize),
}

/// Finds `~.`, `~~` and `~?` at the start of a line (after Enter, or at the session's start), as ssh does. A `~`
/// there is held back until the next byte says what it is; any other `~` passes through at once.
#[derive(Debug)]
pub struct EscapeScanner {
    line_start: bool,
    tilde: bool,
}

impl Default for EscapeScanner {
    fn default() -> Self {
        EscapeScanner { line_start: true, tilde: false }
    }
}

impl EscapeScanner {
    /// The keys in `bytes`, in order. After [`Key::End`] nothing more is returned.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Key> {
        let mut keys = Vec::new();
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => {
                        flush(&mut out, &mut keys);
                        keys.push(Key::End);
                        return keys;
                    }
                    b'?' => {
                        flush(&mut out, &mut keys);
                        keys.push(Key::Help);
                        self.line_start = true;
                        continue;
                    }
                    b'~' => out.push(b'~'),
                    _ => {
                        out.push(b'~');
                        out.push(b);
                    }
                }
                self.line_start = is_enter(b);
                continue;
            }
            if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = is_enter(b);
        }
        flush(&mut out, &mut keys);
        keys
    }
}

fn is_enter(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

fn flush(out: &mut Vec<u8>, keys: &mut Vec<Key>) {
    if !out.is_empty() {
        keys.push(Key::Input(std::mem::take(out)));
    }
}

/// The keyboard and the window, as a stream of [`Key`]s. stdin is read on a thread of its own that polls it
/// together with a pipe; dropping `Keyboard` closes the pipe, so the thread stops without taking another byte.
pub struct Keyboard {
    rx: mpsc::Receiver<Key>,
    open: bool,
    winch: Signal,
    _stop: OwnedFd,
}

impl Keyboard {
    pub fn start() -> anyhow::Result<Keyboard> {
        let winch = signal(SignalKind::window_change()).context("watch the terminal's size")?;
        let (stop_r, stop_w) = nix::unistd::pipe().context("create a pipe")?;
        let (tx, rx) = mpsc::channel(16);
        std::thread::Builder::new().name("hutch-keys".into()).spawn(move || read_keys(stop_r, tx)).context("start the keyboard reader")?;
        Ok(Keyboard { rx, open: true, winch, _stop: stop_w })
    }

    pub async fn next(&mut self) -> Key {
        tokio::select! {
            k = self.rx.recv(), if self.open => match k {
                Some(k) => k,
                None => {
                    self.open = false;
                    Key::Eof
                }
            },
            _ = self.winch.recv() => Key::Resize(size()),
        }
    }
}

fn read_keys(stop: OwnedFd, tx: mpsc::Sender<Key>) {
    let mut scanner = EscapeScanner::default();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let mut fds = [
            libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and its length is passed with it.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            let _ = tx.blocking_send(Key::Eof);
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLNVAL != 0 {
            let _ = tx.blocking_send(Key::Eof);
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        // SAFETY: reads at most `buf.len()` bytes into the buffer we own, from fd 0, which stays open.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) {
                continue;
            }
            let _ = tx.blocking_send(Key::Eof);
            return;
        }
        if n == 0 {
            let _ = tx.blocking_send(Key::Eof);
            return;
        }
        for k in scanner.feed(&buf[..n as usize]) {
            let end = k == Key::End;
            if tx.blocking_send(k).is_err() || end {
                return;
            }
        }
    }
}

/// Text that came from a guest (an error message, console lines) for the user's terminal: control characters
/// other than newline and tab, and bidi controls, escaped, so the guest cannot drive the terminal through hutch's
/// own messages.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        let bidi = ('\u{202a}'..='\u{202e}').contains(&ch) || ('\u{2066}'..='\u{2069}').contains(&ch);
        if (ch.is_control() && ch != '\n' && ch != '\t') || bidi {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(s: &str) -> Key {
        Key::Input(s.as_bytes().to_vec())
    }

    #[test]
    fn escapes_only_at_the_start_of_a_line() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"~."), vec![Key::End], "at the session's start");
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"ls\r~."), vec![input("ls\r"), Key::End]);
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"a~.b"), vec![input("a~.b")], "mid-line ~ is an ordinary key");
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"x\n~~y"), vec![input("x\n~y")], "~~ sends one ~");
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"~q"), vec![input("~q")], "an unknown escape passes both bytes");
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"~?~."), vec![Key::Help, Key::End]);
    }

    #[test]
    fn an_escape_split_across_reads_is_still_found() {
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"ok\r"), vec![input("ok\r")]);
        assert_eq!(s.feed(b"~"), vec![], "the ~ is held back");
        assert_eq!(s.feed(b"."), vec![Key::End]);
        let mut s = EscapeScanner::default();
        assert_eq!(s.feed(b"~"), vec![]);
        assert_eq!(s.feed(b"\r~."), vec![input("~\r"), Key::End], "~ then Enter: both sent, and a new line starts");
    }

    #[test]
    fn control_keys_and_pastes_pass_untouched() {
        let mut s = EscapeScanner::default();
        let paste: Vec<u8> = (0u8..=255).cycle().take(100_000).filter(|b| *b != b'~').collect();
        let keys = s.feed(&paste);
        let got: Vec<u8> = keys
            .into_iter()
            .flat_map(|k| match k {
                Key::Input(b) => b,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, paste);
        assert_eq!(s.feed(b"\x03\x1a\x1c"), vec![input("\x03\x1a\x1c")], "Ctrl-C, Ctrl-Z, Ctrl-\\ are bytes for the guest");
    }

    #[test]
    fn locales_keep_their_character_set() {
        assert_eq!(guest_locale("en_US.UTF-8"), "C.UTF-8");
        assert_eq!(guest_locale("de_DE.utf8"), "C.UTF-8");
        assert_eq!(guest_locale("C.UTF-8"), "C.UTF-8");
        assert_eq!(guest_locale("POSIX"), "C");
        assert_eq!(guest_locale("fr_FR.ISO-8859-1"), "C");
        assert!(is_locale_var("LC_CTYPE") && is_locale_var("LANG") && is_locale_var("LC_ALL"));
        assert!(!is_locale_var("LC_") && !is_locale_var("LC_x") && !is_locale_var("LANGUAGE"));
        assert!(!plain("xterm\x1b]0;") && plain("xterm-256color") && !plain(""));
    }

    #[test]
    fn guest_text_is_escaped_for_the_terminal() {
        assert_eq!(escape_controls("a\x1b[2Jb\n\tc\u{202e}"), "a\\u{1b}[2Jb\n\tc\\u{202e}");
    }
}
