"""The handshake and transport on virtual time: both roles, PSKs, replays, hostile senders, cookies."""

from __future__ import annotations

import random

from embedmesh.wireguard import crypto
from embedmesh.wireguard.device import WireGuardDevice
from embedmesh.wireguard.messages import MESSAGE_COOKIE_REPLY, message_type
from tests.wireguard.simpair import A_EP, B_EP, make_pair


def test_initiator_and_responder_exchange_packets() -> None:
    p = make_pair()
    p.ping(p.a, 1)
    p.net.run(1.0)
    assert p.replies(p.a) == {1}
    assert p.a.device.counters["tx_initiation"] == 1
    assert p.b.device.counters["rx_initiation"] == 1
    peer_b = p.a.device.peers[p.b.public_key]
    peer_a = p.b.device.peers[p.a.public_key]
    assert peer_b.current is not None and peer_b.current.is_initiator
    # The responder promoted its session once the initiator's first packet arrived.
    assert peer_a.current is not None and not peer_a.current.is_initiator and peer_a.next is None


def test_responder_without_endpoint_learns_it_from_the_handshake() -> None:
    p = make_pair(b_knows_endpoint=False)
    assert p.b.device.peers[p.a.public_key].endpoint is None
    p.ping(p.a, 1)
    p.net.run(1.0)
    assert p.b.device.peers[p.a.public_key].endpoint == A_EP
    p.ping(p.b, 2)
    p.net.run(2.0)
    assert p.replies(p.b) == {2}


def test_preshared_key_must_match() -> None:
    p = make_pair(preshared_key=bytes(range(32)))
    p.ping(p.a, 1)
    p.net.run(1.0)
    assert p.replies(p.a) == {1}

    q = make_pair(seed=2, preshared_key=bytes(range(32)))
    q.a.device.peers[q.b.public_key].keys.preshared_key = bytes(32)
    q.ping(q.a, 1)
    q.net.run(1.0)
    assert q.replies(q.a) == set()
    assert q.a.device.counters["drop_authentication"] >= 1


def test_replayed_initiation_is_rejected_and_changes_nothing() -> None:
    p = make_pair()
    captured: list[bytes] = []
    p.net.observers.append(lambda s, d, data: captured.append(data) if message_type(data) == 1 else None)
    p.ping(p.a, 1)
    p.net.run(1.0)
    peer_a = p.b.device.peers[p.a.public_key]
    session = peer_a.current
    p.net.inject(A_EP, B_EP, captured[0])
    p.net.run(2.0)
    assert p.b.device.counters["drop_replayed_initiation"] == 1
    assert peer_a.current is session and peer_a.next is None


def test_replayed_transport_is_rejected() -> None:
    p = make_pair()
    captured: list[bytes] = []
    p.net.observers.append(
        lambda s, d, data: captured.append(data) if s == A_EP and message_type(data) == 4 else None
    )
    p.ping(p.a, 1)
    p.net.run(1.0)
    before = len(p.b.delivered)
    p.net.inject(A_EP, B_EP, captured[0])
    p.net.run(2.0)
    assert p.b.device.counters["drop_replay"] == 1
    assert len(p.b.delivered) == before


def test_tampered_transport_is_dropped() -> None:
    p = make_pair()
    captured: list[bytes] = []
    p.net.observers.append(
        lambda s, d, data: captured.append(data) if s == A_EP and message_type(data) == 4 else None
    )
    p.ping(p.a, 1)
    p.net.run(1.0)
    forged = bytearray(captured[0])
    forged[8] ^= 0x80  # counter, which is authenticated through the nonce
    forged[-1] ^= 1
    p.net.inject(A_EP, B_EP, bytes(forged))
    p.net.run(2.0)
    assert p.b.device.counters["drop_authentication"] >= 1


def test_unknown_sender_gets_no_state() -> None:
    """A stranger who knows our public key (so mac1 is valid) still allocates nothing."""
    p = make_pair()
    rng = random.Random(9)
    stranger = WireGuardDevice(
        crypto.generate_private_key(rng.randbytes(32)), random_bytes=rng.randbytes, rng=rng
    )
    peer = stranger.add_peer(p.b.public_key, endpoint=B_EP, allowed_ips=["0.0.0.0/0"])
    stranger.initiate_handshake(peer, 0.0)
    ((initiation, _),) = stranger.datagrams_to_send()
    indices_before = dict(p.b.device._indices)
    peers_before = dict(p.b.device.peers)
    p.b.receive_datagram(initiation, ("198.18.9.9", 1), 0.0)
    assert p.b.device.counters["drop_unknown_peer"] == 1
    assert p.b.device._indices == indices_before
    assert p.b.device.peers == peers_before
    assert p.b.datagrams_to_send() == []


def test_bad_mac1_is_dropped_before_any_crypto() -> None:
    p = make_pair()
    captured: list[bytes] = []
    p.net.observers.append(lambda s, d, data: captured.append(data) if message_type(data) == 1 else None)
    p.ping(p.a, 1)
    p.net.run(1.0)
    forged = bytearray(captured[0])
    forged[120] ^= 1
    p.b.receive_datagram(bytes(forged), A_EP, 5.0)
    assert p.b.device.counters["drop_bad_mac1"] == 1


def test_source_address_must_be_in_allowed_ips() -> None:
    p = make_pair()
    p.ping(p.a, 1)
    p.net.run(1.0)
    spoofed = p.ping_packet(p.a, "100.64.0.2", 2)
    spoofed = spoofed[:12] + bytes([100, 64, 0, 77]) + spoofed[16:]
    p.a.device.send_to_peer(p.a.device.peers[p.b.public_key], spoofed, p.net.now)
    p.net.run(2.0)
    assert p.b.device.counters["drop_source_not_allowed"] == 1


def test_endpoint_roams_to_latest_authenticated_source() -> None:
    p = make_pair()
    p.ping(p.a, 1)
    p.net.run(1.0)
    new_ep = ("198.18.0.99", 40000)
    p.net.attach(new_ep, p.a)
    p.a.endpoint = new_ep
    p.net.hosts.pop(A_EP)
    # A now sends from its new address; the network still names the old sender unless told.
    p.a.send_packet(p.ping_packet(p.a, "100.64.0.2", 2), p.net.now)
    for data, dst in p.a.datagrams_to_send():
        p.net.inject(new_ep, dst, data)
    p.net.run(2.0)
    assert p.b.device.peers[p.a.public_key].endpoint == new_ep
    # Unauthenticated garbage from elsewhere does not move it.
    p.b.receive_datagram(b"\x04\x00\x00\x00" + bytes(40), ("198.18.6.6", 1), p.net.now)
    assert p.b.device.peers[p.a.public_key].endpoint == new_ep


def test_cookie_reply_under_load_then_mac2_handshake_succeeds() -> None:
    p = make_pair()
    # A threshold of 0 puts the responder under load from the first handshake message.
    p.b.device._under_load_threshold = 0
    cookie_replies: list[bytes] = []
    p.net.observers.append(
        lambda s, d, data: cookie_replies.append(data) if message_type(data) == MESSAGE_COOKIE_REPLY else None
    )
    p.ping(p.a, 1)
    p.net.run(1.0)
    assert len(cookie_replies) == 1
    assert p.b.device.counters["tx_cookie_reply"] == 1
    assert p.a.device.counters["rx_cookie_reply"] == 1
    assert p.replies(p.a) == set()
    # The next (retransmitted) initiation carries mac2 and gets through while still under load.
    p.net.run(8.0)
    assert p.replies(p.a) == {1}
    assert p.b.device.counters["tx_cookie_reply"] == 1


def test_malformed_datagrams_never_raise() -> None:
    p = make_pair()
    rng = random.Random(3)
    for n in range(2000):
        size = rng.choice([0, 1, 3, 4, 31, 32, 33, 64, 92, 148, 200])
        data = bytes([rng.choice([1, 2, 3, 4, 0, 5])]) + bytes(3) + rng.randbytes(max(size - 4, 0))
        p.b.receive_datagram(data[:size], ("198.18.7.7", n), 0.0)
    assert p.b.device.peers[p.a.public_key].endpoint == A_EP
    assert len(p.b.device._indices) == 0
