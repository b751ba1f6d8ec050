"""A sans-IO TCP (RFC 9293) for the overlay: connections, listeners and the layer that owns them.

Start at :class:`TcpLayer`; ``docs/tcp.md`` describes the API, the design and the measurements.
"""

from __future__ import annotations

from embedmesh.netstack.tcp.config import TcpConfig, TcpState
from embedmesh.netstack.tcp.connection import ConnectionStats, TcpConnection
from embedmesh.netstack.tcp.layer import TcpLayer, Transmit
from embedmesh.netstack.tcp.listener import TcpListener

__all__ = ["ConnectionStats", "TcpConfig", "TcpConnection", "TcpLayer", "TcpListener", "TcpState", "Transmit"]
