//! `hutch run` end to end, with real VMs: output, exit codes, stdin, env, files, timeouts, isolation, cleanup.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn guest_kernel_streams_and_exit_code() {
    let out = run(&["--", "sh", "-c", "uname -r; echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let release = lines.next().unwrap();
    assert!(release.contains("cloud-amd64"), "guest kernel release, got {release:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(release, host.trim(), "the guest runs its own kernel");
    assert_eq!(lines.next(), Some("out"));
    assert_eq!(lines.next(), None, "stderr must not leak into stdout");
    assert!(text(&out.stderr).lines().any(|l| l == "err"), "stderr: {}", text(&out.stderr));
}

#[test]
fn signals_give_128_plus_n_and_missing_programs_127() {
    let out = run(&["--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "stderr: {}", text(&out.stderr));
    let out = run(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143));
    let out = run(&["--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("/no/such/program"), "names the program: {}", text(&out.stderr));
}

#[test]
fn hundred_mib_of_output_without_loss_or_reordering() {
    // ~92 MB on stdout and ~7 MB on stderr, written concurrently.
    let out = run(&["--", "sh", "-c", "seq 1 1000000 >&2 & seq 1 12000000; wait"]);
    assert_eq!(out.status.code(), Some(0), "stderr tail: {}", text(&out.stderr[out.stderr.len().saturating_sub(500)..]));
    let expect_out = std::process::Command::new("seq").args(["1", "12000000"]).output().unwrap().stdout;
    assert_eq!(out.stdout.len(), expect_out.len(), "stdout length");
    assert!(out.stdout == expect_out, "stdout content differs");
    let expect_err = std::process::Command::new("seq").args(["1", "1000000"]).output().unwrap().stdout;
    // stderr also carries hutch's own warning lines; the guest's part must be intact and in order.
    let pos = out.stderr.windows(expect_err.len().min(64)).position(|w| w == &expect_err[..64]).expect("stderr start");
    assert!(out.stderr[pos..pos + expect_err.len()] == expect_err[..], "stderr content differs");
}

#[test]
fn stdin_is_forwarded_small_and_large() {
    let mut child = hutch()
        .args(["run", "--", "sh", "-c", "read first; echo got:$first; wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(b"hello\n").unwrap();
        stdin.write_all(&vec![b'x'; 5 * 1024 * 1024]).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("got:hello\n"), "{stdout}");
    assert_eq!(stdout.lines().nth(1).map(str::trim), Some("5242880"));
}

#[test]
fn env_and_workdir() {
    let out = run(&["--env", "FOO=bar baz", "-e", "EMPTY=", "--workdir", "/tmp", "--", "sh", "-c", "echo \"$FOO|$EMPTY|$(pwd)|$HOME\""]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "bar baz||/tmp|/root");
    let out = run(&["--env", "1BAD=x", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a valid variable name"), "{}", text(&out.stderr));
}

#[test]
fn copy_in_and_copy_out_round_trip_bytes_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let mut data = vec![0u8; 3 * 1024 * 1024 + 17];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut data).unwrap();
    std::fs::write(&input, &data).unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o750)).unwrap();
    let output = dir.path().join("out.bin");
    let ci = format!("{}:/root/sub/in.bin", input.display());
    let co = format!("/root/made.bin:{}", output.display());
    let out = run(&[
        "--copy-in",
        &ci,
        "--copy-out",
        &co,
        "--",
        "sh",
        "-c",
        "stat -c %a /root/sub/in.bin; cat /root/sub/in.bin /root/sub/in.bin > /root/made.bin; chmod 640 /root/made.bin",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "750");
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), data.len() * 2);
    assert!(back[..data.len()] == data[..] && back[data.len()..] == data[..]);
    assert_eq!(std::fs::metadata(&output).unwrap().permissions().mode() & 0o777, 0o640);

    // A missing guest file is a clear error and leaves no partial file behind.
    let missing = dir.path().join("missing.bin");
    let co = format!("/root/nope:{}", missing.display());
    let out = run(&["--copy-out", &co, "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("/root/nope"), "{}", text(&out.stderr));
    assert!(!missing.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".hutch")).collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn host_files_are_invisible_and_runs_share_nothing() {
    let marker = format!("/tmp/hutch-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host secret").unwrap();
    let probe = format!("test ! -e {marker} && test ! -e /work && test ! -e /root/.cargo && echo isolated");
    let out = run(&["--", "sh", "-c", &probe]);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(text(&out.stdout).trim(), "isolated", "{}", text(&out.stderr));

    let out = run(&["--", "sh", "-c", "echo data > /root/persist && echo data > /etc/persist && sync"]);
    assert_eq!(out.status.code(), Some(0));
    let out = run(&["--", "sh", "-c", "test ! -e /root/persist && test ! -e /etc/persist && echo clean"]);
    assert_eq!(text(&out.stdout).trim(), "clean", "{}", text(&out.stderr));
}

#[test]
fn timeout_kills_the_vm_and_exits_124() {
    let t0 = Instant::now();
    let out = run(&["--timeout", "2", "--", "sh", "-c", "echo started; sleep 600"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "started");
    assert!(text(&out.stderr).contains("timed out"), "{}", text(&out.stderr));
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_guest_that_never_comes_up_is_a_clear_error_within_the_timeout() {
    // The initramfs's busybox sleeps as PID 1 instead of starting the agent.
    let t0 = Instant::now();
    let out = run(&["--cold", "--boot-timeout", "4", "--kernel-arg", "rdinit=/bin/busybox -- sleep 9999", "--", "true"]);
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("did not come up within 4"), "{stderr}");
    assert!(stderr.contains("retrying once"), "the hang is retried once: {stderr}");
    assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
}

#[test]
fn hutch_killed_mid_run_leaves_nothing_and_signals_tear_down() {
    for (sig, code) in [(libc_sig::KILL, None), (libc_sig::TERM, Some(143)), (libc_sig::INT, Some(130))] {
        let mut child = hutch()
            .args(["run", "--", "sh", "-c", "echo started; sleep 600"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = [0u8; 8];
        stdout.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"started\n");
        // Find this run's sandbox directory through its QEMU process.
        let pid = child.id();
        let qemus: Vec<u32> = processes_mentioning("/sandboxes/")
            .into_iter()
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).map(|s| s.split_whitespace().nth(3) == Some(&pid.to_string())).unwrap_or(false))
            .collect();
        assert_eq!(qemus.len(), 1, "one QEMU child");
        // Hardening: as root, the VMM drops to an unprivileged account once it has opened its files.
        let status = std::fs::read_to_string(format!("/proc/{}/status", qemus[0])).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
        if nix_is_root() {
            assert!(!uid_line.split_whitespace().skip(1).any(|u| u == "0"), "QEMU still runs as root: {uid_line}");
        }
        let cmdline = String::from_utf8(std::fs::read(format!("/proc/{}/cmdline", qemus[0])).unwrap()).unwrap();
        let dir = cmdline.split('\0').find_map(|a| a.split("path=").nth(1).and_then(|p| p.strip_suffix("/console.log"))).unwrap().to_string();
        std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
        let st = child.wait().unwrap();
        assert_eq!(st.code(), code, "exit code after {sig}");
        assert!(wait_until(Duration::from_secs(5), || processes_mentioning(&dir).is_empty()), "QEMU of {dir} still running after {sig}");
        if code.is_some() {
            assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind after {sig}");
        } else {
            // SIGKILL leaves the directory; the next run reaps it.
            let out = run(&["--", "true"]);
            assert_eq!(out.status.code(), Some(0));
            assert!(!std::path::Path::new(&dir).exists(), "{dir} not reaped by the next run");
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").unwrap().lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

mod libc_sig {
    pub const KILL: &str = "-KILL";
    pub const TERM: &str = "-TERM";
    pub const INT: &str = "-INT";
}

#[test]
fn two_runs_at_once_are_separate_machines() {
    let spawn = |tag: &str| {
        hutch()
            .args(["run", "--", "sh", "-c", &format!("echo {tag} > /root/tag; sleep 1; cat /root/tag; echo $HUTCH_SANDBOX_ID; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let a = std::thread::spawn(move || spawn("alpha"));
    let b = spawn("beta");
    let a = a.join().unwrap();
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    let (sa, sb) = (text(&a.stdout), text(&b.stdout));
    let la: Vec<&str> = sa.lines().collect();
    let lb: Vec<&str> = sb.lines().collect();
    assert_eq!(la[0], "alpha");
    assert_eq!(lb[0], "beta");
    assert_ne!(la[1], lb[1], "sandbox ids differ");
    assert_ne!(la[2], lb[2], "restored siblings must not share RNG output");
}

#[test]
fn restored_clock_matches_the_host() {
    let out = run(&["--", "date", "+%s.%N"]);
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let guest: f64 = text(&out.stdout).trim().parse().expect("a timestamp");
    assert!((host_now - guest).abs() < 1.0, "guest clock {guest} vs host {host_now}");
}

#[test]
fn bad_input_is_refused_before_anything_runs() {
    for (args, needle) in [
        (vec!["run", "--cpus", "0", "--", "true"], "0 is not in 1..=64"),
        (vec!["run", "--memory", "12", "--", "true"], "not in 128"),
        (vec!["run", "--copy-in", "/nonexistent:/x", "--", "true"], "not a readable file"),
        (vec!["run", "--copy-in", "/etc/hostname:relative", "--", "true"], "must be absolute"),
        (vec!["run", "--timeout", "0", "--", "true"], "timeout must be"),
        (vec!["run", "--accel", "kvm", "--", "true"], ""),
    ] {
        let out = hutch().args(&args).stdin(Stdio::null()).output().unwrap();
        let stderr = text(&out.stderr);
        if args.contains(&"kvm") {
            // Explicit KVM on a host without hardware KVM is refused, never silently downgraded.
            if std::path::Path::new("/sys/module/kvm_pvm").exists() || !std::path::Path::new("/dev/kvm").exists() {
                assert_ne!(out.status.code(), Some(0));
                assert!(stderr.contains("--accel tcg"), "{stderr}");
            } else {
                println!("hardware KVM present: the --accel kvm refusal is not exercised on this host");
            }
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Snapshot directories (of any image in the cache) made for `memory_mib`.
fn snapshots_for_memory(memory_mib: u32) -> Vec<std::path::PathBuf> {
    let mut found = vec![];
    for img in std::fs::read_dir(runtime_root().join("images")).into_iter().flatten().flatten() {
        for snap in std::fs::read_dir(img.path().join("snapshots")).into_iter().flatten().flatten() {
            let meta = std::fs::read_to_string(snap.path().join("meta.json")).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&meta).unwrap_or_default();
            if v["memory_mib"] == memory_mib {
                found.push(snap.path());
            }
        }
    }
    found
}

#[test]
fn a_missing_snapshot_means_a_cold_boot_and_a_rebuild_in_the_background() {
    // A size no other test uses.
    let memory = 448;
    for s in snapshots_for_memory(memory) {
        std::fs::remove_dir_all(s).unwrap();
    }
    let out = run(&["--memory", "448", "--", "echo", "hi"]);
    let err = text(&out.stderr);
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "hi\n"), "{err}");
    assert!(err.contains("booting cold"), "{err}");
    let pid: u32 = err
        .split("rebuilding the snapshot in the background (pid ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no background rebuild announced: {err}"));
    assert!(wait_until(Duration::from_secs(120), || !std::path::Path::new(&format!("/proc/{pid}")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true)), "the rebuild did not finish");
    assert_eq!(snapshots_for_memory(memory).len(), 1, "one snapshot made");
    // The next run restores: no fallback, no rebuild.
    let out = run(&["--memory", "448", "--", "echo", "again"]);
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "again\n", "{err}");
    assert!(!err.contains("booting cold") && !err.contains("rebuilding"), "{err}");
}
