//! Egress seen from the host side of one sandbox, with a real VM and the local test internet
//! (hutch-testnet): where a secret's real value may and may not be, and what devices the VMM
//! gives the guest. The threat classes of ../shared/notes/threats.md are named per test.

mod common;

use std::path::Path;
use std::sync::Arc;

use hutch_gateway::MemoryAuditSink;
use hutch_policy::{CheckedPolicy, PolicyInput};
use hutch_sandbox::egress::Egress;
use common::host;
use hutch_sandbox::{Sandbox, SandboxConfig};
use hutch_testnet::TestNet;
use sha2::{Digest, Sha256};

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("random");
    hex::encode(b)
}

const API: &str = "api.example.test";

/// Which of `needles` occur in the file (read whole; the files here are at most guest-RAM sized).
fn file_has(path: &Path, needles: &[&str]) -> Vec<bool> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    needles
        .iter()
        .map(|n| memchr::memmem::find(&data, n.as_bytes()).is_some())
        .collect()
}

fn stdout(o: &hutch_sandbox::client::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Class 12 (secrets in env, /proc, memory, disk images, snapshots, logs) and, host side, classes
/// 2 and 14. A secret is used by the guest (the upstream receives the real value), then:
/// inside the guest, every process's environment, command line and memory and every file are
/// scanned for the value, known to the scanner only by its SHA-256 (a decoy of the same shape
/// planted in a file shows the scan finds what is there); on the host, QEMU's memory (all of
/// guest RAM), the sandbox's disk layer, console and VMM logs, the image's snapshot files and the
/// audit records are searched for it (the decoy, synced to disk, shows the disk search sees
/// the guest's writes). QEMU's command line shows the only devices: no network, one serial port,
/// QMP on a host socket in the sandbox directory.
#[tokio::test]
async fn threat12_secret_value_is_nowhere_in_the_guest_its_disk_console_memory_or_snapshot() {
    let net = TestNet::start().expect("testnet");
    let host = host();
    let p = net.https_port();
    let real = format!("hutchsecret{}", random_hex(24));
    let decoy = format!("hutchsecret{}", random_hex(24));
    let policy = CheckedPolicy::from_input(&PolicyInput {
        allow: vec![format!("{API}:{p}")],
        resolve: vec![format!("{API}:{p}:127.0.0.1")],
        upstream_ca: vec![net.ca_file().to_path_buf()],
        secrets: vec![format!("API_KEY@{API}")],
        ..PolicyInput::default()
    })
    .expect("policy");
    let audit = Arc::new(MemoryAuditSink::new());
    let value = real.clone();
    let egress = Egress::new(policy, audit.clone()).with_secret_loader(move |p| {
        p.load_secrets_with(|_| Some(value.clone()))
            .map_err(|e| e.to_string())
    });
    let cfg = SandboxConfig {
        egress,
        ..SandboxConfig::default()
    };
    let sb = Sandbox::create(&host, &cfg).await.expect("sandbox");
    let client = sb.client();
    let probe = net.dir().join("probe.py");
    client
        .put_host_file(&probe, "/root/probe.py")
        .await
        .expect("copy probe");
    client
        .put_host_file(net.ca_file(), "/root/testnet-ca.pem")
        .await
        .expect("copy CA");

    let use_it = format!(
        "cat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt && \
         curl -sS --fail -H \"Authorization: Bearer $API_KEY\" https://{API}:{p}/v1/use > /root/response.json && \
         curl -sS --fail --noproxy '*' -H \"Authorization: $API_KEY\" https://{API}:{p}/reflect/authorization >> /root/response.json && \
         echo \"$API_KEY\" > /root/placeholder.txt && echo {decoy} > /root/decoy.txt && sync && \
         grep -c '^API_KEY=hutch-ph-API_KEY-' /proc/1/environ /proc/self/environ"
    );
    let out = client
        .run(&["sh", "-c", &use_it])
        .await
        .expect("use the secret");
    assert_eq!(
        out.status.map(|s| s.as_shell_code()),
        Some(0),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = net.requests_to("/v1/use");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {real}").as_str()),
        "the upstream got the real value"
    );
    assert_eq!(
        net.requests_to("/reflect/authorization")[0].header("authorization"),
        Some(real.as_str())
    );

    // Inside the guest: the value's digest against every environment, command line, process
    // memory and file; the decoy's digest must be found, in the file it was written to.
    let digest = |v: &str| hex::encode(Sha256::digest(v.as_bytes()));
    let tail = (real.len() - "hutchsecret".len()).to_string();
    let (d_real, d_decoy) = (digest(&real), digest(&decoy));
    let scan = client
        .run(&[
            "python3",
            "/root/probe.py",
            "scan",
            "hutchsecret",
            &tail,
            &d_real,
            &d_decoy,
        ])
        .await
        .expect("scan");
    let report = stdout(&scan);
    assert_eq!(
        scan.status.map(|s| s.as_shell_code()),
        Some(0),
        "{report}{}",
        String::from_utf8_lossy(&scan.stderr)
    );
    let places = |d: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{d} found in: ")))
            .unwrap_or_else(|| panic!("no result for {d}: {report}"))
            .to_string()
    };
    assert!(
        places(&d_decoy).contains("/root/decoy.txt"),
        "the scan finds a planted value: {report}"
    );
    assert_eq!(
        places(&d_real),
        "nothing",
        "the real value is in the guest: {report}"
    );
    let placeholder = client
        .run(&["cat", "/root/placeholder.txt"])
        .await
        .expect("placeholder");
    assert!(
        stdout(&placeholder).starts_with("hutch-ph-API_KEY-"),
        "{}",
        stdout(&placeholder)
    );

    // On the host, while the VM runs.
    let qemu = sb.vmm_pid().expect("QEMU pid");
    let (in_memory, read) = hutch_testnet::process_memory_contains(qemu, &[&real, &decoy]);
    assert!(
        read > (256 << 20),
        "read {read} bytes of QEMU memory, expected guest RAM at least"
    );
    assert!(
        in_memory[1],
        "the decoy the guest wrote is in QEMU's memory, so the scan sees guest RAM"
    );
    assert!(!in_memory[0], "the real value is in QEMU's memory");
    let environ = std::fs::read(format!("/proc/{qemu}/environ")).expect("QEMU environ");
    assert!(memchr::memmem::find(&environ, real.as_bytes()).is_none());
    let mut files_seen = Vec::new();
    for e in std::fs::read_dir(sb.dir()).expect("sandbox dir").flatten() {
        if !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        let has = file_has(&e.path(), &[&real, &decoy]);
        assert!(!has[0], "{} holds the real value", e.path().display());
        files_seen.push((e.file_name().to_string_lossy().into_owned(), has[1]));
    }
    assert!(
        files_seen
            .iter()
            .any(|(n, decoy)| n == "disk.qcow2" && *decoy),
        "the disk layer holds the synced decoy: {files_seen:?}"
    );
    assert!(!file_has(sb.console_log(), &[&real])[0], "console log");

    // Classes 2 and 14, host side: the VMM gives the guest no network and one serial port; its
    // monitor is a unix socket in the sandbox's own directory.
    let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(args.iter().any(|a| a == "-nodefaults"), "{args:?}");
    for forbidden in [
        "-netdev",
        "-nic",
        "-net",
        "virtio-net",
        "vhost-vsock",
        "vhost-user",
        "-virtfs",
        "-fsdev",
    ] {
        assert!(
            !args.iter().any(|a| a == forbidden
                || a.contains(&format!("{forbidden}-"))
                || a.starts_with(&format!("{forbidden},"))),
            "QEMU has {forbidden}: {args:?}"
        );
    }
    assert_eq!(
        args.iter()
            .filter(|a| a.starts_with("virtserialport"))
            .count(),
        1,
        "{args:?}"
    );
    let qmp = args
        .iter()
        .position(|a| a == "-qmp")
        .map(|i| args[i + 1].clone())
        .expect("a QMP socket");
    let dir = sb.dir().display().to_string();
    assert!(
        qmp.starts_with(&format!("unix:{dir}/")),
        "QMP {qmp} is in the sandbox directory {dir}"
    );

    let snap = hutch_sandbox::snapshot::ensure(&host, &cfg)
        .await
        .expect("snapshot");
    for f in [&snap.files.memory, &snap.files.state, &snap.disk] {
        assert!(
            !file_has(f, &[&real])[0],
            "{} holds the real value",
            f.display()
        );
    }
    sb.destroy().await;

    let records = audit.records();
    assert!(
        records
            .iter()
            .any(|r| r.secrets.iter().any(|s| s == "API_KEY")),
        "the audit names the secret used"
    );
    let text = serde_json::to_string(&records).expect("audit json");
    assert!(
        !text.contains(&real),
        "the audit records hold the real value"
    );
}
