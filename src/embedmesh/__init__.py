"""embedmesh: join a WireGuard mesh from any Python program, with no root, TUN device or daemon.

The front door is :class:`Node`; errors derive from :class:`EmbedmeshError`. These names are
what docs/api.md documents; the lower levels live in their submodules.
"""

from embedmesh.errors import (
    ConfigError,
    EmbedmeshError,
    NameResolutionError,
    NodeError,
    ParseError,
    UpTimeoutError,
)
from embedmesh.node import Node, NodeStatus, PeerStatus, WhoIs
from embedmesh.sockets import TcpListener, TcpStream, UdpSocket

__all__ = [
    "ConfigError",
    "EmbedmeshError",
    "NameResolutionError",
    "Node",
    "NodeError",
    "NodeStatus",
    "ParseError",
    "PeerStatus",
    "TcpListener",
    "TcpStream",
    "UdpSocket",
    "UpTimeoutError",
    "WhoIs",
]
__version__ = "0.1.0"
