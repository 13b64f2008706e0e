"""E2B's egress options through the stock SDK against `hutch serve` (run by tests/e2b.rs, whose test net serves
ALLOWED, DENIED and API_HOST on port 443 with its own CA, pinned by the daemon's --egress-base). Reads
TESTNET_CA (the CA's PEM file) and SECRET_VALUE (the stored value of API_TOKEN, to check the guest never sees it).
Prints `ok: <step>`; the header sandbox is left running (`KEEP <id>`) so the test can search its VM's memory."""

import os

from e2b import ALL_TRAFFIC, Sandbox, Secret
from e2b.exceptions import SandboxException
from e2b.sandbox.commands.command_handle import CommandExitException

ALLOWED = "ok.example.test"
DENIED = "no.example.test"
API_HOST = "api.example.test"


def ok(step):
    print(f"ok: {step}", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def trust_testnet(sbx):
    # The test net's CA stands for the public roots a real guest trusts (TLS passed through ends there).
    with open(os.environ["TESTNET_CA"]) as f:
        sbx.files.write("/tmp/testnet-ca.pem", f.read())
    sbx.commands.run("cat /tmp/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt")


def curl(sbx, url, *extra):
    """(exit code, stdout) of curl in the sandbox; a failure is an exit code, not an exception."""
    args = " ".join(extra)
    try:
        r = sbx.commands.run(f"curl -sS --max-time 20 {args} -o /tmp/body -w '%{{http_code}}' {url}", timeout=60)
        return r.exit_code, r.stdout
    except CommandExitException as e:
        return e.exit_code, e.stdout + e.stderr


def expect_refused(what, call, *needles):
    try:
        sbx = call()
        sbx.kill()
    except SandboxException as e:
        msg = str(e)
        expect(msg.startswith("400:"), f"{what}: not a 400: {msg}")
        for n in needles:
            expect(n in msg, f"{what}: {n!r} not in {msg}")
        return
    raise AssertionError(f"{what}: the create was accepted")


def main():
    secret = os.environ["SECRET_VALUE"]

    # allow_out names the hosts; deny_out wins over it; ALL_TRAFFIC (an address range) changes nothing, since
    # guests never reach addresses directly. The transform puts the stored secret into the API host's header.
    sbx = Sandbox.create(
        network={
            "allow_out": [ALLOWED, DENIED, API_HOST],
            "deny_out": [DENIED, ALL_TRAFFIC],
            "rules": {API_HOST: [{"transform": {"headers": {"Authorization": "Bearer " + Secret.fill("API_TOKEN")}}}]},
        },
        timeout=600,
    )
    trust_testnet(sbx)
    code, out = curl(sbx, f"https://{ALLOWED}/e2b-allowed")
    expect(code == 0 and out == "200", f"allowed host: {code} {out!r}")
    ok("an allowed host is reachable")
    code, out = curl(sbx, f"https://{DENIED}/e2b-denied")
    expect(code != 0, f"denied host: {code} {out!r}")
    code, out = curl(sbx, "https://1.1.1.1/e2b-address", "-k")
    expect(code != 0, f"an address: {code} {out!r}")
    ok("denyOut beats allowOut; addresses stay unreachable")

    code, out = curl(sbx, f"https://{API_HOST}/e2b-header")
    expect(code == 0 and out == "200", f"API host: {code} {out!r}")
    body = sbx.files.read("/tmp/body")
    expect(secret not in body, "the secret came back to the guest in the response")
    # A header the guest sets itself is kept (the gateway adds its header only to requests without one).
    code, out = curl(sbx, f"https://{API_HOST}/e2b-own-header", "-H", "'Authorization: mine'")
    expect(code == 0 and out == "200", f"own header: {code} {out!r}")
    env = sbx.commands.run("env").stdout
    expect(secret not in env, "the secret is in the guest's environment")
    ok("the transform header reaches the upstream from the gateway")
    print(f"KEEP {sbx.sandbox_id}", flush=True)

    # allow_internet_access=False blocks everything, allowed names included.
    closed = Sandbox.create(allow_internet_access=False, timeout=300)
    trust_testnet(closed)
    for host in (ALLOWED, API_HOST):
        code, out = curl(closed, f"https://{host}/e2b-closed")
        expect(code != 0, f"allow_internet_access=False reached {host}: {code} {out!r}")
    closed.kill()
    ok("allow_internet_access=False blocks everything")

    # What cannot be mapped is a 400 naming the field, never a 500.
    transform = lambda name, host=API_HOST: {host: [{"transform": {"headers": {"Authorization": "Bearer " + Secret.fill(name)}}}]}
    expect_refused("an unknown secret", lambda: Sandbox.create(network={"allow_out": [API_HOST], "rules": transform("NO_SUCH_SECRET")}),
                   "network.rules", "NO_SUCH_SECRET", "not in this daemon's store")
    expect_refused("a secret not bound to the host", lambda: Sandbox.create(network={"allow_out": [ALLOWED], "rules": transform("API_TOKEN", ALLOWED)}),
                   "network.rules", "not bound to " + ALLOWED)
    expect_refused("a literal header", lambda: Sandbox.create(network={"rules": {API_HOST: [{"transform": {"headers": {"X-Key": "plain"}}}]}}),
                   "literal header value")
    expect_refused("an address in allow_out", lambda: Sandbox.create(network={"allow_out": ["8.8.8.8"]}), "network.allowOut[0]")
    expect_refused("all traffic allowed", lambda: Sandbox.create(allow_internet_access=True), "allow_internet_access")
    expect_refused("a hole in a wildcard", lambda: Sandbox.create(network={"allow_out": ["*.example.test"], "deny_out": [DENIED]}),
                   "network.denyOut")
    ok("unknown secrets and unmappable options are 400s naming the field")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
