"""WireGuard's timers (whitepaper §6), proved on the virtual clock."""

from __future__ import annotations

import itertools

import pytest

from embedmesh.wireguard.timers import (
    HURRY_MIN_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from tests.wireguard.simpair import B_EP, make_pair


def test_rekey_after_time_and_traffic_never_stalls() -> None:
    """A pings B twice a second for 10 minutes: every rekey happens on schedule and no ping is lost."""
    p = make_pair()
    seq = 0
    t = 0.0
    while t < 600.0:
        seq += 1
        p.ping(p.a, seq)
        t += 0.5
        p.net.run(t)
    p.net.run(t + 1.0)
    assert p.replies(p.a) == set(range(1, seq + 1))
    completed = p.a.device.peers[p.b.public_key].stats.handshakes_completed
    # One handshake at start, then one each REKEY_AFTER_TIME (120 s) of sending: at 0, 120, ..., 480.
    assert completed == 5
    assert p.a.device.counters["tx_initiation"] == completed
    current = p.a.device.peers[p.b.public_key].current
    assert current is not None and p.net.now - current.created < REKEY_AFTER_TIME + 1


def test_keypair_is_rejected_after_reject_after_time() -> None:
    p = make_pair()
    p.ping(p.a, 1)
    p.net.run(1.0)
    keypair = p.a.device.peers[p.b.public_key].current
    assert keypair is not None
    # Silence both sides' timers, then send with a stale session on B's side.
    p.net.run(REJECT_AFTER_TIME + 2)
    p.ping(p.b, 2)
    p.net.run(REJECT_AFTER_TIME + 5)
    # B's session was too old: it started a fresh handshake rather than send with it.
    assert p.b.device.counters["tx_initiation"] == 1
    assert p.replies(p.b) == {2}


def test_passive_keepalive_after_receiving_data() -> None:
    p = make_pair()
    # A sends one packet that B does not answer (UDP to nowhere, not a ping).
    p.a.send_packet(p.ping_packet(p.a, "100.64.0.2", 1)[:20] + bytes(8), 0.0)
    p.net.run(KEEPALIVE_TIMEOUT - 0.5)
    assert p.b.device.counters["tx_keepalive"] == 0
    p.net.run(KEEPALIVE_TIMEOUT + 1.0)
    assert p.b.device.counters["tx_keepalive"] == 1


def test_persistent_keepalive() -> None:
    p = make_pair(persistent_keepalive=25)
    p.ping(p.a, 1)
    p.net.run(100.0)
    # About one keepalive every 25 s from each side once the session exists.
    assert 3 <= p.a.device.counters["tx_keepalive"] <= 5


def test_handshake_retransmits_then_gives_up() -> None:
    p = make_pair()
    p.net.hosts.pop(B_EP)  # B is gone
    p.ping(p.a, 1)
    p.net.run(200.0)
    peer = p.a.device.peers[p.b.public_key]
    assert p.a.device.counters["tx_initiation"] == MAX_HANDSHAKE_ATTEMPTS + 1
    assert p.a.device.counters["handshake_gave_up"] == 1
    assert not peer.staged and peer.handshake is None


def test_retransmissions_are_spaced_by_rekey_timeout_with_jitter() -> None:
    p = make_pair()
    p.net.hosts.pop(B_EP)
    sent: list[float] = []
    p.net.observers.append(lambda s, d, data: sent.append(p.net.now) if data[0] == 1 else None)
    p.ping(p.a, 1)
    p.net.run(40.0)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps and all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + 1 / 3 + 1e-9 for g in gaps)


def test_new_handshake_when_the_peer_stops_answering() -> None:
    p = make_pair()
    p.ping(p.a, 1)
    p.net.run(1.0)
    p.net.hosts.pop(B_EP)
    p.ping(p.a, 2)
    p.net.run(1.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.1)
    assert p.a.device.counters["handshake_for_silence"] == 0
    p.net.run(1.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.5)
    assert p.a.device.counters["handshake_for_silence"] == 1


def test_keys_are_zeroed_after_three_reject_after_times() -> None:
    p = make_pair()
    p.ping(p.a, 1)
    p.net.run(1.0)
    p.net.run(REJECT_AFTER_TIME * 3 + 2)
    peer = p.a.device.peers[p.b.public_key]
    assert peer.current is None and peer.previous is None and peer.next is None
    assert not p.a.device._indices


def test_a_hurried_handshake_goes_out_at_once_instead_of_at_the_retransmit_timer() -> None:
    """What the node does when a Tailscale peer's disco ping shows it can reach us now: the
    initiation whose answer was lost is sent again at once, not REKEY_TIMEOUT later."""
    p = make_pair()
    peer = p.a.device.peers[p.b.public_key]
    del p.net.hosts[B_EP]  # B cannot be reached yet: the first initiation is lost
    p.ping(p.a, 1)
    p.net.run(0.5)
    assert p.a.device.counters["tx_initiation"] == 1 and peer.handshake is not None
    p.net.attach(B_EP, p.b)
    p.a.device.hurry_handshake(peer, p.net.now)
    p.net.flush()
    p.net.run(1.0)
    assert p.a.device.counters["handshake_hurried"] == 1
    assert p.replies(p.a) == {1} and p.net.now < REKEY_TIMEOUT
    # With a session up, hurrying does nothing.
    p.a.device.hurry_handshake(peer, p.net.now)
    assert p.a.device.counters["handshake_hurried"] == 1


def test_a_hurried_handshake_right_after_an_initiation_waits_its_interval() -> None:
    """A second initiation within the peer's flood guard would be dropped, and it would discard
    the first one's state while the answer may still come: hurrying that early resends only once
    the last initiation is HURRY_MIN_INTERVAL old (found by the simulator: seed 110)."""
    p = make_pair()
    peer = p.a.device.peers[p.b.public_key]
    del p.net.hosts[B_EP]
    p.ping(p.a, 1)
    p.net.run(0.001)
    sent_at = peer.last_initiation_sent
    p.net.attach(B_EP, p.b)
    p.a.device.hurry_handshake(peer, sent_at + 0.02)
    assert p.a.device.counters["tx_initiation"] == 1  # not at once
    assert peer.retransmit_handshake_at == pytest.approx(sent_at + HURRY_MIN_INTERVAL)
    p.net.run(HURRY_MIN_INTERVAL + 0.5)
    assert p.a.device.counters["tx_initiation"] == 2
    assert p.replies(p.a) == {1} and p.net.now < REKEY_TIMEOUT
