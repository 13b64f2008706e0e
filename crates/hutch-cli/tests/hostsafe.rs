//! Guest-chosen bytes on the host (threat class 18), with real VMs: names a guest picks reach the user's
//! terminal escaped; a file copied out is capped and stays sparse; the records of a guest's denied attempts do
//! not grow hutch's memory.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;

/// Python run in the guest: DNS questions sent straight to the guest's resolver (127.0.0.53), `count` of them
/// with names made from `label` and a number, at most `window` unanswered at a time. Prints the answers
/// received.
fn dns_flood(label: &str, count: usize, window: usize) -> String {
    let hex: String = label.bytes().map(|b| format!("{b:02x}")).collect();
    format!(
        r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
label = bytes.fromhex("{hex}")
def q(i):
    name = [label + str(i).encode(), b"exfil", b"test"]
    body = b"".join(bytes([len(l)]) + l for l in name) + b"\0"
    return struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + body + struct.pack(">HH", 1, 1)
got = 0
i = 0
while i < {count}:
    n = min({window}, {count} - i)
    for k in range(n):
        s.sendto(q(i + k), ("127.0.0.53", 53))
    for k in range(n):
        try:
            s.recvfrom(2048)
            got += 1
        except socket.timeout:
            break
    i += n
print("answers", got)
"#
    )
}

/// Class 18: a host name and console text chosen by the guest, with a right-to-left override (U+202E), an
/// isolate (U+2067), a zero-width space and terminal escapes (ESC, BEL, C1 CSI), reach hutch's stderr only
/// escaped: in the end-of-run summary of denied egress and in the console tail of a VM that stopped.
#[test]
fn class_18_guest_names_and_console_text_are_escaped_on_the_terminal() {
    let evil = "gpj\u{202e}exe-\u{2067}x\u{200b}\x1b]0;pwned\x07\x1b[2J\u{9b}31m";
    let script = dns_flood(evil, 3, 3);
    let out = run(&["--", "python3", "-c", &script]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(text(&out.stdout).contains("answers 3"), "{}", text(&out.stdout));
    assert!(stderr.contains("denied egress"), "the summary is shown: {stderr}");
    for c in ['\u{202e}', '\u{2067}', '\u{200b}', '\x1b', '\x07', '\u{9b}'] {
        assert!(!stderr.contains(c), "U+{:04X} reached the terminal raw: {stderr:?}", c as u32);
    }
    assert!(stderr.contains("gpj\\u{202e}exe-\\u{2067}x\\u{200b}\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m"), "shown escaped: {stderr}");

    // The guest writes the same bytes to its serial console, then powers the VM off under the command.
    let console = "printf 'gpj\\342\\200\\256exe \\033]0;pwned\\007\\033[2J\\n' > /dev/ttyS0; sleep 1; echo o > /proc/sysrq-trigger; sleep 30";
    let out = run(&["--", "sh", "-c", console]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "the VM stopped under the command: {stderr}");
    assert!(stderr.contains("last console lines"), "{stderr}");
    for c in ['\u{202e}', '\x1b', '\x07'] {
        assert!(!stderr.contains(c), "U+{:04X} reached the terminal raw: {stderr:?}", c as u32);
    }
    assert!(stderr.contains("gpj\\u{202e}exe \\x1b]0;pwned\\x07\\x1b[2J"), "console tail shown escaped: {stderr}");
}

/// Class 18: `--copy-out` of a sparse guest file larger than the limit is refused before a byte is written,
/// with an error naming the flag, and leaves no file; under a raised limit the host copy keeps the holes.
#[test]
fn class_18_sparse_copy_out_is_capped_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("big.img");
    let co = format!("/root/big.img:{}", dest.display());
    // 3 GiB apparent, 8 KiB of data: "hutch" at 1 GiB and at the last 4 KiB.
    let make = "truncate -s 3G /root/big.img && printf hutch | dd of=/root/big.img bs=1 seek=1073741824 conv=notrunc 2>/dev/null \
                && printf tail | dd of=/root/big.img bs=1 seek=3221221376 conv=notrunc 2>/dev/null && du -k /root/big.img";

    let out = run(&["--copy-out", &co, "--", "sh", "-c", make]);
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "a 3 GiB file over the 1 GiB default is refused: {stderr}");
    assert!(stderr.contains("--copy-out-max") && stderr.contains("3221225472 bytes"), "the error names the size and the flag: {stderr}");
    assert!(!dest.exists(), "nothing at the destination");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "no partial file left: {left:?}");

    let out = run(&["--copy-out-max", "4G", "--copy-out", &co, "--", "sh", "-c", make]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(meta.len(), 3 << 30, "the full apparent size");
    let allocated = meta.blocks() * 512;
    println!("copy-out of a 3 GiB sparse file: {} KiB allocated on the host (guest du: {})", allocated / 1024, text(&out.stdout).trim());
    assert!(allocated < 8 << 20, "holes stay holes: {allocated} bytes allocated");
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(&dest).unwrap();
    let mut b = [0u8; 5];
    f.seek(SeekFrom::Start(1 << 30)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hutch");
    f.seek(SeekFrom::Start((3 << 30) - 4096)).unwrap();
    f.read_exact(&mut b[..4]).unwrap();
    assert_eq!(&b[..4], b"tail");
    f.seek(SeekFrom::Start(12345)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, [0; 5]);
}

/// Runs `hutch run ARGS` and samples its own peak resident memory (`VmHWM`, the process alone: not its QEMU)
/// while it runs. Returns the output and the last peak seen, in KiB.
fn run_sampling_peak(args: &[&str]) -> (std::process::Output, u64) {
    let child = hutch().arg("run").args(args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(v) = st.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()) {
                        peak = peak.max(v);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            peak
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    (out, sampler.join().unwrap())
}

/// Class 18: a guest making 50,000 denied DNS lookups (each a distinct name) does not grow hutch's memory with
/// one record per attempt: without `--audit FILE` no record is kept, the summary counts every attempt, and it
/// keeps a bounded number of distinct destinations (printed: hutch's peak RSS against a run that does nothing).
#[test]
fn class_18_fifty_thousand_denied_lookups_keep_host_memory_bounded() {
    let (out, baseline) = run_sampling_peak(&["--", "python3", "-c", &dns_flood("b", 500, 256)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let n = 50_000;
    let (out, peak) = run_sampling_peak(&["--", "python3", "-c", &dns_flood("n", n, 256)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let answered: usize = text(&out.stdout).trim().strip_prefix("answers ").and_then(|v| v.parse().ok()).unwrap_or(0);
    let total: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("hutch: ")?.strip_suffix(" denied egress attempt(s):")?.parse().ok())
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    println!(
        "{n} denied lookups ({answered} answered in the guest, {total} counted): hutch's own peak RSS {} MiB, against {} MiB for 500 lookups (growth {} MiB)",
        peak / 1024,
        baseline / 1024,
        peak.saturating_sub(baseline) / 1024
    );
    assert!(answered >= n * 9 / 10 && total >= (n * 9 / 10) as u64, "most lookups made it to the gateway: {total} counted, {answered} answered");
    let lines: Vec<&str> = stderr.lines().skip_while(|l| !l.contains("denied egress attempt")).skip(1).take_while(|l| l.starts_with("  ")).collect();
    assert!(lines.len() <= 21, "the summary is a bounded list: {} lines", lines.len());
    let others = lines.last().and_then(|l| l.split(" to ").nth(1)).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<usize>().ok());
    assert!(others.is_some_and(|o| o <= 1001), "distinct destinations kept for the summary are bounded: {lines:?}");
}
