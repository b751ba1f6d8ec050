"""Path discovery, upgrades and fallbacks on virtual time: two simulated tailnet nodes behind
every pair of NAT kinds, through the real path layer (DevicePaths over PathCore), a simulated DERP
relay and STUN server (see tests/simnat.py and docs/testing.md, "Simulation").

A failing run prints its seed and everything the nodes, NATs and relay counted; rebuild it with
``make_world(seed, kind_a, kind_b, ...)`` from tests/simnat.py (every run is deterministic).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import replace

import pytest

from embedmesh.paths import PathKind
from embedmesh.sim import nat as simnat
from tests.simnat import KIND_NAMES, Transfer, World, direct_expected, make_hairpin_world, make_world

PAIRS = list(itertools.combinations_with_replacement(KIND_NAMES, 2))


def exchange_pings(world: World, seconds: float, interval: float = 0.5) -> tuple[int, float | None]:
    """Pings both ways every ``interval`` for ``seconds``; returns (pings sent by a, the time from
    a's first ping to its reply: time to first byte)."""
    start = world.net.now
    world.ping(world.a, 1)
    world.ping(world.b, 1)
    answered = world.net.run(start + interval, stop=lambda: bool(world.a.echo_replies))
    first_reply = world.net.now - start if answered else None
    world.net.run(start + interval)
    seq = 1
    while world.net.now - start < seconds:
        seq += 1
        world.ping(world.a, seq)
        world.ping(world.b, seq)
        world.net.run(world.net.now + interval)
    world.net.run(world.net.now + 1.0)
    return seq, first_reply


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def time_to_direct(world: World, since: float) -> float | None:
    for t, key, path in world.a.path_log:
        if key == world.b.public_key and path.kind is PathKind.DIRECT and t >= since:
            return t - since
    return None


@pytest.mark.parametrize(("kind_a", "kind_b"), PAIRS, ids=[f"{a}--{b}" for a, b in PAIRS])
def test_pair_goes_direct_exactly_where_the_lab_did(kind_a: str, kind_b: str) -> None:
    world = make_world(1, kind_a, kind_b)
    start = world.net.now
    sent, first_reply = exchange_pings(world, 20.0)
    info = world.describe()
    # Connected, whatever the NATs: every ping answered (DERP at worst).
    assert world.replies(world.a) == set(range(1, sent + 1)), info
    assert world.replies(world.b) == set(range(1, sent + 1)), info
    want = PathKind.DIRECT if direct_expected(kind_a, kind_b) else PathKind.DERP
    for node in (world.a, world.b):
        assert world.path(node).kind is want, info
        # Relay first (traffic never waits for a punch), then at most one move to direct, no flaps.
        assert world.kinds_seen(node) == (
            [PathKind.DERP, PathKind.DIRECT] if want is PathKind.DIRECT else [PathKind.DERP]
        ), info
    direct_after = time_to_direct(world, start)
    if want is PathKind.DIRECT:
        assert direct_after is not None and direct_after < 6.0, info
        # Direct means the peer's outermost public address, never its LAN address on another LAN.
        address = world.path(world.a).address
        assert address is not None and address[0].startswith("203.0.113."), info
    else:
        assert world.a.counters["rx_derp_wireguard"] > 0 and world.b.counters["rx_derp_wireguard"] > 0, info
    print(
        f"{kind_a:>11} / {kind_b:<11} {want.value:6}  first reply {ms(first_reply)}, direct after {ms(direct_after)}"
    )


HAIRPIN_KINDS = ["easy", "eim-apdf", "symmetric"]


@pytest.mark.parametrize("kind", HAIRPIN_KINDS)
@pytest.mark.parametrize(
    ("hairpin", "advertise_lan", "want"),
    [
        (False, True, "lan"),  # the lab: direct through the LAN candidates, whatever the NAT
        (False, False, "derp"),  # public candidates only, no NAT loopback: relay (the lab's public-only rows)
        (True, False, "public"),  # a NAT that hairpins: direct through its public address
    ],
    ids=["lan", "public-only", "public-only-hairpin"],
)
def test_two_nodes_behind_one_nat(kind: str, hairpin: bool, advertise_lan: bool, want: str) -> None:
    world = make_hairpin_world(2, kind, hairpin=hairpin, advertise_lan=advertise_lan)
    sent, _ = exchange_pings(world, 15.0)
    info = world.describe()
    assert world.replies(world.a) == set(range(1, sent + 1)), info
    for node in (world.a, world.b):
        path = world.path(node)
        if want == "derp":
            assert path.kind is PathKind.DERP, info
            continue
        assert path.kind is PathKind.DIRECT and path.address is not None, info
        prefix = "10.240.1." if want == "lan" else "203.0.113.11"
        assert path.address[0].startswith(prefix), info


def longest_stall(transfer: Transfer) -> float:
    """The longest time the receiving application got no new byte."""
    longest, last_t, last_n = 0.0, 0.0, -1
    for t, n in transfer.progress:
        if n != last_n:
            longest = max(longest, t - last_t)
            last_t, last_n = t, n
    return longest


#: A home router that does not keep ports (many CGNATs and CPEs): a reboot moves its mappings.
RANDOM_PORT_HOME = replace(simnat.EIM_APDF, port_preserving=False, name="eim-apdf-random-port")


@pytest.mark.parametrize("seed", [1, 2])
def test_stream_survives_upgrade_to_direct_and_fallback_to_derp_and_back(seed: int) -> None:
    """A bulk TCP transfer starts on DERP (a's NAT blocks UDP), upgrades to direct when the NAT
    starts passing UDP, falls back to DERP when that NAT reboots onto new ports (both sides' direct
    path dies), and goes direct again once a's re-STUN finds its new address: byte-exact."""
    world = make_world(seed, "udp-blocked", "eim-apdf")
    a, b = world.a, world.b
    payload = hashlib.shake_256(seed.to_bytes(8, "big")).digest(3_000_000)
    transfer = Transfer(world, payload, chunk=2000)  # 40 kB/s: the stream outlasts every phase
    transfer.run_until(10.0)
    assert world.path(a).kind is PathKind.DERP and len(transfer.received) > 100_000, world.describe()

    world.nats["a"].set_kind(RANDOM_PORT_HOME)  # UDP passes now
    upgrade_at = world.net.now
    transfer.run_until(
        upgrade_at + 40.0, stop=lambda: world.path(a).kind is world.path(b).kind is PathKind.DIRECT
    )
    assert world.path(a).kind is world.path(b).kind is PathKind.DIRECT, world.describe()
    upgraded = world.net.now
    transfer.run_until(upgraded + 5.0)
    on_derp_before = b.counters["rx_derp_wireguard"]

    world.nats["a"].flush()  # the NAT reboots: new external port, both directions die
    flushed = world.net.now
    transfer.run_until(flushed + 30.0, stop=lambda: world.path(a).kind is PathKind.DERP)
    assert world.path(a).kind is PathKind.DERP, world.describe()
    fell_back = world.net.now
    transfer.run_until(
        fell_back + 60.0, stop=lambda: world.path(a).kind is world.path(b).kind is PathKind.DIRECT
    )
    assert world.path(a).kind is world.path(b).kind is PathKind.DIRECT, world.describe()
    back = world.net.now
    assert b.counters["rx_derp_wireguard"] > on_derp_before, "nothing went through DERP during the fallback"
    # The blackout lasts until the dead path's trust runs out on both sides (at most 6.5 s after
    # the last pong), then the copies through DERP carry the stream from TCP's next (backed-off)
    # retransmission on: about twice the blackout at worst.
    assert longest_stall(transfer) < 15.0, world.describe()

    assert transfer.run_until(back + 200.0), world.describe()
    assert bytes(transfer.received) == payload, world.describe()
    assert transfer.client.error is None
    for node in (a, b):
        assert world.kinds_seen(node) == [PathKind.DERP, PathKind.DIRECT, PathKind.DERP, PathKind.DIRECT], (
            world.describe()
        )
    print(
        f"seed {seed}: direct {upgraded - upgrade_at:.1f} s after UDP opened, DERP {fell_back - flushed:.1f} s after"
        f" the flush, direct again {back - fell_back:.1f} s later; longest stall {longest_stall(transfer):.1f} s"
    )


def test_flush_of_a_port_preserving_nat_keeps_the_stream_direct() -> None:
    """A Linux home router keeps the port across a reboot: the next packet out recreates the very
    mapping, and the path stays direct while the stream goes on."""
    world = make_world(3, "eim-apdf", "eim-apdf")
    payload = hashlib.shake_256(b"preserving").digest(1_000_000)
    transfer = Transfer(world, payload, chunk=4000)
    transfer.run_until(10.0)
    assert world.path(world.a).kind is PathKind.DIRECT
    world.nats["a"].flush()
    world.nats["b"].flush()
    assert transfer.run_until(200.0), world.describe()
    assert bytes(transfer.received) == payload
    for node in (world.a, world.b):
        assert world.kinds_seen(node) == [PathKind.DERP, PathKind.DIRECT], world.describe()


@pytest.mark.parametrize("kinds", [("eim-apdf", "eim-apdf"), ("easy", "symmetric"), ("double", "none")])
def test_heartbeats_hold_a_direct_path_through_a_30_second_nat_timeout(kinds: tuple[str, str]) -> None:
    """Traffic every 40 s (longer than the NATs' 30-s idle timeout, shorter than the 45-s session
    timeout): the path layer's heartbeats (every 3 s while the peer has traffic) keep every
    mapping alive, so the path never leaves direct and no NAT drops a packet of the peers'.
    (With the heartbeats off every case fails: the 40-s gaps close the pinholes.)"""
    world = make_world(4, *kinds, timeout=30.0)
    exchange_pings(world, 3.0)
    assert world.path(world.a).kind is world.path(world.b).kind is PathKind.DIRECT, world.describe()
    # The two ends of the direct path, as each NAT sees them.
    ends = {world.path(world.a).address, world.path(world.b).address}
    log_length = (len(world.a.path_log), len(world.b.path_log))
    via_derp = (world.a.counters["rx_derp_wireguard"], world.b.counters["rx_derp_wireguard"])
    base = world.net.now
    for i in range(8):  # five minutes, each side starting every other exchange
        world.net.run(base + 40.0 * (i + 1))
        seq, node = 100 + i, (world.a, world.b)[i % 2]
        world.ping(node, seq)
        answered = world.net.run(
            world.net.now + 0.5, stop=lambda seq=seq, node=node: seq in world.replies(node)
        )
        assert answered, world.describe()
    assert (len(world.a.path_log), len(world.b.path_log)) == log_length, world.describe()
    assert (world.a.counters["rx_derp_wireguard"], world.b.counters["rx_derp_wireguard"]) == via_derp
    # No NAT dropped a packet of the path (pings to candidates that never worked, such as the
    # symmetric side's STUN port, are dropped once a minute by the upgrade probes: not the path).
    for box in world.nats.values():
        assert [d for d in box.drops if d[0] > base and d[2] in ends and d[3] in ends] == [], world.describe()


def test_after_a_long_silence_the_expired_path_comes_back() -> None:
    """Silent for 90 s: heartbeats stop at 45 s, the 30-s pinholes close, the old direct path is
    dead on both sides. The very next packet is answered (its copy through DERP: the path is no
    longer trusted) while disco punches again, and the path is direct again."""
    world = make_world(5, "eim-apdf", "eim-apdf", timeout=30.0)
    exchange_pings(world, 3.0)
    assert world.path(world.a).kind is PathKind.DIRECT
    ends = {world.path(world.a).address, world.path(world.b).address}
    world.net.run(world.net.now + 90.0)
    start = world.net.now
    relayed = world.b.counters["rx_derp_wireguard"]
    for seq in range(1000, 1030):  # a ping a second until one is answered
        world.ping(world.a, seq)
        if world.net.run(
            world.net.now + 1.0, stop=lambda: bool(world.replies(world.a) & set(range(1000, 1030)))
        ):
            break
    answered = world.net.now - start
    assert answered < 0.5, world.describe()  # the first ping
    assert world.b.counters["rx_derp_wireguard"] > relayed, world.describe()
    # The old path was dead indeed: a NAT dropped the peer's packets after the silence.
    assert any(d[0] > start and d[2] in ends for box in world.nats.values() for d in box.drops), (
        world.describe()
    )
    exchange_pings(world, 10.0)
    assert world.path(world.a).kind is world.path(world.b).kind is PathKind.DIRECT, world.describe()
    print(f"first answer {answered:.2f} s after 90 s of silence")
