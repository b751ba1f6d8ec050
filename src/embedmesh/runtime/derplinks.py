"""The node's DERP connections: one to its home region, and one to each region it sends to.

Tailscale's magicsock keeps a connection to the home DERP region (where peers reach this node)
and opens one to a peer's home region on demand, closing it after a minute without traffic.
:class:`DerpLinks` does the same with :func:`~embedmesh.tailscale.derpclient.connect_derp`: the
data plane hands it packets synchronously (:meth:`DerpLinks.send` queues, a task per region
writes), and every relayed packet comes back through ``on_packet(src_node_key, payload, region)``.

A region is tried server by server in the DERP map's order; a failed connection is retried with
capped exponential backoff (the queue keeps the newest packets meanwhile, dropping the oldest
first); a server's Restarting frame is honoured. Nothing here decides paths: the path layer
(:mod:`embedmesh.paths`) decides which peer goes through DERP and where its home region is.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from embedmesh.tailscale import derp
from embedmesh.tailscale.derpclient import DerpConnectError, DerpConnectionClosed, connect_derp
from embedmesh.tailscale.keys import NodePrivate, NodePublic

logger = logging.getLogger("embedmesh.derp")

#: Packets queued per region while its connection is (re)connecting or busy.
QUEUE_DEPTH = 1024
#: A region other than home is closed after this long without a packet to send (magicsock: 60 s).
IDLE_TIMEOUT = 60.0
#: Reconnect backoff bounds, in seconds.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
#: Packets written per flush of a connection.
WRITE_BATCH = 64

OnPacket = Callable[[bytes, bytes, int], None]


@dataclass(frozen=True, slots=True)
class DerpServerAddress:
    """One DERP server of a region, as the connection needs it."""

    url: str
    #: TLS for an https URL (None: the system's CAs; a context that does not verify for a DERP
    #: node marked InsecureForTests).
    ssl_context: ssl.SSLContext | None = None
    #: The address to connect to when the map pins one (TLS still names the URL's host).
    dial_host: str | None = None
    #: The server certificate's SHA-256 (hex) when the map pins a self-signed one.
    pinned_cert_sha256: str | None = None


@dataclass(slots=True)
class _Region:
    region_id: int
    servers: tuple[DerpServerAddress, ...]
    queue: deque[tuple[bytes, bytes]] = field(default_factory=lambda: deque(maxlen=QUEUE_DEPTH))
    wake: anyio.Event = field(default_factory=anyio.Event)
    running: bool = False
    connected: bool = False
    last_used: float = 0.0
    #: When a frame last came from the region (netcheck keeps a home region that still relays).
    last_rx: float = 0.0
    #: The server it is connected to (its URL), for the status.
    server: str = ""


class DerpLinks:
    """A node's DERP connections (see the module docstring). Run :meth:`run` in a task group."""

    def __init__(
        self,
        private: NodePrivate,
        on_packet: OnPacket,
        *,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._private = private
        self._on_packet = on_packet
        self._clock = clock
        self.idle_timeout = idle_timeout
        self._regions: dict[int, _Region] = {}
        self._home = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._rng = random.SystemRandom()
        #: Called when the home region's connection comes up or goes down.
        self.on_change: Callable[[], None] | None = None
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ configuration

    @property
    def home(self) -> int:
        """The home region (0: none)."""
        return self._home

    def set_regions(self, regions: Mapping[int, Sequence[DerpServerAddress]]) -> None:
        """The DERP map's regions and their servers. Regions that left the map are closed."""
        for region_id in list(self._regions):
            if region_id not in regions:
                region = self._regions.pop(region_id)
                region.servers = ()
                region.wake.set()
        for region_id, servers in regions.items():
            known = self._regions.get(region_id)
            if known is None:
                self._regions[region_id] = _Region(region_id, tuple(servers))
            elif known.servers != tuple(servers):
                known.servers = tuple(servers)
        if self._home and self._home not in self._regions:
            self._home = 0
        self._start(self._home)

    def set_home(self, region_id: int) -> None:
        """Make ``region_id`` the home region: connected at all times, told it is preferred."""
        if region_id == self._home:
            return
        old = self._regions.get(self._home)
        self._home = region_id if region_id in self._regions else 0
        if old is not None:
            old.wake.set()  # it may now idle out, and is no longer preferred
        self._start(self._home)

    def activity(self) -> dict[int, float]:
        """Region id -> when a frame last came from it (this object's clock), for netcheck."""
        return {r.region_id: r.last_rx for r in self._regions.values() if r.last_rx}

    def regions(self) -> list[int]:
        return sorted(self._regions)

    def connected(self, region_id: int) -> bool:
        region = self._regions.get(region_id)
        return region is not None and region.connected

    # ------------------------------------------------------------------ data

    def send(self, region_id: int, dst: bytes, packet: bytes) -> None:
        """Queue ``packet`` for the node ``dst`` through ``region_id`` (no waiting)."""
        region = self._regions.get(region_id)
        if region is None:
            self.counters["drop_unknown_region"] += 1
            return
        if len(region.queue) == QUEUE_DEPTH:
            self.counters["drop_queue_full"] += 1
        region.queue.append((dst, packet))
        region.last_used = self._clock()
        if not region.running:
            self._start(region_id)
        else:
            region.wake.set()

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the connection tasks until cancelled."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for region_id in [self._home, *[r for r, x in self._regions.items() if x.queue]]:
                self._start(region_id)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._task_group = None

    def _start(self, region_id: int) -> None:
        region = self._regions.get(region_id)
        if region is None or region.running or self._task_group is None or not region.servers:
            return
        region.running = True
        region.last_used = self._clock()
        self._task_group.start_soon(self._region_task, region, name=f"derp region {region_id}")

    def _wanted(self, region: _Region) -> bool:
        if self._regions.get(region.region_id) is not region or not region.servers:
            return False
        if region.region_id == self._home or region.queue:
            return True
        return self._clock() - region.last_used < self.idle_timeout

    async def _region_task(self, region: _Region) -> None:
        backoff = BACKOFF_MIN
        try:
            while self._wanted(region):
                for server in region.servers:
                    try:
                        wait = await self._connection(region, server)
                        backoff = BACKOFF_MIN
                    except DerpConnectError as exc:
                        self.counters["connect_failed"] += 1
                        logger.info("DERP region %d: %s", region.region_id, exc)
                        continue
                    if wait is not None:
                        await anyio.sleep(wait)
                    break
                else:
                    await anyio.sleep(backoff * (0.5 + self._rng.random()))
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            region.running = False
            region.connected = False

    async def _connection(self, region: _Region, server: DerpServerAddress) -> float | None:
        """One connection's life; returns how long to wait before the next one (a server's
        Restarting asks for that), None to reconnect at once or stop."""
        async with connect_derp(
            server.url, self._private, ssl_context=server.ssl_context,
            dial_host=server.dial_host,
            pinned_cert_sha256=server.pinned_cert_sha256,
        ) as client:
            self.counters["connected"] += 1
            region.connected = True
            region.server = server.url
            preferred = False
            restart_wait: list[float] = []
            logger.debug("DERP region %d: connected to %s", region.region_id, server.url)
            if region.region_id == self._home and self.on_change is not None:
                self.on_change()
            try:
                async with anyio.create_task_group() as tg:

                    async def reader() -> None:
                        try:
                            while True:
                                event = await client.receive()
                                region.last_rx = self._clock()
                                if isinstance(event, derp.PacketReceived):
                                    self.counters["rx_packets"] += 1
                                    self._on_packet(event.src.raw, event.packet, region.region_id)
                                elif isinstance(event, derp.Restarting):
                                    restart_wait.append(event.reconnect_in_ms / 1000)
                                    break
                                elif isinstance(event, derp.PeerGone):
                                    self.counters["rx_peer_gone"] += 1
                        except DerpConnectionClosed as exc:
                            logger.info("DERP region %d: %s", region.region_id, exc)
                        tg.cancel_scope.cancel()

                    tg.start_soon(reader)
                    while True:
                        is_home = region.region_id == self._home
                        if is_home != preferred:
                            await client.note_preferred(is_home)
                            preferred = is_home
                        if region.queue:
                            batch = [region.queue.popleft() for _ in range(min(WRITE_BATCH, len(region.queue)))]
                            await client.send_many([(NodePublic(dst), packet) for dst, packet in batch])
                            self.counters["tx_packets"] += len(batch)
                            continue
                        if not self._wanted(region):
                            tg.cancel_scope.cancel()
                            break
                        region.wake = anyio.Event()
                        idle_left = self.idle_timeout - (self._clock() - region.last_used)
                        timeout = math.inf if is_home else max(idle_left, 0.01)
                        with anyio.move_on_after(timeout):
                            await region.wake.wait()
            except DerpConnectionClosed as exc:
                logger.info("DERP region %d: %s", region.region_id, exc)
            finally:
                region.connected = False
                if region.region_id == self._home and self.on_change is not None:
                    self.on_change()
        return restart_wait[0] if restart_wait else None


__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "IDLE_TIMEOUT", "QUEUE_DEPTH", "DerpLinks", "DerpServerAddress"]
