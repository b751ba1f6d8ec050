"""The simulator's NAT boxes on their own, seen through its STUN server and probe hosts: mapping,
filtering, timeouts, flushes, hairpinning and double NAT behave as the NAT lab measured Linux NATs
(RESULTS.md's host table), deterministically from the seed."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from embedmesh.sim import nat as simnat
from embedmesh.sim.nat import NatKind
from embedmesh.sim.network import LinkConditions, SimNetwork
from embedmesh.sim.stun import SimStunServer
from embedmesh.tailscale import stun

Endpoint = tuple[str, int]
STUN_SERVERS = [("203.0.113.1", 3478), ("203.0.113.2", 3478), ("203.0.113.1", 3479)]


class Probe:
    """A host that sends what the test tells it to and records what it receives."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, Endpoint]] = []
        self.received: list[tuple[bytes, Endpoint, float]] = []

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        self.received.append((data, source, now))

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self.out = self.out, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def handle_timeout(self, now: float) -> None:
        return None


def send(net: SimNetwork, host: Probe, data: bytes, to: Endpoint) -> None:
    host.out.append((data, to))
    net.flush()


def behind(kind: NatKind | None, seed: int = 1) -> tuple[SimNetwork, Probe, simnat.NatBox | None, Endpoint]:
    net = SimNetwork(random.Random(seed), LinkConditions(delay=0.005))
    for server in STUN_SERVERS:
        net.attach(server, SimStunServer())
    box = None if kind is None else net.add_nat(kind, "203.0.113.11")
    probe = Probe()
    local = ("203.0.113.100", 40000) if box is None else ("10.240.1.10", 40000)
    net.attach(local, probe, behind=box)
    return net, probe, box, local


def mapped(data: bytes) -> Endpoint:
    """The address a STUN Binding response says the request came from."""
    address = stun.parse_binding_response(data).address
    return (str(address[0]), address[1])


def mapped_addresses(net: SimNetwork, probe: Probe) -> list[Endpoint | None]:
    """The probe's reflexive address as each STUN server saw it (None: no answer)."""
    answers: list[Endpoint | None] = []
    for i, server in enumerate(STUN_SERVERS):
        probe.received.clear()
        send(net, probe, stun.binding_request(bytes([i]) * 12), server)
        net.run(net.now + 1.0)
        answers.append(mapped(probe.received[0][0]) if probe.received else None)
    return answers


# -- the lab's host table: mapping behaviour and port preservation, seen through STUN


@pytest.mark.parametrize(
    ("kind", "varies", "preserved"),
    [
        (None, False, True),
        (simnat.EASY, False, True),
        (simnat.EIM_ADF, False, True),
        (simnat.EIM_APDF, False, True),
        (simnat.SYMMETRIC, True, False),
    ],
    ids=["none", "easy", "eim-adf", "eim-apdf", "symmetric"],
)
def test_stun_sees_the_mapping_the_lab_measured(kind: NatKind | None, varies: bool, preserved: bool) -> None:
    net, probe, _, local = behind(kind)
    answers = mapped_addresses(net, probe)
    assert all(a is not None for a in answers)
    assert (len(set(answers)) > 1) is varies
    public = "203.0.113.100" if kind is None else "203.0.113.11"
    assert {a[0] for a in answers if a is not None} == {public}
    assert all(a is not None and (a[1] == local[1]) is preserved for a in answers)


def test_udp_blocked_answers_nothing() -> None:
    net, probe, box, _ = behind(simnat.UDP_BLOCKED)
    assert mapped_addresses(net, probe) == [None, None, None]
    assert box is not None and box.counters["drop_udp_blocked"] == 3


def test_double_nat_maps_twice_and_keeps_the_port() -> None:
    net = SimNetwork(random.Random(3), LinkConditions(delay=0.005))
    net.attach(STUN_SERVERS[0], SimStunServer())
    outer = net.add_nat(simnat.EIM_APDF, "203.0.113.19")
    inner = net.add_nat(simnat.EIM_APDF, "10.240.9.2", behind=outer)
    probe = Probe()
    net.attach(("10.241.9.10", 43005), probe, behind=inner)
    send(net, probe, stun.binding_request(bytes(12)), STUN_SERVERS[0])
    net.run(1.0)
    assert mapped(probe.received[0][0]) == ("203.0.113.19", 43005)
    assert inner.mappings == {("10.241.9.10", 43005): [43005]}
    assert outer.mappings == {("10.240.9.2", 43005): [43005]}


# -- filtering


@pytest.mark.parametrize(
    ("kind", "same_ip_other_port", "other_ip"),
    [
        (simnat.EASY, True, True),
        (simnat.EIM_ADF, True, False),
        (simnat.EIM_APDF, False, False),
        (simnat.SYMMETRIC, False, False),
    ],
    ids=["easy", "eim-adf", "eim-apdf", "symmetric"],
)
def test_filtering(kind: NatKind, same_ip_other_port: bool, other_ip: bool) -> None:
    net, probe, box, _ = behind(kind)
    assert box is not None
    senders = {ep: Probe() for ep in [("203.0.113.50", 1000), ("203.0.113.50", 1001), ("203.0.113.51", 1000)]}
    for ep, host in senders.items():
        net.attach(ep, host)
    send(net, probe, b"out", ("203.0.113.50", 1000))
    net.run(1.0)
    ((_, mapped, _),) = senders["203.0.113.50", 1000].received
    for host in senders.values():
        send(net, host, b"in", mapped)
    net.run(2.0)
    got = {src for data, src, _ in probe.received}
    assert (("203.0.113.50", 1000) in got) is True  # the reply always comes in
    assert (("203.0.113.50", 1001) in got) is same_ip_other_port
    assert (("203.0.113.51", 1000) in got) is other_ip


def test_a_private_address_is_not_routed_over_the_internet() -> None:
    net, probe, _, _ = behind(simnat.EASY)
    other = Probe()
    other_nat = net.add_nat(simnat.EASY, "203.0.113.12")
    net.attach(("10.240.2.10", 40000), other, behind=other_nat)
    send(net, probe, b"x", ("10.240.2.10", 40000))  # the peer's LAN address, from another LAN
    net.run(1.0)
    assert other.received == [] and net.counters["no_route"] == 1


# -- timeouts and flushes


@pytest.mark.parametrize(("idle", "passes"), [(29.0, True), (31.0, False)])
def test_a_mapping_idles_out_after_30_seconds(idle: float, passes: bool) -> None:
    net, probe, box, _ = behind(simnat.EIM_APDF)
    assert box is not None
    peer = Probe()
    net.attach(("203.0.113.50", 1000), peer)
    send(net, probe, b"open", ("203.0.113.50", 1000))
    net.run(1.0)
    mapped = peer.received[0][1]
    net.run(idle)  # the mapping was last used at 0
    send(net, peer, b"late", mapped)
    net.run(net.now + 1.0)
    assert (len(probe.received) == 1) is passes
    assert (box.counters["drop_no_mapping"] == 1) is not passes


def test_inbound_traffic_refreshes_the_mapping() -> None:
    net, probe, _, _ = behind(simnat.EIM_APDF)
    peer = Probe()
    net.attach(("203.0.113.50", 1000), peer)
    send(net, probe, b"open", ("203.0.113.50", 1000))
    net.run(1.0)
    mapped = peer.received[0][1]
    for _ in range(6):  # 120 s of replies every 20 s, nothing outbound
        net.run(net.now + 20.0)
        send(net, peer, b"reply", mapped)
    net.run(net.now + 1.0)
    assert len(probe.received) == 6


@pytest.mark.parametrize("preserving", [True, False])
def test_flush_forgets_mappings(preserving: bool) -> None:
    kind = replace(simnat.EIM_APDF, port_preserving=preserving)
    net, probe, box, _ = behind(kind)
    assert box is not None
    peer = Probe()
    net.attach(("203.0.113.50", 1000), peer)
    send(net, probe, b"open", ("203.0.113.50", 1000))
    net.run(1.0)
    before = peer.received[0][1]
    box.flush()
    send(net, peer, b"after flush", before)
    net.run(2.0)
    assert probe.received == [] and box.counters["drop_no_mapping"] == 1
    send(net, probe, b"again", ("203.0.113.50", 1000))
    net.run(3.0)
    after = peer.received[1][1]
    assert (after == before) is preserving


def test_set_kind_changes_behaviour_in_place() -> None:
    net, probe, box, _ = behind(simnat.UDP_BLOCKED)
    assert box is not None
    assert mapped_addresses(net, probe)[0] is None
    box.set_kind(simnat.EASY)
    assert mapped_addresses(net, probe)[0] == ("203.0.113.11", 40000)


# -- hairpinning


@pytest.mark.parametrize("hairpin", [True, False])
def test_hairpin(hairpin: bool) -> None:
    net = SimNetwork(random.Random(5), LinkConditions(delay=0.005))
    box = net.add_nat(replace(simnat.EIM_APDF, hairpin=hairpin), "203.0.113.11")
    a, b = Probe(), Probe()
    net.attach(("10.240.1.10", 4000), a, behind=box)
    net.attach(("10.240.1.11", 4001), b, behind=box)
    net.attach(("203.0.113.50", 1000), Probe())
    send(net, b, b"open", ("203.0.113.50", 1000))  # b's mapping: 203.0.113.11:4001
    send(net, a, b"to b's public address", ("203.0.113.11", 4001))
    net.run(1.0)
    if hairpin:
        assert b.received == [(b"to b's public address", ("203.0.113.11", 4000), pytest.approx(0.005))]
    else:
        assert b.received == [] and box.counters["drop_hairpin"] == 1
    send(net, a, b"lan", ("10.240.1.11", 4001))  # on the LAN, no NAT involved either way
    net.run(2.0)
    assert b.received[-1][:2] == (b"lan", ("10.240.1.10", 4000))


# -- determinism and port allocation


def test_port_allocation_is_reproducible_from_the_seed() -> None:
    def ports(seed: int) -> list[int]:
        net, probe, _, _ = behind(simnat.SYMMETRIC, seed)
        return [a[1] for a in mapped_addresses(net, probe) if a is not None]

    assert ports(7) == ports(7)
    assert ports(7) != ports(8)


def test_a_port_clash_takes_a_random_port() -> None:
    net = SimNetwork(random.Random(9), LinkConditions(delay=0.005))
    net.attach(STUN_SERVERS[0], SimStunServer())
    box = net.add_nat(simnat.EIM_APDF, "203.0.113.11")
    hosts = [Probe(), Probe()]
    for i, host in enumerate(hosts):
        net.attach((f"10.240.1.{10 + i}", 41641), host, behind=box)
        send(net, host, stun.binding_request(bytes([i]) * 12), STUN_SERVERS[0])
    net.run(1.0)
    first, second = (mapped(h.received[0][0]) for h in hosts)
    assert first == ("203.0.113.11", 41641)
    assert second is not None and second[1] != 41641
