"""A simulated node: the same WireGuard device and overlay stack (interface, ICMP, TCP, UDP) as
:class:`embedmesh.Node`, driven by :class:`~embedmesh.sim.network.SimNetwork` on virtual time
instead of sockets, so whole meshes run deterministically from a seed.

:class:`SimNode` is a static-mode node (plain WireGuard peers, the device roams by itself);
:class:`SimTailnetNode` is a tailnet node: the same device behind the real path layer, with DERP
and STUN."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from embedmesh.devicepaths import DevicePaths
from embedmesh.hostport import join_host_port
from embedmesh.netstack.interface import EchoReply
from embedmesh.netstack.stack import Netstack
from embedmesh.paths import DERP_HOST, Path, PathCore
from embedmesh.peers import rank_endpoints
from embedmesh.sim import stun
from embedmesh.tailscale import disco
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


#: Tailscale's periodic re-STUN interval (magicsock's periodicReSTUN: a random 20-26 s).
RESTUN_INTERVAL = (20.0, 26.0)
#: A binding request unanswered this long is sent again (at most STUN_TRIES times per round).
STUN_RETRY = 1.0
STUN_TRIES = 3


class SimTailnetNode(SimNode):
    """A tailnet node: the device behind the real path layer (:class:`~embedmesh.devicepaths.DevicePaths`
    over :class:`~embedmesh.paths.PathCore`, as :class:`embedmesh.Node` wires them), with a DERP
    client (:class:`~embedmesh.sim.derp.SimDerp`) and a STUN client on its one UDP socket.

    What the real node's runtime does around the cores, this class does on virtual time:

    - Datagrams in: WireGuard to the device; disco to the path layer; STUN answers to the STUN
      client (the demultiplexing of :class:`~embedmesh.runtime.links.WireGuardLink`).
    - Datagrams out for a DERP address (:data:`~embedmesh.paths.DERP_HOST`) go into DERP to the
      node key and region :meth:`~embedmesh.paths.PathCore.derp_route` names; the rest leave by UDP.
    - From DERP: the sender's DERP address (:meth:`~embedmesh.paths.PathCore.derp_address`) is
      the source; disco goes to the path layer with ``via_derp=True``, WireGuard to the device.
    - STUN: a binding request to every STUN server at start and every 20-26 s (Tailscale's
      periodic re-STUN), retried after 1 s; the node's endpoints (its LAN address unless
      ``advertise_lan`` is False, then the reflexive addresses) go to the path layer (CallMeMaybe)
      and to :attr:`on_endpoints` (the control server) whenever they change.
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
        stun_servers: Iterable[Endpoint] = (),
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
        #: Set by :meth:`SimDerp.connect <embedmesh.sim.derp.SimDerp.connect>` via :meth:`join_derp`.
        self.derp: SimDerp | None = None
        self.home_derp = 0
        self.stun_servers = tuple(stun_servers)
        self.advertise_lan = advertise_lan
        #: Reflexive addresses learnt by STUN, by server.
        self.reflexive: dict[Endpoint, Endpoint] = {}
        #: Called with (node, now) when the endpoints to advertise change (the control server).
        self.on_endpoints: Callable[[SimTailnetNode, float], None] | None = None
        self.endpoints: tuple[Endpoint, ...] = ()
        self._stun_out: list[tuple[bytes, Endpoint]] = []
        self._stun_pending: dict[bytes, Endpoint] = {}
        self._stun_round_at: float | None = 0.0 if self.stun_servers else None
        self._stun_retry_at: float | None = None
        self._stun_tries = 0
        self._stun_answered = False
        #: (time, peer node key, path) whenever a peer's path changes.
        self.path_log: list[tuple[float, bytes, Path]] = []
        self._last_paths: dict[bytes, Path] = {}
        self.counters: Counter[str] = Counter()
        self._update_endpoints(0.0)

    @property
    def disco_public(self) -> bytes:
        return self.disco_private.public().raw

    # -- wiring

    def join_derp(self, derp: SimDerp, home_region: int, now: float) -> None:
        """Connect to DERP with ``home_region`` as the home region (the node's netcheck choice)."""
        self.derp = derp
        self.home_derp = home_region
        derp.connect(self.public_key, self.endpoint, home_region, self.receive_derp)
        self.paths.set_derp_enabled(True, now)
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
        """A packet DERP delivered from the node with key ``src_key``."""
        self.now = now
        source = self.core.derp_address(src_key)
        if source is None:
            self.counters["drop_derp_unknown_peer"] += 1
            return
        self.counters["rx_derp"] += 1
        kind = disco.classify(payload)
        if kind is disco.PacketKind.DISCO:
            self.paths.receive_disco(payload, source, now, via_derp=True)
        elif kind is disco.PacketKind.WIREGUARD:
            self.counters["rx_derp_wireguard"] += 1
            self._deliver(self.device.receive_datagram(payload, source, now), now)
        else:
            self.counters["drop_derp_" + kind.value.replace("-", "_")] += 1
        self._note_paths(now)

    def _deliver(self, packet: bytes | None, now: float) -> None:
        if packet is not None:
            self.delivered.append(bytes(packet))
            self.stack.receive(packet, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out = self.paths.datagrams_to_send()
        if self._stun_out:
            out += self._stun_out
            self._stun_out = []
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
            if disco.classify(data) is disco.PacketKind.WIREGUARD:
                self.counters["tx_derp_wireguard"] += 1
            self.derp.send(route[1], self.public_key, route[0], data, self.now)
        self.counters["tx_udp"] += len(udp)
        return udp

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (self.paths.next_deadline(), self.stack.next_deadline(), self._stun_deadline())
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timeout(self, now: float) -> None:
        self.now = now
        self.paths.handle_timeout(now)
        self.stack.handle_timeout(now)
        self._stun_timer(now)
        self._note_paths(now)

    # -- STUN

    def _stun_deadline(self) -> float | None:
        a, b = self._stun_round_at, self._stun_retry_at
        if a is None:
            return b
        return a if b is None else min(a, b)

    def _stun_timer(self, now: float) -> None:
        if self._stun_round_at is not None and now >= self._stun_round_at:
            low, high = RESTUN_INTERVAL
            self._stun_round_at = now + self._rng.uniform(low, high)
            self._stun_tries = 0
            self._stun_answered = False
            self._stun_pending.clear()
            self._send_stun(now)
        elif self._stun_retry_at is not None and now >= self._stun_retry_at:
            self._send_stun(now)

    def _send_stun(self, now: float) -> None:
        self._stun_tries += 1
        self._stun_retry_at = now + STUN_RETRY if self._stun_tries < STUN_TRIES else None
        for server in self.stun_servers:
            tx_id = self._rng.randbytes(stun.TX_ID_SIZE)
            self._stun_pending[tx_id] = server
            self._stun_out.append((stun.binding_request(tx_id), server))

    def _receive_stun(self, data: bytes, source: Endpoint, now: float) -> None:
        try:
            message = stun.parse(data)
        except stun.StunError:
            self.counters["drop_stun_bad"] += 1
            return
        server = self._stun_pending.pop(message.tx_id, None)
        if server is None or message.mapped is None:
            self.counters["drop_stun_unexpected"] += 1
            return
        self._stun_answered = True
        self._stun_retry_at = None
        self.reflexive[server] = message.mapped
        self._update_endpoints(now)

    def _update_endpoints(self, now: float) -> None:
        endpoints: list[Endpoint] = [self.endpoint] if self.advertise_lan else []
        for mapped in self.reflexive.values():
            if mapped not in endpoints:
                endpoints.append(mapped)
        if tuple(endpoints) == self.endpoints:
            return
        self.endpoints = tuple(endpoints)
        self.core.own_endpoints = self.endpoints
        if self.on_endpoints is not None:
            self.on_endpoints(self, now)
