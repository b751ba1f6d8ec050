"""embedmesh: join a WireGuard mesh from any Python program, with no root, TUN device or daemon.

The front door is :class:`Node`; errors derive from :class:`EmbedmeshError`.
"""

from embedmesh.errors import ConfigError, EmbedmeshError, NodeError, ParseError
from embedmesh.node import Node, NodeStatus, PeerStatus

__all__ = ["ConfigError", "EmbedmeshError", "Node", "NodeError", "NodeStatus", "ParseError", "PeerStatus"]
__version__ = "0.1.0"
