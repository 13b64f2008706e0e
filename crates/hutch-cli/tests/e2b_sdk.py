"""The stock E2B Python SDK against `hutch serve` (run by tests/e2b.rs with E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY and OTHER_KEY, a second token's key). Each step prints `ok: <step>`; any failure raises."""

import os
import sys
import time

import e2b
from e2b import Sandbox, SandboxQuery
from e2b.exceptions import NotFoundException, SandboxException
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b import FileType


def ok(step):
    print(f"ok: {step}", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    other_key = os.environ["OTHER_KEY"]
    tag = f"run-{os.getpid()}"

    sbx = Sandbox.create(envs={"GREETING": "hello from e2b"}, metadata={"suite": tag, "role": "main"}, timeout=600)
    ok(f"create {sbx.sandbox_id}")

    # Listing by metadata finds it; another filter does not.
    found = Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
    expect([s.sandbox_id for s in found] == [sbx.sandbox_id], f"list by metadata: {found}")
    expect(found[0].metadata.get("role") == "main", f"metadata round trip: {found[0].metadata}")
    none = Sandbox.list(query=SandboxQuery(metadata={"suite": tag + "-nope"})).next_items()
    expect(none == [], f"list by other metadata: {none}")
    ok("list by metadata")

    info = sbx.get_info()
    expect(info.sandbox_id == sbx.sandbox_id and info.metadata.get("suite") == tag, f"get_info: {info}")
    ok("get_info")

    # Foreground command: streamed stdout and stderr, the sandbox's env.
    outs, errs = [], []
    r = sbx.commands.run('echo "$GREETING"; echo to-stderr >&2; for i in 1 2 3; do echo line$i; done',
                         on_stdout=outs.append, on_stderr=errs.append)
    expect(r.exit_code == 0, f"exit code {r.exit_code}")
    expect(r.stdout.startswith("hello from e2b\n") and "line3" in r.stdout, f"stdout {r.stdout!r}")
    expect("to-stderr" in r.stderr, f"stderr {r.stderr!r}")
    expect("".join(outs) == r.stdout and "to-stderr" in "".join(errs), f"callbacks {outs!r} {errs!r}")
    ok("foreground command with streamed output")

    r = sbx.commands.run("pwd; echo $FOO", envs={"FOO": "bar"}, cwd="/tmp")
    expect(r.stdout == "/tmp\nbar\n", f"cwd/envs {r.stdout!r}")
    ok("command envs and cwd")

    try:
        sbx.commands.run("echo partial; exit 3")
        raise AssertionError("a non-zero exit did not raise")
    except CommandExitException as e:
        expect(e.exit_code == 3 and "partial" in e.stdout, f"CommandExitException {e.exit_code} {e.stdout!r}")
    ok("non-zero exit raises CommandExitException")

    # stdin
    h = sbx.commands.run("read x; echo got:$x", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "abc\n")
    r = h.wait()
    expect(r.stdout == "got:abc\n", f"stdin {r.stdout!r}")
    ok("stdin")

    # Background command: listed, then killed.
    h = sbx.commands.run("sleep 600", background=True)
    pids = [p.pid for p in sbx.commands.list()]
    expect(h.pid in pids, f"background pid {h.pid} not in {pids}")
    expect(sbx.commands.kill(h.pid), "kill returned False")
    try:
        h.wait()
        raise AssertionError("a killed command finished cleanly")
    except CommandExitException as e:
        expect(e.exit_code != 0, f"killed exit {e.exit_code}")
    expect(h.pid not in [p.pid for p in sbx.commands.list()], "killed process still listed")
    expect(not sbx.commands.kill(h.pid), "killing a gone pid returned True")
    ok("background command + kill")

    # commands.connect: a second stream on a running process sees its later output and its end.
    h = sbx.commands.run("read go; echo after:$go", background=True, stdin=True)
    h2 = sbx.commands.connect(h.pid)
    sbx.commands.send_stdin(h.pid, "yes\n")
    r2 = h2.wait()
    expect(r2.stdout == "after:yes\n", f"connect stream {r2.stdout!r}")
    expect(h.wait().stdout == "after:yes\n", "the starter's stream")
    ok("commands.connect")

    # PTY: an interactive bash on a terminal; input, resize, output.
    from e2b import PtySize
    data = []
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size; echo pty-$((6*7)); exit 5\n")
    try:
        term.wait(on_pty=lambda b: data.append(bytes(b)))
        raise AssertionError("the pty shell's exit 5 did not raise")
    except CommandExitException as e:
        expect(e.exit_code == 5, f"pty exit {e.exit_code}")
    out = b"".join(data).decode(errors="replace")
    expect("pty-42" in out and "30 100" in out, f"pty output {out!r}")
    ok("pty create/input/resize")

    # Files: text, 5 MiB binary, list, exists, info, make_dir, rename, remove.
    info = sbx.files.write("/home/user/dir/hello.txt", "hi there\n")
    expect(info.path == "/home/user/dir/hello.txt", f"write info {info}")
    expect(sbx.files.read("/home/user/dir/hello.txt") == "hi there\n", "text read back")
    sbx.files.write("relative.txt", "rel")
    expect(sbx.files.read("/home/user/relative.txt") == "rel", "relative paths start at /home/user")
    blob = os.urandom(5 << 20)
    sbx.files.write("/home/user/dir/blob.bin", blob)
    back = sbx.files.read("/home/user/dir/blob.bin", format="bytes")
    expect(bytes(back) == blob, f"5 MiB binary read back: {len(back)} bytes")
    r = sbx.commands.run("sha256sum /home/user/dir/blob.bin | cut -c1-64")
    import hashlib
    expect(r.stdout.strip() == hashlib.sha256(blob).hexdigest(), "the guest sees the same 5 MiB")
    ok("write/read text and a 5 MiB binary")

    names = sorted(e.name for e in sbx.files.list("/home/user/dir"))
    expect(names == ["blob.bin", "hello.txt"], f"list {names}")
    entries = {e.name: e for e in sbx.files.list("/home/user/dir")}
    expect(entries["blob.bin"].size == 5 << 20 and entries["blob.bin"].type == FileType.FILE, f"entry {entries['blob.bin']}")
    expect(sbx.files.exists("/home/user/dir/hello.txt") and not sbx.files.exists("/home/user/nope"), "exists")
    expect(sbx.files.get_info("/home/user/dir").type == FileType.DIR, "get_info dir")
    expect(sbx.files.make_dir("/home/user/newdir/sub") is True, "make_dir")
    expect(sbx.files.make_dir("/home/user/newdir/sub") is False, "make_dir existing")
    moved = sbx.files.rename("/home/user/dir/hello.txt", "/home/user/newdir/renamed.txt")
    expect(moved.path == "/home/user/newdir/renamed.txt", f"rename {moved}")
    expect(sbx.files.read("/home/user/newdir/renamed.txt") == "hi there\n", "renamed content")
    sbx.files.remove("/home/user/newdir")
    expect(not sbx.files.exists("/home/user/newdir"), "remove")
    try:
        sbx.files.read("/home/user/missing.txt")
        raise AssertionError("reading a missing file did not raise")
    except NotFoundException:
        pass
    ok("list/exists/info/make_dir/rename/remove files")

    # watch_dir (the SDK's polling form): creates, writes and removes since the last poll.
    sbx.files.make_dir("/home/user/watched")
    w = sbx.files.watch_dir("/home/user/watched")
    sbx.files.write("/home/user/watched/a.txt", "1")
    sbx.commands.run("mkdir /home/user/watched/sub")
    got = {(e.name, e.type.value) for e in w.get_new_events()}
    expect(("a.txt", "create") in got and ("sub", "create") in got, f"watch create events {got}")
    sbx.commands.run("sleep 1; echo more >> /home/user/watched/a.txt; rm -r /home/user/watched/sub")
    got = {(e.name, e.type.value) for e in w.get_new_events()}
    expect(("a.txt", "write") in got and ("sub", "remove") in got, f"watch write/remove events {got}")
    w.stop()
    ok("watch_dir")

    # Isolation: the other key does not see this sandbox.
    try:
        Sandbox.connect(sbx.sandbox_id, api_key=other_key)
        raise AssertionError("another key connected to this sandbox")
    except NotFoundException:
        pass
    expect(Sandbox.kill(sbx.sandbox_id, api_key=other_key) is False, "another key killed this sandbox")
    others = Sandbox.list(api_key=other_key).next_items()
    expect(sbx.sandbox_id not in [s.sandbox_id for s in others], "another key lists this sandbox")
    ok("isolation between keys")

    # Connect again with the right key: same sandbox, files intact.
    again = Sandbox.connect(sbx.sandbox_id)
    expect(again.files.read("/home/user/relative.txt") == "rel", "connect sees the files")
    ok("connect")

    # set_timeout: the sandbox dies on time.
    sbx.set_timeout(3)
    deadline = time.time() + 60
    while sbx.is_running() and time.time() < deadline:
        time.sleep(0.5)
    expect(not sbx.is_running(), "the sandbox outlived its timeout")
    try:
        sbx.commands.run("true")
        raise AssertionError("a command ran in an expired sandbox")
    except SandboxException as e:
        expect("not found" in str(e) or "not running" in str(e).lower(), f"expired sandbox error: {e}")
    ok("set_timeout ends the sandbox")

    # Kill.
    s2 = Sandbox.create(timeout=120)
    expect(s2.commands.run("echo up").stdout == "up\n", "second sandbox runs")
    s2.kill()
    expect(not Sandbox.kill(s2.sandbox_id), "kill of a killed sandbox returned True")
    ok("kill")

    # Unknown template: E2B's 404.
    try:
        Sandbox.create(template="no-such-template")
        raise AssertionError("an unknown template was accepted")
    except SandboxException as e:
        expect("not found" in str(e), f"unknown template: {e}")
    ok("unknown template is a 404")

    runs = int(os.environ.get("E2B_BENCH_RUNS", "0"))
    if runs:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s = Sandbox.create(timeout=60)
            first = []
            s.commands.run("echo bench", on_stdout=lambda o: first.append(time.perf_counter()) if not first else None)
            times.append((first[0] - t0) * 1000)
            s.kill()
            time.sleep(1.5)  # let the warm pool refill, as between real creates
        times.sort()
        print(f"bench: E2B SDK Sandbox.create() + first commands.run('echo') output p50 {times[len(times) // 2]:.0f} ms "
              f"(min {times[0]:.0f}, max {times[-1]:.0f}, n={runs})", flush=True)
        # The native API, same daemon and pool: create, then a one-shot exec of echo.
        import json
        import urllib.request
        key = os.environ["E2B_API_KEY"]
        token = f"hutch_{key[4:16]}_{key[16:]}"
        base = os.environ["E2B_API_URL"]

        def call(method, path, body=None):
            req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                return json.loads(r.read() or b"null")

        native = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sb = call("POST", "/v1/sandboxes", {"ttl_secs": 60})
            out = call("POST", f"/v1/sandboxes/{sb['id']}/exec", {"argv": ["echo", "bench"]})
            native.append((time.perf_counter() - t0) * 1000)
            expect(out["stdout"] == "bench\n", f"native exec {out}")
            call("DELETE", f"/v1/sandboxes/{sb['id']}")
            time.sleep(1.5)
        native.sort()
        print(f"bench: native API create + exec echo p50 {native[len(native) // 2]:.0f} ms "
              f"(min {native[0]:.0f}, max {native[-1]:.0f}, n={runs})", flush=True)

    print("ALL OK", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
