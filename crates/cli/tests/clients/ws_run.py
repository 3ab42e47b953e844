#!/usr/bin/env python3
"""A WebSocket client (the `websockets` package) that drives a run of `descartes serve` as a
front end would, for tests/serve.rs:

1. connects with the bearer token, sends `start_run` with `subscribe: true`;
2. reads frames until the run asks for a permission (`permission_asked`), then disconnects
   in the middle of the run;
3. reconnects, subscribes to the run's stream with `after` = the last seq it got, answers
   the ask with `allow`, and reads until `run_completed`.

Prints one JSON line: the run id, every event seq received (both connections, in order),
the text of the deltas, and the frames' types. Usage: ws_run.py URL TOKEN PROMPT
"""

import asyncio
import inspect
import json
import sys

from websockets.asyncio.client import connect


async def open_socket(url, token):
    kwargs = {"open_timeout": 10, "ping_interval": None, "additional_headers": {"Authorization": f"Bearer {token}"}}
    if "proxy" in inspect.signature(connect).parameters:
        kwargs["proxy"] = None
    return await connect(url, **kwargs)


async def frames(ws, timeout=30):
    while True:
        yield json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def main(url, token, prompt):
    seqs, deltas, kinds = [], [], []
    ws = await open_socket(url, token)
    await ws.send(json.dumps({"type": "start_run", "request_id": "r1", "subscribe": True,
                              "run": {"prompt": prompt, "provider": "openai"}}))
    run_id, call_id = None, None
    async for f in frames(ws):
        kinds.append(f["type"])
        if f["type"] == "run_started":
            assert f["request_id"] == "r1", f
            run_id = f["run_id"]
        elif f["type"] == "event":
            seqs.append(f["event"]["seq"])
            if f["event"]["type"] == "permission_asked":
                call_id = f["event"]["data"]["call_id"]
                break
        elif f["type"] == "error":
            raise SystemExit(f"error frame: {f}")
    await ws.close()

    # Mid-run: a new connection resumes after the last seq it saw.
    ws = await open_socket(url, token)
    await ws.send(json.dumps({"type": "subscribe", "stream": run_id, "after": seqs[-1]}))
    await ws.send(json.dumps({"type": "answer", "run_id": run_id, "call_id": call_id, "decision": "allow"}))
    async for f in frames(ws):
        kinds.append(f["type"])
        if f["type"] == "delta" and f.get("kind") == "text":
            deltas.append(f["text"])
        elif f["type"] == "event":
            seqs.append(f["event"]["seq"])
            if f["event"]["type"] == "run_completed":
                break
        elif f["type"] == "error":
            raise SystemExit(f"error frame: {f}")
    await ws.close()
    print(json.dumps({"run_id": run_id, "call_id": call_id, "seqs": seqs, "deltas": "".join(deltas), "kinds": kinds}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
