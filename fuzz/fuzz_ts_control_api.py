"""Fuzz target: the Tailscale-protocol API of the coordination server (``embedmesh.control.tsapi``).

Inside Noise the machine key is authenticated, but everything else a client sends is hostile
input: the RegisterRequest and MapRequest JSON. The first byte picks the endpoint (even:
``/machine/register``, odd: ``/machine/map``, non-streaming so a call ends), the rest is the body.
The app runs over an in-memory server (one per process); it must answer every body with a
response (400/404/200, never 500) and never raise.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from embedmesh.control.server import ControlServer, ServerConfig
from embedmesh.tailscale.keys import MachinePrivate

_SERVER: ControlServer | None = None
_MACHINE = MachinePrivate.generate(bytes(range(32))).public()


def _server() -> ControlServer:
    global _SERVER
    if _SERVER is None:
        _SERVER = ControlServer(ServerConfig(state_dir=Path(tempfile.mkdtemp(prefix="fuzz-tsapi-"))))
    return _SERVER


async def call(path: str, body: bytes) -> int:
    """One HTTP/2-like request to the app, as the Noise bridge would make it; the status."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "2",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"control.test")],
        "client": ("192.0.2.1", 1234),
        "server": ("192.0.2.2", 443),
        "extensions": {"tailscale": {"machine_key": _MACHINE, "version": 130}},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await _server().tsapi(scope, receive, send)
    return status


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    path = "/machine/map" if data[0] & 1 else "/machine/register"
    body = data[1:]
    status = anyio.run(call, path, body)
    assert status in (200, 400, 404), status


if __name__ == "__main__":
    from harness import run

    os.environ.setdefault("EMBEDMESH_LOG", "error")
    run(TestOneInput)
    sys.exit(0)
