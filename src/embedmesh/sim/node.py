"""A simulated node: the same WireGuard device and overlay stack (interface, ICMP, TCP, UDP) as
:class:`embedmesh.Node`, driven by :class:`~embedmesh.sim.network.SimNetwork` on virtual time
instead of sockets, so whole meshes run deterministically from a seed."""

from __future__ import annotations

import random
from collections.abc import Iterable

from embedmesh.netstack.interface import EchoReply
from embedmesh.netstack.stack import Netstack
from embedmesh.wireguard import crypto
from embedmesh.wireguard.device import WireGuardDevice

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
