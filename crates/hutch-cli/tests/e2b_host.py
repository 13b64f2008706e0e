"""get_host(port) against `hutch serve` (run by tests/e2b.rs with OTHER_KEY, a second token's key): an HTTP
server started inside the sandbox is reached at /e2b-port/<id>/<port>/<path> on the daemon, with the owner's
key or the sandbox's traffic token; without credentials (401), with another key or a wrong token (404) it is
not. The same by Host header `<port>-<id>.<E2B_TEST_DOMAIN>` (the daemon's --e2b-domain), as get_host names it. Prints `ok: <step>`."""

import os
import time

import httpx
from e2b import Sandbox


def ok(step):
    print(f"ok: {step}", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    api = os.environ["E2B_API_URL"]
    key = os.environ["E2B_API_KEY"]
    other = os.environ["OTHER_KEY"]
    sbx = Sandbox.create()
    sid = sbx.sandbox_id
    sbx.commands.run("mkdir -p /home/user/site && echo hello-from-the-guest > /home/user/site/index.html")
    sbx.commands.run("cd /home/user/site && exec python3 -m http.server 8000 --bind 127.0.0.1", background=True)
    expect(sbx.get_host(8000).startswith(f"8000-{sid}."), f"get_host: {sbx.get_host(8000)}")
    url = f"{api}/e2b-port/{sid}/8000/index.html"
    r = None
    for _ in range(100):
        r = httpx.get(url, headers={"X-API-Key": key}, timeout=30)
        if r.status_code == 200:
            break
        time.sleep(0.2)
    expect(r.status_code == 200 and r.text == "hello-from-the-guest\n", f"owner: {r.status_code} {r.text!r}")
    ok("the owner's key reaches the server in the sandbox")
    tok = sbx.traffic_access_token
    expect(tok, "the create answer carries a traffic token")
    r = httpx.get(f"{api}/e2b-port/{sid}/8000/index.html?x=1", headers={"e2b-traffic-access-token": tok}, timeout=30)
    expect(r.status_code == 200 and r.text == "hello-from-the-guest\n", f"traffic token: {r.status_code} {r.text!r}")
    r = httpx.get(f"{api}/e2b-port/{sid}/8000/nope.html", headers={"X-API-Key": key}, timeout=30)
    expect(r.status_code == 404 and "hello" not in r.text, f"the guest server's own 404 comes through: {r.status_code}")
    ok("the traffic token reaches it too; statuses pass through")
    r = httpx.get(url, timeout=30)
    expect(r.status_code == 401, f"no credentials: {r.status_code}")
    r = httpx.get(url, headers={"X-API-Key": other}, timeout=30)
    expect(r.status_code == 404 and r.json()["code"] == 404, f"another key: {r.status_code} {r.text}")
    r = httpx.get(url, headers={"e2b-traffic-access-token": "0" * 64}, timeout=30)
    expect(r.status_code == 404, f"a wrong traffic token: {r.status_code}")
    ok("no credentials, another key or a wrong token get nothing")
    r = httpx.get(f"{api}/e2b-port/{sid}/8001/", headers={"X-API-Key": key}, timeout=30)
    expect(r.status_code == 502 and "not open" in r.json()["message"], f"a closed port: {r.status_code} {r.text}")
    ok("a closed port is a 502")

    # By Host header, as the SDK names the host (the daemon runs with --e2b-domain, given back as the domain).
    domain = os.environ["E2B_TEST_DOMAIN"]
    host = sbx.get_host(8000)
    expect(host == f"8000-{sid}.{domain}", f"get_host with the daemon's domain: {host}")
    r = httpx.get(f"{api}/index.html", headers={"Host": host, "X-API-Key": key}, timeout=30)
    expect(r.status_code == 200 and r.text == "hello-from-the-guest\n", f"by host, owner: {r.status_code} {r.text!r}")
    r = httpx.get(f"{api}/index.html?y=2", headers={"Host": host + ":80", "e2b-traffic-access-token": tok}, timeout=30)
    expect(r.status_code == 200 and r.text == "hello-from-the-guest\n", f"by host, traffic token: {r.status_code} {r.text!r}")
    # Every path under that host is the guest server's, the daemon's own routes included.
    r = httpx.get(f"{api}/v2/sandboxes", headers={"Host": host, "X-API-Key": key}, timeout=30)
    expect(r.status_code == 404 and not r.text.lstrip().startswith("{"), f"by host, a daemon path: {r.status_code} {r.text!r}")
    ok("a <port>-<id>.<domain> Host reaches the server in the sandbox")
    r = httpx.get(f"{api}/index.html", headers={"Host": host, "X-API-Key": other}, timeout=30)
    expect(r.status_code == 404 and r.json()["code"] == 404, f"by host, another key: {r.status_code} {r.text}")
    r = httpx.get(f"{api}/index.html", headers={"Host": host}, timeout=30)
    expect(r.status_code == 401, f"by host, no credentials: {r.status_code}")
    r = httpx.get(f"{api}/index.html", headers={"Host": f"8000-{'0' * 12}.{domain}", "X-API-Key": key}, timeout=30)
    expect(r.status_code == 404, f"by host, no such sandbox: {r.status_code}")
    r = httpx.get(f"{api}/index.html", headers={"Host": f"junk.{domain}", "X-API-Key": key}, timeout=30)
    expect(r.status_code == 404 and r.json()["code"] == 404, f"by host, a malformed name: {r.status_code}")
    ok("by host: another key, no key, another id or a malformed name get nothing")
    envd = {"Host": f"49983-{sid}.{domain}", "X-Access-Token": sbx._envd_access_token}
    r = httpx.get(f"{api}/files", params={"path": "/home/user/site/index.html"}, headers=envd, timeout=30)
    expect(r.status_code == 200 and r.text == "hello-from-the-guest\n", f"envd by host: {r.status_code} {r.text}")
    r = httpx.get(f"{api}/files", params={"path": "/home/user/site/index.html"}, headers={"Host": envd["Host"]}, timeout=30)
    expect(r.status_code == 502, f"envd by host without its token: {r.status_code} {r.text}")
    ok("49983-<id>.<domain> is envd")
    sbx.kill()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
