"""The local API of a running node: a small HTTP API on a Unix socket in the node's state folder,
for ``embedmesh status``, ``ping`` and ``down`` (as tailscaled's LocalAPI serves the tailscale CLI).

``GET /v1/status``   the node's status, plus ``ready`` (in the tailnet, every gateway listening),
                     ``waiting_for`` (what it waits for, in words) and ``pid``
``POST /v1/ping``    ``{"peer", "timeout"}``: one ping over the mesh
``POST /v1/down``    ``{"logout": bool}``: stop the node (answers first, then stops)

The socket file is created 0600 in a 0700 folder: only the user who runs the node may use it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from embedmesh.asgi import serve_asgi
from embedmesh.errors import EmbedmeshError

if TYPE_CHECKING:
    from embedmesh.node import Node

SOCKET_NAME = "embedmesh.sock"


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / SOCKET_NAME


class LocalAPIError(EmbedmeshError, RuntimeError):
    """The local API answered with an error (the message is its answer)."""


class NodeNotRunningError(LocalAPIError):
    """No node is running in the state folder: no socket, or one that nothing listens on."""


def build_app(
    node: Node,
    *,
    waiting_for: Callable[[], str] | None = None,
    on_down: Callable[[bool], None] | None = None,
) -> Starlette:
    """The local API of ``node``.

    ``waiting_for()`` says in words what the owner still waits for before it is ready (default:
    :meth:`Node.waiting_for`; ``""`` means ready); ``on_down(logout)`` stops the owner (without
    it, ``/v1/down`` does not exist).
    """
    wait_reason = waiting_for or node.waiting_for

    async def status(request: Request) -> JSONResponse:
        data = dataclasses.asdict(node.status())
        reason = wait_reason()
        data["ready"] = not reason
        data["waiting_for"] = reason
        data["pid"] = os.getpid()
        return JSONResponse(data)

    async def down(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        logout = isinstance(body, dict) and body.get("logout") is True
        assert on_down is not None
        # Stop once the answer is out: stopping closes this very socket.
        return JSONResponse(
            {"stopping": True, "pid": os.getpid()}, background=BackgroundTask(on_down, logout)
        )

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

    routes = [Route("/v1/status", status), Route("/v1/ping", ping, methods=["POST"])]
    if on_down is not None:
        routes.append(Route("/v1/down", down, methods=["POST"]))
    return Starlette(routes=routes)


async def serve_local_api(
    node: Node,
    state_dir: str | os.PathLike[str],
    *,
    waiting_for: Callable[[], str] | None = None,
    on_down: Callable[[bool], None] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local API (:func:`build_app`) on ``<state_dir>/embedmesh.sock`` until cancelled.

    The caller's node holds the state folder's lock (:mod:`embedmesh.statelock`), so a socket
    file already there is a stale one from a node that did not exit cleanly: it is replaced.
    """
    path = socket_path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        # anyio binds the socket in a worker thread that a cancel abandons rather than stops:
        # a SIGTERM landing during the bind would return here at once and the thread would
        # create the file after our cleanup, leaving a stale socket (and binding after the
        # umask was restored). Shielded, the bind (a quick local call) completes, and the
        # cancel arrives at the next checkpoint, inside this try, whose finally removes it.
        with anyio.CancelScope(shield=True):
            old_umask = os.umask(0o177)
            try:
                listener = await anyio.create_unix_listener(path)
            finally:
                os.umask(old_umask)
        app = build_app(node, waiting_for=waiting_for, on_down=on_down)
        await serve_asgi(app, listener, lifespan=False, task_status=task_status)
    finally:
        path.unlink(missing_ok=True)


async def request(
    state_dir: str | os.PathLike[str], method: str, path: str, json: Any = None, timeout: float = 30.0
) -> Any:
    """Call the local API of the node whose state folder is ``state_dir``.

    Raises :class:`NodeNotRunningError` when no node runs there and :class:`LocalAPIError` for an
    error answer.
    """
    import httpx

    sock = socket_path(state_dir)
    if not sock.exists():
        raise NodeNotRunningError(
            f"no node is running (state dir {state_dir}): start one with `embedmesh up --state-dir {state_dir}`"
        )
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://embedmesh", timeout=timeout
        ) as client:
            response = await client.request(method, path, json=json)
    except httpx.ConnectError:
        # A socket file nothing listens on: left over by a node that crashed or was killed.
        raise NodeNotRunningError(
            f"no node is running (state dir {state_dir}; its socket is left over from a node that "
            "did not stop cleanly, and the next `embedmesh up` replaces it)"
        ) from None
    except httpx.TransportError as exc:
        raise LocalAPIError(f"the node in {state_dir} did not answer: {exc or type(exc).__name__}") from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        raise LocalAPIError(error or f"the local API answered HTTP {response.status_code} to {path}")
    return data
