"""A simulated node: the same WireGuard device and overlay stack (interface, ICMP, TCP, UDP) as
:class:`embedmesh.Node`, driven by :class:`~embedmesh.sim.network.SimNetwork` on virtual time
instead of sockets, so whole meshes run deterministically from a seed.

:class:`SimNode` is a static-mode node (plain WireGuard peers, the device roams by itself);
:class:`SimTailnetNode` is a tailnet node: the same device behind the real path layer, with DERP
and netcheck."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from embedmesh.devicepaths import DevicePaths
from embedmesh.hostport import join_host_port
from embedmesh.netcheck import NetcheckCore, NetcheckReport
from embedmesh.netstack.interface import EchoReply
from embedmesh.netstack.stack import Netstack
from embedmesh.paths import DERP_HOST, Path, PathCore
from embedmesh.peers import rank_endpoints
from embedmesh.tailscale import disco
from embedmesh.tailscale.derpmap import DerpMap
from embedmesh.tailscale.keys import DiscoPrivate, NodePublic
from embedmesh.wireguard import crypto
from embedmesh.wireguard.device import WireGuardDevice

if TYPE_CHECKING:
    from embedmesh.sim.derp import SimDerp

Endpoint = tuple[str, int]


class SimNode:
    """A WireGuard device plus overlay interface, with the underlay side that SimNetwork drives."""

    def __init__(
        self,
        rng: random.Random,
        addresses: Iterable[str],
        *,
        endpoint: Endpoint,
        mtu: int = 1420,
        private_key: bytes | None = None,
        wall_clock_offset: float = 1.7e9,
    ) -> None:
        self.endpoint = endpoint
        self.now = 0.0
        key = private_key or crypto.generate_private_key(rng.randbytes(32))
        self.device = WireGuardDevice(
            key, mtu=mtu, random_bytes=rng.randbytes, rng=rng, wall_clock_offset=wall_clock_offset
        )
        self.stack = Netstack(addresses, self._transmit, mtu=mtu, rng=rng)
        self.interface = self.stack.interface
        self.echo_replies: list[EchoReply] = []
        self.interface.on_echo_reply = self.echo_replies.append
        #: IP packets this node received from the overlay, for tests that look at them.
        self.delivered: list[bytes] = []

    @property
    def public_key(self) -> bytes:
        return self.device.public_key

    def _transmit(self, packet: bytes) -> None:
        self.device.send_packet(packet, self.now)

    def send_packet(self, packet: bytes, now: float) -> None:
        """Send an overlay IP packet at virtual time ``now``."""
        self.now = now
        self.device.send_packet(packet, now)

    # -- the SimHost side
    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        self.now = now
        packet = self.device.receive_datagram(data, source, now)
        if packet is not None:
            self.delivered.append(bytes(packet))
            self.stack.receive(packet, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        return self.device.datagrams_to_send()

    def next_deadline(self) -> float | None:
        a, b = self.device.next_deadline(), self.stack.next_deadline()
        if a is None:
            return b
        return a if b is None else min(a, b)

    def handle_timeout(self, now: float) -> None:
        self.now = now
        self.device.handle_timeout(now)
        self.stack.handle_timeout(now)


def connect(
    a: SimNode,
    b: SimNode,
    *,
    a_allowed: Iterable[str],
    b_allowed: Iterable[str],
    a_knows_endpoint: bool = True,
    b_knows_endpoint: bool = True,
    preshared_key: bytes | None = None,
    persistent_keepalive: float | None = None,
) -> None:
    """Make ``a`` and ``b`` peers. ``a_allowed`` are the prefixes ``a`` routes to ``b``."""
    a.device.add_peer(
        b.public_key,
        allowed_ips=a_allowed,
        preshared_key=preshared_key,
        endpoint=b.endpoint if a_knows_endpoint else None,
        persistent_keepalive=persistent_keepalive,
    )
    b.device.add_peer(
        a.public_key,
        allowed_ips=b_allowed,
        preshared_key=preshared_key,
        endpoint=a.endpoint if b_knows_endpoint else None,
        persistent_keepalive=persistent_keepalive,
    )


#: Seconds between netchecks, plus up to 30 % jitter (embedmesh.Node's NETCHECK_INTERVAL:
#: magicsock re-STUNs every 20-26 s, which also keeps the WireGuard socket's NAT mapping alive).
NETCHECK_INTERVAL = 20.0


class SimTailnetNode(SimNode):
    """A tailnet node: the device behind the real path layer (:class:`~embedmesh.devicepaths.DevicePaths`
    over :class:`~embedmesh.paths.PathCore`), with a DERP client (:class:`~embedmesh.sim.derp.SimDerp`)
    and netcheck (:class:`~embedmesh.netcheck.NetcheckCore`) on its one UDP socket, wired as
    :class:`embedmesh.Node` wires them:

    - Datagrams in: WireGuard to the device; disco to the path layer; STUN answers to netcheck
      (the demultiplexing of :class:`~embedmesh.runtime.links.WireGuardLink`).
    - Datagrams out for a DERP address (:data:`~embedmesh.paths.DERP_HOST`) go into DERP to the
      node key and region :meth:`~embedmesh.paths.PathCore.derp_route` names (the node's
      ``_send_via_derp``); the rest leave by UDP.
    - From DERP (the node's ``_on_derp_packet``): the sender's DERP address
      (:meth:`~embedmesh.paths.PathCore.derp_address`) is the source; disco goes to the path layer
      with ``via_derp=True``, anything else to the device.
    - Netcheck (the node's ``_netcheck_loop`` and ``_apply_netcheck``): a check once the DERP map
      is known and every 20-26 s after the last one ended; the report's public endpoints, then the
      node's own (unless ``advertise_lan`` is False), become ``PathCore.own_endpoints``
      (CallMeMaybe) and go to :attr:`on_endpoints` (the control server) when they change, and its
      preferred region becomes home unless the home region was fixed.
    """

    def __init__(
        self,
        rng: random.Random,
        addresses: Iterable[str],
        *,
        endpoint: Endpoint,
        mtu: int = 1420,
        private_key: bytes | None = None,
        wall_clock_offset: float = 1.7e9,
        advertise_lan: bool = True,
        name: str = "",
    ) -> None:
        super().__init__(
            rng,
            addresses,
            endpoint=endpoint,
            mtu=mtu,
            private_key=private_key,
            wall_clock_offset=wall_clock_offset,
        )
        self.name = name or f"{endpoint[0]}:{endpoint[1]}"
        self._rng = rng
        self.disco_private = DiscoPrivate.generate(rng.randbytes(32))
        core = PathCore(self.disco_private, random_bytes=rng.randbytes)
        core.node_key = NodePublic(self.public_key)
        self.paths = DevicePaths(self.device, core)
        self.core = core
        #: Set by :meth:`join_derp`.
        self.derp: SimDerp | None = None
        self.home_derp = 0
        self._home_fixed = False
        self.advertise_lan = advertise_lan
        self.netcheck: NetcheckCore | None = None
        #: The last netcheck report (None before the first ends).
        self.report: NetcheckReport | None = None
        self._netcheck_at: float | None = None
        #: Region id -> when DERP last delivered from it (netcheck's home hysteresis).
        self._derp_activity: dict[int, float] = {}
        #: Called with (node, now) when the endpoints or the home region to advertise change.
        self.on_endpoints: Callable[[SimTailnetNode, float], None] | None = None
        self.endpoints: tuple[Endpoint, ...] = ()
        #: (time, peer node key, path) whenever a peer's path changes.
        self.path_log: list[tuple[float, bytes, Path]] = []
        self._last_paths: dict[bytes, Path] = {}
        self.counters: Counter[str] = Counter()
        self._update_endpoints(0.0)

    @property
    def disco_public(self) -> bytes:
        return self.disco_private.public().raw

    # -- wiring

    def join_derp(
        self, derp: SimDerp, derp_map: DerpMap, now: float, *, home_region: int | None = None
    ) -> None:
        """Connect to DERP: ``derp_map`` names its regions and their STUN servers; the home region is
        ``home_region`` (fixed), or until netcheck prefers another the map's lowest region id, as the
        node picks one before its first netcheck."""
        self.derp = derp
        self._home_fixed = home_region is not None
        self.home_derp = home_region if home_region is not None else min(derp_map.regions)
        derp.connect(self.public_key, self.endpoint, self.home_derp, self.receive_derp)
        self.paths.set_derp_enabled(bool(derp_map.regions), now)
        self.netcheck = NetcheckCore(derp_map, random_bytes=self._rng.randbytes)
        self._netcheck_at = now
        self._note_paths(now)

    def set_peer(
        self,
        node_key: bytes,
        disco_key: bytes,
        endpoints: Iterable[Endpoint],
        allowed_ips: Iterable[str],
        now: float,
        *,
        home_derp: int = 0,
    ) -> None:
        """A peer from the network map, ranked as :class:`embedmesh.Node` ranks them."""
        self.now = now
        ranked = rank_endpoints(tuple(join_host_port(h, p) for h, p in endpoints), {self.endpoint[0]})
        self.paths.set_peer(node_key, disco_key, ranked, allowed_ips, now, home_derp=home_derp)
        self._note_paths(now)

    def path(self, node_key: bytes) -> Path:
        return self.core.path(node_key, self.now)

    def _note_paths(self, now: float) -> None:
        core = self.core
        for key in self.device.peers:
            path = core.path(key, now)
            last = self._last_paths.get(key)
            if last is None or last.kind is not path.kind or last.address != path.address:
                self._last_paths[key] = path
                self.path_log.append((now, key, path))

    # -- the SimHost side

    def send_packet(self, packet: bytes, now: float) -> None:
        super().send_packet(packet, now)
        self._note_paths(now)

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        self.now = now
        # The demultiplexing of WireGuardLink.read: WireGuard's first byte is 1-4 and its second 0.
        if len(data) < 4 or data[0] > 4 or data[1]:
            kind = disco.classify(data)
            if kind is disco.PacketKind.DISCO:
                self.paths.receive_disco(data, source, now)
            elif kind is disco.PacketKind.STUN:
                self._receive_stun(data, source, now)
            else:
                self.counters["drop_" + kind.value.replace("-", "_")] += 1
        else:
            self._deliver(self.device.receive_datagram(data, source, now), now)
        self._note_paths(now)

    def receive_derp(self, src_key: bytes, payload: bytes, now: float) -> None:
        """A packet DERP delivered from the node with key ``src_key`` (through our home region)."""
        self.now = now
        self._derp_activity[self.home_derp] = now
        self.counters["rx_derp"] += 1
        relayed = self.core.counters["rx_derp_wireguard"]
        self._deliver(self.paths.receive_relayed(payload, src_key, now), now)
        self.counters["rx_derp_wireguard"] += self.core.counters["rx_derp_wireguard"] - relayed
        self._note_paths(now)

    def _deliver(self, packet: bytes | None, now: float) -> None:
        if packet is not None:
            self.delivered.append(bytes(packet))
            self.stack.receive(packet, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out = self.paths.datagrams_to_send()
        if self.netcheck is not None:
            stun_out = self.netcheck.datagrams_to_send()
            if stun_out:
                out += stun_out
        if not any(d[1][0] == DERP_HOST for d in out):
            self.counters["tx_udp"] += len(out)
            return out
        udp: list[tuple[bytes, Endpoint]] = []
        for data, destination in out:
            if destination[0] != DERP_HOST:
                udp.append((data, destination))
                continue
            route = self.core.derp_route(destination)
            if route is None or self.derp is None or not route[1]:
                self.counters["drop_derp_no_route"] += 1
                continue
            self.counters["tx_derp"] += 1
            if disco.classify(data) is not disco.PacketKind.DISCO:
                self.counters["tx_derp_wireguard"] += 1
            self.derp.send(route[1], self.public_key, route[0], data, self.now)
        self.counters["tx_udp"] += len(udp)
        return udp

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (self.paths.next_deadline(), self.stack.next_deadline(), self._netcheck_deadline())
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timeout(self, now: float) -> None:
        self.now = now
        self.paths.handle_timeout(now)
        self.stack.handle_timeout(now)
        self._netcheck_timer(now)
        self._note_paths(now)

    # -- netcheck

    def _netcheck_deadline(self) -> float | None:
        core = self.netcheck
        if core is None:
            return None
        return core.next_deadline() if core.running else self._netcheck_at

    def _netcheck_timer(self, now: float) -> None:
        core = self.netcheck
        if core is None:
            return
        if core.running:
            core.handle_timeout(now)
            self._netcheck_done(now)
        elif self._netcheck_at is not None and now >= self._netcheck_at:
            self._netcheck_at = None
            core.start(now, self.report, derp_activity=self._derp_activity)
            self._netcheck_done(now)

    def _receive_stun(self, data: bytes, source: Endpoint, now: float) -> None:
        core = self.netcheck
        if core is None or not core.receive(data, source, now):
            self.counters["stun_unexpected"] += 1
            return
        self._netcheck_done(now)

    def _netcheck_done(self, now: float) -> None:
        core = self.netcheck
        if core is None or core.running or self._netcheck_at is not None:
            return
        report = core.report
        self._netcheck_at = now + NETCHECK_INTERVAL * (1 + 0.3 * self._rng.random())
        if report is None:
            return
        self.report = report
        preferred = report.preferred_derp
        if not self._home_fixed and preferred and preferred != self.home_derp and self.derp is not None:
            self.home_derp = preferred
            self.derp.connect(self.public_key, self.endpoint, preferred, self.receive_derp)
            self.endpoints = ()  # report the new home with the endpoints
        self._update_endpoints(now)

    def _update_endpoints(self, now: float) -> None:
        public = self.report.endpoints() if self.report is not None else []
        own = [self.endpoint] if self.advertise_lan else []
        endpoints = tuple(dict.fromkeys([*public, *own]))
        if endpoints == self.endpoints:
            return
        self.endpoints = endpoints
        self.core.own_endpoints = endpoints
        if self.on_endpoints is not None:
            self.on_endpoints(self, now)
