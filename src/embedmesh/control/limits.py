"""Connection limits of the coordination server: what keeps unauthenticated sockets from starving it.

Anyone who reaches the server can open TCP connections and send nothing. Each one holds a file
descriptor, so without limits a few hundred idle sockets exhaust a server's descriptors and real
registrations fail with ``Too many open files``. :class:`ConnectionLimiter` is the bookkeeping
(sans-IO: the server's protocol layer calls it and closes what it says to close):

* a connection must send a complete first request within ``first_request_timeout`` seconds;
* connections that have not authenticated yet (no registered control stream: idle sockets, HTTP
  requests, Noise handshakes in progress) are capped per source address (an IPv6 /64 is one
  source), so one host cannot hold many, while any number of nodes behind one NAT can stay
  connected once they have registered;
* all connections are capped in total, below the descriptor limit.

At either cap a new connection pushes out the oldest connection (of its source, or of all) that
has not sent a request yet, and is refused only when there is none. So idle sockets, even from the
node's own address, never lock out a client that sends its request promptly: to push that one out
an attacker must open a whole cap's worth of connections within the client's round trip.
"""

from __future__ import annotations

import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from embedmesh.control.coordinator import _source_bucket

#: A connection that has not sent a complete request this long after it was accepted is closed.
DEFAULT_FIRST_REQUEST_TIMEOUT = 5.0
#: Unauthenticated connections one source address (or IPv6 /64) may hold at once.
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 64
#: Descriptors kept free for everything else the server opens (the database and its WAL, the
#: listening socket, log files, the connection being refused).
_RESERVED_FDS = 64

Client = tuple[str, int]


def default_max_connections() -> int:
    """The total cap: the process's descriptor limit minus a reserve (at least 16, at most 65536)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 65536
    return max(16, min(65536, soft - _RESERVED_FDS))


@dataclass(slots=True)
class _Connection:
    source: str
    close: Callable[[], None]
    started: bool = False
    authenticated: bool = False
    #: Called when the connection no longer needs its first-request deadline (cancels a timer).
    on_started: Callable[[], None] | None = None


@dataclass
class ConnectionLimiter:
    """Which connections the server keeps; all methods run on the server's event loop."""

    max_connections: int = field(default_factory=default_max_connections)
    max_per_source: int = DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    first_request_timeout: float = DEFAULT_FIRST_REQUEST_TIMEOUT
    _connections: dict[Client, _Connection] = field(default_factory=dict, init=False, repr=False)
    #: Connections that have sent no request yet, oldest first (the ones a full table pushes
    #: out), of all sources and of each.
    _waiting: OrderedDict[Client, None] = field(default_factory=OrderedDict, init=False, repr=False)
    _waiting_by_source: dict[str, OrderedDict[Client, None]] = field(
        default_factory=dict, init=False, repr=False
    )
    #: Unauthenticated connections per source.
    _per_source: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    refused: int = field(default=0, init=False)
    evicted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_source < 1 or not self.first_request_timeout > 0:
            raise ValueError(
                "max_connections and max_connections_per_source must be >= 1 and "
                "first_request_timeout > 0"
            )

    def __len__(self) -> int:
        return len(self._connections)

    def open(self, key: Client, close: Callable[[], None]) -> bool:
        """A connection from ``key`` (its peer's host and port) was accepted: keep it (True) or not.

        On False the caller closes it at once; ``close`` closes it later, when a full table pushes
        it out.
        """
        source = _source_bucket(key[0])
        if self._per_source.get(source, 0) >= self.max_per_source and not self._evict(
            self._waiting_by_source.get(source)
        ):
            self.refused += 1
            return False
        if len(self._connections) >= self.max_connections and not self._evict(self._waiting):
            self.refused += 1
            return False
        self._connections[key] = _Connection(source, close)
        self._waiting[key] = None
        self._waiting_by_source.setdefault(source, OrderedDict())[key] = None
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return True

    def _evict(self, waiting: OrderedDict[Client, None] | None) -> bool:
        """Close the oldest connection in ``waiting``; False if there is none."""
        if not waiting:
            return False
        oldest = next(iter(waiting))
        victim = self._connections[oldest]
        self._forget(oldest)
        self.evicted += 1
        victim.close()  # its connection_lost comes later and finds nothing to forget
        return True

    def set_deadline_cancel(self, client: Client | None, cancel: Callable[[], None]) -> None:
        """Remember how to cancel the first-request timer of ``client``."""
        conn = self._connections.get(client) if client is not None else None
        if conn is not None:
            conn.on_started = cancel

    def started(self, client: Client | None) -> None:
        """A complete request (HTTP or WebSocket) reached the app: the first-request deadline is met."""
        conn = self._connections.get(client) if client is not None else None
        if conn is None or conn.started:
            return
        conn.started = True
        self._unwait(client, conn.source)  # type: ignore[arg-type]
        if conn.on_started is not None:
            conn.on_started()
            conn.on_started = None

    def expired(self, client: Client | None) -> bool:
        """The first-request timer fired: True if the connection is still waiting (close it)."""
        conn = self._connections.get(client) if client is not None else None
        return conn is not None and not conn.started

    def authenticated(self, client: Client | None) -> None:
        """A control stream registered: it no longer counts against its source's cap."""
        conn = self._connections.get(client) if client is not None else None
        if conn is None or conn.authenticated:
            return
        conn.authenticated = True
        self._release_source(conn.source)

    def closed(self, client: Client | None) -> None:
        """The connection is gone (idempotent)."""
        if client is not None:
            self._forget(client)

    def _forget(self, client: Client) -> None:
        conn = self._connections.pop(client, None)
        if conn is None:
            return
        self._unwait(client, conn.source)
        if not conn.authenticated:
            self._release_source(conn.source)

    def _unwait(self, client: Client, source: str) -> None:
        self._waiting.pop(client, None)
        of_source = self._waiting_by_source.get(source)
        if of_source is not None:
            of_source.pop(client, None)
            if not of_source:
                del self._waiting_by_source[source]

    def _release_source(self, source: str) -> None:
        left = self._per_source.get(source, 0) - 1
        if left > 0:
            self._per_source[source] = left
        else:
            self._per_source.pop(source, None)
