//! Sandbox-level tests with real VMs: terminals, identity after restore, snapshot fallback.

mod common;

use std::time::Duration;

use hutch_proto::{ExecEvent, ExecInput, ExecRequest, TtySize};
use common::host;
use hutch_sandbox::{Sandbox, SandboxConfig, StartMode};

async fn read_until(events: &mut hutch_sandbox::client::ExecEvents, needle: &str, buf: &mut String) {
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        while !buf.contains(needle) {
            match events.next().await {
                Some(ExecEvent::Stdout(b)) => buf.push_str(&String::from_utf8_lossy(&b)),
                Some(ExecEvent::Exited(st)) => panic!("exited early ({st:?}); output so far: {buf}"),
                Some(_) => {}
                None => panic!("stream ended; output so far: {buf}"),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "timed out waiting for {needle:?}; got {buf:?}");
}

#[tokio::test]
async fn terminal_session_with_resize_and_ctrl_c() {
    let host = host();
    let sb = Sandbox::create(&host, &SandboxConfig::default()).await.unwrap();
    let req = ExecRequest { argv: vec!["/bin/bash".into(), "--norc".into(), "-i".into()], env: vec![], cwd: None, stdin: true, tty: Some(TtySize { rows: 24, cols: 80 }) };
    let mut h = sb.client().exec(req).await.unwrap();
    let mut out = String::new();
    read_until(&mut h.events, "# ", &mut out).await;
    h.input.send(ExecInput::Stdin(b"tty; stty size; echo MARK$((1))\n".to_vec())).await.unwrap();
    read_until(&mut h.events, "MARK1\r\n", &mut out).await;
    assert!(out.contains("/dev/pts/"), "a real terminal: {out}");
    assert!(out.contains("24 80"), "initial size: {out}");
    h.input.send(ExecInput::Resize(TtySize { rows: 50, cols: 132 })).await.unwrap();
    h.input.send(ExecInput::Stdin(b"stty size; echo MARK$((2))\n".to_vec())).await.unwrap();
    read_until(&mut h.events, "MARK2\r\n", &mut out).await;
    assert!(out.contains("50 132"), "resized: {out}");
    // ^C goes through the terminal's line discipline to the foreground job, not to the shell.
    h.input.send(ExecInput::Stdin(b"sleep 600\n".to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.input.send(ExecInput::Stdin(vec![3])).await.unwrap();
    h.input.send(ExecInput::Stdin(b"echo after-$((0))-$?\n".to_vec())).await.unwrap();
    read_until(&mut h.events, "after-0-130", &mut out).await;
    h.input.send(ExecInput::Stdin(b"exit 3\n".to_vec())).await.unwrap();
    let st = loop {
        match h.events.next().await {
            Some(ExecEvent::Exited(st)) => break st,
            Some(_) => {}
            None => panic!("no exit status"),
        }
    };
    assert_eq!(st.as_shell_code(), 3);
    sb.destroy().await;
}

#[tokio::test]
async fn restored_siblings_differ_in_randomness_and_identity() {
    let host = host();
    let cfg = SandboxConfig::default();
    hutch_sandbox::snapshot::ensure(&host, &cfg).await.unwrap();
    let a = Sandbox::create(&host, &cfg).await.unwrap();
    let b = Sandbox::create(&host, &cfg).await.unwrap();
    assert_eq!(a.start.mode, StartMode::Restored);
    assert_eq!(b.start.mode, StartMode::Restored);
    let cmd = ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; echo $HUTCH_SANDBOX_ID; date +%s.%N"];
    let (oa, ob) = tokio::join!(a.client().run(&cmd), b.client().run(&cmd));
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let (oa, ob) = (String::from_utf8(oa.unwrap().stdout).unwrap(), String::from_utf8(ob.unwrap().stdout).unwrap());
    let la: Vec<&str> = oa.lines().collect();
    let lb: Vec<&str> = ob.lines().collect();
    assert_eq!(la[0].len(), 64);
    assert_ne!(la[0], lb[0], "two restores of one snapshot produced the same random bytes");
    assert_eq!(la[1], a.id);
    assert_eq!(lb[1], b.id);
    for l in [la[2], lb[2]] {
        let t: f64 = l.parse().unwrap();
        assert!((host_now - t).abs() < 1.0, "guest clock {t} vs host {host_now}");
    }
    a.destroy().await;
    b.destroy().await;
}

#[tokio::test]
async fn corrupt_snapshot_falls_back_to_a_cold_boot_and_is_rebuilt() {
    let host = host();
    // A size no other test uses, so corrupting its snapshot disturbs nobody.
    let cfg = SandboxConfig { memory_mib: 320, ..SandboxConfig::default() };
    let snap = hutch_sandbox::snapshot::ensure(&host, &cfg).await.unwrap();
    let mut state = std::fs::read(&snap.files.state).unwrap();
    let mid = state.len() / 2;
    state[mid] ^= 0xff;
    std::fs::write(&snap.files.state, &state).unwrap();

    let notes = std::sync::Mutex::new(Vec::new());
    let sb = Sandbox::create_with_notes(&host, &cfg, &|n| notes.lock().unwrap().push(n.to_string())).await.unwrap();
    assert_eq!(sb.start.mode, StartMode::Cold);
    let notes = notes.into_inner().unwrap();
    assert!(notes.iter().any(|n| n.contains("corrupt") || n.contains("restore failed")), "warned: {notes:?}");
    let out = sb.client().run(&["echo", "ok"]).await.unwrap();
    assert_eq!(out.stdout, b"ok\n");
    sb.destroy().await;

    // Damaged RAM that passes the cheap checks: the restore fails or hangs, and the run still succeeds cold.
    let snap = hutch_sandbox::snapshot::ensure(&host, &cfg).await.unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&snap.files.memory).unwrap();
    use std::os::unix::fs::FileExt;
    let garbage = vec![0xccu8; 16 * 1024 * 1024];
    f.write_all_at(&garbage, 1024 * 1024).unwrap();
    drop(f);
    let sb = Sandbox::create(&host, &cfg).await.unwrap();
    let out = sb.client().run(&["echo", "ok"]).await.unwrap();
    assert_eq!(out.stdout, b"ok\n");
    sb.destroy().await;
}

#[tokio::test]
async fn warm_pool_hands_out_distinct_sandboxes_and_drains_clean() {
    let host = host();
    let cfg = SandboxConfig::default();
    let pool = hutch_sandbox::pool::Pool::start(host.clone(), cfg.clone(), 2);
    assert!(pool.wait_full(Duration::from_secs(60)).await, "pool filled");
    let a = pool.take(&cfg).await.unwrap();
    let b = pool.take(&cfg).await.unwrap();
    assert_eq!(a.start.mode, StartMode::Pooled);
    assert_eq!(b.start.mode, StartMode::Pooled);
    let cmd = ["sh", "-c", "echo $HUTCH_SANDBOX_ID; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"];
    let (oa, ob) = (a.client().run(&cmd).await.unwrap(), b.client().run(&cmd).await.unwrap());
    let (oa, ob) = (String::from_utf8(oa.stdout).unwrap(), String::from_utf8(ob.stdout).unwrap());
    assert_eq!(oa.lines().next(), Some(a.id.as_str()));
    assert_eq!(ob.lines().next(), Some(b.id.as_str()));
    assert_ne!(oa.lines().nth(1), ob.lines().nth(1), "pooled siblings share RNG output");
    // A different size bypasses the pool.
    let other = SandboxConfig { memory_mib: 384, ..SandboxConfig::default() };
    let c = pool.take(&other).await.unwrap();
    assert_ne!(c.start.mode, StartMode::Pooled);
    // Let the pool refill, then drain: no VMM of it may survive.
    assert!(pool.wait_full(Duration::from_secs(60)).await, "pool refilled");
    let pooled = pool.ready_dirs();
    assert_eq!(pooled.len(), 2);
    pool.drain().await;
    for d in pooled {
        assert!(!d.exists(), "pooled sandbox dir {} left after drain", d.display());
        let needle = d.to_string_lossy().into_owned();
        let alive = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).map(|c| c.windows(needle.len()).any(|w| w == needle.as_bytes())).unwrap_or(false)
        });
        assert!(!alive, "a VMM of {needle} survived the drain");
    }
    for sb in [a, b, c] {
        sb.destroy().await;
    }
}
