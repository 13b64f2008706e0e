"""Pause and resume through the stock E2B Python SDK (run by tests/e2b.rs). `phase1`: create a sandbox, start a
background process that counts into a file, write a file, then pause and resume it five times, checking after
each resume that the file holds every earlier line and that the same process still runs and counts on; then
pause once more and print the sandbox id. `phase2 ID` (after a daemon restart): resume it, check the same, kill
it. Prints `ok: <step>` per step and the pause and resume times."""

import statistics
import sys
import time

from e2b import Sandbox

COUNTER = "/home/user/counter"
NOTES = "/home/user/notes.txt"


def ok(step):
    print(f"ok: {step}", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def counter(sbx):
    r = sbx.commands.run(f"cat {COUNTER} 2>/dev/null || echo 0")
    return int(r.stdout.strip() or "0")


def check_alive(sbx, pid, lines, label):
    expect(sbx.files.read(NOTES) == "".join(f"line {i}\n" for i in range(lines)), f"{label}: notes lost: {sbx.files.read(NOTES)!r}")
    r = sbx.commands.run(f"kill -0 {pid} && echo alive")
    expect(r.stdout.strip() == "alive", f"{label}: process {pid} is gone")
    a = counter(sbx)
    time.sleep(1.0)
    b = counter(sbx)
    expect(b > a, f"{label}: the process does not count on ({a} -> {b})")


def phase1():
    sbx = Sandbox.create(timeout=1200)
    sid = sbx.sandbox_id
    ok(f"create {sid}")
    h = sbx.commands.run(f"i=0; while true; do i=$((i+1)); echo $i > {COUNTER}; sleep 0.1; done", background=True)
    pid = h.pid
    sbx.files.write(NOTES, "line 0\n")
    deadline = time.monotonic() + 20
    while counter(sbx) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    expect(counter(sbx) > 0, "the counter runs")
    pauses, resumes = [], []
    lines = 1
    for cycle in range(1, 6):
        t = time.monotonic()
        expect(sbx.pause() is True, "pause() returns True")
        pauses.append((time.monotonic() - t) * 1000)
        expect(Sandbox.list(query=None).next_items() is not None, "list works while paused")
        t = time.monotonic()
        sbx = Sandbox.connect(sid)
        resumes.append((time.monotonic() - t) * 1000)
        check_alive(sbx, pid, lines, f"cycle {cycle}")
        sbx.files.write(NOTES, sbx.files.read(NOTES) + f"line {lines}\n")
        lines += 1
        ok(f"pause/resume cycle {cycle}: file and process intact")
    ok("pause and resume five times")
    print(f"pause ms: p50 {statistics.median(pauses):.0f} max {max(pauses):.0f}; "
          f"resume (connect) ms: p50 {statistics.median(resumes):.0f} max {max(resumes):.0f}", flush=True)
    expect(sbx.pause() is True, "final pause")
    expect(Sandbox.pause(sid) is False, "a second pause says it is paused already (409)")
    paused = [s.sandbox_id for s in Sandbox.list().next_items() if str(s.state) == "paused"]
    expect(sid in paused, f"list shows it paused: {paused}")
    ok("paused for the restart")
    print(f"PAUSED {sid} {pid} {lines}", flush=True)


def phase2(sid, pid, lines):
    t = time.monotonic()
    sbx = Sandbox.connect(sid)
    ok(f"resume after a daemon restart in {(time.monotonic() - t) * 1000:.0f} ms")
    check_alive(sbx, pid, lines, "after restart")
    ok("file and process intact after a daemon restart")
    sbx.kill()
    ok("kill")


if __name__ == "__main__":
    if sys.argv[1] == "phase1":
        phase1()
    else:
        phase2(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print("ALL OK", flush=True)
