"""E2B templates against `hutch serve --image agents --template node=agents` (run by tests/e2b.rs): the default
template (`base`) gets the default image, `agents` and the alias `node` the agents image (Node.js), an unknown
template is E2B's 404 (the SDK's SandboxException, naming what is served). Prints `ok: <step>`."""

from e2b import Sandbox
from e2b.exceptions import SandboxException


def ok(step):
    print(f"ok: {step}", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def node_version(sbx):
    r = sbx.commands.run("command -v node >/dev/null && node --version || echo none")
    return r.stdout.strip()


def main():
    base = Sandbox.create()
    expect(node_version(base) == "none", "the default image has no Node.js")
    expect(base.get_info().template_id == "base", f"template id {base.get_info().template_id}")
    base.kill()
    ok("no template: the default image")
    for name in ["agents", "node"]:
        sbx = Sandbox.create(name)
        v = node_version(sbx)
        expect(v.startswith("v"), f"template {name}: node --version says {v!r}")
        expect(sbx.commands.run("echo $IS_SANDBOX").stdout.strip() == "1", "the agents image's environment")
        sbx.kill()
        ok(f"template {name}: the agents image ({v})")
    try:
        Sandbox.create("no-such-template")
        raise AssertionError("an unknown template was accepted")
    except SandboxException as e:
        # The SDK's create turns every 4xx into SandboxException carrying the status and E2B's message.
        expect(str(e).startswith("404") and "no-such-template" in str(e) and '"node"' in str(e), f"the 404 names what is served: {e}")
    ok("unknown template is a 404")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
