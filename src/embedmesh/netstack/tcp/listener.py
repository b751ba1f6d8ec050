"""A listening socket: SYN backlog (half-open connections) and accept queue."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from embedmesh.netstack.tcp.config import TcpState

if TYPE_CHECKING:
    from embedmesh.netstack.tcp.connection import TcpConnection
    from embedmesh.netstack.tcp.layer import ConnKey, TcpLayer


class TcpListener:
    """Accepts connections on one port (of one address, or of all when ``local_addr`` is None).

    Half-open connections (SYN-RECEIVED) wait in a bounded backlog (the layer's ``syn_backlog``);
    completed ones wait in the accept queue, at most ``backlog`` of them. When the listener gets a new
    connection to accept, it lands in the layer's :meth:`~TcpLayer.pop_changed` set and ``on_change``
    (if set) is called.
    """

    __slots__ = (
        "_layer",
        "_pending",
        "_queue",
        "backlog",
        "closed",
        "local_addr",
        "on_change",
        "port",
        "user_data",
    )

    state = TcpState.LISTEN

    def __init__(self, layer: TcpLayer, local_addr: bytes | None, port: int, backlog: int) -> None:
        self._layer = layer
        self.local_addr = local_addr
        self.port = port
        self.backlog = max(1, backlog)
        self.closed = False
        self.on_change: Callable[[TcpListener], None] | None = None
        self.user_data: object = None
        self._pending: OrderedDict[ConnKey, TcpConnection] = OrderedDict()
        self._queue: deque[TcpConnection] = deque()

    def __repr__(self) -> str:
        where = self.local_addr.hex() if self.local_addr is not None else "*"
        return f"<TcpListener {where}:{self.port} pending={len(self._pending)} queued={len(self._queue)}>"

    @property
    def pending(self) -> int:
        """Half-open connections (handshake not finished)."""
        return len(self._pending)

    @property
    def readable(self) -> int:
        """Connections :meth:`accept` can return now."""
        return len(self._queue)

    def accept(self) -> TcpConnection | None:
        """The oldest established connection not yet accepted, or None."""
        while self._queue:
            conn = self._queue.popleft()
            conn.listener = None
            if conn.state is not TcpState.CLOSED or conn.readable:
                return conn
        return None

    def close(self, now: float | None = None) -> None:
        """Stop listening; reset half-open and unaccepted connections."""
        if self.closed:
            return
        self.closed = True
        self._layer._remove_listener(self)
        for conn in list(self._pending.values()):
            conn.abort(now)
        for conn in list(self._queue):
            conn.listener = None
            conn.abort(now)
        self._pending.clear()
        self._queue.clear()
