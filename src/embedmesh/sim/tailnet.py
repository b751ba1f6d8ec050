"""A simulated tailnet: the coordination server's part (who the peers are, their keys, endpoints
and home DERP regions), DERP and STUN, around :class:`~embedmesh.sim.node.SimTailnetNode`\\ s on
one :class:`~embedmesh.sim.network.SimNetwork`.

The control server here is only its effect: when a node joins or its endpoints change (it learnt
a new reflexive address by STUN), every other node gets the new peer entry ``control_delay``
seconds later (a network map update), as :meth:`embedmesh.Node._sync_peers` hands it to the path
layer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import ip_address

from embedmesh.sim.derp import Region, SimDerp
from embedmesh.sim.nat import NatBox
from embedmesh.sim.network import Endpoint, SimNetwork
from embedmesh.sim.node import SimTailnetNode
from embedmesh.sim.stun import StunServer

#: The STUN server's address on the simulated internet (TEST-NET-3, as the NAT lab's).
STUN_ENDPOINT = ("203.0.113.1", 3478)


class SimTailnet:
    """Nodes, the control server's network map, DERP regions and a STUN server."""

    def __init__(
        self,
        net: SimNetwork,
        *,
        regions: list[Region] | None = None,
        derp: bool = True,
        control_delay: float = 0.05,
        stun_endpoint: Endpoint = STUN_ENDPOINT,
    ) -> None:
        self.net = net
        self.derp = SimDerp(net, regions) if derp else None
        self.control_delay = control_delay
        self.stun = StunServer()
        self.stun_endpoint = stun_endpoint
        net.attach(stun_endpoint, self.stun)
        self.nodes: list[SimTailnetNode] = []
        self._next_ip = 1

    def add_node(
        self,
        endpoint: Endpoint,
        *,
        behind: NatBox | None = None,
        home_region: int = 1,
        advertise_lan: bool = True,
        addresses: Iterable[str] | None = None,
        name: str = "",
        rng: random.Random | None = None,
    ) -> SimTailnetNode:
        """A node at ``endpoint`` (on the LAN of ``behind``, or on the internet) that joins now."""
        if addresses is None:
            addresses = [f"100.64.0.{self._next_ip}"]
            self._next_ip += 1
        node = SimTailnetNode(
            rng or random.Random(self.net.rng.getrandbits(64)),
            addresses,
            endpoint=endpoint,
            stun_servers=[self.stun_endpoint],
            advertise_lan=advertise_lan,
            name=name,
        )
        self.net.attach(endpoint, node, behind=behind)
        now = self.net.now
        if self.derp is not None:
            node.join_derp(self.derp, home_region, now)
        for other in self.nodes:
            node.set_peer(*self._entry(other), now, home_derp=other.home_derp)
        self.nodes.append(node)
        node.on_endpoints = self._publish
        self._publish(node, now)
        return node

    @staticmethod
    def _entry(node: SimTailnetNode) -> tuple[bytes, bytes, tuple[Endpoint, ...], list[str]]:
        allowed = [f"{ip_address(a)}/{8 * len(a)}" for a in node.interface.addresses]
        return node.public_key, node.disco_public, node.endpoints, allowed

    def _publish(self, node: SimTailnetNode, now: float) -> None:
        """Tell every other node about ``node`` as it is now, after the control delay."""
        entry = self._entry(node)
        home = node.home_derp
        for other in self.nodes:
            if other is node:
                continue

            def update(t: float, other: SimTailnetNode = other) -> None:
                other.set_peer(*entry, t, home_derp=home)

            self.net.call_at(now + self.control_delay, other.endpoint, update)


__all__ = ["STUN_ENDPOINT", "SimTailnet"]
