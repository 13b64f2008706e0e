//! The guest's only way out: everything leaves through streams to the host's gateway. A DNS server answers
//! allowed names with addresses from a private range, a redirect sends every TCP connection to those addresses
//! to the agent, which carries it to the host with the name it stands for; an HTTP proxy serves programs that
//! honour `HTTP(S)_PROXY`. There is no network device, so nothing else has a route anywhere.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use hutch_proto::frame::{read_header, write_header};
use hutch_proto::{DnsReply, GuestRequest, Session};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Addresses the resolver hands out (RFC 2544 benchmarking range: never a real destination).
const FAKE_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
const FAKE_PREFIX: u32 = 15;
pub const PROXY_ADDR: &str = "127.0.0.1:3128";
const REDIRECT_PORT: u16 = 15001;
const DNS_ADDR: &str = "127.0.0.53:53";

/// The current host session, if one is attached (it changes across a snapshot restore).
pub type SessionSlot = Arc<Mutex<Option<Session>>>;

fn current(slot: &SessionSlot) -> Option<Session> {
    match slot.lock() {
        Ok(s) => s.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

#[derive(Default)]
struct Names {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
    next: u32,
}

impl Names {
    fn assign(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_name.get(name) {
            return Some(*ip);
        }
        let size = 1u32 << (32 - FAKE_PREFIX);
        if self.next + 2 >= size {
            return None;
        }
        self.next += 1;
        let ip = Ipv4Addr::from(u32::from(FAKE_NET) + self.next);
        self.by_name.insert(name.to_string(), ip);
        self.by_addr.insert(ip, name.to_string());
        Some(ip)
    }
}

/// Routes the fake range to loopback and redirects TCP to it to the agent; points the resolver at the agent.
/// Runs once at boot (before any snapshot); failures are reported on the console and leave the guest with
/// even less network, never more.
pub fn setup_routing() {
    let run = |argv: &[&str], input: Option<&str>| {
        use std::io::Write;
        let mut cmd = std::process::Command::new(argv[0]);
        cmd.args(&argv[1..]).stdin(std::process::Stdio::piped());
        match cmd.spawn() {
            Ok(mut child) => {
                if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
                    let _ = stdin.write_all(text.as_bytes());
                }
                match child.wait() {
                    Ok(st) if st.success() => {}
                    Ok(st) => eprintln!("hutch-agent: {} failed: {st}", argv.join(" ")),
                    Err(e) => eprintln!("hutch-agent: {}: {e}", argv.join(" ")),
                }
            }
            Err(e) => eprintln!("hutch-agent: cannot run {}: {e}", argv[0]),
        }
    };
    let net = format!("{FAKE_NET}/{FAKE_PREFIX}");
    run(&["/usr/sbin/ip", "route", "add", "local", &net, "dev", "lo"], None);
    let rules = format!(
        "table ip hutch {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    ip daddr {net} meta l4proto tcp redirect to :{REDIRECT_PORT}\n  }}\n}}\n"
    );
    run(&["/usr/sbin/nft", "-f", "-"], Some(&rules));
    if let Err(e) = std::fs::write("/etc/resolv.conf", "nameserver 127.0.0.53\noptions timeout:2 attempts:1\n") {
        eprintln!("hutch-agent: cannot write /etc/resolv.conf: {e}");
    }
}

/// Starts the DNS server, the redirect target and the HTTP proxy. They live as long as the agent; each
/// connection uses whichever host session is current.
pub async fn start(slot: SessionSlot) -> std::io::Result<()> {
    let names = Arc::new(Mutex::new(Names::default()));
    let dns = UdpSocket::bind(DNS_ADDR).await?;
    tokio::spawn(serve_dns(dns, slot.clone(), names.clone()));
    let redirect = TcpListener::bind(("127.0.0.1", REDIRECT_PORT)).await?;
    tokio::spawn(serve_redirect(redirect, slot.clone(), names));
    let proxy = TcpListener::bind(PROXY_ADDR).await?;
    tokio::spawn(serve_proxy(proxy, slot));
    Ok(())
}

async fn carry(slot: &SessionSlot, mut tcp: TcpStream, header: GuestRequest) {
    let Some(session) = current(slot) else { return refuse(tcp).await };
    let Ok(mut stream) = session.open().await else { return refuse(tcp).await };
    if write_header(&mut stream, &header).await.is_err() {
        return refuse(tcp).await;
    }
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
}

/// Ends a guest connection that goes nowhere the way a refusal through the gateway ends: an orderly close the
/// client reads as end of stream. Dropping it at once would answer with a reset whenever the client's first bytes
/// had already arrived (the kernel resets a socket closed with unread data), so the outcome would depend on timing.
/// What the client sends meanwhile is read and discarded, bounded in bytes and time.
async fn refuse(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

async fn serve_proxy(listener: TcpListener, slot: SessionSlot) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let slot = slot.clone();
        tokio::spawn(async move { carry(&slot, tcp, GuestRequest::Proxy).await });
    }
}

async fn serve_redirect(listener: TcpListener, slot: SessionSlot, names: Arc<Mutex<Names>>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let Some(dst) = original_dst(&tcp) else { continue };
        let name = match names.lock() {
            Ok(n) => n.by_addr.get(dst.ip()).cloned(),
            Err(p) => p.into_inner().by_addr.get(dst.ip()).cloned(),
        };
        // An address the resolver never handed out stands for no name: nothing to connect to.
        let Some(name) = name else {
            tokio::spawn(refuse(tcp));
            continue;
        };
        let slot = slot.clone();
        tokio::spawn(async move { carry(&slot, tcp, GuestRequest::Tunnel { name, port: dst.port() }).await });
    }
}

fn original_dst(tcp: &TcpStream) -> Option<SocketAddrV4> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: SO_ORIGINAL_DST writes at most `len` bytes of a sockaddr_in into `addr`.
    let r = unsafe {
        libc::getsockopt(tcp.as_raw_fd(), libc::SOL_IP, libc::SO_ORIGINAL_DST, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len)
    };
    if r != 0 {
        return None;
    }
    Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port)))
}

async fn ask_host(slot: &SessionSlot, name: &str) -> bool {
    let Some(session) = current(slot) else { return false };
    let Ok(mut stream) = session.open().await else { return false };
    if write_header(&mut stream, &GuestRequest::Dns { name: name.to_string() }).await.is_err() {
        return false;
    }
    matches!(read_header::<_, DnsReply>(&mut stream).await, Ok(DnsReply::Allowed))
}

async fn serve_dns(sock: UdpSocket, slot: SessionSlot, names: Arc<Mutex<Names>>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else { continue };
        let query = buf[..n].to_vec();
        let (sock, slot, names) = (sock.clone(), slot.clone(), names.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&query, &slot, &names).await {
                let _ = sock.send_to(&reply, peer).await;
            }
        });
    }
}

async fn answer(query: &[u8], slot: &SessionSlot, names: &Mutex<Names>) -> Option<Vec<u8>> {
    use simple_dns::rdata::{RData, A};
    use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
    let packet = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE | PacketFlag::RECURSION_DESIRED);
    let Some(q) = packet.questions.first() else {
        *reply.rcode_mut() = RCODE::FormatError;
        return reply.build_bytes_vec().ok();
    };
    reply.questions.push(q.clone());
    let name = q.qname.to_string();
    let allowed = ask_host(slot, &name).await;
    if !allowed {
        *reply.rcode_mut() = RCODE::NameError;
        return reply.build_bytes_vec().ok();
    }
    if q.qtype == QTYPE::TYPE(TYPE::A) {
        let ip = match names.lock() {
            Ok(mut n) => n.assign(&name.to_ascii_lowercase()),
            Err(p) => p.into_inner().assign(&name.to_ascii_lowercase()),
        };
        match ip {
            Some(ip) => reply.answers.push(ResourceRecord::new(q.qname.clone(), CLASS::IN, 3600, RData::A(A { address: u32::from(ip) }))),
            None => *reply.rcode_mut() = RCODE::ServerFailure,
        }
    }
    // Other types for an allowed name (AAAA first of all): no records, so clients use the A answer.
    reply.build_bytes_vec().ok()
}
