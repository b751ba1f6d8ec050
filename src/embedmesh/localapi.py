"""The local API of a running node: a small HTTP API on a Unix socket in the node's state folder,
for ``embedmesh status`` and ``embedmesh ping`` (as tailscaled's LocalAPI serves the tailscale CLI).

The socket file is created 0600 in a 0700 folder: only the user who runs the node may use it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from embedmesh.asgi import serve_asgi

if TYPE_CHECKING:
    from embedmesh.node import Node

SOCKET_NAME = "embedmesh.sock"


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / SOCKET_NAME


def build_app(node: Node) -> Starlette:
    async def status(request: Request) -> JSONResponse:
        return JSONResponse(dataclasses.asdict(node.status()))

    async def ping(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        peer = str(body.get("peer", ""))
        timeout = float(body.get("timeout", 5.0))
        try:
            rtt = await node.ping(peer, timeout=timeout)
        except TimeoutError as exc:
            return JSONResponse({"error": str(exc)}, status_code=504)
        except (ValueError, LookupError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"peer": peer, "rtt": rtt})

    return Starlette(routes=[Route("/v1/status", status), Route("/v1/ping", ping, methods=["POST"])])


async def serve_local_api(
    node: Node,
    state_dir: str | os.PathLike[str],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local API on ``<state_dir>/embedmesh.sock`` until cancelled."""
    path = socket_path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # a stale socket from a node that did not exit cleanly
    old_umask = os.umask(0o177)
    try:
        listener = await anyio.create_unix_listener(path)
    finally:
        os.umask(old_umask)
    try:
        await serve_asgi(build_app(node), listener, lifespan=False, task_status=task_status)
    finally:
        path.unlink(missing_ok=True)


async def request(
    state_dir: str | os.PathLike[str], method: str, path: str, json: Any = None, timeout: float = 30.0
) -> Any:
    """Call the local API of the node whose state folder is ``state_dir``."""
    import httpx

    sock = socket_path(state_dir)
    if not sock.exists():
        raise FileNotFoundError(
            f"no running node found: {sock} does not exist (is `embedmesh up --state-dir {state_dir}` running?)"
        )
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://embedmesh", timeout=timeout) as client:
        response = await client.request(method, path, json=json)
        data = response.json()
        if response.status_code >= 400:
            raise RuntimeError(data.get("error", f"local API answered {response.status_code}"))
        return data
