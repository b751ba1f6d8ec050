"""The control plane: the coordination server and what a node learns from it.

``NetworkMap`` and friends and the errors are imported here; ``ControlServer`` / ``ServerConfig``
load Starlette and uvicorn on first use, and ``ControlClient`` is the node's client,
:class:`embedmesh.tailscale.client.TailscaleControlClient` (Tailscale's control protocol is the
only one). See docs/control.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedmesh.control.errors import (
    ApprovalRefusedError,
    AuthKeyError,
    AuthKeyExpiredError,
    AuthKeyInvalidError,
    AuthKeyRequiredError,
    AuthKeyRevokedError,
    AuthKeyUsedError,
    ControlError,
    ControlProtocolError,
    ControlUnreachableError,
    NodeDeletedError,
    ServerKeyChangedError,
)
from embedmesh.control.netmap import DNSConfig, MapDelta, NetworkMap, NodeState, PacketFilter, PeerInfo

if TYPE_CHECKING:
    from embedmesh.control.server import ControlServer, RunningServer, ServerConfig
    from embedmesh.tailscale.client import TailscaleControlClient as ControlClient


def __getattr__(name: str) -> Any:
    if name in ("ControlServer", "RunningServer", "ServerConfig"):
        from embedmesh.control import server

        return getattr(server, name)
    if name == "ControlClient":
        from embedmesh.tailscale.client import TailscaleControlClient

        return TailscaleControlClient
    raise AttributeError(name)


__all__ = [
    "ApprovalRefusedError",
    "AuthKeyError",
    "AuthKeyExpiredError",
    "AuthKeyInvalidError",
    "AuthKeyRequiredError",
    "AuthKeyRevokedError",
    "AuthKeyUsedError",
    "ControlClient",
    "ControlError",
    "ControlProtocolError",
    "ControlServer",
    "ControlUnreachableError",
    "DNSConfig",
    "MapDelta",
    "NetworkMap",
    "NodeDeletedError",
    "NodeState",
    "PacketFilter",
    "PeerInfo",
    "RunningServer",
    "ServerConfig",
    "ServerKeyChangedError",
]
