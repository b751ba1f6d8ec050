"""Where TCP's and UDP's secrets come from (RFC 6528, RFC 6056, RFC 7323 §7.1).

A Mersenne Twister is fully determined by 624 of its outputs, and a peer sees plenty of them
(ephemeral ports, timestamp offsets): keys drawn from it are not secret. So the default source of
every sans-IO core, and the one ``Node`` hands in, is the operating system's CSPRNG; a simulation
still passes a seeded ``random.Random`` and stays reproducible.
"""

from __future__ import annotations

import base64
import random
from typing import Any

from embedmesh.netstack.stack import Netstack
from embedmesh.netstack.tcp import TcpLayer
from embedmesh.netstack.udp import UdpLayer
from embedmesh.wire.tcp import ACK, RST, SYN, TcpSegment, build_tcp, parse_tcp
from embedmesh.wireguard.device import WireGuardDevice

LOCAL = bytes([10, 0, 0, 1])
REMOTE = bytes([10, 0, 0, 2])
M = 0xFFFFFFFF


def _replayable(rng: Any) -> bool:
    """Whether someone who learns the generator's state can compute its next outputs.

    That is what an attacker reconstructs from observed outputs of a Mersenne Twister; the OS CSPRNG
    has no such state (``SystemRandom.getstate`` raises).
    """
    try:
        state = rng.getstate()
    except NotImplementedError:
        return False
    clone = random.Random()
    clone.setstate(state)
    return bool(clone.randbytes(32) == rng.randbytes(32))


class _Layer:
    """A bare TcpLayer at LOCAL that records what it sends."""

    def __init__(self, **kwargs: Any) -> None:
        self.out: list[TcpSegment] = []
        self.layer = TcpLayer(self._tx, **kwargs)
        self.layer.listen(None, 80, 8)

    def _tx(self, src: bytes, dst: bytes, segment: bytes) -> None:
        self.out.append(parse_tcp(segment, src, dst))

    def syn_seq(self, local_port: int, remote_port: int, now: float) -> int:
        """Open a connection, return its ISN, then reset it so the 4-tuple is free again."""
        conn = self.layer.connect(LOCAL, REMOTE, remote_port, now, local_port=local_port)
        syn = self.out.pop()
        assert syn.flags == SYN
        conn.abort(now)
        self.layer.handle_timeout(now)
        self.out.clear()
        return syn.seq

    def synack_seq(self, remote_port: int, now: float) -> int:
        """A remote SYN to port 80; returns our SYN-ACK's ISN and resets the half-open connection."""
        self.layer.segment_received(REMOTE, LOCAL, build_tcp(REMOTE, LOCAL, remote_port, 80, 5, 0, SYN, 65535), now)
        synack = self.out.pop()
        assert synack.flags == SYN | ACK
        self.layer.segment_received(REMOTE, LOCAL, build_tcp(REMOTE, LOCAL, remote_port, 80, 6, 0, RST, 0), now)
        self.out.clear()
        return synack.seq


def test_default_sources_are_the_os_csprng() -> None:
    # Every core that draws secrets or ports defaults to a source with no state to reconstruct.
    tcp = TcpLayer(lambda s, d, b: None)
    stack = Netstack([LOCAL], lambda b: None)
    device = WireGuardDevice(bytes(range(32)))
    for rng in (tcp._rng, stack.tcp._rng, stack.udp.rng, device._rng):
        assert not _replayable(rng), rng
    # The check is not vacuous: a Mersenne Twister is replayable.
    assert _replayable(random.Random(1))


def test_node_hands_the_os_csprng_to_its_stack_and_device() -> None:
    from embedmesh.node import Node

    key = base64.b64encode(bytes(range(32))).decode()
    config = f"[Interface]\nPrivateKey = {key}\nAddress = 10.9.0.1/24\n"
    node = Node(wireguard_config=config)
    for rng in (node._stack.tcp._rng, node._stack.udp.rng, node._device._rng):
        assert not _replayable(rng), rng


def test_isn_is_clock_plus_keyed_hash_of_the_four_tuple() -> None:
    """RFC 6528 §3: ISN = M + F(4-tuple, secret), M a 4 µs clock."""
    a = _Layer()
    first = a.syn_seq(1000, 80, 10.0)
    # The same 4-tuple a second later: exactly one second of 4 µs ticks more, so successive
    # incarnations of a connection keep moving forward.
    assert (a.syn_seq(1000, 80, 11.0) - first) & M == 250_000
    assert (a.syn_seq(1000, 80, 11.5) - first) & M == 375_000
    # Another 4-tuple at the same instant: an unrelated offset, not the clock's 0 or a small step.
    # (32 uniform draws all within a quarter of the space: probability below 2**-60.)
    offsets = [(a.syn_seq(port, 80, 10.0) - first) & M for port in range(1001, 1033)]
    assert len(set(offsets)) == 32 and 0 not in offsets
    assert max(offsets) - min(offsets) > 1 << 30
    # The passive side follows the same rule.
    b = _Layer()
    s1 = b.synack_seq(40000, 3.0)
    assert (b.synack_seq(40000, 4.0) - s1) & M == 250_000
    assert b.synack_seq(40001, 3.0) != s1


def test_two_stacks_have_different_secrets() -> None:
    # Same 4-tuple, same instant, even after seeding the global `random` identically: different
    # keys, so one node's ISNs tell nothing about another's.
    random.seed(1234)
    a = _Layer()
    random.seed(1234)
    b = _Layer()
    assert a.syn_seq(1000, 80, 1.0) != b.syn_seq(1000, 80, 1.0)


def test_timestamp_clock_starts_at_a_keyed_hash_of_the_four_tuple() -> None:
    # TSval reveals neither the uptime nor a link between connections; one 4-tuple keeps its clock
    # across incarnations (RFC 6191 TIME-WAIT reuse relies on it).
    t = _Layer()

    def tsval(local_port: int, now: float) -> int:
        conn = t.layer.connect(LOCAL, REMOTE, 80, now, local_port=local_port)
        syn = t.out.pop()
        assert syn.timestamp is not None
        conn.abort(now)
        t.out.clear()
        return syn.timestamp[0]

    first = tsval(2000, 5.0)
    assert (tsval(2000, 6.0) - first) & M == 1000  # milliseconds
    others = [tsval(port, 5.0) for port in range(2001, 2033)]
    assert len(set(others)) == 32 and first not in others
    assert max(others) - min(others) > 1 << 30


def test_a_seeded_source_stays_reproducible() -> None:
    a = _Layer(rng=random.Random(9))
    b = _Layer(rng=random.Random(9))
    assert a.syn_seq(1000, 80, 1.0) == b.syn_seq(1000, 80, 1.0)


def test_udp_ephemeral_ports_come_from_the_os_csprng() -> None:
    from embedmesh.netstack.interface import NetworkInterface

    udp = UdpLayer(NetworkInterface([LOCAL], lambda b: None))
    assert not _replayable(udp.rng)
    ports = {udp.bind(None, 0).local_port for _ in range(32)}
    assert len(ports) > 16  # random picks, not a counter from a fixed start


def test_no_document_shows_a_mersenne_twister_as_a_source_of_secrets() -> None:
    # Users copy examples: one that hands a stack `random.Random()` hands its keys to any peer that
    # watches. Seeded generators belong to simulations (sim/, tests), which are not documented usage.
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    documents = [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]
    if (repo / "examples").is_dir():
        documents += sorted(p for p in (repo / "examples").rglob("*") if p.is_file())
    assert len(documents) > 5
    offenders = [str(p.relative_to(repo)) for p in documents if "random.Random(" in p.read_text(errors="replace")]
    assert offenders == []
