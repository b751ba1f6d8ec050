"""Two simulated tailnet nodes behind NAT boxes of given kinds, for path-layer tests on virtual time.

The address plan follows the NAT lab's (``../shared/natlab/README.md``): the internet is
203.0.113.0/24 (STUN at .1), each NAT's WAN address 203.0.113.(10+n), its LAN 10.240.n.0/24 with
the host at .10; a double NAT's inner router sits at 10.240.n.2 on the outer LAN and its host on
10.241.n.0/24; a host without NAT ("none") is public at 203.0.113.(100+n).

Every world is built from one seed: the same seed, kinds and conditions give the same run, packet
for packet. Tests print the seed of a failing example; rebuild it with :func:`make_world`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from embedmesh.netstack.tcp.connection import TcpConnection
from embedmesh.paths import Path, PathKind
from embedmesh.sim import nat as simnat
from embedmesh.sim.derp import Region
from embedmesh.sim.nat import NatBox, NatKind
from embedmesh.sim.network import LinkConditions, SimNetwork
from embedmesh.sim.node import SimTailnetNode
from embedmesh.sim.tailnet import SimTailnet
from embedmesh.wire.icmp import ICMPV4_ECHO_REQUEST, build_icmpv4_echo
from embedmesh.wire.ip import PROTO_ICMP, build_ip

PORT = 41641

#: The NAT kinds of the lab's matrix ("double": eim-apdf behind eim-apdf).
KINDS: dict[str, NatKind | None] = {
    "none": None,
    "easy": simnat.EASY,
    "eim-adf": simnat.EIM_ADF,
    "eim-apdf": simnat.EIM_APDF,
    "symmetric": simnat.SYMMETRIC,
    "udp-blocked": simnat.UDP_BLOCKED,
    "double": simnat.EIM_APDF,
}
KIND_NAMES = list(KINDS)


def direct_expected(a: str, b: str) -> bool:
    """Whether a direct path exists between nodes behind NATs of kinds ``a`` and ``b`` (the lab's
    matrix, RESULTS.md): never through a UDP-blocking NAT nor between two endpoint-dependent
    mappings; between an endpoint-dependent mapping and an endpoint-independent one only when the
    latter's filtering lets the symmetric side's new port in (endpoint-independent, or by
    address only: the easy side already sent to the symmetric NAT's address)."""
    if "udp-blocked" in (a, b):
        return False
    if a == "symmetric" and b == "symmetric":
        return False
    if "symmetric" in (a, b):
        other = b if a == "symmetric" else a
        return other in ("none", "easy", "eim-adf")
    return True


@dataclass
class World:
    seed: int
    net: SimNetwork
    tailnet: SimTailnet
    a: SimTailnetNode
    b: SimTailnetNode
    nats: dict[str, NatBox] = field(default_factory=dict)
    kinds: tuple[str, str] = ("", "")

    def __str__(self) -> str:
        return f"seed={self.seed} kinds={self.kinds} link={self.net.conditions}"

    def peer_of(self, node: SimTailnetNode) -> SimTailnetNode:
        return self.b if node is self.a else self.a

    def path(self, node: SimTailnetNode) -> Path:
        return node.core.path(self.peer_of(node).public_key, self.net.now)

    def kinds_seen(self, node: SimTailnetNode) -> list[PathKind]:
        """The path kinds ``node`` used towards its peer, in order, repeats collapsed."""
        peer = self.peer_of(node).public_key
        out: list[PathKind] = []
        for _, key, path in node.path_log:
            if key == peer and (not out or out[-1] is not path.kind):
                out.append(path.kind)
        return out

    def ping(self, src: SimTailnetNode, seq: int, size: int = 32) -> None:
        dst = self.peer_of(src)
        echo = build_icmpv4_echo(ICMPV4_ECHO_REQUEST, 7, seq, b"x" * size)
        packet = build_ip(
            bytes(src.interface.addresses[0]), bytes(dst.interface.addresses[0]), PROTO_ICMP, echo
        )
        src.send_packet(packet, self.net.now)
        self.net.flush()

    def replies(self, node: SimTailnetNode) -> set[int]:
        return {r.sequence for r in node.echo_replies}

    def describe(self) -> str:
        """Everything worth printing when a run went wrong."""
        lines = [str(self)]
        for node in (self.a, self.b):
            lines.append(f"  {node.name} endpoints={node.endpoints} path={self.path(node)}")
            lines.append(f"    path log: {[(round(t, 3), str(p)) for t, _, p in node.path_log]}")
            lines.append(f"    node {dict(node.counters)}")
            lines.append(f"    paths {dict(node.core.counters)}")
            lines.append(f"    device {dict(node.device.counters)}")
        for name, box in self.nats.items():
            lines.append(f"  nat {name} {box.kind} {dict(box.counters)}")
        lines.append(f"  net {dict(self.net.counters)}")
        if self.tailnet.derp is not None:
            lines.append(f"  derp {dict(self.tailnet.derp.counters)}")
        return "\n".join(lines)


def _place(
    net: SimNetwork, kind: str | NatKind, n: int, timeout: float, nats: dict[str, NatBox], label: str
) -> tuple[tuple[str, int], NatBox | None]:
    box_kind = KINDS[kind] if isinstance(kind, str) else kind
    if box_kind is None:
        return (f"203.0.113.{100 + n}", PORT), None
    box_kind = replace(box_kind, timeout=timeout)
    if kind == "double":
        outer = net.add_nat(box_kind, f"203.0.113.{10 + n}", name=f"{label}-outer")
        inner = net.add_nat(box_kind, f"10.240.{n}.2", behind=outer, name=f"{label}-inner")
        nats[f"{label}-outer"], nats[f"{label}-inner"] = outer, inner
        return (f"10.241.{n}.10", PORT), inner
    box = net.add_nat(box_kind, f"203.0.113.{10 + n}", name=label)
    nats[label] = box
    return (f"10.240.{n}.10", PORT), box


def make_world(
    seed: int,
    kind_a: str | NatKind,
    kind_b: str | NatKind,
    *,
    conditions: LinkConditions | None = None,
    timeout: float = simnat.DEFAULT_TIMEOUT,
    derp_latency: float = 0.02,
    derp_bandwidth: float | None = None,
    advertise_lan: bool = True,
    control_delay: float = 0.05,
    join_delay: float = 0.0,
    start: bool = True,
) -> World:
    """Nodes ``a`` (behind ``kind_a``: a name of :data:`KINDS` or any NatKind) and ``b`` (behind
    ``kind_b``, joining ``join_delay`` seconds after ``a``) in one tailnet with one DERP region;
    with ``start`` the network then runs 2 s (STUN answered, network maps exchanged)."""
    rng = random.Random(seed)
    net = SimNetwork(rng, conditions or LinkConditions(delay=0.01))
    tailnet = SimTailnet(
        net, regions=[Region(1, latency=derp_latency, bandwidth=derp_bandwidth)], control_delay=control_delay
    )
    nats: dict[str, NatBox] = {}
    ep_a, behind_a = _place(net, kind_a, 1, timeout, nats, "a")
    ep_b, behind_b = _place(net, kind_b, 2, timeout, nats, "b")
    a = tailnet.add_node(ep_a, behind=behind_a, name="a", advertise_lan=advertise_lan)
    if join_delay:
        net.run(join_delay)
    b = tailnet.add_node(ep_b, behind=behind_b, name="b", advertise_lan=advertise_lan)
    world = World(seed, net, tailnet, a, b, nats, (str(kind_a), str(kind_b)))
    if start:
        net.run(net.now + 2.0)
    return world


def make_hairpin_world(
    seed: int,
    kind: str,
    *,
    hairpin: bool,
    advertise_lan: bool,
    conditions: LinkConditions | None = None,
) -> World:
    """Two nodes on the LAN of one NAT (``kind``, hairpinning on or off)."""
    rng = random.Random(seed)
    net = SimNetwork(rng, conditions or LinkConditions(delay=0.01))
    tailnet = SimTailnet(net, regions=[Region(1, latency=0.02)])
    base = KINDS[kind]
    assert base is not None
    box = net.add_nat(replace(base, hairpin=hairpin), "203.0.113.11", name="shared")
    a = tailnet.add_node(("10.240.1.10", PORT), behind=box, name="a", advertise_lan=advertise_lan)
    b = tailnet.add_node(("10.240.1.11", PORT), behind=box, name="b", advertise_lan=advertise_lan)
    world = World(seed, net, tailnet, a, b, {"shared": box}, (kind, kind))
    net.run(2.0)
    return world


class Transfer:
    """A one-way TCP bulk transfer from ``world.a`` to ``world.b`` over the overlay, stepped by
    the caller (so it can flush NATs or change their kind mid-stream)."""

    def __init__(self, world: World, payload: bytes, port: int = 80, *, chunk: int | None = None) -> None:
        self.world = world
        self.payload = payload
        #: The most the application writes per step (None: as much as TCP takes): a paced sender
        #: keeps the stream going across path changes.
        self.chunk = chunk
        self.listener = world.b.stack.tcp.listen(None, port)
        a_ip, b_ip = bytes(world.a.interface.addresses[0]), bytes(world.b.interface.addresses[0])
        self.client = world.a.stack.tcp.connect(a_ip, b_ip, port, world.net.now)
        world.net.flush()
        self.server: TcpConnection | None = None
        self.received = bytearray()
        self.offset = 0
        self.done = False
        #: (time, bytes received so far), once per step: the stream's progress.
        self.progress: list[tuple[float, int]] = []

    def step(self, dt: float = 0.05) -> None:
        net = self.world.net
        net.run(net.now + dt)
        client = self.client
        if self.server is None:
            self.server = self.listener.accept()
        if client.established and self.offset < len(self.payload):
            end = len(self.payload) if self.chunk is None else self.offset + self.chunk
            self.offset += client.send(memoryview(self.payload)[self.offset : end], net.now)
            if self.offset == len(self.payload):
                client.shutdown(net.now)
        server = self.server
        if server is not None:
            while chunk := server.receive(1 << 20, net.now):
                self.received += chunk
            if server.at_eof:
                self.done = True
        self.progress.append((net.now, len(self.received)))
        net.flush()

    def run_until(self, until: float, stop: Callable[[], bool] | None = None, dt: float = 0.05) -> bool:
        while self.world.net.now < until:
            self.step(dt)
            if self.done or (stop is not None and stop()):
                return True
        return False
