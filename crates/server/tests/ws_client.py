#!/usr/bin/env python3
"""A real WebSocket client (the `websockets` package) for the server's tests (tests/ws.rs).

It holds one connection at a time and does what it is told: one JSON command per line on
stdin, one JSON answer per line on stdout. The Rust test decides and checks everything.

Commands ({"op": ...}):
  connect  url, token?, via ("header" | "subprotocol" | "none"), origin?
           -> {"ok": true, "subprotocol": ...} | {"ok": false, "status": N, "body": "..."}
  send     text                  -> {"ok": true}  (a text frame, as is)
  send_json frame                -> {"ok": true}
  send_binary hex                -> {"ok": true}
  recv     timeout?              -> {"frame": {...}} | {"closed": true, "code": N, "reason": "..."}
                                    | {"timeout": true}
  collect  events?, until_seq?, timeout?
           receives until it has `events` event frames, or one with seq >= `until_seq`
           -> {"frames": [...], "closed": {...}?, "timeout": true?}
  close                          -> {"ok": true}
  exit
`python3 ws_client.py --check` exits 0 when `websockets` (13 or newer) can be imported.
"""

import asyncio
import inspect
import json
import sys


def check():
    try:
        from websockets.asyncio.client import connect  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        print(f"websockets is not importable: {e!r}", file=sys.stderr)
        return 1
    return 0


async def main():
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    loop = asyncio.get_running_loop()
    ws = None

    def closed_of(e):
        frame = e.rcvd
        return {"closed": True, "code": frame.code if frame else None, "reason": frame.reason if frame else None}

    async def recv(timeout):
        try:
            message = await asyncio.wait_for(ws.recv(), timeout)
        except ConnectionClosed as e:
            return closed_of(e)
        except asyncio.TimeoutError:
            return {"timeout": True}
        if isinstance(message, bytes):
            return {"binary": message.hex()}
        return {"frame": json.loads(message)}

    async def do(cmd):
        nonlocal ws
        op = cmd["op"]
        if op == "connect":
            # No flow control: a queue left full would hold back the server's close frame.
            kwargs = {"open_timeout": 10, "max_size": 16 * 1024 * 1024, "ping_interval": None, "max_queue": None}
            # Never through a proxy from the environment (websockets 15 and newer use one).
            if "proxy" in inspect.signature(connect).parameters:
                kwargs["proxy"] = None
            via = cmd.get("via", "header")
            if via == "header":
                kwargs["additional_headers"] = {"Authorization": f"Bearer {cmd['token']}"}
            elif via == "subprotocol":
                kwargs["subprotocols"] = [f"bearer.{cmd['token']}"]
            if cmd.get("origin"):
                kwargs["origin"] = cmd["origin"]
            try:
                ws = await connect(cmd["url"], **kwargs)
            except InvalidStatus as e:
                body = (e.response.body or b"").decode("utf-8", "replace")
                return {"ok": False, "status": e.response.status_code, "body": body}
            return {"ok": True, "subprotocol": ws.subprotocol}
        if op == "send":
            await ws.send(cmd["text"])
            return {"ok": True}
        if op == "send_json":
            await ws.send(json.dumps(cmd["frame"]))
            return {"ok": True}
        if op == "send_binary":
            await ws.send(bytes.fromhex(cmd["hex"]))
            return {"ok": True}
        if op == "recv":
            return await recv(cmd.get("timeout", 10))
        if op == "collect":
            want = cmd.get("events")
            until = cmd.get("until_seq")
            deadline = loop.time() + cmd.get("timeout", 30)
            frames, events = [], 0
            while True:
                got = await recv(max(0.0, deadline - loop.time()))
                if "frame" not in got:
                    return {"frames": frames, **got}
                frame = got["frame"]
                frames.append(frame)
                if frame.get("type") == "event":
                    events += 1
                    if (want is not None and events >= want) or (
                        until is not None and frame["event"]["seq"] >= until
                    ):
                        return {"frames": frames}
        if op == "close":
            await ws.close()
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            answer = await do(cmd)
        except ConnectionClosed as e:
            answer = {"ok": False, **closed_of(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    if ws is not None:
        await ws.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    asyncio.run(main())
