"""The control plane: the coordination server, its protocol and the node's client.

``ControlClient`` (what a Node uses), ``NetworkMap`` and friends, and the errors are imported here;
``ControlServer`` / ``ServerConfig`` load Starlette and uvicorn on first use. See docs/control.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedmesh.control.client import ControlClient
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
    HandshakeRejectedError,
    NodeDeletedError,
    ServerKeyChangedError,
)
from embedmesh.control.netmap import DNSConfig, MapDelta, NetworkMap, NodeState, PacketFilter, PeerInfo

if TYPE_CHECKING:
    from embedmesh.control.server import ControlServer, RunningServer, ServerConfig


def __getattr__(name: str) -> Any:
    if name in ("ControlServer", "RunningServer", "ServerConfig"):
        from embedmesh.control import server

        return getattr(server, name)
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
    "HandshakeRejectedError",
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
