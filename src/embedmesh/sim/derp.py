"""A simulated DERP relay: packets between nodes by destination node key, reliable and in order,
with latency (and optionally a bandwidth) per client connection.

This is DERP as the path layer sees it, not its wire format (that is
:mod:`embedmesh.tailscale.derp`'s, tested on its own): a node hands the relay a payload (a disco
or WireGuard datagram, exactly what it would put in a SendPacket frame) for a peer's node key in
a region, and the peer receives it with the sender's key (a RecvPacket). Each client's
connection to a region is a TCP stream: nothing is lost or reordered on it, and packets queue
behind each other when a bandwidth is set. A packet for a key not connected to that region is
dropped and counted (the real server answers PeerGone).

The relay does not pass through the simulated NAT boxes (DERP runs over TCP 443, which the
lab's NATs, ``udp-blocked`` included, let out and keep), so it works behind all of them.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from embedmesh.sim.network import Endpoint, SimNetwork

#: DERP's largest packet (derp.MaxPacketSize).
MAX_PACKET_SIZE = 64 << 10

#: What a connected client gets: (source node key, payload, now).
Deliver = Callable[[bytes, bytes, float], None]


@dataclass(slots=True)
class Region:
    """One DERP region (one server): its one-way latency to every client, and bandwidth."""

    region_id: int
    latency: float = 0.01
    jitter: float = 0.0
    #: Bytes per second of each client's connection, each way (None: unlimited).
    bandwidth: float | None = None
    #: False: the server is unreachable; packets to and from it are dropped (counted).
    up: bool = True


@dataclass(slots=True)
class _Client:
    node_key: bytes
    endpoint: Endpoint
    home_region: int
    deliver: Deliver


class SimDerp:
    """The DERP regions of a simulated tailnet and who is connected to them."""

    def __init__(
        self, net: SimNetwork, regions: list[Region] | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.net = net
        self.regions: dict[int, Region] = {r.region_id: r for r in (regions or [Region(1)])}
        self._rng = rng if rng is not None else random.Random(net.rng.getrandbits(64))
        self._clients: dict[bytes, _Client] = {}
        # Each (node key, region, direction) connection: until when it is busy sending (the
        # bandwidth's queue) and when its last packet arrives (the stream's order).
        self._free: dict[tuple[bytes, int, int], tuple[float, float]] = {}
        self.counters: Counter[str] = Counter()

    def connect(self, node_key: bytes, endpoint: Endpoint, home_region: int, deliver: Deliver) -> None:
        """A node logs in to its home region (and to any region it sends to, on demand)."""
        self._clients[node_key] = _Client(node_key, endpoint, home_region, deliver)

    def disconnect(self, node_key: bytes) -> None:
        self._clients.pop(node_key, None)

    def home_region(self, node_key: bytes) -> int:
        client = self._clients.get(node_key)
        return 0 if client is None else client.home_region

    def _leg(self, key: bytes, region: Region, direction: int, start: float, size: int) -> float:
        """When a packet that is ready at ``start`` has crossed one connection of ``key``'s."""
        slot = (key, region.region_id, direction)
        busy_until, last_arrival = self._free.get(slot, (float("-inf"), float("-inf")))
        done = max(start, busy_until) + (size / region.bandwidth if region.bandwidth else 0.0)
        arrive = done + region.latency + (self._rng.uniform(0, region.jitter) if region.jitter else 0.0)
        # A stream never reorders: a later packet arrives no earlier than the one before it.
        arrive = max(arrive, last_arrival)
        self._free[slot] = (done, arrive)
        return arrive

    def send(self, region_id: int, src_key: bytes, dst_key: bytes, payload: bytes, now: float) -> bool:
        """``src_key`` sends ``payload`` to ``dst_key`` through region ``region_id``."""
        region = self.regions.get(region_id)
        if region is None:
            self.counters["drop_unknown_region"] += 1
            return False
        if not region.up:
            self.counters["drop_region_down"] += 1
            return False
        if len(payload) > MAX_PACKET_SIZE:
            self.counters["drop_too_large"] += 1
            return False
        if src_key not in self._clients:
            self.counters["drop_not_connected"] += 1
            return False
        at_server = self._leg(src_key, region, 0, now, len(payload))
        self.counters["sent"] += 1
        self.counters["bytes"] += len(payload)

        def at_server_arrival(t: float) -> None:
            client = self._clients.get(dst_key)
            if client is None or client.home_region != region_id or not region.up:
                # Go's server answers PeerGone; the sender's path layer finds out by its pings.
                self.counters["drop_peer_gone"] += 1
                return
            at_client = self._leg(dst_key, region, 1, t, len(payload))

            def at_client_arrival(t2: float) -> None:
                self.counters["delivered"] += 1
                client.deliver(src_key, payload, t2)

            self.net.call_at(at_client, client.endpoint, at_client_arrival)

        src_endpoint = self._clients[src_key].endpoint
        self.net.call_at(at_server, src_endpoint, at_server_arrival)
        return True


__all__ = ["MAX_PACKET_SIZE", "Deliver", "Region", "SimDerp"]
