"""Gateways between the host's own network and the mesh, for programs that are not Python:
a SOCKS5 proxy into the mesh, local port forwards to peers, and mesh ports served by local services."""

from __future__ import annotations

import anyio
import anyio.abc

from embedmesh.errors import ListenError


async def listen_local(host: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """A TCP listener on the host network at ``host:port``, for a gateway's local side.

    Raises :class:`~embedmesh.errors.AddressInUseError` when another program holds the port, and
    :class:`~embedmesh.errors.ListenError` for any other reason it cannot be opened (both say
    which port and what to do).
    """
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ListenError.from_os_error(exc, host, port) from None
