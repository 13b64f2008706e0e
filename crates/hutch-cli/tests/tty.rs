//! `hutch run` on a real terminal: tmux panes of a known size run `hutch run`, keys are typed with `send-keys`,
//! and what the user would see is read with `capture-pane`. Real VMs. The command gets a pseudo-terminal sized
//! like the pane with the pane's `TERM`, follows resizes, receives typed input and control keys as bytes, and
//! the pane's terminal is back in cooked mode however the session ends (exit, Ctrl-C in the guest, `~.`).
//! Threat class: terminal injection (guest output drives only the program's own screen; hutch's own messages
//! stay plain lines after the terminal is restored).

mod common;

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// One VM at a time from this file, whatever the test harness's thread count.
static ONE_VM: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a wait may last before the test fails: a bound against hangs on a busy emulated host.
const WAIT: u64 = 180;

/// The pane's terminal settings after hutch returned: cooked (canonical input, echo, signals from keys).
fn assert_cooked(t: &Tmux) {
    t.line("stty -a | tr ' ' '\\n' | grep -E '^-?(icanon|echo|isig|opost)$' | tr '\\n' ' '; echo STTY-\"\"END");
    let h = t.wait_for("STTY-END\n", WAIT);
    let line = h.lines().rev().find(|l| l.contains("icanon") && !l.contains("grep")).unwrap_or_default().to_string();
    for flag in ["icanon", "echo", "isig", "opost"] {
        assert!(line.split_whitespace().any(|w| w == flag), "the terminal is not cooked ({flag} is off): {line:?}\n{h}");
    }
}

/// hutch's own lines (written after the terminal is restored) start at the left margin: in raw mode a newline
/// would not return the carriage and they would be indented.
fn assert_plain_line(h: &str, prefix: &str) {
    assert!(h.lines().any(|l| l.starts_with(prefix)), "no line starting with {prefix:?}:\n{h}");
}

#[test]
fn a_terminal_sized_like_the_pane_with_its_term_that_follows_resizes() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    t.line("echo PANE_\"\"TERM=$TERM");
    let h = t.wait_for("PANE_TERM=", WAIT);
    let pane_term = h.lines().find_map(|l| l.strip_prefix("PANE_TERM=")).unwrap_or_default().trim().to_string();
    assert!(!pane_term.is_empty(), "{h}");

    t.line(&format!(
        "{} run -- sh -c 'tty; stty size; echo \"TERM=$TERM\"; trap \"stty size\" WINCH; echo RE\"\"ADY; while :; do sleep 1; done'; echo EXIT=$?",
        t.hutch
    ));
    let h = t.wait_for("READY", WAIT);
    assert!(h.lines().any(|l| l.starts_with("/dev/pts/")), "tty names a pseudo-terminal:\n{h}");
    assert!(h.lines().any(|l| l.trim() == "40 100"), "stty size is the pane's 40 rows, 100 columns:\n{h}");
    assert!(h.lines().any(|l| l.trim() == format!("TERM={pane_term}")), "the guest's TERM is the pane's {pane_term}:\n{h}");

    let out = t.cmd(&["resize-window", "-t", "t", "-x", "120", "-y", "30"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    t.wait_for("30 120", WAIT);

    // A session whose program loops forever ends with the escape, and the terminal is usable again.
    t.keys(&["Enter"]);
    t.type_text("~.");
    let h = t.wait_for("EXIT=255", WAIT);
    assert_plain_line(&h, "hutch: session ended with ~.");
    assert_cooked(&t);
}

#[test]
fn typed_input_reaches_the_program_and_ctrl_c_interrupts_it_with_130() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    t.line(&format!(
        "{} run -- python3 -c 'import time; s = input(\"na\" + \"me? \"); print(\"got <%s>\" % s, flush=True); time.sleep(1000)'; echo EXIT=$?",
        t.hutch
    ));
    t.wait_for("name? ", WAIT);
    t.type_text("hello wörld");
    t.keys(&["Enter"]);
    t.wait_for("got <hello wörld>", WAIT);
    // Ctrl-C is a byte for the guest's terminal, whose line discipline turns it into SIGINT for the program.
    t.keys(&["C-c"]);
    let h = t.wait_for("EXIT=130", WAIT);
    assert!(h.contains("KeyboardInterrupt"), "python saw the interrupt:\n{h}");
    assert_cooked(&t);
}

#[test]
fn tilde_dot_ends_a_session_whose_program_ignores_every_key() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    t.line(&format!(
        "{} run -- sh -c 'trap \"\" INT QUIT TSTP; echo ST\"\"UCK; while :; do sleep 1; done'; echo EXIT=$?",
        t.hutch
    ));
    t.wait_for("STUCK", WAIT);
    t.keys(&["C-c", "C-z", "C-\\", "C-d", "q", "Enter"]);
    // The program is still there: nothing ended the session.
    std::thread::sleep(Duration::from_secs(2));
    let h = t.history();
    assert!(!h.lines().any(|l| l.starts_with("EXIT=")), "the program ignores keys; the session must go on:\n{h}");
    t.type_text("~.");
    let h = t.wait_for("EXIT=255", WAIT);
    assert_plain_line(&h, "hutch: session ended with ~.");
    assert_cooked(&t);
}

/// The VM dies under a program that put the guest's terminal in raw mode: hutch says so on a plain line and the
/// user's terminal is cooked again.
#[test]
fn the_vm_dying_mid_session_restores_the_terminal() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    t.line(&format!("{} run -- sh -c 'stty raw -echo; echo DY\"\"ING; sleep 1; echo o > /proc/sysrq-trigger; sleep 100'; echo EXIT=$?", t.hutch));
    t.wait_for("DYING", WAIT);
    let h = t.wait_for("EXIT=125", WAIT);
    assert_plain_line(&h, "hutch: the VM stopped unexpectedly");
    assert_cooked(&t);
}

/// SIGTERM to hutch in the middle of a terminal session: the VM is destroyed, exit 143, the terminal cooked.
#[test]
fn sigterm_mid_session_restores_the_terminal() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    t.line(&format!("{} run -- sh -c 'echo RUN\"\"NING; sleep 1000'; echo EXIT=$?", t.hutch));
    t.wait_for("RUNNING", WAIT);
    let exe = env!("CARGO_BIN_EXE_hutch");
    let pids: Vec<u32> = processes_mentioning(exe)
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(exe.as_bytes())))
        .collect();
    assert_eq!(pids.len(), 1, "one hutch of this build runs: {pids:?}");
    let out = std::process::Command::new("kill").args(["-TERM", &pids[0].to_string()]).output().expect("spawn kill");
    assert!(out.status.success());
    let h = t.wait_for("EXIT=143", WAIT);
    assert_plain_line(&h, "hutch: SIGTERM received; the VM was destroyed");
    assert_cooked(&t);
}

/// Keystroke-to-echo latency through the whole path (tmux, hutch, the agent channel, the guest's terminal, back):
/// printed, not asserted. It includes the cost of asking tmux for the screen (a process per look).
#[test]
fn keystroke_echo_latency_is_measured_and_output_is_byte_for_byte() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    // Guest output with escape sequences and multi-byte characters split across writes arrives whole.
    t.line(&format!(
        "{} run -- sh -c 'printf \"\\033[1mBO\"; sleep 0.2; printf \"LD\\033[0m \\342\\202\"; sleep 0.2; printf \"\\254 euro\\n\"; echo RE\"\"ADY; exec cat'; echo EXIT=$?",
        t.hutch
    ));
    let h = t.wait_for("READY", WAIT);
    assert!(h.contains("BOLD € euro"), "the sequences were interpreted, the split character joined:\n{h}");
    let styled = text(&t.cmd(&["capture-pane", "-p", "-e", "-t", "t"]).stdout);
    assert!(styled.contains("\u{1b}[1mBOLD"), "bold reached the terminal as a sequence:\n{styled:?}");

    let mut samples = Vec::new();
    for i in 1..=25usize {
        let t0 = Instant::now();
        t.type_text("x");
        let seen = wait_until(Duration::from_secs(WAIT), || {
            let s = t.screen();
            let last = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().to_string();
            last.matches('x').count() >= i
        });
        assert!(seen, "keystroke {i} never echoed:\n{}", t.screen());
        samples.push(t0.elapsed());
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    eprintln!(
        "keystroke-to-echo latency over {} keys: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (includes tmux send-keys and capture-pane polling)",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    );
    // End of input is the user's ^D, a byte the guest's terminal turns into EOF for cat.
    t.keys(&["Enter", "C-d"]);
    t.wait_for("EXIT=0", WAIT);
    assert_cooked(&t);
}

#[test]
fn forcing_a_terminal_without_one_on_stdin_is_an_error_before_any_vm() {
    let out = hutch().args(["run", "-t", "--", "true"]).stdin(Stdio::null()).output().expect("spawn hutch");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("-t/--tty needs a terminal on stdin"), "{err}");
    let out = hutch().args(["run", "-t", "-T", "--", "true"]).stdin(Stdio::null()).output().expect("spawn hutch");
    assert_eq!(out.status.code(), Some(2), "-t and -T conflict: {}", text(&out.stderr));
}

/// A large paste reaches the program whole and in order (the guest's terminal in raw mode, so no line limit).
#[test]
fn a_large_paste_arrives_whole() {
    let _l = lock();
    let Some(t) = Tmux::start(100, 40) else { return };
    // Printable, no newline (tmux turns pasted newlines into carriage returns), not starting a line with ~.
    let paste: String = (0..150_000u32).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let want = {
        let out = std::process::Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
        use std::io::Write;
        let mut child = out;
        child.stdin.take().expect("stdin").write_all(paste.as_bytes()).expect("write");
        let o = child.wait_with_output().expect("sha256sum");
        text(&o.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(file.path(), &paste).expect("write");
    t.line(&format!(
        "{} run -- sh -c 'stty raw -echo; echo RE\"\"ADY; head -c {} | sha256sum | sed s/^/SUM=/; stty sane'; echo EXIT=$?",
        t.hutch,
        paste.len()
    ));
    t.wait_for("READY", WAIT);
    let out = t.cmd(&["load-buffer", &file.path().display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = t.cmd(&["paste-buffer", "-t", "t"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let h = t.wait_for("EXIT=0", WAIT);
    let got = h.lines().find_map(|l| l.trim().strip_prefix("SUM=")).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(got, want, "the paste's digest in the guest:\n{h}");
    assert_cooked(&t);
}
