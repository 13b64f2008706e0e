# Attack probes egress tests run inside a VM (python3 is in every Hutch image); see GUEST_PROBE.
# Usage: python3 probe.py KIND ARGS...; prints one result line; exit 0 = the attempt got through
# (connected, got an answer), 1 = it got an answer that refuses it, 2 = it failed outright
# (no route, refused, reset, timeout).
import errno
import hashlib
import os
import socket
import ssl
import struct
import sys
import time


def fail(e):
    name = errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
    print("error", name, str(e)[:200])
    sys.exit(2)


def dns_packet(labels, qtype):
    hdr = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(l)]) + l for l in labels) + b"\0" + struct.pack(">HH", qtype, 1)
    return hdr + q


def skip_name(buf, i):
    while True:
        n = buf[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n


def dns_reply(buf):
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", buf[:12])
    i = 12
    for _ in range(qd):
        i = skip_name(buf, i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(buf, i)
        typ, _, _, rdlen = struct.unpack(">HHIH", buf[i:i + 10])
        i += 10
        if typ == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(buf[i:i + 4]))
        i += rdlen
    return flags & 0xF, an, addrs


def labels_of(spec):
    # "a.b.c" or, for bytes a name cannot spell, python bytes literals joined by '|': b'a\x00b'|b'test'
    if spec.startswith("b'") or spec.startswith('b"'):
        return [eval(p) for p in spec.split("|")]  # noqa: S307 - the test wrote these literals
    return [l.encode() for l in spec.split(".") if l]


def dns(server, spec, qtype="1", tcp=False):
    pkt = dns_packet(labels_of(spec), int(qtype))
    try:
        if tcp:
            s = socket.create_connection((server, 53), timeout=4)
            s.sendall(struct.pack(">H", len(pkt)) + pkt)
            buf = s.recv(4096)[2:]
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(4)
            s.sendto(pkt, (server, 53))
            buf, _ = s.recvfrom(4096)
    except OSError as e:
        fail(e)
    rcode, an, addrs = dns_reply(buf)
    print("rcode=%d answers=%d addrs=%s" % (rcode, an, ",".join(addrs)))
    sys.exit(0 if an > 0 else 1)


def udp(host, port, payload=b"probe"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    try:
        s.connect((host, int(port)))
        s.send(payload)
        s.send(payload)
        data = s.recv(4096)
    except socket.timeout:
        print("sent, no reply")
        sys.exit(2)
    except OSError as e:
        fail(e)
    print("reply", data[:60])
    sys.exit(0)


def tcp(host, port):
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.settimeout(3)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(200)
    except OSError as e:
        fail(e)
    if not data:
        print("connected, closed without a byte")
        sys.exit(2)
    print("connected, got", data[:80])
    sys.exit(0)


def icmp(host):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.settimeout(2)
        body = struct.pack(">BBHHH", 8, 0, 0, 1, 1) + b"hutch"
        csum = 0
        for i in range(0, len(body), 2):
            csum += (body[i] << 8) + (body[i + 1] if i + 1 < len(body) else 0)
        csum = ~((csum >> 16) + (csum & 0xFFFF)) & 0xFFFF
        body = body[:2] + struct.pack(">H", csum) + body[4:]
        s.sendto(body, (host, 0))
        s.recv(200)
    except OSError as e:
        fail(e)
    print("echo reply")
    sys.exit(0)


def raw_ip(host):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.sendto(b"\x00" * 28, (host, 0))
    except OSError as e:
        fail(e)
    print("sent a raw packet")
    sys.exit(0)


def vsock(cid, port):
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect((int(cid), int(port)))
    except OSError as e:
        fail(e)
    print("connected")
    sys.exit(0)


def proxy_raw(request):
    # The request as a python string literal, so CR, LF and NUL can be spelled.
    text = eval(request)  # noqa: S307 - the test wrote this literal
    try:
        data = text.encode("latin-1")
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        s.sendall(data)
        s.settimeout(10)
        resp = s.recv(4096)
    except OSError as e:
        fail(e)
    line = resp.split(b"\r\n", 1)[0].decode("latin-1")
    body = resp.split(b"\r\n\r\n", 1)[-1][:300].decode("latin-1").replace("\n", " ")
    print(line, "|", body)
    sys.exit(0 if line.split(" ")[1:2] == ["200"] else 1)


def tls_context(sni):
    # Built before connecting: loading the trust bundle is slow under emulation, and a client
    # that is slow to send its ClientHello is a different case (see "tls-connect-slow").
    ctx = ssl.create_default_context()
    if sni == "-":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sni = None
    return ctx, sni


def tls_request(sock, ctx, sni, host_header, path):
    try:
        t = ctx.wrap_socket(sock, server_hostname=sni)
        t.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host_header)).encode())
        resp = b""
        while len(resp) < 65536:
            chunk = t.recv(65536)
            if not chunk:
                break
            resp += chunk
    except (OSError, ssl.SSLError) as e:
        fail(e)
    line = resp.split(b"\r\n", 1)[0].decode("latin-1")
    print(line, "|", resp.split(b"\r\n\r\n", 1)[-1][:400].decode("latin-1").replace("\n", " "))
    sys.exit(0 if line.split(" ")[1:2] == ["200"] else 1)


def tls_via_connect(target, sni, host_header, path="/", delay="0"):
    ctx, sni = tls_context(sni)
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
        s.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            c = s.recv(1)
            if not c:
                break
            head += c
    except OSError as e:
        fail(e)
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200" not in status:
        print("CONNECT refused:", status)
        sys.exit(1)
    time.sleep(float(delay))
    tls_request(s, ctx, sni, host_header, path)


def tls_direct(host, port, sni, host_header, path="/", delay="0"):
    ctx, sni = tls_context(sni)
    try:
        s = socket.create_connection((host, int(port)), timeout=30)
    except OSError as e:
        fail(e)
    time.sleep(float(delay))
    tls_request(s, ctx, sni, host_header, path)


def peer_cert(host, port, sni):
    # Writes the certificate the guest is shown for SNI (through the tunnel) as PEM on stdout.
    ctx = ssl.create_default_context()
    try:
        s = socket.create_connection((host, int(port)), timeout=10)
        t = ctx.wrap_socket(s, server_hostname=sni)
        der = t.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        fail(e)
    print(ssl.DER_cert_to_PEM_cert(der), end="")
    sys.exit(0)


def scan(prefix, tail_len, *digests):
    # Looks for PREFIX followed by TAIL_LEN characters whose SHA-256 (of PREFIX+tail) is one of
    # DIGESTS in every process's environment, command line and memory, and every regular file;
    # the scan itself never holds a value unless it finds it. Prints one line per digest:
    # "DIGEST found in: PLACES" (or "nothing").
    prefix = prefix.encode()
    tail_len = int(tail_len)
    found = {d: [] for d in digests}

    def check(buf, where):
        i = buf.find(prefix)
        while i != -1:
            cand = buf[i:i + len(prefix) + tail_len]
            if len(cand) == len(prefix) + tail_len:
                d = hashlib.sha256(cand).hexdigest()
                if d in found and where not in found[d]:
                    found[d].append(where)
            i = buf.find(prefix, i + 1)

    me = str(os.getpid())
    procs = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        procs += 1
        for part in ("environ", "cmdline"):
            try:
                with open("/proc/%s/%s" % (pid, part), "rb") as f:
                    check(f.read(), "/proc/%s/%s" % (pid, part))
            except OSError:
                pass
        if pid == me:
            continue
        try:
            maps = open("/proc/%s/maps" % pid).read().splitlines()
            mem = open("/proc/%s/mem" % pid, "rb", 0)
        except OSError:
            continue
        for line in maps:
            rng, perms = line.split()[:2]
            if "r" not in perms:
                continue
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if hi - lo > 512 << 20:
                continue
            try:
                mem.seek(lo)
                check(mem.read(hi - lo), "/proc/%s/mem %s" % (pid, line.split()[-1]))
            except (OSError, ValueError, OverflowError):
                pass
    files = 0
    for root, dirs, names in os.walk("/"):
        if root in ("/proc", "/sys", "/dev"):
            dirs[:] = []
            continue
        for n in names:
            p = os.path.join(root, n)
            try:
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                with open(p, "rb") as f:
                    check(f.read(64 << 20), p)
                files += 1
            except OSError:
                pass
    print("scanned %d processes, %d files" % (procs, files))
    for d in digests:
        print("%s found in: %s" % (d, ";".join(found[d]) or "nothing"))
    sys.exit(0)


def pem_keys():
    # Files holding a PEM private key block (format strings in libraries do not count: a real
    # block is followed by base64).
    import re
    pat = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{32,}")
    found = []
    for root, dirs, names in os.walk("/"):
        if root in ("/proc", "/sys", "/dev"):
            dirs[:] = []
            continue
        for n in names:
            p = os.path.join(root, n)
            try:
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                with open(p, "rb") as f:
                    data = f.read(64 << 20)
                # Libraries carry test vectors; a key Hutch put in the guest would be a file.
                if not data.startswith(b"\x7fELF") and pat.search(data):
                    found.append(p)
            except OSError:
                pass
    print("private keys:", " ".join(found) or "none")
    sys.exit(0 if found else 1)


KINDS = {
    "dns": dns,
    "dnstcp": lambda server, spec, qtype="1": dns(server, spec, qtype, tcp=True),
    "udp": udp,
    "tcp": tcp,
    "icmp": icmp,
    "rawip": raw_ip,
    "vsock": vsock,
    "proxy": proxy_raw,
    "tls-connect": tls_via_connect,
    "tls-connect-slow": lambda target, sni, host, path="/": tls_via_connect(target, sni, host, path, "1.5"),
    "tls-direct": tls_direct,
    "peer-cert": peer_cert,
    "scan": scan,
    "pemkeys": pem_keys,
}

if __name__ == "__main__":
    KINDS[sys.argv[1]](*sys.argv[2:])
