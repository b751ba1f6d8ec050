"""A simulated tailnet: the coordination server's part (who the peers are, their keys, endpoints
and home DERP regions, and the DERP map), DERP relays and their STUN servers, around
:class:`~embedmesh.sim.node.SimTailnetNode`\\ s on one :class:`~embedmesh.sim.network.SimNetwork`.

The control server here is only its effect: when a node joins, or its endpoints or home region
change (netcheck found a new public address), every other node gets the new peer entry
``control_delay`` seconds later (a network map update), which it hands to the path layer as
:meth:`embedmesh.Node._sync_peers` does.

Each DERP region has one node whose STUN server sits on the internet at ``203.0.113.<region>``
port 3478 (TEST-NET-3, as in the NAT lab), in the DERP map every node runs netcheck against.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import ip_address

from embedmesh.sim.derp import Region, SimDerp
from embedmesh.sim.nat import NatBox
from embedmesh.sim.network import Endpoint, SimNetwork
from embedmesh.sim.node import SimTailnetNode
from embedmesh.sim.stun import SimStunServer
from embedmesh.tailscale.derpmap import DerpMap, DerpNode, DerpRegion

STUN_PORT = 3478


def stun_endpoint(region_id: int) -> Endpoint:
    """Where region ``region_id``'s STUN server is on the simulated internet."""
    return (f"203.0.113.{region_id}", STUN_PORT)


class SimTailnet:
    """Nodes, the control server's network map, DERP regions and their STUN servers."""

    def __init__(
        self,
        net: SimNetwork,
        *,
        regions: list[Region] | None = None,
        control_delay: float = 0.05,
    ) -> None:
        self.net = net
        self.derp = SimDerp(net, regions)
        self.control_delay = control_delay
        self.stun: dict[int, SimStunServer] = {}
        map_regions: dict[int, DerpRegion] = {}
        for region_id in sorted(self.derp.regions):
            if not 0 < region_id < 10:
                raise ValueError("simulated DERP regions are numbered 1-9")
            server = self.stun[region_id] = SimStunServer()
            host, port = stun_endpoint(region_id)
            net.attach((host, port), server)
            node = DerpNode(f"{region_id}a", region_id, f"derp{region_id}.sim", ipv4=host, stun_port=port)
            map_regions[region_id] = DerpRegion(region_id, f"sim{region_id}", f"sim {region_id}", (node,))
        self.derp_map = DerpMap(map_regions)
        self.nodes: list[SimTailnetNode] = []
        self._next_ip = 1

    def add_node(
        self,
        endpoint: Endpoint,
        *,
        behind: NatBox | None = None,
        home_region: int | None = None,
        advertise_lan: bool = True,
        addresses: Iterable[str] | None = None,
        name: str = "",
        rng: random.Random | None = None,
    ) -> SimTailnetNode:
        """A node at ``endpoint`` (on the LAN of ``behind``, or on the internet) that joins now; its
        home region is ``home_region``, or netcheck's choice."""
        if addresses is None:
            addresses = [f"100.64.0.{self._next_ip}"]
            self._next_ip += 1
        node = SimTailnetNode(
            rng or random.Random(self.net.rng.getrandbits(64)),
            addresses,
            endpoint=endpoint,
            advertise_lan=advertise_lan,
            name=name,
        )
        self.net.attach(endpoint, node, behind=behind)
        now = self.net.now
        node.join_derp(self.derp, self.derp_map, now, home_region=home_region)
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
        if node not in self.nodes:
            return  # still joining: add_node publishes it once it is in
        entry = self._entry(node)
        home = node.home_derp
        for other in self.nodes:
            if other is node:
                continue

            def update(t: float, other: SimTailnetNode = other) -> None:
                other.set_peer(*entry, t, home_derp=home)

            self.net.call_at(now + self.control_delay, other.endpoint, update)


__all__ = ["STUN_PORT", "SimTailnet", "stun_endpoint"]
