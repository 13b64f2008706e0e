"""The async E2B SDK against `hutch serve` (run by tests/e2b.rs): `watch_dir` as a Connect server stream (the
async SDK's form; the sync one polls), recursive, with create, write and remove events, and stop. Prints
`ok: <step>`."""

import asyncio

from e2b import AsyncSandbox, FilesystemEventType


def ok(step):
    print(f"ok: {step}", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


async def wait_for(events, pred, what, secs=20):
    for _ in range(secs * 10):
        if any(pred(e) for e in events):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {what} event; got {[(e.name, e.type) for e in events]}")


async def main():
    sbx = await AsyncSandbox.create()
    await sbx.files.make_dir("/home/user/w/sub")
    events = []
    handle = await sbx.files.watch_dir("/home/user/w", on_event=events.append, recursive=True)
    ok("watch_dir stream opened (start event)")
    await sbx.files.write("/home/user/w/a.txt", "one")
    await wait_for(events, lambda e: e.name == "a.txt" and e.type == FilesystemEventType.CREATE, "create")
    await sbx.commands.run("sleep 1.1; echo more >> /home/user/w/a.txt; echo x > /home/user/w/sub/b.txt")
    await wait_for(events, lambda e: e.name == "a.txt" and e.type == FilesystemEventType.WRITE, "write")
    await wait_for(events, lambda e: e.name == "sub/b.txt" and e.type == FilesystemEventType.CREATE, "recursive create")
    await sbx.files.remove("/home/user/w/a.txt")
    await wait_for(events, lambda e: e.name == "a.txt" and e.type == FilesystemEventType.REMOVE, "remove")
    ok("streamed create, write, recursive create and remove events")
    await handle.stop()
    n = len(events)
    await sbx.files.write("/home/user/w/c.txt", "after stop")
    await asyncio.sleep(1.5)
    expect(len(events) == n, f"events after stop: {events[n:]}")
    ok("stop ends the stream")
    await sbx.kill()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
