"""Port forwards both ways between the host and the mesh.

- :func:`forward_local`: a local TCP port whose connections lead to a peer's port
  (``embedmesh up --forward 127.0.0.1:5432=db:5432``).
- :func:`serve_local`: a mesh port whose connections lead to a local service
  (``embedmesh up --serve 80=127.0.0.1:8000``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from embedmesh.errors import EmbedmeshError
from embedmesh.gateway.pipe import pipe

logger = logging.getLogger("embedmesh.forward")

Dial = Callable[[], Awaitable[anyio.abc.ByteStream]]


async def _relay(incoming: anyio.abc.ByteStream, dial: Dial, what: str) -> None:
    """Relay ``incoming`` to a freshly dialled stream; ``incoming`` is closed however that ends
    (a connection the far side refused must not linger in CLOSE_WAIT)."""
    async with incoming:
        try:
            outgoing = await dial()
        except (OSError, LookupError, ValueError, EmbedmeshError) as exc:
            # One connection's failure (refused, unreachable, a name that went away) is logged;
            # it must not end the listener and with it every other connection.
            logger.warning("%s: %s", what, exc)
            return
        async with outgoing:
            await pipe(incoming, outgoing)


async def forward_local(
    listener: anyio.abc.Listener[anyio.abc.SocketStream], dial_peer: Dial, what: str
) -> None:
    """Relay each connection accepted on a local ``listener`` to a fresh mesh stream."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        await _relay(stream, dial_peer, what)

    await listener.serve(handle)


async def serve_local(listener: anyio.abc.Listener[anyio.abc.ByteStream], host: str, port: int) -> None:
    """Relay each connection accepted on a mesh ``listener`` to ``host:port`` on this machine."""

    async def dial() -> anyio.abc.ByteStream:
        return await anyio.connect_tcp(host, port)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        await _relay(stream, dial, f"serve to {host}:{port}")

    await listener.serve(handle)
